"""The champion alias moves only to a version that passed the gate and is strictly better."""

import mlflow

from tests.conftest import tiny_overrides
from visionflow.core.config import load_config
from visionflow.steps import evaluate, export, prepare, quantize, register, train


def _run(workdir, run_id, *more):
    cfg = load_config(tiny_overrides(workdir, f"run_id={run_id}", *more))
    for step in (prepare.prepare, train.train, evaluate.evaluate, export.export, quantize.quantize):
        step(cfg)
    return cfg, register.register(cfg)


def test_alias_moves_only_to_a_better_version(tmp_path):
    _, first = _run(tmp_path, "weak", "trainer.max_epochs=1")
    assert first.champion and first.model_version == 1
    _, same = _run(tmp_path, "weak-again", "trainer.max_epochs=1")
    assert same.model_version == 2
    assert not same.champion and "does not beat" in same.reason  # equal is not better
    cfg, second = _run(tmp_path, "strong", "trainer.max_epochs=4")
    assert second.model_version == 3
    better = second.score_onnx > second.champion_score
    assert second.champion == better
    mlflow.set_tracking_uri(cfg.tracking.uri)
    alias = mlflow.MlflowClient().get_model_version_by_alias("visionflow-shapes", "champion")
    assert int(alias.version) == (3 if better else 1)


def test_a_version_that_fails_the_gate_never_becomes_champion(tmp_path):
    _, r = _run(tmp_path, "gated", "evaluate.min_score=1.01")
    assert not r.champion and "quality gate failed" in r.reason
    assert r.champion_version is None
