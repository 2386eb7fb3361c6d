"""Detection and segmentation through all six steps on shapes, and their metrics and exports."""

from __future__ import annotations

import importlib
import json
import tarfile

import mlflow
import numpy as np
import pytest
import torch

from visionflow.storage import open_store, split_uri

STEPS = ("prepare", "train", "evaluate", "export", "quantize", "register")
SMALL = {
    "detection": ["experiment=shapes_detection", "data.num_samples=200"],
    "segmentation": [
        "experiment=shapes_segmentation",
        "data.num_samples=200",
        "data.image_size=32",
    ],
}


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
    results = {
        name: getattr(importlib.import_module(f"visionflow.steps.{name}"), name)(cfg)
        for name in STEPS
    }
    return task, cfg, results


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
    assert 0.0 <= t.best_score <= 1.0
    assert t.spec["task"] == task


def test_evaluate_reports_task_metrics_and_a_picture(task_run):
    task, cfg, r = task_run
    e = r["evaluate"]
    assert e.task == task and e.metric == {"detection": "map_50", "segmentation": "miou"}[task]
    assert e.score == e.metrics[e.metric] and 0.0 <= e.score <= 1.0
    assert e.num_samples == 20
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
    assert x.onnx.samples == 20 and x.onnx.agreement >= cfg.export.min_agreement
    assert x.torchscript.max_abs_diff <= cfg.export.atol
    if task == "detection":  # torch.export cannot take torchvision's detectors
        assert x.onnx_exporter.startswith("legacy (torch.export cannot")
    else:
        assert x.onnx_exporter == "dynamo"
    if task == "detection":
        assert q.status == "unsupported" and q.int8_uri == "" and q.serve_variant == "fp32"
        assert "not supported for detection" in q.reason
    else:
        assert q.status == "stored" and q.metric == "miou"
        assert q.int8_uri.endswith("model.int8.onnx")
        assert q.accuracy_drop == pytest.approx((q.fp32_score - q.int8_score) * 100)


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


def test_detection_onnx_matches_pytorch_on_every_detection(tmp_path):
    """Untrained detections are not confident, so the export step's parity check would be
    trivial here: compare all of them, boxes and scores, on real shapes images."""
    from visionflow.compose.models import build_model
    from visionflow.core.config import load_config
    from visionflow.sessions import ort_session
    from visionflow.vision.data.shapes import make_shape
    from visionflow.vision.tasks import get_task

    cfg = load_config(["experiment=shapes_detection", f"workdir={tmp_path}",
                       "+model.box_score_thresh=0.0"])  # fmt: skip
    torch.manual_seed(0)
    net = build_model(cfg.model, num_classes=5).eval()
    task = get_task("detection")
    path = task.export_onnx(net, tmp_path / "det.onnx", 64)
    images = [
        np.asarray(make_shape(1, i, 64).image, np.float32).transpose(2, 0, 1) / 255
        for i in range(3)
    ]
    ours = task.torch_predictor(net)(images)
    theirs = task.ort_predictor(ort_session(path))(images)
    for a, b in zip(ours, theirs, strict=True):
        assert len(a["boxes"]) > 0 and len(a["boxes"]) == len(b["boxes"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-2)  # pixels of 64
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)


def test_detection_metric_rewards_right_boxes_and_parity_catches_wrong_labels():
    from visionflow.vision.tasks import get_task

    task = get_task("detection")
    truth = [{"boxes": np.array([[4.0, 4.0, 30.0, 30.0]], np.float32), "labels": np.array([2])}]
    images = [torch.zeros(3, 32, 32)]

    def predicting(box, label):
        return lambda x: [{"boxes": np.array([box], np.float32), "labels": np.array([label]),
                           "scores": np.array([0.9], np.float32)}]  # fmt: skip

    loader = [(images, [{k: torch.from_numpy(v) for k, v in truth[0].items()}])]
    right, _ = task.evaluate(predicting([4, 4, 30, 30], 2), loader, ["a", "b"])
    wrong_place, _ = task.evaluate(predicting([20, 20, 31, 31], 2), loader, ["a", "b"])
    wrong_class, _ = task.evaluate(predicting([4, 4, 30, 30], 1), loader, ["a", "b"])
    assert right.score == pytest.approx(1.0)
    assert wrong_place.score == 0.0 and wrong_class.score == 0.0
    same = task.compare_batch(
        predicting([4, 4, 30, 30], 2)(None), predicting([4, 4, 30, 30], 2)(None)
    )
    other = task.compare_batch(
        predicting([4, 4, 30, 30], 2)(None), predicting([4, 4, 30, 30], 1)(None)
    )
    assert same == (0.0, 1.0, 1) and other[1] == 0.0


def test_segmentation_metric_ignores_255_and_counts_the_background():
    from visionflow.vision.tasks import get_task

    task = get_task("segmentation")
    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[0, :2, :2] = 1  # class 0 (label 1) in one corner
    masks[0, 3, 3] = 255  # ignored

    def logits_for(pred):
        return lambda x: np.eye(3, dtype=np.float32)[pred].transpose(0, 3, 1, 2)

    loader = [(torch.zeros(1, 3, 4, 4), masks)]
    perfect = masks.clone().numpy()
    perfect[perfect == 255] = 2  # a wrong guess on an ignored pixel costs nothing
    s, _ = task.evaluate(logits_for(perfect), loader, ["a", "b"])
    assert s.score == pytest.approx(1.0) and s.metrics["pixel_acc"] == pytest.approx(1.0)
    assert np.isnan(s.per_class["b"]["iou"])  # neither present nor predicted: left out
    half = perfect.copy()
    half[0, :2, 0] = 0  # 2 of the 4 class pixels called background
    s, _ = task.evaluate(logits_for(half), loader, ["a", "b"])
    assert s.per_class["a"]["iou"] == pytest.approx(0.5)
    assert s.per_class["background"]["iou"] == pytest.approx(11 / 13)
    assert s.score == pytest.approx((0.5 + 11 / 13) / 2)


@pytest.mark.slow
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
