"""Distributed training on CPU (gloo) under torchrun, as a pod with several GPUs runs it. (A
PyTorchJob's Master and Worker, with the operator's environment, run in the cluster simulation:
tests/integration/test_cluster_sim.py.)"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import TINY
from tests.integration.conftest import free_port, visionflow

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent


def _results(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


def _same_metrics(results: list[dict]) -> None:
    first = results[0]["final_metrics"]
    assert first and "val/acc" in first
    for other in results[1:]:
        assert other["final_metrics"] == pytest.approx(first, abs=1e-6)


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
