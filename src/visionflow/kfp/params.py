"""What a pipeline run's parameters may say: an allow-list, checked before any work.

Anyone who may start a run in the Kubeflow UI fills in the pipeline's parameters, and the steps'
pods hold credentials (the S3 Secret, a token that may create PyTorchJobs). So parameters, the
`overrides` list included, may only choose *what to train* (or, for the batch inference
pipeline, what to predict: `predict.*`), never run code or read the pod:

- Keys: the groups and sections in `ALLOWED` below (README "Run parameters"). Where artifacts and
  runs go (`storage`, `tracking`), the working directory, Hydra's own settings and the cluster's
  images, secrets and scheduling belong to the release (its mounted cluster config), not to a run.
- No key part that starts with `_` (Hydra's `_target_`, `_partial_`, ... instantiate code), in
  the key or in a dict value.
- No `${...}` anywhere: an interpolation such as `${oc.env:AWS_SECRET_ACCESS_KEY}` would copy the
  pod's environment into MLflow params and the config page.
- No deletions (`~key`) and no sweeps (`a,b`: a sweep is `visionflow pipeline submit -m`).
- `run_id` is a DNS-1123 label: it names stored paths and the PyTorchJob.

The typed parameters (`data_root`, `model`, ...) are strings the UI passes as they are: they
reach the config as literal strings, commas, brackets and quotes included.
"""

from __future__ import annotations

import re
from typing import Any

from visionflow.core.config import ConfigError

# Config groups a run may select by name (their options are files in the image's configs/).
GROUPS = frozenset({"model", "data", "transforms", "callbacks", "optim", "optim/scheduler",
                    "trainer", "optimize", "experiment"})  # fmt: skip
# Dotted prefixes a run may set values under.
SECTIONS = ("model.", "data.", "transforms.", "callbacks.", "optim.", "trainer.", "train.",
            "optimize.", "evaluate.", "export.", "quantize.", "register.", "sweep.",
            "predict.")  # fmt: skip
CLUSTER_SIZES = frozenset({"cluster.nodes", "cluster.gpus_per_node", "cluster.cpu",
                           "cluster.memory", "cluster.shm_size"})  # fmt: skip
SINGLE = frozenset({"seed"})
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


class ParameterError(ConfigError):
    """A run parameter that is not allowed; the message names it and says why."""


def is_allowed_key(key: str) -> bool:
    """Whether a run may set `key` (a group name or a dotted config key)."""
    return key in GROUPS or key in CLUSTER_SIZES or key in SINGLE or key.startswith(SECTIONS)


def check_run_id(run_id: str) -> str:
    if len(run_id) > 63 or not DNS_LABEL.fullmatch(run_id):
        raise ParameterError(
            f"run_id {run_id!r} refused: it must be a DNS-1123 label (at most 63 characters: "
            "lower-case letters, digits and '-', starting and ending with a letter or digit)"
        )
    return run_id


def as_dns_label(text: str) -> str:
    """A DNS-1123 label made from `text` (a KFP job's name, which we do not choose)."""
    label = re.sub(r"[^a-z0-9-]+", "-", text.lower())[:63].strip("-")
    return label or "run"


def literal(value: str) -> str:
    """`value` as a Hydra quoted string, so it reaches the config exactly as given."""
    # Hydra's quoted strings: a quote is escaped with a backslash, and backslashes that precede
    # a quote (or the closing quote) are themselves escaped.
    body = re.sub(r"(\\*)(?='|$)", lambda m: m.group(1) * 2, value)
    return "'" + body.replace("'", "\\'") + "'"


def check_override(override: str, *, where: str = "overrides") -> str:
    """One `key=value` override from a run's parameters, checked; returns it as it will be used.

    A value Hydra's grammar reads as a sweep, or cannot read (an unbalanced quote), is taken as
    the literal string it is.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    text = str(override)
    if "${" in text:
        raise ParameterError(
            f"{where}: {text!r} refused: interpolations (${{...}}) are not allowed in run "
            "parameters; they could read the step's environment"
        )
    if text.lstrip().startswith("~"):
        raise ParameterError(f"{where}: {text!r} refused: deleting config keys is not allowed")
    key, sep, raw = text.partition("=")
    if not sep:
        raise ParameterError(f"{where}: {text!r} refused: expected key=value")
    key = key.strip()
    plain = key.lstrip("+")
    if plain == "run_id":
        raise ParameterError(f"{where}: {text!r} refused: run_id is its own pipeline parameter")
    _check_key(plain, text, where)
    try:
        parsed = OverridesParser.create().parse_override(text)
    except HydraException:
        return f"{key}={literal(raw)}"
    if parsed.is_sweep_override():
        return f"{key}={literal(raw)}"
    _check_value(parsed.value(), text, where)
    return text


def _check_key(key: str, text: str, where: str) -> None:
    parts = re.split(r"[./]", key)
    if any(p.startswith("_") for p in parts):
        raise ParameterError(
            f"{where}: {text!r} refused: keys starting with '_' (such as Hydra's _target_) "
            "would instantiate code from a run parameter"
        )
    if not is_allowed_key(key):
        raise ParameterError(
            f"{where}: {text!r} refused: {key!r} is not a run parameter (README: Run "
            "parameters lists what a run may set); storage, tracking and the cluster's settings "
            "other than its sizes come from the release's config"
        )


def _check_value(value: Any, text: str, where: str) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            if str(k).startswith("_"):
                raise ParameterError(
                    f"{where}: {text!r} refused: the key {k!r} (Hydra's _target_ and its kin) "
                    "would instantiate code from a run parameter"
                )
            _check_value(v, text, where)
    elif isinstance(value, list):
        for v in value:
            _check_value(v, text, where)


def check_parameters(
    knobs: dict[str, tuple[str, Any]], overrides: list[str], run_id: str
) -> tuple[list[str], str]:
    """The overrides a run's parameters stand for, checked, and its run id.

    `knobs` maps a typed parameter's name to (config key, value); a value left at its "unset"
    value is left out by the caller. Strings become literal strings; numbers stay numbers.
    """
    out = []
    for name, (key, value) in knobs.items():
        if isinstance(value, str):
            if "${" in value:
                raise ParameterError(
                    f"{name}: {value!r} refused: interpolations (${{...}}) are not allowed in "
                    "run parameters; they could read the step's environment"
                )
            out.append(f"{key}={literal(value)}" if "." in key else f"{key}={_name(name, value)}")
        else:
            out.append(f"{key}={value}")
    out += [check_override(o) for o in overrides]
    return out, check_run_id(run_id)


def _name(parameter: str, value: str) -> str:
    """A config group option (`model`, `data`): a plain registered name."""
    if not re.fullmatch(r"[A-Za-z0-9_][A-Za-z0-9_.-]*", value):
        raise ParameterError(
            f"{parameter}: {value!r} refused: expected the name of a config (see `visionflow list`)"
        )
    return value
