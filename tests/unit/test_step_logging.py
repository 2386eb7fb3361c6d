"""What a training step logs, and when: the epoch means over all of an epoch's images, and the
step loss on the steps the Trainer sends to its loggers only (vision/modules.py)."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import Logger
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import tiny_overrides
from visionflow.compose.models import build_model
from visionflow.compose.training import build_trainer
from visionflow.core.config import load_config, to_container
from visionflow.vision.modules import ClassificationModule

IMAGES, BATCH = 22, 4  # six batches an epoch, the last of 2 images: weights count
STEPS_PER_EPOCH = 6


class _Recorder(Logger):
    """Keeps what the Trainer sends to loggers: {name: {step: value}}."""

    def __init__(self) -> None:
        super().__init__()
        self.metrics: dict[str, dict[int, float]] = {}

    name, version = "recorder", 0

    @property
    def experiment(self) -> None:
        return None

    def log_metrics(self, metrics, step=None) -> None:
        for key, value in metrics.items():
            self.metrics.setdefault(key, {})[step] = float(value)

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass


class _Batches(pl.Callback):
    """Each training batch's logits, labels and loss, in order; the loss also by global step."""

    def __init__(self) -> None:
        self.logits: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []
        self.loss: dict[int, float] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        pl_module.net.register_forward_hook(self._keep)

    def _keep(self, net, inputs, logits) -> None:
        if net.training:
            self.logits.append(logits.detach())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.labels.append(batch[1])
        self.loss[trainer.global_step - 1] = float(outputs["loss"])


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    cfg = load_config(tiny_overrides(
        tmp_path_factory.mktemp("logging"), "trainer.accelerator=cpu", "trainer.devices=1",
        "trainer.max_epochs=2", "trainer.log_every_n_steps=4", "trainer.limit_val_batches=0",
    ))  # fmt: skip
    torch.manual_seed(0)
    module = ClassificationModule(
        build_model(cfg.model, num_classes=5), {}, to_container(cfg.optim)
    )
    gen = torch.Generator().manual_seed(0)
    data = TensorDataset(
        torch.rand(IMAGES, 3, 32, 32, generator=gen), torch.randint(0, 5, (IMAGES,), generator=gen)
    )
    batches, logger = _Batches(), _Recorder()
    trainer = build_trainer(cfg, [batches], logger=logger)
    trainer.fit(module, DataLoader(data, BATCH))
    return trainer, logger.metrics, batches


def test_the_step_loss_is_logged_every_log_every_n_steps_with_that_steps_loss(fitted):
    trainer, logged, batches = fitted
    assert trainer.global_step == 2 * STEPS_PER_EPOCH
    # Lightning logs step values after steps 4, 8 and 12 (steps 3, 7 and 11, counted from 0)
    assert sorted(logged["train/loss_step"]) == [3, 7, 11]
    for step, value in logged["train/loss_step"].items():
        assert value == pytest.approx(batches.loss[step]), step  # that step's, not an older one


def test_train_accuracy_and_loss_are_over_each_epochs_images(fitted):
    _, logged, batches = fitted
    ends = [STEPS_PER_EPOCH - 1, 2 * STEPS_PER_EPOCH - 1]  # epoch values come at its last step
    assert sorted(logged["train/acc"]) == sorted(logged["train/loss_epoch"]) == ends
    for epoch, step in enumerate(ends):
        epoch_batches = slice(epoch * STEPS_PER_EPOCH, (epoch + 1) * STEPS_PER_EPOCH)
        logits, labels = (
            torch.cat(batches.logits[epoch_batches]),
            torch.cat(batches.labels[epoch_batches]),
        )
        assert len(labels) == IMAGES
        right = int((logits.argmax(1) == labels).sum())
        assert logged["train/acc"][step] == pytest.approx(right / IMAGES)
        per_image = F.cross_entropy(logits, labels)
        assert logged["train/loss_epoch"][step] == pytest.approx(float(per_image), rel=1e-5)
