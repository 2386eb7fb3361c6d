"""The steps of tests/features/workflows.feature: the `visionflow` command as a user runs it.

The first two scenarios share one pipeline run (a module-scoped fixture): the champion that the
second scenario's run must not replace is the first scenario's model.

A killed training: 2 epochs of 15 steps, a checkpoint every 4 steps. The run is killed as soon as
a mid-epoch checkpoint of the second epoch is in the store, then rerun with the same run_id.
Every step is logged to MLflow, so the steps that the two processes both did (the work redone)
can be counted. An uninterrupted run with the same seed is the reference: on one CPU the
computation is deterministic (same kernels, same thread count), data order and augmentation are
functions of (seed, epoch, sample), and the optimizer, schedule and step count come from the
checkpoint, so the resumed run must end with bitwise the same weights and validation metrics,
and its redone steps must have bitwise the same losses. (Not the same epoch-mean training
metrics: Lightning does not checkpoint their running sums.) The reference trains while the other
run is killed and resumed; each gets one thread, so the two share two cores.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from PIL import Image
from pytest_bdd import given, scenarios, then, when

from tests.conftest import tiny_overrides
from tests.integration.conftest import visionflow

pytestmark = pytest.mark.slow

scenarios("workflows.feature")  # in bdd_features_base_dir: tests/features

CLASSES = ("red", "green", "blue")
# A pipeline run that takes seconds per step: a narrow CNN, 240 small images.
QUICK = ["data=imagefolder", "data.image_size=16", "model.width=8", "data.batch_size=16",
         "quantize.bench_repeats=2", "quantize.calibration_samples=32",
         "quantize.max_accuracy_drop=100"]  # fmt: skip


def _json(proc: subprocess.CompletedProcess) -> dict:
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _my_images(root: Path, per_class: int = 100, unusable: int = 0) -> Path:
    """Photos of one dominant colour per class, with noise; `unusable` files that are not images."""
    rng = random.Random(0)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            rgb = [rng.randrange(40, 90) for _ in range(3)]
            rgb[c] = rng.randrange(170, 256)
            Image.new("RGB", (24, 24), tuple(rgb)).save(root / name / f"{i:03d}.jpg", quality=90)
    for i in range(unusable):
        (root / CLASSES[i % 3] / f"broken{i}.jpg").write_bytes(b"this is not an image at all")
    return root


# --------------------------------------------------------------- train and register, twice


@pytest.fixture(scope="module")
def first_run(tmp_path_factory) -> tuple[Path, Path, dict]:
    """(workdir, images, summary) of one `visionflow pipeline run` on a folder of images."""
    workdir = tmp_path_factory.mktemp("workflow")
    images = _my_images(workdir / "my-images")
    summary = _json(visionflow("pipeline", "run", *QUICK, f"data.root={images}",
                               f"workdir={workdir}", "trainer.max_epochs=3",
                               "evaluate.min_score=0.9"))  # fmt: skip
    return workdir, images, summary


@given("a folder of my images in 3 classes")
def _folder_of_images() -> None:
    """Made by `first_run`: the folder is the first run's input."""


@when("I run the pipeline on it", target_fixture="run")
@given("a champion trained on my images", target_fixture="run")
def _run_the_pipeline(first_run) -> tuple[Path, Path, dict]:
    return first_run


@then("a model that classifies my test images with at least 90% accuracy is the champion")
def _champion(run) -> None:
    _, _, summary = run
    assert summary["test_accuracy"] >= 0.9  # chance: 1/3
    client = MlflowClient(summary["tracking_uri"])
    champion = client.get_model_version_by_alias(summary["model_name"], "champion")
    assert int(champion.version) == summary["model_version"] == 1


@then("its exported files compute what PyTorch computes")
def _exports(run) -> None:
    workdir, _, summary = run
    assert summary["onnx_max_abs_diff"] <= 1e-4 and summary["torchscript_max_abs_diff"] <= 1e-4
    for uri in summary["artifacts"].values():
        assert uri.startswith("models:/") or uri == "" or Path(uri).exists(), uri
    written = workdir / "runs" / summary["run_id"] / "summary.json"
    assert json.loads(written.read_text()) == summary
    # optimize is off by default: it passed train's checkpoint and result through to export.
    steps = sorted((workdir / "kfp").glob("visionflow-training-*"))[0]
    trained = json.loads((steps / "train" / "model").read_text())
    assert json.loads((steps / "optimize" / "optimized").read_text()) == {
        **trained,
        "optimize": None,
    }
    assert trained["uri"] == summary["artifacts"]["checkpoint"] and summary["optimize"] is None


@then("the quantize report says which variant is faster on this host")
def _quantize_report(run) -> None:
    workdir, _, summary = run
    report = sorted((workdir / "kfp").glob("visionflow-training-*/quantize/report"))[0]
    verdict = {"int8": "int8 is faster than fp32 on this host", "fp32": "int8 is SLOWER than fp32"}
    assert verdict[summary["serve_variant"]] in report.read_text()


@then("the evaluation shows a confusion matrix over my classes")
def _confusion(run) -> None:
    workdir, _, _ = run
    outputs = sorted((workdir / "kfp").glob("visionflow-training-*/evaluate/executor_output.json"))
    artifacts = json.loads(outputs[0].read_text())["artifacts"]
    matrix = artifacts["confusion"]["artifacts"][0]["metadata"]["confusionMatrix"]
    assert [s["displayName"] for s in matrix["annotationSpecs"]] == sorted(CLASSES)


@when(
    "I run the pipeline again with a model that learns nothing and no quality gate",
    target_fixture="second",
)
def _second_run(run) -> dict:
    workdir, images, _ = run
    # A learning rate of 0 keeps the untrained weights (one epoch is as good as three); with no
    # gate, only the comparison with the champion on the same test split can keep it from
    # taking the alias.
    return _json(visionflow("pipeline", "run", *QUICK, f"data.root={images}", f"workdir={workdir}",
                            "trainer.max_epochs=1", "optim.optimizer.lr=0",
                            "evaluate.min_score=0"))  # fmt: skip


@then("the new model is registered as version 2")
def _registered(second) -> None:
    assert second["model_version"] == 2 and not second["champion"]


@then("the champion is still version 1, because version 2 does not beat it")
def _champion_kept(run, second) -> None:
    _, _, first = run
    assert second["test_accuracy"] < first["test_accuracy"]
    assert "does not beat champion v1" in second["champion_reason"]
    client = MlflowClient(second["tracking_uri"])
    assert int(client.get_model_version_by_alias(second["model_name"], "champion").version) == 1


# --------------------------------------------------------------------------- a bad folder


@given("a folder of my images where 2 of 23 files are not images", target_fixture="bad_folder")
def _bad_folder(tmp_path) -> Path:
    _my_images(tmp_path / "images", per_class=7, unusable=2)
    return tmp_path


@when("I prepare it", target_fixture="prepared")
def _prepare_bad(bad_folder) -> subprocess.CompletedProcess:
    images = bad_folder / "images"
    return visionflow("prepare", f"workdir={bad_folder}", "data=imagefolder", f"data.root={images}")


@then("it fails naming the unusable files and the allowed share")
def _fails_clearly(prepared) -> None:
    assert prepared.returncode == 1
    assert "2 of 23 files (8.7%) are unusable, more than data.max_bad_fraction=5.0%" in (
        prepared.stderr
    )
    assert "broken0.jpg" in prepared.stderr and "Traceback" not in prepared.stderr


@then("nothing is written to the artifact store")
def _nothing_written(bad_folder) -> None:
    assert not (bad_folder / "artifacts" / "datasets").exists()


# ------------------------------------------------------------------- a killed training resumes

EVERY, PER_EPOCH, EPOCHS = 4, 15, 2  # shapes_tiny: 480 training images, batches of 32
ONE_THREAD = {"OMP_NUM_THREADS": "1"}


def _store_step(path: Path) -> int | None:
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])
    except (FileNotFoundError, EOFError, RuntimeError):
        return None  # not there yet (the store renames whole files into place)


class Training:
    """The run to kill and resume, and the uninterrupted reference training beside it."""

    def __init__(self, workdir: Path) -> None:
        common = [f"trainer.max_epochs={EPOCHS}", f"train.checkpoint_every_n_steps={EVERY}",
                  "trainer.log_every_n_steps=1", "trainer.accelerator=cpu"]  # fmt: skip
        self.workdir, self.args = workdir, tiny_overrides(workdir, *common)
        self.checkpoints = workdir / "artifacts" / "checkpoints"
        self.last = self.checkpoints / "resume" / "last.ckpt"
        self.train = [str(Path(sys.executable).with_name("visionflow")), "train", *self.args]
        self.env = {**os.environ, **ONE_THREAD}
        self.reference: subprocess.Popen | None = None
        self.saved: int | None = None
        self.resumed: subprocess.CompletedProcess | None = None


@given("a prepared dataset and an uninterrupted reference training", target_fixture="training")
def _prepared_and_reference(tmp_path, request) -> Training:
    t = Training(tmp_path)
    _json(visionflow("prepare", *t.args, "run_id=resume", env=ONE_THREAD))
    # The same prepared dataset (what `visionflow prepare` would reuse), and its own MLflow
    # database (two processes writing one sqlite file may find it locked).
    runs = tmp_path / "artifacts" / "runs"
    (runs / "reference").mkdir()
    (runs / "reference" / "prepare.json").write_text((runs / "resume" / "prepare.json").read_text())
    t.reference = subprocess.Popen(
        [*t.train, "run_id=reference", f"tracking.uri=sqlite:///{tmp_path}/reference.db"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=t.env,
    )  # fmt: skip
    request.addfinalizer(t.reference.kill)  # a no-op once it has ended
    return t


@when("my training is killed mid-epoch just after a checkpoint")
def _kill(training: Training) -> None:
    proc = subprocess.Popen([*training.train, "run_id=resume"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=training.env)  # fmt: skip
    seen = None
    while proc.poll() is None:  # the test's timeout bounds this
        seen = _store_step(training.last)
        if seen is not None and seen > PER_EPOCH and seen % PER_EPOCH:
            os.kill(proc.pid, signal.SIGKILL)  # in the second epoch, just after a checkpoint
            break
        time.sleep(0.02)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"training ended before it could be killed ({seen})"
    saved = _store_step(training.last)  # the newest in the store: the kill may follow another
    assert saved % EVERY == 0 and PER_EPOCH < saved < EPOCHS * PER_EPOCH and saved % PER_EPOCH
    training.saved = saved


@when("I run the same training again")
def _again(training: Training) -> None:
    training.resumed = visionflow("train", *training.args, "run_id=resume", env=ONE_THREAD)


@then("it resumes from that checkpoint and ends at the end of the schedule")
def _resumed(training: Training) -> None:
    resumed, saved = _json(training.resumed), training.saved
    where = f"after batch {saved - PER_EPOCH} of {PER_EPOCH}"
    message = f"resuming run resume from {training.last} at step {saved} (epoch 2, {where})"
    assert message in training.resumed.stderr
    assert resumed["resumed_from_step"] == saved
    assert resumed["global_step"] == EPOCHS * PER_EPOCH  # the whole schedule, no more, no less
    assert _store_step(training.last) == EPOCHS * PER_EPOCH


@then("it redoes at most one checkpoint interval, with the same losses")
def _redone(training: Training) -> None:
    client = MlflowClient(f"sqlite:///{training.workdir}/mlflow.db")
    run_id = _json(training.resumed)["mlflow_run_id"]
    by_step: dict[int, list[float]] = {}
    for m in client.get_metric_history(run_id, "train/loss_step"):
        by_step.setdefault(m.step, []).append(m.value)
    redone = {step: values for step, values in by_step.items() if len(values) > 1}
    assert len(redone) <= EVERY and all(step >= training.saved for step in redone)
    assert all(len(set(values)) == 1 for values in redone.values())  # the same losses again


@then("it ends with the weights and metrics of the uninterrupted run")
def _same_as_reference(training: Training) -> None:
    out, err = training.reference.communicate(timeout=300)
    reference = _json(subprocess.CompletedProcess([], training.reference.returncode, out, err))
    resumed = _json(training.resumed)
    assert reference["global_step"] == EPOCHS * PER_EPOCH
    for key in ("val/acc", "val/loss"):
        assert resumed["final_metrics"][key] == reference["final_metrics"][key], key
    ours = torch.load(training.last, map_location="cpu", weights_only=True)["state_dict"]
    ref = torch.load(training.checkpoints / "reference" / "last.ckpt", weights_only=True)
    assert ours.keys() == ref["state_dict"].keys()
    for name, value in ref["state_dict"].items():
        assert torch.equal(ours[name], value), name
