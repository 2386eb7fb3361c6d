"""Classification: logits in, accuracy, per-class precision/recall/F1 and a confusion matrix out."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from visionflow.vision.tasks import DenseTask, Scores, pyplot, save_figure


class ClassificationTask(DenseTask):
    name = "classification"
    metric = "accuracy"
    quantizable = True
    figure = "confusion_matrix.png"

    def evaluate(self, predict, loader, classes, max_samples=None):
        logits, labels, examples = [], [], None
        for x, y in self.batches(loader, max_samples):
            out = predict(x)
            logits.append(out)
            labels.append(y)
            if examples is None:
                examples = (x[:8], out[:8], y[:8])
        logits, labels = np.concatenate(logits), np.concatenate(labels)
        n = len(classes)
        confusion = np.bincount(labels * n + logits.argmax(1), minlength=n * n).reshape(n, n)
        acc = float(np.trace(confusion) / max(confusion.sum(), 1))
        per_class = per_class_metrics(confusion, classes)
        metrics = {"acc": acc}
        for name, m in per_class.items():
            metrics.update({f"{k}/{name}": m[k] for k in ("precision", "recall", "f1")})
        return Scores(acc, metrics, per_class, confusion.tolist(), int(confusion.sum())), examples

    def plot(self, scores, classes, examples, path):
        return plot_confusion(
            np.array(scores.confusion), classes, path, f"test accuracy {scores.score:.3f}"
        )


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
    plt = pyplot()
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
            colour = "white" if v > top / 2 else "black"
            ax.text(j, i, str(v), ha="center", va="center", color=colour, fontsize=8)
    return save_figure(fig, path)
