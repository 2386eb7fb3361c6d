"""Segmentation: per-pixel logits in; mIoU, pixel accuracy and per-class IoU out.

Class 0 is the background and counts in the mean IoU; mask pixels of 255 count for nothing.
The confusion matrix is accumulated batch by batch, so large test sets need no memory for
their outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visionflow.vision.modules import IGNORE_INDEX, iou_from_confusion
from visionflow.vision.tasks import DenseTask, Scores, pyplot, save_figure


class SegmentationTask(DenseTask):
    name = "segmentation"
    metric = "miou"
    quantizable = True
    figure = "masks.png"

    def evaluate(self, predict, loader, classes, max_samples=None):
        names = ["background", *classes]
        n = len(names)
        confusion = np.zeros((n, n), np.int64)
        examples, images = None, 0
        for x, y in self.batches(loader, max_samples):
            images += len(x)
            predicted = predict(x).argmax(1)
            keep = y != IGNORE_INDEX
            confusion += np.bincount(y[keep] * n + predicted[keep], minlength=n * n).reshape(n, n)
            if examples is None:
                examples = (x[:8], predicted[:8], y[:8])
        iou, pixel_acc = iou_from_confusion(torch.from_numpy(confusion))
        miou = float(iou.nanmean())
        per_class = {
            name: {"iou": float(iou[i]), "pixels": float(confusion[i].sum())}
            for i, name in enumerate(names)
        }
        metrics = {"miou": miou, "pixel_acc": float(pixel_acc)}
        metrics.update({f"iou/{k}": v["iou"] for k, v in per_class.items() if v["iou"] == v["iou"]})
        return Scores(miou, metrics, per_class, None, images), examples

    def plot(self, scores, classes, examples, path: Path) -> Path:
        """Test images, their true masks and the predicted ones, side by side."""
        plt = pyplot()
        images, predicted, truth = examples
        k = len(images)
        fig, axes = plt.subplots(3, k, figsize=(1.6 * k, 5), squeeze=False)
        vmax = max(len(classes) + 1, 20)  # tab20's colours, one per class while they last
        for j in range(k):
            for row, (picture, title) in enumerate(
                ((images[j].transpose(1, 2, 0), "image"), (truth[j], "truth"),
                 (predicted[j], "predicted"))
            ):  # fmt: skip
                ax = axes[row][j]
                if row == 0:
                    ax.imshow(np.clip(picture, 0, 1))
                else:
                    shown = np.where(picture == IGNORE_INDEX, 0, picture)
                    ax.imshow(shown, cmap="tab20", vmin=0, vmax=vmax, interpolation="nearest")
                ax.set_axis_off()
                if j == 0:
                    ax.set_title(title, fontsize=8, loc="left")
        fig.suptitle(f"mIoU {scores.score:.3f}")
        return save_figure(fig, path)
