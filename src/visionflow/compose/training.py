"""The training side of a run: callbacks and the Lightning Trainer (the train step's alone)."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.plugins.environments import KubeflowEnvironment
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import DictConfig

import visionflow.callbacks  # noqa: F401  (fills the CALLBACKS registry)
from visionflow.compose import plain
from visionflow.compose.data import build_batch_transform
from visionflow.core.config import ConfigError, to_container
from visionflow.core.registry import CALLBACKS, UnknownNameError
from visionflow.vision.modules import MODULES


def build_module(cfg: DictConfig, net, spec: dict[str, Any]) -> pl.LightningModule:
    """The task's LightningModule (the spec's task) around `net`, with `optim` and the `train.*`
    options; classification gets the batch transform (MixUp/CutMix) of `transforms.batch`."""
    task = spec["task"]
    options = to_container(cfg.train)
    options.pop("checkpoint_every_n_steps")  # the Trainer's, not the module's
    if task == "classification":
        options["batch_transform"] = build_batch_transform(cfg, task, len(spec["classes"]))
    return MODULES[task](net, spec, to_container(cfg.optim), **options)


def build_callbacks(callbacks_cfg: Any) -> list[pl.Callback]:
    """Callbacks from config: `_target_` entries are instantiated, `name` entries looked up."""
    out = []
    for key, entry in (plain(callbacks_cfg) or {}).items():
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


BAR_REFRESH_STEPS = 10  # the step loss it shows changes every trainer.log_every_n_steps (10)


def progress_callback() -> pl.Callback:
    """A live bar on a terminal; plain log lines when output goes to a file or a pod log.

    The bar redraws every BAR_REFRESH_STEPS steps, not every step (Lightning's default): each
    redraw writes to the terminal, which a small network's step notices."""
    if sys.stderr.isatty():
        return TQDMProgressBar(refresh_rate=BAR_REFRESH_STEPS)
    return CALLBACKS.get("plain_progress")()


def cluster_environment() -> KubeflowEnvironment | None:
    """Lightning's KubeflowEnvironment in a PyTorchJob pod that runs one process.

    The Training Operator sets MASTER_ADDR, MASTER_PORT, WORLD_SIZE and RANK on each pod;
    Lightning does not detect that on its own. Under torchrun (TORCHELASTIC_RUN_ID) Lightning's
    own detection is right.
    """
    needed = ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK")
    if "TORCHELASTIC_RUN_ID" not in os.environ and all(k in os.environ for k in needed):
        return KubeflowEnvironment()
    return None


EPOCH_SYNC_ADVICE = (
    r"It is recommended to use `self\.log\(.*sync_dist=True\)` when logging on epoch level"
)


def build_trainer(
    cfg: DictConfig, callbacks: list[pl.Callback], logger=None, plugins=None
) -> pl.Trainer:
    args = {k: v for k, v in plain(cfg.trainer).items() if v is not None}
    # Epoch values are added up over the ranks before they are logged (vision/modules.py,
    # callbacks/telemetry.py): Lightning's advice to log them with sync_dist does not apply.
    warnings.filterwarnings("ignore", EPOCH_SYNC_ADVICE, PossibleUserWarning)
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
