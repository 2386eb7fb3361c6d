"""Run the training pipeline on this machine with kfp.local (no cluster, no Docker)."""

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

from visionflow.core.config import load_config
from visionflow.runs import write_summary

log = logging.getLogger("visionflow.pipeline")


class PipelineError(RuntimeError):
    """A pipeline step failed; its own log above says why."""


def run_local(overrides: list[str]) -> tuple[dict[str, Any], Path]:
    """Run the whole pipeline on this machine under kfp.local's SubprocessRunner.

    Each step runs as its own process with this interpreter, as it would in its own pod.
    Returns the run summary and the path of the file it was written to.
    """
    from visionflow.core.factories import validate

    cfg = load_config(overrides)  # fail on a bad config before any step starts
    validate(cfg)
    from kfp import local

    from visionflow.kfp.pipeline import training_pipeline

    # Steps run `python3` as this interpreter (kfp swaps it in); subprocesses they start, too.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    os.environ.setdefault("PYTHONUNBUFFERED", "1")  # step logs stream as they happen
    local.init(
        runner=local.SubprocessRunner(use_venv=False),
        pipeline_root=str(Path(cfg.workdir) / "kfp"),
        raise_on_error=True,
    )
    # Every step sees the same absolute workdir, whatever its cwd; the run id is a parameter.
    step_overrides = [o for o in overrides if not o.startswith(("run_id=", "workdir="))]
    step_overrides.append(f"workdir={cfg.workdir}")
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")  # ours is Python
    log.info(
        "pipeline run %s: prepare → train → evaluate → export → quantize → register", cfg.run_id
    )
    print_ = builtins.print  # kfp.local patches print while tasks run
    try:
        task = training_pipeline(overrides=step_overrides, run_id=cfg.run_id)
    except RuntimeError as err:
        raise PipelineError(_plain(str(err))) from None
    finally:
        builtins.print = print_
    summary = json.loads(task.outputs["Output"])
    path = write_summary(summary, Path(cfg.workdir) / "runs" / cfg.run_id / "summary.json")
    return summary, path


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)
