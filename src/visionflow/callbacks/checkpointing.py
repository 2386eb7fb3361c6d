"""Checkpoints between epoch ends, so that a killed run loses at most a few steps.

The train step always keeps `last.ckpt` (every epoch end) and `best.ckpt`; with
`train.checkpoint_every_n_steps=N` it also writes `last.ckpt` every N optimizer steps. Such a
checkpoint holds everything a restarted run needs to go on from that exact step: weights,
optimizer and LR scheduler state, Lightning's loop progress and the DataModule's position in
the epoch's data order (`vision/data/resumable.py`).

`StoreCheckpointIO` copies each checkpoint to the artifact store from a background thread
(`visionflow.background`), so an unavailable store does not stall training; each upload
retries through visionflow.retry, and the train step waits for them all before it ends.
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint

from visionflow.background import BackgroundQueue
from visionflow.core.config import ConfigError
from visionflow.storage import ArtifactStore

# Uploads waiting at most: the loop waits when more are due (names repeat, so rarely more than
# last.ckpt and best.ckpt wait).
MAX_PENDING_UPLOADS = 4


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


LAST, PREVIOUS, BEST = "last.ckpt", "last-prev.ckpt", "best.ckpt"


class StoreCheckpointIO(TorchCheckpointIO):
    """Saves checkpoints locally as usual, then copies each one to the artifact store in the
    background (`<prefix>/<file name>`); `teardown` (the end of `Trainer.fit`) waits for them.

    Each save writes a new file, which the upload reads and nothing rewrites, and links it into
    place under its name: the upload never sees a checkpoint being overwritten by the next one.
    A newer checkpoint of a name replaces the older one's upload if that has not started.

    A new `last.ckpt` first copies the stored one to `last-prev.ckpt`, for resuming should the
    new one be corrupt; only one this process uploaded, so a corrupt one resumed past is not
    kept in place of a good previous one.
    """

    def __init__(self, store: ArtifactStore, prefix: str) -> None:
        super().__init__()
        self.store, self.prefix = store, prefix
        self.uploads = BackgroundQueue("checkpoint uploads", MAX_PENDING_UPLOADS)
        self._serial = itertools.count()
        self._uploaded: set[str] = set()  # names this process stored (the upload thread's)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        path = Path(path)
        serial = next(self._serial)
        if serial == 0:  # what a killed run left waiting: stale copies of stored checkpoints
            shutil.rmtree(path.parent / ".uploads", ignore_errors=True)
        upload = path.parent / ".uploads" / f"{path.name}.{serial}"
        super().save_checkpoint(checkpoint, upload, storage_options)
        _link(upload, path)
        key = f"{self.prefix}/{path.name}"

        def run() -> None:
            try:
                if path.name == LAST and LAST in self._uploaded:
                    self.store.copy(key, f"{self.prefix}/{PREVIOUS}")
                self.store.put_file(upload, key)
                self._uploaded.add(path.name)
            finally:
                upload.unlink(missing_ok=True)

        self.uploads.submit(
            f"upload of {path.name} to {self.store.uri(key)}", run, key=key,
            discard=lambda: upload.unlink(missing_ok=True),
        )  # fmt: skip

    def remove_checkpoint(self, path: str | Path) -> None:
        super().remove_checkpoint(path)
        key = f"{self.prefix}/{Path(path).name}"
        self.uploads.submit(
            f"deletion of {self.store.uri(key)}", lambda: self.store.delete(key), key=key
        )

    def teardown(self) -> None:
        self.uploads.flush()


def _link(source: Path, target: Path) -> None:
    """Make `target` name `source`'s file, replacing what it named in one step."""
    part = target.with_name(f".{target.name}.part")
    part.unlink(missing_ok=True)
    try:
        os.link(source, part)
    except OSError:  # a file system without hard links
        shutil.copyfile(source, part)
    os.replace(part, target)
