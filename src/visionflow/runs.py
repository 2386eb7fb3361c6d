"""A run's record in the artifact store: each step's result under `runs/<run_id>/<step>.json`.

Each step writes its result there when it ends; nothing in a step reads it. The record is how
`visionflow <step>` finds what the run's earlier steps made (`visionflow train run_id=X` trains
on X's dataset: `step_inputs`), and how a cluster job hands rank 0's result back; it survives
pods and machines because it lives beside the artifacts.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from visionflow.host import describe_host
from visionflow.results import (
    EvaluateResult,
    ExportResult,
    OptimizeResult,
    PrepareResult,
    QuantizeResult,
    RegisterResult,
    TrainResult,
    from_record,
)
from visionflow.storage import ArtifactStore

STEPS = ("prepare", "train", "optimize", "evaluate", "export", "quantize", "register")
OPTIONAL = ("optimize",)  # a run has it only when asked (`visionflow optimize optimize=prune`)
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


def step_inputs(
    store: ArtifactStore,
    run_id: str,
    step: str,
    dataset_id: str | None = None,
    checkpoint_uri: str | None = None,
) -> dict[str, Any]:
    """The keyword arguments of `step`'s function: what it takes from the earlier steps of run
    `run_id` (see results.py), read from their records where not given."""
    if step == "prepare":
        return {}
    inputs: dict[str, Any] = {
        "dataset_id": dataset_id or load_step(store, run_id, "prepare")["dataset_id"]
    }
    if step == "optimize":
        inputs["checkpoint_uri"] = (
            checkpoint_uri or load_result(store, run_id, "train").checkpoint_uri
        )
    elif step in ("evaluate", "export"):
        inputs["checkpoint_uri"] = checkpoint_uri or model_checkpoint(store, run_id)
    elif step == "quantize":
        inputs["exported"] = load_result(store, run_id, "export")
    elif step == "register":
        inputs |= {
            "evaluation": load_result(store, run_id, "evaluate"),
            "exported": load_result(store, run_id, "export"),
            "quantized": load_result(store, run_id, "quantize"),
        }
    return inputs


def model_checkpoint(store: ArtifactStore, run_id: str) -> str:
    """The run's model: optimize's checkpoint once the run has one, else train's best."""
    if store.exists(_key(run_id, "optimize")):
        return load_result(store, run_id, "optimize").checkpoint_uri
    return load_result(store, run_id, "train").checkpoint_uri


RESULTS = {
    "prepare": PrepareResult,
    "train": TrainResult,
    "optimize": OptimizeResult,
    "evaluate": EvaluateResult,
    "export": ExportResult,
    "quantize": QuantizeResult,
    "register": RegisterResult,
}


def load_result(store: ArtifactStore, run_id: str, step: str):
    """The typed result `step` recorded for run `run_id`."""
    return from_record(RESULTS[step], load_step(store, run_id, step))


def summary(
    tracking_uri: str,
    run_id: str,
    dataset_uri: str,
    trained: TrainResult,
    evaluation: EvaluateResult,
    exported: ExportResult,
    quantized: QuantizeResult,
    registered: RegisterResult,
    optimized: OptimizeResult | None = None,
) -> dict[str, Any]:
    """The one-line summary of a finished run (see DESIGN.md, "Interfaces users rely on");
    `optimized` is optimize's result where the run pruned (then evaluate, export and register
    took the pruned checkpoint)."""
    return {
        "tracking_uri": tracking_uri,
        "run_id": run_id,  # visionflow's, as everywhere else
        "mlflow_run_id": trained.mlflow_run_id,
        "task": exported.task,
        "model_name": registered.model_name,
        "model_version": registered.model_version,
        "champion": registered.champion,
        "champion_version": registered.champion_version,
        "champion_reason": registered.reason,
        "gate_passed": evaluation.gate_passed,
        # the task's main metric: test_accuracy, test_map_50 or test_miou
        f"test_{evaluation.metric}": evaluation.score,
        "onnx_max_abs_diff": exported.onnx.max_abs_diff,
        "torchscript_max_abs_diff": exported.torchscript.max_abs_diff,
        **int8_summary(quantized),
        "optimize": optimize_summary(optimized),
        "dataset_id": trained.spec["dataset_id"],
        "artifacts": {
            "dataset": dataset_uri,
            "checkpoint": trained.checkpoint_uri,
            "pruned_checkpoint": optimized.checkpoint_uri if optimized else "",
            "onnx": exported.onnx_uri,
            "torchscript": exported.torchscript_uri,
            "onnx_int8": quantized.int8_uri,
            "evaluation_figure": evaluation.figure_png,
            "registered_model": registered.model_uri,
        },
    }


def optimize_summary(o: OptimizeResult | None) -> dict[str, Any] | None:
    """What the summary says of optimize: null where the run was not optimized."""
    if o is None:
        return None
    return {
        "method": o.method,
        "macs_kept": o.macs_kept,
        "speedup": o.speedup,
        "score_drop": o.score_drop,
    }


def int8_summary(q: QuantizeResult) -> dict[str, Any]:
    """What the summary says of int8: whether it was stored, rejected (and why) or unsupported;
    its figures only where it was stored; which variant was faster on quantize's host."""
    stored = q.status == "stored"
    figures = {
        "int8_accuracy_drop": q.accuracy_drop,
        "int8_agreement": q.parity.agreement if q.parity else None,
        "int8_speedup_b1": q.speedup_b1,
        "int8_speedup_b64": q.speedup_b64,
    }
    return {
        "int8": q.status,
        "int8_rejected": q.reason if q.status == "rejected" else None,
        **{k: v if stored else None for k, v in figures.items()},
        # per batch size, the faster variant on quantize's host (the speed-ups say by how much)
        "faster_variant": q.faster_variant if stored else None,
        "serve_variant": q.serve_variant,
        "quantize_host": describe_host(q.host) if q.host else None,
    }


def write_summary(summary_dict: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary_dict) + "\n")
    return path
