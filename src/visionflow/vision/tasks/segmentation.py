"""Segmentation: per-pixel logits in; mIoU, pixel accuracy and per-class IoU out.

Class 0 is the background and counts in the mean IoU; mask pixels of 255 count for nothing.
The metrics accumulate batch by batch, so large test sets need no memory for their outputs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from visionflow.vision.metrics import IGNORE_INDEX, mean_iou, segmentation_metrics
from visionflow.vision.tasks.base import DenseTask, Scores, pyplot, save_figure


class SegmentationTask(DenseTask):
    name = "segmentation"
    metric = "miou"
    quantizable = True
    figure = "masks.png"

    def evaluate(self, predict, loader, classes, max_samples=None):
        names = ["background", *classes]
        measure = segmentation_metrics(len(names))
        pixels = torch.zeros(len(names), dtype=torch.int64)
        examples, images = None, 0
        for x, y in self.batches(loader, max_samples):
            images += len(x)
            predicted, masks = torch.from_numpy(predict(x).argmax(1)), torch.from_numpy(y)
            measure.update(predicted, masks)
            pixels += torch.bincount(masks[masks != IGNORE_INDEX], minlength=len(names))
            if examples is None:
                examples = (x[:8], predicted[:8].numpy(), y[:8])
        r = measure.compute()
        iou, miou = r["iou"], float(mean_iou(r["iou"]))
        per_class = {
            name: {"iou": float(iou[i]), "pixels": float(pixels[i])} for i, name in enumerate(names)
        }
        logged = {"miou": miou, "pixel_acc": float(r["pixel_acc"])}
        logged.update({f"iou/{k}": v["iou"] for k, v in per_class.items() if v["iou"] == v["iou"]})
        return Scores(miou, logged, per_class, None, images), examples

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
