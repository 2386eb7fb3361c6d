"""evaluate: test accuracy, per-class precision/recall/F1, a confusion matrix, and the quality gate."""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from visionflow import tracking
from visionflow.core.factories import build_datamodule
from visionflow.runs import load_step, save_step
from visionflow.storage import open_store
from visionflow.vision.checkpoints import load_classifier
from visionflow.vision.inference import accuracy, collect, torch_predictor

log = logging.getLogger("visionflow.evaluate")


@dataclass
class EvaluateResult:
    test_accuracy: float
    gate_passed: bool
    min_accuracy: float
    classes: list[str]
    confusion: list[list[int]]  # rows: true class, columns: predicted
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    confusion_png: str = ""
    num_samples: int = 0

    def markdown(self) -> str:
        verdict = "passed" if self.gate_passed else "FAILED"
        lines = [
            f"**Test accuracy {self.test_accuracy:.4f}** on {self.num_samples} images; "
            f"quality gate (≥ {self.min_accuracy}) {verdict}.",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---|---|---|---|",
        ]
        for name, m in self.per_class.items():
            lines.append(
                f"| {name} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {int(m['support'])} |"
            )
        return "\n".join(lines)


def per_class_metrics(confusion: np.ndarray, classes: list[str]) -> dict[str, dict[str, float]]:
    tp = np.diag(confusion).astype(float)
    predicted, actual = confusion.sum(0), confusion.sum(1)
    precision = np.divide(tp, predicted, out=np.zeros_like(tp), where=predicted > 0)
    recall = np.divide(tp, actual, out=np.zeros_like(tp), where=actual > 0)
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(tp), where=denom > 0)
    return {
        c: {
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": float(actual[i]),
        }
        for i, c in enumerate(classes)
    }


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size = max(4.0, 0.5 * len(classes) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes, rotation=45, ha="right")
    ax.set_yticks(range(len(classes)), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    if len(classes) <= 30:
        top = confusion.max() or 1
        for (i, j), v in np.ndenumerate(confusion):
            ax.text(
                j,
                i,
                str(v),
                ha="center",
                va="center",
                color="white" if v > top / 2 else "black",
                fontsize=8,
            )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def evaluate(
    cfg, dataset_id: str | None = None, checkpoint_uri: str | None = None
) -> EvaluateResult:
    """Evaluate the checkpoint (default: this run's best) on the test split; log to MLflow."""
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    dataset_id = dataset_id or load_step(store, cfg.run_id, "prepare")["dataset_id"]
    checkpoint_uri = checkpoint_uri or load_step(store, cfg.run_id, "train")["checkpoint_uri"]
    net, spec = load_classifier(checkpoint_uri, cfg.storage.endpoint)
    dm = build_datamodule(cfg, store, dataset_id)
    logits, labels = collect(torch_predictor(net), dm.test_dataloader())
    classes = spec["classes"]
    n = len(classes)
    confusion = np.bincount(labels * n + logits.argmax(1), minlength=n * n).reshape(n, n)
    acc = accuracy(logits, labels)
    result = EvaluateResult(
        test_accuracy=acc,
        gate_passed=acc >= cfg.evaluate.min_accuracy,
        min_accuracy=cfg.evaluate.min_accuracy,
        classes=classes,
        confusion=confusion.tolist(),
        per_class=per_class_metrics(confusion, classes),
        num_samples=len(labels),
    )
    with tempfile.TemporaryDirectory() as tmp:
        png = plot_confusion(
            confusion, classes, Path(tmp) / "confusion_matrix.png", f"test accuracy {acc:.3f}"
        )
        result.confusion_png = store.put_file(png, f"runs/{cfg.run_id}/confusion_matrix.png")
        _log_to_mlflow(cfg, result, png)
    save_step(store, cfg.run_id, "evaluate", result)
    log.info(
        "test accuracy %.4f on %d images; gate %s",
        acc,
        len(labels),
        "passed" if result.gate_passed else "failed",
    )
    return result


def _log_to_mlflow(cfg, result: EvaluateResult, png: Path) -> None:
    import mlflow

    run_id = tracking.run_for(cfg)
    client = mlflow.MlflowClient()
    metrics: dict[str, Any] = {
        "test/acc": result.test_accuracy,
        "gate/passed": float(result.gate_passed),
    }
    for name, m in result.per_class.items():
        for k in ("precision", "recall", "f1"):
            metrics[f"test/{k}/{name}"] = m[k]
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    client.log_artifact(run_id, str(png), "evaluation")
    client.log_text(run_id, result.markdown(), "evaluation/report.md")
