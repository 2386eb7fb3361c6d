"""Run a pipeline on this machine with kfp.local (no cluster, no Docker): the training pipeline,
or the batch inference one (`visionflow pipeline run --pipeline batch_inference ...`)."""

from __future__ import annotations

import builtins
import json
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any

from visionflow.core.config import SITE_ENV, load_config
from visionflow.runs import write_summary

log = logging.getLogger("visionflow.pipeline")


class PipelineError(RuntimeError):
    """A pipeline step failed; its own log above says why."""


# What each pipeline's steps are, for the log.
STEPS = {
    "training": "prepare → train → optimize → evaluate → export → quantize → register",
    "batch_inference": "configure → predict",
}


def run_local(overrides: list[str], pipeline: str = "training") -> tuple[dict[str, Any], Path]:
    """Run a whole pipeline on this machine under kfp.local's SubprocessRunner.

    Each step runs as its own process with this interpreter, as it would in its own pod, and
    gets what a cluster step gets: the run's parameters (only what the allow-list admits,
    visionflow.kfp.params) and a site config for the rest (storage, tracking, the working
    directory), which this machine's operator, you, chose. `pipeline` is `training` or
    `batch_inference` (visionflow.kfp.compile.PIPELINES); both take the overrides and the run
    id. Returns the run summary (the last step's JSON) and the path of the file it was written
    to.
    """
    from visionflow.compose.validation import validate
    from visionflow.core.config import ConfigError

    if pipeline not in STEPS:
        raise ConfigError(f"no pipeline {pipeline!r}: one of {', '.join(STEPS)}")
    cfg = load_config(overrides)  # fail on a bad config before any step starts
    validate(cfg)
    if pipeline == "batch_inference":
        from visionflow.steps.predict import check_config

        check_config(cfg)
    from kfp import local

    from visionflow.kfp.compile import pipeline_function

    params, site = split_overrides(overrides)
    site_file = write_site_config(  # every step: the same absolute workdir
        site, Path(cfg.workdir) / "runs" / cfg.run_id / "site" / "local.yaml", workdir=cfg.workdir
    )
    # Steps run `python3` as this interpreter (kfp swaps it in); subprocesses they start, too.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # step logs stream as they happen
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(Path(cfg.workdir) / "kfp"),
        raise_on_error=True,
    )
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # ours is Python
    log.info("%s run %s: %s", "pipeline" if pipeline == "training" else pipeline, cfg.run_id,
             STEPS[pipeline])  # fmt: skip
    print_ = builtins.print  # kfp.local patches print while tasks run
    previous_site = os.environ.get(SITE_ENV)
    os.environ[SITE_ENV] = str(site_file)
    try:
        task = pipeline_function(pipeline)(overrides=params, run_id=cfg.run_id)
    except RuntimeError as err:
        raise PipelineError(_plain(str(err))) from None
    finally:
        builtins.print = print_
        if previous_site is None:
            os.environ.pop(SITE_ENV, None)
        else:
            os.environ[SITE_ENV] = previous_site
    summary = json.loads(task.outputs["Output"])
    path = write_summary(summary, Path(cfg.workdir) / "runs" / cfg.run_id / "summary.json")
    return summary, path


def split_overrides(overrides: list[str]) -> tuple[list[str], list[str]]:
    """(run parameters, site settings): what a run may set, and the rest; run_id left out."""
    from visionflow.kfp.params import is_allowed_key

    params, site = [], []
    for o in overrides:
        key = o.split("=", 1)[0].strip().lstrip("+")
        if key == "run_id":
            continue
        (params if is_allowed_key(key) else site).append(o)
    return params, site


def write_site_config(overrides: list[str], path: Path, *, workdir: str) -> Path:
    """Write `overrides` and `workdir` as a site config file (a Hydra config, package _global_).

    Group choices (`storage=minio`) become `override /group: option` in its defaults list;
    values (`storage.root=s3://x`) become keys. Where $VISIONFLOW_SITE_CONFIG is already set, that
    file is the starting point and the command line may not add site settings to it.
    """
    import yaml
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    from visionflow.core.config import ConfigError, config_dir

    doc: dict[str, Any] = {"defaults": []}
    if inherited := os.environ.get(SITE_ENV):
        if overrides:
            raise ConfigError(
                f"${SITE_ENV} is set ({inherited}): put {', '.join(overrides)} in that file "
                "instead of the command line"
            )
        doc = {"defaults": [], **(yaml.safe_load(Path(inherited).read_text()) or {})}
    values = OmegaConf.create({k: v for k, v in doc.items() if k != "defaults"})
    for o in OverridesParser.create().parse_overrides([*overrides, f"workdir={workdir}"]):
        if o.is_delete() or o.is_sweep_override():
            raise ConfigError(f"{o.input_line!r}: deletions and sweeps cannot be site settings")
        key = o.key_or_group
        if (config_dir() / key).is_dir():
            doc["defaults"].append({f"override /{key}": o.value()})
        else:
            OmegaConf.update(values, key, o.value(), force_add=True)
    doc = {"defaults": doc["defaults"], **OmegaConf.to_container(values)}  # type: ignore[dict-item]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("# @package _global_\n" + yaml.safe_dump(doc, sort_keys=False))
    return path


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
