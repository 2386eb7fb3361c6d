"""A step's training on a cluster (train's, or optimize's fine-tuning): submit a PyTorchJob or a
TrainJob that runs the step, follow it, return what rank 0 recorded."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

from visionflow.cluster import launcher
from visionflow.cluster.pytorchjob import (
    KFP_STEP_ENV,
    POD_NAME_ENV,
    POD_UID_ENV,
    SITE_ENV,
    build_pytorchjob,
    check_job_step,
    step_owner,
    validate_job,
)
from visionflow.cluster.trainjob import build_trainjob, validate_trainjob
from visionflow.core.config import ConfigError
from visionflow.runs import load_result
from visionflow.storage import open_store

log = logging.getLogger("visionflow.cluster")
LAUNCHERS = ("auto", "local", "pytorchjob")
APIS = ("pytorchjob", "trainjob")


def use_pytorchjob(cfg, environ: Mapping[str, str] | None = None, step: str = "train") -> bool:
    """Whether `step` (train, or optimize's fine-tuning) launches a cluster job (of the kind
    cluster.api selects).

    `pytorchjob`: always (from a laptop too: the kubeconfig says where). `local`: never.
    `auto`: only inside that step of the compiled pipeline, that is with both
    $VISIONFLOW_KFP_STEP=<step> (the pipeline sets it on the train and optimize tasks alone) and
    $KUBERNETES_SERVICE_HOST (set in every pod): a notebook or any other pod in the cluster has
    only the latter, and trains in process.
    """
    check_job_step(step)
    launcher = cfg.cluster.launcher
    if launcher not in LAUNCHERS:
        raise ConfigError(
            f"cluster.launcher must be one of {', '.join(LAUNCHERS)}, got {launcher!r}"
        )
    env = os.environ if environ is None else environ
    in_pipeline_step = env.get(KFP_STEP_ENV) == step and bool(env.get("KUBERNETES_SERVICE_HOST"))
    return launcher == "pytorchjob" or (launcher == "auto" and in_pipeline_step)


def build_job(
    cfg,
    overrides: list[str],
    owner: dict[str, Any] | None = None,
    dataset_id: str | None = None,
    *,
    step: str = "train",
    checkpoint_uri: str | None = None,
) -> dict[str, Any]:
    """The validated manifest of the job cluster.api selects (PyTorchJob or TrainJob); its pods
    run `step` (train, or optimize on `checkpoint_uri`) on `dataset_id` (None: the run's
    prepared dataset, from its record)."""
    api = cfg.cluster.api
    what = {"step": step, "checkpoint_uri": checkpoint_uri}
    if api == "pytorchjob":
        job = build_pytorchjob(cfg, overrides, owner, dataset_id, **what)
        validate_job(job)
    elif api == "trainjob":
        job = build_trainjob(cfg, overrides, owner, dataset_id, **what)
        validate_trainjob(job)
    else:
        raise ConfigError(
            f"cluster.api must be one of {', '.join(APIS)}, got {api!r}: pytorchjob for the "
            "Kubeflow Training Operator (kubeflow.org/v1), trainjob for Kubeflow Trainer v2"
        )
    return job


def run_on_cluster(
    cfg,
    overrides: list[str],
    dataset_id: str,
    *,
    step: str = "train",
    checkpoint_uri: str | None = None,
    timeout_s: float | None = None,
):
    """Run `step` (train, or optimize on `checkpoint_uri`) on `dataset_id` as a cluster job;
    rank 0's result (TrainResult, OptimizeResult) from the run's record of the step."""
    owner = step_owner()
    job = build_job(cfg, overrides, owner, dataset_id, step=step, checkpoint_uri=checkpoint_uri)
    kind, meta = job["kind"], job["metadata"]
    if owner is None:
        log.info(
            "no ownerReference on %s %s: $%s and $%s are not both set (they are inside the "
            "pipeline's train and optimize steps), so the job is not deleted with a run; %s",
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
        "%s of run %s as %s %s/%s",
        "training" if step == "train" else f"{step}'s fine-tuning",
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
    return load_result(open_store(cfg.storage.root, cfg.storage.endpoint), cfg.run_id, step)
