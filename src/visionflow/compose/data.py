"""The data side of a run: transforms and the DataModule over a prepared dataset."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from omegaconf import DictConfig

import visionflow.vision.data  # noqa: F401  (fills the DATAMODULES registry)
from visionflow.compose import plain
from visionflow.core.config import ConfigError
from visionflow.core.registry import DATAMODULES, UnknownNameError
from visionflow.storage import ArtifactStore
from visionflow.vision.data.cached import BatchAugment, batch_augment_from, check_cache_mode
from visionflow.vision.tasks import get_task
from visionflow.vision.transforms import batch, build_transform


def build_transforms(cfg: DictConfig, task: str = "classification"):
    size = cfg.data.image_size
    train = build_transform(plain(cfg.transforms.train), size, "transforms.train", task=task)
    evaluate = build_transform(plain(cfg.transforms.eval), size, "transforms.eval", task=task)
    return train, evaluate


def build_batch_transform(cfg: DictConfig, task: str, num_classes: int):
    """MixUp/CutMix from `transforms.batch` (classification only), or None."""
    steps = plain(cfg.transforms.batch)
    batch.check_batch_transforms(steps, task, "transforms.batch")
    return batch.build_batch_transform(steps, num_classes, "transforms.batch")


def datamodule_class(name: str):
    try:
        return DATAMODULES.get(name)
    except UnknownNameError as err:
        raise ConfigError(f"data.name: {err}") from None


def batch_augment(cfg: DictConfig, task: str = "classification") -> BatchAugment | None:
    """`transforms.train` as whole-batch operations, or None.

    `data.cache` memory|gpu needs them (see cached.py). The shard path (none) takes them for
    classification steps `[resize, random_crop, horizontal_flip]` (the last two optional, each
    once): the same pixels as those steps per sample, from each sample's own draws, at a
    fraction of the cost; any other steps run per sample.
    """
    steps = plain(cfg.transforms.train)
    if check_cache_mode(cfg.data.cache) == "none":
        names = [step.get("name") for step in steps]
        if task != "classification" or names[:1] != ["resize"] or len(set(names)) < len(names):
            return None
        try:
            augment = batch_augment_from(steps, "transforms.train")
        except ConfigError:
            return None  # a step without a batched version
        return replace(augment, resize=cfg.data.image_size)
    if task != "classification":
        raise ConfigError(
            f"data.cache={cfg.data.cache} serves classification batches only; the model is "
            f"for {task}: use data.cache=none"
        )
    batch_augment_from(plain(cfg.transforms.eval), "transforms.eval")  # only resize there
    return batch_augment_from(steps, "transforms.train")


def build_datamodule(cfg: DictConfig, store: ArtifactStore, dataset_id: str, task: str):
    """The run's DataModule over a prepared dataset, serving targets for `task`: the config's
    model's when training (`compose.models.task_of`), the checkpoint's after."""
    train_tf, eval_tf = build_transforms(cfg, task)
    return datamodule_class(cfg.data.name)(
        store=store,
        dataset_id=dataset_id,
        cache_dir=Path(cfg.workdir) / "cache" / "datasets",
        train_transform=train_tf,
        eval_transform=eval_tf,
        batch_size=cfg.data.batch_size,
        num_workers=cfg.data.num_workers,
        cache=cfg.data.cache,
        batch_augment=batch_augment(cfg, task),
        seed=cfg.seed,
        task=task,
        collate_fn=get_task(task).collate(),
    )
