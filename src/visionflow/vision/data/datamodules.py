"""DataModules: where raw samples come from (for `prepare`) and how shards are loaded (for training).

Every dataset is read from prepare's shards, so a DataModule subclass only says how to list its
raw samples (`raw_samples`); loading, splitting into loaders and caching are shared.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from visionflow.core.registry import DATAMODULES
from visionflow.storage import ArtifactStore, split_uri
from visionflow.vision.data.cached import (
    BatchAugment,
    DeviceBatches,
    cache_device,
    check_cache_mode,
    decode_shards,
)
from visionflow.vision.data.resumable import EpochOrder, ResumableBatches, ShardBatches
from visionflow.vision.data.shapes import SHAPE_CLASSES, make_shape
from visionflow.vision.data.shards import IMAGE_EXTS, ShardDataset, fetch_shards, load_manifest


@dataclass
class RawSample:
    """One sample before validation: `read()` gives the encoded image bytes."""

    source: str  # where it came from, for reports and lineage
    label: int | None  # None: no usable label (reported as bad)
    read: Callable[[], bytes]
    ext: str
    split: str | None = None  # fixed split ("test" for data.test_root), else None
    # More fields for the shard: `json` ({"boxes": [[x0, y0, x1, y1], ...] in pixels, "labels":
    # [class, ...]}) and `mask.png` (8-bit: 0 background, class + 1, 255 ignore). A value may be
    # a function returning it, called when the shard is written, so big sources stay lazy.
    extra: dict[str, Any] = field(default_factory=dict)


class ShardDataModule(pl.LightningDataModule):
    """Loads a prepared dataset (manifest + shards) from the artifact store.

    `cache="none"` serves batches through DataLoaders that decode every epoch; `"memory"` or
    `"gpu"` decodes each split once and serves `DeviceBatches` augmented by `batch_augment`
    (see `cached.py`). With `"none"`, a `batch_augment` (the same steps as `train_transform`)
    takes the place of `train_transform`: workers move whole batches instead of single images.

    Training batches either way are `ResumableBatches`: the DataModule's state (in every
    checkpoint) says how far the training epoch had got, and a run restored from a mid-epoch
    checkpoint continues that epoch with its remaining batches (see `resumable.py`).
    """

    tasks: tuple[str, ...] = ("classification",)
    required: tuple[str, ...] = ()  # data.* keys this dataset cannot do without

    def __init__(
        self,
        store: ArtifactStore,
        dataset_id: str,
        cache_dir: Path,
        train_transform=None,
        eval_transform=None,
        batch_size: int = 128,
        num_workers: int = 0,
        cache: str = "none",
        batch_augment: BatchAugment | None = None,
        seed: int = 0,
        task: str = "classification",
        collate_fn=None,
    ) -> None:
        super().__init__()
        self.task, self.collate_fn = task, collate_fn
        self.store, self.dataset_id, self.cache_dir = store, dataset_id, Path(cache_dir)
        self.train_transform, self.eval_transform = train_transform, eval_transform
        self.batch_size, self.num_workers = batch_size, num_workers
        self.cache, self.batch_augment, self.seed = check_cache_mode(cache), batch_augment, seed
        self.cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.manifest = load_manifest(store, dataset_id)
        self.classes: list[str] = self.manifest["classes"]
        self.image_size: int = self.manifest["image_size"]
        self.datasets: dict[str, ShardDataset] = {}
        self._train_batches: ResumableBatches | None = None  # the newest training loader
        self._train_state: dict[str, Any] | None = None  # restored, not yet taken by a loader

    @classmethod
    def raw_samples(cls, data_cfg, seed: int) -> tuple[list[str], Iterator[RawSample]]:
        """Class names and the raw samples of the source, for `prepare`."""
        raise NotImplementedError

    def prepare_data(self) -> None:
        for split in ("train", "val", "test"):
            fetch_shards(self.store, self.manifest, split, self.cache_dir)

    def dataset(self, split: str) -> ShardDataset:
        if split not in self.datasets:
            paths = fetch_shards(self.store, self.manifest, split, self.cache_dir)
            tf = self.train_transform if split == "train" else self.eval_transform
            if split == "train" and self._batch_augments_shards():
                tf = self.batch_augment.per_sample
            self.datasets[split] = ShardDataset(paths, tf, self.task)
        return self.datasets[split]

    def _batch_augments_shards(self) -> bool:
        return self.cache == "none" and self.batch_augment is not None

    def decoded(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        """A split as uint8 images (N, 3, S, S) and labels, decoded once, on the cache device."""
        if split not in self.cached:
            trainer = self.trainer
            device = cache_device(self.cache, trainer.strategy.root_device if trainer else None)
            paths = fetch_shards(self.store, self.manifest, split, self.cache_dir)
            images, labels = decode_shards(paths, self.image_size)
            self.cached[split] = images.to(device), labels.to(device)
        return self.cached[split]

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def _device_batches(self, split: str, train: bool) -> DeviceBatches:
        images, labels = self.decoded(split)
        rank, world_size = self._rank()
        return DeviceBatches(
            images,
            labels,
            self.batch_size,
            shuffle=train,
            augment=self.batch_augment if train else None,
            drop_last=train,
            seed=self.seed,
            rank=rank,
            world_size=world_size,
            pending=self._take_train_state if train else None,
        )

    def _loader(self, split: str) -> DataLoader | DeviceBatches:
        """An evaluation split's batches, in order (Lightning shards a DataLoader under DDP)."""
        if self.cache != "none":
            return self._device_batches(split, train=False)
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            drop_last=False,
            collate_fn=self.collate_fn,
        )

    def train_dataloader(self) -> ResumableBatches:
        if self.cache != "none":
            batches: ResumableBatches = self._device_batches("train", train=True)
        else:
            dataset, (rank, world_size) = self.dataset("train"), self._rank()
            collate = self.batch_augment.collate if self._batch_augments_shards() else None
            batches = ShardBatches(
                dataset,
                EpochOrder(len(dataset), shuffle=True, seed=self.seed, rank=rank,
                           world_size=world_size),
                self.batch_size,
                num_workers=self.num_workers,
                collate_fn=collate or self.collate_fn,
                pin_memory=torch.cuda.is_available(),
                pending=self._take_train_state,
            )  # fmt: skip
        self._train_batches = batches
        return batches

    def val_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("test")

    def state_dict(self) -> dict[str, Any]:
        """How far training has got through its current epoch (saved in every checkpoint)."""
        if self._train_batches is None:
            return {}
        return {"train_batches": self._train_batches.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._train_state = state_dict.get("train_batches")

    def _take_train_state(self) -> dict[str, Any] | None:
        """The restored state, once: for the training loader whose epoch starts first."""
        state, self._train_state = self._train_state, None
        return state


@DATAMODULES.register("shapes")
class ShapesDataModule(ShardDataModule):
    """Generated shapes (see `shapes.py`); labels, boxes and masks for all three tasks."""

    tasks = ("classification", "detection", "segmentation")

    @classmethod
    def raw_samples(cls, data_cfg, seed: int) -> tuple[list[str], Iterator[RawSample]]:
        n_classes, size = data_cfg.num_classes, data_cfg.image_size

        def gen() -> Iterator[RawSample]:
            for i in range(data_cfg.num_samples):
                s = make_shape(seed, i, size, n_classes)
                yield RawSample(
                    source=f"shapes:{seed}:{i}",
                    label=s.label,
                    read=lambda s=s: png_bytes(s.image),
                    ext="png",
                    extra={
                        "json": {"boxes": [list(s.box)], "labels": [s.label]},
                        "mask.png": lambda s=s: png_bytes(_class_mask(s.mask, s.label)),
                    },
                )

        return list(SHAPE_CLASSES[:n_classes]), gen()


def _class_mask(mask, label: int):
    """Shapes draw a 0/255 mask; shards carry class masks: 0 background, class + 1 inside."""
    return mask.point(lambda v: label + 1 if v >= 128 else 0)


def png_bytes(image) -> bytes:
    """A PIL image, or a uint8 array (H, W) or (H, W, 3), encoded as PNG."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(np.ascontiguousarray(image))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


@DATAMODULES.register("imagefolder")
class ImageFolderDataModule(ShardDataModule):
    """An ImageNet-style tree `root/<class>/<image>`, local or `s3://bucket/prefix`."""

    required = ("root",)

    @classmethod
    def raw_samples(cls, data_cfg, seed: int) -> tuple[list[str], Iterator[RawSample]]:
        store, base = split_uri(data_cfg.root)
        files = _tree(store, base, data_cfg.root)
        classes = sorted({c for c, _ in files if c is not None})
        if not classes:
            raise ValueError(
                f"no class folders under {data_cfg.root}: expected root/<class>/<image> "
                "(an ImageNet-style ImageFolder tree)"
            )
        parts = [(None, store, _subsample(files, data_cfg.max_per_class, seed))]
        if data_cfg.test_root:
            test_store, test_base = split_uri(data_cfg.test_root)
            parts.append(("test", test_store, _tree(test_store, test_base, data_cfg.test_root)))

        def gen() -> Iterator[RawSample]:
            for split, st, items in parts:
                for cls_name, key in items:
                    yield RawSample(
                        source=st.uri(key),
                        label=classes.index(cls_name) if cls_name in classes else None,
                        read=lambda st=st, key=key: st.get_bytes(key),
                        ext=image_ext(key),
                        split=split,
                    )

        return classes, gen()


def image_ext(key: str) -> str:
    """The shard extension for a file name: lower case, `jpeg` as `jpg`."""
    ext = key.rsplit(".", 1)[-1].lower() if "." in key else ""
    return "jpg" if ext == "jpeg" else ext


def _tree(store: ArtifactStore, base: str, shown: str) -> list[tuple[str | None, str]]:
    """(class or None, key) for every file under base; files outside a class folder get None."""
    keys = store.list(base)
    if not keys:
        raise FileNotFoundError(f"no files under {shown}")
    out = []
    for key in keys:
        rel = key[len(base) :].strip("/").split("/")
        if rel[-1].startswith("."):
            continue  # hidden files (.DS_Store, editor droppings) are not samples
        out.append((rel[0] if len(rel) == 2 else None, key))
    return out


def _subsample(files, max_per_class: int | None, seed: int):
    if not max_per_class:
        return files
    rng = np.random.default_rng(seed)
    by_class: dict[str | None, list] = {}
    for item in files:
        by_class.setdefault(item[0], []).append(item)
    out = []
    for items in by_class.values():
        keep = rng.permutation(len(items))[:max_per_class]
        out.extend(items[i] for i in sorted(keep))
    return out


__all__ = ["IMAGE_EXTS", "RawSample", "ShardDataModule"]
