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
logs.setup()

REPO = Path(__file__).resolve().parents[1]
TINY = ["experiment=shapes_tiny"]


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """`make test` runs the suite on several pytest-xdist workers with `--dist loadgroup`: each
    module's tests run on one worker (so its module-scoped fixtures start once), unless the
    module names a group that it shares with others (`xdist_group`: a costly session fixture
    or the host's network namespaces)."""
    for item in items:
        if item.get_closest_marker("xdist_group") is None:
            item.add_marker(pytest.mark.xdist_group(item.module.__name__))


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
