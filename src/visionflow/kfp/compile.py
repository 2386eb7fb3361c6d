"""Compile the pipeline and its components to the YAML that Kubeflow Pipelines loads.

`make compile` writes every compiled file this repository ships, in one go:

- `pipelines/training.yaml`: the training pipeline (upload it in the Kubeflow UI);
- `components/<step>.yaml`: each component, for other pipelines
  (`kfp.components.load_component_from_file("components/train.yaml")`);
- `charts/visionflow/files/`: the same files, which the Helm chart ships and its hook uploads.

tests/unit/test_pipeline_spec.py fails when any of them differs from a fresh compile.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from visionflow.runs import STEPS

COMPONENTS = ("configure", *STEPS)
CHART_FILES = Path("charts/visionflow/files")


def compile_pipeline(path: Path) -> Path:
    from kfp import compiler

    from visionflow.kfp.pipeline import training_pipeline

    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(training_pipeline, package_path=str(path))
    return path


def compile_component(name: str, path: Path) -> Path:
    from kfp import compiler

    component = getattr(importlib.import_module(f"visionflow.kfp.components.{name}"), name)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(component, str(path))
    return path


def compiled_files(root: Path) -> dict[Path, tuple[str, str | None]]:
    """Every compiled file under `root` (a checkout): path -> ("pipeline"|"component", name)."""
    files: dict[Path, tuple[str, str | None]] = {}
    for pipeline_dir, component_dir in (
        (root / "pipelines", root / "components"),
        (root / CHART_FILES / "pipeline", root / CHART_FILES / "components"),
    ):
        files[pipeline_dir / "training.yaml"] = ("pipeline", None)
        for name in COMPONENTS:
            files[component_dir / f"{name}.yaml"] = ("component", name)
    return files


def compile_all(root: Path) -> list[Path]:
    """Write every compiled file of the checkout at `root`; returns their paths."""
    written = []
    for path, (kind, name) in compiled_files(root).items():
        written.append(
            compile_pipeline(path) if kind == "pipeline" else compile_component(name, path)
        )
    return written
