"""Batch inference's parts that need no registered model: the input listing and shard plan, bad
input, the checks of `predict.*`, and one shard's Parquet file for each task (typed columns, the
footer a resumed run reads instead of the rows)."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from omegaconf import OmegaConf
from PIL import Image

from visionflow.core.config import ConfigError, load_config
from visionflow.serving.model import Spec, describe
from visionflow.steps import predict as p
from visionflow.storage import LocalStore


def _png(path, colour=(200, 30, 30), size=(12, 10)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_input_is_listed_recursively_sorted_images_only_and_cut_into_a_fixed_plan(tmp_path):
    for name in ("b/2.png", "a/z/1.JPG", "a/0.jpeg", "c.webp", "d.bmp"):
        _png(tmp_path / "in" / name)
    (tmp_path / "in" / "notes.txt").write_text("not an image")
    (tmp_path / "in" / "a" / "labels.csv").write_text("x")
    source = p.Input.open(str(tmp_path / "in"), None)
    keys = source.list()
    assert keys == ["a/0.jpeg", "a/z/1.JPG", "b/2.png", "c.webp", "d.bmp"]
    assert source.read("b/2.png") == (tmp_path / "in" / "b" / "2.png").read_bytes()

    cfg = load_config(["run_id=plan-1", "predict.shard_size=2", f"predict.input={tmp_path}/in"])
    ref = type("Ref", (), {"name": "m", "__str__": lambda self: "m@champion"})()
    plan = p.make_plan(cfg, keys, ref, 3, "fp32", "classification")
    assert (plan["images"], plan["shards"], plan["model_version"]) == (5, 3, 3)
    assert p.shards_of(plan) == [keys[:2], keys[2:4], keys[4:]]
    assert [p.shard_name(i) for i in range(2)] == ["part-00000.parquet", "part-00001.parquet"]
    # The same tree gives the same plan: a rerun's shards hold the same images.
    assert p.shards_of(p.make_plan(cfg, p.Input.open(str(tmp_path / "in"), None).list(), ref, 3,
                                   "fp32", "classification")) == p.shards_of(plan)  # fmt: skip


def _bad_input(root, kind):
    if kind == "a file":
        (root / "f.png").write_bytes(b"x")
        return root / "f.png"
    if kind == "empty":
        (root / "empty").mkdir()
        return root / "empty"
    if kind == "no images":
        (root / "t").mkdir()
        (root / "t" / "a.txt").write_text("x")
        return root / "t"
    return root / "missing"


@pytest.mark.parametrize(
    "kind, message",
    [
        ("missing", "does not exist"),
        ("a file", "is not a directory"),
        ("empty", "no images there (empty)"),
        ("no images", "none of its 1 files is an image"),
    ],
)
def test_bad_input_is_named(tmp_path, kind, message):
    path = _bad_input(tmp_path, kind)
    with pytest.raises(p.PredictError) as err:
        p.Input.open(str(path), None).list()
    assert str(err.value).startswith(f"predict.input={path}: {message}")


def test_other_schemes_are_refused():
    with pytest.raises(p.PredictError, match="expected a local directory or s3://"):
        p.Input.open("ftp://host/images", None)


@pytest.mark.parametrize(
    "override, named",
    [
        ("predict.shard_size=0", "predict.shard_size=0"),
        ("predict.batch_size=-1", "predict.batch_size=-1"),
        ("predict.top_k=0", "predict.top_k=0"),
        ("predict.max_bad_fraction=1.5", "predict.max_bad_fraction=1.5"),
        ("predict.variant=fp16", "predict.variant='fp16'"),
        ("predict.model='no spaces allowed'", "predict.model"),
    ],
)
def test_predict_settings_are_checked_before_any_work(override, named):
    cfg = load_config([override])
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("'", ".")):
        p.check_config(cfg)


def test_output_goes_to_the_artifact_store_by_default_or_to_a_local_directory(tmp_path):
    cfg = load_config([f"storage.root={tmp_path}/store", "run_id=out-1"])
    store, prefix = p.output_location(cfg)
    assert (store.root, prefix) == (str(tmp_path / "store"), "predictions/out-1")
    cfg.predict.output = str(tmp_path / "elsewhere")
    store, prefix = p.output_location(cfg)
    assert (store.root, prefix) == (str(tmp_path / "elsewhere"), "")
    cfg.predict.output = "gs://bucket/x"
    with pytest.raises(ConfigError, match="predict.output=gs://bucket/x"):
        p.output_location(cfg)


def test_a_rerun_follows_its_plan_and_refuses_other_input_or_another_model():
    plan = {"run_id": "r1", "input": "/data/a", "model": "m@champion", "model_name": "m",
            "shard_size": 2, "top_k": 5}  # fmt: skip
    cfg = OmegaConf.create({"run_id": "r1", "predict": {"input": "", "model": "", "shard_size": 2,
                                                        "top_k": 5}})  # fmt: skip
    p._check_resumable(cfg, plan, "out/")  # nothing named: the plan's
    cfg.predict.model = "m@challenger"  # the same model under another alias: the plan's version
    p._check_resumable(cfg, plan, "out/")
    for key, value, message in (
        ("input", "/data/b", "was started on predict.input=/data/a"),
        ("model", "other@champion", "was started with predict.model=m@champion"),
    ):
        bad = OmegaConf.merge(cfg, {"predict": {key: value}})
        with pytest.raises(p.PredictError, match=message):
            p._check_resumable(bad, plan, "out/")
    with pytest.raises(p.PredictError, match="holds the predictions of run r1"):
        p._check_resumable(OmegaConf.merge(cfg, {"run_id": "r2"}), plan, "out/")


def test_prefetching_keeps_the_order_and_stays_within_its_bound():
    running, most = [0], [0]
    lock = threading.Lock()

    def work(i):
        with lock:
            running[0] += 1
            most[0] = max(most[0], running[0])
        time.sleep(0.001 * (7 - i % 7))  # later items finish first
        with lock:
            running[0] -= 1
        return i

    with ThreadPoolExecutor(8) as pool:
        got = list(p._prefetched(pool, work, range(40), ahead=3))
    assert got == list(range(40))
    assert 1 < most[0] <= 3


class _Stub:
    """A loaded version without a model: fixed raw outputs, the real `describe`."""

    def __init__(self, task):
        self.spec = Spec(task, ["circle", "square"], 8, None, "fp32")
        self.task = task

    def preprocess(self, image):
        return np.full((3, 8, 8), image.getpixel((0, 0))[0] / 255, np.float32)

    def infer(self, batch):
        outs = []
        for image in batch:
            hot = int(image[0, 0, 0] > 0.5)  # red images: class 1 (square)
            if self.task == "classification":
                outs.append(np.array([1.0, 3.0]) if hot else np.array([2.0, 0.0]))
            elif self.task == "detection":
                outs.append({"boxes": np.array([[0.0, 0.0, 4.0, 8.0]]),
                             "labels": np.array([1 + hot]), "scores": np.array([0.75])})  # fmt: skip
            else:
                logits = np.zeros((3, 8, 8))
                logits[1 + hot, :, :4] = 1.0  # the left half: circle or square
                outs.append(logits)
        return outs

    def describe(self, output, size, top_k):
        return describe(self.spec, output, size, top_k)


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_a_shard_file_has_typed_columns_and_a_footer_with_its_bad_images(tmp_path, task):
    _png(tmp_path / "in" / "a.png", (250, 0, 0), size=(16, 8))
    _png(tmp_path / "in" / "b.png", (10, 0, 0), size=(16, 8))
    (tmp_path / "in" / "c.png").write_bytes(b"\x89PNG truncated")
    source = p.Input.open(str(tmp_path / "in"), None)
    plan = {"task": task, "top_k": 2, "model_name": "m", "model_version": 4, "variant": "fp32"}
    with ThreadPoolExecutor(2) as pool:
        table, bad, histogram = p.run_shard(
            _Stub(task), source, ["a.png", "b.png", "c.png"], plan, 1, pool, None
        )
    assert [b["key"] for b in bad] == ["c.png"] and "ImageError" in bad[0]["reason"]
    assert "0x" not in bad[0]["reason"]  # no buffer address in the reason
    store = LocalStore(tmp_path / "out")
    meta = {"index": 0, "images": 3, "rows": 2, "bad": bad, "histogram": histogram}
    p._write_shard(store, "part-00000.parquet", table, meta)
    assert p._read_shard_meta(store, "part-00000.parquet", "x") == meta

    rows = pq.read_table(tmp_path / "out" / "part-00000.parquet")
    assert rows.column("key").to_pylist() == ["a.png", "b.png"]
    assert rows.column("model_version").to_pylist() == [4, 4]
    assert rows.column("width").to_pylist() == [16, 16]
    got = rows.to_pylist()
    if task == "classification":
        assert rows.schema.field("top_k").type == pa.list_(
            pa.struct([("label", pa.string()), ("score", pa.float64())])
        )
        assert [r["label"] for r in got] == ["square", "circle"]
        assert [t["label"] for t in got[0]["top_k"]] == ["square", "circle"]
        assert got[0]["score"] == pytest.approx(np.exp(3) / (np.exp(1) + np.exp(3)))
        assert histogram == {"square": 1, "circle": 1}
    elif task == "detection":
        assert got[0]["boxes"] == [{"box": [0.0, 0.0, 8.0, 8.0], "label": "square", "score": 0.75}]
        assert got[1]["boxes"][0]["label"] == "circle"  # boxes in the original image's pixels
        assert histogram == {"square": 1, "circle": 1}
    else:
        assert rows.schema.field("mask_png").type == pa.binary()
        import io

        mask = np.asarray(Image.open(io.BytesIO(got[0]["mask_png"])))
        assert mask.shape == (8, 16) and set(np.unique(mask)) == {0, 2}
        assert dict(got[0]["class_share"]) == {"background": 0.5, "circle": 0.0, "square": 0.5}
        assert histogram == {"background": 1.0, "circle": 0.5, "square": 0.5}  # sums of shares

    (tmp_path / "out" / "part-00001.parquet").write_bytes(b"someone else's file")
    with pytest.raises(p.PredictError, match="is not a shard this step wrote"):
        p._read_shard_meta(store, "part-00001.parquet", "part-00001.parquet")
