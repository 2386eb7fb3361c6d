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
from visionflow.core.config import ConfigError, check_call, to_container
from visionflow.core.contracts import model_params
from visionflow.core.registry import CALLBACKS, UnknownNameError


def check_options(cfg: DictConfig) -> None:
    """Check the registered options a config names (model, transforms, callbacks) by name and
    key, and the optimize step's values, without its data: what `visionflow config` checks
    beyond the `_target_` blocks that `load_config` binds. Raises ConfigError naming the key."""
    task = task_of(cfg)
    model_params(to_container(cfg.model))
    build_transforms(cfg, task)
    batch_augment(cfg, task)
    build_batch_transform(cfg, task, num_classes=2)  # any count: this checks names and options
    for key, entry in (plain(cfg.callbacks) or {}).items():
        if entry and "_target_" not in entry:
            name = entry.get("name")
            try:
                factory = CALLBACKS.get(name)
            except UnknownNameError as err:
                raise ConfigError(f"callbacks.{key}: {err}") from None
            options = {k: v for k, v in entry.items() if k != "name"}
            check_call(factory, options, f"callbacks.{key}", name)
    check_optimize(cfg)


OPTIMIZE_METHODS = ("none", "prune")


def check_optimize(cfg: DictConfig) -> None:
    """`optimize.*` values that cannot work (steps/optimize.py), named before any work."""
    o = cfg.optimize
    if o.method not in OPTIMIZE_METHODS:
        raise ConfigError(
            f"optimize.method={o.method!r}: choose one of {', '.join(OPTIMIZE_METHODS)}"
        )
    if o.method == "none":
        return
    if task_of(cfg) != "classification":
        raise ConfigError(
            f"optimize={o.method} prunes classifiers; the model is for {task_of(cfg)}"
        )
    if not 0 < o.target_macs < 1:
        raise ConfigError(f"optimize.target_macs={o.target_macs}: a share in (0, 1) of the MACs")
    if o.epochs < 1:
        raise ConfigError(f"optimize.epochs={o.epochs}: a pruned network needs fine-tuning")


def validate(cfg: DictConfig) -> None:
    """Check the parts a config names (model, data, transforms, callbacks) before any work.

    Raises ConfigError naming the key; builds nothing heavier than the transforms.
    """
    check_options(cfg)
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
