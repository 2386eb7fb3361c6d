"""A misspelt key anywhere in a config fails when the config is loaded, naming the key.

`_target_` blocks (optimizer, scheduler, Lightning callbacks, nested ones) are checked against
their target's signature; the model's options against its registered builder.
"""

import inspect
import subprocess
import sys
from pathlib import Path
from typing import Literal

import pytest
import yaml

from visionflow import cli
from visionflow.core.config import ConfigError, check_call, config_dir, load_config

CONFIGS = config_dir()


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def _visionflow(*args: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).with_name("visionflow")), *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    ("args", "key", "suggestion"),
    [
        (["+optim.optimizer.lrr=0.1"], "optim.optimizer.lrr", "lr"),
        (
            ["callbacks=ema", "+callbacks.ema.multi_avg_fn.decayy=0.9"],
            "callbacks.ema.multi_avg_fn.decayy",
            "decay",
        ),
    ],
)
def test_visionflow_config_names_a_misspelt_target_key(args, key, suggestion):
    proc = _visionflow("config", *args)
    assert proc.returncode == 2, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("visionflow: error: ") and key in last
    assert f"did you mean {suggestion}?" in last
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.parametrize(
    ("overrides", "key", "target"),
    [
        (["optim=sgd", "+optim.optimizer.nesterow=true"], "optim.optimizer.nesterow", "SGD"),
        (["+optim.scheduler.pct_stat=0.3"], "optim.scheduler.pct_stat", "OneCycleLR"),
        (["callbacks=swa", "+callbacks.swa.swa_lr=0.1"], "callbacks.swa.swa_lr", "Averaging"),
        (["+callbacks.lr_monitor.interval=step"], "callbacks.lr_monitor.interval", "RateMonitor"),
    ],
)
def test_unknown_keys_of_target_blocks_fail_naming_key_and_target(overrides, key, target):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert key in str(err.value) and target in str(err.value)


def test_keys_a_target_takes_pass():
    cfg = load_config(
        ["optim=sgd", "+optim.optimizer.dampening=0.0", "callbacks=ema",
         "callbacks.ema.multi_avg_fn.decay=0.9", "+optim.scheduler.three_phase=true"]
    )  # fmt: skip
    assert cfg.optim.optimizer.dampening == 0.0 and cfg.optim.scheduler.three_phase is True
    assert cfg.callbacks.ema.multi_avg_fn.decay == 0.9


def test_a_target_that_cannot_be_imported_is_named():
    with pytest.raises(ConfigError, match=r"optim\.optimizer\._target_='torch\.optim\.AdamV'"):
        load_config(["optim.optimizer._target_=torch.optim.AdamV"])


def test_without_a_close_match_the_accepted_keys_are_listed():
    def step(size: int, *, ratio: float = 1.0) -> None: ...

    check_call(step, {"size": 3, "ratio": 2}, "x", "step")
    with pytest.raises(ConfigError) as err:
        check_call(step, {"zzz": 1}, "x", "step")
    assert str(err.value) == "x.zzz is not a parameter of step; it takes: size, ratio"


def test_targets_with_var_keywords_take_any_key():
    def anything(**kwargs) -> None: ...

    check_call(anything, {"whatever": 1}, "x", "anything")


def test_a_class_passing_var_keywords_to_its_base_takes_the_bases_keys():
    class Base:
        def __init__(self, patience: int = 3, min_delta: float = 0.0) -> None: ...

    class Named(Base):
        def __init__(self, monitor: str | None = None, **kwargs) -> None:
            super().__init__(**kwargs)

    check_call(Named, {"monitor": "val/acc", "patience": 5}, "c", "named")
    with pytest.raises(ConfigError, match="c.patiencee is not a parameter of named; did you mean"):
        check_call(Named, {"patiencee": 5}, "c", "named")


def test_a_named_callbacks_misspelt_option_fails_in_config():
    from visionflow.compose.validation import check_options

    cfg = load_config(["callbacks=early_stopping", "+callbacks.early_stopping.patiencee=3"])
    with pytest.raises(ConfigError, match="callbacks.early_stopping.patiencee .*patience"):
        check_options(cfg)


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["optim=sgd", "optim.optimizer.nesterov=maybe"], "optim.optimizer.nesterov='maybe'"),
        (
            ["optim/scheduler=cosine_warmup", "optim.scheduler.anneal_strategy=cosine"],
            "optim.scheduler.anneal_strategy='cosine'",
        ),
        (["callbacks.lr_monitor.logging_interval=hour"], "logging_interval='hour'"),
        (["optim.scheduler.pct_start=[0.3]"], "optim.scheduler.pct_start=[0.3]"),
    ],
)
def test_values_their_target_rules_out_fail_naming_the_key(overrides, named):
    with pytest.raises(ConfigError) as err:
        load_config(overrides)
    assert named in str(err.value)


def test_values_are_checked_only_where_the_annotation_says_enough():
    def step(
        n: int, rate: float, mode: Literal["a", "b"] | None, any_, box: float | Path
    ) -> None: ...

    check_call(step, {"n": 3, "rate": 1, "mode": None, "any_": [1], "box": "x"}, "s", "step")
    for bad in ({"n": 1.5}, {"n": True}, {"rate": "1"}, {"mode": "c"}):
        with pytest.raises(ConfigError, match=f"s.{next(iter(bad))}="):
            check_call(step, bad, "s", "step")


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes_and_validates(experiment):
    from visionflow.compose.validation import check_options

    check_options(load_config([f"experiment={experiment}"]))


@pytest.mark.parametrize(
    "override",
    [f"callbacks={o}" for o in _options("callbacks")]
    + [f"optim={o}" for o in _options("optim")]
    + [f"optim/scheduler={o}" for o in _options("optim/scheduler")],
)
def test_every_callbacks_and_optim_option_validates(override):
    from visionflow.compose.validation import check_options

    check_options(load_config([override]))


@pytest.mark.parametrize("option", _options("model"))
def test_model_options_agree_with_their_builders_defaults(option):
    """A model option file lists its knobs (so `model.key=value` needs no `+`); the values are
    the builder's defaults, which stay the one place they are decided."""
    import visionflow.vision.models  # noqa: F401  (fills MODELS)
    from visionflow.core.registry import MODELS

    given = yaml.safe_load((CONFIGS / "model" / f"{option}.yaml").read_text())
    params = inspect.signature(MODELS.get(given.pop("name"))).parameters
    for key, value in given.items():
        default = params[key].default
        assert value == (list(default) if isinstance(default, tuple) else default), key


# --- the CLI: a short line for a user's error, a traceback for a bug -----------------------------


def _fail_with(monkeypatch, err: Exception) -> None:
    def run_step(step, overrides, dataset_id=None, checkpoint_uri=None):
        raise err

    monkeypatch.setattr(cli, "run_step", run_step)


@pytest.mark.parametrize(
    "bug", [KeyError("acc"), TypeError("f() takes 1 argument"), ValueError("bad float")]
)
def test_cli_prints_the_traceback_of_a_bug(monkeypatch, capsys, bug):
    _fail_with(monkeypatch, bug)
    assert cli.main(["evaluate"]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "in run_step" in err
    assert err.strip().splitlines()[-1] == f"visionflow: error: {bug}"


@pytest.mark.parametrize(
    ("error", "code"),
    [(ConfigError("data.root: not set"), 2), (FileNotFoundError("no such file: x"), 1)],
)
def test_cli_prints_one_line_for_a_users_error(monkeypatch, capsys, error, code):
    _fail_with(monkeypatch, error)
    assert cli.main(["evaluate"]) == code
    assert capsys.readouterr().err == f"visionflow: error: {error}\n"
