"""The pipeline against a real S3-protocol server (moto, standing in for MinIO) and a real
MLflow tracking server, both on 127.0.0.1: everything it promises is really stored there."""

import json

import pytest

from tests.conftest import TINY
from tests.integration.conftest import BUCKET, S3_ENV, visionflow

pytestmark = pytest.mark.slow


def test_pipeline_stores_everything_in_s3_and_mlflow(tmp_path, s3_server, mlflow_server):
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint, "MLFLOW_TRACKING_URI": mlflow_server}
    proc = visionflow(
        "pipeline", "run", *TINY, "storage=minio", "tracking=server", f"workdir={tmp_path}", env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    run = summary["visionflow_run_id"]

    keys = s3_server.keys()
    dataset = f"datasets/{summary['dataset_id']}"
    manifest = json.loads(s3_server.client().get_object(BUCKET, f"{dataset}/manifest.json").read())
    for split in ("train", "val", "test"):
        for shard in manifest["splits"][split]["shards"]:
            assert f"{dataset}/{shard['name']}" in keys
    for key in (f"checkpoints/{run}/best.ckpt", f"checkpoints/{run}/last.ckpt", f"models/{run}/model.onnx",
                f"models/{run}/model.int8.onnx", f"models/{run}/model.torchscript.pt", f"runs/{run}/register.json"):  # fmt: skip
        assert key in keys, key
    assert summary["artifacts"]["onnx"] == f"s3://{BUCKET}/models/{run}/model.onnx"
    # MLflow's own artifacts (the registered model's files) went through the server to S3.
    assert any(k.startswith("mlflow/") and k.endswith("model.int8.onnx") for k in keys)

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_server)
    mlflow_run = client.get_run(summary["run_id"])
    assert mlflow_run.data.metrics["test/acc"] == pytest.approx(summary["test_accuracy"])
    assert "val/acc" in mlflow_run.data.metrics
    version = client.get_model_version(summary["model_name"], str(summary["model_version"]))
    assert version.tags["dataset_manifest"] == summary["dataset_id"]
    assert (
        int(client.get_model_version_by_alias(summary["model_name"], "champion").version)
        == summary["model_version"]
    )

    # No credential in anything the run printed.
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in proc.stdout + proc.stderr


def test_imagefolder_from_s3_prefix(tmp_path, s3_server):
    from tests.integration.conftest import BUCKET
    from tests.unit.test_imagefolder import make_tree

    make_tree(tmp_path / "tree", per_class=8)
    client = s3_server.client()
    for path in sorted((tmp_path / "tree").rglob("*.jpg")):
        client.fput_object(BUCKET, f"raw/pets/{path.relative_to(tmp_path / 'tree')}", str(path))
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint}
    proc = visionflow(
        "prepare",
        f"workdir={tmp_path}",
        "data=imagefolder",
        f"data.root=s3://{BUCKET}/raw/pets",
        env=env,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["uri"].startswith(
        str(tmp_path)
    )  # the dataset goes to the configured (local) store
    manifest = json.loads(
        (tmp_path / "artifacts" / "datasets" / result["dataset_id"] / "manifest.json").read_text()
    )
    assert (
        manifest["classes"] == ["cat", "dog", "eel"]
        and manifest["source"] == f"s3://{BUCKET}/raw/pets"
    )
    assert (
        sum(manifest["splits"][s]["count"] for s in manifest["splits"]) == 24
        and not manifest["bad_files"]
    )
