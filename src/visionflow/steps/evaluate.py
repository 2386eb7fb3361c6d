"""evaluate: the task's test metrics, a picture of them, and the quality gate.

Classification reports accuracy, per-class precision/recall/F1 and a confusion matrix;
detection COCO mAP (@[.5:.95], @.5, @.75) and AP per class with predictions drawn on test
images; segmentation mIoU, pixel accuracy and IoU per class with predicted masks. The gate
compares the task's main metric (accuracy, mAP@.5, mIoU) with `evaluate.min_score`; it is off
only when `evaluate.gate=false` says so, and the result records that it was off.

A model whose outputs are NaN or infinite, or whose main metric is, fails here: such a score
cannot be compared with another, so it must never reach the gate or the registry.
"""

from __future__ import annotations

import logging
import math
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionflow import tracking
from visionflow.compose.data import build_datamodule
from visionflow.compose.models import load_network
from visionflow.results import EvaluateResult
from visionflow.runs import save_step
from visionflow.storage import open_store
from visionflow.vision.metrics import top_confusions
from visionflow.vision.tasks import get_task

log = logging.getLogger("visionflow.evaluate")


class EvaluateError(RuntimeError):
    """The model or its test score is not finite; nothing was recorded."""


class NonFiniteOutputError(ValueError):
    """A model produced NaN or infinite outputs."""


def finite_outputs(predict: Callable[[Any], Any], name: str) -> Callable[[Any], Any]:
    """`predict`, failing with NonFiniteOutputError on a batch with any NaN or infinite output.

    Comparisons with NaN are false, so a NaN model slips through any check written as
    `diff > atol` or `score < min_score`: the outputs are checked where they are made.
    """

    def checked(images):
        out = predict(images)
        if not _all_finite(out):
            raise NonFiniteOutputError(f"{name} outputs NaN or infinite values on test images")
        return out

    return checked


def _all_finite(out: Any) -> bool:
    if isinstance(out, dict):
        return all(_all_finite(v) for v in out.values())
    if isinstance(out, list | tuple):
        return all(_all_finite(v) for v in out)
    if isinstance(out, torch.Tensor):
        return bool(torch.isfinite(out).all()) if out.is_floating_point() else True
    array = np.asarray(out)
    return bool(np.isfinite(array).all()) if np.issubdtype(array.dtype, np.floating) else True


def report_markdown(result: EvaluateResult) -> str:
    """The evaluation as Markdown: main metric, gate, all metrics, per-class table, top
    confusions (MLflow's evaluation/report.md)."""
    gate = (
        "quality gate disabled (evaluate.gate=false)"
        if result.gate == "disabled"
        else f"quality gate (≥ {result.min_score}) {'passed' if result.gate_passed else 'FAILED'}"
    )
    lines = [
        f"**Test {result.metric} {result.score:.4f}** on {result.num_samples} images; {gate}.",
        "",
        " | ".join(f"{k} {v:.4f}" for k, v in result.metrics.items() if "/" not in k),
        "",
    ]
    columns = list(next(iter(result.per_class.values()), {}))
    if columns:
        lines += ["| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
        for name, row in result.per_class.items():
            cells = [f"{row[c]:.3f}" if c != "support" else str(int(row[c])) for c in columns]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if result.confusion is not None:
        lines += ["", "Top confusions:", "", "| true | predicted | images |", "|---|---|---|"]
        for true, predicted, count in top_confusions(result.confusion, result.classes):
            lines.append(f"| {true} | {predicted} | {count} |")
    return "\n".join(lines)


def evaluate(cfg, dataset_id: str, checkpoint_uri: str) -> EvaluateResult:
    """Evaluate the checkpoint on the dataset's test split; log to MLflow.

    The task and classes are the checkpoint's (its spec), whatever the config's model says.
    """
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    net, spec = load_network(checkpoint_uri, cfg.storage.endpoint)
    task = get_task(spec["task"])
    classes = spec["classes"]
    dm = build_datamodule(cfg, store, dataset_id, task.name)
    predict = finite_outputs(task.torch_predictor(net), "the model")
    try:
        scores, examples = task.evaluate(predict, dm.test_dataloader(), classes)
    except NonFiniteOutputError as err:
        raise EvaluateError(f"{err} ({checkpoint_uri}): nothing was recorded") from None
    if not math.isfinite(scores.score):
        raise EvaluateError(
            f"test {task.metric} of {checkpoint_uri} is {scores.score}, not a finite score: "
            "nothing was recorded"
        )
    gate = (
        "disabled"
        if not cfg.evaluate.gate
        else "passed"
        if scores.score >= cfg.evaluate.min_score
        else "failed"
    )
    result = EvaluateResult(
        task=task.name,
        metric=task.metric,
        score=scores.score,
        gate_passed=gate != "failed",
        gate=gate,
        min_score=cfg.evaluate.min_score,
        classes=classes,
        metrics=scores.metrics,
        per_class=scores.per_class,
        confusion=scores.confusion,
        num_samples=scores.num_samples,
    )
    with tempfile.TemporaryDirectory() as tmp:
        png = task.plot(scores, classes, examples, Path(tmp) / task.figure)
        result.figure_png = store.put_file(png, f"runs/{cfg.run_id}/{png.name}")
        _log_to_mlflow(cfg, result, png)
    save_step(store, cfg.run_id, "evaluate", result)
    log.info(
        "test %s %.4f on %d images; gate %s", task.metric, result.score, result.num_samples, gate
    )
    return result


def _log_to_mlflow(cfg, result: EvaluateResult, png: Path) -> None:
    import mlflow

    run_id = tracking.run_for(cfg)
    client = mlflow.MlflowClient()
    metrics: dict[str, Any] = {f"test/{k}": v for k, v in result.metrics.items()}
    metrics["gate/passed"] = float(result.gate_passed)
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_artifact(run_id, str(png), "evaluation")
    client.log_text(run_id, report_markdown(result), "evaluation/report.md")
