"""scripts/gpu_session.sh, the GPU machine's one call, run at CPU size (`SMOKE=1`) on 200 small
generated JPEGs packed as the device gets them: every part runs the code it runs on a GPU, so a
GPU session, which comes rarely, is not spent on a broken script. The figures are a CPU's and
meaningless; what is checked is that each part runs to its end and writes what it promises.

The script runs as on that machine, as far as imports go: a `sitecustomize` refuses every
package of this virtualenv that the machine's image lacks (gpu_machine_packages.txt) and the
script does not carry (its CARRIED wheels). What cannot be had here is its GPU and its torch
(2.11 there, 2.14.1 here)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.metadata import packages_distributions
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from benchmarks.int8 import VARIANTS

ROOT = Path(__file__).resolve().parents[2]
CLASSES, PER_CLASS = 10, 20

pytestmark = pytest.mark.slow
# The two longest tests (a minute or more each) in groups of their own, so that two workers can
# run them side by side: this module's fixtures take a second.
own_group = pytest.mark.xdist_group

REFUSE = """import importlib.abc, sys
DENIED = {denied!r}
class RefuseWhatTheGpuMachineLacks(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in DENIED:
            raise ModuleNotFoundError(
                f"No module named {{name!r}} (the GPU machine lacks it; tests/integration/"
                "test_gpu_session.py)", name=name)
sys.meta_path.insert(0, RefuseWhatTheGpuMachineLacks())
"""


def _canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def carried() -> dict[str, str]:
    """The wheels the script carries to the GPU machine: {name: version}."""
    line = re.search(r'^CARRIED="(.+)"$', (ROOT / "scripts/gpu_session.sh").read_text(), re.M)
    return dict(pin.split("==") for pin in line.group(1).split())


def refused_modules() -> set[str]:
    """Top-level modules of this virtualenv from distributions the GPU machine has not."""
    listed = (Path(__file__).with_name("gpu_machine_packages.txt")).read_text().splitlines()
    there = {_canon(n) for n in listed if n and not n.startswith("#")}
    there |= {_canon(n) for n in carried()} | {"visionflow"}
    return {
        module
        for module, dists in packages_distributions().items()
        if not any(_canon(d) in there for d in dists)
    }


@pytest.fixture(scope="module")
def like_the_gpu_machine(tmp_path_factory) -> Path:
    """A folder with a `sitecustomize` that refuses what the GPU machine lacks."""
    site = tmp_path_factory.mktemp("gpu-machine-site")
    (site / "sitecustomize.py").write_text(REFUSE.format(denied=sorted(refused_modules())))
    return site


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    """An ImageFolder tree of 32 px JPEGs, packed into one .npz by the script's own packer."""
    base = tmp_path_factory.mktemp("jpegs")
    rng = np.random.default_rng(0)
    for c in range(CLASSES):
        folder = base / "tree" / f"class{c}"
        folder.mkdir(parents=True)
        for i in range(PER_CLASS):
            pixels = rng.integers(0, 60, (32, 32, 3)) + 15 * c
            Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.jpg")
    npz = base / "cifar.npz"
    subprocess.run(
        [sys.executable, "scripts/cifar10_fast.py", "--pack", str(base / "tree"), str(npz)],
        cwd=ROOT, check=True, capture_output=True,
    )  # fmt: skip
    return npz


@pytest.fixture
def session(tmp_path, packed, like_the_gpu_machine):
    """Runs the script's `parts` at CPU size; returns the finished process and its $OUT."""
    out = tmp_path / "out"

    def run(parts: str) -> tuple[subprocess.CompletedProcess, Path]:
        env = {**os.environ, "SMOKE": "1", "PARTS": parts, "OUT": str(out), "DATA": str(packed),
               "WORK": str(tmp_path / "work"), "PYTHON": sys.executable,
               "PYTHONPATH": str(like_the_gpu_machine)}  # fmt: skip
        done = subprocess.run(
            ["bash", "scripts/gpu_session.sh"], cwd=ROOT, env=env, capture_output=True,
            text=True, timeout=600,
        )  # fmt: skip
        return done, out

    return run


@own_group("gpu_session_bench")
def test_bench_compares_the_three_models_and_shows_ours_telemetry(session):
    done, out = session("bench")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    text = (out / "bench.txt").read_text()
    rows = re.findall(
        r"^\s+(simple_cnn|resnet18|resnet50)\s+(\d+)\s.*?\s(\d+\.\d{3})\s", text, re.M
    )
    assert [(model, int(size)) for model, size, _ in rows] == [
        ("simple_cnn", 32), ("resnet18", 32), ("resnet50", 64)
    ]  # fmt: skip
    assert all(float(ratio) > 0 for *_, ratio in rows)
    flops = [float(f) for f in re.findall(r"gflops_per_image=([\d.]+)", text)]
    assert len(flops) == 3 and flops[0] < flops[2]  # resnet50 costs more per image
    assert "precision=bf16-mixed channels_last=True turns=run" in text  # the GPU's turns


def test_cifar10_fast_times_its_training_and_reports_both_accuracies(session):
    done, out = session("cifar")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert f"unpacked {CLASSES * PER_CLASS} files" in done.stdout
    result = json.loads((out / "cifar10_fast.json").read_text())
    assert sum(result["split"].values()) == CLASSES * PER_CLASS
    assert result["steps"] > 0 and result["train_s"] > 0
    assert 0 <= result["val_accuracy"] <= 1 and 0 <= result["val_accuracy_flip_tta"] <= 1
    assert set(result["target"]) == {
        "train_s<=10", "val_accuracy>=0.90", "val_accuracy_flip_tta>=0.90"
    }  # fmt: skip


@own_group("gpu_session_int8")
def test_int8_quantizes_cifar_resnet18_each_way_and_gives_a_verdict(session):
    done, out = session("int8")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "int8.json").read_text())
    assert report["model"].startswith("cifar_resnet18")
    assert report["images"] == CLASSES * PER_CLASS // 4  # the validation split, held out
    assert set(report["rows"]) == {"fp32", *VARIANTS}
    assert report["rows"]["fp32"]["speedup_b64"] == 1
    for row in report["rows"].values():
        assert 0 <= row["accuracy"] <= 1 and row["ms_b1"] > 0 and row["ms_b64"] > 0
    verdict = report["verdict"]
    assert verdict["setting"] in VARIANTS or verdict["setting"] is None
    assert verdict["target_3x_met"] == (
        verdict["setting"] is not None and verdict["speedup_b64"] >= 3
    )


def test_an_unknown_part_fails_the_session_and_is_named(session):
    done, _ = session("bench-typo")
    assert done.returncode != 0
    assert "unknown part 'bench-typo'" in done.stderr
    assert "FAILED: bench-typo" in done.stdout


def test_the_carried_wheels_are_the_locked_versions_and_the_rest_is_refused():
    locked = dict(
        line.split("==") for line in (ROOT / "requirements.lock").read_text().splitlines()
        if "==" in line and not line.startswith("#")
    )  # fmt: skip
    locked = {_canon(k): v for k, v in locked.items()}
    assert {name: locked[_canon(name)] for name in carried()} == carried()
    refused = refused_modules()
    assert {"mlflow", "boto3", "pycocotools", "torch_pruning", "kfp"} <= refused
    assert not {"torch", "lightning", "onnxruntime", "hydra", "tenacity", "visionflow"} & refused
