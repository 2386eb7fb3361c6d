"""One DDP fit for test_rank_safe_logging.py, run by torchrun with two CPU processes (gloo).

A ClassificationModule trains two epochs with the progress display, telemetry, a checkpoint
and early stopping that monitor `val/acc`, and `Reader`, a callback that on rank 0 alone reads
every metric in every hook it has, as a progress display may. The collectives those reads
start are counted (torch.distributed's functions, wrapped). Each rank writes `rank<N>.json` to
the folder given: what it read at each epoch's end, the collectives counted, and its own
images' correct predictions and summed losses per epoch and split, to check the means against.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.distributed as dist
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from torch.utils.data import DataLoader, TensorDataset

from visionflow.callbacks.telemetry import Telemetry
from visionflow.compose.models import build_model
from visionflow.compose.training import build_trainer, progress_callback
from visionflow.core.config import load_config, to_container
from visionflow.vision.modules import ClassificationModule

TRAIN_IMAGES, VAL_IMAGES, BATCH, CLASSES = 22, 10, 4, 5  # 11 and 5 images a rank
COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "all_gather_object",
               "broadcast", "broadcast_object_list", "reduce", "gather", "barrier")  # fmt: skip
started: list[str] = []  # collectives started while Reader read
reading = False


def _watch(name: str) -> None:
    real = getattr(dist, name)

    def watched(*args, **kwargs):
        if reading:
            started.append(name)
        return real(*args, **kwargs)

    setattr(dist, name, watched)


class Reader(pl.Callback):
    """Reads every metric in each hook below on rank 0; keeps what each rank sees at the end
    of each training epoch (before the module's own hook) and of each validation."""

    def __init__(self) -> None:
        self.train: list[dict[str, float]] = []
        self.val: list[dict[str, float]] = []
        self.logits: dict[str, list[torch.Tensor]] = {"train": [], "val": []}
        self.labels: dict[str, list[torch.Tensor]] = {"train": [], "val": []}

    def _read(self, trainer) -> dict[str, float]:
        global reading
        if trainer.global_rank != 0:
            return {}
        reading = True
        try:
            dict(trainer.progress_bar_metrics), dict(trainer.logged_metrics)
            return {k: float(v) for k, v in trainer.callback_metrics.items()}
        finally:
            reading = False

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.net.register_forward_hook(self._keep)

    _sanity = False

    def _keep(self, net, inputs, logits) -> None:
        if net.training:
            self.logits["train"].append(logits.detach())
        elif not self._sanity:
            self.logits["val"].append(logits.detach())

    def on_sanity_check_start(self, trainer, pl_module) -> None:
        self._sanity = True

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self._sanity = False

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.labels["train"].append(batch[1])
        self._read(trainer)

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *_) -> None:
        if not trainer.sanity_checking:
            self.labels["val"].append(batch[1])
        self._read(trainer)

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        self._read(trainer)

    def on_validation_end(self, trainer, pl_module) -> None:
        self._read(trainer)
        if not trainer.sanity_checking:
            self.val.append(_floats(trainer.callback_metrics))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._read(trainer)
        self.train.append(_floats(trainer.callback_metrics))

    def on_train_end(self, trainer, pl_module) -> None:
        self.end = _floats(trainer.callback_metrics)

    def sums(self, split: str) -> list[dict[str, float]]:
        """Per epoch, this rank's images, correct predictions and summed cross-entropy."""
        out = []
        epochs = len(self.train)
        per_epoch = len(self.labels[split]) // epochs
        for e in range(epochs):
            part = slice(e * per_epoch, (e + 1) * per_epoch)
            logits = torch.cat(self.logits[split][part])
            labels = torch.cat(self.labels[split][part])
            out.append({
                "images": len(labels),
                "correct": int((logits.argmax(1) == labels).sum()),
                "loss": float(F.cross_entropy(logits, labels, reduction="sum")),
            })  # fmt: skip
        return out


def _floats(metrics) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()}


def main(out: Path) -> None:
    for name in COLLECTIVES:
        _watch(name)
    cfg = load_config([
        f"workdir={out}", "model=simple_cnn", "model.width=8", "trainer.accelerator=cpu",
        "trainer.devices=2", "trainer.strategy=ddp", "trainer.max_epochs=2",
        "trainer.log_every_n_steps=2",
    ])  # fmt: skip
    torch.manual_seed(0)
    module = ClassificationModule(
        build_model(cfg.model, num_classes=CLASSES), {}, to_container(cfg.optim)
    )
    gen = torch.Generator().manual_seed(0)

    def loader(n: int) -> DataLoader:
        images = torch.rand(n, 3, 16, 16, generator=gen)
        return DataLoader(
            TensorDataset(images, torch.randint(0, CLASSES, (n,), generator=gen)), BATCH
        )

    reader = Reader()
    callbacks = [
        reader,  # first: it reads before the others, as a progress display may
        progress_callback(),
        Telemetry(),
        ModelCheckpoint(dirpath=out / "ckpt", monitor="val/acc", mode="max"),
        EarlyStopping(monitor="val/acc", mode="max", patience=5),
    ]
    trainer = build_trainer(cfg, callbacks)
    trainer.fit(module, loader(TRAIN_IMAGES), loader(VAL_IMAGES))
    rank = trainer.global_rank
    record = {
        "rank": rank, "started": started, "train": reader.train, "val": reader.val, "end": reader.end,
        "train_sums": reader.sums("train"), "val_sums": reader.sums("val"),
    }  # fmt: skip
    (out / f"rank{rank}.json").write_text(json.dumps(record))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
