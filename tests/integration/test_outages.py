"""A 30 s outage of the artifact store or of the tracking server in the middle of training: the
run completes, and nothing it saved or logged is lost.

`visionflow train` as a user runs it, with a TCP proxy (faults.py) between it and moto's S3
server, or between it and the MLflow server. The outage starts when training has begun, with
the request that shows it (the first checkpoint upload, the first training metric: the proxy
fails it as it goes by, so the outage is met however fast training runs) and lasts 30 s: connections dropped unanswered, then reset, then answered 503 SlowDown, ten seconds each.
Training goes on meanwhile (uploads and metrics wait in the background, retrying), and the
train step waits for them before it ends.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from tests.conftest import tiny_overrides
from tests.integration.conftest import BUCKET, S3_ENV, visionflow
from tests.integration.faults import Mode, outage, proxy_to

pytestmark = pytest.mark.slow

OUTAGE_S = 30
# 6 epochs of 15 steps, a checkpoint every 3 steps and every step's loss logged: much of it is
# sent during the outage, or waits for its end (the train step waits for what is pending).
TRAIN = ["tracking=server", "trainer.max_epochs=6", "train.checkpoint_every_n_steps=3", "trainer.log_every_n_steps=1",
         "trainer.accelerator=cpu"]  # fmt: skip
ENV = {**os.environ, **S3_ENV, "OMP_NUM_THREADS": "1"}


def _train_through_an_outage(
    args: list[str], env: dict[str, str], proxy, trigger: bytes
) -> tuple[dict, str]:
    """`visionflow train` with an outage of `proxy`'s server from when `trigger` goes by; its
    result and its log."""
    assert visionflow("prepare", *args, env=env).returncode == 0
    started = proxy.seen(trigger, then=Mode.DROP)
    cmd = [str(Path(sys.executable).with_name("visionflow")), "train", *args]
    with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as train:  # fmt: skip
        try:
            assert started.wait(timeout=180), "training never reached the server"
            outage(proxy, OUTAGE_S)
            out, err = train.communicate(timeout=300)
        finally:
            train.kill()
    assert train.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1]), err


def test_training_survives_an_artifact_store_outage(tmp_path, s3_server, mlflow_server):
    with proxy_to(s3_server.endpoint) as proxy:
        env = {**ENV, "AWS_ENDPOINT_URL": proxy.url, "MLFLOW_TRACKING_URI": mlflow_server}
        args = tiny_overrides(tmp_path, "storage=minio", "run_id=s3-outage", *TRAIN)
        result, log = _train_through_an_outage(
            args, env, proxy, trigger=f"PUT /{BUCKET}/checkpoints/s3-outage/".encode()
        )
    assert f"S3 endpoint {proxy.url}: put_file" in log  # the outage was met, and outlasted

    # Every checkpoint training wrote is in the store, as the last one of its name was written.
    local = tmp_path / "runs" / "s3-outage" / "checkpoints"
    stored = s3_server.client()
    for name in ("last.ckpt", "best.ckpt"):
        obj = stored.get_object(BUCKET, f"checkpoints/s3-outage/{name}")
        assert obj.read() == (local / name).read_bytes(), name
    last = torch.load(local / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == result["global_step"]
    assert not any((local / ".uploads").iterdir())  # each upload's own copy, removed after it


def test_training_survives_a_tracking_server_outage(tmp_path, mlflow_server):
    with proxy_to(mlflow_server) as proxy:
        env = {**ENV, "MLFLOW_TRACKING_URI": proxy.url}
        args = tiny_overrides(tmp_path, "run_id=mlflow-outage", *TRAIN)
        result, _ = _train_through_an_outage(args, env, proxy, trigger=b"train/loss_step")

    # Every step's training loss and every epoch's validation metrics are in MLflow.
    client = MlflowClient(mlflow_server)
    run_id = result["mlflow_run_id"]
    losses = client.get_metric_history(run_id, "train/loss_step")
    assert {m.step for m in losses} == set(range(result["global_step"]))
    assert max(losses, key=lambda m: m.step).value == pytest.approx(
        result["final_metrics"]["train/loss_step"]
    )
    assert len({m.step for m in client.get_metric_history(run_id, "val/acc")}) == result["epochs"]
    assert client.get_run(run_id).info.status == "FINISHED"
