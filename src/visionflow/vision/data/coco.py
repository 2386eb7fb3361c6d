"""COCO-style instance annotations: boxes, labels and masks for detection and segmentation.

`data.root` is an image directory and `data.annotations` its instances JSON (each a local path
or `s3://bucket/prefix`); `data.test_root` with `data.test_annotations` is a fixed test split
(e.g. val2017), otherwise one is carved from root. Categories become classes 0..K-1 in
category-id order. Per image the shard gets:

- `json`: `{"boxes": [[x0, y0, x1, y1], ...], "labels": [...]}`, absolute pixels (COCO's
  xywh clipped to the image; zero-area boxes dropped);
- `mask.png`: 0 background, class + 1 inside an object, 255 where a crowd (`iscrowd=1`)
  region is and no single object was annotated. Larger objects are painted first, so smaller
  ones on top of them stay visible.

Images without a usable (non-crowd, non-empty) object are skipped and counted in the log. A
sample's class label, which stratifies the split, is the category of its largest object.
`data.max_samples` keeps a fixed subset (by seed) of the training images; the test split
stays whole.
"""

from __future__ import annotations

import json
import logging
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from visionflow.core.registry import DATAMODULES
from visionflow.storage import split_uri
from visionflow.vision.data.datamodules import (
    RawSample,
    ShardDataModule,
    image_ext,
    png_bytes,
)

log = logging.getLogger("visionflow.prepare")

IGNORE = 255  # mask value for pixels no loss should count (crowd regions)
PROGRESS_EVERY = 5000  # images between progress lines (COCO train has 118k)


@dataclass
class CocoObject:
    box: list[float]  # x0, y0, x1, y1 in pixels
    label: int  # contiguous class index
    area: float  # the annotation's segment area (its box area when it has none)
    segmentation: list | dict | None


@dataclass
class CocoImage:
    file_name: str
    width: int
    height: int
    objects: list[CocoObject]  # largest first
    crowd: list[list | dict]  # segmentations of iscrowd=1 regions


@DATAMODULES.register("coco")
class CocoDataModule(ShardDataModule):
    """A COCO instances JSON and its image directory, local or `s3://bucket/prefix`."""

    tasks = ("detection", "segmentation")
    required = ("root", "annotations")

    @classmethod
    def raw_samples(cls, data_cfg, seed: int) -> tuple[list[str], Iterator[RawSample]]:
        if bool(data_cfg.test_root) != bool(data_cfg.test_annotations):
            raise ValueError(
                "a COCO test split needs both data.test_root (images) and data.test_annotations "
                "(their instances JSON); set both or neither"
            )
        train = read_instances(data_cfg.annotations, "data.annotations")
        categories = sorted(train["categories"], key=lambda c: c["id"])
        if len(categories) >= IGNORE:
            raise ValueError(f"{len(categories)} categories do not fit an 8-bit mask (max 254)")
        index = {c["id"]: i for i, c in enumerate(categories)}
        images = annotated_images(train, index, data_cfg.annotations)
        parts = [(None, data_cfg.root, _subset(images, data_cfg.max_samples, seed))]
        if data_cfg.test_root:
            test = read_instances(data_cfg.test_annotations, "data.test_annotations")
            test_images = annotated_images(test, index, data_cfg.test_annotations)
            parts.append(("test", data_cfg.test_root, test_images))
        return [c["name"] for c in categories], _samples(parts)


def read_instances(uri: str, key_name: str) -> dict:
    """The parsed instances JSON at a local path or s3:// URI."""
    store, key = split_uri(uri)
    if not store.exists(key):
        raise FileNotFoundError(f"COCO annotations not found: {store.uri(key)} ({key_name})")
    return json.loads(store.get_bytes(key))


def annotated_images(instances: dict, index: dict[int, int], shown: str) -> list[CocoImage]:
    """The images that have at least one usable object, in image-id order."""
    by_image: dict[int, list[dict]] = defaultdict(list)
    for ann in instances.get("annotations", []):
        by_image[ann["image_id"]].append(ann)
    out, unknown = [], 0
    for img in sorted(instances["images"], key=lambda im: im["id"]):
        w, h = img["width"], img["height"]
        objects, crowd = [], []
        for ann in by_image.get(img["id"], []):
            if ann.get("iscrowd"):
                crowd.append(ann["segmentation"])
            elif ann["category_id"] not in index:
                unknown += 1  # a test JSON category the training JSON lacks
            elif (box := _xyxy(ann["bbox"], w, h)) is not None:
                area = ann.get("area") or (box[2] - box[0]) * (box[3] - box[1])
                objects.append(
                    CocoObject(box, index[ann["category_id"]], area, ann.get("segmentation"))
                )
        if objects:
            objects.sort(key=lambda o: -o.area)  # stable: ties keep the JSON's order
            out.append(CocoImage(img["file_name"], w, h, objects, crowd))
    skipped = len(instances["images"]) - len(out)
    log.info(
        "coco: %d images in %s, %d skipped without a usable annotation", len(out), shown, skipped
    )
    if unknown:
        log.warning("coco: %d annotations in %s have a category not in training", unknown, shown)
    return out


def paint_mask(image: CocoImage) -> np.ndarray:
    """The H×W uint8 class mask: 0 background, class + 1 objects, 255 crowd."""
    mask = np.zeros((image.height, image.width), dtype=np.uint8)
    # Crowd first: where a single object was annotated inside a crowd, its label is known.
    for seg in image.crowd:
        mask[_decode(seg, image.height, image.width)] = IGNORE
    for obj in image.objects:  # largest first, so small objects stay visible
        if obj.segmentation:
            mask[_decode(obj.segmentation, image.height, image.width)] = obj.label + 1
    return mask


def _decode(seg: list | dict, h: int, w: int) -> np.ndarray:
    """A boolean H×W mask from polygons, uncompressed RLE or compressed RLE."""
    # imported here: every datamodule's module is imported to fill the registry, and a machine
    # that trains on other data need not have pycocotools (a GPU image without it)
    from pycocotools import mask as mask_utils

    if isinstance(seg, list):
        # frPyObjects takes a 4-number list for a box: keep real polygons (≥ 3 points) only.
        polygons = [p for p in seg if len(p) >= 6]
        if not polygons:
            return np.zeros((h, w), dtype=bool)
        rle = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    elif isinstance(seg["counts"], list):
        rle = mask_utils.frPyObjects(seg, h, w)
    else:
        rle = seg
    return mask_utils.decode(rle).astype(bool)


def _xyxy(bbox: list[float], w: int, h: int) -> list[float] | None:
    """COCO's [x, y, width, height] as [x0, y0, x1, y1] clipped to the image; None if empty."""
    x, y, bw, bh = (float(v) for v in bbox)
    x0, y0 = min(max(x, 0.0), w), min(max(y, 0.0), h)
    x1, y1 = min(max(x + bw, 0.0), w), min(max(y + bh, 0.0), h)
    return [x0, y0, x1, y1] if x1 > x0 and y1 > y0 else None


def _subset(images: list[CocoImage], n: int | None, seed: int) -> list[CocoImage]:
    if not n or n >= len(images):
        return images
    keep = np.random.default_rng(seed).choice(len(images), size=n, replace=False)
    return [images[i] for i in sorted(keep)]


def _samples(parts) -> Iterator[RawSample]:
    total = sum(len(images) for _, _, images in parts)
    done, started = 0, time.monotonic()
    for split, root, images in parts:
        store, base = split_uri(root)
        base = base.rstrip("/")
        for image in images:
            key = f"{base}/{image.file_name}" if base else image.file_name
            yield RawSample(
                source=store.uri(key),
                label=image.objects[0].label,
                read=lambda store=store, key=key: store.get_bytes(key),
                ext=image_ext(image.file_name),
                split=split,
                extra={
                    "json": {
                        "boxes": [o.box for o in image.objects],
                        "labels": [o.label for o in image.objects],
                    },
                    # painted when the shard is written, not held for every image at once
                    "mask.png": lambda image=image: png_bytes(paint_mask(image)),
                },
            )
            done += 1
            if done % PROGRESS_EVERY == 0:
                log.info(
                    "coco: %d/%d images listed (%.0fs)", done, total, time.monotonic() - started
                )
