"""The whole pipeline under kfp.local, as `make pipeline-run` runs it, for detection: the task
without int8. Classification on a folder of images: tests/features/workflows.feature; what
differs when int8 is rejected, and segmentation, are the same steps in process (test_steps.py,
test_task_runs.py): a kfp.local run here costs about two minutes, mostly its seven processes'
imports."""

import json

import pytest
from mlflow import MlflowClient

from tests.integration.conftest import visionflow

pytestmark = pytest.mark.slow


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_detection_runs_through_the_pipeline(tmp_path):
    task, overrides = "detection", ["experiment=shapes_detection", "data.num_samples=200"]
    fast = ["trainer.max_epochs=1", "evaluate.min_score=0", "quantize.max_accuracy_drop=100",
            "quantize.bench_repeats=2", "quantize.calibration_samples=32"]  # fmt: skip
    summary = _summary(visionflow("pipeline", "run", *overrides, *fast, f"workdir={tmp_path}"))
    metric = "test_map_50"
    assert summary["task"] == task and metric in summary
    name = f"visionflow-shapes-{task}"
    assert summary["model_name"] == name and summary["model_version"] == 1
    champion = MlflowClient(summary["tracking_uri"]).get_model_version_by_alias(name, "champion")
    assert champion.version == "1" and champion.tags["task"] == task
    assert summary["onnx_max_abs_diff"] <= 1e-4
    assert summary["int8"] == "unsupported" and summary["int8_rejected"] is None
    assert summary["artifacts"]["onnx_int8"] == "" and summary["serve_variant"] == "fp32"
    # What the Kubeflow UI shows for the evaluation: an HTML report with the task's metric.
    report = next((tmp_path / "kfp").glob("visionflow-training-*/evaluate/report"))
    assert f"Test {metric.removeprefix('test_')}" in report.read_text()
