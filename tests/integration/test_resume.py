"""Training killed with SIGKILL mid-way resumes from its last checkpoint when rerun."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_overrides
from tests.integration.conftest import visionflow

pytestmark = pytest.mark.slow


def test_killed_training_continues_from_the_last_checkpoint(tmp_path):
    args = [*tiny_overrides(tmp_path, "trainer.max_epochs=8"), "run_id=resume"]
    assert visionflow("prepare", *args).returncode == 0
    last = tmp_path / "artifacts" / "checkpoints" / "resume" / "last.ckpt"

    cmd = [str(Path(sys.executable).with_name("visionflow")), "train", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be killed"
    time.sleep(1.0)  # somewhere inside the next epoch
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    saved_step = torch.load(last, map_location="cpu", weights_only=True)["global_step"]
    assert 0 < saved_step < 8 * 15

    again = visionflow("train", *args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming run resume from {last} at step {saved_step}" in again.stderr
    result = json.loads(again.stdout.strip().splitlines()[-1])
    assert result["resumed_from_step"] == saved_step
    assert result["global_step"] == 8 * 15  # it finished the whole schedule, no more, no less
    assert torch.load(last, map_location="cpu", weights_only=True)["global_step"] == 8 * 15
