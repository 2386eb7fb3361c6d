"""Compile the pipeline and its components to the YAML that Kubeflow Pipelines loads.

`make compile` writes every compiled file this repository ships, in one go:

- `pipelines/training.yaml`: the training pipeline (upload it in the Kubeflow UI);
- `pipelines/batch_inference.yaml`: the batch inference pipeline (a registered model over a
  directory or S3 prefix of images, into Parquet);
- `components/<step>.yaml`: each component, for other pipelines
  (`kfp.components.load_component_from_file("components/train.yaml")`);
- `charts/visionflow/files/`: the same files, which the Helm chart ships and its hook uploads.

tests/unit/test_pipeline_spec.py fails when any of them differs from a fresh compile.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from visionflow.runs import STEPS

COMPONENTS = ("configure", *STEPS, "predict")
# Pipeline name -> (module, function).
PIPELINES = {
    "training": ("visionflow.kfp.pipeline", "training_pipeline"),
    "batch_inference": ("visionflow.kfp.batch_pipeline", "batch_inference_pipeline"),
}
CHART_FILES = Path("charts/visionflow/files")


def pipeline_function(name: str = "training"):
    if name not in PIPELINES:
        raise ValueError(f"no pipeline {name!r}: one of {', '.join(PIPELINES)}")
    module, function = PIPELINES[name]
    return getattr(importlib.import_module(module), function)


def compile_pipeline(path: Path, name: str = "training") -> Path:
    from kfp import compiler

    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(pipeline_function(name), package_path=str(path))
    return path


def compile_component(name: str, path: Path) -> Path:
    from kfp import compiler

    component = getattr(importlib.import_module(f"visionflow.kfp.components.{name}"), name)
    path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(component, str(path))
    return path


def compiled_files(root: Path) -> dict[Path, tuple[str, str]]:
    """Every compiled file under `root` (a checkout): path -> ("pipeline"|"component", name)."""
    files: dict[Path, tuple[str, str]] = {}
    for pipeline_dir, component_dir in (
        (root / "pipelines", root / "components"),
        (root / CHART_FILES / "pipeline", root / CHART_FILES / "components"),
    ):
        for name in PIPELINES:
            files[pipeline_dir / f"{name}.yaml"] = ("pipeline", name)
        for name in COMPONENTS:
            files[component_dir / f"{name}.yaml"] = ("component", name)
    return files


def compile_all(root: Path) -> list[Path]:
    """Write every compiled file of the checkout at `root`; returns their paths."""
    written = []
    for path, (kind, name) in compiled_files(root).items():
        written.append(
            compile_pipeline(path, name) if kind == "pipeline" else compile_component(name, path)
        )
    return written
