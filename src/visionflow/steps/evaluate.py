"""evaluate: the task's test metrics, a picture of them, and the quality gate.

Classification reports accuracy, per-class precision/recall/F1 and a confusion matrix;
detection COCO mAP (@[.5:.95], @.5, @.75) and AP per class with predictions drawn on test
images; segmentation mIoU, pixel accuracy and IoU per class with predicted masks. The gate
compares the task's main metric (accuracy, mAP@.5, mIoU) with `evaluate.min_score`.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from visionflow import tracking
from visionflow.compose.data import build_datamodule
from visionflow.compose.models import load_network
from visionflow.runs import load_step, save_step
from visionflow.storage import open_store
from visionflow.vision.tasks import get_task

log = logging.getLogger("visionflow.evaluate")


@dataclass
class EvaluateResult:
    task: str
    metric: str  # the main metric: accuracy | map_50 | miou
    score: float
    gate_passed: bool
    min_score: float
    classes: list[str]
    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion: list[list[int]] | None = None  # classification: rows true, columns predicted
    figure_png: str = ""
    num_samples: int = 0

    def markdown(self) -> str:
        verdict = "passed" if self.gate_passed else "FAILED"
        lines = [
            f"**Test {self.metric} {self.score:.4f}** on {self.num_samples} images; "
            f"quality gate (≥ {self.min_score}) {verdict}.",
            "",
            " | ".join(f"{k} {v:.4f}" for k, v in self.metrics.items() if "/" not in k),
            "",
        ]
        columns = list(next(iter(self.per_class.values()), {}))
        if columns:
            lines += ["| class | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
            for name, row in self.per_class.items():
                cells = [f"{row[c]:.3f}" if c != "support" else str(int(row[c])) for c in columns]
                lines.append(f"| {name} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def evaluate(
    cfg, dataset_id: str | None = None, checkpoint_uri: str | None = None
) -> EvaluateResult:
    """Evaluate the checkpoint (default: this run's best) on the test split; log to MLflow."""
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    dataset_id = dataset_id or load_step(store, cfg.run_id, "prepare")["dataset_id"]
    checkpoint_uri = checkpoint_uri or load_step(store, cfg.run_id, "train")["checkpoint_uri"]
    net, spec = load_network(checkpoint_uri, cfg.storage.endpoint)
    task = get_task(spec["task"])
    classes = spec["classes"]
    dm = build_datamodule(cfg, store, dataset_id)
    scores, examples = task.evaluate(task.torch_predictor(net), dm.test_dataloader(), classes)
    result = EvaluateResult(
        task=task.name,
        metric=task.metric,
        score=scores.score,
        gate_passed=scores.score >= cfg.evaluate.min_score,
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
        "test %s %.4f on %d images; gate %s",
        task.metric,
        result.score,
        result.num_samples,
        "passed" if result.gate_passed else "failed",
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
    client.log_text(run_id, result.markdown(), "evaluation/report.md")
