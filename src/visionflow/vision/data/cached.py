"""Decoded-once datasets served from memory or the GPU, augmented there (`data.cache`).

`data.cache=none` is the shard path: DataLoader workers decode and augment every image every
epoch (the steps `[resize, random_crop, horizontal_flip]` as whole batches, see `BatchAugment`).
For small images that path is bound by the CPU long before the GPU is busy. With
`memory` or `gpu`, a split's shards are decoded once into one uint8 tensor (N, 3, H, W), kept in
CPU memory or on the GPU, and whole batches are cut from it, augmented on that device (random
translation with reflect padding, horizontal flip) and converted to float [0, 1] there.

`DeviceBatches` is a plain iterable with a length, which Lightning's Trainer accepts in place
of a DataLoader: batches already on the model's device pass through its `batch_to_device`
unchanged. Epochs reshuffle through `sampler.set_epoch`, which the Trainer calls as it does
for a DistributedSampler, and a restarted run continues an interrupted epoch where its last
checkpoint left it, with the same augmentation (`resumable.py`).

Limits:
- The whole split must fit in memory (CIFAR-10's 50,000 images: 150 MB); under DDP each rank
  holds a full copy and takes its share of indices per epoch (like DistributedSampler: the
  same seeded permutation everywhere, every `world_size`-th index; evaluation pads with
  repeated samples so every rank runs the same number of steps).
- Training drops the last partial batch (a different remainder each epoch): fixed batch shapes
  keep a compiled network from recompiling.
- Only `resize`, `random_crop` (as a translation) and `horizontal_flip` have a batched
  version; other transforms fail with a message naming these.
- Images are resized to `image_size` once, when decoded.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import v2

from visionflow.core.config import ConfigError
from visionflow.vision.data.resumable import EpochOrder, ResumableBatches, seed_for
from visionflow.vision.data.shards import ShardDataset, decode_pixels

log = logging.getLogger("visionflow.data")

CACHE_MODES = ("none", "memory", "gpu")


def check_cache_mode(mode: str) -> str:
    if mode not in CACHE_MODES:
        raise ConfigError(f"data.cache={mode!r} is not supported; use one of {CACHE_MODES}")
    return mode


def cache_device(mode: str, preferred: torch.device | None = None) -> torch.device:
    """Where `mode` keeps the data: the trainer's CUDA device for `gpu`, else the CPU."""
    if mode == "gpu" and torch.cuda.is_available():
        if preferred is not None and preferred.type == "cuda":
            return preferred
        return torch.device("cuda", torch.cuda.current_device())
    if mode == "gpu":
        log.warning("data.cache=gpu without CUDA: caching in CPU memory instead")
    return torch.device("cpu")


@dataclass(frozen=True)
class BatchAugment:
    """Random translation by up to `translate` pixels (reflect padding) and horizontal flips,
    applied to a whole uint8 batch at once on the batch's device.

    The cached path draws a batch's moves from one generator (`__call__`). The shard path
    (`data.cache=none`) uses it for steps `[resize, random_crop, horizontal_flip]`: each sample
    draws its own move in its DataLoader worker, with torch's RNG seeded for that sample as for
    any per-sample transform, after a resize to `resize` pixels square (`per_sample`), and
    `collate` moves the whole batch and converts it to float [0, 1]: the same pixels the
    per-sample steps give for those moves, at a fraction of their cost.
    """

    translate: int = 0
    flip_p: float = 0.0
    resize: int | None = None  # the shard path's leading `resize` step (cached: at decode)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return self.apply(images, self.draw(len(images), images.device, generator))

    def draw(
        self, n: int, device: torch.device | None = None, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """`n` images' moves (n, 3): flipped (0 or 1), then the crop's row and column offset in
        the padded image (0..2*translate); from `generator`, else torch's global RNG."""
        moves = torch.zeros(n, 3, dtype=torch.long, device=device)
        if self.flip_p > 0:
            moves[:, 0] = torch.rand(n, device=device, generator=generator) < self.flip_p
        if self.translate > 0:
            span = 2 * self.translate + 1
            moves[:, 1:] = torch.randint(0, span, (2, n), device=device, generator=generator).T
        return moves

    def apply(self, images: torch.Tensor, moves: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) flipped, padded by reflection and cropped back as `moves` say,
        in one gather (indexing all four dimensions at once is several times slower on a CPU)."""
        n, c, h, w = images.shape
        t = self.translate
        if t >= min(h, w):
            raise ValueError(f"random_crop padding {t} must be smaller than the image ({h}x{w})")
        flip, dy, dx = moves.T
        rows = _reflect(torch.arange(h, device=images.device) + dy[:, None] - t, h)  # (n, h)
        cols = _reflect(torch.arange(w, device=images.device) + dx[:, None] - t, w)  # (n, w)
        cols = torch.where(flip[:, None].bool(), w - 1 - cols, cols)  # flipped before padding
        index = (rows[:, :, None] * w + cols[:, None, :]).view(n, 1, h * w).expand(n, c, h * w)
        return images.reshape(n, c, h * w).gather(2, index).view(n, c, h, w)

    def per_sample(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """The shard path's work on one decoded uint8 image: (the image resized, its move as
        `draw` gives one, from torch's global RNG)."""
        size = self.resize
        if size is not None and image.shape[-2:] != (size, size):  # the `resize` step's call
            image = v2.functional.resize(image, [size, size], antialias=True)
        flip = self.flip_p > 0 and float(torch.rand(())) < self.flip_p
        t = self.translate
        dy, dx = torch.randint(0, 2 * t + 1, (2,)).tolist() if t > 0 else (0, 0)
        return image, (int(flip), dy, dx)

    def collate(
        self, samples: list[tuple[tuple[torch.Tensor, tuple[int, int, int]], int]]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`per_sample`'s results and labels -> (moved images, float [0, 1]; labels)."""
        images = torch.stack([image for (image, _), _ in samples])
        moves = torch.tensor([move for (_, move), _ in samples])
        labels = torch.tensor([label for _, label in samples])
        moved = self.apply(images, moves)
        return v2.functional.to_dtype(moved, torch.float32, scale=True), labels  # as ToDtype


def _reflect(index: torch.Tensor, size: int) -> torch.Tensor:
    """Positions in a row of `size` pixels padded by reflection (-1 -> 1, size -> size - 2)."""
    return (size - 1) - ((size - 1) - index.abs()).abs()


def batch_augment_from(steps: Sequence[dict[str, Any]], where: str) -> BatchAugment:
    """The batched equivalent of a `transforms.*` list (see module docstring for what maps)."""
    translate, flip_p = 0, 0.0
    for i, step in enumerate(steps):
        params = dict(step)
        name = params.pop("name", None)
        if name == "resize" and not params:
            continue  # images are cached at image_size
        if name == "random_crop" and set(params) <= {"padding"}:
            translate = int(params.get("padding", 4))
        elif name == "horizontal_flip" and set(params) <= {"p"}:
            flip_p = float(params.get("p", 0.5))
        else:
            raise ConfigError(
                f"{where}[{i}]: {step} has no batched version for data.cache; supported: "
                "resize, random_crop(padding), horizontal_flip(p); or set data.cache=none"
            )
    return BatchAugment(translate, flip_p)


def decode_shards(shards: list[Path], image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a split's shards as uint8 (N, 3, S, S) and their labels (N,), on the CPU."""
    data = ShardDataset(shards)
    n = len(data)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    started = time.monotonic()
    with _ShardReader(data) as read:
        for i, entry in enumerate(data.entries):
            pixels = decode_pixels(read(entry)).permute(1, 2, 0).numpy()
            if pixels.shape[:2] != (image_size, image_size):
                image = Image.fromarray(pixels).resize((image_size, image_size), Image.BILINEAR)
                pixels = np.asarray(image)
            images[i] = pixels
    log.info("decoded %d images in %.1fs", n, time.monotonic() - started)
    labels = torch.tensor(data.labels, dtype=torch.long)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels


class _ShardReader:
    """Reads entries' bytes with one open file per shard."""

    def __init__(self, data: ShardDataset) -> None:
        self.files = [open(p, "rb") for p in data.shards]  # noqa: SIM115

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        for f in self.files:
            f.close()

    def __call__(self, entry) -> bytes:
        f = self.files[entry.shard]
        f.seek(entry.offset)
        return f.read(entry.size)


class DeviceBatches(ResumableBatches):
    """Batches of (float images in [0, 1], labels) cut from a cached uint8 tensor on its device.

    Iterating runs one epoch; without a `set_epoch` call in between, the next iteration is the
    next epoch (a new shuffle). Training batches resume mid-epoch (`ResumableBatches`), and
    batch b of epoch e is augmented with a generator seeded by (seed, epoch, rank, b).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        batch_size: int,
        shuffle: bool,
        augment: BatchAugment | None = None,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        pending: Callable[[], dict[str, Any] | None] | None = None,
    ) -> None:
        order = EpochOrder(len(images), shuffle, seed, rank, world_size)
        super().__init__(order, batch_size, drop_last=drop_last, pending=pending)
        self.images, self.labels = images, labels.to(images.device)
        self.augment = augment
        self.generator = torch.Generator(images.device)

    def _batches(
        self, order: torch.Tensor, epoch: int, first: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = order.to(self.images.device)
        s = self.sampler
        for b in range(math.ceil(len(order) / self.batch_size)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            images = self.images[idx]
            if self.augment is not None:
                self.generator.manual_seed(seed_for(s.seed, epoch, s.rank, first + b))
                images = self.augment(images, self.generator)
            yield images.float().div_(255), self.labels[idx]
