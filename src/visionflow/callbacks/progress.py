"""Progress as plain log lines, for when output goes to a file or a Kubeflow log, not a terminal."""

from __future__ import annotations

import logging
import time

from lightning.pytorch.callbacks import ProgressBar

from visionflow.core.registry import CALLBACKS

log = logging.getLogger("visionflow.train")


@CALLBACKS.register("plain_progress")
class PlainProgress(ProgressBar):
    """One line every `every_n_steps` training steps and one per epoch, with the logged metrics."""

    def __init__(self, every_n_steps: int = 50) -> None:
        super().__init__()
        self.every_n_steps = every_n_steps
        self._enabled = True
        self._epoch_start = 0.0

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    def _metrics(self, trainer, only_step: bool = False) -> str:
        items = sorted(self.get_metrics(trainer, trainer.lightning_module).items())
        if only_step:  # mid-epoch, the epoch-level values are last epoch's: leave them out
            items = [(k, v) for k, v in items if k.endswith("_step")]
        return " ".join(
            f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in items if k != "v_num"
        )

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._epoch_start = time.monotonic()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._enabled and trainer.is_global_zero and (batch_idx + 1) % self.every_n_steps == 0:
            total = self.total_train_batches
            log.info(
                "epoch %d step %d/%s %s",
                trainer.current_epoch + 1,
                batch_idx + 1,
                total,
                self._metrics(trainer, only_step=True),
            )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        if self._enabled and trainer.is_global_zero:
            took = time.monotonic() - self._epoch_start
            log.info(
                "epoch %d/%d done in %.1fs (global step %d) %s",
                trainer.current_epoch + 1, trainer.max_epochs, took, trainer.global_step, self._metrics(trainer),
            )  # fmt: skip
