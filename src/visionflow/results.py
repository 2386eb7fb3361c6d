"""What steps return, as typed records that the layers above them read without importing them.

A leaf: plain dataclasses. `cluster` rebuilds a TrainResult from rank 0's record in the store
(`runs.save_step`) without importing the training code that made it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class TrainResult:
    checkpoint_uri: str  # best checkpoint in the artifact store
    last_checkpoint_uri: str
    monitor: str  # the validation metric that chose the best checkpoint (val/acc, val/map, ...)
    best_score: float
    global_step: int
    epochs: int
    resumed_from_step: int | None
    mlflow_run_id: str
    spec: dict[str, Any]
    final_metrics: dict[str, float]  # the last epoch's logged values (the same on every rank)
    rank: int = 0
    world_size: int = 1
