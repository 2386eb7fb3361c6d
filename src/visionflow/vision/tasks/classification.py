"""Classification: logits in, accuracy, per-class precision/recall/F1 and a confusion matrix out."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visionflow.vision.metrics import MAX_LABELLED_CLASSES, classification_metrics
from visionflow.vision.tasks.base import DenseTask, Scores, pyplot, save_figure


class ClassificationTask(DenseTask):
    name = "classification"
    metric = "accuracy"
    quantizable = True
    figure = "confusion_matrix.png"

    def evaluate(self, predict, loader, classes, max_samples=None):
        """Accuracy, and per class precision, recall, F1 and support. Per-class values are
        metrics (one MLflow metric each) up to MAX_LABELLED_CLASSES classes; above, they are
        in the per-class table only."""
        metrics = classification_metrics(len(classes))
        examples = None
        for x, y in self.batches(loader, max_samples):
            out = predict(x)
            metrics.update(torch.from_numpy(out), torch.from_numpy(y))
            if examples is None:
                examples = (x[:8], out[:8], y[:8])
        r = {k: v.numpy() for k, v in metrics.compute().items()}
        confusion, acc = r["confusion"], float(r["accuracy"])
        support = confusion.sum(1)
        per_class = {
            c: {
                "precision": float(r["precision"][i]),
                "recall": float(r["recall"][i]),
                "f1": float(r["f1"][i]),
                "support": float(support[i]),
            }
            for i, c in enumerate(classes)
        }
        logged = {"accuracy": acc}
        if len(classes) <= MAX_LABELLED_CLASSES:
            for name, m in per_class.items():
                logged.update({f"{k}/{name}": m[k] for k in ("precision", "recall", "f1")})
        return (
            Scores(acc, logged, per_class, confusion.tolist(), int(support.sum())),
            examples,
        )

    def plot(self, scores, classes, examples, path):
        return plot_confusion(
            np.array(scores.confusion), classes, path, f"test accuracy {scores.score:.3f}"
        )


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> Path:
    """Up to MAX_LABELLED_CLASSES classes, the matrix with class names and counts; above, a
    label-free heat map of fixed size, each row normalised by its class's images (the reports
    list the top confusions by name)."""
    plt = pyplot()
    n = len(classes)
    if n > MAX_LABELLED_CLASSES:
        fig, ax = plt.subplots(figsize=(8, 8))
        support = confusion.sum(1, keepdims=True)
        rates = np.divide(confusion, support, out=np.zeros(confusion.shape), where=support > 0)
        image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
        fig.colorbar(image, ax=ax, fraction=0.046, label="share of the true class's images")
        ax.set_xlabel(f"predicted (classes 0-{n - 1})")
        ax.set_ylabel("true")
        ax.set_title(title)
        return save_figure(fig, path)
    size = max(4.0, 0.5 * n + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    ax.imshow(confusion, cmap="Blues")
    ax.set_xticks(range(n), classes, rotation=45, ha="right")
    ax.set_yticks(range(n), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    top = confusion.max() or 1
    for (i, j), v in np.ndenumerate(confusion):
        colour = "white" if v > top / 2 else "black"
        ax.text(j, i, str(v), ha="center", va="center", color=colour, fontsize=8)
    return save_figure(fig, path)
