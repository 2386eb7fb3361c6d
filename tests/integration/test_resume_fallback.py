"""A run whose stored last.ckpt is corrupt resumes from the checkpoint before it, with a warning."""

import logging

import pytest

from tests.conftest import tiny_overrides
from visionflow.core.config import load_config
from visionflow.steps.prepare import prepare
from visionflow.steps.train import train
from visionflow.storage import open_store

pytestmark = pytest.mark.slow

PER_EPOCH = 15  # shapes_tiny: 480 training images, batches of 32


def test_a_corrupt_last_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    common = ["run_id=fallback", "train.checkpoint_every_n_steps=0", "trainer.accelerator=cpu"]
    cfg = load_config(tiny_overrides(tmp_path, *common, "trainer.max_epochs=2"))
    dataset_id = prepare(cfg).dataset_id
    assert train(cfg, dataset_id).global_step == 2 * PER_EPOCH
    store = open_store(cfg.storage.root)
    last = store.path / "checkpoints/fallback/last.ckpt"
    data = bytearray(last.read_bytes())
    data[len(data) // 2] ^= 0xFF
    last.write_bytes(bytes(data))

    cfg = load_config(tiny_overrides(tmp_path, *common, "trainer.max_epochs=3"))
    with caplog.at_level(logging.WARNING, logger="visionflow.train"):
        resumed = train(cfg, dataset_id)
    assert resumed.resumed_from_step == PER_EPOCH  # last-prev.ckpt: the end of epoch 1
    assert resumed.global_step == 3 * PER_EPOCH
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(f"{last} is corrupt" in m and "not resuming from it" in m for m in warned), warned
