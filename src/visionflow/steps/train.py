"""train: Lightning training from prepare's shards, with checkpoints in the artifact store.

Checkpoints (`last.ckpt` every epoch and every `train.checkpoint_every_n_steps` optimizer steps,
`best.ckpt` by the task's validation metric) are written locally and copied to
`checkpoints/<run_id>/` in the store by a background thread as soon as they are saved (by rank 0;
each copy replaces the stored file only once complete, so a kill mid-upload leaves the previous
one), and all of them before the step ends. Rerunning with the same run id downloads `last.ckpt`
and continues from its step, mid-epoch if it was saved there: the rest of that epoch's batches in
the same order, optimizer, LR schedule and step count as they were (`vision/data/resumable.py`).
A `last.ckpt` that fails its checksum or does not load is skipped with a warning, for the one it
replaced (`last-prev.ckpt`), then `best.ckpt`.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from visionflow import tracking
from visionflow.callbacks.background_logger import BackgroundMLFlowLogger
from visionflow.callbacks.checkpointing import (
    BEST,
    LAST,
    PREVIOUS,
    StoreCheckpointIO,
    step_checkpoints,
)
from visionflow.cluster.training import run_on_cluster, use_pytorchjob
from visionflow.compose.data import build_datamodule
from visionflow.compose.models import build_model, task_of
from visionflow.compose.training import (
    build_callbacks,
    build_module,
    build_trainer,
    progress_callback,
)
from visionflow.core.config import flatten, to_container
from visionflow.core.contracts import check_classifier, check_datamodule
from visionflow.results import TrainResult
from visionflow.runs import save_step
from visionflow.storage import ArtifactStore, ChecksumError, StorageError, open_store

log = logging.getLogger("visionflow.train")


def checkpoint_prefix(run_id: str) -> str:
    return f"checkpoints/{run_id}"


def train(cfg, dataset_id: str) -> TrainResult:
    """Train on the prepared dataset `dataset_id`; resume if the run has a checkpoint."""
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    task = task_of(cfg)  # the model's; from here on, the checkpoint's spec says it
    dm = build_datamodule(cfg, store, dataset_id, task)
    check_datamodule(dm, task)
    net = build_model(cfg.model, num_classes=len(dm.classes), image_size=dm.image_size)
    if task == "classification":
        check_classifier(net, len(dm.classes), dm.image_size)
    spec = {
        "task": task,
        "model": to_container(cfg.model),
        "classes": dm.classes,
        "image_size": dm.image_size,
        "dataset_id": dataset_id,
        "run_id": cfg.run_id,
    }
    module = build_module(cfg, net, spec)

    prefix = checkpoint_prefix(cfg.run_id)
    local_dir = Path(cfg.workdir) / "runs" / cfg.run_id / "checkpoints"
    resume_from, saved = _resume_point(store, prefix, local_dir)
    resumed_step = None
    if resume_from is not None:
        resumed_step = int(saved["global_step"])
        log.info(
            "resuming run %s from %s at step %d%s",
            cfg.run_id,
            store.uri(f"{prefix}/{resume_from.name}"),
            resumed_step,
            _epoch_position(saved, dm),
        )
        del saved

    # Only rank 0 talks to MLflow: other ranks would race to create the run.
    # (Even creating an MLflow client opens the store: with sqlite, two ranks would both migrate it.)
    # Other ranks get a logger that does nothing, for callbacks that insist on one.
    from lightning.pytorch.loggers.logger import DummyLogger
    from lightning.pytorch.utilities import rank_zero_only

    mlflow_run_id, logger = "", DummyLogger()
    if rank_zero_only.rank == 0:
        mlflow_run_id = tracking.run_for(cfg)
        logger = BackgroundMLFlowLogger(
            tracking_uri=cfg.tracking.uri, run_id=mlflow_run_id, log_model=False
        )
    # Two callbacks: Lightning's save_last only writes when the monitored metric improves, and
    # resuming needs the newest state every epoch.
    checkpoint = ModelCheckpoint(
        dirpath=local_dir, filename="best", monitor=module.monitor, mode=module.mode, save_top_k=1,
        enable_version_counter=False,
    )  # fmt: skip
    latest = ModelCheckpoint(
        dirpath=local_dir, filename="last", save_top_k=1, enable_version_counter=False
    )
    callbacks = [checkpoint, latest, *step_checkpoints(local_dir, cfg.train.checkpoint_every_n_steps),
                 progress_callback(), *build_callbacks(cfg.callbacks)]  # fmt: skip
    trainer = build_trainer(cfg, callbacks, logger, plugins=[StoreCheckpointIO(store, prefix)])
    if mlflow_run_id:
        _log_run_info(logger, cfg)
    trainer.fit(
        module,
        datamodule=dm,
        ckpt_path=str(resume_from) if resume_from else None,
        weights_only=True,  # our own checkpoints hold tensors and plain values only
    )

    best = checkpoint.best_model_score
    result = TrainResult(
        checkpoint_uri=store.uri(f"{prefix}/best.ckpt"),
        last_checkpoint_uri=store.uri(f"{prefix}/last.ckpt"),
        monitor=module.monitor,
        best_score=float(best) if best is not None else float("nan"),
        global_step=trainer.global_step,
        epochs=trainer.current_epoch,
        resumed_from_step=resumed_step,
        mlflow_run_id=mlflow_run_id,
        spec=spec,
        final_metrics={k: float(v) for k, v in trainer.callback_metrics.items()},
        rank=trainer.global_rank,
        world_size=trainer.world_size,
    )
    if trainer.is_global_zero:
        save_step(store, cfg.run_id, "train", result)
    log.info(
        "trained: best %s %.4f at %s (step %d)",
        result.monitor,
        result.best_score,
        result.checkpoint_uri,
        result.global_step,
    )
    return result


def train_anywhere(cfg, overrides: list[str], dataset_id: str) -> TrainResult:
    """The train step where `cluster.launcher` says: here, or as a PyTorchJob on the cluster."""
    if use_pytorchjob(cfg):
        return run_on_cluster(cfg, overrides, dataset_id, step="train")
    return train(cfg, dataset_id)


def _resume_point(
    store: ArtifactStore, prefix: str, local_dir: Path
) -> tuple[Path | None, dict[str, Any]]:
    """(local copy, contents) of the newest intact checkpoint of the run, or (None, {}).

    Tries last.ckpt, then last-prev.ckpt, then best.ckpt, warning for each one that is corrupt.
    best.ckpt is fetched either way: resuming refers to it.
    """
    stored = [name for name in (LAST, PREVIOUS, BEST) if store.exists(f"{prefix}/{name}")]
    if not stored:
        return None, {}
    if BEST in stored and not _fetch(store, f"{prefix}/{BEST}", local_dir / BEST):
        stored.remove(BEST)
    for name in stored:
        local = local_dir / name
        if name != BEST and not _fetch(store, f"{prefix}/{name}", local):
            continue
        try:
            return local, torch.load(local, map_location="cpu", weights_only=True)
        except (RuntimeError, pickle.UnpicklingError, EOFError) as err:
            log.warning(
                "cannot resume from %s: it does not load (%s)", store.uri(f"{prefix}/{name}"), err
            )
    raise StorageError(
        f"no checkpoint of this run in {store.uri(prefix)} is intact: train under a new run_id"
    )


def _fetch(store: ArtifactStore, key: str, local: Path) -> bool:
    """Download `key` to `local`; False, with a warning, if the stored copy is corrupt."""
    try:
        store.get_file(key, local)
        return True
    except ChecksumError as err:
        log.warning("%s: not resuming from it", err)
        return False


def _epoch_position(checkpoint: dict[str, Any], dm) -> str:
    """' (epoch E, after batch B of N)' for a checkpoint saved mid-epoch, else ''."""
    state = checkpoint.get(type(dm).__qualname__, {}).get("train_batches")
    if not state or not 0 < state["batches"] < state["of"]:
        return ""
    return f" (epoch {state['epoch'] + 1}, after batch {state['batches']} of {state['of']})"


def _log_run_info(logger, cfg) -> None:
    resolved = to_container(cfg)
    client, run_id = logger.experiment, logger.run_id
    params = {k: str(v)[:500] for k, v in flatten(resolved).items() if k != "run_id"}
    existing = client.get_run(run_id).data.params
    logger.log_hyperparams({k: v for k, v in params.items() if k not in existing})
    client.log_dict(run_id, resolved, "config/resolved.yaml")
    client.log_dict(run_id, tracking.system_info(), "system/info.json")
