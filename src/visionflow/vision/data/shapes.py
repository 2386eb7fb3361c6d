"""`shapes`: a procedurally generated dataset of geometric shapes, deterministic by seed.

Each sample is one shape of random colour, size, position and rotation on a noisy background,
with its class label, bounding box and mask, so detection and segmentation can use it too.
Sample `i` depends only on `(seed, i)`: any subset can be regenerated on its own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

SHAPE_CLASSES = ("circle", "square", "triangle", "star", "cross")


@dataclass(frozen=True)
class ShapeSample:
    image: Image.Image  # RGB, size x size
    label: int
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (inclusive-exclusive), pixels
    mask: Image.Image  # "L", 255 inside the shape


def _polygon(kind: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    if kind == "square":
        pts = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
        pts = [(x * r / math.sqrt(2), y * r / math.sqrt(2)) for x, y in pts]
    elif kind == "triangle":
        pts = [
            (r * math.cos(a), r * math.sin(a))
            for a in (math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))
        ]
    elif kind == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = math.pi / 2 + k * math.pi / 5
            pts.append((rad * math.cos(a), rad * math.sin(a)))
    elif kind == "cross":
        w = r * 0.35
        pts = [
            (w, r),
            (-w, r),
            (-w, w),
            (-r, w),
            (-r, -w),
            (-w, -w),
            (-w, -r),
            (w, -r),
            (w, -w),
            (r, -w),
            (r, w),
            (w, w),
        ]
    else:
        raise ValueError(f"no polygon for {kind!r}")
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in pts]


def make_shape(
    seed: int, index: int, size: int = 32, num_classes: int = len(SHAPE_CLASSES)
) -> ShapeSample:
    """Draw sample `index` of the dataset with this `seed`. Labels cycle through the classes."""
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(f"shapes has 1..{len(SHAPE_CLASSES)} classes, got {num_classes}")
    rng = np.random.default_rng([seed, index])
    label = index % num_classes
    kind = SHAPE_CLASSES[label]

    background = rng.integers(0, 256, size=3)
    noise = rng.normal(0.0, 18.0, size=(size, size, 3))
    canvas = np.clip(background + noise, 0, 255).astype(np.uint8)
    image = Image.fromarray(canvas, "RGB")

    # A foreground colour far enough from the background to be seen.
    colour = rng.integers(0, 256, size=3)
    while np.abs(colour - background).sum() < 160:
        colour = rng.integers(0, 256, size=3)

    r = rng.uniform(0.22, 0.42) * size
    cx, cy = rng.uniform(r, size - r, size=2)
    angle = rng.uniform(0, 2 * math.pi)
    mask = Image.new("L", (size, size), 0)
    draw_img, draw_mask = ImageDraw.Draw(image), ImageDraw.Draw(mask)
    fill = tuple(int(v) for v in colour)
    if kind == "circle":
        bbox = (cx - r, cy - r, cx + r, cy + r)
        draw_img.ellipse(bbox, fill=fill)
        draw_mask.ellipse(bbox, fill=255)
    else:
        pts = _polygon(kind, cx, cy, r, angle)
        draw_img.polygon(pts, fill=fill)
        draw_mask.polygon(pts, fill=255)

    ys, xs = np.nonzero(np.asarray(mask))
    box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
    return ShapeSample(image=image, label=label, box=box, mask=mask)
