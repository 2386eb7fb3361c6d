"""Logging for the CLI and components: plain timestamped lines, our steps at INFO."""

from __future__ import annotations

import logging
import os
import warnings

NOISY = (
    "alembic",
    "mlflow.store.db.utils",
    "mlflow.tracking",
    "urllib3",
    "lightning.pytorch.utilities.rank_zero",
)


def setup() -> None:
    logging.basicConfig(
        level=os.environ.get("VISIONFLOW_LOG_LEVEL", "INFO"),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        force=True,
    )
    for name in NOISY:
        logging.getLogger(name).setLevel(logging.WARNING)
    # Lightning's advice to add DataLoader workers (a PossibleUserWarning from its data
    # connector): the worker count is the data config's choice, and CPU-sized runs use none.
    warnings.filterwarnings(
        "ignore", ".*does not have many workers", UserWarning, "lightning.pytorch"
    )
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
