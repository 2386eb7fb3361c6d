"""MLflow tracking: one MLflow run per visionflow run id, shared by all of its steps.

Each step finds the run by its `visionflow.run_id` tag (or creates it), so the steps of one
pipeline run, in separate processes or pods, log into one place; a rerun resumes the same run.
"""

from __future__ import annotations

import os
import platform
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from visionflow.retry import TransientError

RUN_TAG = "visionflow.run_id"

# A server that is down should fail a step in seconds, not after minutes of retries.
# (MLflow's defaults retry a dead server for about four minutes.)
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
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
    if found:
        return found[0].info.run_id
    run = client.create_run(experiment_id, run_name=cfg.run_id, tags={RUN_TAG: cfg.run_id})
    return run.info.run_id


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
