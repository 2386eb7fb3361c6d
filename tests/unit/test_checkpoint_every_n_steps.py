"""Mid-epoch checkpoints (`train.checkpoint_every_n_steps`) and resuming from them.

The loaders alone first (which batches a resumed epoch yields, per rank), then the real
DataModule, StepCheckpoint and Lightning Trainer: a run stopped by an exception a few steps
after a mid-epoch checkpoint, resumed from it, must replay exactly what an uninterrupted run
did from that step on (samples, their random augmentation, learning rates, final weights).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from visionflow.background import BackgroundError
from visionflow.callbacks.checkpointing import StepCheckpoint, StoreCheckpointIO, step_checkpoints
from visionflow.core.config import ConfigError, load_config
from visionflow.storage import LocalStore
from visionflow.vision.data.cached import BatchAugment, DeviceBatches
from visionflow.vision.data.datamodules import ShardDataModule
from visionflow.vision.data.resumable import EpochOrder, ShardBatches
from visionflow.vision.data.shards import manifest_id


class Indexed(Dataset):
    """Sample i is (i + noise, i): the noise stands for random augmentation."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        return torch.rand(3, 4, 4) + i, i


def _images(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, 3, 6, 6), dtype=torch.uint8, generator=g), torch.arange(n)


def _loader(kind: str, n: int, rank: int = 0, world_size: int = 1, batch_size: int = 4):
    if kind == "shards":
        order = EpochOrder(n, shuffle=True, seed=3, rank=rank, world_size=world_size)
        return ShardBatches(Indexed(n), order, batch_size)
    images, labels = _images(n)
    return DeviceBatches(images, labels, batch_size, shuffle=True, augment=BatchAugment(1, 0.5),
                         drop_last=True, seed=3, rank=rank, world_size=world_size)  # fmt: skip


def _epoch(loader, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch)
    return list(loader)


# ------------------------------------------------------------------------------ the loaders


@pytest.mark.parametrize("kind", ["shards", "memory"])
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_resumed_epoch_yields_exactly_the_batches_not_yet_done(kind, world_size):
    n, done, seen = 37, 3, []
    for rank in range(world_size):
        full = _epoch(_loader(kind, n, rank, world_size), epoch=2)
        interrupted = _loader(kind, n, rank, world_size)
        interrupted.sampler.set_epoch(2)
        batches = iter(interrupted)
        for _ in range(done):
            next(batches)
        state = interrupted.state_dict()  # what a checkpoint taken now holds
        assert (state["epoch"], state["batches"]) == (2, done)

        resumed = _loader(kind, n, rank, world_size)  # a new process
        resumed.load_state_dict(state)
        rest = list(resumed)
        assert len(rest) == len(full) - done
        for (x, y), (fx, fy) in zip(rest, full[done:], strict=True):
            assert torch.equal(y, fy) and torch.equal(x, fx)  # same samples, same augmentation
        seen += [y for _, y in full]
        # The next epoch starts from its beginning, in its own order.
        assert [y.tolist() for _, y in resumed] != [y.tolist() for _, y in full]

    samples = torch.cat(seen).tolist()
    if kind == "shards":  # every sample once; with 2 ranks, padded to 2 x 19 with a repeat
        assert len(samples) == (37 if world_size == 1 else 38) and set(samples) == set(range(n))
    else:  # drop_last: a whole number of batches per rank, no sample twice
        assert len(samples) == len(set(samples)) == (36 if world_size == 1 else 32)


def test_dataloader_workers_change_neither_order_nor_augmentation():
    plain = _epoch(_loader("shards", 37), epoch=1)
    order = EpochOrder(37, shuffle=True, seed=3)
    workers = ShardBatches(Indexed(37), order, batch_size=4, num_workers=2)
    for _ in range(2):  # the same persistent workers for a resumed epoch and the next one
        workers.load_state_dict({**_loader("shards", 37).state_dict(), "epoch": 1, "batches": 5})
        rest = list(workers)
        assert len(rest) == len(plain) - 5
        for (x, y), (px, py) in zip(rest, plain[5:], strict=True):
            assert torch.equal(y, py) and torch.equal(x, px)


def test_augmentation_is_seeded_per_sample_and_leaves_the_training_rng_alone():
    a, b = _loader("shards", 20), _loader("shards", 20)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    x, _ = next(iter(a))
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(1)  # another global state: the same augmented sample
    assert torch.equal(next(iter(b))[0], x)


def test_a_mid_epoch_state_needs_the_same_layout_but_an_epoch_end_state_does_not():
    two = _loader("shards", 37, rank=0, world_size=2)
    two.sampler.set_epoch(1)
    batches = iter(two)
    next(batches)
    with pytest.raises(ValueError, match=r"world_size 2 then, 1 now.*same data.batch_size"):
        _loader("shards", 37).load_state_dict(two.state_dict())

    list(batches)  # the epoch ends: nothing left to skip, whatever the next layout
    one = _loader("shards", 37)
    one.load_state_dict(two.state_dict())
    assert len(list(one)) == len(one)


def test_step_checkpoints_are_off_at_zero_and_refuse_a_negative_interval(tmp_path):
    assert step_checkpoints(tmp_path, 0) == []
    assert isinstance(step_checkpoints(tmp_path, 5)[0], StepCheckpoint)
    with pytest.raises(ConfigError, match="train.checkpoint_every_n_steps must be a positive"):
        step_checkpoints(tmp_path, -1)
    assert load_config(["train.checkpoint_every_n_steps=0"]).train.checkpoint_every_n_steps == 0


def test_a_failed_upload_leaves_the_stored_checkpoint_whole(tmp_path, monkeypatch):
    store = LocalStore(tmp_path / "store")
    io = StoreCheckpointIO(store, "checkpoints/run")
    io.save_checkpoint({"global_step": 4}, tmp_path / "local" / "last.ckpt")
    io.teardown()

    def half_then_die(src, dst, length=0):
        dst.write(src.read(10))
        raise OSError("killed mid-upload")

    monkeypatch.setattr("visionflow.storage.shutil.copyfileobj", half_then_die)
    io.save_checkpoint({"global_step": 8}, tmp_path / "local" / "last.ckpt")
    with pytest.raises(BackgroundError, match="upload of last.ckpt to .* failed: killed mid"):
        io.teardown()
    stored = store.uri("checkpoints/run/last.ckpt")
    assert torch.load(stored, weights_only=True) == {"global_step": 4}


# -------------------------------------------------------------- a real DataModule and Trainer


class IndexedData(ShardDataModule):
    """ShardDataModule over `Indexed` samples (shard path) or cached images whose label is their
    index (memory path), from a manifest without shards."""

    def __init__(self, tmp_path: Path, cache: str) -> None:
        store = LocalStore(tmp_path / "store")
        splits = {s: {"shards": []} for s in ("train", "val", "test")}
        manifest = {"classes": ["a", "b"], "image_size": 6, "splits": splits}
        manifest["id"] = dataset_id = manifest_id(manifest)  # what reading it checks
        store.put_bytes(json.dumps(manifest).encode(), f"datasets/{dataset_id}/manifest.json")
        augment = BatchAugment(translate=1, flip_p=0.5) if cache != "none" else None
        super().__init__(store, dataset_id, tmp_path / "cache", batch_size=4, cache=cache,
                         seed=5, batch_augment=augment)  # fmt: skip

    def dataset(self, split: str):
        return Indexed(30 if split == "train" else 8)

    def decoded(self, split: str):
        return _images(30 if split == "train" else 8)


class Recorder(pl.LightningModule):
    """Records (step, sample indices, augmentation fingerprint, lr) of every training batch."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Linear(3 * 6 * 6, 2)
        self.seen: list[tuple[int, list[int], float, float]] = []

    def _loss(self, batch):
        x, y = batch
        x = F.pad(x, (0, 6 - x.shape[-1], 0, 6 - x.shape[-2]))  # the shard path's are 4 px
        return F.cross_entropy(self.net(x.flatten(1).float()), y % 2)

    def training_step(self, batch, batch_idx):
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        self.seen.append((self.global_step, batch[1].tolist(), batch[0].sum().item(), lr))
        return self._loss(batch)

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        # Sized by estimated_stepping_batches, as the default one-cycle schedule is: Lightning
        # then builds the training loader before restoring the checkpoint.
        opt = torch.optim.AdamW(self.parameters(), lr=0.05)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=0.05, total_steps=self.trainer.estimated_stepping_batches
        )
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Killed(Exception):
    pass


class KillAt(pl.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise Killed


class Saves(StepCheckpoint):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.steps: list[int] = []

    def _save_checkpoint(self, trainer, filepath) -> None:
        self.steps.append(trainer.global_step)
        super()._save_checkpoint(trainer, filepath)


def _fit(tmp_path, cache, ckpt_dir, kill_at=None, resume=None):
    module, steps = Recorder(), Saves(ckpt_dir, every_n_steps=4)
    latest = ModelCheckpoint(dirpath=ckpt_dir, filename="last", enable_version_counter=False)
    trainer = pl.Trainer(
        max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path / "lightning",
        callbacks=[latest, steps, *([KillAt(kill_at)] if kill_at else [])],
    )  # fmt: skip
    with contextlib.suppress(Killed):
        trainer.fit(module, datamodule=IndexedData(tmp_path, cache), ckpt_path=resume,
                    weights_only=True)  # fmt: skip
    return module, steps.steps


@pytest.mark.parametrize("cache, per_epoch", [("none", 8), ("memory", 7)])
def test_a_run_resumed_mid_epoch_replays_the_uninterrupted_one(tmp_path, cache, per_epoch):
    full, saved_at = _fit(tmp_path, cache, tmp_path / "full")
    assert len(full.seen) == 3 * per_epoch
    # Every 4 steps, but not at an epoch's last batch (8, 16, 24 on the shard path).
    assert saved_at == ([4, 12, 20] if cache == "none" else [4, 8, 12, 16, 20])

    run = tmp_path / "run"
    killed, _ = _fit(tmp_path, cache, run, kill_at=14)
    assert killed.seen[-1][0] == 13  # it stopped after step 14, two steps past the checkpoint
    last = torch.load(run / "last.ckpt", weights_only=True)
    position = last["IndexedData"]["train_batches"]
    assert last["global_step"] == 12 and position["epoch"] == 1
    assert position["batches"] == 12 - per_epoch  # mid-epoch: 4 or 5 batches into epoch 2

    resumed, _ = _fit(tmp_path, cache, run, resume=str(run / "last.ckpt"))
    assert resumed.seen[0][0] == 12  # global_step goes on; steps 13 and 14 are done again
    # The killed run up to its checkpoint, then the resumed one, is the uninterrupted run: the
    # same samples in the same batches, augmented the same, at the same learning rates.
    replay = killed.seen[:12] + resumed.seen
    assert replay == full.seen
    # So the interrupted epoch saw each of its samples once (drop_last: 28 of 30 when cached).
    epoch = [i for step, ids, _, _ in replay for i in ids if per_epoch <= step < 2 * per_epoch]
    assert len(epoch) == len(set(epoch)) == (30 if cache == "none" else 28)
    for name, value in full.net.state_dict().items():
        assert torch.equal(resumed.net.state_dict()[name], value), name
