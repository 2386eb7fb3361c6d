"""The six steps on a tiny run, in process, with a local artifact store and MLflow sqlite store."""

import json
import tarfile

import mlflow
import numpy as np
import pytest

from visionflow.storage import open_store, sha256_file
from visionflow.vision.inference import ort_session


def test_prepare_writes_shards_and_a_manifest_that_describe_each_other(tiny_run, tmp_path):
    cfg, r = tiny_run
    store = open_store(cfg.storage.root)
    m = json.loads(store.get_bytes(f"datasets/{r['prepare'].dataset_id}/manifest.json"))
    assert m["classes"] == ["circle", "square", "triangle", "star", "cross"]
    assert {s: m["splits"][s]["count"] for s in m["splits"]} == {
        "train": 480,
        "val": 60,
        "test": 60,
    }
    for info in m["splits"].values():
        assert sum(info["per_class"].values()) == info["count"]
        assert len(set(info["per_class"].values())) == 1  # stratified: equal classes stay equal
        for shard in info["shards"]:
            local = store.get_file(f"datasets/{m['id']}/{shard['name']}", tmp_path / shard["name"])
            assert sha256_file(local) == shard["sha256"]
            with tarfile.open(local) as tar:
                names = tar.getnames()
            assert sum(n.endswith(".png") and ".mask." not in n for n in names) == info["count"]


def test_prepare_is_content_addressed(tiny_run):
    from visionflow.steps.prepare import prepare

    cfg, r = tiny_run
    again = prepare(cfg)
    assert again.dataset_id == r["prepare"].dataset_id and again.reused


def test_train_stores_checkpoints_and_logs_to_mlflow(tiny_run):
    cfg, r = tiny_run
    t = r["train"]
    store = open_store(cfg.storage.root)
    assert store.exists("checkpoints/tiny-1/best.ckpt") and store.exists(
        "checkpoints/tiny-1/last.ckpt"
    )
    assert t.global_step == 2 * 15  # 2 epochs of 480 images in batches of 32
    mlflow.set_tracking_uri(cfg.tracking.uri)
    run = mlflow.get_run(t.mlflow_run_id)
    assert run.data.params["model.name"] == "simple_cnn"
    history = mlflow.MlflowClient().get_metric_history(t.mlflow_run_id, "val/acc")
    assert len(history) == 2  # one value per epoch
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(t.mlflow_run_id, "config")}
    assert "config/resolved.yaml" in artifacts


def test_evaluate_reports_a_consistent_confusion_matrix(tiny_run):
    cfg, r = tiny_run
    e = r["evaluate"]
    confusion = np.array(e.confusion)
    assert confusion.sum() == 60
    assert e.task == "classification" and e.metric == "accuracy"
    assert e.score == pytest.approx(np.trace(confusion) / 60)
    assert set(e.per_class) == set(e.classes)
    assert e.gate_passed == (e.score >= cfg.evaluate.min_score)
    assert (
        open_store(cfg.storage.root).get_bytes("runs/tiny-1/confusion_matrix.png")[:4] == b"\x89PNG"
    )


def test_export_matches_pytorch_and_has_a_dynamic_batch(tiny_run, tmp_path):
    cfg, r = tiny_run
    x = r["export"]
    assert x.onnx.max_abs_diff <= 1e-4 and x.onnx.agreement >= 0.999
    assert x.torchscript.max_abs_diff <= 1e-4
    store = open_store(cfg.storage.root)
    local = store.get_file("models/tiny-1/model.onnx", tmp_path / "m.onnx")
    session = ort_session(local)
    for batch in (1, 7):
        out = session.run(None, {"images": np.random.rand(batch, 3, 32, 32).astype(np.float32)})[0]
        assert out.shape == (batch, 5)


def test_quantize_measures_int8_against_fp32(tiny_run):
    cfg, r = tiny_run
    q = r["quantize"]
    assert open_store(cfg.storage.root).exists("models/tiny-1/model.int8.onnx")
    assert set(q.latency_ms) == {"fp32_b1", "int8_b1", "fp32_b64", "int8_b64"}
    assert q.speedup_b64 == pytest.approx(q.latency_ms["fp32_b64"] / q.latency_ms["int8_b64"])
    assert q.supported and q.metric == "accuracy"
    assert q.accuracy_drop == pytest.approx((q.fp32_score - q.int8_score) * 100)


def test_quantize_fails_past_the_accuracy_bound_and_stores_nothing(tiny_run):
    from visionflow.core.config import load_config
    from visionflow.steps.quantize import QuantizeError, quantize

    cfg, r = tiny_run
    strict = load_config(
        [
            f"workdir={cfg.workdir}",
            "experiment=shapes_tiny",
            "run_id=strict",
            "quantize.max_accuracy_drop=-1",
        ]
    )
    with pytest.raises(
        QuantizeError, match="more than quantize.max_accuracy_drop=-1.0; nothing was stored"
    ):
        quantize(strict, r["prepare"].dataset_id, r["export"].onnx_uri)
    assert not open_store(cfg.storage.root).exists("models/strict/model.int8.onnx")


def test_register_creates_a_servable_version_with_lineage(tiny_run):
    cfg, r = tiny_run
    g = r["register"]
    assert g.model_name == "visionflow-shapes" and g.model_version == 1 and g.champion
    mlflow.set_tracking_uri(cfg.tracking.uri)
    version = mlflow.MlflowClient().get_model_version("visionflow-shapes", "1")
    assert version.tags["dataset_manifest"] == r["prepare"].dataset_id
    assert version.tags["visionflow.run_id"] == "tiny-1"
    assert version.tags["git_commit"]
    model = mlflow.pyfunc.load_model("models:/visionflow-shapes@champion")
    assert model.predict(np.random.rand(3, 3, 32, 32).astype(np.float32)).shape == (3, 5)


def test_summary_has_every_promised_field(tiny_run):
    from visionflow.runs import summary

    cfg, _ = tiny_run
    s = summary(open_store(cfg.storage.root), "tiny-1", cfg.tracking.uri)
    for key in ("tracking_uri", "run_id", "model_name", "model_version", "champion", "task", "test_accuracy",
                "onnx_max_abs_diff", "torchscript_max_abs_diff", "int8_accuracy_drop", "int8_speedup_b64", "artifacts"):  # fmt: skip
        assert key in s
    json.dumps(s)
