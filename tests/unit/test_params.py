"""Run parameters cannot run code or read the step's environment; the site config can't be
overridden by them; parameter values reach the config as the literal strings they are."""

from __future__ import annotations

import pytest

from visionflow.core.config import load_config
from visionflow.kfp.io import configure_overrides
from visionflow.kfp.local import split_overrides, write_site_config
from visionflow.kfp.params import ParameterError, check_override, check_run_id, literal

NONE = dict(data="", data_root="", data_test_root="", model="", optimize="", max_epochs=0,
            batch_size=0, learning_rate=0.0, min_score=-1.0, max_int8_drop=-1.0,
            registered_model_name="")  # fmt: skip


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optim.optimizer._target_=os.system", "_target_"),
        ("callbacks.evil={_target_: builtins.exec, _args_: ['print(1)']}", "_target_"),
        ("+callbacks.x._target_=subprocess.run", "_target_"),
        ("model.layers=[{_partial_: true}]", "_partial_"),
        ("data.root=${oc.env:AWS_SECRET_ACCESS_KEY}", "interpolations"),
        ("data.root='${oc.env:AWS_SECRET_ACCESS_KEY}'", "interpolations"),
        ("register.model_name=a-${oc.env:HOME}", "interpolations"),
        ("storage.root=s3://elsewhere", "'storage.root' is not a run parameter"),
        ("storage=local", "'storage' is not a run parameter"),
        ("tracking.uri=http://attacker:5000", "'tracking.uri' is not a run parameter"),
        ("hydra.searchpath=[file:///tmp]", "'hydra.searchpath' is not a run parameter"),
        ("+site=evil", "'site' is not a run parameter"),
        ("workdir=/etc", "'workdir' is not a run parameter"),
        ("cluster.image=evil:latest", "'cluster.image' is not a run parameter"),
        ("cluster.service_account=admin", "'cluster.service_account' is not a run parameter"),
        ("~model.width", "deleting"),
        ("run_id=x", "own pipeline parameter"),
        ("nonsense", "expected key=value"),
    ],
)
def test_refused_overrides_name_what_was_refused(override, named):
    with pytest.raises(ParameterError) as err:
        configure_overrides(NONE, [override], "r1")
    assert named in str(err.value) and repr(override) in str(err.value)


@pytest.mark.parametrize("knob", ["data_root", "data_test_root", "registered_model_name"])
def test_typed_parameters_cannot_interpolate(knob):
    with pytest.raises(ParameterError, match=f"{knob}: .*interpolations"):
        configure_overrides({**NONE, knob: "${oc.env:AWS_SECRET_ACCESS_KEY}"}, [], "r1")


@pytest.mark.parametrize("run_id", ["../../x", "Run", "a_b", "-a", "a" * 64, "a/b", "x y"])
def test_run_id_must_be_a_dns_label(run_id):
    with pytest.raises(ParameterError, match="DNS-1123"):
        configure_overrides(NONE, [], run_id)


def test_allowed_parameters_pass_unchanged():
    allowed = ["model=resnet18", "optim=sgd", "optim.optimizer.lr=0.05", "trainer.max_epochs=2",
               "+callbacks.ema={name: ema, decay: 0.999}", "cluster.nodes=3", "seed=7",
               "experiment=shapes_quick", "quantize.required=true", "sweep.id=s1"]  # fmt: skip
    assert configure_overrides(NONE, allowed, "run-1") == (allowed, "run-1")
    assert check_run_id("r" * 63) == "r" * 63


def test_the_optimize_parameter_switches_pruning_on_and_reruns_may_tune_it():
    overrides, _ = configure_overrides(
        {**NONE, "optimize": "prune"}, ["optimize.target_macs=0.4", "optimize.epochs=2"], "r1"
    )
    assert overrides == ["optimize=prune", "optimize.target_macs=0.4", "optimize.epochs=2"]
    cfg = load_config(overrides)
    assert (cfg.optimize.method, cfg.optimize.target_macs, cfg.optimize.epochs) == ("prune", 0.4, 2)
    assert load_config(configure_overrides(NONE, [], "r1")[0]).optimize.method == "none"
    with pytest.raises(ParameterError, match="optimize: 'prune; rm' refused"):
        configure_overrides({**NONE, "optimize": "prune; rm"}, [], "r1")


@pytest.mark.parametrize(
    "value",
    ["s3://bucket/a,b/c", "/data/[train]", "it's", 'say "hi"', "x,y'z]\\", "trailing\\", "{a: 1}"],
)
def test_values_with_commas_brackets_and_quotes_are_literal(value):
    overrides, _ = configure_overrides({**NONE, "data_root": value}, [], "r1")
    assert load_config(overrides).data.root == value
    # In `overrides`, what Hydra's grammar cannot read as one value is the literal string too.
    if "," in value or "'" in value:
        (checked,) = [check_override(f"data.root={value}")]
        assert checked == f"data.root={literal(value)}"
        assert load_config([checked]).data.root == value


def test_site_settings_are_the_operators_and_parameters_cannot_change_them(tmp_path, monkeypatch):
    params, site = split_overrides(
        [
            "storage=minio",
            "storage.root=s3://team",
            "tracking.uri=http://127.0.0.1:1",
            "model=resnet18",
            "run_id=r9",
            "trainer.max_epochs=1",
        ]  # fmt: skip
    )
    assert params == ["model=resnet18", "trainer.max_epochs=1"]
    path = write_site_config(site, tmp_path / "site" / "local.yaml", workdir=str(tmp_path / "w"))
    monkeypatch.setenv("VISIONFLOW_SITE_CONFIG", str(path))
    cfg = load_config(params)
    assert (cfg.storage.root, cfg.tracking.uri, cfg.model.name, cfg.workdir) == (
        "s3://team", "http://127.0.0.1:1", "resnet18", str(tmp_path / "w"),
    )  # fmt: skip
    assert cfg.storage.endpoint is not None  # storage=minio's group was chosen by the site
    with pytest.raises(ParameterError):
        configure_overrides(NONE, ["storage.root=s3://other"], "r9")


def test_a_missing_site_config_is_a_clear_error(tmp_path, monkeypatch):
    from visionflow.core.config import ConfigError

    monkeypatch.setenv("VISIONFLOW_SITE_CONFIG", str(tmp_path / "site" / "cluster.yaml"))
    with pytest.raises(ConfigError, match="does not exist.*ConfigMap is not mounted"):
        load_config([])
    monkeypatch.setenv("VISIONFLOW_SITE_CONFIG", str(tmp_path / "cluster.yaml"))
    with pytest.raises(ConfigError, match="<dir>/site/<name>.yaml"):
        load_config([])
