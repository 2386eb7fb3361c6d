"""A run's config checked against the registries before any work."""

from __future__ import annotations

from omegaconf import DictConfig

import visionflow.callbacks  # noqa: F401  (fills the CALLBACKS registry)
from visionflow.compose import plain
from visionflow.compose.data import (
    batch_augment,
    build_batch_transform,
    build_transforms,
    datamodule_class,
)
from visionflow.compose.models import task_of
from visionflow.core.config import ConfigError
from visionflow.core.registry import CALLBACKS, UnknownNameError


def validate(cfg: DictConfig) -> None:
    """Check the parts a config names (model, data, transforms, callbacks) before any work.

    Raises ConfigError naming the key; builds nothing heavier than the transforms.
    """
    task = task_of(cfg)
    source = datamodule_class(cfg.data.name)
    if task not in source.tasks:
        raise ConfigError(
            f"model {cfg.model.name!r} is for {task}, but data={cfg.data.name} has labels for "
            f"{', '.join(source.tasks)} only"
        )
    for key in source.required:
        if cfg.data.get(key) in (None, ""):
            raise ConfigError(f"data={cfg.data.name} needs data.{key}: set it, e.g. data.{key}=...")
    build_transforms(cfg, task)
    batch_augment(cfg, task)
    build_batch_transform(cfg, task, num_classes=2)  # any count: this checks names and options
    for key, entry in (plain(cfg.callbacks) or {}).items():
        if entry and "_target_" not in entry:
            try:
                CALLBACKS.get(entry.get("name"))
            except UnknownNameError as err:
                raise ConfigError(f"callbacks.{key}: {err}") from None
