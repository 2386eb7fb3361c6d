"""Training batches that a restarted run continues mid-epoch, in the same order.

A rank's training order for an epoch is a function of (seed, epoch, rank, world size) alone
(`EpochOrder`), so a restarted process can recompute it; what it cannot recompute is how far the
epoch had got. `ResumableBatches` counts the batches it has handed out: its `state_dict()` (which
Lightning stores in every checkpoint, and which `ShardDataModule.state_dict` stores again, see
below) says "epoch e, k batches done", and after `load_state_dict` the next iteration of epoch e
starts at its batch k + 1. Lightning's own progress counters, restored from the same checkpoint,
expect exactly those remaining batches: the epoch ends where it would have, the same global step.

Why the DataModule carries the state too: Lightning restores a loader's state only if it builds
the training loader after loading the checkpoint, but a schedule sized by
`trainer.estimated_stepping_batches` (the one-cycle default) makes it build the loader while the
optimizers are configured, before that (Lightning 2.6: `FitLoop.setup_data` returns early and
the saved loader states are never applied). A DataModule's state is always restored, and the
loader takes it from there when its first epoch starts, whichever came first.

Random augmentation is a function of the sample too: each sample of the shard path is decoded and
transformed with torch's RNG seeded by (seed, epoch, index), and each cached batch is augmented
with a generator seeded by (seed, epoch, rank, batch). So a resumed epoch gets the same
augmented images as the uninterrupted run would have, whatever the number of DataLoader
workers. (Other randomness, such as dropout, MixUp or CutMix, draws from the global RNG, which a
restarted process seeds afresh: it is not replayed.)

A mid-epoch state is only valid for the same layout (sample count, batch size, number of
processes, seed): with another, the same "k batches" would be other samples. Loading one then
fails, naming both layouts. A state saved at an epoch boundary has nothing to skip, and any
layout may follow it.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

LAYOUT = ("samples", "batch_size", "world_size", "seed", "shuffle", "drop_last")


def seed_for(*parts: int) -> int:
    """A seed from integers (run seed, epoch, sample...): the same in every process and run."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # 63 bits: any torch generator accepts it


class EpochOrder:
    """This rank's sample indices for each epoch, dealt by torch's DistributedSampler: a
    permutation seeded by (seed, epoch), the same on every rank (or the natural order without
    shuffling), padded to a multiple of `world_size`, then every `world_size`-th index from
    `rank`. `set_epoch` chooses the epoch; Lightning calls it as each epoch starts. Held as the
    sampler's arguments, so any epoch's order can be dealt again when a run resumes."""

    def __init__(
        self, n: int, shuffle: bool, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1} (world_size {world_size})")
        self.n, self.shuffle, self.seed = n, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.per_rank = math.ceil(n / world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.per_rank

    def indices(self, epoch: int | None = None) -> torch.Tensor:
        sampler = DistributedSampler(
            range(self.n), self.world_size, self.rank, shuffle=self.shuffle, seed=self.seed
        )
        sampler.set_epoch(self.epoch if epoch is None else epoch)
        return torch.tensor(list(sampler), dtype=torch.long)


class ResumableBatches:
    """One epoch of batches per iteration, over this rank's `EpochOrder`; resumable mid-epoch.

    Iterating runs the sampler's current epoch and moves the sampler to the next one, so that
    iterating again without `set_epoch` runs the next epoch. `pending`, if given, is asked for a
    saved state as each iteration starts (see the module docstring). Subclasses say how a
    stretch of the order becomes batches (`_batches`).
    """

    batch_sampler = None  # Lightning reads both of a DataLoader's sampler attributes

    def __init__(
        self,
        order: EpochOrder,
        batch_size: int,
        drop_last: bool = False,
        pending: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        self.sampler, self.batch_size, self.drop_last = order, batch_size, drop_last
        self.pending = pending
        self.epoch, self.batches_done = order.epoch, 0
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        n = self.sampler.per_rank
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def layout(self) -> dict[str, Any]:
        s = self.sampler
        return {"samples": s.n, "batch_size": self.batch_size, "world_size": s.world_size,
                "seed": s.seed, "shuffle": s.shuffle, "drop_last": self.drop_last}  # fmt: skip

    def state_dict(self) -> dict[str, Any]:
        """Where the current (or last) epoch is: its number and how many batches were handed out."""
        return {"epoch": self.epoch, "batches": self.batches_done, "of": len(self), **self.layout()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next iteration runs the saved epoch, without its first `batches` batches."""
        if self._remember(state):
            self.sampler.set_epoch(state["epoch"])

    def _remember(self, state: dict[str, Any]) -> bool:
        """Skip the saved epoch's first batches if that epoch runs next; False if none to skip."""
        if not 0 < state["batches"] < state["of"]:
            return False  # saved at an epoch boundary: the next epoch starts from its beginning
        saved = {key: state.get(key) for key in LAYOUT}
        if saved != self.layout():
            differ = ", ".join(
                f"{k} {saved[k]} then, {v} now" for k, v in self.layout().items() if saved[k] != v
            )
            raise ValueError(
                f"cannot continue epoch {state['epoch'] + 1} where its checkpoint left it (after "
                f"{state['batches']} of {state['of']} batches): the training data is laid out "
                f"differently ({differ}), so the remaining batches would be other samples. Resume "
                "with the same data.batch_size, number of processes (trainer.devices x "
                "num_nodes), seed and dataset, or from an epoch-end checkpoint"
            )
        self._resume = (state["epoch"], state["batches"])
        return True

    def __iter__(self) -> Iterator[Any]:
        # A generator: nothing runs until the first batch is asked for, by which time Lightning
        # has set the epoch and restored the checkpoint.
        if self.pending is not None and (state := self.pending()) is not None:
            self._remember(state)  # the epoch is the trainer's (set_epoch): it may have moved on
        epoch, skip = self.sampler.epoch, 0
        if self._resume is not None:
            skip = self._resume[1] if self._resume[0] == epoch else 0
            self._resume = None
        self.sampler.set_epoch(epoch + 1)
        self.epoch, self.batches_done = epoch, skip
        order = self.sampler.indices(epoch)[skip * self.batch_size :]
        if self.drop_last:
            order = order[: (len(self) - skip) * self.batch_size]
        for batch in self._batches(order, epoch, skip):
            self.batches_done += 1  # before yielding: a checkpoint taken now includes this batch
            yield batch

    def _batches(self, order: torch.Tensor, epoch: int, first: int) -> Iterator[Any]:
        """Batches of `order` (this rank's indices from batch number `first` of `epoch`)."""
        raise NotImplementedError


class SeededSamples(Dataset):
    """`dataset[(index, seed)]` is `dataset[index]` drawn with torch's RNG seeded by `seed`; the
    RNG's state is put back afterwards (outside workers it is the training process's)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]):
        index, seed = key
        rng = torch.default_generator
        state = rng.get_state()
        rng.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            rng.set_state(state)


class _Keys(Sampler):
    """(index, seed) for each index of the current stretch of the order, made as they are read."""

    def __init__(self) -> None:
        self.order: list[int] = []
        self.seed = self.epoch = 0

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed, epoch = self.seed, self.epoch
        return ((i, seed_for(seed, epoch, i)) for i in self.order)


class ShardBatches(ResumableBatches):
    """The shard path's training batches: a DataLoader (workers and all) over this rank's
    remaining order, each sample augmented with its own seed."""

    def __init__(
        self,
        dataset,
        order: EpochOrder,
        batch_size: int,
        num_workers: int = 0,
        collate_fn=None,
        pin_memory: bool = False,
        pending: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        super().__init__(order, batch_size, drop_last=False, pending=pending)
        self.dataset = dataset
        self._keys = _Keys()
        self.loader = DataLoader(
            SeededSamples(dataset),
            batch_size=batch_size,
            sampler=self._keys,
            num_workers=num_workers,
            persistent_workers=num_workers > 0,
            pin_memory=pin_memory,
            collate_fn=collate_fn,
            # the workers' base seed from its own generator, not from the training process's RNG
            generator=torch.Generator().manual_seed(order.seed),
        )

    def _batches(self, order: torch.Tensor, epoch: int, first: int) -> Iterator[Any]:
        keys = self._keys
        keys.order, keys.seed, keys.epoch = order.tolist(), self.sampler.seed, epoch
        return iter(self.loader)
