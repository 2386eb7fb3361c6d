"""Training killed with SIGKILL mid-epoch resumes from its last checkpoint when rerun.

`visionflow train` as a user runs it: 2 epochs of 15 steps, a checkpoint every 4 steps. The run
is killed as soon as a mid-epoch checkpoint of the second epoch is in the store, then rerun with
the same run_id. Every step is logged to MLflow, so the steps that the two processes both did
(the work redone) can be counted, and compared.

An uninterrupted run with the same seed is the reference. On one CPU the computation is
deterministic (same kernels, same thread count), data order and augmentation are functions of
(seed, epoch, sample), and the optimizer, schedule and step count come from the checkpoint:
the resumed run must end with bitwise the same weights and the same validation metrics, and its
redone steps must have bitwise the same losses as the killed run's. (Not the same epoch-mean
training metrics: Lightning does not checkpoint their running sums, so the interrupted epoch's
mean covers the batches after the restart only.)

The reference trains at the same time as the run that is killed, to keep the test short; every
run gets one thread, so that the two share two cores without slowing each other down.
"""

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

EVERY, PER_EPOCH, EPOCHS = 4, 15, 2  # shapes_tiny: 480 training images, batches of 32
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _store_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return None  # not there yet (the store renames whole files into place)


def _result(proc) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_run_killed_mid_epoch_continues_where_its_last_checkpoint_left_it(tmp_path):
    common = [f"trainer.max_epochs={EPOCHS}", f"train.checkpoint_every_n_steps={EVERY}",
              "trainer.log_every_n_steps=1", "trainer.accelerator=cpu"]  # fmt: skip
    args = [*tiny_overrides(tmp_path, *common)]
    assert visionflow("prepare", *args, "run_id=resume", env=ENV).returncode == 0
    store = tmp_path / "artifacts" / "checkpoints"
    last = store / "resume" / "last.ckpt"

    # The reference: the same prepared dataset (what `visionflow prepare` would reuse), its own
    # MLflow database (two processes writing one sqlite file may find it locked).
    runs = tmp_path / "artifacts" / "runs"
    (runs / "reference").mkdir()
    (runs / "reference" / "prepare.json").write_text((runs / "resume" / "prepare.json").read_text())
    train = [str(Path(sys.executable).with_name("visionflow")), "train", *args]
    reference_proc = subprocess.Popen(
        [*train, "run_id=reference", f"tracking.uri=sqlite:///{tmp_path}/reference.db"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV,
    )  # fmt: skip
    proc = subprocess.Popen(
        [*train, "run_id=resume"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV
    )
    deadline, seen = time.monotonic() + 240, None
    while proc.poll() is None and time.monotonic() < deadline:
        seen = _store_step(last)
        if seen is not None and seen > PER_EPOCH and seen % PER_EPOCH:
            os.kill(proc.pid, signal.SIGKILL)  # in the second epoch, just after a checkpoint
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"training ended before it could be killed ({seen})"
    saved = _store_step(last)  # the newest checkpoint in the store: the kill may follow another
    assert saved % EVERY == 0 and PER_EPOCH < saved < EPOCHS * PER_EPOCH and saved % PER_EPOCH

    again = visionflow("train", *args, "run_id=resume", env=ENV)
    resumed = _result(again)
    where = f"after batch {saved - PER_EPOCH} of {PER_EPOCH}"
    assert f"resuming run resume from {last} at step {saved} (epoch 2, {where})" in again.stderr
    assert resumed["resumed_from_step"] == saved
    assert resumed["global_step"] == EPOCHS * PER_EPOCH  # the whole schedule, no more, no less
    assert _store_step(last) == EPOCHS * PER_EPOCH

    # The steps logged by both processes are the work redone: at most one checkpoint interval.
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    history = client.get_metric_history(resumed["mlflow_run_id"], "train/loss_step")
    by_step: dict[int, list[float]] = {}
    for m in history:
        by_step.setdefault(m.step, []).append(m.value)
    redone = {step: values for step, values in by_step.items() if len(values) > 1}
    assert len(redone) <= EVERY and all(step >= saved for step in redone)
    assert all(len(set(values)) == 1 for values in redone.values())  # the same losses again

    out, err = reference_proc.communicate(timeout=300)
    reference = _result(subprocess.CompletedProcess(train, reference_proc.returncode, out, err))
    assert reference["global_step"] == EPOCHS * PER_EPOCH
    for key in ("val/acc", "val/loss"):
        assert resumed["final_metrics"][key] == reference["final_metrics"][key], key
    ours = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    ref = torch.load(store / "reference" / "last.ckpt", map_location="cpu", weights_only=True)
    assert ours.keys() == ref["state_dict"].keys()
    for name, value in ref["state_dict"].items():
        assert torch.equal(ours[name], value), name
