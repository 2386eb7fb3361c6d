"""The whole pipeline under kfp.local, as `make pipeline-run` runs it: classification, and
detection (the task without int8). What differs when int8 is rejected, and segmentation, are
the same steps in process (tests/unit/test_steps.py, test_tasks.py): a kfp.local run here costs
about two minutes, mostly its seven processes' imports."""

import json
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.integration.conftest import visionflow

pytestmark = pytest.mark.slow


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pipeline_runs_end_to_end_and_registers_the_model(tmp_path):
    first = _summary(visionflow("pipeline", "run", *TINY, f"workdir={tmp_path}"))
    assert (
        first["model_name"] == "visionflow-shapes"
        and first["model_version"] == 1
        and first["champion"]
    )
    assert first["onnx_max_abs_diff"] <= 1e-4 and first["torchscript_max_abs_diff"] <= 1e-4
    for uri in first["artifacts"].values():
        assert uri.startswith("models:/") or Path(uri).exists(), uri
    written = tmp_path / "runs" / first["run_id"] / "summary.json"
    assert json.loads(written.read_text()) == first
    # What the Kubeflow UI shows for quantize: both variants side by side, and which is faster.
    report = sorted((tmp_path / "kfp").glob("visionflow-training-*/quantize/report"))[0]
    verdict = {"int8": "int8 is faster than fp32 on this host", "fp32": "int8 is SLOWER than fp32"}
    assert verdict[first["serve_variant"]] in report.read_text()

    # What the Kubeflow UI would show: the evaluate step's confusion matrix as ClassificationMetrics.
    outputs = sorted((tmp_path / "kfp").glob("visionflow-training-*/evaluate/executor_output.json"))
    assert outputs
    artifacts = json.loads(outputs[-1].read_text())["artifacts"]
    matrix = artifacts["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [s["displayName"] for s in matrix["annotationSpecs"]][:2] == ["circle", "square"]


def test_detection_runs_through_the_pipeline(tmp_path):
    task, overrides = "detection", ["experiment=shapes_detection", "data.num_samples=200"]
    fast = ["trainer.max_epochs=1", "evaluate.min_score=0", "quantize.max_accuracy_drop=100",
            "quantize.bench_repeats=2", "quantize.calibration_samples=32"]  # fmt: skip
    summary = _summary(visionflow("pipeline", "run", *overrides, *fast, f"workdir={tmp_path}"))
    metric = "test_map_50"
    assert summary["task"] == task and 0.0 <= summary[metric] <= 1.0
    assert summary["model_name"] == f"visionflow-shapes-{task}" and summary["champion"]
    assert summary["onnx_max_abs_diff"] <= 1e-4
    assert summary["int8"] == "unsupported" and summary["int8_rejected"] is None
    assert summary["artifacts"]["onnx_int8"] == "" and summary["serve_variant"] == "fp32"
    # What the Kubeflow UI shows for the evaluation: an HTML report with the task's metric.
    report = next((tmp_path / "kfp").glob("visionflow-training-*/evaluate/report"))
    assert f"Test {metric.removeprefix('test_')}" in report.read_text()
