"""Sweeps (`-m`): Hydra's sweep syntax expanded to runs, the summary table, the MLflow parent."""

from __future__ import annotations

import json
import time

import mlflow
import pytest

from visionflow import cli, tracking
from visionflow.core.config import load_config
from visionflow.kfp import sweep
from visionflow.kfp.sweep import Outcome, SweepError, expand


def test_choice_sweeps_expand_to_every_combination_in_hydras_order():
    s = expand(["trainer.max_epochs=1", "model=simple_cnn,resnet18",
                "optim.optimizer.lr=choice(0.1,0.05)", "sweep.id=sw-1"])  # fmt: skip
    assert s.id == "sw-1" and s.keys == ["model", "optim.optimizer.lr"]
    assert [r.run_id for r in s.runs] == ["sw-1-1", "sw-1-2", "sw-1-3", "sw-1-4"]
    assert [tuple(r.values.values()) for r in s.runs] == [
        ("simple_cnn", "0.1"), ("simple_cnn", "0.05"), ("resnet18", "0.1"), ("resnet18", "0.05")
    ]  # fmt: skip
    # The others as given, in their places; the swept ones replaced; the sweep's own two last.
    assert s.runs[2].overrides == ["trainer.max_epochs=1", "model=resnet18",
                                   "optim.optimizer.lr=0.1", "sweep.id=sw-1", "run_id=sw-1-3"]  # fmt: skip


def test_ranges_globs_and_quoting_are_hydras():
    assert [r.values["seed"] for r in expand(["seed=range(1,4)"]).runs] == ["1", "2", "3"]
    lrs = [
        r.values["optim.optimizer.lr"]
        for r in expand(["optim.optimizer.lr=range(0.1,0.3,0.1)"]).runs
    ]
    assert lrs == ["0.1", "0.2"]
    models = [r.values["model"] for r in expand(["model=glob(resnet*)"]).runs]
    assert models == ["resnet18", "resnet50"]  # the group's options, from the configs
    # A quoted comma is one value, not a sweep; in a sweep, quoting reaches the config as given.
    s = expand(["register.model_name=choice('a,b',\"c d\")", "data.root='x,y'"])
    assert len(s.runs) == 2
    names = [load_config(r.overrides).register.model_name for r in s.runs]
    assert names == ["a,b", "c d"]
    assert load_config(s.runs[0].overrides).data.root == "x,y"


def test_a_new_sweep_id_names_runs_kfp_and_kubernetes_accept():
    s = expand(["model=simple_cnn,resnet18"])
    assert sweep.DNS_LABEL.fullmatch(s.id) and s.id.startswith("sweep-")
    assert [r.run_id for r in s.runs] == [f"{s.id}-1", f"{s.id}-2"]
    assert all(f"sweep.id={s.id}" in r.overrides for r in s.runs)
    assert load_config(s.runs[1].overrides).sweep.id == s.id


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=resnet18"], r"-m runs a sweep, and no override is one: sweep with key=a,b"),
        ([], r"no override is one.*\(got: no overrides\)"),
        (["model=resnet18,"], r"malformed override 'model=resnet18,': mismatched input"),
        (["model=resnet18", "seed=(1"], r"malformed override 'seed=\(1'"),
        (["optim.optimizer.lr=interval(0,1)"], r"interval\(\) is a continuous range"),
        (["seed=range(3,3)"], r"'seed=range\(3,3\)': the sweep has no values"),
        (["seed=range(0,101)"], r"the sweep has 101 runs, more than 100"),
        (["run_id=r1", "seed=1,2"], r"'run_id=r1': a sweep names its runs <sweep id>-<n>"),
        (["sweep.id=a,b"], r"sweep.id names the whole sweep; it cannot be swept"),
        (["seed=1,2", "seed=3"], r"seed is swept and given more than once"),
        (["sweep.id=My_Sweep", "seed=1,2"], r"sweep.id='My_Sweep' cannot name runs like "
                                            r"'My_Sweep-2': run ids are DNS-1123 labels"),
        ([f"sweep.id={'a' * 62}", "seed=1,2"], r"at most 63 characters"),
    ],
)  # fmt: skip
def test_a_sweep_that_cannot_start_is_refused_naming_why(overrides, message):
    with pytest.raises(SweepError, match=message):
        expand(overrides)


def test_every_combination_is_checked_and_the_bad_one_named():
    s = expand(["model=simple_cnn,no_such_model", "sweep.id=chk"])
    with pytest.raises(
        SweepError, match=r"run chk-2 \(model=no_such_model\): .*model/no_such_model"
    ):
        sweep.check_configs(s)
    sweep.check_configs(expand(["model=simple_cnn,resnet18"]))  # good ones pass


def _summary(n: int, version: int, champion: bool) -> dict:
    return {"tracking_uri": "sqlite:///unused.db", "run_id": f"s-{n}",
            "mlflow_run_id": f"mlflow-{n}", "model_name": "visionflow-shapes",
            "model_version": version, "champion": champion, "test_accuracy": 0.5 + n / 10}  # fmt: skip


def test_a_failed_run_is_reported_and_the_others_still_run():
    s = expand(["seed=1,2,3", "sweep.id=s"])
    started = []

    def run(overrides):
        started.append(overrides[-1])
        if overrides[0] == "seed=2":
            raise RuntimeError("step 'train' failed\nmore lines of its log")
        n = int(overrides[0][-1])
        return _summary(n, n, True), None

    outcomes = sweep.run_locally(s, run)
    assert started == ["run_id=s-1", "run_id=s-2", "run_id=s-3"]
    assert [o.error for o in outcomes] == [None, "RuntimeError: step 'train' failed\nmore lines "
                                           "of its log", None]  # fmt: skip
    # The registry says who holds the alias now: run 3 took it from run 1.
    table = sweep.run_table(s, outcomes, champions={("visionflow-shapes", 3)}).splitlines()
    assert table[0] == "sweep s: 3 of 3 runs, 1 failed"
    assert table[1].split() == ["run", "seed", "metric", "version", "champion", "status"]
    assert table[2].split() == ["s-1", "1", "accuracy", "0.6000", "1", "no", "ok"]
    assert table[3].split() == ["s-2", "2", "-", "-", "-", "failed:", "RuntimeError:", "step",
                                "'train'", "failed"]  # fmt: skip
    assert table[4].split() == ["s-3", "3", "accuracy", "0.8000", "3", "yes", "ok"]
    # Without the registry, each run's own decision.
    assert sweep.run_table(s, outcomes).splitlines()[2].split()[5] == "yes"
    recs = sweep.records(s, outcomes)
    assert [r["status"] for r in recs] == ["succeeded", "failed", "succeeded"]
    assert recs[0]["sweep_values"] == {"seed": "1"} and recs[0]["model_version"] == 1
    assert recs[1]["sweep_run"] == "s-2" and "step 'train' failed" in recs[1]["error"]


def test_ctrl_c_stops_the_sweep_after_recording_the_run_it_stopped():
    s = expand(["seed=1,2,3", "sweep.id=s"])

    def run(overrides):
        if overrides[0] == "seed=2":
            raise KeyboardInterrupt
        return _summary(1, 1, True), None

    outcomes = sweep.run_locally(s, run)
    assert [o.run.run_id for o in outcomes] == ["s-1", "s-2"]
    assert outcomes[1].error == sweep.INTERRUPTED


def test_pipeline_run_m_prints_the_table_then_the_json_list_and_fails_if_one_failed(
    monkeypatch, capsys
):
    calls = []

    def fake_run_local(overrides):
        calls.append(overrides)
        if "seed=2" in overrides:
            raise RuntimeError("boom")
        return _summary(1, 7, True), None

    monkeypatch.setattr("visionflow.kfp.local.run_local", fake_run_local)
    monkeypatch.setattr(sweep, "current_champions", lambda outcomes: {("visionflow-shapes", 7)})
    assert cli.main(["pipeline", "run", "-m", "seed=1,2", "sweep.id=cli"]) == 1
    out, err = capsys.readouterr()
    assert [c[-1] for c in calls] == ["run_id=cli-1", "run_id=cli-2"]
    records = json.loads(out.strip().splitlines()[-1])
    assert [(r["sweep_run"], r["status"]) for r in records] == [("cli-1", "succeeded"),
                                                                 ("cli-2", "failed")]  # fmt: skip
    assert "sweep cli: 2 of 2 runs, 1 failed" in err and "failed: RuntimeError: boom" in err

    calls.clear()
    assert cli.main(["pipeline", "run", "-m", "seed=1,3", "sweep.id=ok"]) == 0


def test_pipeline_m_fails_before_anything_starts(monkeypatch, capsys):
    monkeypatch.setattr("visionflow.kfp.local.run_local", lambda o: pytest.fail("started"))
    assert cli.main(["pipeline", "run", "-m", "model=resnet18"]) == cli.EXIT_CONFIG
    assert "no override is one" in capsys.readouterr().err
    assert cli.main(["pipeline", "run", "-m", "model=simple_cnn,nope"]) == cli.EXIT_CONFIG
    assert "Could not find 'model/nope'" in capsys.readouterr().err
    assert cli.main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--wait", "-m",
                     "seed=1,2"]) == cli.EXIT_CONFIG  # fmt: skip
    assert "--wait follows one run" in capsys.readouterr().err
    assert cli.main(["pipeline", "submit", "--host", "http://127.0.0.1:9", "--run-name", "r",
                     "-m", "seed=1,2"]) == cli.EXIT_CONFIG  # fmt: skip
    assert "--run-name with -m: runs are named <sweep id>-<n>" in capsys.readouterr().err


def test_submit_all_raises_if_the_first_fails_and_records_later_failures():
    s = expand(["seed=1,2,3", "sweep.id=s"])

    def first_fails(r):
        raise RuntimeError("cannot reach Kubeflow Pipelines")

    with pytest.raises(RuntimeError, match="cannot reach"):
        sweep.submit_all(s, first_fails)

    def second_fails(r):
        if r.n == 2:
            raise RuntimeError("HTTP 400")
        return Outcome(r)  # any dataclass stands for a SubmitResult

    outcomes = sweep.submit_all(s, second_fails)
    assert [o.error for o in outcomes] == [None, "RuntimeError: HTTP 400", None]


# ---- MLflow: the sweep's parent run ----


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One sqlite MLflow store for these tests (creating one takes seconds)."""
    return tmp_path_factory.mktemp("sweep-mlflow")


@pytest.fixture(autouse=True)
def _no_settling(monkeypatch):
    monkeypatch.setattr(tracking, "SWEEP_SETTLE_S", 0)


def _cfg(store, run_id: str, sweep_id: str | None = None):
    more = [f"sweep.id={sweep_id}"] if sweep_id else []
    return load_config([f"workdir={store}", f"run_id={run_id}", *more])


def _client(store) -> mlflow.MlflowClient:  # named: a bare client opens ./mlflow.db
    return mlflow.MlflowClient(tracking_uri=_cfg(store, "any").tracking.uri)


def _parents(store, sweep_id: str) -> list:
    experiment_id = tracking.setup(_cfg(store, "any"))
    return tracking._sweep_parents(_client(store), experiment_id, sweep_id)


def test_runs_of_a_sweep_are_children_of_one_parent_run(store):
    first = tracking.run_for(_cfg(store, "p-1", "p"))
    second = tracking.run_for(_cfg(store, "p-2", "p"))
    alone = tracking.run_for(_cfg(store, "alone"))
    client = _client(store)
    (parent,) = _parents(store, "p")
    assert parent.info.run_name == "p" and parent.info.status == "FINISHED"
    for run_id in (first, second):
        tags = client.get_run(run_id).data.tags
        assert tags[tracking.PARENT_TAG] == parent.info.run_id
        assert tags[tracking.SWEEP_TAG] == "p"
    assert tracking.PARENT_TAG not in client.get_run(alone).data.tags
    assert tracking.SWEEP_TAG not in client.get_run(alone).data.tags
    # Each later step finds the same run, still under the same parent.
    assert tracking.run_for(_cfg(store, "p-1", "p")) == first
    assert len(_parents(store, "p")) == 1


@pytest.mark.parametrize("other_is_older", [True, False])
def test_two_runs_creating_the_parent_at_once_end_with_one(store, monkeypatch, other_is_older):
    """Another pod creates a parent between this one's search and its creation."""
    sweep_id = f"race-{int(other_is_older)}"
    client = _client(store)
    create_run = mlflow.MlflowClient.create_run
    made = {}

    def racing_create_run(self, experiment_id, start_time=None, tags=None, run_name=None):
        if (tags or {}).get(tracking.SWEEP_PARENT_TAG) and "other" not in made:
            now = int(time.time() * 1000)
            other = create_run(self, experiment_id, now + (-1000 if other_is_older else 1000),
                               tags, run_name)  # fmt: skip
            made["other"] = other.info.run_id
            mine = create_run(self, experiment_id, now, tags, run_name)
            made["mine"] = mine.info.run_id
            return mine
        return create_run(self, experiment_id, start_time, tags, run_name)

    monkeypatch.setattr(mlflow.MlflowClient, "create_run", racing_create_run)
    child = tracking.run_for(_cfg(store, f"{sweep_id}-1", sweep_id))
    winner = made["other"] if other_is_older else made["mine"]
    loser = made["mine"] if other_is_older else made["other"]
    assert [p.info.run_id for p in _parents(store, sweep_id)] == [winner]
    assert client.get_run(loser).info.lifecycle_stage == "deleted"
    assert client.get_run(child).data.tags[tracking.PARENT_TAG] == winner

    # A run the other pod linked to the parent that lost is relinked at its next step.
    stale = tracking.run_for(_cfg(store, f"{sweep_id}-2", sweep_id))
    client.set_tag(stale, tracking.PARENT_TAG, loser)
    assert tracking.run_for(_cfg(store, f"{sweep_id}-2", sweep_id)) == stale
    assert client.get_run(stale).data.tags[tracking.PARENT_TAG] == winner


def test_a_sweep_id_that_would_break_the_search_is_refused(store):
    with pytest.raises(ValueError, match=r"sweep.id \"it's\" cannot name a sweep"):
        tracking.run_for(_cfg(store, "q-1", '"it\'s"'))
