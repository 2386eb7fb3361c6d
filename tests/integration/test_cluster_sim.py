"""The cluster path, simulated (tests/cluster_sim, `make cluster-sim`): the pipeline a Helm
release ships, started as from the Kubeflow UI, each step a pod with only what the rendered
manifests give it, training as a PyTorchJob whose Master and Worker are other hosts.

Needs root (mount and network namespaces): skipped with the reason elsewhere, a failure where
VISIONFLOW_REQUIRE_NETNS=1 (CI).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from tests.cluster_sim import netns, sandbox
from tests.cluster_sim.kfp_runner import TaskFailed
from tests.cluster_sim.sim import CANARY, Simulation

# One xdist worker for everything that makes network namespaces (test_netns.py too).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("netns")]


@pytest.fixture(scope="module")
def sim():
    try:
        sandbox.check()
        netns.check_host()
    except (sandbox.SandboxUnavailable, netns.NamespacesUnavailable) as err:
        if os.environ.get("VISIONFLOW_REQUIRE_NETNS") == "1":
            pytest.fail(f"VISIONFLOW_REQUIRE_NETNS=1 but: {err}")
        pytest.skip(str(err))
    root = Path(tempfile.mkdtemp(prefix="visionflow-sim-", dir="/var/tmp"))
    try:
        with Simulation(root, echo=print) as simulation:
            yield simulation
    finally:
        shutil.rmtree(root, ignore_errors=True)


def mlflow_runs(sim) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sim.tracking)
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids)) if ids else 0


@pytest.mark.parametrize(
    ("params", "refused"),
    [
        (
            {"overrides": ["callbacks.x={_target_: os.system, _args_: ['touch /tmp/x']}"]},
            "_target_",
        ),
        ({"data_root": "${oc.env:AWS_SECRET_ACCESS_KEY}"}, "interpolations"),
        ({"run_id": "../../x"}, "DNS-1123"),
    ],
    ids=["target", "env-interpolation", "run-id-path"],
)
def test_unsafe_parameters_fail_at_configure_and_nothing_runs(sim, params, refused):
    keys, runs = sim.s3.keys(sim.bucket), mlflow_runs(sim)
    run = sim.pipeline_run(params)
    with pytest.raises(TaskFailed) as err:
        run.run()
    assert err.value.task == "configure"
    assert refused in err.value.log_tail and "refused" in err.value.log_tail
    assert CANARY not in err.value.log_tail
    assert all(v not in err.value.log_tail for v in sim.secret.values())
    assert run.records == {}  # no step after configure started
    assert sim.s3.keys(sim.bucket) == keys and mlflow_runs(sim) == runs


@pytest.fixture(scope="module")
def ui_run(sim):
    """The run a person starts from the Kubeflow UI after `helm install`, changing nothing."""
    return sim.run()


def test_a_run_from_the_ui_with_default_parameters(sim, ui_run):
    summary = ui_run
    print(json.dumps(summary, indent=1))
    assert summary["registered"]["status"] == "READY"
    assert summary["registered"]["version"] == str(summary["model_version"])
    assert summary["pytorchjob"] and summary["replicas"] == {"Master": 1, "Worker": 1}
    assert summary["restarts"] == 0 and summary["killed"] == []
    assert summary["isolation"]["problems"] == []
    assert summary["isolation"]["writes_outside_own_dir_refused"]
    assert summary["isolation"]["rendezvous_port"]["outsider"] == "refused"
    assert summary["isolation"]["steps"] == 8
    keys, run = sim.s3.keys(sim.bucket), summary["run_id"]
    for key in (f"checkpoints/{run}/best.ckpt", f"checkpoints/{run}/last.ckpt",
                f"models/{run}/model.onnx", f"models/{run}/model.torchscript.pt",
                f"runs/{run}/register.json", f"datasets/{summary['dataset_id']}/manifest.json"):  # fmt: skip
        assert key in keys, key
    assert summary["artifacts"]["onnx"] == f"s3://{sim.bucket}/models/{run}/model.onnx"
    # MLflow's own artifacts (the registered model's files) went through the server to S3.
    assert any(k.startswith("mlflow/") and k.endswith("model.onnx") for k in keys)
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=sim.tracking)
    assert client.get_run(summary["mlflow_run_id"]).data.metrics["test/accuracy"] == pytest.approx(
        summary["test_accuracy"]
    )
    version = client.get_model_version(summary["model_name"], str(summary["model_version"]))
    assert version.tags["dataset_manifest"] == summary["dataset_id"]
    # The job went with its owner, the train step's pod, when that pod ended.
    assert {"kind": "PyTorchJob", "namespace": "ml-team", "name": summary["pytorchjob"],
            "by": "gc"} in sim.api.collected  # fmt: skip


@pytest.fixture(scope="module")
def preempted_run(sim):
    """A run started from the UI with `optimize=prune` (and `optimize.epochs=1` in `overrides`),
    whose train Worker is killed (SIGKILL) mid-epoch just after a checkpoint reached the store;
    it stops after optimize. Two tests read it, the preemption's and the pruning's: one run
    instead of two keeps the suite's time. Returns (summary, the stored checkpoint's step when
    the Worker died)."""
    run_id, seen = "preempted", {}

    def checkpoint_written() -> bool:
        seen["step"] = sim.checkpoint_step(run_id)
        return bool(seen["step"])

    params = {"optimize": "prune", "overrides": ["optimize.epochs=1", "optimize.bench_repeats=1"]}
    summary = sim.run(params, job_name=run_id, until="optimize",
                      kill_worker_when=checkpoint_written)  # fmt: skip
    print(json.dumps({k: summary[k] for k in ("killed", "jobs", "train", "optimized")}, indent=1))
    return summary, seen["step"]


def test_a_preempted_worker_restarts_in_the_job_and_training_resumes(ui_run, preempted_run):
    """SIGKILL to the Worker mid-epoch, just after a checkpoint reached the store: the job's
    pods restart in place (restartPolicy OnFailure), training resumes from that checkpoint and
    ends where and as well as the uninterrupted run did."""
    from visionflow.cluster.pytorchjob import job_name

    summary, step = preempted_run
    assert summary["killed"] and summary["jobs"][job_name("preempted")]["restarts"] >= 1
    interval = 10  # ci/sim-values.yaml: train.checkpoint_every_n_steps
    resumed = summary["train"]["resumed_from_step"]
    # From the checkpoint in the store when the Worker died (or the next, if it landed before
    # the kill): the steps redone are fewer than one checkpoint interval.
    assert resumed in (step, step + interval)
    assert summary["train"]["global_step"] == ui_run["train"]["global_step"]
    assert abs(summary["train"]["best_score"] - ui_run["train"]["best_score"]) <= 0.05
    assert summary["isolation"]["problems"] == []


def test_pruning_from_the_ui_fine_tunes_in_its_own_pytorchjob(sim, preempted_run):
    """optimize=prune as a UI parameter: the optimize step's small pod launches a PyTorchJob of
    its own on the training nodes (Master and Worker fine-tune under DDP), follows it, and
    outputs the pruned checkpoint rank 0 stored, for evaluate, export and register."""
    from mlflow import MlflowClient

    from visionflow.cluster.pytorchjob import job_name

    summary, _ = preempted_run
    run_id, pods = "preempted", {"Master": 1, "Worker": 1}
    assert list(summary["jobs"]) == [job_name(run_id), job_name(run_id, "optimize")]
    assert summary["jobs"][job_name(run_id, "optimize")] == {"replicas": pods, "restarts": 0}
    optimized = summary["optimized"]
    assert optimized["method"] == "prune" and 0 < optimized["macs_kept"] <= 0.55
    assert optimized["uri"] == f"s3://{sim.bucket}/checkpoints/{run_id}/pruned.ckpt"
    assert f"checkpoints/{run_id}/pruned.ckpt" in sim.s3.keys(sim.bucket)
    # Rank 0 measured and recorded, in the run's MLflow run; each job went with its step's pod.
    metrics = MlflowClient(tracking_uri=sim.tracking).get_run(summary["train"]["mlflow_run_id"])
    assert metrics.data.metrics["optimize/macs_kept"] == pytest.approx(optimized["macs_kept"])
    for name in summary["jobs"]:
        collected = {"kind": "PyTorchJob", "namespace": "ml-team", "name": name, "by": "gc"}
        assert collected in sim.api.collected
    assert summary["isolation"]["problems"] == []
