"""MLflow tracking: one MLflow run per visionflow run id, shared by all of its steps.

Each step finds the run by its `visionflow.run_id` tag (or creates it), so the steps of one
pipeline run, in separate processes or pods, log into one place; a rerun resumes the same run.
A run of a sweep (`sweep.id`) is a child (`mlflow.parentRunId`) of the sweep's parent run, found
or created by its `visionflow.sweep_id` tag: no coordinator, wherever the runs start.
"""

from __future__ import annotations

import contextlib
import os
import platform
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from visionflow.retry import TransientError, mlflow_http_env

RUN_TAG = "visionflow.run_id"
SWEEP_TAG = "visionflow.sweep_id"  # on a sweep's parent run and on each of its runs
SWEEP_PARENT_TAG = "visionflow.sweep_parent"  # "true" on the parent only
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own: the UI nests a run under this one
SWEEP_SETTLE_S = 0.5  # after creating a parent: time for one created elsewhere to show

# MLflow's own HTTP client retries every MLflow call, by visionflow's one policy (retry.py); a
# server that does not answer at all when a step starts fails it at once (check_reachable).
for _name, _value in mlflow_http_env().items():
    os.environ.setdefault(_name, _value)
# Nothing leaves the machine unasked, and no "View run" banners in step logs.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")


class TrackingError(TransientError):
    """The tracking server does not answer (it may later: steps retry this)."""


def check_reachable(uri: str, timeout: float = 5.0) -> None:
    """For an HTTP tracking URI, fail now with a clear message if the server does not answer."""
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout) as resp:
            resp.read()
    except (urllib.error.URLError, OSError) as err:
        reason = getattr(err, "reason", err)
        raise TrackingError(
            f"MLflow tracking server {uri} is unreachable ({reason}); start it or fix tracking.uri"
        ) from None


def setup(cfg) -> str:
    """Point MLflow at the configured server and experiment; returns the experiment id."""
    import mlflow

    uri = cfg.tracking.uri
    check_reachable(uri)
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    if exp is not None:
        return exp.experiment_id
    location = None
    if not uri.startswith(("http://", "https://")):
        # Without a server, artifacts go beside the database instead of ./mlruns in the cwd.
        location = (Path(cfg.workdir) / "mlflow-artifacts").resolve().as_uri()
    try:
        return client.create_experiment(cfg.tracking.experiment, artifact_location=location)
    except mlflow.exceptions.MlflowException:
        # Another process created it first.
        return client.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def run_for(cfg) -> str:
    """The MLflow run id of this visionflow run, creating the run on first use."""
    import mlflow

    experiment_id = setup(cfg)
    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id], filter_string=f"tags.`{RUN_TAG}` = '{cfg.run_id}'", max_results=1
    )
    sweep_id = cfg.get("sweep", {}).get("id")
    tags = {RUN_TAG: cfg.run_id}
    if sweep_id:
        tags.update({SWEEP_TAG: sweep_id, PARENT_TAG: sweep_parent(experiment_id, sweep_id)})
    if found:  # (re)linked to the sweep's parent: the one that won a race may have changed
        run = found[0]
        for key, value in tags.items():
            if run.data.tags.get(key) != value:
                client.set_tag(run.info.run_id, key, value)
        return run.info.run_id
    run = client.create_run(experiment_id, run_name=cfg.run_id, tags=tags)
    return run.info.run_id


def sweep_parent(experiment_id: str, sweep_id: str) -> str:
    """The id of the sweep's parent run in the experiment, creating it on first use.

    Runs of one sweep may start at once in different pods. A creator looks again after creating;
    the oldest parent (by start time, then id) wins and the others are deleted, so all agree on
    one; a run linked to a deleted parent is relinked when its next step calls run_for.
    """
    import mlflow

    if not sweep_id or any(c in sweep_id for c in "'\\\""):
        raise ValueError(f"sweep.id {sweep_id!r} cannot name a sweep: no quotes or backslashes")
    client = mlflow.MlflowClient()
    found = _sweep_parents(client, experiment_id, sweep_id)
    if not found:
        tags = {SWEEP_TAG: sweep_id, SWEEP_PARENT_TAG: "true"}
        created = client.create_run(experiment_id, run_name=sweep_id, tags=tags)
        client.set_terminated(created.info.run_id)  # a grouping, with no work of its own
        time.sleep(SWEEP_SETTLE_S)
        found = _sweep_parents(client, experiment_id, sweep_id) or [created]
    for extra in found[1:]:  # (another run of the sweep may have deleted it meanwhile)
        with contextlib.suppress(mlflow.exceptions.MlflowException):
            client.delete_run(extra.info.run_id)
    return found[0].info.run_id


def _sweep_parents(client, experiment_id: str, sweep_id: str) -> list:
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{SWEEP_TAG}` = '{sweep_id}' AND tags.`{SWEEP_PARENT_TAG}` = 'true'",
        max_results=100,
    )
    return sorted(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def system_info() -> dict[str, Any]:
    import lightning
    import torch

    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "lightning": lightning.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info
