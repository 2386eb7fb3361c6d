"""Build the objects of a run from its config: model, transforms, datamodule, callbacks, trainer.

Hydra's `_target_` is used only for library classes (optimizers, schedulers, Lightning
callbacks); visionflow's own parts come from the registries by name.
"""

from __future__ import annotations

import inspect
import os
import sys
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

import visionflow.callbacks  # noqa: F401  (these imports fill the registries)
import visionflow.vision.data  # noqa: F401
import visionflow.vision.models  # noqa: F401
import visionflow.vision.transforms  # noqa: F401
from visionflow.core.config import ConfigError
from visionflow.core.contracts import model_params, model_task
from visionflow.core.registry import CALLBACKS, DATAMODULES, UnknownNameError
from visionflow.storage import ArtifactStore


def _plain(node: Any) -> Any:
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node


def build_model(model_cfg: Any, num_classes: int, image_size: int | None = None) -> nn.Module:
    """The registered network; a builder that takes `image_size` (e.g. ViT) gets the data's."""
    builder, params = model_params(_plain(model_cfg))
    if image_size is not None and "image_size" in inspect.signature(builder).parameters:
        params.setdefault("image_size", image_size)
    return builder(num_classes=num_classes, **params)


def build_transforms(cfg: DictConfig, task: str = "classification"):
    from visionflow.vision.transforms import build_transform

    size = cfg.data.image_size
    train = build_transform(_plain(cfg.transforms.train), size, "transforms.train", task=task)
    evaluate = build_transform(_plain(cfg.transforms.eval), size, "transforms.eval", task=task)
    return train, evaluate


def build_batch_transform(cfg: DictConfig, task: str, num_classes: int):
    """MixUp/CutMix from `transforms.batch` (classification only), or None."""
    from visionflow.vision.transforms.batch import build_batch_transform, check_batch_transforms

    steps = _plain(cfg.transforms.batch)
    check_batch_transforms(steps, task, "transforms.batch")
    return build_batch_transform(steps, num_classes, "transforms.batch")


def task_of(cfg: DictConfig) -> str:
    """The run's task, from its model (classification, detection or segmentation)."""
    return model_task(_plain(cfg.model))


def datamodule_class(name: str):
    try:
        return DATAMODULES.get(name)
    except UnknownNameError as err:
        raise ConfigError(f"data.name: {err}") from None


def batch_augment(cfg: DictConfig, task: str = "classification"):
    """The on-device augmentation for `data.cache` memory|gpu; None for the shard path."""
    from visionflow.vision.data.cached import batch_augment_from, check_cache_mode

    if check_cache_mode(cfg.data.cache) == "none":
        return None
    if task != "classification":
        raise ConfigError(
            f"data.cache={cfg.data.cache} serves classification batches only; the model is "
            f"for {task}: use data.cache=none"
        )
    batch_augment_from(_plain(cfg.transforms.eval), "transforms.eval")  # only resize there
    return batch_augment_from(_plain(cfg.transforms.train), "transforms.train")


def build_datamodule(cfg: DictConfig, store: ArtifactStore, dataset_id: str):
    """The run's DataModule over a prepared dataset, serving targets for the model's task."""
    from visionflow.vision.tasks import get_task

    task = task_of(cfg)
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


def build_callbacks(callbacks_cfg: Any) -> list[pl.Callback]:
    """Callbacks from config: `_target_` entries are instantiated, `name` entries looked up."""
    out = []
    for key, entry in (_plain(callbacks_cfg) or {}).items():
        if not entry:
            continue  # `callbacks.x: null` switches a default off
        entry = dict(entry)
        if "_target_" in entry:
            try:
                out.append(instantiate(entry))
            except InstantiationException as err:
                raise ConfigError(f"callbacks.{key}: {err}") from None
            continue
        name = entry.pop("name", None)
        try:
            cls = CALLBACKS.get(name)
        except UnknownNameError as err:
            raise ConfigError(f"callbacks.{key}: {err} (or give a Lightning `_target_`)") from None
        try:
            out.append(cls(**entry))
        except TypeError as err:
            raise ConfigError(f"callbacks.{key} ({name}): {err}") from None
    return out


def progress_callback() -> pl.Callback:
    """A live bar on a terminal; plain log lines when output goes to a file or a pod log."""
    if sys.stderr.isatty():
        from lightning.pytorch.callbacks import TQDMProgressBar

        return TQDMProgressBar()
    return CALLBACKS.get("plain_progress")()


def cluster_environment():
    """Lightning's KubeflowEnvironment in a PyTorchJob pod that runs one process.

    The Training Operator sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK on each pod;
    Lightning does not detect that on its own. Under torchrun (TORCHELASTIC_RUN_ID) Lightning's
    own detection is right.
    """
    from lightning.pytorch.plugins.environments import KubeflowEnvironment

    needed = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
    if "TORCHELASTIC_RUN_ID" not in os.environ and all(k in os.environ for k in needed):
        return KubeflowEnvironment()
    return None


def build_trainer(
    cfg: DictConfig, callbacks: list[pl.Callback], logger=None, plugins=None
) -> pl.Trainer:
    args = {k: v for k, v in _plain(cfg.trainer).items() if v is not None}
    plugins = list(plugins or [])
    if (env := cluster_environment()) is not None:
        plugins.append(env)
    return pl.Trainer(
        **args,
        callbacks=callbacks,
        logger=logger if logger is not None else False,
        plugins=plugins,
        default_root_dir=str(Path(cfg.workdir) / "lightning"),
        enable_model_summary=False,
    )


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
    for key, entry in (_plain(cfg.callbacks) or {}).items():
        if entry and "_target_" not in entry:
            try:
                CALLBACKS.get(entry.get("name"))
            except UnknownNameError as err:
                raise ConfigError(f"callbacks.{key}: {err}") from None
