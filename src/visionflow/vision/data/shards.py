"""WebDataset tar shards and their manifest.

Why WebDataset: plain POSIX tar files with one sample per key (`000001.png`, `000001.cls`, ...),
readable by any tar tool, streamable from S3/MinIO, and the field-standard format for sharded
vision data in PyTorch. The `webdataset` library writes them; reading uses a small index of
tar member offsets so that a shard set is also a map-style dataset (shuffling, DistributedSampler
and exact epoch lengths work as with any Dataset).

The manifest (`manifest.json`, beside the shards) records counts, classes, the sha256 of every
shard and the files that prepare rejected. A dataset's id is the hash of its manifest, and it is
stored under `datasets/<id>/`: content-addressed, so the same data is written once.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from visionflow.storage import ArtifactStore, StorageError, sha256_file

IMAGE_EXTS = ("png", "jpg", "jpeg", "webp", "bmp")
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")


def manifest_id(manifest: dict[str, Any]) -> str:
    """Content hash of a manifest, ignoring where and when it was made."""
    stable = {k: v for k, v in manifest.items() if k not in ("id", "created_at", "uri")}
    return hashlib.sha256(json.dumps(stable, sort_keys=True).encode()).hexdigest()[:20]


def dataset_prefix(dataset_id: str) -> str:
    return f"datasets/{dataset_id}"


def load_manifest(store: ArtifactStore, dataset_id: str) -> dict[str, Any]:
    key = f"{dataset_prefix(dataset_id)}/{MANIFEST}"
    if not store.exists(key):
        raise StorageError(
            f"no dataset {dataset_id} in {store.root}: run `visionflow prepare` first "
            "(a dataset without a manifest is incomplete and never used)"
        )
    return json.loads(store.get_bytes(key))


def fetch_shards(
    store: ArtifactStore, manifest: dict[str, Any], split: str, cache_dir: Path
) -> list[Path]:
    """Local copies of a split's shards, downloaded once and checked against the manifest."""
    local_dir = Path(cache_dir) / manifest["id"]
    paths = []
    for shard in manifest["splits"][split]["shards"]:
        local = local_dir / shard["name"]
        if not (local.is_file() and sha256_file(local) == shard["sha256"]):
            store.get_file(f"{dataset_prefix(manifest['id'])}/{shard['name']}", local)
            if sha256_file(local) != shard["sha256"]:
                local.unlink()
                raise StorageError(
                    f"shard {shard['name']} of dataset {manifest['id']} does not match its "
                    "manifest hash: the stored dataset is corrupt; prepare it again"
                )
        paths.append(local)
    return paths


@dataclass(frozen=True)
class _Entry:
    shard: int
    offset: int
    size: int
    label: int


class ShardDataset:
    """Map-style dataset over local WebDataset shards: (image, label) pairs.

    `transform` receives a PIL RGB image. Shards are opened lazily in each worker process.
    """

    def __init__(self, shards: list[Path], transform=None) -> None:
        self.shards = [str(p) for p in shards]
        self.transform = transform
        self.entries: list[_Entry] = []
        for i, path in enumerate(self.shards):
            self.entries.extend(_index(i, path))
        self._files: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, idx: int):
        e = self.entries[idx]
        f = self._files.get(e.shard)
        if f is None:
            f = self._files[e.shard] = open(self.shards[e.shard], "rb")  # noqa: SIM115
        f.seek(e.offset)
        image = Image.open(io.BytesIO(f.read(e.size))).convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, e.label

    @property
    def labels(self) -> list[int]:
        return [e.label for e in self.entries]

    def __getstate__(self):  # open files do not cross into DataLoader workers
        state = self.__dict__.copy()
        state["_files"] = {}
        return state


def _index(shard: int, path: str) -> list[_Entry]:
    images: dict[str, tuple[int, int]] = {}
    labels: dict[str, int] = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            if not m.isfile():
                continue
            key, _, ext = m.name.partition(".")
            if ext in IMAGE_EXTS:
                images[key] = (m.offset_data, m.size)
            elif ext == "cls":
                labels[key] = int(tar.extractfile(m).read())
    return [_Entry(shard, *images[k], labels[k]) for k in sorted(images) if k in labels]
