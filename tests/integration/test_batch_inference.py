"""Batch inference with a registered model: the batch pipeline under kfp.local, killed with
SIGKILL and rerun; an S3 prefix in and out; too many undecodable images; bad input.

The model is the tiny run's, registered again in a registry of this module's own (the session's
is left as other tests expect it): version 1, aliases `champion` and `batch`.

The pipeline run is killed as soon as its first shard is in the store. Its last two shards hold
large images (3000x3000, a fraction of a second each to decode) so that it is still predicting
when it is killed; the rerun must skip the finished shards (their files untouched), predict the
others, and hold every image exactly once, with the model version the alias named when the run
started, though the alias has moved to version 2 meanwhile.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from tests.integration.conftest import BUCKET, S3_ENV, visionflow

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_run")]

NAME = "visionflow-shapes"
CORRUPT = {"a/broken.png": b"not an image at all", "b/cut.jpg": b"\xff\xd8\xff\xe0 cut short"}


@dataclass
class Registry:
    root: Path
    uri: str
    version: int


@pytest.fixture(scope="module")
def registry(tiny_run, tmp_path_factory) -> Registry:
    """The tiny run's model in a registry (and an artifact store) of this module's own."""
    import mlflow

    from visionflow.steps.register import register

    cfg, r = tiny_run
    root = tmp_path_factory.mktemp("batch-registry")
    shutil.copytree(cfg.storage.root, root / "artifacts")  # register records its result there
    own = copy.deepcopy(cfg)
    own.workdir, own.storage.root = str(root), str(root / "artifacts")
    own.tracking.uri = f"sqlite:///{root}/mlflow.db"
    assert r["evaluate"].gate == "disabled"  # shapes_tiny's: the model may be champion
    result = register(own, r["prepare"].dataset_id, r["evaluate"], r["export"], r["quantize"])
    assert (result.model_name, result.model_version, result.champion) == (NAME, 1, True)
    mlflow.MlflowClient(own.tracking.uri).set_registered_model_alias(NAME, "batch", "1")
    return Registry(root, own.tracking.uri, 1)


@pytest.fixture(scope="module")
def reference(registry, tmp_path_factory):
    """What LoadedVersion says of an image's bytes, for a variant: its labels, best first."""
    import mlflow

    from visionflow.serving.model import load_version
    from visionflow.vision.images import decode_image

    mlflow.set_tracking_uri(registry.uri)
    work = tmp_path_factory.mktemp("reference")
    loaded, seen = {}, {}

    def predict(data: bytes, variant: str) -> dict:
        key = (hashlib.sha256(data).hexdigest(), variant)
        if key not in seen:
            mlflow.set_tracking_uri(registry.uri)
            if variant not in loaded:
                loaded[variant] = load_version(NAME, registry.version, variant, workdir=work)
            model = loaded[variant]
            image = decode_image(data)
            (output,) = model.infer(model.preprocess(image)[None])
            seen[key] = model.describe(output, image.size, 5)["labels"]
        return seen[key]

    return predict


def _small_images(root: Path, count: int) -> dict[str, bytes]:
    """Shapes as PNG and JPEG files in two folders, plus CORRUPT and a file that is no image."""
    from visionflow.vision.data.shapes import make_shape

    files = {}
    for i in range(count):
        buf = io.BytesIO()
        make_shape(11, i, 32).image.save(buf, format="JPEG" if i % 3 == 0 else "PNG")
        key = f"{'ab'[i % 2]}/shape-{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"
        files[key] = buf.getvalue()
    files.update(CORRUPT)
    for key, data in files.items():
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        (root / key).write_bytes(data)
    (root / "a" / "README.txt").write_text("not an image: left out")
    return files


def _large_png() -> bytes:
    n = 3000
    y, x = np.mgrid[0:n, 0:n]
    pixels = np.stack([x * 255 // n, y * 255 // n, (x + y) * 255 // (2 * n)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _rows(directory: Path) -> list[dict]:
    rows = []
    for part in sorted(directory.glob("part-*.parquet")):
        rows += pq.read_table(part).to_pylist()
    return rows


def _check_rows(rows: list[dict], files: dict[str, bytes], reference, version: int) -> None:
    """One row per decodable image, in key order, each as LoadedVersion predicts it."""
    keys = [r["key"] for r in rows]
    assert keys == sorted(k for k, data in files.items() if data not in CORRUPT.values())
    for row in rows:
        assert (row["model_name"], row["model_version"]) == (NAME, version)
        labels = reference(files[row["key"]], row["variant"])
        assert row["label"] == labels[0]["label"], row["key"]
        assert row["score"] == pytest.approx(labels[0]["score"], abs=1e-5), row["key"]
        assert [t["label"] for t in row["top_k"]] == [t["label"] for t in labels], row["key"]
        assert [t["score"] for t in row["top_k"]] == pytest.approx(
            [t["score"] for t in labels], abs=1e-5
        )


def test_batch_pipeline_under_kfp_local_resumes_after_sigkill(tmp_path, registry, reference):
    import mlflow

    files = _small_images(tmp_path / "images", 10)  # 12 images: shards 1-3 of 4 images
    large = _large_png()
    for i in range(8):  # shards 4-5: slow enough to be killed before they are done
        files[f"z/large-{i}.png"] = large
        (tmp_path / "images" / "z").mkdir(exist_ok=True)
        (tmp_path / "images" / "z" / f"large-{i}.png").write_bytes(large)
    out = tmp_path / "store" / "predictions" / "batch-1"
    args = ["pipeline", "run", "--pipeline", "batch_inference", f"workdir={tmp_path}/work",
            f"storage.root={tmp_path}/store", f"tracking.uri={registry.uri}",
            f"predict.model={NAME}@batch", f"predict.input={tmp_path}/images",
            "predict.shard_size=4", "predict.max_bad_fraction=0.2", "run_id=batch-1"]  # fmt: skip
    with open(tmp_path / "killed.log", "w") as log_file:
        proc = subprocess.Popen(
            [str(Path(sys.executable).with_name("visionflow")), *args],
            stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + 420
        while proc.poll() is None and time.monotonic() < deadline:
            if (out / "part-00000.parquet").exists():
                os.killpg(proc.pid, signal.SIGKILL)  # the kfp.local parent and its step
                break
            time.sleep(0.01)
        proc.wait()
    killed_log = (tmp_path / "killed.log").read_text()
    assert proc.returncode == -signal.SIGKILL, (
        f"not killed ({proc.returncode}): {killed_log[-3000:]}"
    )
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in out.glob("part-*.parquet")}
    assert "part-00000.parquet" in before
    assert "part-00004.parquet" not in before, "the run finished its shards before it was killed"
    plan = json.loads((out / "_plan.json").read_text())
    assert (plan["model_version"], plan["images"], plan["shards"]) == (1, 20, 5)

    # Meanwhile the alias moves on: the rerun keeps the version its run started with.
    client = mlflow.MlflowClient(registry.uri)
    v1 = client.get_model_version(NAME, "1")
    v2 = client.create_model_version(NAME, v1.source, v1.run_id)
    client.set_registered_model_alias(NAME, "batch", v2.version)

    again = visionflow(*args)
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-3000:]
    summary = json.loads(again.stdout.strip().splitlines()[-1])
    assert summary["shards_skipped"] == len(before) and summary["shards"] == 5
    for name, (data, mtime) in before.items():  # not redone: the same file, untouched
        assert (out / name).read_bytes() == data and (out / name).stat().st_mtime_ns == mtime
        assert f"({name}): finished by an earlier attempt, skipped" in again.stdout
    for i in range(len(before), 5):
        assert f"(part-{i:05d}.parquet): 4 images" in again.stdout

    assert summary["model_version"] == 1
    _check_rows(_rows(out), files, reference, version=1)
    assert sorted(b["key"] for b in summary["bad_images"]) == sorted(CORRUPT)
    assert all("not a decodable image" in b["reason"] for b in summary["bad_images"])
    assert json.loads((out / "_bad_images.json").read_text()) == summary["bad_images"]
    assert summary["images"] == 20 and summary["predicted"] == 18
    assert summary["images_per_s"] > 0
    predicted = [r["label"] for r in _rows(out)]
    assert summary["histogram"] == {c: float(predicted.count(c)) for c in summary["histogram"]}
    assert set(summary["histogram"]) == {"circle", "square", "triangle", "star", "cross"}

    # What the Kubeflow UI shows: the metrics and the report of the run that finished.
    run_dir = sorted((tmp_path / "work" / "kfp").glob("visionflow-batch-inference-*"))[-1]
    outputs = json.loads((run_dir / "predict" / "executor_output.json").read_text())
    metrics = outputs["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert metrics["images"] == 20 and metrics["bad_images"] == 2 and metrics["images_per_s"] > 0
    assert {k: v for k, v in metrics.items() if k.startswith("class_")} == {
        f"class_{c}": n for c, n in summary["histogram"].items()
    }
    report = (run_dir / "predict" / "report").read_text()
    assert "data:image/png;base64," in report and "b/cut.jpg" in report
    assert f"{summary['shards_skipped']} finished before this attempt" in report

    # MLflow: under the run of this run_id, the figures and the histogram's picture.
    (run,) = client.search_runs(
        [client.get_experiment_by_name("visionflow").experiment_id],
        filter_string="tags.`visionflow.run_id` = 'batch-1'",
    )
    assert run.info.run_id == summary["mlflow_run_id"]
    assert run.data.metrics["predict/images"] == 20 and run.data.metrics["predict/bad_images"] == 2
    assert run.data.metrics["predict/images_per_s"] > 0
    for c, n in summary["histogram"].items():
        assert run.data.metrics[f"predict/class/{c}"] == n
    assert run.data.tags["predict.model"] == f"{NAME}/1"
    names = {a.path for a in client.list_artifacts(run.info.run_id, "predict")}
    assert {"predict/_class_histogram.png", "predict/bad_images.json"} <= names


def test_s3_input_too_many_bad_images_then_a_resumed_run(
    tmp_path, registry, reference, s3_server, monkeypatch
):
    from visionflow.core.config import load_config
    from visionflow.steps.predict import PredictError, predict

    for key, value in {**S3_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint}.items():
        monkeypatch.setenv(key, value)
    files = _small_images(tmp_path / "images", 7)
    files = {f"0-{k}" if k in CORRUPT else k: v for k, v in files.items()}  # corrupt ones first
    client = s3_server.client()
    for key, data in [*files.items(), ("a/README.txt", b"no image")]:
        client.put_object(BUCKET, f"incoming/day-1/{key}", io.BytesIO(data), len(data))
    client.put_object(BUCKET, "incoming/day-10/x.png", io.BytesIO(b"x"), 1)  # another prefix
    overrides = [f"workdir={tmp_path}/work", f"storage.root=s3://{BUCKET}/store",
                 f"tracking.uri={registry.uri}", f"predict.model={NAME}@champion",
                 f"predict.input=s3://{BUCKET}/incoming/day-1", "predict.shard_size=3",
                 "predict.variant=fp32", "run_id=s3-1"]  # fmt: skip
    out = "store/predictions/s3-1"

    # 2 of 9 images cannot be decoded, more than 10%: the step fails after the first shard,
    # naming them; that shard is kept, nothing after it is written.
    with pytest.raises(PredictError) as err:
        predict(load_config([*overrides, "predict.max_bad_fraction=0.1"]))
    message = str(err.value)
    assert "2 of the 9 images" in message and "predict.max_bad_fraction=0.1" in message
    assert "0-a/broken.png (ImageError" in message and "0-b/cut.jpg (ImageError" in message
    assert "rerun with run_id=s3-1" in message
    assert s3_server.keys(prefix=out) == [f"{out}/{n}" for n in
                                          ("_bad_images.json", "_plan.json", "part-00000.parquet")]  # fmt: skip
    first = client.get_object(BUCKET, f"{out}/part-00000.parquet").read()

    # Rerun with a higher bound: the kept shard is skipped, its bad images still reported.
    result = predict(load_config([*overrides, "predict.max_bad_fraction=0.25"]))
    assert (result.images, result.predicted, result.shards, result.shards_skipped) == (9, 7, 3, 1)
    assert sorted(b["key"] for b in result.bad_images) == ["0-a/broken.png", "0-b/cut.jpg"]
    assert client.get_object(BUCKET, f"{out}/part-00000.parquet").read() == first
    assert result.output == f"s3://{BUCKET}/{out}"
    local = tmp_path / "parts"
    local.mkdir()
    for i in range(3):
        client.fget_object(
            BUCKET, f"{out}/part-{i:05d}.parquet", str(local / f"part-{i:05d}.parquet")
        )
    _check_rows(_rows(local), files, reference, version=1)
    record = json.loads(client.get_object(BUCKET, "store/runs/s3-1/predict.json").read())
    assert record["shards_skipped"] == 1 and record["model_version"] == 1


def test_bad_input_fails_before_anything_is_written(tmp_path, registry, capsys):
    from visionflow.cli import main

    common = [f"workdir={tmp_path}/work", f"storage.root={tmp_path}/store",
              f"tracking.uri={registry.uri}", "run_id=bad-1"]  # fmt: skip
    images = tmp_path / "images"
    _small_images(images, 2)
    (tmp_path / "empty").mkdir()
    cases = [
        ([f"predict.model={NAME}@champion", f"predict.input={tmp_path}/nowhere"],
         f"predict.input={tmp_path}/nowhere: does not exist"),
        ([f"predict.model={NAME}@champion", f"predict.input={tmp_path}/empty"],
         f"predict.input={tmp_path}/empty: no images there (empty)"),
        ([f"predict.model={NAME}@no-such-alias", f"predict.input={images}"],
         f"model {NAME}@no-such-alias: not in the registry"),
        ([f"predict.model={NAME}/99", f"predict.input={images}"],
         f"model {NAME}/99: not in the registry"),
        (["predict.model=no-such-model", f"predict.input={images}"],
         "model no-such-model: not in the registry"),
        ([f"predict.input={images}"], "predict.model is not set"),
    ]  # fmt: skip
    for overrides, message in cases:  # `visionflow predict ...`, in this process
        code = main(["predict", *common, *overrides])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code != 0 and err.startswith("visionflow: error: ") and message in err, err
        assert not (tmp_path / "store" / "predictions").exists(), overrides
