"""What each step takes from the steps before it and returns: typed records, and nothing else.

A leaf of the package: plain dataclasses that every layer may read without importing the code
that made them. Steps take their inputs explicitly (a dataset id, a checkpoint URI, an earlier
step's result) and return one of these; how a result reaches the next step is the caller's
business, and there is one way per caller:

- `visionflow <step>` reads the earlier steps' results from the run's record in the artifact
  store (`runs.step_inputs`), which each step writes when it ends (`runs.save_step`);
- a pipeline passes them as KFP artifacts (`kfp.io.write_result` / `read_result`), so the
  graph in the Kubeflow UI is the data flow;
- `cluster` rebuilds rank 0's TrainResult from its record when a PyTorchJob ends.

`from_record` turns a record (JSON) back into its dataclass, nested records included.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import Any, TypeVar


@dataclass
class PrepareResult:
    dataset_id: str  # the hash of the dataset's manifest
    uri: str  # the dataset's prefix in the artifact store
    manifest: dict[str, Any]
    reused: bool  # the same dataset was already in the store


@dataclass
class TrainResult:
    checkpoint_uri: str  # best checkpoint in the artifact store
    last_checkpoint_uri: str
    monitor: str  # the validation metric that chose the best checkpoint (val/acc, val/map, ...)
    best_score: float
    global_step: int
    epochs: int
    resumed_from_step: int | None
    mlflow_run_id: str
    spec: dict[str, Any]  # what the checkpoint holds: task, model, classes, image size, dataset
    final_metrics: dict[str, float]  # the last epoch's logged values (the same on every rank)
    rank: int = 0
    world_size: int = 1


@dataclass
class OptimizeResult:
    checkpoint_uri: str  # the pruned, fine-tuned checkpoint
    method: str  # prune
    target_macs: float  # the share of MACs asked for
    metric: str  # the task's main test metric (accuracy)
    epochs: int  # of fine-tuning
    params_before: int
    params_after: int
    macs_before: int  # multiply-accumulates of one image
    macs_after: int
    latency_ms_before: float  # median per batch of 64 images, ONNX Runtime fp32 on `host`
    latency_ms_after: float
    score_before: float
    score_after: float
    macs_kept: float  # macs_after / macs_before
    speedup: float  # latency_ms_before / latency_ms_after
    score_drop: float  # points (x100) of the metric lost
    host: dict[str, str] = field(default_factory=dict)  # the CPU the latencies were measured on


@dataclass
class EvaluateResult:
    task: str
    metric: str  # the main metric: accuracy | map_50 | miou
    score: float
    gate_passed: bool  # may be champion: the gate passed, or it was disabled
    gate: str  # passed | failed | disabled (evaluate.gate=false)
    min_score: float
    classes: list[str]
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: list[list[int]] | None = None  # classification: rows true, columns predicted
    figure_png: str = ""
    num_samples: int = 0


@dataclass
class Parity:
    """How an exported model's outputs differ from PyTorch's on the same images."""

    max_abs_diff: float  # logits; detection: box coordinates (pixels) and scores
    agreement: float  # share of images (pixels for segmentation) with the same decision
    samples: int

    def problem(self, atol: float, min_agreement: float) -> str | None:
        """Why the export fails parity, or None. NaN or infinite outputs always fail."""
        if not math.isfinite(self.max_abs_diff):
            return f"outputs are not finite (max |diff| {self.max_abs_diff})"
        if self.max_abs_diff > atol or self.agreement < min_agreement:
            return (
                f"max |diff| {self.max_abs_diff:.2e} (limit {atol:.0e}), agreement "
                f"{self.agreement:.4f} (limit {min_agreement})"
            )
        return None


@dataclass
class ExportResult:
    task: str  # from the checkpoint's spec: what every later step serves and scores
    onnx_uri: str
    torchscript_uri: str
    onnx: Parity
    torchscript: Parity
    image_size: int
    classes: list[str]
    onnx_exporter: str = ""  # "dynamo", or "legacy (<why torch.export could not be used>)"


@dataclass
class QuantizeResult:
    int8_uri: str  # "" unless an int8 model was stored
    status: str  # stored, rejected (loses too much), unsupported (the task has no int8)
    reason: str  # why no int8 model was stored
    metric: str  # the task's main metric, measured for fp32 and int8
    settings: dict[str, object] = field(default_factory=dict)
    host: dict[str, str] = field(default_factory=dict)  # the CPU it was measured on
    fp32_score: float | None = None
    int8_score: float | None = None
    accuracy_drop: float | None = None  # points (x100) of the metric
    parity: Parity | None = None  # int8 against fp32 on test images: max |diff|, agreement
    # "fp32_b1", "int8_b1", "fp32_b64", "int8_b64": median milliseconds per batch
    latency_ms: dict[str, float] = field(default_factory=dict)
    speedup_b1: float | None = None
    speedup_b64: float | None = None
    # Where int8 was timed: the faster variant per batch size ("batch_1", "batch_64").
    faster_variant: dict[str, str] | None = None
    # The variant the registered model runs by default: int8 only where it is stored and faster
    # than fp32 on this host at batch 1 and at batch 64.
    serve_variant: str = "fp32"


@dataclass
class RegisterResult:
    model_name: str
    model_version: int
    model_uri: str
    champion: bool  # this version holds the alias now
    champion_version: int | None
    reason: str
    metric: str  # the task's main metric
    score_onnx: float  # this version's, measured here
    champion_score: float | None  # the champion's recorded test score


R = TypeVar("R")


def from_record(cls: type[R], record: dict[str, Any]) -> R:
    """The `cls` dataclass from its record (`dataclasses.asdict`, through JSON), nested records
    included; keys the record holds beyond the fields (a newer writer's) are ignored."""
    hints = typing.get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name in record:
            values[f.name] = _value(hints[f.name], record[f.name])
    return cls(**values)


def _value(hint: Any, value: Any) -> Any:
    """`value` as `hint` says: a nested dataclass (possibly optional) is rebuilt."""
    if value is None:
        return None
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        return from_record(inner[0], value) if inner else value
    return from_record(hint, value) if dataclasses.is_dataclass(hint) else value
