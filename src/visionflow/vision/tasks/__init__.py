"""What differs between classification, detection and segmentation after training.

The evaluate, export, quantize and register steps are the same for every task; the `Task`
interface (tasks/base.py) says what differs, and `get_task(spec["task"])` picks the
implementation.
"""

from __future__ import annotations

from visionflow.core.config import ConfigError
from visionflow.vision.tasks.base import DenseTask, Scores, Task
from visionflow.vision.tasks.classification import ClassificationTask
from visionflow.vision.tasks.detection import DetectionTask
from visionflow.vision.tasks.segmentation import SegmentationTask

__all__ = ["TASKS", "DenseTask", "Scores", "Task", "get_task"]

TASKS: dict[str, Task] = {
    t.name: t for t in (ClassificationTask(), DetectionTask(), SegmentationTask())
}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise ConfigError(f"unknown task {name!r}; available: {', '.join(TASKS)}")
    return TASKS[name]
