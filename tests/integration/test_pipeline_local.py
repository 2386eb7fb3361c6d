"""The whole pipeline under kfp.local, as `make pipeline-run` runs it, twice."""

import json
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.integration.conftest import visionflow

pytestmark = pytest.mark.slow


def _summary(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_pipeline_runs_end_to_end_and_registers_a_new_version_each_time(tmp_path):
    first = _summary(visionflow("pipeline", "run", *TINY, f"workdir={tmp_path}"))
    assert (
        first["model_name"] == "visionflow-shapes"
        and first["model_version"] == 1
        and first["champion"]
    )
    assert first["onnx_max_abs_diff"] <= 1e-4 and first["torchscript_max_abs_diff"] <= 1e-4
    for uri in first["artifacts"].values():
        assert uri.startswith("models:/") or Path(uri).exists(), uri
    written = tmp_path / "runs" / first["visionflow_run_id"] / "summary.json"
    assert json.loads(written.read_text()) == first

    second = _summary(visionflow("pipeline", "run", *TINY, f"workdir={tmp_path}"))
    assert second["model_version"] == 2
    assert second["champion"] == (second["champion_version"] == 2)
    assert second["dataset_id"] == first["dataset_id"]  # the same data, prepared once

    # What the Kubeflow UI would show: the evaluate step's confusion matrix as ClassificationMetrics.
    outputs = sorted((tmp_path / "kfp").glob("visionflow-training-*/evaluate/executor_output.json"))
    assert outputs
    artifacts = json.loads(outputs[-1].read_text())["artifacts"]
    matrix = artifacts["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [s["displayName"] for s in matrix["annotationSpecs"]][:2] == ["circle", "square"]
