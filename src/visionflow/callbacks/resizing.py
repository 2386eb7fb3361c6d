"""Progressive resizing: train on smaller images first, the full size at the end.

Early epochs learn coarse features as well from small images, several times faster; the last
epochs at full size fit the details (fast.ai's DAWNBench recipe, timm's and FFCV's
`progressive resizing`). Batches are resized on the device, in the LightningModule's training
step (boxes and masks too), so it works for every task and both data paths. Validation and
test always run at the data's size.
"""

from __future__ import annotations

import logging

import lightning.pytorch as pl

from visionflow.core.registry import CALLBACKS

log = logging.getLogger("visionflow.train")


@CALLBACKS.register("progressive_resizing")
class ProgressiveResizing(pl.Callback):
    """`sizes` gives the training image size of each epoch, from the first: [16, 16, 24, 24]
    trains epochs 0-1 at 16 px, 2-3 at 24 px and every later epoch at the data's own size
    (as does a size of 0)."""

    def __init__(self, sizes: list) -> None:
        super().__init__()
        try:
            self.sizes = [int(s) for s in sizes]
        except (TypeError, ValueError):
            raise ValueError(
                f"sizes must be a list of image sizes, like [16, 16, 24]; got {sizes!r}"
            ) from None
        if any(s < 0 for s in self.sizes):
            raise ValueError(f"sizes must not be negative: {sizes!r}")

    def size_at(self, epoch: int) -> int | None:
        return (self.sizes[epoch] or None) if epoch < len(self.sizes) else None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        size = self.size_at(trainer.current_epoch)
        if size != getattr(pl_module, "input_size", None):
            log.info("progressive resizing: epoch %d trains at %s", trainer.current_epoch,
                     f"{size} px" if size else "the data's size")  # fmt: skip
        pl_module.input_size = size
