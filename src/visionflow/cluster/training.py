"""The train step on a cluster: submit a PyTorchJob or a TrainJob, follow it, return what rank 0
recorded."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from visionflow.cluster import launcher
from visionflow.cluster.pytorchjob import (
    POD_NAME_ENV,
    POD_UID_ENV,
    SITE_ENV,
    build_pytorchjob,
    step_owner,
    validate_job,
)
from visionflow.cluster.trainjob import build_trainjob, validate_trainjob
from visionflow.core.config import ConfigError
from visionflow.results import TrainResult
from visionflow.runs import load_result
from visionflow.storage import open_store

log = logging.getLogger("visionflow.cluster")
LAUNCHERS = ("auto", "local", "pytorchjob")
APIS = ("pytorchjob", "trainjob")
# Set by the compiled pipeline on its train task (visionflow.kfp.pipeline.KFP_STEP_MARKER).
KFP_STEP_ENV, KFP_TRAIN_STEP = "VISIONFLOW_KFP_STEP", "train"


def use_pytorchjob(cfg, environ: Mapping[str, str] | None = None) -> bool:
    """Whether the train step launches a cluster job (of the kind cluster.api selects).

    `pytorchjob`: always (from a laptop too: the kubeconfig says where). `local`: never.
    `auto`: only inside the compiled pipeline's train step, that is with both
    $VISIONFLOW_KFP_STEP=train (the pipeline sets it on that task alone) and
    $KUBERNETES_SERVICE_HOST (set in every pod): a notebook or any other pod in the cluster has
    only the latter, and trains in process.
    """
    launcher = cfg.cluster.launcher
    if launcher not in LAUNCHERS:
        raise ConfigError(
            f"cluster.launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}"
        )
    env = os.environ if environ is None else environ
    in_pipeline_step = env.get(KFP_STEP_ENV) == KFP_TRAIN_STEP and bool(
        env.get("KUBERNETES_SERVICE_HOST")
    )
    return launcher == "pytorchjob" or (launcher == "auto" and in_pipeline_step)


def build_job(
    cfg, overrides: list[str], owner: dict[str, Any] | None = None, dataset_id: str | None = None
) -> dict[str, Any]:
    """The validated manifest of the job cluster.api selects (PyTorchJob or TrainJob); its pods
    train on `dataset_id` (None: the run's prepared dataset, from its record)."""
    api = cfg.cluster.api
    if api == "pytorchjob":
        job = build_pytorchjob(cfg, overrides, owner, dataset_id)
        validate_job(job)
    elif api == "trainjob":
        job = build_trainjob(cfg, overrides, owner, dataset_id)
        validate_trainjob(job)
    else:
        raise ConfigError(
            f"cluster.api must be one of {', '.join(APIS)}, got {api!r}: pytorchjob for the "
            "Kubeflow Training Operator (kubeflow.org/v1), trainjob for Kubeflow Trainer v2"
        )
    return job


def train_on_cluster(
    cfg, overrides: list[str], dataset_id: str, timeout_s: float | None = None
) -> TrainResult:
    """Run training on `dataset_id` as a cluster job; rank 0's TrainResult from its record."""
    owner = step_owner()
    job = build_job(cfg, overrides, owner, dataset_id)
    kind, meta = job["kind"], job["metadata"]
    if owner is None:
        log.info(
            "no ownerReference on %s %s: $%s and $%s are not both set (they are inside the "
            "pipeline's train step), so the job is not deleted with a run; %s",
            kind, meta["name"], POD_NAME_ENV, POD_UID_ENV,
            "its TTL (cluster.ttl_seconds_after_finished) removes it once finished"
            if kind == "PyTorchJob" and cfg.cluster.ttl_seconds_after_finished is not None
            else f"delete it when done: kubectl delete {kind.lower()} {meta['name']}",
        )  # fmt: skip
    if os.environ.get(SITE_ENV) and not cfg.cluster.site_config_map:
        log.warning(
            "this step reads the site config $%s, but cluster.site_config_map is unset: the "
            "training pods get none, only the command line's overrides", SITE_ENV,
        )  # fmt: skip
    secrets = [cfg.cluster.s3_secret]  # the MLflow one is optional (a server may need no login)
    log.info(
        "training run %s as %s %s/%s",
        cfg.run_id,
        kind,
        meta.get("namespace", "(this pod's namespace)"),
        meta["name"],
    )
    launcher.launch(
        job,
        timeout_s=timeout_s or cfg.cluster.active_deadline_seconds,
        required_secrets=secrets,
        pending_timeout_s=cfg.cluster.pending_timeout_s or None,
    )
    return load_result(open_store(cfg.storage.root, cfg.storage.endpoint), cfg.run_id, "train")
