"""Image files to model input: one decoding for evaluation, serving and batch inference.

`decode_image` turns a file's bytes into the RGB picture a person sees (EXIF orientation
applied), checking its size from the header before any pixel is decoded. `Preprocess` applies a
model's recorded evaluation transform (the `transforms.eval` steps it was evaluated with) to it,
giving the float [0, 1] CHW array the exported files take; normalisation is inside the network.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from visionflow.vision.transforms import build_transform

# What a version registered before the spec carried its transform was evaluated with.
DEFAULT_EVAL = ({"name": "resize"},)
_BUFFER = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-f]+>")


class ImageError(ValueError):
    """The bytes are not an image this service can decode."""


class ImageTooLarge(ValueError):
    """The image has more pixels than allowed (checked before decoding)."""


def decode_image(data: bytes, max_pixels: int | None = None) -> Image.Image:
    """The image in `data` as RGB, upright (EXIF orientation applied).

    The pixel count is read from the header before decoding, so a decompression bomb costs
    nothing; PIL's own bomb check (twice `Image.MAX_IMAGE_PIXELS`) is a second line.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            if max_pixels is not None and image.width * image.height > max_pixels:
                raise ImageTooLarge(
                    f"{image.width}x{image.height} is {image.width * image.height:,} pixels; "
                    f"the limit is {max_pixels:,}"
                )
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLarge(str(err)) from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        if isinstance(err, ImageTooLarge):
            raise
        said = _BUFFER.sub("", str(err))  # PIL names the in-memory buffer it read: noise
        raise ImageError(f"not a decodable image ({type(err).__name__}: {said})") from None
    return ImageOps.exif_transpose(image).convert("RGB")


class Preprocess:
    """A model's evaluation transform, for one image at a time: PIL RGB -> float32 (3, H, W)."""

    def __init__(self, steps: Sequence[dict[str, Any]] | None, image_size: int, task: str):
        steps = [dict(s) for s in (steps if steps is not None else DEFAULT_EVAL)]
        self._transform = build_transform(
            steps, image_size, "preprocess", task=task, images_only=True
        )

    def __call__(self, image: Image.Image) -> np.ndarray:
        return np.ascontiguousarray(self._transform(image).numpy(), dtype=np.float32)
