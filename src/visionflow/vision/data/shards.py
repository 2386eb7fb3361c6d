"""WebDataset tar shards and their manifest.

Why WebDataset: plain POSIX tar files with one sample per key (`000001.png`, `000001.cls`, ...),
readable by any tar tool, streamable from S3/MinIO, and the field-standard format for sharded
vision data in PyTorch. The `webdataset` library writes them; reading uses a small index of
tar member offsets so that a shard set is also a map-style dataset (shuffling, DistributedSampler
and exact epoch lengths work as with any Dataset).

The manifest (`manifest.json`, beside the shards) records counts, classes, the sha256 of every
shard and the files that prepare rejected. A dataset's id is the hash of its manifest, and it is
stored under `datasets/<id>/`: content-addressed, so the same data is written once.

Nothing read from the store is trusted: a manifest must hash to its id, its id and shard names
must be plain names (they become local paths), and a shard must match its manifest hash before
it enters the local cache. A verified shard is marked as such (its hash, size and mtime in
`.<name>.verified` beside it), so each machine hashes it once, not on every read.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.io import ImageReadMode, decode_jpeg

from visionflow.storage import ArtifactStore, ChecksumError, StorageError, sha256_file
from visionflow.vision.images import decode_image

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
MAX_MANIFEST_BYTES = 64 << 20  # ImageNet's is about 1 MB; the bad-file list is what grows
_DATASET_ID = re.compile(r"[0-9a-f]{20}")
_SHARD_NAME = re.compile(r"(train|val|test)-[0-9]{5,}\.tar")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_JPEG = b"\xff\xd8\xff"  # the start of every JPEG file


class CorruptDataset(StorageError):
    """A stored dataset does not match its id or its manifest: preparing it again repairs it."""


def manifest_id(manifest: dict[str, Any]) -> str:
    """Content hash of a manifest, ignoring where and when it was made."""
    stable = {k: v for k, v in manifest.items() if k not in ("id", "created_at", "uri")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:20]


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def check_dataset_id(dataset_id: str) -> str:
    """`dataset_id` if it is one (20 hex digits), else ValueError: it names local paths."""
    if not isinstance(dataset_id, str) or not _DATASET_ID.fullmatch(dataset_id):
        raise ValueError(f"{dataset_id!r} is not a dataset id (20 hexadecimal digits)")
    return dataset_id


def load_manifest(store: ArtifactStore, dataset_id: str) -> dict[str, Any]:
    """The manifest of dataset `dataset_id`, checked against its id and its shards' names.

    Raises CorruptDataset when it was changed after prepare wrote it.
    """
    key = f"{dataset_prefix(check_dataset_id(dataset_id))}/{MANIFEST}"
    if not store.exists(key):
        raise StorageError(
            f"no dataset {dataset_id} in {store.root}: run `visionflow prepare` first "
            "(a dataset without a manifest is incomplete and never used)"
        )
    manifest = json.loads(store.get_bytes(key, max_bytes=MAX_MANIFEST_BYTES))
    if manifest.get("id") != dataset_id or manifest_id(manifest) != dataset_id:
        raise CorruptDataset(
            f"the manifest of dataset {dataset_id} ({store.uri(key)}) does not hash to its id: "
            "it was changed after prepare wrote it. Prepare the dataset again to restore it"
        )
    for split in SPLITS:
        for shard in manifest["splits"][split]["shards"]:
            if not (_SHARD_NAME.fullmatch(shard["name"]) and _SHA256.fullmatch(shard["sha256"])):
                raise CorruptDataset(
                    f"dataset {dataset_id} lists a shard {shard['name']!r} (sha256 "
                    f"{shard['sha256']!r}): not a shard prepare writes"
                )
    return manifest


def fetch_shards(
    store: ArtifactStore, manifest: dict[str, Any], split: str, cache_dir: Path
) -> list[Path]:
    """Local copies of a split's shards (from `load_manifest`), each verified once per machine.

    Raises CorruptDataset when a stored shard does not match its manifest hash.
    """
    dataset_id = check_dataset_id(manifest["id"])
    local_dir = Path(cache_dir) / dataset_id
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        local = local_dir / shard["name"]
        if not _verified(local, shard["sha256"]):
            key = f"{dataset_prefix(dataset_id)}/{shard['name']}"
            try:
                store.get_file(key, local, sha256=shard["sha256"])
            except ChecksumError:
                raise CorruptDataset(
                    f"shard {shard['name']} of dataset {dataset_id} ({store.uri(key)}) does not "
                    "match its manifest hash: the stored copy is corrupt. Run `visionflow "
                    "prepare` on the same data again: it rewrites the dataset's shards"
                ) from None
            _mark_verified(local, shard["sha256"])
        paths.append(local)
    return paths


def _marker(local: Path) -> Path:
    return local.with_name(f".{local.name}.verified")


def _stamp(local: Path, sha256: str) -> str:
    st = local.stat()
    return f"{sha256} {st.st_size} {st.st_mtime_ns}"


def _verified(local: Path, sha256: str) -> bool:
    """Whether `local` holds the shard of hash `sha256`: hashed only when not yet marked."""
    if not local.is_file():
        return False
    marker = _marker(local)
    if marker.is_file() and marker.read_text() == _stamp(local, sha256):
        return True
    if sha256_file(local) != sha256:
        return False
    _mark_verified(local, sha256)
    return True


def _mark_verified(local: Path, sha256: str) -> None:
    _marker(local).write_text(_stamp(local, sha256))


@dataclass(frozen=True)
class _Entry:
    shard: int
    offset: int
    size: int
    label: int
    boxes: tuple[int, int] | None = None  # (offset, size) of the sample's `json` member
    mask: tuple[int, int] | None = None  # (offset, size) of its `mask.png` member


class ShardDataset:
    """Map-style dataset over local WebDataset shards: (image, target) pairs.

    The target depends on `task`:
    - classification: the class index;
    - detection: `{"boxes": BoundingBoxes (XYXY, pixels), "labels": int64}` with labels
      shifted by one (0 is the background, as torchvision's detection models expect);
    - segmentation: a `Mask` (H, W), int64: 0 background, class + 1, 255 ignore.
    `transform` receives the image as a uint8 tensor (3, H, W) (`decode_pixels`), and the target
    too for detection and segmentation, so geometric transforms move boxes and masks with the
    image. Shards are opened lazily in each worker process.
    """

    def __init__(self, shards: list[Path], transform=None, task: str = "classification") -> None:
        self.shards = [str(p) for p in shards]
        self.transform, self.task = transform, task
        self.entries: list[_Entry] = []
        for i, path in enumerate(self.shards):
            self.entries.extend(_index(i, path))
        if task == "detection" and any(e.boxes is None for e in self.entries):
            raise ValueError(
                "these shards carry no boxes (`json` members): not a detection dataset"
            )
        if task == "segmentation" and any(e.mask is None for e in self.entries):
            raise ValueError("these shards carry no masks (`mask.png` members)")
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def _read(self, shard: int, where: tuple[int, int]) -> bytes:
        f = self._files.get(shard)
        if f is None:
            f = self._files[shard] = open(self.shards[shard], "rb")  # noqa: SIM115
        f.seek(where[0])
        return f.read(where[1])

    def __getitem__(self, idx: int):
        e = self.entries[idx]
        image = decode_pixels(self._read(e.shard, (e.offset, e.size)))
        if self.task == "classification":
            return (self.transform(image) if self.transform else image), e.label
        if self.task == "detection":
            ann = json.loads(self._read(e.shard, e.boxes))
            target: Any = {
                "boxes": tv_tensors.BoundingBoxes(
                    torch.tensor(ann["boxes"], dtype=torch.float32).reshape(-1, 4),
                    format="XYXY",
                    canvas_size=tuple(image.shape[-2:]),
                ),
                "labels": torch.tensor(ann["labels"], dtype=torch.int64) + 1,
            }
        else:
            png = Image.open(io.BytesIO(self._read(e.shard, e.mask)))
            target = tv_tensors.Mask(torch.from_numpy(np.array(png, dtype=np.int64)))
        return self.transform(image, target) if self.transform else (image, target)

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.entries]

    def __getstate__(self):  # open files do not cross into DataLoader workers
        state = self.__dict__.copy()
        state["_files"] = {}
        return state


def decode_pixels(data: bytes) -> torch.Tensor:
    """The image in `data` as uint8 RGB (3, H, W), upright: `decode_image`'s pixels, exactly.

    JPEG files go to libjpeg-turbo directly (torchvision.io), without PIL's per-image overhead,
    which dominates for small images (a 32 px CIFAR image decodes 3-4x faster); it gives the same
    pixels as PIL, EXIF orientation, greyscale and CMYK included (tests/unit/test_loader.py).
    Other formats take `decode_image`'s path. The JPEG path checks no pixel cap: a shard holds
    only images prepare decoded under it, and its hash is verified before it is read.
    """
    if data.startswith(_JPEG):
        encoded = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        return decode_jpeg(encoded, mode=ImageReadMode.RGB, apply_exif_orientation=True)
    return torch.from_numpy(np.array(decode_image(data))).permute(2, 0, 1)


def collate_detection(batch):
    """Detection batches stay lists: images may differ in size, and so does each box count."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


def _index(shard: int, path: str) -> list[_Entry]:
    members: dict[str, dict[str, tuple[int, int]]] = {}
    labels: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if ext == "cls":
                labels[key] = int(tar.extractfile(m).read())
            else:
                field = "image" if ext in IMAGE_EXTS else ext
                members.setdefault(key, {})[field] = (m.offset_data, m.size)
    return [
        _Entry(shard, *found["image"], labels[k], found.get("json"), found.get("mask.png"))
        for k, found in sorted(members.items())
        if k in labels and "image" in found
    ]
