"""Distributed training on CPU (gloo), as it runs in a PyTorchJob and under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.integration.conftest import S3_ENV, free_port, visionflow
from visionflow.cluster.pytorchjob import CONTAINER, build_pytorchjob
from visionflow.core.config import load_config

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _results(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _same_metrics(results: list[dict]) -> None:
    first = results[0]["final_metrics"]
    assert first and "val/acc" in first
    for other in results[1:]:
        assert other["final_metrics"] == pytest.approx(first, abs=1e-6)


def test_rendered_pytorchjob_runs_as_two_processes_with_the_operators_env(
    tmp_path, s3_server, mlflow_server
):
    overrides = [*TINY, "storage=minio", "tracking=server", "cluster.nodes=2", "run_id=pytorchjob"]
    env = {**S3_ENV, "AWS_ENDPOINT_URL": s3_server.endpoint, "MLFLOW_TRACKING_URI": mlflow_server}
    prep = visionflow("prepare", *overrides, f"workdir={tmp_path / 'prep'}", env=env)
    assert prep.returncode == 0, prep.stderr[-2000:]

    os.environ.update(
        {"AWS_ENDPOINT_URL": s3_server.endpoint, "MLFLOW_TRACKING_URI": mlflow_server}
    )
    try:
        job = build_pytorchjob(load_config(overrides), overrides)
    finally:
        for key in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
            os.environ.pop(key)
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    port, procs, homes = free_port(), [], []
    for rank, role in enumerate(("Master", "Worker")):
        container = next(
            c for c in specs[role]["template"]["spec"]["containers"] if c["name"] == CONTAINER
        )
        pod_env = {e["name"]: e["value"] for e in container["env"] if "value" in e}
        # The kubelet resolves secretKeyRef entries; here the test's S3 credentials stand in.
        secrets = {e["name"]: S3_ENV[e["name"]] for e in container["env"] if "valueFrom" in e}
        home = tmp_path / f"pod-{rank}"  # each pod has its own disk
        homes.append(home)
        operator_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "RANK": str(rank),
                        "PET_NPROC_PER_NODE": "1", "PET_NODE_RANK": str(rank), "PET_NNODES": "2", "PYTHONUNBUFFERED": "0"}  # fmt: skip
        cmd = [str(BIN / container["command"][0]), *container["command"][1:]]
        full_env = {
            **os.environ,
            **pod_env,
            **secrets,
            **operator_env,
            "VISIONFLOW_HOME": str(home),
        }
        procs.append(
            subprocess.Popen(
                cmd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
        )
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    results = [_results(out)[-1] for out, _ in outs]
    assert [r["rank"] for r in results] == [0, 1] and {r["world_size"] for r in results} == {2}
    _same_metrics(results)
    keys = s3_server.keys(prefix="checkpoints/pytorchjob/")
    assert "checkpoints/pytorchjob/best.ckpt" in keys and "checkpoints/pytorchjob/last.ckpt" in keys
    assert "runs/pytorchjob/train.json" in s3_server.keys(prefix="runs/pytorchjob/")
    # Rank 0 alone writes checkpoints: the worker pod's disk has none.
    assert not list(homes[1].rglob("*.ckpt"))
    assert list(homes[0].rglob("*.ckpt"))


def test_train_under_torchrun_with_two_processes(tmp_path):
    args = [*TINY, f"workdir={tmp_path}", "run_id=torchrun"]
    assert visionflow("prepare", *args).returncode == 0
    cmd = [str(BIN / "torchrun"), "--nproc-per-node=2", f"--master-port={free_port()}", "-m", "visionflow.cli",
           "train", *args, "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = sorted(_results(proc.stdout), key=lambda r: r["rank"])
    assert [r["rank"] for r in results] == [0, 1]
    _same_metrics(results)
    assert results[0]["mlflow_run_id"] and not results[1]["mlflow_run_id"]  # rank 0 alone tracks
    assert (tmp_path / "artifacts" / "checkpoints" / "torchrun" / "best.ckpt").is_file()
