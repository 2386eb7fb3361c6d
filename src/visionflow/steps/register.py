"""register: the model into the MLflow Model Registry, and the `champion` alias if it earns it.

Each registered version is a pyfunc model (see serving/onnx_pyfunc.py) carrying the fp32 ONNX
file, the int8 one where the task has it, and the TorchScript file, tagged with its lineage.

Who is champion. A version is *eligible* when its quality gate passed or was disabled
explicitly (tag `gate`: passed | failed | disabled) and its test score (tag `test_<metric>`,
measured here with ONNX Runtime) is finite. Scores are compared only between versions of the
same task and classes tested on the same test split (tag `test_split`, a hash of the split's
shard contents): a version tested on another split is never promoted over the champion, and
its `champion_decision` tag says why. Among the eligible versions comparable with the
champion (with the new version when nobody holds the alias), the champion is the one with
the highest score; on a tie the earlier version keeps it.

Why that holds when runs register at once. MLflow has no compare-and-set on aliases, so
`elect_champion` does "set, then verify until stable": read the alias, read every version,
set the alias to the best eligible one if it holds another, and repeat until a read finds the
alias on the best. The tags it reads are written in the same transaction that creates the
version, so a version is never seen without them. Take the last alias write, by writer X: X
then read every version that existed by then and found the alias on their best. Any version
Y created later was read by its own writer after X's write, with the alias unchanged since;
had Y been better, its writer would have written after X. So the final champion is at least
as good as every version, whichever order the reads and writes of N writers interleave in.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

from visionflow import tracking
from visionflow.compose.data import build_datamodule
from visionflow.results import EvaluateResult, ExportResult, QuantizeResult, RegisterResult
from visionflow.runs import save_step
from visionflow.sessions import ort_session
from visionflow.storage import open_store, split_uri
from visionflow.vision.tasks import get_task

log = logging.getLogger("visionflow.register")

CHAMPION = "champion"
ELECTION_ROUNDS = 20  # each round that does not settle follows another writer's alias write
PYFUNC_CODE = Path(__file__).resolve().parents[1] / "serving" / "onnx_pyfunc.py"
SESSIONS_CODE = Path(__file__).resolve().parents[1] / "sessions.py"  # the pyfunc's one import


def model_name(cfg, task: str) -> str:
    """register.model_name, or visionflow-<data>[-<task> for detection and segmentation]."""
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
    dataset_id: str,
    evaluation: EvaluateResult,
    exported: ExportResult,
    quantized: QuantizeResult,
) -> RegisterResult:
    """Register export's model files (with quantize's int8 file where it stored one), tagged
    with evaluate's verdict, and elect the champion on the dataset's test split."""
    import mlflow
    from mlflow.models import infer_signature

    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    classes, image_size = exported.classes, exported.image_size
    task = get_task(exported.task)
    metrics = {
        f"eval_test_{task.metric}": evaluation.score,
        "onnx_max_abs_diff": exported.onnx.max_abs_diff,
        "torchscript_max_abs_diff": exported.torchscript.max_abs_diff,
    }
    if quantized.status == "stored":
        for key in ("accuracy_drop", "speedup_b1", "speedup_b64"):
            metrics[f"int8_{key}"] = getattr(quantized, key)
    run_id = tracking.run_for(cfg)
    client = mlflow.MlflowClient()
    name = model_name(cfg, task.name)
    dm = build_datamodule(cfg, store, dataset_id, task.name)
    test = dm.test_dataloader()

    with tempfile.TemporaryDirectory() as tmp:
        files = {}
        for key, uri in (
            ("onnx", exported.onnx_uri),
            ("onnx_int8", quantized.int8_uri),
            ("torchscript", exported.torchscript_uri),
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
                code_paths=[str(SESSIONS_CODE)],
                artifacts=files,
                model_config={
                    "task": task.name,
                    "variant": quantized.serve_variant if "onnx_int8" in files else "fp32",
                    "classes": list(classes),
                    "image_size": image_size,
                    # the evaluation transform: serving preprocesses as evaluate did
                    "preprocess": OmegaConf.to_container(cfg.transforms.eval, resolve=True),
                },
                signature=infer_signature(example, output),
                pip_requirements=["onnxruntime", "numpy"],
            )
    gate = evaluation.gate
    lineage = {
        "visionflow.run_id": cfg.run_id,
        "dataset_manifest": dataset_id,
        "test_split": test_split_hash(dm.manifest),
        "git_commit": git_commit(),
        "classes": ",".join(classes),
        "task": task.name,
        "onnx_exporter": exported.onnx_exporter,  # dynamo, or legacy (why)
        "gate": gate,
        **({"gate_min_score": str(evaluation.min_score)} if gate != "disabled" else {}),
        f"test_{task.metric}": repr(new_score),  # what the champion election compares
        **{k: f"{v:.6g}" for k, v in metrics.items()},
        **int8_tags(quantized),
    }
    # The tags are created with the version, in one transaction: elections never see it without.
    version = mlflow.register_model(info.model_uri, name, tags=lineage)
    number = int(version.version)
    holder, reason = elect_champion(client, name, number)
    promoted = holder is not None and int(holder.version) == number
    log.info(
        "registered %s v%d; champion: %s (%s)", name, number, "yes" if promoted else "no", reason
    )
    result = RegisterResult(
        name,
        number,
        f"models:/{name}/{number}",
        promoted,
        int(holder.version) if holder is not None else None,
        reason,
        task.metric,
        new_score,
        None if holder is None else _score(holder),
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


def test_split_hash(manifest: dict[str, Any]) -> str:
    """The test split's identity: a hash of its shards' contents, in order.

    Two datasets whose test shards hold the same bytes share it (a larger training split keeps
    scores comparable); any change to a test image, label or their order gives another.
    """
    shards = [shard["sha256"] for shard in manifest["splits"]["test"]["shards"]]
    return hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:20]


class RegistryError(RuntimeError):
    """The champion alias did not settle; the message says how to settle it."""


def elect_champion(client, name: str, version: int) -> tuple[Any, str]:
    """Move `champion` to the best eligible version (see the module docstring) and verify it
    stays there; returns the champion (None: nobody is eligible) and why `version` is or is
    not it, which is also recorded on `version` as its `champion_decision` tag."""
    mine = client.get_model_version(name, str(version))
    holder = before = alias_holder(client, name, CHAMPION)
    for _ in range(ELECTION_ROUNDS):
        best = _best(_all_versions(client, name), mine if holder is None else holder)
        if best is None or (holder is not None and int(holder.version) == int(best.version)):
            reason = _decision(mine, holder, before)
            client.set_model_version_tag(name, str(version), "champion_decision", reason)
            return holder, reason
        client.set_registered_model_alias(name, CHAMPION, str(best.version))
        holder = alias_holder(client, name, CHAMPION)  # another writer may have moved it since
    raise RegistryError(
        f"the {CHAMPION} alias of {name} kept moving for {ELECTION_ROUNDS} rounds; once the "
        f"other registrations are done, settle it with `visionflow promote {name} {version}`"
    )


def _all_versions(client, name: str) -> list:
    versions, token = [], None
    while True:
        page = client.search_model_versions(f"name='{name}'", page_token=token)
        versions += page
        if not (token := page.token):
            return versions


def _best(versions: list, reference):
    """The eligible version comparable with `reference` with the highest score, the earliest
    of equals; None if there is none."""
    pool = [v for v in versions if _ineligible(v) is None and _incomparable(v, reference) is None]
    return max(pool, key=lambda v: (_score(v), -int(v.version)), default=None)


def _score(version) -> float:
    """The test score recorded on a version; NaN when there is none."""
    metric = get_task(version.tags.get("task", "classification")).metric
    try:
        return float(version.tags[f"test_{metric}"])
    except (KeyError, ValueError):
        return math.nan


def _ineligible(version) -> str | None:
    """Why a version may not be champion at all; None if it may."""
    tags, metric = version.tags, get_task(version.tags.get("task", "classification")).metric
    if tags.get("gate") == "failed":
        return f"quality gate failed (test {metric} below {tags.get('gate_min_score')})"
    if tags.get("gate") not in ("passed", "disabled"):
        return "no `gate` tag: registered before the gate's verdict was recorded so"
    if not math.isfinite(score := _score(version)):
        return f"test {metric} is {score}, not a finite score"
    return None


def _incomparable(version, other) -> str | None:
    """Why two versions' scores cannot be compared; None if they can."""
    a, b = version.tags, other.tags
    if (a.get("task", "classification"), a.get("classes")) != (
        b.get("task", "classification"),
        b.get("classes"),
    ):
        return f"v{other.version} is another task or predicts other classes"
    if b.get("test_split") is None:
        return (
            f"v{other.version} has no recorded test split (registered before splits were); "
            f"delete its `{CHAMPION}` alias to start afresh"
        )
    if a.get("test_split") != b.get("test_split"):
        return (
            f"v{other.version} was tested on another test split ({b.get('test_split')}, this "
            f"one on {a.get('test_split')}): their scores are not comparable"
        )
    return None


def _decision(version, holder, before) -> str:
    """Why `version` is or is not champion, `holder` holding the alias now, `before` at first."""
    metric = get_task(version.tags.get("task", "classification")).metric
    score = _score(version)
    if holder is not None and int(holder.version) == int(version.version):
        if before is None or int(before.version) == int(version.version):
            return f"test {metric} {score:.4f}; no champion before it"
        return f"test {metric} {score:.4f} beats champion v{before.version} ({_score(before):.4f})"
    if why := _ineligible(version):
        return why
    if holder is None:  # not reached: an eligible version always finds a champion
        return "no champion"
    if why := _incomparable(version, holder):
        return f"not comparable with champion: {why}"
    return (
        f"test {metric} {score:.4f} does not beat champion v{holder.version} "
        f"({_score(holder):.4f}) on the same test split"
    )


class PromoteError(RuntimeError):
    """The alias may not move to that version; the message says why."""


def promote(name: str, version: int, alias: str = CHAMPION, overrides=()) -> dict[str, object]:
    """Move `alias` of model `name` to `version` under register's rules; PromoteError if not.

    `champion` is elected as register elects it: this settles the alias on the best eligible
    version, which must then be `version`. Another alias (`challenger`, ...) needs an eligible
    version comparable with the champion, if there is one: a challenger is there to be
    compared with it.
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
    holder = alias_holder(client, name, alias)
    if holder is not None and int(holder.version) == version:
        return {"model": name, "version": version, "alias": alias, "moved": False,
                "reason": f"{alias} is v{version} already"}  # fmt: skip
    if alias == CHAMPION:
        holder, reason = elect_champion(client, name, version)
        if holder is None or int(holder.version) != version:
            raise PromoteError(f"cannot promote {name} v{version} to {alias}: {reason}")
    else:
        champion = alias_holder(client, name, CHAMPION)
        why = _ineligible(candidate) or (
            champion is not None and _incomparable(candidate, champion)
        )
        if why:
            raise PromoteError(f"cannot promote {name} v{version} to {alias}: {why}")
        reason = "eligible, and comparable with the champion"
        client.set_registered_model_alias(name, alias, str(version))
        client.set_model_version_tag(name, str(version), f"{alias}_decision", reason)
    log.info("%s: %s -> v%d (%s)", name, alias, version, reason)
    return {"model": name, "version": version, "alias": alias, "moved": True, "reason": reason}


def int8_tags(q: QuantizeResult) -> dict[str, str]:
    """The int8 story on the model version: stored or not and why, how it was made, the host it
    was measured on, and which variant was faster there."""
    tags = {"int8": q.status, "serve_variant": q.serve_variant}
    if q.status == "rejected":
        tags["int8_rejected"] = q.reason
    if q.settings:
        tags["int8_settings"] = ", ".join(f"{k}={v}" for k, v in q.settings.items())
    if q.host:
        tags["quantize_host_cpu"] = f"{q.host['cpu']} ({q.host['arch']})"
        tags["quantize_host_flags"] = q.host["flags"] or "none read"
    if q.status == "stored":
        tags["faster_variant"] = ", ".join(
            f"batch {b}: {q.faster_variant[f'batch_{b}']} "
            f"(int8 at {getattr(q, f'speedup_b{b}'):.2f}x fp32's speed)"
            for b in (1, 64)
        )
    return tags
