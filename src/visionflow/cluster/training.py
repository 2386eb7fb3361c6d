"""The train step on a cluster: submit a PyTorchJob, follow it, return what rank 0 recorded."""

from __future__ import annotations

import logging
import os

from visionflow.cluster.pytorchjob import build_pytorchjob, validate_job
from visionflow.core.config import ConfigError
from visionflow.runs import load_step
from visionflow.storage import open_store

log = logging.getLogger("visionflow.cluster")
LAUNCHERS = ("auto", "local", "pytorchjob")


def use_pytorchjob(cfg) -> bool:
    """`auto` means: a PyTorchJob when this process runs in Kubernetes (a KFP step's pod)."""
    launcher = cfg.cluster.launcher
    if launcher not in LAUNCHERS:
        raise ConfigError(
            f"cluster.launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}"
        )
    return launcher == "pytorchjob" or (
        launcher == "auto" and "KUBERNETES_SERVICE_HOST" in os.environ
    )


def train_on_cluster(cfg, overrides: list[str], timeout_s: float | None = None):
    """Run training as a PyTorchJob and return rank 0's TrainResult from the artifact store."""
    from visionflow.cluster.launcher import launch
    from visionflow.steps.train import TrainResult

    job = build_pytorchjob(cfg, overrides)
    validate_job(job)
    secrets = [cfg.cluster.s3_secret]  # the MLflow one is optional (a server may need no login)
    log.info(
        "training run %s as PyTorchJob %s/%s",
        cfg.run_id,
        job["metadata"]["namespace"],
        job["metadata"]["name"],
    )
    launch(
        job, timeout_s=timeout_s or cfg.cluster.active_deadline_seconds, required_secrets=secrets
    )
    record = load_step(open_store(cfg.storage.root, cfg.storage.endpoint), cfg.run_id, "train")
    return TrainResult(**record)
