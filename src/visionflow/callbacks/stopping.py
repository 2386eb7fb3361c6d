"""Early stopping on the task's own validation metric."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.callbacks import EarlyStopping

from visionflow.core.registry import CALLBACKS


@CALLBACKS.register("early_stopping")
class TaskEarlyStopping(EarlyStopping):
    """Lightning's EarlyStopping. Without `monitor` it watches the metric that picks the best
    checkpoint for the run's task (val/acc, val/map or val/miou), in that metric's direction;
    every other argument is EarlyStopping's (patience, min_delta, stopping_threshold, ...)."""

    def __init__(self, monitor: str | None = None, mode: str = "max", **kwargs) -> None:
        super().__init__(monitor=monitor or "val/acc", mode=mode, **kwargs)
        self.from_task = monitor is None

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self.from_task and hasattr(pl_module, "monitor"):
            self.monitor = pl_module.monitor
            if pl_module.mode != self.mode:  # the other direction: flip what __init__ derived
                self.mode = pl_module.mode
                self.min_delta, self.best_score = -self.min_delta, -self.best_score
        super().setup(trainer, pl_module, stage)
