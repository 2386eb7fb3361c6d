"""Detection and segmentation through all six steps on shapes: their metrics, exports,
registered models and the service follow the task."""

from __future__ import annotations

import json
import tarfile

import mlflow
import numpy as np
import pytest

from tests.conftest import run_steps
from visionflow.storage import open_store, split_uri

pytestmark = pytest.mark.slow

# What each task does through the steps, not how well it learns: one epoch on 200 images.
SMALL = {
    "detection": ["experiment=shapes_detection", "data.num_samples=200"],
    "segmentation": [
        "experiment=shapes_segmentation",
        "data.num_samples=200",
        "data.image_size=32",
    ],
}
TEST_IMAGES = 20


@pytest.fixture(scope="session", params=sorted(SMALL))
def task_run(request, tmp_path_factory):
    """All six steps of a small detection or segmentation run, in process."""
    from visionflow.core.config import load_config

    task = request.param
    workdir = tmp_path_factory.mktemp(task)
    cfg = load_config(
        [*SMALL[task], f"workdir={workdir}", f"run_id={task}-1", "trainer.max_epochs=1",
         "evaluate.min_score=0", "quantize.bench_repeats=2", "quantize.max_accuracy_drop=100",
         "quantize.calibration_samples=32"]
    )  # fmt: skip
    return task, cfg, run_steps(cfg)


def test_shards_carry_boxes_and_class_masks(task_run, tmp_path):
    task, cfg, r = task_run
    store = open_store(cfg.storage.root)
    manifest = r["prepare"].manifest
    assert manifest["tasks"] == ["classification", "detection", "segmentation"]
    shard = manifest["splits"]["train"]["shards"][0]["name"]
    local = store.get_file(f"datasets/{manifest['id']}/{shard}", tmp_path / shard)
    with tarfile.open(local) as tar:
        key = next(n for n in tar.getnames() if n.endswith(".cls")).split(".")[0]
        label = int(tar.extractfile(f"{key}.cls").read())
        ann = json.loads(tar.extractfile(f"{key}.json").read())
        from PIL import Image

        mask = np.array(Image.open(tar.extractfile(f"{key}.mask.png")))
    assert ann["labels"] == [label]
    x0, y0, x1, y1 = ann["boxes"][0]
    inside = np.zeros_like(mask, bool)
    inside[y0:y1, x0:x1] = True
    assert set(np.unique(mask)) == {0, label + 1}  # background and the one shape's class
    assert not (mask[~inside] > 0).any()  # nothing of the shape lies outside its box


def test_training_monitors_the_task_metric(task_run):
    task, cfg, r = task_run
    t = r["train"]
    assert t.monitor == {"detection": "val/map", "segmentation": "val/miou"}[task]
    assert t.spec["task"] == task


def test_evaluate_reports_task_metrics_and_a_picture(task_run):
    task, cfg, r = task_run
    e = r["evaluate"]
    assert e.task == task and e.metric == {"detection": "map_50", "segmentation": "miou"}[task]
    assert e.num_samples == TEST_IMAGES
    expected = {"detection": {"map", "map_50", "map_75"}, "segmentation": {"miou", "pixel_acc"}}
    assert expected[task] <= set(e.metrics)
    if task == "segmentation":
        assert list(e.per_class) == ["background", *e.classes]
    png = open_store(cfg.storage.root).get_bytes(e.figure_png.split("artifacts/", 1)[1])
    assert png[:4] == b"\x89PNG"
    mlflow.set_tracking_uri(cfg.tracking.uri)
    logged = mlflow.get_run(r["train"].mlflow_run_id).data.metrics
    assert logged[f"test/{e.metric}"] == pytest.approx(e.score)


def test_export_is_checked_and_quantize_follows_the_task(task_run):
    task, cfg, r = task_run
    x, q = r["export"], r["quantize"]
    assert x.onnx.samples == TEST_IMAGES and x.onnx.agreement >= cfg.export.min_agreement
    assert x.torchscript.max_abs_diff <= cfg.export.atol
    if task == "detection":
        assert q.status == "unsupported" and q.int8_uri == "" and q.serve_variant == "fp32"
        assert "not supported for detection" in q.reason
    else:
        assert q.status == "stored" and q.metric == "miou"
        assert q.int8_uri.endswith("model.int8.onnx")
        # The fp32 ONNX file scores as evaluate scored the PyTorch model: same images, same metric.
        assert q.fp32_score == pytest.approx(r["evaluate"].score, abs=1e-3)


def test_registered_model_serves_task_outputs(task_run):
    task, cfg, r = task_run
    g = r["register"]
    assert g.model_name == f"visionflow-shapes-{task}"
    mlflow.set_tracking_uri(cfg.tracking.uri)
    version = mlflow.MlflowClient().get_model_version(g.model_name, str(g.model_version))
    assert version.tags["task"] == task
    model = mlflow.pyfunc.load_model(g.model_uri)
    size = r["export"].image_size
    out = model.predict(np.random.rand(2, 3, size, size).astype(np.float32))
    if task == "segmentation":
        assert out.shape == (2, 6, size, size)
    else:
        assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}
        assert out[0]["boxes"].shape[1:] == (4,)


def test_the_service_answers_in_the_original_images_pixels(task_run, tmp_path):
    """`visionflow serve` on the run's champion (a real uvicorn server): an upload three times as
    wide and twice as high as the model's input gets its boxes, or its mask, in the upload's own
    pixels, equal to the registered ONNX file's outputs on the image as evaluation transforms it
    (scaled back); /v2 infer answers with the task's output tensors."""
    import base64
    import io
    import os
    import sys
    from pathlib import Path

    import requests
    from omegaconf import OmegaConf
    from PIL import Image

    from tests.cluster_sim.servers import free_port, start, stop, wait_ok
    from visionflow.sessions import ort_session
    from visionflow.vision.images import Preprocess
    from visionflow.vision.tasks import get_task

    task, cfg, r = task_run
    name, store = r["register"].model_name, open_store(cfg.storage.root)
    manifest = r["prepare"].manifest
    shard = manifest["splits"]["test"]["shards"][0]["name"]
    local = store.get_file(f"datasets/{manifest['id']}/{shard}", tmp_path / shard)
    with tarfile.open(local) as tar:
        member = next(
            n for n in tar.getnames() if n.endswith((".png", ".jpg")) and ".mask." not in n
        )
        image = Image.open(tar.extractfile(member)).convert("RGB")
    size = image.width
    upload = image.resize((3 * size, 2 * size), Image.NEAREST)
    buf = io.BytesIO()
    upload.save(buf, format="PNG")
    x = Preprocess(OmegaConf.to_container(cfg.transforms.eval), size, task)(upload)
    src, key = split_uri(r["export"].onnx_uri)
    reference = get_task(task).ort_predictor(ort_session(src.get_file(key, tmp_path / "m.onnx")))

    port, log = free_port(), tmp_path / "serve.log"
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = start(
        [str(Path(sys.executable).with_name("visionflow")), "serve", f"{name}@champion",
         f"tracking.uri={cfg.tracking.uri}", f"workdir={tmp_path}", f"serve.port={port}",
         "serve.variant=fp32"], env, log,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ok(url + "/v2/health/ready", 180, proc, log)
        got = requests.post(
            f"{url}/v1/models/{name}:predict", files=[("files", ("up.png", buf.getvalue()))]
        )
        assert got.status_code == 200, got.text
        (pred,) = got.json()["predictions"]
        assert pred["file"] == "up.png"
        body = {"inputs": [{"name": "images", "datatype": "FP32", "shape": [1, *x.shape],
                            "data": x.ravel().tolist()}]}  # fmt: skip
        v2 = requests.post(f"{url}/v2/models/{name}/infer", json=body).json()
    finally:
        stop(proc)

    classes = r["evaluate"].classes
    if task == "detection":
        (ref,) = reference([x])
        assert len(pred["boxes"]) == len(ref["scores"])
        scale = np.array([3, 2, 3, 2])
        for served, box, label, score in zip(
            pred["boxes"], ref["boxes"], ref["labels"], ref["scores"], strict=True
        ):
            assert served["label"] == classes[int(label) - 1]
            assert served["score"] == pytest.approx(float(score), abs=1e-4)
            np.testing.assert_allclose(served["box"], np.clip(box * scale, 0, None), atol=0.05)
        outputs = {o["name"]: o for o in v2["outputs"]}
        assert set(outputs) == {"boxes", "labels", "scores"}
        np.testing.assert_allclose(outputs["scores"]["data"], ref["scores"], atol=1e-4)
    else:
        logits = reference(x[None])
        mask = np.array(Image.open(io.BytesIO(base64.b64decode(pred["mask_png"]))))
        assert mask.shape == (2 * size, 3 * size)  # the upload's height and width
        expected = np.kron(logits[0].argmax(0), np.ones((2, 3), np.int64))  # nearest, x3 by x2
        assert (mask == expected).mean() > 0.99
        shares = pred["class_share"]
        assert list(shares) == ["background", *classes]
        assert sum(shares.values()) == pytest.approx(1.0)
        assert shares["background"] == pytest.approx((mask == 0).mean())
        (out,) = v2["outputs"]
        assert out["shape"] == list(logits.shape)
        np.testing.assert_allclose(np.reshape(out["data"], logits.shape), logits, atol=1e-4)
