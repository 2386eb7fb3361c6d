"""optimize: the optional step between train and evaluate/export that makes the network cheaper.

`optimize=prune` removes whole channels (vision/pruning.py) until the network costs
`optimize.target_macs` of its multiply-accumulates, then fine-tunes it for `optimize.epochs`
with the run's own module, data, optimizer and trainer settings, keeping the epoch with the best
validation metric. The pruned checkpoint goes to `checkpoints/<run_id>/pruned.ckpt`; evaluate,
export and quantize take it as they take train's (compose.models.load_network rebuilds it).

Before and after are measured side by side in this process: parameters, MACs of one image,
median milliseconds per batch of 64 on the CPU in ONNX Runtime (fp32, what serve and predict run;
calls alternating), and the task's main metric on the test split. They are logged to MLflow as
`optimize/...` metrics and recorded with the host's CPU.

Where it runs is train's choice (`cluster.launcher`, `optimize_anywhere`): in process, or, in the
pipeline's optimize step on Kubernetes, as a cluster job on the GPU nodes like training
(pytorchjob.JOB_STEPS), whose pods run `visionflow optimize`. Under DDP every rank prunes the
same checkpoint the same way (pruning is deterministic) and fine-tunes its share of the data;
rank 0 alone stores the pruned checkpoint, measures and records.
"""

from __future__ import annotations

import copy
import logging
import tempfile
from dataclasses import fields
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers.logger import DummyLogger
from omegaconf import OmegaConf
from torch import nn

from visionflow import tracking
from visionflow.cluster.training import run_on_cluster, use_pytorchjob
from visionflow.compose.data import build_datamodule
from visionflow.compose.models import load_network
from visionflow.compose.training import (
    build_callbacks,
    build_module,
    build_trainer,
    progress_callback,
)
from visionflow.compose.validation import check_optimize
from visionflow.core.config import ConfigError
from visionflow.host import describe_host, host_cpu
from visionflow.results import OptimizeResult
from visionflow.runs import save_step
from visionflow.sessions import ort_session
from visionflow.steps.evaluate import finite_outputs
from visionflow.steps.train import checkpoint_prefix
from visionflow.storage import ArtifactStore, open_store
from visionflow.vision.inference import bench
from visionflow.vision.pruning import macs_and_params, output_layers, prune_to_macs
from visionflow.vision.tasks import Task, get_task

log = logging.getLogger("visionflow.optimize")

BATCH = 64  # images per timed batch


def report_markdown(r: OptimizeResult) -> str:
    """Before and after, as Markdown (MLflow's optimize/report.md, the KFP report)."""
    rows = [
        ("parameters", f"{r.params_before:,}", f"{r.params_after:,}"),
        ("MACs per image", f"{r.macs_before:,}", f"{r.macs_after:,}"),
        (f"ms per batch of {BATCH} (ONNX Runtime)", f"{r.latency_ms_before:.2f}",
         f"{r.latency_ms_after:.2f}"),
        (f"test {r.metric}", f"{r.score_before:.4f}", f"{r.score_after:.4f}"),
    ]  # fmt: skip
    return "\n".join(
        [
            f"**Pruned to {r.macs_kept:.1%} of the MACs** (target {r.target_macs:.0%}) "
            f"and fine-tuned ({r.epochs} epochs): {r.speedup:.2f}x faster at batch "
            f"{BATCH} on {describe_host(r.host)}, {r.score_drop:.2f} points of "
            f"{r.metric} lost.",
            "",
            "| | before | after |",
            "|---|---|---|",
            *(f"| {name} | {before} | {after} |" for name, before, after in rows),
        ]
    )


def optimize_anywhere(
    cfg, overrides: list[str], dataset_id: str, checkpoint_uri: str
) -> OptimizeResult | None:
    """The optimize step where `cluster.launcher` says: here (see `optimize`), or as a cluster
    job whose pods run it under DDP, rank 0's result read from the run's record."""
    _check(cfg)  # before a job is launched for nothing
    if use_pytorchjob(cfg, step="optimize"):
        return run_on_cluster(
            cfg, overrides, dataset_id, step="optimize", checkpoint_uri=checkpoint_uri
        )
    return optimize(cfg, dataset_id, checkpoint_uri)


def _check(cfg) -> None:
    check_optimize(cfg)
    if cfg.optimize.method != "prune":
        raise ConfigError("optimize.method=none: there is nothing to run (choose optimize=prune)")


def optimize(cfg, dataset_id: str, checkpoint_uri: str) -> OptimizeResult | None:
    """Prune the checkpoint's network to `optimize.target_macs`, fine-tune it, measure both.

    None on the ranks other than 0 of a distributed fine-tuning: rank 0 measures and records.
    """
    _check(cfg)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    original, spec = load_network(checkpoint_uri, cfg.storage.endpoint)
    task = get_task(spec["task"])
    dm = build_datamodule(cfg, store, dataset_id, task.name)
    size = spec["image_size"]

    net = copy.deepcopy(original)
    shapes = prune_to_macs(
        net, size, cfg.optimize.target_macs, keep=output_layers(net, len(spec["classes"]))
    )
    # Absolute channel counts: a pruned checkpoint pruned again records the union.
    spec = {**spec, "pruned": {**spec.get("pruned", {}), **shapes}}
    pruned_uri = _fine_tune(cfg, net, spec, dm, store)
    if pruned_uri is None:
        return None
    pruned, _ = load_network(pruned_uri, cfg.storage.endpoint)

    (macs_before, params_before), (macs_after, params_after) = (
        macs_and_params(n, size) for n in (original, pruned)
    )
    batch = np.random.default_rng(0).random((BATCH, 3, size, size), dtype=np.float32)
    nets = {"before": original, "after": pruned}
    with tempfile.TemporaryDirectory() as tmp:
        sessions = {
            name: ort_session(task.export_onnx(n, Path(tmp) / f"{name}.onnx", size))
            for name, n in nets.items()
        }
        ms = bench(sessions, batch, cfg.optimize.bench_repeats)
    scores = {name: _test_score(task, n, name, dm) for name, n in nets.items()}
    result = OptimizeResult(
        checkpoint_uri=pruned_uri,
        method="prune",
        target_macs=cfg.optimize.target_macs,
        metric=task.metric,
        epochs=cfg.optimize.epochs,
        params_before=params_before,
        params_after=params_after,
        macs_before=macs_before,
        macs_after=macs_after,
        latency_ms_before=ms["before"],
        latency_ms_after=ms["after"],
        score_before=scores["before"],
        score_after=scores["after"],
        macs_kept=macs_after / macs_before,
        speedup=ms["before"] / ms["after"],
        score_drop=(scores["before"] - scores["after"]) * 100,
        host=host_cpu(),
    )
    _log_to_mlflow(cfg, result)
    save_step(store, cfg.run_id, "optimize", result)
    log.info(report_markdown(result).splitlines()[0].replace("**", ""))
    return result


def _fine_tune(cfg, net: nn.Module, spec: dict, dm, store: ArtifactStore) -> str | None:
    """Train the pruned network as the train step would, for `optimize.epochs`; store the epoch
    with the best validation metric as pruned.ckpt and return its URI (None on the ranks other
    than 0 of a distributed run: rank 0 saved the checkpoint, in its own pod).

    There is no resuming, and the curves are not logged: train's MLflow run has its own
    `train/loss` and `val/acc`; this step logs its before/after figures instead.
    """
    module = build_module(cfg, net.train(), spec)
    best = ModelCheckpoint(
        dirpath=Path(cfg.workdir) / "runs" / cfg.run_id / "optimize", filename="pruned",
        monitor=module.monitor, mode=module.mode, save_top_k=1, save_weights_only=True,
        enable_version_counter=False,
    )  # fmt: skip
    tuning = OmegaConf.merge(cfg, {"trainer": {"max_epochs": cfg.optimize.epochs}})
    callbacks = [best, progress_callback(), *build_callbacks(cfg.callbacks)]
    # A logger that does nothing, for callbacks that insist on one (LearningRateMonitor).
    trainer = build_trainer(tuning, callbacks, logger=DummyLogger())
    trainer.fit(module, datamodule=dm)
    if torch.distributed.is_initialized():
        # What follows is rank 0's alone: leave the process group, or torchmetrics' compute in
        # the test scores would wait for ranks that have ended (it syncs whenever one exists).
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return None
    key = f"{checkpoint_prefix(cfg.run_id)}/pruned.ckpt"
    return store.put_file(Path(best.best_model_path), key)


def _test_score(task: Task, net: nn.Module, name: str, dm) -> float:
    predict = finite_outputs(task.torch_predictor(net), f"the {name} network")
    return task.evaluate(predict, dm.test_dataloader(), dm.classes)[0].score


def _log_to_mlflow(cfg, result: OptimizeResult) -> None:
    import mlflow

    run_id = tracking.run_for(cfg)
    client = mlflow.MlflowClient()
    for f in fields(result):
        value = getattr(result, f.name)
        if isinstance(value, int | float):
            client.log_metric(run_id, f"optimize/{f.name}", float(value))
    client.log_text(run_id, report_markdown(result), "optimize/report.md")
