"""register: the model into the MLflow Model Registry, and the `champion` alias if it earns it.

Each registered version is a pyfunc model (see serving/onnx_pyfunc.py) carrying the fp32 ONNX
file, the int8 one where the task has it, and the TorchScript file, tagged with its lineage. The
alias `champion` moves to the new version only if the quality gate passed and the new model
scores higher on the task's main metric (accuracy, mAP@.5, mIoU) than the current champion on
the same test split (both measured here, with ONNX Runtime).
"""

from __future__ import annotations

import logging
import os
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf

from visionflow import tracking
from visionflow.compose.data import build_datamodule
from visionflow.compose.models import task_of
from visionflow.runs import load_step, save_step
from visionflow.sessions import ort_session
from visionflow.storage import open_store, split_uri
from visionflow.vision.tasks import get_task

log = logging.getLogger("visionflow.register")

CHAMPION = "champion"
PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serving" / "onnx_pyfunc.py"


@dataclass
class RegisterResult:
    model_name: str
    model_version: int
    model_uri: str
    champion: bool  # this version holds the alias now
    champion_version: int | None
    reason: str
    metric: str  # the task's main metric
    score_onnx: float  # this version's, measured here
    champion_score: float | None


def model_name(cfg) -> str:
    """register.model_name, or visionflow-<data>[-<task> for detection and segmentation]."""
    task = task_of(cfg)
    suffix = "" if task == "classification" else f"-{task}"
    return cfg.register.model_name or f"visionflow-{cfg.data.name}{suffix}"


def git_commit() -> str:
    if commit := os.environ.get("VISIONFLOW_GIT_COMMIT"):  # baked into images at build time
        return commit
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def register(
    cfg,
    dataset_id: str | None = None,
    onnx_uri: str | None = None,
    int8_uri: str | None = None,
    torchscript_uri: str | None = None,
    gate_passed: bool | None = None,
    pipeline_run: str = "",
) -> RegisterResult:
    """Register this run's model; inputs default to what the run's earlier steps recorded."""
    import mlflow
    from mlflow.models import infer_signature

    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    rec = {
        step: load_step(store, cfg.run_id, step)
        for step in ("prepare", "evaluate", "export", "quantize")
    }
    dataset_id = dataset_id or rec["prepare"]["dataset_id"]
    onnx_uri = onnx_uri or rec["export"]["onnx_uri"]
    int8_uri = int8_uri or rec["quantize"]["int8_uri"]
    torchscript_uri = torchscript_uri or rec["export"]["torchscript_uri"]
    gate_passed = rec["evaluate"]["gate_passed"] if gate_passed is None else gate_passed
    classes, image_size = rec["evaluate"]["classes"], rec["export"]["image_size"]
    task = get_task(rec["export"]["task"])
    metrics = {
        f"eval_test_{task.metric}": rec["evaluate"]["score"],
        "onnx_max_abs_diff": rec["export"]["onnx"]["max_abs_diff"],
        "torchscript_max_abs_diff": rec["export"]["torchscript"]["max_abs_diff"],
    }
    quantized = rec["quantize"]
    if quantized["status"] == "stored":
        for key in ("accuracy_drop", "speedup_b1", "speedup_b64"):
            metrics[f"int8_{key}"] = quantized[key]
    run_id = tracking.run_for(cfg)
    client = mlflow.MlflowClient()
    name = model_name(cfg)
    test = build_datamodule(cfg, store, dataset_id).test_dataloader()

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for key, uri in (
            ("onnx", onnx_uri),
            ("onnx_int8", int8_uri),
            ("torchscript", torchscript_uri),
        ):
            if uri:  # no int8 file where the task has none
                src, k = split_uri(uri, cfg.storage.endpoint)
                files[key] = str(src.get_file(k, Path(tmp) / Path(k).name))
        predict = task.ort_predictor(ort_session(files["onnx"]))
        new_score = task.evaluate(predict, test, classes)[0].score
        example = np.zeros((1, 3, image_size, image_size), np.float32)
        output = task.example_output(predict, image_size)
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_CODE),
                artifacts=files,
                model_config={
                    "task": task.name,
                    "variant": quantized["serve_variant"] if "onnx_int8" in files else "fp32",
                    "classes": list(classes),
                    "image_size": image_size,
                    # the evaluation transform: serving preprocesses as evaluate did
                    "preprocess": OmegaConf.to_container(cfg.transforms.eval, resolve=True),
                },
                signature=infer_signature(example, output),
                pip_requirements=["onnxruntime", "numpy"],
            )
    lineage = {
        "visionflow.run_id": cfg.run_id,
        "pipeline_run": pipeline_run or cfg.run_id,
        "dataset_manifest": dataset_id,
        "git_commit": git_commit(),
        "classes": ",".join(classes),
        "gate_passed": str(gate_passed).lower(),
        "task": task.name,
        f"test_{task.metric}": f"{new_score:.6f}",
        **{k: f"{v:.6g}" for k, v in metrics.items()},
        **int8_tags(quantized),
    }
    version = mlflow.register_model(info.model_uri, name, tags=lineage)
    number = int(version.version)

    current = alias_holder(client, name, CHAMPION)
    promote, reason, champion_score = champion_rule(
        task.name, task.metric, gate_passed, lineage["classes"], new_score, current,
        lambda: _score_of(current, task, test, classes),
        f"quality gate failed (test {task.metric} below {cfg.evaluate.min_score})",
    )  # fmt: skip
    if promote:
        client.set_registered_model_alias(name, CHAMPION, str(number))
    champion_version = (
        number if promote else (int(current.version) if current is not None else None)
    )
    client.set_model_version_tag(name, str(number), "champion_decision", reason)
    log.info(
        "registered %s v%d; champion: %s (%s)", name, number, "yes" if promote else "no", reason
    )
    result = RegisterResult(
        name,
        number,
        f"models:/{name}/{number}",
        promote,
        champion_version,
        reason,
        task.metric,
        new_score,
        champion_score,
    )
    save_step(store, cfg.run_id, "register", result)
    return result


def alias_holder(client, name: str, alias: str):
    """The version that holds `alias` now, or None."""
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code not in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST"):
            raise  # a real failure (server down, ...), not "no such alias"
        return None


def champion_rule(
    task: str,
    metric: str,
    gate_passed: bool,
    classes: str,
    score: float,
    current,
    current_score: Callable[[], float],
    gate_reason: str,
) -> tuple[bool, str, float | None]:
    """Whether a version may take `champion` from `current` (None: nobody holds it), why, and
    the current champion's score where it was measured.

    The rule register and promote share: the quality gate passed; the champion, if any, is the
    same task over the same classes; and the new version scores strictly higher on the task's
    main metric than the champion on the same test split (`current_score()` measures that).
    """
    if not gate_passed:
        return False, gate_reason, None
    if current is None:
        return True, "first version to pass the gate", None
    if current.tags.get("classes") != classes or current.tags.get("task", "classification") != task:
        return (
            False,
            f"champion v{current.version} is another task or predicts other classes; not comparable",
            None,
        )
    champion_score = current_score()
    better = score > champion_score
    verdict = "beats" if better else "does not beat"
    return (
        better,
        f"test {metric} {score:.4f} {verdict} champion v{current.version} ({champion_score:.4f}) "
        "on the same test split",
        champion_score,
    )


class PromoteError(RuntimeError):
    """The alias may not move to that version; the message says why."""


def promote(name: str, version: int, alias: str = CHAMPION, overrides=()) -> dict[str, object]:
    """Move `alias` of model `name` to `version` under register's rules; PromoteError if not.

    `champion` follows `champion_rule`, with both versions' scores as register measured them;
    they must have been tested on the same dataset's test split (the `dataset_manifest` tag),
    else they are not comparable here. Another alias (`challenger`, ...) needs the quality gate
    passed and, where there is a champion, the same task and classes: a challenger is there to
    be compared with it.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    from visionflow.core.config import load_config

    cfg = load_config(list(overrides))
    tracking.check_reachable(cfg.tracking.uri)
    mlflow.set_tracking_uri(cfg.tracking.uri)
    client = mlflow.MlflowClient()
    try:
        candidate = client.get_model_version(name, str(version))
    except MlflowException as err:
        raise PromoteError(f"model {name} has no version {version} ({err.message})") from None
    tags = candidate.tags
    task, holder = tags.get("task", "classification"), alias_holder(client, name, alias)
    metric = get_task(task).metric
    gate_passed = tags.get("gate_passed") == "true"
    gate_reason = f"v{version} did not pass the quality gate when it was registered"
    if holder is not None and int(holder.version) == version:
        return {"model": name, "version": version, "alias": alias, "moved": False,
                "reason": f"{alias} is v{version} already"}  # fmt: skip
    if alias == CHAMPION:

        def champion_score() -> float:
            if holder.tags.get("dataset_manifest") != tags.get("dataset_manifest"):
                raise PromoteError(
                    f"cannot promote v{version} to {alias}: it was tested on dataset "
                    f"{tags.get('dataset_manifest')}, champion v{holder.version} on "
                    f"{holder.tags.get('dataset_manifest')}; scores on different test splits "
                    f"are not comparable (register v{version}'s run again to compare them on one)"
                )
            return _recorded_score(holder, metric)

        ok, reason, _ = champion_rule(
            task, metric, gate_passed, tags.get("classes", ""), _recorded_score(candidate, metric),
            holder, champion_score, gate_reason,
        )  # fmt: skip
    else:
        champion = alias_holder(client, name, CHAMPION)
        comparable = champion is None or (
            champion.tags.get("classes") == tags.get("classes")
            and champion.tags.get("task", "classification") == task
        )
        ok = gate_passed and comparable
        reason = (
            gate_reason
            if not gate_passed
            else f"champion v{champion.version} is another task or predicts other classes"
            if not comparable
            else "passed the quality gate; same task and classes as the champion"
        )
    if not ok:
        raise PromoteError(f"cannot promote {name} v{version} to {alias}: {reason}")
    client.set_registered_model_alias(name, alias, str(version))
    client.set_model_version_tag(name, str(version), f"{alias}_decision", reason)
    log.info("%s: %s -> v%d (%s)", name, alias, version, reason)
    return {"model": name, "version": version, "alias": alias, "moved": True, "reason": reason}


def _recorded_score(version, metric: str) -> float:
    """The test score register measured for a version (its `test_<metric>` tag)."""
    value = version.tags.get(f"test_{metric}")
    if value is None:
        raise PromoteError(f"v{version.version} has no recorded test {metric}: register it again")
    return float(value)


def int8_tags(q: dict) -> dict[str, str]:
    """The int8 story on the model version: stored or not and why, how it was made, the host it
    was measured on, and which variant was faster there."""
    tags = {"int8": q["status"], "serve_variant": q["serve_variant"]}
    if q["status"] == "rejected":
        tags["int8_rejected"] = q["reason"]
    if q["settings"]:
        tags["int8_settings"] = ", ".join(f"{k}={v}" for k, v in q["settings"].items())
    if q["host"]:
        tags["quantize_host_cpu"] = f"{q['host']['cpu']} ({q['host']['arch']})"
        tags["quantize_host_flags"] = q["host"]["flags"] or "none read"
    if q["status"] == "stored":
        tags["faster_variant"] = ", ".join(
            f"batch {b}: {q['faster_variant'][f'batch_{b}']} "
            f"(int8 at {q[f'speedup_b{b}']:.2f}x fp32's speed)"
            for b in (1, 64)
        )
    return tags


def _score_of(version, task, loader, classes) -> float:
    """The registered version's fp32 ONNX score on this loader's images."""
    import mlflow

    with tempfile.TemporaryDirectory() as tmp:
        local = mlflow.artifacts.download_artifacts(
            artifact_uri=f"models:/{version.name}/{version.version}", dst_path=tmp
        )
        onnx = next(Path(local).rglob("model.onnx"))
        predict = task.ort_predictor(ort_session(onnx))
        return task.evaluate(predict, loader, classes)[0].score
