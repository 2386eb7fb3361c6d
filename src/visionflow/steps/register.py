"""register: the model into the MLflow Model Registry, and the `champion` alias if it earns it.

Each registered version is a pyfunc model (see serving/onnx_pyfunc.py) carrying the fp32 and
int8 ONNX files and the TorchScript file, tagged with its lineage. The alias `champion` moves
to the new version only if the quality gate passed and the new model is more accurate than the
current champion on the same test split (both measured here, with ONNX Runtime).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionflow import tracking
from visionflow.core.factories import build_datamodule
from visionflow.runs import load_step, save_step
from visionflow.storage import open_store, split_uri
from visionflow.vision.inference import accuracy, collect, ort_predictor, ort_session

log = logging.getLogger("visionflow.register")

CHAMPION = "champion"
PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serving" / "onnx_pyfunc.py"


@dataclass
class RegisterResult:
    model_name: str
    model_version: int
    model_uri: str
    champion: bool  # this version holds the alias now
    champion_version: int | None
    reason: str
    test_accuracy_onnx: float
    champion_accuracy: float | None


def model_name(cfg) -> str:
    return cfg.register.model_name or f"visionflow-{cfg.data.name}"


def git_commit() -> str:
    if commit := os.environ.get("VISIONFLOW_GIT_COMMIT"):  # baked into images at build time
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def register(
    cfg,
    dataset_id: str | None = None,
    onnx_uri: str | None = None,
    int8_uri: str | None = None,
    torchscript_uri: str | None = None,
    gate_passed: bool | None = None,
    pipeline_run: str = "",
) -> RegisterResult:
    """Register this run's model; inputs default to what the run's earlier steps recorded."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from mlflow.models import infer_signature

    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    rec = {
        step: load_step(store, cfg.run_id, step)
        for step in ("prepare", "evaluate", "export", "quantize")
    }
    dataset_id = dataset_id or rec["prepare"]["dataset_id"]
    onnx_uri = onnx_uri or rec["export"]["onnx_uri"]
    int8_uri = int8_uri or rec["quantize"]["int8_uri"]
    torchscript_uri = torchscript_uri or rec["export"]["torchscript_uri"]
    gate_passed = rec["evaluate"]["gate_passed"] if gate_passed is None else gate_passed
    classes, image_size = rec["evaluate"]["classes"], rec["export"]["image_size"]
    metrics = {
        "eval_test_accuracy": rec["evaluate"]["test_accuracy"],
        "onnx_max_abs_diff": rec["export"]["onnx"]["max_abs_diff"],
        "torchscript_max_abs_diff": rec["export"]["torchscript"]["max_abs_diff"],
        "int8_accuracy_drop": rec["quantize"]["accuracy_drop"],
        "int8_speedup_b64": rec["quantize"]["speedup_b64"],
    }
    run_id = tracking.run_for(cfg)
    client = mlflow.MlflowClient()
    name = model_name(cfg)
    test = build_datamodule(cfg, store, dataset_id).test_dataloader()

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for key, uri in (
            ("onnx", onnx_uri),
            ("onnx_int8", int8_uri),
            ("torchscript", torchscript_uri),
        ):
            src, k = split_uri(uri, cfg.storage.endpoint)
            files[key] = str(src.get_file(k, Path(tmp) / Path(k).name))
        logits, labels = collect(ort_predictor(ort_session(files["onnx"])), test)
        new_acc = accuracy(logits, labels)
        example = np.zeros((1, 3, image_size, image_size), np.float32)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts=files,
                model_config={
                    "variant": "int8",
                    "classes": list(classes),
                    "image_size": image_size,
                },
                signature=infer_signature(example, logits[:1]),
                pip_requirements=["onnxruntime", "numpy"],
            )
    lineage = {
        "visionflow.run_id": cfg.run_id,
        "pipeline_run": pipeline_run or cfg.run_id,
        "dataset_manifest": dataset_id,
        "git_commit": git_commit(),
        "classes": ",".join(classes),
        "gate_passed": str(gate_passed).lower(),
        "test_accuracy": f"{new_acc:.6f}",
        **{k: f"{v:.6g}" for k, v in metrics.items()},
    }
    version = mlflow.register_model(info.model_uri, name, tags=lineage)
    number = int(version.version)

    try:
        current = client.get_model_version_by_alias(name, CHAMPION)
    except MlflowException as err:
        if err.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            raise  # a real failure (server down, ...), not "no champion yet"
        current = None
    champion_acc = None
    if not gate_passed:
        promote, reason = (
            False,
            f"quality gate failed (test accuracy below {cfg.evaluate.min_accuracy})",
        )
    elif current is None:
        promote, reason = True, "first version to pass the gate"
    elif current.tags.get("classes") != lineage["classes"]:
        promote, reason = (
            False,
            f"champion v{current.version} predicts other classes; not comparable",
        )
    else:
        champion_acc = _accuracy_of(current, test, cfg.storage.endpoint)
        promote = new_acc > champion_acc
        verdict = "beats" if promote else "does not beat"
        reason = f"test accuracy {new_acc:.4f} {verdict} champion v{current.version} ({champion_acc:.4f}) on the same test split"
    if promote:
        client.set_registered_model_alias(name, CHAMPION, str(number))
    champion_version = (
        number if promote else (int(current.version) if current is not None else None)
    )
    client.set_model_version_tag(name, str(number), "champion_decision", reason)
    log.info(
        "registered %s v%d; champion: %s (%s)", name, number, "yes" if promote else "no", reason
    )
    result = RegisterResult(
        name,
        number,
        f"models:/{name}/{number}",
        promote,
        champion_version,
        reason,
        new_acc,
        champion_acc,
    )
    save_step(store, cfg.run_id, "register", result)
    return result


def _accuracy_of(version, loader, endpoint) -> float:
    """The registered version's fp32 ONNX accuracy on this loader's images."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=tmp
        )
        onnx = next(Path(local).rglob("model.onnx"))
        logits, labels = collect(ort_predictor(ort_session(onnx)), loader)
    return accuracy(logits, labels)
