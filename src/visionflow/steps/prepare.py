"""prepare: raw images → validated, split, sharded dataset with a manifest, in the artifact store."""

from __future__ import annotations

import io
import json
import logging
import secrets
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import webdataset as wds

from visionflow.compose.data import datamodule_class
from visionflow.results import PrepareResult
from visionflow.runs import save_step
from visionflow.storage import ArtifactStore, open_store, sha256_file
from visionflow.vision.data.datamodules import RawSample
from visionflow.vision.data.shards import (
    IMAGE_EXTS,
    MANIFEST,
    SPLITS,
    CorruptDataset,
    dataset_prefix,
    load_manifest,
    manifest_id,
)
from visionflow.vision.images import ImageTooLarge, decode_image

log = logging.getLogger("visionflow.prepare")
STAGING = "datasets/incoming"  # shards of a prepare in progress, before its dataset id is known


class PrepareError(RuntimeError):
    """The source cannot make a usable dataset (too many bad files, no samples, ...)."""


def prepare(cfg) -> PrepareResult:
    """Read, validate, split and shard `cfg.data`; write shards then the manifest.

    Each shard goes to the store as soon as it is full, into a staging prefix (the dataset's id
    is the hash of a manifest that lists every shard's hash, so it is known only at the end), and
    its local copy is deleted: local disk holds a few shards, not the dataset. At the end the
    shards are copied under `datasets/<id>/` (in the server, for S3) and the manifest is written last, so a dataset without
    one is incomplete and never read. Preparing a dataset that is already stored rewrites its
    shards and, if it was changed, its manifest: that is how a corrupt stored dataset is repaired.
    """
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    data = cfg.data
    source = datamodule_class(data.name)
    classes, samples = source.raw_samples(data, cfg.seed)
    samples = list(samples)
    if not samples:
        raise PrepareError(f"no samples in {data.root or data.name}")
    splits = assign_splits(samples, data.val_fraction, data.test_fraction, cfg.seed)

    staging = f"{STAGING}/{cfg.run_id}-{secrets.token_hex(4)}"
    try:
        with tempfile.TemporaryDirectory(prefix="visionflow-prepare-") as tmp:
            shards, counts, bad = _write_shards(
                samples, splits, Path(tmp), data.samples_per_shard, data.max_image_pixels,
                upload=lambda path: store.put_file(path, f"{staging}/{path.name}"),
            )  # fmt: skip
        share = len(bad) / len(samples)
        if share > data.max_bad_fraction:
            shown = "; ".join(f"{b['source']}: {b['reason']}" for b in bad[:5])
            raise PrepareError(
                f"{len(bad)} of {len(samples)} files ({share:.1%}) are unusable, more than "
                f"data.max_bad_fraction={data.max_bad_fraction:.1%}. First ones: {shown}"
            )
        for split in SPLITS:
            if not counts[split]:
                raise PrepareError(
                    f"the {split} split is empty ({len(samples)} samples): "
                    "add data or change data.val_fraction / data.test_fraction"
                )
        manifest = {
            "format": "webdataset",
            "version": 1,
            "tasks": list(source.tasks),
            "source": data.root or f"{data.name}:seed={cfg.seed}",
            "test_source": data.test_root,
            "seed": cfg.seed,
            "image_size": data.image_size,
            "classes": list(classes),
            "splits": {
                split: {
                    "count": sum(counts[split].values()),
                    "per_class": {classes[k]: v for k, v in sorted(counts[split].items())},
                    "shards": shards[split],
                }
                for split in SPLITS
            },
            "bad_files": bad,
        }
        manifest["id"] = dataset_id = manifest_id(manifest)
        manifest["created_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        prefix = dataset_prefix(dataset_id)
        for split in SPLITS:
            for shard in shards[split]:
                store.copy(f"{staging}/{shard['name']}", f"{prefix}/{shard['name']}")
        manifest, reused = _stored_manifest(store, manifest)
    finally:
        for key in store.list(staging):
            store.delete(key)
    manifest["uri"] = store.uri(prefix)
    log.info(
        "dataset %s: %s; %d bad files skipped",
        dataset_id,
        ", ".join(f"{s}={manifest['splits'][s]['count']}" for s in SPLITS),
        len(bad),
    )
    result = PrepareResult(dataset_id, store.uri(prefix), manifest, reused)
    save_step(store, cfg.run_id, "prepare", result)
    return result


def _stored_manifest(store: ArtifactStore, manifest: dict[str, Any]) -> tuple[dict, bool]:
    """(the stored manifest, True) if the dataset was stored intact, else (`manifest`, False)
    once written: the manifest goes last, after the shards it lists."""
    dataset_id = manifest["id"]
    key = f"{dataset_prefix(dataset_id)}/{MANIFEST}"
    if store.exists(key):
        try:
            stored = load_manifest(store, dataset_id)
            log.info(
                "dataset %s is already in %s; its shards are rewritten", dataset_id, store.root
            )
            return stored, True
        except CorruptDataset as err:
            log.warning("%s; writing it again", err)
    store.put_bytes(json.dumps(manifest, indent=2).encode(), key)
    return manifest, False


def assign_splits(
    samples: list[RawSample], val_fraction: float, test_fraction: float, seed: int
) -> list[str]:
    """A stratified train/val/test split by label, fixed by seed.

    Samples with a fixed split (from data.test_root) keep it; the rest of each class is cut
    into val and test shares, then train. Samples without a label get 'train' (and are
    rejected later as bad).
    """
    out = [s.split or "train" for s in samples]
    carve_test = not any(s.split == "test" for s in samples)
    by_label: dict[int, list[int]] = {}
    for i, s in enumerate(samples):
        if s.split is None and s.label is not None:
            by_label.setdefault(s.label, []).append(i)
    rng = np.random.default_rng(seed)
    for label in sorted(by_label):
        idx = by_label[label]
        order = [idx[j] for j in rng.permutation(len(idx))]
        n_val = round(len(idx) * val_fraction)
        n_test = round(len(idx) * test_fraction) if carve_test else 0
        for i in order[:n_val]:
            out[i] = "val"
        for i in order[n_val : n_val + n_test]:
            out[i] = "test"
    return out


def _validate(sample: RawSample, max_pixels: int) -> tuple[bytes, str]:
    """The sample's bytes and extension, or ValueError saying why it is unusable."""
    if sample.label is None:
        raise ValueError("no class: not inside a class folder, or a class the training data lacks")
    try:
        raw = sample.read()
    except Exception as err:  # unreadable source object: report it, don't stop
        raise ValueError(f"unreadable: {err}") from None
    try:
        image = decode_image(raw, max_pixels)  # decodes everything: truncated files fail here
    except ImageTooLarge as err:
        raise ValueError(f"too large: {err} (data.max_image_pixels)") from None
    if sample.ext in IMAGE_EXTS:
        return raw, sample.ext
    buf = io.BytesIO()  # a format PIL reads but the shards don't carry: store as PNG
    image.save(buf, format="PNG")
    return buf.getvalue(), "png"


def _write_shards(
    samples, splits, tmp: Path, per_shard: int, max_pixels: int, upload: Callable[[Path], Any]
):
    """Shards of the valid samples, each handed to `upload` once full and then deleted."""
    shards: dict[str, list[dict[str, Any]]] = {split: [] for split in SPLITS}

    def done(fname: str) -> None:
        path = Path(fname)
        shards[path.name.split("-")[0]].append(
            {"name": path.name, "sha256": sha256_file(path), "bytes": path.stat().st_size}
        )
        upload(path)
        path.unlink()

    writers = {
        split: wds.ShardWriter(
            str(tmp / f"{split}-%05d.tar"), maxcount=per_shard, verbose=0, mtime=0, post=done
        )
        for split in SPLITS
    }
    counts: dict[str, Counter] = {split: Counter() for split in SPLITS}
    bad: list[dict[str, str]] = []
    started = time.monotonic()
    try:
        for i, (sample, split) in enumerate(zip(samples, splits, strict=True)):
            try:
                data, ext = _validate(sample, max_pixels)
            except ValueError as err:
                bad.append({"source": sample.source, "reason": str(err)})
                continue
            record = {"__key__": f"{i:08d}", ext: data, "cls": str(sample.label).encode()}
            for field, value in sample.extra.items():
                value = value() if callable(value) else value
                record[field] = value if isinstance(value, bytes) else json.dumps(value).encode()
            writers[split].write(record)
            counts[split][sample.label] += 1
            if (i + 1) % 5000 == 0:
                log.info(
                    "prepare: %d/%d samples read, %d bad (%.0fs)",
                    i + 1,
                    len(samples),
                    len(bad),
                    time.monotonic() - started,
                )
    finally:
        for w in writers.values():
            w.close()
    return shards, counts, bad
