"""The metrics of each task, one definition for training's validation and for evaluation.

torchmetrics computes them, so the LightningModules (vision/modules.py) and the tasks' evaluation
(vision/tasks) measure the same thing the same way: a checkpoint's `val/acc` and its evaluated
`accuracy` differ only in the images they see. Detection's COCO mAP is torchmetrics'
`MeanAveragePrecision`, used directly by both.
"""

from __future__ import annotations

import numpy as np
import torch
from torchmetrics import MetricCollection
from torchmetrics.classification import (
    MulticlassAccuracy,
    MulticlassConfusionMatrix,
    MulticlassF1Score,
    MulticlassJaccardIndex,
    MulticlassPrecision,
    MulticlassRecall,
)

IGNORE_INDEX = 255  # mask pixels that count for nothing (COCO crowds, borders)

# The largest class count shown cell by cell with class names: the confusion-matrix figure's
# labelled grid and Kubeflow's ClassificationMetrics. Above it the figure is a label-free heat
# map and the reports list the top confusions (a 1,000-class grid is a million cells).
MAX_LABELLED_CLASSES = 30


def accuracy(num_classes: int, ignore_index: int | None = None) -> MulticlassAccuracy:
    """The share of right decisions (images; pixels for segmentation), over all of them."""
    return MulticlassAccuracy(num_classes, average="micro", ignore_index=ignore_index)


def classification_metrics(num_classes: int) -> MetricCollection:
    """Accuracy; precision, recall and F1 per class (0 where undefined); the confusion matrix
    (rows true, columns predicted). Updates take logits (N, C) and labels (N,)."""
    per_class = {"average": None, "zero_division": 0.0}
    return MetricCollection(
        {
            "accuracy": accuracy(num_classes),
            "precision": MulticlassPrecision(num_classes, **per_class),
            "recall": MulticlassRecall(num_classes, **per_class),
            "f1": MulticlassF1Score(num_classes, **per_class),
            "confusion": MulticlassConfusionMatrix(num_classes),
        },
        compute_groups=False,  # the confusion matrix shares no state with the others
    )


def segmentation_metrics(num_classes: int) -> MetricCollection:
    """IoU per class and pixel accuracy, mask pixels of IGNORE_INDEX left out. A class that is
    neither present nor predicted has no IoU (NaN): `mean_iou` leaves it out. Updates take
    predicted classes (N, H, W) and masks (N, H, W); `num_classes` counts the background."""
    iou = MulticlassJaccardIndex(
        num_classes, average=None, ignore_index=IGNORE_INDEX, zero_division=float("nan")
    )
    return MetricCollection({"iou": iou, "pixel_acc": accuracy(num_classes, IGNORE_INDEX)})


def mean_iou(iou: torch.Tensor) -> torch.Tensor:
    """The mean over the classes that have an IoU (Pascal VOC's mIoU)."""
    return iou.nanmean()


def top_confusions(
    confusion: np.ndarray, classes: list[str], k: int = 20
) -> list[tuple[str, str, int]]:
    """The `k` most frequent mistakes as (true class, predicted class, count), most first."""
    mistakes = np.asarray(confusion).copy()
    np.fill_diagonal(mistakes, 0)
    flat = np.argsort(mistakes, axis=None, kind="stable")[::-1][:k]
    rows, cols = np.unravel_index(flat, mistakes.shape)
    return [
        (classes[i], classes[j], int(mistakes[i, j]))
        for i, j in zip(rows, cols, strict=True)
        if mistakes[i, j] > 0
    ]
