"""CIFAR-10 and CIFAR-100, read from torchvision's on-disk format (the python pickle version).

`data.root` is the directory that holds the extracted folder (`cifar-10-batches-py` or
`cifar-100-python`), like torchvision's `root`, or that folder itself; local or
`s3://bucket/prefix`. A missing local copy is fetched by torchvision when `data.download=true`.

The official test batch is the fixed test split; val is carved from the training batches.
`data.max_samples` subsamples the training batches only (evenly over the classes, fixed by
seed): the test split always stays whole, so test results compare across subset sizes.

The batches are Python pickles, and a pickle can name any function to call while it loads.
`data.root` may be a bucket others can write, so they are read with an unpickler that admits
only what the real files hold (numpy arrays, lists, dicts, strings, bytes): anything else is
refused before it runs.
"""

from __future__ import annotations

import codecs
import io
import logging
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from visionflow.core.registry import DATAMODULES
from visionflow.storage import ArtifactStore, split_uri
from visionflow.vision.data.datamodules import RawSample, ShardDataModule, png_bytes

log = logging.getLogger("visionflow.prepare")
MAX_BATCH_BYTES = 512 << 20  # CIFAR-100's training batch, the largest, is about 150 MB


@dataclass(frozen=True)
class CifarFormat:
    """Where torchvision's extracted archive keeps each part, and the keys of its pickles."""

    title: str
    folder: str
    train: tuple[str, ...]
    test: str
    meta: str
    labels_key: bytes
    names_key: bytes
    torchvision_class: str


CIFAR10 = CifarFormat(
    "CIFAR-10",
    "cifar-10-batches-py",
    tuple(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
    b"labels",
    b"label_names",
    "CIFAR10",
)
CIFAR100 = CifarFormat(
    "CIFAR-100",
    "cifar-100-python",
    ("train",),
    "test",
    "meta",
    b"fine_labels",
    b"fine_label_names",
    "CIFAR100",
)


class CifarDataModule(ShardDataModule):
    """32×32 RGB images from torchvision's CIFAR pickles; subclasses name the format."""

    tasks = ("classification",)
    required = ("root",)
    format: CifarFormat = CIFAR10

    @classmethod
    def raw_samples(cls, data_cfg, seed: int) -> tuple[list[str], Iterator[RawSample]]:
        fmt = cls.format
        store, folder = locate(fmt, data_cfg.root, bool(data_cfg.download))
        meta = _unpickle(store, _join(folder, fmt.meta))
        classes = [n.decode() if isinstance(n, bytes) else n for n in meta[fmt.names_key]]
        train = [(name, _unpickle(store, _join(folder, name))) for name in fmt.train]
        test = [(fmt.test, _unpickle(store, _join(folder, fmt.test)))]
        origin, images, labels = _images(train, fmt.labels_key)
        keep = balanced_subset(labels, data_cfg.max_samples, seed)
        parts = [
            (None, [origin[i] for i in keep], images[keep], labels[keep]),
            ("test", *_images(test, fmt.labels_key)),
        ]
        log.info(
            "%s: %d training images (of %d), %d test images, from %s",
            fmt.title,
            len(keep),
            len(origin),
            len(parts[1][1]),
            store.uri(folder),
        )

        def gen() -> Iterator[RawSample]:
            for split, origin, images, labels in parts:
                for (batch, row), image, label in zip(origin, images, labels, strict=True):
                    yield RawSample(
                        source=f"{store.uri(_join(folder, batch))}#{row}",
                        label=int(label),
                        read=lambda image=image: png_bytes(image),
                        ext="png",
                        split=split,
                    )

        return classes, gen()


@DATAMODULES.register("cifar10")
class Cifar10DataModule(CifarDataModule):
    """CIFAR-10: 50,000 training and 10,000 test images in 10 classes."""

    format = CIFAR10


@DATAMODULES.register("cifar100")
class Cifar100DataModule(CifarDataModule):
    """CIFAR-100: 50,000 training and 10,000 test images in 100 (fine) classes."""

    format = CIFAR100


def locate(fmt: CifarFormat, root: str, download: bool) -> tuple[ArtifactStore, str]:
    """(store, key of the extracted folder); downloads into a local root when asked.

    Raises FileNotFoundError naming the first missing file when the copy is incomplete.
    """
    store, base = split_uri(root)
    base = base.rstrip("/")
    nested = _join(base, fmt.folder)
    files = (fmt.meta, fmt.test, *fmt.train)
    for folder in (nested, base):
        if all(store.exists(_join(folder, name)) for name in files):
            return store, folder
    if download:
        if root.startswith("s3://"):
            raise ValueError(
                f"data.download=true needs a local data.root, not {root}: download "
                f"{fmt.title} locally and copy the extracted {fmt.folder}/ under {root}"
            )
        import torchvision.datasets

        log.info("%s: not in %s; downloading it there (about 170 MB)", fmt.title, root)
        getattr(torchvision.datasets, fmt.torchvision_class)(root, train=True, download=True)
        if all(store.exists(_join(nested, name)) for name in files):
            return store, nested
    # Name the file of the copy that looks closest to complete.
    folder = base if store.exists(_join(base, fmt.meta)) else nested
    missing = next(name for name in files if not store.exists(_join(folder, name)))
    raise FileNotFoundError(
        f"{fmt.title} not found: {store.uri(_join(folder, missing))} is missing. Set "
        f"data.download=true to fetch it into data.root, or point data.root at an extracted "
        f"copy (the directory that holds {fmt.folder}/, or {fmt.folder}/ itself)"
    )


def balanced_subset(labels: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """Sorted indices of n samples spread evenly over the classes, fixed by seed (all if no n)."""
    if not n or n >= len(labels):
        return np.arange(len(labels))
    order = np.random.default_rng(seed).permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # place of each sample in its class's shuffle
    for label in np.unique(labels):
        members = order[labels[order] == label]
        rank[members] = np.arange(len(members))
    # One of each class, then a second of each, ...: round robin over the shuffled classes.
    return np.sort(order[np.argsort(rank[order], kind="stable")[:n]])


def _join(folder: str, name: str) -> str:
    return f"{folder}/{name}" if folder else name


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as protocol-2 pickles use it for bytes, for no other codec."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"refused _codecs.encode(..., {encoding!r})")
    return codecs.encode(text, "latin1")


_reconstruct = np.empty(0).__reduce__()[0]  # what an ndarray pickles as its constructor
# The only globals a CIFAR batch names: numpy's array reconstruction (under its numpy 1 and
# numpy 2 module names), and the bytes encoding of pickles written by Python 3 at protocol 2.
_ALLOWED: dict[tuple[str, str], Callable | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class BatchUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batches only: any global outside `_ALLOWED` is refused, uncalled."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refused {module}.{name}: a CIFAR batch holds only numpy arrays, lists, dicts, "
                "strings and bytes"
            ) from None


def _unpickle(store: ArtifactStore, key: str) -> dict:
    # The archives were pickled by Python 2: keys and strings come back as bytes.
    data = store.get_bytes(key, max_bytes=MAX_BATCH_BYTES)
    unpickler = BatchUnpickler(io.BytesIO(data), encoding="bytes")
    try:
        batch = unpickler.load()
    except pickle.UnpicklingError as err:
        raise pickle.UnpicklingError(f"{store.uri(key)} is not a CIFAR batch: {err}") from None
    if not isinstance(batch, dict):
        raise pickle.UnpicklingError(f"{store.uri(key)} is not a CIFAR batch: not a dict")
    return batch


def _images(batches: list[tuple[str, dict]], labels_key: bytes):
    """(origin (batch, row) per image, uint8 images N×32×32×3, labels) of the batches."""
    origin = [(name, row) for name, b in batches for row in range(len(b[labels_key]))]
    data = np.concatenate([np.asarray(b[b"data"], dtype=np.uint8) for _, b in batches])
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # channel-planar → HWC
    labels = np.concatenate([np.asarray(b[labels_key], dtype=np.int64) for _, b in batches])
    return origin, images, labels
