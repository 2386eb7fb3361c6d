"""Training metrics to MLflow without stalling training when the tracking server is away."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_only

from visionflow.background import BackgroundQueue

MAX_PENDING_METRICS = 1000  # batches of metrics waiting for the tracking server


class BackgroundMLFlowLogger(MLFlowLogger):
    """Lightning's MLFlowLogger, sending metrics from a background thread (at most
    MAX_PENDING_METRICS batches wait): an MLflow outage no longer stalls training.

    Each batch keeps the time it was logged at. `finalize` (the end of `Trainer.fit`) waits for
    them all and fails the run naming what could not be logged. visionflow's metric names are
    plain (`train/loss`, `val/acc`): none of Lightning's renaming or prefixing is needed.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sender = BackgroundQueue("MLflow metric logging", MAX_PENDING_METRICS)

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now, step = int(time.time() * 1000), step or 0
        batch = [Metric(key, float(value), now, step) for key, value in metrics.items()]
        client, run_id = self.experiment, self.run_id
        self.sender.submit(
            f"logging {', '.join(metrics)} at step {step} to run {run_id}",
            lambda: client.log_batch(run_id, metrics=batch),
        )

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        self.sender.flush()  # (raises only if training itself succeeded)
        super().finalize(status)
