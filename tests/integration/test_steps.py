"""The six steps on a tiny run, in process, with a local artifact store and MLflow sqlite store."""

import json
import subprocess
import tarfile

import mlflow
import numpy as np
import pytest

from tests.conftest import REPO
from visionflow.sessions import ort_session
from visionflow.storage import open_store, sha256_file

# The tiny run is computed once, on the worker that runs every module using it.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_run")]


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
    assert e.gate == "disabled" and e.gate_passed  # shapes_tiny: evaluate.gate=false, said so
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


def test_quantize_measures_int8_against_fp32_on_this_host(tiny_run):
    cfg, r = tiny_run
    q = r["quantize"]
    assert q.status == "stored" and q.metric == "accuracy" and q.reason == ""
    assert open_store(cfg.storage.root).exists("models/tiny-1/model.int8.onnx")
    assert set(q.latency_ms) == {"fp32_b1", "int8_b1", "fp32_b64", "int8_b64"}
    assert all(ms > 0 for ms in q.latency_ms.values())
    assert 0.0 <= q.int8_score <= 1.0 and 0.0 <= q.fp32_score <= 1.0
    assert q.settings["reduce_range"] is True and q.host["cpu"]
    assert q.parity.samples == 60  # agreement is checked on a trained model: test_int8.py


def _weights(path):
    """The quantized weights of an int8 ONNX model: int8 initializers that feed a
    DequantizeLinear, with their zero points."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    init = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if (
            node.op_type == "DequantizeLinear"
            and init.get(node.input[0], np.zeros(0)).dtype == np.int8
        ):
            yield init[node.input[0]], init[node.input[2]]


def test_int8_weights_fit_seven_bits_so_no_cpu_saturates(tiny_run, tmp_path):
    """Portable by construction: VPMADDUBSW (AVX2, AVX-512 without VNNI) adds two uint8 x int8
    products in 16 bits; with |w| <= 64 the sum stays below 32,767 on every host."""
    cfg, r = tiny_run
    local = open_store(cfg.storage.root).get_file(
        "models/tiny-1/model.int8.onnx", tmp_path / "q.onnx"
    )
    weights = list(_weights(local))
    assert len(weights) >= 4  # every conv and the classifier
    for w, zero_point in weights:
        assert np.all(zero_point == 0) and np.abs(w.astype(int)).max() <= 64
        assert 2 * 255 * np.abs(w.astype(int)).max() <= 32767


def test_host_cpu_names_the_model_and_its_int8_flags(tmp_path):
    from visionflow.host import host_cpu

    info = tmp_path / "cpuinfo"
    cpu = "flags\t\t: fpu sse4_1 avx avx2 fma avx512f avx512bw avx512_vnni amx_int8 rdrand\n"
    info.write_text(f"processor\t: 0\nmodel name\t: Xeon Test\n{cpu}\nprocessor\t: 1\n{cpu}")
    host = host_cpu(info)
    assert host["cpu"] == "Xeon Test"
    assert host["flags"] == "sse4_1 avx avx2 fma avx512f avx512bw avx512_vnni amx_int8"
    assert host_cpu(tmp_path / "absent")["flags"] == ""


def _quantize_as(tiny_run, run_id: str, *more: str):
    """quantize again under `run_id`, on the tiny run's dataset and export."""
    from visionflow.core.config import load_config
    from visionflow.steps.quantize import quantize

    cfg, r = tiny_run
    again = load_config(
        [f"workdir={cfg.workdir}", "experiment=shapes_tiny", f"run_id={run_id}", *more]
    )
    return again, quantize(again, r["prepare"].dataset_id, r["export"])


def test_int8_that_loses_too_much_is_rejected_and_the_run_goes_on(tiny_run):
    # A bound no model can meet on any host: the drop is at least -100 points.
    cfg, q = _quantize_as(tiny_run, "rejected", "quantize.max_accuracy_drop=-101")
    assert q.status == "rejected" and q.int8_uri == "" and q.serve_variant == "fp32"
    assert q.reason.startswith("int8 rejected: it loses")
    assert "more than quantize.max_accuracy_drop=-101.0" in q.reason
    assert q.latency_ms == {} and q.speedup_b64 is None  # a rejected model is not timed
    store = open_store(cfg.storage.root)
    assert not store.exists("models/rejected/model.int8.onnx")

    # The run goes on: register takes the fp32 model, and says why there is no int8 file.
    from visionflow.runs import summary
    from visionflow.steps.register import register

    _, r = tiny_run
    cfg.register.model_name = "visionflow-rejected"
    g = register(cfg, r["prepare"].dataset_id, r["evaluate"], r["export"], q)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    version = mlflow.MlflowClient().get_model_version(g.model_name, str(g.model_version))
    assert version.tags["int8"] == "rejected" and version.tags["int8_rejected"] == q.reason
    assert "int8_accuracy_drop" not in version.tags and version.tags["serve_variant"] == "fp32"
    assert "reduce_range=True" in version.tags["int8_settings"]
    files = {
        a.path for a in mlflow.MlflowClient().list_artifacts(version.run_id, "model/artifacts")
    }
    assert "model/artifacts/model.onnx" in files and not any("int8" in f for f in files)
    model = mlflow.pyfunc.load_model(g.model_uri)
    assert model.predict(np.random.rand(2, 3, 32, 32).astype(np.float32)).shape == (2, 5)
    s = summary(cfg.tracking.uri, "rejected", r["prepare"].uri, r["train"], r["evaluate"],
                r["export"], q, g)  # fmt: skip
    assert s["int8"] == "rejected" and s["int8_rejected"] == q.reason
    assert s["int8_accuracy_drop"] is s["int8_speedup_b64"] is s["faster_variant"] is None
    assert s["serve_variant"] == "fp32" and s["artifacts"]["onnx_int8"] == ""


def test_int8_is_served_only_where_it_is_faster_at_both_batch_sizes(tiny_run, monkeypatch):
    from visionflow.steps import quantize as step

    # Known latencies: int8 twice as fast at batch 1, half as fast at batch 64.
    ms = {"fp32_b1": 2.0, "int8_b1": 1.0, "fp32_b64": 30.0, "int8_b64": 60.0}
    monkeypatch.setattr(step, "bench_batches", lambda *a, **k: dict(ms))
    _, q = _quantize_as(tiny_run, "mixed")
    assert q.status == "stored" and q.speedup_b1 == 2.0 and q.speedup_b64 == 0.5
    assert q.faster_variant == {"batch_1": "int8", "batch_64": "fp32"}
    assert q.serve_variant == "fp32"
    ms["int8_b64"] = 15.0  # now faster at both
    _, q = _quantize_as(tiny_run, "faster")
    assert q.faster_variant == {"batch_1": "int8", "batch_64": "int8"}
    assert q.serve_variant == "int8" and q.speedup_b64 == 2.0


def test_required_int8_fails_the_step_and_stores_nothing(tiny_run):
    from visionflow.retry import is_transient
    from visionflow.steps.quantize import QuantizeError

    with pytest.raises(QuantizeError, match="quantize.required is set; nothing was stored") as err:
        _quantize_as(
            tiny_run, "strict", "quantize.max_accuracy_drop=-101", "quantize.required=true"
        )
    assert not is_transient(err.value)  # so no retry runs it again
    cfg, _ = tiny_run
    store = open_store(cfg.storage.root)
    assert not store.exists("models/strict/model.int8.onnx")
    assert not store.exists("runs/strict/quantize.json")


def test_the_quantize_component_fails_once_when_int8_is_required(tiny_run, tmp_path, monkeypatch):
    """What `make pipeline-run` does with quantize.required=true, one link at a time: the
    component runs its step once (no in-process retry for this failure) and the compiled
    pipeline has no KFP retry on quantize (test_pipeline_spec.py), which kfp.local honours."""
    from kfp import dsl

    from visionflow.kfp.components.quantize import quantize as component
    from visionflow.kfp.io import write_pointer
    from visionflow.steps import quantize as step

    cfg, r = tiny_run
    calls = []
    real = step.quantize_int8
    monkeypatch.setattr(step, "quantize_int8", lambda *a, **k: calls.append(1) or real(*a, **k))
    ids = {"dataset_id": r["prepare"].dataset_id}
    onnx = dsl.Model(uri=str(tmp_path / "onnx"))
    write_pointer(onnx, r["export"].onnx_uri, r["export"])  # as the export component does
    artifacts = dict(
        dataset=dsl.Dataset(uri=str(tmp_path / "dataset"), metadata=ids),
        onnx=onnx,
        int8=dsl.Model(uri=str(tmp_path / "int8")),
        metrics=dsl.Metrics(uri=str(tmp_path / "metrics")),
        report=dsl.Markdown(uri=str(tmp_path / "report")),
    )
    overrides = [f"workdir={cfg.workdir}", "experiment=shapes_tiny",
                 "quantize.max_accuracy_drop=-101", "quantize.required=true"]  # fmt: skip
    with pytest.raises(step.QuantizeError, match="quantize.required is set"):
        component.python_func(overrides=overrides, run_id="required", **artifacts)
    assert calls == [1]
    assert not open_store(cfg.storage.root).exists("models/required/model.int8.onnx")


def test_register_creates_a_servable_version_with_lineage(tiny_run):
    cfg, r = tiny_run
    g = r["register"]
    assert g.model_name == "visionflow-shapes" and g.model_version == 1 and g.champion
    mlflow.set_tracking_uri(cfg.tracking.uri)
    version = mlflow.MlflowClient().get_model_version("visionflow-shapes", "1")
    assert version.tags["dataset_manifest"] == r["prepare"].dataset_id
    assert version.tags["visionflow.run_id"] == "tiny-1"
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True)
    assert version.tags["git_commit"] == head.stdout.strip() != ""  # the commit, not "unknown"
    q = r["quantize"]
    assert version.tags["int8"] == "stored" and "int8_rejected" not in version.tags
    assert version.tags["quantize_host_cpu"].startswith(q.host["cpu"])
    assert version.tags["quantize_host_flags"] == (q.host["flags"] or "none read")
    assert f"(int8 at {q.speedup_b64:.2f}x fp32's speed)" in version.tags["faster_variant"]
    model = mlflow.pyfunc.load_model("models:/visionflow-shapes@champion")
    assert model.model_config["variant"] == version.tags["serve_variant"] == q.serve_variant
    assert model.predict(np.random.rand(3, 3, 32, 32).astype(np.float32)).shape == (3, 5)


def test_summary_has_every_promised_field(tiny_run):
    from visionflow.runs import summary

    cfg, r = tiny_run
    steps = [r[step] for step in ("train", "evaluate", "export", "quantize", "register")]
    s = summary(cfg.tracking.uri, "tiny-1", r["prepare"].uri, *steps)
    for key in ("tracking_uri", "run_id", "model_name", "model_version", "champion", "task", "test_accuracy",
                "onnx_max_abs_diff", "torchscript_max_abs_diff", "int8_accuracy_drop", "int8_speedup_b64", "artifacts"):  # fmt: skip
        assert key in s
    q = tiny_run[1]["quantize"]
    assert s["int8"] == "stored" and s["int8_rejected"] is None
    assert s["int8_speedup_b64"] == q.speedup_b64 and s["serve_variant"] == q.serve_variant
    assert s["faster_variant"]["batch_64"] == ("int8" if q.speedup_b64 > 1 else "fp32")
    assert s["quantize_host"].startswith(q.host["cpu"])
    json.dumps(s)


def test_the_report_says_plainly_when_int8_is_slower_or_rejected():
    from visionflow.kfp.reports import quantize_report
    from visionflow.results import Parity, QuantizeResult
    from visionflow.steps.quantize import speed_verdict

    host = {"cpu": "AMD EPYC", "arch": "x86_64", "flags": "avx2 fma"}
    measured = dict(metric="accuracy", settings={"reduce_range": True}, host=host, fp32_score=1.0,
                    int8_score=0.999, accuracy_drop=0.1, parity=Parity(0.01, 1.0, 600))  # fmt: skip
    slower = QuantizeResult(
        "m.int8.onnx", "stored", "", **measured, speedup_b1=1.2, speedup_b64=0.91,
        latency_ms={"fp32_b1": 1.2, "int8_b1": 1.0, "fp32_b64": 30.0, "int8_b64": 33.0},
        faster_variant={"batch_1": "int8", "batch_64": "fp32"},
    )  # fmt: skip
    verdict = speed_verdict(slower)
    assert verdict.startswith(
        "int8 is SLOWER than fp32 at batch 64 on this host, AMD EPYC (x86_64; avx2 fma):"
    )
    assert "1.20x fp32's speed at batch 1 and 0.91x at batch 64" in verdict
    assert f"**{verdict}**" in quantize_report(slower)
    rejected = QuantizeResult("", "rejected", "int8 rejected: it loses 5.00 points", **measured)
    report = quantize_report(rejected)
    assert "**int8 rejected: it loses 5.00 points**; the run goes on with fp32." in report
    assert "ms per batch" not in report  # a rejected model is not timed
