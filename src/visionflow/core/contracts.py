"""What a model and a datamodule must offer, checked at run time before any work.

The Protocols document the shape; the `check_*` functions fail early with a message that says
what is wrong and how to fix it, instead of a shape error deep inside a training step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from visionflow.core.config import ConfigError, check_call
from visionflow.core.registry import MODELS, UnknownNameError

TASKS = ("classification", "detection", "segmentation")


@runtime_checkable
class ImageModel(Protocol):
    """A network mapping float images in [0, 1], (N, 3, H, W), to task outputs."""

    def __call__(self, images: torch.Tensor) -> Any: ...


@runtime_checkable
class VisionDataModule(Protocol):
    """A Lightning DataModule over a prepared dataset."""

    tasks: tuple[str, ...]
    classes: list[str]
    image_size: int

    def train_dataloader(self) -> Any: ...
    def val_dataloader(self) -> Any: ...
    def test_dataloader(self) -> Any: ...


def model_params(model_cfg: Mapping[str, Any]) -> tuple[Callable, dict[str, Any]]:
    """The builder for `model.name` and its keyword options, checked against its signature."""
    params = dict(model_cfg)
    name = params.pop("name", None)
    if not name:
        raise ConfigError(f"model.name is not set; available: {', '.join(MODELS.list())}")
    try:
        builder = MODELS.get(name)
    except UnknownNameError as err:
        raise ConfigError(f"model.name: {err}") from None
    if "num_classes" in params:
        raise ConfigError("model.num_classes is not an option: the dataset's classes set it")
    check_call(builder, params, "model", f"model {name!r}")
    return builder, params


def model_task(model_cfg: Mapping[str, Any]) -> str:
    """The task of the model a config names: its builder says (classification by default)."""
    builder, _ = model_params(model_cfg)
    return getattr(builder, "task", "classification")


def check_datamodule(dm: Any, task: str) -> None:
    if task not in TASKS:
        raise ConfigError(f"unknown task {task!r}; available: {', '.join(TASKS)}")
    if not isinstance(dm, VisionDataModule):
        raise TypeError(
            f"{type(dm).__name__} is not a visionflow DataModule (see core/contracts.py)"
        )
    if task not in dm.tasks:
        raise ConfigError(
            f"datamodule {type(dm).__name__} has no labels for {task}; it supports: {', '.join(dm.tasks)}"
        )
    if task == "classification" and len(dm.classes) < 2:
        raise ValueError(f"a classifier needs at least 2 classes, the dataset has {dm.classes}")


def check_classifier(model: torch.nn.Module, num_classes: int, image_size: int) -> None:
    """Run one tiny batch through the model and check the logits' shape."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.rand(2, 3, image_size, image_size))
    except Exception as err:
        raise ValueError(
            f"{type(model).__name__} fails on a (2, 3, {image_size}, {image_size}) batch: {err}; "
            "is data.image_size right for this model?"
        ) from err
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != (2, num_classes):
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(
            f"{type(model).__name__} returned {shape} for 2 images; a classifier for "
            f"{num_classes} classes must return logits of shape (2, {num_classes})"
        )
