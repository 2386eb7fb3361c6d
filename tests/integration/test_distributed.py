"""Distributed training and optimize's fine-tuning on CPU (gloo) under torchrun, as a pod with
several GPUs runs them. (A PyTorchJob's Master and Worker, with the operator's environment, run
in the cluster simulation: tests/integration/test_cluster_sim.py.)"""

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


def _torchrun(step: str, args: list[str]) -> list[dict]:
    """`step` under torchrun, 2 processes on CPU (gloo): each rank's printed result, by rank."""
    cmd = [str(BIN / "torchrun"), "--nproc-per-node=2", f"--master-port={free_port()}", "-m", "visionflow.cli",
           step, *args, "trainer.devices=2", "trainer.strategy=ddp", "trainer.accelerator=cpu"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return sorted(_results(proc.stdout), key=lambda r: r.get("rank", 0))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A run prepared, then trained under torchrun: (its overrides, each rank's result)."""
    args = [*TINY, f"workdir={tmp_path_factory.mktemp('torchrun')}", "run_id=torchrun"]
    assert visionflow("prepare", *args).returncode == 0
    return args, _torchrun("train", args)


def test_train_under_torchrun_with_two_processes(trained):
    args, results = trained
    assert [r["rank"] for r in results] == [0, 1]
    _same_metrics(results)
    assert results[0]["mlflow_run_id"] and not results[1]["mlflow_run_id"]  # rank 0 alone tracks
    workdir = Path(args[1].removeprefix("workdir="))
    assert (workdir / "artifacts" / "checkpoints" / "torchrun" / "best.ckpt").is_file()


def test_optimize_fine_tunes_under_torchrun_and_rank_0_alone_measures_and_records(trained):
    """What an optimize job's pods run (pytorchjob.job_command): every rank prunes the same
    way and fine-tunes under DDP (a rank with other shapes would fail DDP's first check); rank 0
    alone stores the pruned checkpoint, measures and records, and the others end quietly."""
    from visionflow.compose.models import load_network
    from visionflow.core.config import load_config
    from visionflow.runs import load_step
    from visionflow.storage import open_store

    args, _ = trained
    prune = ["optimize=prune", "optimize.target_macs=0.5", "optimize.epochs=1",
             "optimize.bench_repeats=1"]  # fmt: skip
    results = _torchrun("optimize", [*args, *prune])
    assert [r.get("rank", 0) for r in results] == [0, 1]
    measured, other = results
    assert other == {"run_id": "torchrun", "rank": 1}  # nothing measured or recorded
    assert 0 < measured["macs_kept"] <= 0.55 and measured["speedup"] > 0
    cfg = load_config([*args, "run_id=torchrun"])
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    recorded = load_step(store, "torchrun", "optimize")
    assert recorded["checkpoint_uri"] == measured["checkpoint_uri"]
    assert recorded["checkpoint_uri"].endswith("checkpoints/torchrun/pruned.ckpt")
    net, spec = load_network(measured["checkpoint_uri"])
    assert spec["pruned"]  # the stored network is the pruned one, rebuilt from its shapes
    assert sum(p.numel() for p in net.parameters()) == measured["params_after"]
