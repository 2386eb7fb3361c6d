"""Shared fixtures. Every test works under its own temporary workdir (artifacts, MLflow db)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from visionflow import logs

# Keep the machine's own settings out of the tests.
for var in ("VISIONFLOW_HOME", "VISIONFLOW_CONFIG_DIR", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
    os.environ.pop(var, None)
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
# pytest-xdist workers share the cores: each worker's torch, and every process it starts, gets
# its share of them. More OpenMP threads than cores make each parallel region wait for a thread
# that is not running: a tiny training took 3 to 5 times the CPU time (and more wall time).
if _workers := os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // int(_workers))))
logs.setup()

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=shapes_tiny"]


# The groups that take longest (`make test` prints the slowest tests), started first.
FIRST = ("netns", "test_workflows", "tiny_run")  # (a module: its basename)


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` runs the suite on several pytest-xdist workers with `--dist loadgroup`: each
    module's tests run on one worker (so its module-scoped fixtures start once), unless the
    module names a group that it shares with others (`xdist_group`: a costly session fixture
    or the host's network namespaces); pytest_xdist_node_collection_finished checks that the
    groups took.

    Groups start longest first, so that the many short ones fill the workers' last minutes:
    FIRST, then the groups with a slow test, then the rest (pyproject's --no-loadscope-reorder
    keeps this order; xdist's own starts the groups with the most tests first).
    """
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))
    group = {item: item.get_closest_marker("xdist_group").args[0] for item in items}
    slow = {group[item] for item in items if item.get_closest_marker("slow")}

    def start(item: pytest.Item) -> int:
        g = group[item]
        return FIRST.index(g) if g in FIRST else len(FIRST) + (g not in slow)

    items.sort(key=start)


def pytest_xdist_node_collection_finished(node, ids: list[str]) -> None:
    """Under `--dist loadgroup` every test must carry its group. pytest-xdist's workers send it
    by appending `@group` to node ids, and where that no longer takes (pytest 9.2,
    pytest-dev/pytest-xdist#1386) the groups are silently split: module fixtures then start on
    every worker, and tests that must not run side by side (the network namespaces) do."""
    if node.config.getvalue("dist") != "loadgroup":
        return
    if ungrouped := [i for i in ids if "@" not in i]:
        pytest.exit(
            f"pytest-xdist's --dist loadgroup did not group {ungrouped[0]} (and "
            f"{len(ungrouped) - 1} more): this pytest ({pytest.__version__}) drops the group "
            "suffix xdist puts on node ids (pytest-dev/pytest-xdist#1386); install the pytest "
            "that requirements.lock pins (make setup)",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


@pytest.fixture(autouse=True)
def _no_leftover_tracking_uri():
    """mlflow.set_tracking_uri() exports MLFLOW_TRACKING_URI, which `tracking=server` reads:
    one test's store must not become the next test's (or the next module's fixtures') server."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


def tiny_overrides(workdir: Path, *more: str) -> list[str]:
    """A run that takes seconds: 600 shapes, a narrow CNN, one epoch."""
    return [*TINY, f"workdir={workdir}", *more]


def run_steps(cfg, until: str = "register") -> dict:
    """The run's steps in process, prepare to `until`, each given what the earlier ones
    returned (as a pipeline passes them); optimize only with optimize=prune. Returns
    {step: result}."""
    from visionflow.runs import OPTIONAL, STEPS
    from visionflow.steps.evaluate import evaluate
    from visionflow.steps.export import export
    from visionflow.steps.optimize import optimize
    from visionflow.steps.prepare import prepare
    from visionflow.steps.quantize import quantize
    from visionflow.steps.register import register
    from visionflow.steps.train import train

    r: dict = {}

    def model() -> str:
        return r.get("optimize", r["train"]).checkpoint_uri

    calls = {
        "prepare": lambda: prepare(cfg),
        "train": lambda: train(cfg, r["prepare"].dataset_id),
        "optimize": lambda: optimize(cfg, r["prepare"].dataset_id, r["train"].checkpoint_uri),
        "evaluate": lambda: evaluate(cfg, r["prepare"].dataset_id, model()),
        "export": lambda: export(cfg, r["prepare"].dataset_id, model()),
        "quantize": lambda: quantize(cfg, r["prepare"].dataset_id, r["export"]),
        "register": lambda: register(
            cfg, r["prepare"].dataset_id, r["evaluate"], r["export"], r["quantize"]
        ),
    }
    for step in STEPS[: STEPS.index(until) + 1]:
        if step not in OPTIONAL or cfg.optimize.method != "none":
            r[step] = calls[step]()
    return r


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """All six steps of one tiny run, in process; returns (cfg, {step: result})."""
    from visionflow.core.config import load_config

    workdir = tmp_path_factory.mktemp("tiny")
    cfg = load_config(tiny_overrides(workdir, "run_id=tiny-1", "trainer.max_epochs=2"))
    return cfg, run_steps(cfg)
