"""Whole-batch transforms for classification training: MixUp and CutMix.

A config lists them like per-sample steps (`{name: mixup, alpha: 0.2}`, `{name: cutmix,
alpha: 1.0}`); with several, each batch gets one of them, chosen at random. The result takes a
batch already on its device, `(images (N, C, H, W) float, labels (N,) int64)`, and returns the
mixed images and soft labels `(N, num_classes)` float32 whose rows sum to 1.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from visionflow.core.config import ConfigError
from visionflow.core.registry import Registry
from visionflow.vision.transforms import resolve_step

BatchTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]

BATCH_TRANSFORMS: Registry[Callable] = Registry("batch transform")


@BATCH_TRANSFORMS.register("mixup")
def mixup(num_classes: int, alpha: float = 0.2) -> Callable:
    """Blend each image with another of the batch, λ ~ Beta(alpha, alpha)."""
    return v2.MixUp(alpha=_positive(alpha), num_classes=num_classes)


@BATCH_TRANSFORMS.register("cutmix")
def cutmix(num_classes: int, alpha: float = 1.0) -> Callable:
    """Paste a box from another image of the batch; labels weighted by the box's area."""
    return v2.CutMix(alpha=_positive(alpha), num_classes=num_classes)


def _positive(alpha: float) -> float:
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    return float(alpha)  # an int would make torch's Beta distribution integer


def check_batch_transforms(steps: Sequence[dict[str, Any]], task: str, where: str) -> None:
    """Batch transforms mix labels of whole images: classification only."""
    if steps and task != "classification":
        raise ConfigError(
            f"{where}: batch transforms (MixUp, CutMix) are for classification only, "
            f"not for task {task!r}; set {where}=[]"
        )


def build_batch_transform(
    steps: Sequence[dict[str, Any]], num_classes: int, where: str
) -> BatchTransform | None:
    """One callable for the listed batch transforms, or None for an empty list."""
    ops = []
    for i, step in enumerate(steps):
        at = f"{where}[{i}]"
        name, factory, params = resolve_step(
            step, at, BATCH_TRANSFORMS, {"num_classes": num_classes}
        )
        try:
            ops.append(factory(**params))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{at} ({name}): {err}") from None
    if not ops:
        return None
    return ops[0] if len(ops) == 1 else v2.RandomChoice(ops)
