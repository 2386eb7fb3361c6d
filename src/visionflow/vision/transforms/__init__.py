"""Image transforms by name, over torchvision.transforms.v2.

A config lists steps as `{name: <registered>, <param>: <value>}`; `build_transform` turns the
list into one callable that ends in a float tensor in [0, 1]. Steps that need the target size
take an `image_size` argument, filled in from the data config.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torchvision.transforms import v2

from visionflow.core.config import ConfigError
from visionflow.core.registry import TRANSFORMS, UnknownNameError


@TRANSFORMS.register("resize")
def resize(image_size: int) -> Callable:
    return v2.Resize((image_size, image_size), antialias=True)


@TRANSFORMS.register("random_crop")
def random_crop(image_size: int, padding: int = 4) -> Callable:
    return v2.RandomCrop(image_size, padding=padding, padding_mode="reflect")


@TRANSFORMS.register("random_resized_crop")
def random_resized_crop(image_size: int, min_scale: float = 0.35) -> Callable:
    return v2.RandomResizedCrop(image_size, scale=(min_scale, 1.0), antialias=True)


@TRANSFORMS.register("horizontal_flip")
def horizontal_flip(p: float = 0.5) -> Callable:
    return v2.RandomHorizontalFlip(p)


@TRANSFORMS.register("color_jitter")
def color_jitter(
    brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.0
) -> Callable:
    return v2.ColorJitter(brightness, contrast, saturation, hue)


def build_transform(steps: Sequence[dict[str, Any]], image_size: int, where: str) -> Callable:
    """One callable for a list of named steps; bad names or parameters raise ConfigError."""
    ops: list[Callable] = [v2.ToImage()]
    for i, step in enumerate(steps):
        params = dict(step)
        name = params.pop("name", None)
        at = f"{where}[{i}]"
        if name is None:
            raise ConfigError(
                f"{at}: each transform needs a `name`; available: {TRANSFORMS.list()}"
            )
        try:
            factory = TRANSFORMS.get(name)
        except UnknownNameError as err:
            raise ConfigError(f"{at}: {err}") from None
        sig = inspect.signature(factory)
        if "image_size" in sig.parameters:
            params.setdefault("image_size", image_size)
        try:
            sig.bind(**params)
        except TypeError as err:
            accepted = [p for p in sig.parameters if p != "image_size"]
            raise ConfigError(f"{at} ({name}): {err}; accepted parameters: {accepted}") from None
        try:
            ops.append(factory(**params))
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{at} ({name}): {err}") from None
    ops.append(v2.ToDtype(torch.float32, scale=True))
    return v2.Compose(ops)
