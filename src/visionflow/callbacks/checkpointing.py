"""Checkpoints between epoch ends, so that a killed run loses at most a few steps.

The train step always keeps `last.ckpt` (every epoch end) and `best.ckpt`; with
`train.checkpoint_every_n_steps=N` it also writes `last.ckpt` every N optimizer steps. Such a
checkpoint holds everything a restarted run needs to go on from that exact step: weights,
optimizer and LR scheduler state, Lightning's loop progress and the DataModule's position in
the epoch's data order (`vision/data/resumable.py`).
"""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

from visionflow.core.config import ConfigError


class StepCheckpoint(ModelCheckpoint):
    """`<filename>.ckpt` every `every_n_steps` optimizer steps, except at an epoch's last batch.

    There the epoch-end checkpoint follows, written after validation; a step checkpoint in its
    place would resume as a finished epoch whose validation never ran.
    """

    def __init__(self, dirpath: str | Path, every_n_steps: int, filename: str = "last") -> None:
        if every_n_steps < 1:
            raise ConfigError(
                f"train.checkpoint_every_n_steps must be a positive number of optimizer steps "
                f"(or 0 for epoch ends only), got {every_n_steps}"
            )
        super().__init__(
            dirpath=dirpath, filename=filename, every_n_train_steps=every_n_steps, save_top_k=1,
            enable_version_counter=False,
        )  # fmt: skip

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)


def step_checkpoints(dirpath: str | Path, every_n_steps: int) -> list[pl.Callback]:
    """The callbacks for `train.checkpoint_every_n_steps`: none for 0 (epoch ends only)."""
    if every_n_steps == 0:
        return []
    return [StepCheckpoint(dirpath, every_n_steps)]
