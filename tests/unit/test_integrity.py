"""Data that cannot be tampered with: safe CIFAR unpickling, verified manifests, shards and files."""

import io
import json
import os
import pickle
import tempfile

import numpy as np
import pytest
from omegaconf import OmegaConf

from tests.conftest import tiny_overrides
from visionflow.core.config import ConfigError, DataConfig, load_config
from visionflow.steps.prepare import prepare
from visionflow.storage import ChecksumError, LocalStore, TooLarge, open_store, sha256_file
from visionflow.vision.data.cifar import BatchUnpickler, Cifar10DataModule
from visionflow.vision.data.shards import (
    MANIFEST,
    CorruptDataset,
    dataset_prefix,
    fetch_shards,
    load_manifest,
    manifest_id,
)

# ------------------------------------------------------------------ CIFAR's restricted unpickler


class WritesMarker:
    """A pickle payload: loading it would create `path`."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def _cifar_folder(root, train_batch):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {b"batch_label": b"test", b"labels": [0, 1], b"filenames": [b"a.png", b"b.png"],
             b"data": np.zeros((2, 3072), dtype=np.uint8)}  # fmt: skip
    for name in ["test_batch", *(f"data_batch_{i}" for i in range(2, 6))]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    (folder / "data_batch_1").write_bytes(pickle.dumps(train_batch, protocol=2))
    meta = {b"label_names": [b"airplane", b"automobile"]}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


def test_a_malicious_cifar_pickle_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    bad = {b"data": np.zeros((1, 3072), dtype=np.uint8), b"labels": [WritesMarker(marker)]}
    folder = _cifar_folder(tmp_path / "cifar", bad)
    cfg = OmegaConf.structured(DataConfig(name="cifar10", root=str(tmp_path / "cifar")))
    with pytest.raises(pickle.UnpicklingError) as err:
        Cifar10DataModule.raw_samples(cfg, seed=0)
    assert str(folder / "data_batch_1") in str(err.value)
    assert "refused posix.system: a CIFAR batch holds only numpy arrays" in str(err.value)
    assert not marker.exists()


@pytest.mark.parametrize("numpy_module", [b"numpy._core.multiarray", b"numpy.core.multiarray"])
def test_cifar_batches_pickled_by_numpy_1_or_2_still_load(numpy_module):
    data = np.arange(2 * 3072, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    batch = {b"batch_label": b"training batch 1 of 5", b"labels": [3, 7], b"data": data,
             b"filenames": [b"cat_01.png", b"ship_02.png"]}  # fmt: skip
    raw = pickle.dumps(batch, protocol=2)
    raw = raw.replace(b"numpy._core.multiarray", numpy_module)  # numpy 1 wrote this name
    loaded = BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    assert loaded[b"labels"] == [3, 7] and loaded[b"filenames"][1] == b"ship_02.png"
    np.testing.assert_array_equal(loaded[b"data"], data)


# ------------------------------------------------------------------------ manifests and shards


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A tiny prepared dataset: (config, store, manifest)."""
    workdir = tmp_path_factory.mktemp("integrity")
    cfg = load_config(tiny_overrides(workdir, "run_id=integrity-1", "data.samples_per_shard=100"))
    result = prepare(cfg)
    return cfg, open_store(cfg.storage.root), result.manifest


def _write_manifest(store, dataset_id, manifest):
    store.put_bytes(json.dumps(manifest).encode(), f"{dataset_prefix(dataset_id)}/{MANIFEST}")


def test_a_tampered_manifest_is_refused_naming_the_dataset(prepared, tmp_path):
    _, store, manifest = prepared
    other = LocalStore(tmp_path / "store")
    tampered = json.loads(json.dumps(manifest))
    tampered["classes"][0] = "not-what-was-prepared"
    _write_manifest(other, manifest["id"], tampered)
    with pytest.raises(
        CorruptDataset, match=f"manifest of dataset {manifest['id']} .* does not hash"
    ):
        load_manifest(other, manifest["id"])


@pytest.mark.parametrize("name", ["../../outside.tar", "/tmp/outside.tar", "train/x.tar"])
def test_a_manifest_naming_a_path_outside_the_cache_is_refused(prepared, tmp_path, name):
    _, _, manifest = prepared
    store = LocalStore(tmp_path / "store")
    evil = json.loads(json.dumps(manifest))
    evil["splits"]["train"]["shards"][0]["name"] = name
    evil["id"] = manifest_id(evil)  # consistent: whoever wrote it also hashed it
    _write_manifest(store, evil["id"], evil)
    with pytest.raises(CorruptDataset, match="not a shard prepare writes"):
        load_manifest(store, evil["id"])


def test_a_dataset_id_that_is_a_path_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a dataset id"):
        load_manifest(LocalStore(tmp_path), "../../x")


def test_a_corrupt_stored_shard_is_refused_and_preparing_again_repairs_it(prepared, tmp_path):
    cfg, store, manifest = prepared
    shard = manifest["splits"]["val"]["shards"][0]
    key = f"{dataset_prefix(manifest['id'])}/{shard['name']}"
    stored = store.path / key
    data = bytearray(stored.read_bytes())
    data[600] ^= 0xFF  # one flipped byte inside the first member
    stored.write_bytes(bytes(data))

    cache = tmp_path / "cache"
    with pytest.raises(CorruptDataset, match=f"shard {shard['name']} of dataset {manifest['id']}"):
        fetch_shards(store, load_manifest(store, manifest["id"]), "val", cache)
    assert not (cache / manifest["id"] / shard["name"]).exists()  # never entered the cache

    again = prepare(cfg)
    assert again.dataset_id == manifest["id"]
    [local] = fetch_shards(store, load_manifest(store, manifest["id"]), "val", cache)
    assert sha256_file(local) == sha256_file(stored) == shard["sha256"]


def test_preparing_again_restores_a_tampered_manifest(prepared):
    cfg, store, manifest = prepared
    tampered = {**manifest, "classes": list(reversed(manifest["classes"]))}
    _write_manifest(store, manifest["id"], tampered)
    again = prepare(cfg)
    assert not again.reused
    assert load_manifest(store, manifest["id"])["classes"] == manifest["classes"]


def test_a_cached_shard_changed_on_disk_is_fetched_again(prepared, tmp_path):
    _, store, manifest = prepared
    cache = tmp_path / "cache"
    [local] = fetch_shards(store, manifest, "test", cache)
    good = local.read_bytes()
    local.write_bytes(good[:-512])  # truncated after it was verified
    [again] = fetch_shards(store, manifest, "test", cache)
    assert again.read_bytes() == good


def test_prepare_uploads_shards_as_they_fill_and_leaves_no_staging(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    held = []
    put_file = LocalStore.put_file

    def counting_put(self, local, key):
        held.append(len(list((tmp_path / "tmp").rglob("*.tar"))))
        return put_file(self, local, key)

    monkeypatch.setattr(LocalStore, "put_file", counting_put)
    cfg = load_config(tiny_overrides(tmp_path, "run_id=stream-1", "data.samples_per_shard=40"))
    result = prepare(cfg)
    shards = sum(len(s["shards"]) for s in result.manifest["splits"].values())
    assert len(held) == shards > 3
    assert max(held) <= 3  # one open shard per split at most, never the whole dataset
    store = open_store(cfg.storage.root)
    assert [
        k for k in store.list("datasets") if not k.startswith(f"datasets/{result.dataset_id}")
    ] == []


# ------------------------------------------------------------------- checksums of stored files


def test_a_file_corrupted_in_the_store_is_refused_on_download(tmp_path):
    store = LocalStore(tmp_path / "store")
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07" + bytes(range(256)) * 64)
    store.put_file(model, "models/r1/model.onnx")
    assert store.get_file("models/r1/model.onnx", tmp_path / "ok.onnx").read_bytes() == (
        model.read_bytes()
    )
    stored = store.path / "models/r1/model.onnx"
    stored.write_bytes(stored.read_bytes()[:-1] + b"\x00")
    target = tmp_path / "got.onnx"
    with pytest.raises(ChecksumError, match=f"{stored} is corrupt"):
        store.get_file("models/r1/model.onnx", target)
    assert not target.exists()
    assert store.list("models") == ["models/r1/model.onnx"]  # the checksum is not an artifact


def test_objects_read_whole_are_capped(tmp_path):
    store = LocalStore(tmp_path)
    store.put_bytes(b"x" * 101, "runs/r1/prepare.json")
    with pytest.raises(TooLarge, match="over 100 bytes"):
        store.get_bytes("runs/r1/prepare.json", max_bytes=100)
    assert store.get_bytes("runs/r1/prepare.json", max_bytes=101) == b"x" * 101


# ------------------------------------------------------------------------------------ run ids


@pytest.mark.parametrize("run_id", ["../../x", "a/b", ".hidden", "/abs"])
def test_a_run_id_that_is_not_a_plain_name_is_refused(run_id):
    with pytest.raises(ConfigError, match="run_id .* refused"):
        load_config([f"run_id={run_id}"])
