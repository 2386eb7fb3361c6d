"""The champion alias moves only to a version that passed the gate and is strictly better,
whether register moves it or `visionflow promote` does."""

import mlflow
import pytest

from tests.conftest import tiny_overrides
from visionflow.cli import main
from visionflow.core.config import load_config
from visionflow.steps import evaluate, export, prepare, quantize, register, train

NAME = "visionflow-shapes"


def _run(workdir, run_id, *more):
    cfg = load_config(tiny_overrides(workdir, f"run_id={run_id}", *more))
    for step in (prepare.prepare, train.train, evaluate.evaluate, export.export, quantize.quantize):
        step(cfg)
    return cfg, register.register(cfg)


def _holder(alias: str) -> int:
    return int(mlflow.MlflowClient().get_model_version_by_alias(NAME, alias).version)


def test_alias_moves_only_to_a_better_version_and_promote_keeps_the_rule(tmp_path, capsys):
    weak_cfg, first = _run(tmp_path, "weak", "trainer.max_epochs=1")
    assert first.champion and first.model_version == 1
    same = register.register(weak_cfg)  # the same model again: the same score
    assert same.model_version == 2
    assert not same.champion and "does not beat" in same.reason  # equal is not better
    cfg, second = _run(tmp_path, "strong", "trainer.max_epochs=4")
    assert second.model_version == 3
    better = second.score_onnx > second.champion_score
    assert second.champion == better
    mlflow.set_tracking_uri(cfg.tracking.uri)
    champion = 3 if better else 1
    assert _holder("champion") == champion

    # The weak model evaluated against an impossible gate: registered, never champion.
    gated_cfg = load_config(
        tiny_overrides(tmp_path, "run_id=weak", "trainer.max_epochs=1", "evaluate.min_score=1.01")
    )
    evaluate.evaluate(gated_cfg)
    gated = register.register(gated_cfg)
    assert gated.model_version == 4
    assert not gated.champion and "quality gate failed" in gated.reason
    assert gated.champion_version == champion == _holder("champion")

    # promote applies the same rule. v2 scored what v1 did, so it cannot take the alias from
    # v1 (nor from v3, which beat them)...
    track = [f"tracking.uri={cfg.tracking.uri}"]
    with pytest.raises(register.PromoteError, match="does not beat champion"):
        register.promote(NAME, 2, "champion", track)
    # ...but it may be the challenger: it passed the gate, with the champion's task and classes.
    moved = register.promote(NAME, 2, "challenger", track)
    assert moved["moved"] and _holder("challenger") == 2 and _holder("champion") == champion
    # A version that failed the gate is neither; the command says why and exits non-zero.
    for alias in ("champion", "challenger"):
        assert main(["promote", NAME, "4", "--alias", alias, *track]) == 1
        assert "did not pass the quality gate" in capsys.readouterr().err
    assert _holder("champion") == champion and _holder("challenger") == 2
