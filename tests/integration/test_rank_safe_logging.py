"""Under DDP, reading the logged metrics on one rank starts no collective, and the epoch means
are over every rank's images (vision/modules.py, callbacks/telemetry.py).

A metric logged with `sync_dist` is reduced by whichever rank reads it first. The progress
display reads on rank 0 alone, so rank 0 could sit in an all-reduce that rank 1 meets with a
different collective: a 2-pod run deadlocked that way in the cluster simulation. Here
rank_safe_fit.py reads every metric in every hook on rank 0 under torchrun and counts the
collectives the reads start.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.conftest import free_port

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("rank_safe_fit.py")


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("ddp")
    torchrun = Path(sys.executable).with_name("torchrun")
    cmd = [
        str(torchrun),
        "--nproc-per-node=2",
        f"--master-port={free_port()}",
        str(SCRIPT),
        str(out),
    ]
    # a deadlock fails here, after the timeout, instead of hanging the suite
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]


def test_reading_the_metrics_on_one_rank_starts_no_collective(ranks):
    assert ranks[0]["started"] == []


def _exact(ranks: list[dict], split: str, epoch: int) -> tuple[float, float]:
    """Accuracy and mean loss over both ranks' images of one epoch."""
    sums = [r[f"{split}_sums"][epoch] for r in ranks]
    images = sum(s["images"] for s in sums)
    return sum(s["correct"] for s in sums) / images, sum(s["loss"] for s in sums) / images


@pytest.mark.parametrize("epoch", [0, 1])
def test_epoch_means_are_over_every_ranks_images_and_seen_before_the_epoch_ends(ranks, epoch):
    # both ranks see the same values, at their callbacks' epoch end (before the module's hook)
    train = [r["train"][epoch] for r in ranks]
    val = [r["val"][epoch] for r in ranks]
    acc, loss = _exact(ranks, "train", epoch)
    assert sum(s["images"] for s in (r["train_sums"][epoch] for r in ranks)) == 22
    for seen in train:
        assert seen["train/acc"] == pytest.approx(acc)
        assert seen["train/loss_epoch"] == pytest.approx(loss, rel=1e-5)
    acc, loss = _exact(ranks, "val", epoch)
    for seen in val:
        assert seen["val/acc"] == pytest.approx(acc)
        assert seen["val/loss"] == pytest.approx(loss, rel=1e-5)


def test_telemetry_is_reduced_over_the_ranks_before_it_is_logged(ranks):
    ends = [r["end"] for r in ranks]
    perf = sorted(k for k in ends[0] if k.startswith("perf/"))
    assert {"perf/images_per_s", "perf/step_time_s", "perf/data_wait_share"} <= set(perf)
    for key in perf:  # each rank timed its own work: equal only once reduced over both
        assert ends[1][key] == ends[0][key], key
    assert ends[0]["perf/images_per_s"] > 0
