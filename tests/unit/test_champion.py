"""Who holds `champion`, from versions with known scores: the best eligible version on the same
test split, the earlier of equals, whether register elects it or `visionflow promote` asks."""

import math
from dataclasses import replace

import mlflow
import pytest
from omegaconf import OmegaConf

from visionflow.cli import main
from visionflow.steps import register

SPLIT = "split-a"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A tracking store for the module's models (created once: its migrations take seconds)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('registry')}/mlflow.db"
    return uri, mlflow.MlflowClient(tracking_uri=uri)


def _version(client, name, score, gate="passed", split=SPLIT, classes="a,b") -> int:
    """A version as register records it: its test score, split and gate verdict."""
    if not client.search_registered_models(f"name='{name}'"):
        client.create_registered_model(name)
    tags = {"task": "classification", "classes": classes, "test_split": split, "gate": gate,
            "test_accuracy": repr(score), "gate_min_score": "0.9"}  # fmt: skip
    return int(client.create_model_version(name, "file:///model", tags=tags).version)


def _register(client, name, score, **tags) -> str:
    """Record a version and elect, as register does after logging the model; the reason."""
    return register.elect_champion(client, name, _version(client, name, score, **tags))[1]


def _holder(client, name, alias="champion") -> int:
    return int(client.get_model_version_by_alias(name, alias).version)


def test_the_best_eligible_version_on_the_same_split_holds_the_alias(store):
    _, client = store
    name = "sequence"
    assert "no champion before it" in _register(client, name, 0.5)
    assert _holder(client, name) == 1
    assert "beats champion v1 (0.5000)" in _register(client, name, 0.7)
    assert _holder(client, name) == 2
    assert "does not beat champion v2 (0.7000)" in _register(client, name, 0.6)
    assert "does not beat champion v2" in _register(client, name, 0.7)  # equal: v2 keeps it
    assert "quality gate failed (test accuracy below 0.9)" in _register(
        client, name, 0.99, gate="failed"
    )
    assert "not a finite score" in _register(client, name, math.nan)
    assert "not a finite score" in _register(client, name, math.inf)
    assert "another test split" in _register(client, name, 0.99, split="split-b")
    assert "other classes" in _register(client, name, 0.99, classes="a,b,c")
    assert _holder(client, name) == 2
    # A disabled gate is said so on the version, and it does not stop a better model.
    assert "beats champion v2" in _register(client, name, 0.8, gate="disabled")
    assert _holder(client, name) == 10
    decision = client.get_model_version(name, "3").tags["champion_decision"]
    assert "does not beat champion v2" in decision


def test_a_stale_alias_is_repaired_by_the_next_election(store):
    _, client = store
    name = "stale"
    for score in (0.5, 0.9):
        _register(client, name, score)
    # What a concurrent writer that read before v2 existed would leave behind.
    client.set_registered_model_alias(name, "champion", "1")
    _register(client, name, 0.6)
    assert _holder(client, name) == 2


def test_no_champion_when_no_version_is_eligible(store):
    _, client = store
    name = "gated"
    holder, reason = register.elect_champion(client, name, _version(client, name, 0.9, "failed"))
    assert holder is None and "quality gate failed" in reason
    assert not client.get_registered_model(name).aliases


def test_promote_applies_the_same_rule(store, capsys):
    uri, client = store
    name = "promoted"
    for score in (0.5, 0.7, 0.6):
        _register(client, name, score)
    _register(client, name, 0.99, gate="failed")  # v4
    _register(client, name, 0.99, split="split-b")  # v5
    track = [f"tracking.uri={uri}"]
    with pytest.raises(register.PromoteError, match="does not beat champion v2"):
        register.promote(name, 3, "champion", track)
    # v3 may be the challenger: eligible, and comparable with the champion...
    assert register.promote(name, 3, "challenger", track)["moved"]
    assert (_holder(client, name), _holder(client, name, "challenger")) == (2, 3)
    # ...a version tested on another split may not, nor one that failed the gate; the command
    # says why and exits non-zero.
    with pytest.raises(register.PromoteError, match="another test split"):
        register.promote(name, 5, "challenger", track)
    for alias in ("champion", "challenger"):
        assert main(["promote", name, "4", "--alias", alias, *track]) == 1
        assert "quality gate failed" in capsys.readouterr().err
    # Without a champion, promoting the worse version elects the better one instead.
    client.delete_registered_model_alias(name, "champion")
    with pytest.raises(register.PromoteError, match="does not beat champion v2"):
        register.promote(name, 1, "champion", track)
    assert _holder(client, name) == 2
    assert register.promote(name, 2, "champion", track)["moved"] is False


@pytest.mark.slow  # the tiny run is a whole pipeline
@pytest.mark.xdist_group("tiny_run")
def test_register_records_the_split_and_ties_keep_the_champion(tiny_run):
    """The real step: the same model registered again scores the same and does not take the
    alias; with the gate failed it is registered, never champion."""
    cfg, r = tiny_run
    cfg = OmegaConf.merge(cfg, {"register": {"model_name": "visionflow-champion-test"}})
    inputs = r["prepare"].dataset_id, r["evaluate"], r["export"], r["quantize"]
    first, again = register.register(cfg, *inputs), register.register(cfg, *inputs)
    assert first.champion and first.reason.endswith("no champion before it")
    assert not again.champion and "does not beat champion v1" in again.reason
    gate_failed = replace(r["evaluate"], gate="failed", gate_passed=False)
    failed = register.register(cfg, inputs[0], gate_failed, *inputs[2:])
    assert not failed.champion and failed.champion_version == 1
    assert failed.reason.startswith("quality gate failed")
    client = mlflow.MlflowClient(tracking_uri=cfg.tracking.uri)
    tags = [client.get_model_version(first.model_name, str(v)).tags for v in (1, 2, 3)]
    assert len({t["test_split"] for t in tags}) == 1  # one split, recorded on each
    assert [t["gate"] for t in tags] == ["disabled", "disabled", "failed"]  # shapes_tiny's gate
