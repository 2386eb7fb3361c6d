"""LightningModules: one per task, owning the step logic; the network comes from the registry."""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn


class ClassificationModule(pl.LightningModule):
    """Cross-entropy training of any registered classifier, with accuracy on every split.

    `spec` describes how to rebuild the network (model name and options, classes, image size,
    dataset id); it travels inside every checkpoint so that later steps need nothing else.
    `channels_last` and `compile` (config `train.*`) change how the network runs, not what it
    computes; checkpoints keep the plain network's parameter names either way.
    """

    def __init__(
        self,
        net: nn.Module,
        spec: dict[str, Any],
        optim: dict[str, Any],
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=self.memory_format)
        if compile:
            self.net.compile()  # in place: state_dict keys stay those of the plain network
        self.spec = spec
        self.optim = optim
        self.label_smoothing = float(optim.get("label_smoothing", 0.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))

    def _step(self, batch, split: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        smoothing = self.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        acc = (logits.argmax(1) == labels).float().mean()
        on_step = split == "train"
        self.log(
            f"{split}/loss", loss, on_step=on_step, on_epoch=True, prog_bar=True, sync_dist=True
        )
        self.log(f"{split}/acc", acc, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True)
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def configure_optimizers(self):
        optimizer = instantiate(self.optim["optimizer"], params=self.parameters())
        if not self.optim.get("scheduler"):
            return optimizer
        make = instantiate(self.optim["scheduler"])
        scheduler = make(
            optimizer, **_schedule_length(make, self.trainer.estimated_stepping_batches)
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["visionflow"] = self.spec


def _schedule_length(make, total_steps: int) -> dict[str, int]:
    """Fill in the schedule's length (OneCycleLR's total_steps, cosine's T_max) if not given."""
    func = getattr(make, "func", make)
    given = getattr(make, "keywords", {})
    params = inspect.signature(func).parameters
    for name in ("total_steps", "T_max"):
        if name in params and name not in given:
            # OneCycleLR divides by its phase lengths: a smoke run of a few steps would crash.
            return {name: max(int(total_steps), 8)}
    return {}
