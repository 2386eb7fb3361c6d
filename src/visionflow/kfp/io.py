"""What the KFP components share: config from the pipeline's parameters, artifact pointers.

A component body stays a few lines: build the config, call one step with what its input
artifacts carry, describe its outputs. Artifacts carry a JSON pointer rather than the bytes
(the datasets and models themselves live in the artifact store, MinIO on a cluster): the store
URI and, for the steps after it, the producing step's typed result (visionflow.results). That
is how results travel in a pipeline: the graph in the Kubeflow UI is the data flow.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, TypeVar

from visionflow import logs
from visionflow.core.config import load_config
from visionflow.host import cpu_quota, usable_cpus
from visionflow.results import OptimizeResult, TrainResult, from_record

R = TypeVar("R")


def step_config(overrides: list[str], run_id: str):
    from visionflow.compose.validation import validate

    logs.setup()
    threads_within_cpu_limit()
    cfg = load_config([*overrides, f"run_id={run_id}"])
    validate(cfg)
    return cfg


def threads_within_cpu_limit(cgroup: str = "/sys/fs/cgroup") -> None:
    """Under a CPU limit (a pod's), torch's threads and those of the processes the step starts
    as many as it allows (`host.cpu_quota`), unless OMP_NUM_THREADS says otherwise: torch counts
    the node's cores."""
    if "OMP_NUM_THREADS" in os.environ or cpu_quota(cgroup) is None:
        return
    threads = usable_cpus(cgroup)
    os.environ["OMP_NUM_THREADS"] = str(threads)  # read by torch when it is first imported
    if (torch := sys.modules.get("torch")) is not None:
        torch.set_num_threads(threads)


def write_pointer(artifact, uri: str, result: Any = None, **metadata: Any) -> None:
    """Point a KFP artifact at `uri`. Figures go to its metadata, for the UI; its file holds
    `result`, the step's typed result, for the steps downstream (`read_result`), or else the
    figures."""
    _write(artifact, uri, dataclasses.asdict(result) if result is not None else metadata, metadata)


def write_model(
    artifact, trained: TrainResult, optimized: OptimizeResult | None, **metadata: Any
) -> None:
    """Point optimize's output at the run's model: the pruned checkpoint, or train's where
    nothing was optimized. Its file holds train's result as train's own artifact does (what
    register reads: the MLflow run, the dataset) and optimize's under `optimize` (null when
    nothing was optimized), so evaluate, export and register take either artifact alike."""
    uri = optimized.checkpoint_uri if optimized else trained.checkpoint_uri
    record = dataclasses.asdict(trained)
    record["optimize"] = dataclasses.asdict(optimized) if optimized else None
    _write(artifact, uri, record, metadata)


def _write(artifact, uri: str, record: dict[str, Any], metadata: dict[str, Any]) -> None:
    artifact.metadata["uri"] = uri
    artifact.metadata.update(metadata)
    with open(artifact.path, "w") as f:
        json.dump({"uri": uri, **record}, f, indent=2, default=str)


def read_result(artifact, cls: type[R]) -> R:
    """The typed result an upstream step wrote into `artifact` (`write_pointer`)."""
    with open(artifact.path) as f:
        return from_record(cls, json.load(f))


def read_model(artifact) -> tuple[TrainResult, OptimizeResult | None]:
    """train's result and optimize's (None where nothing was optimized) from a model artifact:
    optimize's (`write_model`) or train's own."""
    with open(artifact.path) as f:
        record = json.load(f)
    optimized = record.get("optimize")
    return from_record(TrainResult, record), (
        from_record(OptimizeResult, optimized) if optimized else None
    )


def uri_of(artifact) -> str:
    """The store URI an upstream artifact points at (metadata first, else its JSON file)."""
    if uri := artifact.metadata.get("uri"):
        return uri
    with open(artifact.path) as f:
        return json.load(f)["uri"]


# Pipeline parameter -> config key. A parameter left at its "unset" value (empty, 0, or
# negative) keeps what the config says, so experiments and `overrides` are not overridden by
# the pipeline's own defaults.
_KNOBS = {
    "data": "data",
    "data_root": "data.root",
    "data_test_root": "data.test_root",
    "model": "model",
    "optimize": "optimize",
    "max_epochs": "trainer.max_epochs",
    "batch_size": "data.batch_size",
    "learning_rate": "optim.optimizer.lr",
    "min_score": "evaluate.min_score",
    "max_int8_drop": "quantize.max_accuracy_drop",
    "registered_model_name": "register.model_name",
}
# The batch inference pipeline's parameters (visionflow.kfp.batch_pipeline).
PREDICT_KNOBS = {
    "model": "predict.model",
    "input": "predict.input",
    "output": "predict.output",
    "shard_size": "predict.shard_size",
    "batch_size": "predict.batch_size",
    "top_k": "predict.top_k",
    "max_bad_fraction": "predict.max_bad_fraction",
    "variant": "predict.variant",
}
# Numbers for which 0 means something (no gate; no undecodable image allowed): unset is negative.
_ZERO_IS_A_VALUE = {"min_score", "max_bad_fraction"}


def configure_overrides(
    knobs: dict[str, Any], overrides: list[str], run_id: str, keys: dict[str, str] = _KNOBS
) -> tuple[list[str], str]:
    """Overrides for the pipeline's parameters, then the user's own, and the run id to use.

    Everything is checked against the run parameters' allow-list (visionflow.kfp.params) first:
    a refused parameter raises ParameterError naming it, before any work. `keys` maps each
    parameter to its config key (the training pipeline's by default; PREDICT_KNOBS).
    """
    from visionflow.core.config import new_run_id
    from visionflow.kfp.params import check_parameters

    chosen = {}
    for name, value in knobs.items():
        if isinstance(value, str):
            unset = value == ""
        elif name in _ZERO_IS_A_VALUE:
            unset = value < 0
        else:
            unset = value <= 0
        if not unset:
            chosen[name] = (keys[name], value)
    return check_parameters(chosen, [str(o) for o in overrides], run_id or new_run_id())


def configure_step(
    knobs: dict[str, Any],
    overrides: list[str],
    run_id: str,
    pipeline_job: str,
    keys: dict[str, str] = _KNOBS,
):
    """A pipeline's configure step: `configure_overrides` with the run id defaulting to the KFP
    job's name; a refused parameter ends the step (SystemExit naming it) before anything runs.
    Returns the checked overrides, the run id and the run's config."""
    from visionflow.kfp.params import ParameterError, as_dns_label

    try:  # the allow-list of run parameters (README: Run parameters)
        resolved, run = configure_overrides(
            knobs, overrides, run_id or as_dns_label(pipeline_job), keys
        )
    except ParameterError as err:
        raise SystemExit(f"configure: {err}") from None
    return resolved, run, step_config(resolved, run)
