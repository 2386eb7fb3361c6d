"""Sweeps end to end: `pipeline submit -m` against fake_kfp, `pipeline run -m` with kfp.local."""

from __future__ import annotations

import json

import kfp
import mlflow
import pytest

from tests.conftest import TINY
from tests.integration.conftest import visionflow
from tests.integration.fake_kfp import FakeKFP
from visionflow import cli, tracking


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


@pytest.mark.slow
def test_run_m_runs_each_combination_reports_a_failure_and_groups_them_in_mlflow(tmp_path):
    """Two runs, the first failing in prepare (an empty test split), the second to the end."""
    proc = visionflow("pipeline", "run", "-m", *TINY, f"workdir={tmp_path}",
                      "data.test_fraction=0,0.1", "sweep.id=tiny")  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    first, second = json.loads(proc.stdout.strip().splitlines()[-1])
    assert (first["sweep_run"], first["status"]) == ("tiny-1", "failed")
    assert "Inner task failed: 'prepare'" in first["error"]
    assert "the test split is empty" in proc.stdout  # prepare's own log (kfp.local's) says why
    assert (second["sweep_run"], second["status"]) == ("tiny-2", "succeeded")
    assert second["sweep_values"] == {"data.test_fraction": "0.1"}
    assert second["visionflow_run_id"] == "tiny-2" and second["model_version"] == 1
    table = proc.stderr[proc.stderr.index("sweep tiny: 2 of 2 runs, 1 failed") :].splitlines()
    assert table[1].split() == ["run", "data.test_fraction", "metric", "version", "champion",
                                "status"]  # fmt: skip
    assert table[2].split()[:3] == ["tiny-1", "0", "-"] and "failed:" in table[2]
    assert table[3].split()[:3] == ["tiny-2", "0.1", "accuracy"]
    assert table[3].split()[-3:] == ["1", "yes", "ok"]

    client = mlflow.MlflowClient(tracking_uri=second["tracking_uri"])
    child = client.get_run(second["run_id"])
    parent = client.get_run(child.data.tags[tracking.PARENT_TAG])
    assert child.data.tags[tracking.SWEEP_TAG] == "tiny" and parent.info.run_name == "tiny"
    assert parent.data.tags[tracking.SWEEP_TAG] == "tiny"
    assert parent.info.experiment_id == child.info.experiment_id
