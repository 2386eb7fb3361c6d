"""Sweeps end to end: `pipeline submit -m` against fake_kfp, `pipeline run -m` with kfp.local."""

from __future__ import annotations

import json

import kfp
import pytest

from tests.integration.fake_kfp import FakeKFP
from visionflow import cli


@pytest.fixture
def fake(monkeypatch, tmp_path):
    """The stand-in KFP API server, with this machine's kfp context and credentials kept out."""
    for var in ("KF_PIPELINES_TOKEN", "KF_PIPELINES_ENDPOINT", "KF_PIPELINES_UI_ENDPOINT",
                "KF_PIPELINES_IAP_OAUTH2_CLIENT_ID", "KF_PIPELINES_APP_OAUTH2_CLIENT_ID",
                "KF_PIPELINES_APP_OAUTH2_CLIENT_SECRET"):  # fmt: skip
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KF_PIPELINES_SA_TOKEN_PATH", str(tmp_path / "no-sa-token"))
    monkeypatch.setattr(kfp.Client, "_LOCAL_KFP_CONTEXT", str(tmp_path / "kfp-context.json"))
    with FakeKFP() as server:
        yield server


def test_submit_m_starts_one_run_per_combination_in_one_experiment(fake, capsys):
    code = cli.main(["pipeline", "submit", "--host", fake.url, "--experiment", "lr-search", "-m",
                     "model=simple_cnn,resnet18", "optim.optimizer.lr=0.1,0.05",
                     "trainer.max_epochs=2", "sweep.id=lr-search-1"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    runs = sorted(fake.runs.values(), key=lambda r: r.display_name)
    assert [r.display_name for r in runs] == [f"lr-search-1-{n}" for n in (1, 2, 3, 4)]
    assert {r.experiment_id for r in runs} == {fake.experiment_named("lr-search")["experiment_id"]}
    assert len(fake.uploads) == 1  # one package, uploaded once
    assert [r.parameters for r in runs] == [
        {"overrides": [f"model={m}", f"optim.optimizer.lr={lr}", "trainer.max_epochs=2",
                       "sweep.id=lr-search-1"], "run_id": f"lr-search-1-{n}"}
        for n, (m, lr) in enumerate([("simple_cnn", "0.1"), ("simple_cnn", "0.05"),
                                     ("resnet18", "0.1"), ("resnet18", "0.05")], start=1)
    ]  # fmt: skip
    records = json.loads(out.strip().splitlines()[-1])
    assert [(r["sweep_run"], r["run_id"], r["status"]) for r in records] == [
        (r.display_name, r.id, "succeeded") for r in runs
    ]
    assert "sweep lr-search-1: 4 of 4 runs started in experiment 'lr-search'" in err
    assert fake.unknown == []


def test_submit_m_with_a_bad_combination_sends_nothing(fake, capsys):
    code = cli.main(["pipeline", "submit", "--host", fake.url, "-m", "model=simple_cnn,nope"])
    assert code == cli.EXIT_CONFIG
    assert "model=nope" in capsys.readouterr().err
    assert fake.requests == []
