"""Image transforms by name, over torchvision.transforms.v2.

A config lists steps as `{name: <registered>, <param>: <value>}`; `build_transform` turns the
list into one callable that ends in a float32 tensor in [0, 1]. A sample is an image
(classification) or `(image, target)`: for detection `{"boxes": BoundingBoxes, "labels": ...}`,
for segmentation a `Mask` (0 background, k+1 for class k, 255 ignore). Geometric steps move
boxes and masks with the image; masks stay integer (nearest neighbour).

Rules a config can rely on:
- Steps that need the target size take `image_size`, filled in from the data config.
- Each step declares the tasks it supports; another task fails at config time. torchvision's
  AutoAugment family rejects boxes and masks, RandomErasing passes them through unchanged
  (labels on erased pixels), ElasticTransform only moves box corners (objects bulge out of
  their boxes) and RandomIoUCrop needs boxes: tests/unit/test_transforms.py holds the evidence.
- Pixels a geometric step invents (padding, rotation corners, zoom-out canvas) are 0 in the
  image and 255 (ignore) in a mask, as torchvision's segmentation references do.
- `random_erasing` works on float images: it runs after the conversion to float, wherever it
  is listed (after the other steps, in listed order).
- Detection pipelines end with `SanitizeBoundingBoxes`, which drops degenerate boxes and their
  labels.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import torch
from torchvision import tv_tensors
from torchvision.transforms import v2

from visionflow.core.config import ConfigError
from visionflow.core.registry import TRANSFORMS, Registry, UnknownNameError

TASKS = ("classification", "detection", "segmentation")
MASK_FILL = 255  # the ignore value, for mask pixels a geometric step invents


def register(
    name: str, tasks: Sequence[str] = TASKS, on_float: bool = False
) -> Callable[[Callable], Callable]:
    """Register a transform factory under `name`, for `tasks`; `on_float`: runs on [0, 1]."""

    def add(factory: Callable) -> Callable:
        factory.tasks = tuple(tasks)  # type: ignore[attr-defined]
        factory.on_float = on_float  # type: ignore[attr-defined]
        return TRANSFORMS.register(name)(factory)

    return add


_BILINEAR = v2.InterpolationMode.BILINEAR  # for images; masks always go nearest-neighbour


def _fill() -> dict:
    # A fresh dict per transform: torchvision converts the values in place.
    return {tv_tensors.Mask: MASK_FILL, "others": 0}


# Geometric ------------------------------------------------------------------------------------


@register("resize")
def resize(image_size: int, factor: float = 1.0, keep_aspect: bool = False) -> Callable:
    """Square `image_size * factor`, or that shorter side with `keep_aspect`."""
    size = round(image_size * factor)
    return v2.Resize(size if keep_aspect else (size, size), antialias=True)


@register("center_crop")
def center_crop(image_size: int) -> Callable:
    return v2.CenterCrop(image_size)


@register("random_crop")
def random_crop(
    image_size: int,
    task: str,
    padding: int = 4,
    padding_mode: Literal["constant", "edge", "reflect", "symmetric"] | None = None,
) -> Callable:
    """Pad then crop; padding_mode defaults to reflect, constant for detection (boxes cannot
    be reflected: torchvision refuses)."""
    mode = padding_mode or ("constant" if task == "detection" else "reflect")
    if task == "detection" and mode != "constant":
        raise ValueError(f"padding_mode {mode!r} cannot carry boxes; use constant for detection")
    return v2.RandomCrop(
        image_size, padding=padding, pad_if_needed=True, fill=_fill(), padding_mode=mode
    )


@register("random_resized_crop")
def random_resized_crop(
    image_size: int,
    min_scale: float = 0.35,
    max_scale: float = 1.0,
    min_ratio: float = 3 / 4,
    max_ratio: float = 4 / 3,
) -> Callable:
    return v2.RandomResizedCrop(
        image_size, scale=(min_scale, max_scale), ratio=(min_ratio, max_ratio), antialias=True
    )


@register("horizontal_flip")
def horizontal_flip(p: float = 0.5) -> Callable:
    return v2.RandomHorizontalFlip(p)


@register("vertical_flip")
def vertical_flip(p: float = 0.5) -> Callable:
    return v2.RandomVerticalFlip(p)


@register("random_rotation")
def random_rotation(degrees: float = 15.0, expand: bool = False) -> Callable:
    return v2.RandomRotation(degrees, interpolation=_BILINEAR, expand=expand, fill=_fill())


@register("random_affine")
def random_affine(
    degrees: float = 10.0,
    translate: float = 0.1,
    min_scale: float = 0.9,
    max_scale: float = 1.1,
    shear: float = 0.0,
) -> Callable:
    """Rotation up to ±degrees, shift up to ±translate of the size, scale, x-shear ±shear."""
    return v2.RandomAffine(
        degrees,
        translate=(translate, translate) if translate else None,
        scale=(min_scale, max_scale),
        shear=shear or None,
        interpolation=_BILINEAR,
        fill=_fill(),
    )


@register("random_perspective")
def random_perspective(distortion: float = 0.3, p: float = 0.5) -> Callable:
    return v2.RandomPerspective(distortion, p=p, fill=_fill())


@register("elastic", tasks=("classification", "segmentation"))
def elastic(alpha: float = 50.0, sigma: float = 5.0) -> Callable:
    """Not for detection: torchvision displaces only the box corners."""
    return v2.ElasticTransform(alpha, sigma, fill=_fill())


@register("random_zoom_out")
def random_zoom_out(max_scale: float = 4.0, p: float = 0.5) -> Callable:
    """Place the image on a canvas up to `max_scale` times larger (SSD); resize afterwards."""
    return v2.RandomZoomOut(fill=_fill(), side_range=(1.0, max_scale), p=p)


@register("random_iou_crop", tasks=("detection",))
def random_iou_crop(min_scale: float = 0.3, max_scale: float = 1.0) -> Callable:
    """SSD's crop with a minimum IoU to the boxes; needs boxes. Sizes vary: resize afterwards."""
    return v2.RandomIoUCrop(min_scale=min_scale, max_scale=max_scale)


# Colour (boxes and masks pass unchanged, which is right: nothing moves) ------------------------


@register("color_jitter")
def color_jitter(
    brightness: float = 0.2, contrast: float = 0.2, saturation: float = 0.2, hue: float = 0.0
) -> Callable:
    return v2.ColorJitter(brightness, contrast, saturation, hue)


@register("grayscale")
def grayscale(p: float = 0.1) -> Callable:
    return v2.RandomGrayscale(p)  # keeps 3 channels


@register("gaussian_blur")
def gaussian_blur(
    kernel_size: int = 5, min_sigma: float = 0.1, max_sigma: float = 2.0, p: float = 0.5
) -> Callable:
    return v2.RandomApply([v2.GaussianBlur(kernel_size, (min_sigma, max_sigma))], p=p)


@register("random_photometric_distort")
def random_photometric_distort(p: float = 0.5) -> Callable:
    return v2.RandomPhotometricDistort(p=p)


@register("auto_contrast")
def auto_contrast(p: float = 0.5) -> Callable:
    return v2.RandomAutocontrast(p)


@register("equalize")
def equalize(p: float = 0.5) -> Callable:
    return v2.RandomEqualize(p)


@register("posterize")
def posterize(bits: int = 4, p: float = 0.5) -> Callable:
    return v2.RandomPosterize(bits, p)


@register("solarize")
def solarize(threshold: int = 128, p: float = 0.5) -> Callable:
    """`threshold` on the 0-255 scale: colour steps run on uint8 images."""
    return v2.RandomSolarize(threshold, p)


@register("sharpness")
def sharpness(factor: float = 2.0, p: float = 0.5) -> Callable:
    return v2.RandomAdjustSharpness(factor, p)


# Policies and erasing: classification only (torchvision rejects boxes and masks in the
# AutoAugment family; RandomErasing would leave labels on erased pixels) ------------------------

_CLS = ("classification",)


@register("rand_augment", tasks=_CLS)
def rand_augment(num_ops: int = 2, magnitude: int = 9) -> Callable:
    return v2.RandAugment(num_ops=num_ops, magnitude=magnitude)


@register("trivial_augment", tasks=_CLS)
def trivial_augment() -> Callable:
    return v2.TrivialAugmentWide()


@register("auto_augment", tasks=_CLS)
def auto_augment(policy: Literal["imagenet", "cifar10", "svhn"] = "imagenet") -> Callable:
    return v2.AutoAugment(v2.AutoAugmentPolicy(policy))


@register("augmix", tasks=_CLS)
def augmix(severity: int = 3) -> Callable:
    return v2.AugMix(severity=severity)


@register("random_erasing", tasks=_CLS, on_float=True)
def random_erasing(
    p: float = 0.25,
    min_scale: float = 0.02,
    max_scale: float = 0.33,
    value: float | Literal["random"] = 0.0,
) -> Callable:
    """Erase a rectangle with `value` or, with "random", per-pixel normal noise."""
    return v2.RandomErasing(p, scale=(min_scale, max_scale), value=value)


# Config steps -> factory arguments (shared with batch.py) ----------------------------------------

_FROM_CONTEXT_ONLY = {"task", "num_classes"}  # image_size may be overridden per step


def resolve_step(
    step: Any, at: str, registry: Registry, context: dict[str, Any]
) -> tuple[str, Callable, dict[str, Any]]:
    """The name, factory and checked arguments of one config step.

    `context` fills the factory's parameters of those names (`image_size`, `task`, ...); the
    others come from the step, checked against the factory's signature and type hints.
    """
    if not isinstance(step, Mapping):
        raise ConfigError(f"{at}: expected {{name: ..., <param>: ...}}, got {step!r}")
    params = dict(step)
    name = params.pop("name", None)
    if name is None:
        raise ConfigError(
            f"{at}: each {registry.kind} needs a `name`; available: {registry.list()}"
        )
    try:
        factory = registry.get(name)
    except UnknownNameError as err:
        raise ConfigError(f"{at}: {err}") from None
    sig = inspect.signature(factory)
    accepted = [p for p in sig.parameters if p not in context]
    if fixed := sorted(params.keys() & _FROM_CONTEXT_ONLY):
        raise ConfigError(f"{at} ({name}): {fixed} come from the run, not from a step")
    for key, value in context.items():
        if key in sig.parameters:
            params.setdefault(key, value)
    try:
        sig.bind(**params)
    except TypeError as err:
        raise ConfigError(f"{at} ({name}): {err}; accepted parameters: {accepted}") from None
    hints = typing.get_type_hints(factory)
    for key, value in params.items():
        if key in hints and not _matches(value, hints[key]):
            raise ConfigError(
                f"{at} ({name}): {key} must be {_describe(hints[key])}, got {value!r}"
            )
    return name, factory, params


def _matches(value: Any, hint: Any) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, h) for h in args)
    if origin is Literal:
        return value in args
    if hint is type(None):
        return value is None
    if hint in (int, float):  # an int is a float too; a bool is neither
        return isinstance(value, int if hint is int else (int, float)) and not isinstance(
            value, bool
        )
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(h) for h in args)
    if origin is Literal:
        return f"one of {list(args)}"
    return "null" if hint is type(None) else getattr(hint, "__name__", str(hint))


def build_transform(
    steps: Sequence[dict[str, Any]],
    image_size: int,
    where: str,
    task: str = "classification",
    images_only: bool = False,
) -> Callable:
    """One callable for a list of named steps; bad names, parameters or tasks raise ConfigError.

    `images_only`: the callable takes an image alone, as serving gives it (detection's final
    SanitizeBoundingBoxes needs boxes, so it is left out)."""
    if task not in TASKS:
        raise ConfigError(f"{where}: unknown task {task!r}; one of {list(TASKS)}")
    on_uint8: list[Callable] = []
    on_float: list[Callable] = []
    for i, step in enumerate(steps):
        at = f"{where}[{i}]"
        name, factory, params = resolve_step(
            step, at, TRANSFORMS, {"image_size": image_size, "task": task}
        )
        if task not in factory.tasks:
            raise ConfigError(
                f"{at} ({name}): not available for task {task!r}; "
                f"supported tasks: {list(factory.tasks)}"
            )
        try:
            op = factory(**params)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{at} ({name}): {err}") from None
        (on_float if factory.on_float else on_uint8).append(op)
    ops = [v2.ToImage(), *on_uint8, v2.ToDtype(torch.float32, scale=True), *on_float]
    if task == "detection" and not images_only:
        ops.append(v2.SanitizeBoundingBoxes())
    return v2.Compose(ops)
