"""A run's record in the artifact store: each step's result under `runs/<run_id>/<step>.json`.

The record lets CLI steps find what earlier steps made (`visionflow train run_id=X` finds X's
dataset), lets any process build the run's summary, and survives pods and machines because it
lives beside the artifacts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from visionflow.host import describe_host
from visionflow.storage import ArtifactStore

STEPS = ("prepare", "train", "evaluate", "export", "quantize", "register")
MAX_RECORD_BYTES = 64 << 20  # prepare's holds the dataset's manifest


def _key(run_id: str, step: str) -> str:
    return f"runs/{run_id}/{step}.json"


def save_step(store: ArtifactStore, run_id: str, step: str, result: Any) -> dict[str, Any]:
    record = dataclasses.asdict(result) if dataclasses.is_dataclass(result) else dict(result)
    store.put_bytes(json.dumps(record, indent=2, default=str).encode(), _key(run_id, step))
    return record


def load_step(store: ArtifactStore, run_id: str, step: str) -> dict[str, Any]:
    if not store.exists(_key(run_id, step)):
        raise LookupError(
            f"run {run_id} has no {step} result in {store.root}: run `visionflow {step} run_id={run_id}` first"
        )
    return json.loads(store.get_bytes(_key(run_id, step), max_bytes=MAX_RECORD_BYTES))


def summary(store: ArtifactStore, run_id: str, tracking_uri: str) -> dict[str, Any]:
    """The one-line summary of a finished run (see DESIGN.md, "Interfaces users rely on")."""
    r = {step: load_step(store, run_id, step) for step in STEPS}
    evaluation, quantized = r["evaluate"], r["quantize"]
    return {
        "tracking_uri": tracking_uri,
        "run_id": run_id,  # visionflow's, as everywhere else
        "mlflow_run_id": r["train"]["mlflow_run_id"],
        "task": evaluation["task"],
        "model_name": r["register"]["model_name"],
        "model_version": r["register"]["model_version"],
        "champion": r["register"]["champion"],
        "champion_version": r["register"]["champion_version"],
        "champion_reason": r["register"]["reason"],
        "gate_passed": evaluation["gate_passed"],
        # the task's main metric: test_accuracy, test_map_50 or test_miou
        f"test_{evaluation['metric']}": evaluation["score"],
        "onnx_max_abs_diff": r["export"]["onnx"]["max_abs_diff"],
        "torchscript_max_abs_diff": r["export"]["torchscript"]["max_abs_diff"],
        **int8_summary(quantized),
        "dataset_id": r["prepare"]["dataset_id"],
        "artifacts": {
            "dataset": r["prepare"]["uri"],
            "checkpoint": r["train"]["checkpoint_uri"],
            "onnx": r["export"]["onnx_uri"],
            "torchscript": r["export"]["torchscript_uri"],
            "onnx_int8": quantized["int8_uri"],
            "evaluation_figure": evaluation["figure_png"],
            "registered_model": r["register"]["model_uri"],
        },
    }


def int8_summary(q: dict[str, Any]) -> dict[str, Any]:
    """What the summary says of int8: whether it was stored, rejected (and why) or unsupported;
    its figures only where it was stored; which variant was faster on quantize's host."""
    stored = q["status"] == "stored"
    figures = {
        "int8_accuracy_drop": q["accuracy_drop"],
        "int8_agreement": q["parity"]["agreement"] if q["parity"] else None,
        "int8_speedup_b1": q["speedup_b1"],
        "int8_speedup_b64": q["speedup_b64"],
    }
    return {
        "int8": q["status"],
        "int8_rejected": q["reason"] if q["status"] == "rejected" else None,
        **{k: v if stored else None for k, v in figures.items()},
        # per batch size, the faster variant on quantize's host (the speed-ups say by how much)
        "faster_variant": q["faster_variant"] if stored else None,
        "serve_variant": q["serve_variant"],
        "quantize_host": describe_host(q["host"]) if q["host"] else None,
    }


def write_summary(summary_dict: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary_dict) + "\n")
    return path
