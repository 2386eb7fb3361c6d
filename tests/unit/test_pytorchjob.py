"""The PyTorchJob builder and `visionflow cluster render-job` (a dry run; no cluster needed)."""

import pytest
import yaml

from visionflow import TRAIN_IMAGE
from visionflow.cluster.pytorchjob import build_pytorchjob, job_name, validate_job
from visionflow.core.config import ConfigError, load_config

CLUSTER = ["storage=minio", "tracking=server", "run_id=Run_7"]


def _job(*overrides):
    args = [*CLUSTER, *overrides]
    return build_pytorchjob(load_config(args), args)


def _container(job, role="Master"):
    return job["spec"]["pytorchReplicaSpecs"][role]["template"]["spec"]["containers"][0]


def test_gpu_job_has_master_workers_torchrun_and_cluster_settings():
    job = _job("cluster.nodes=3", "cluster.gpus_per_node=8", "cluster.node_selector={pool: h100}",
               "cluster.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]",
               "cluster.backoff_limit=2", "cluster.active_deadline_seconds=3600")  # fmt: skip
    validate_job(job)
    spec = job["spec"]
    assert spec["nprocPerNode"] == "8"
    assert spec["runPolicy"] == {
        "backoffLimit": 2,
        "activeDeadlineSeconds": 3600,
        "cleanPodPolicy": "Running",
    }
    assert spec["pytorchReplicaSpecs"]["Master"]["replicas"] == 1
    assert spec["pytorchReplicaSpecs"]["Worker"]["replicas"] == 2
    for role in ("Master", "Worker"):
        pod = spec["pytorchReplicaSpecs"][role]["template"]["spec"]
        c = _container(job, role)
        assert c["name"] == "pytorch" and c["image"] == TRAIN_IMAGE
        assert c["resources"]["limits"]["nvidia.com/gpu"] == 8
        assert (
            c["command"][0] == "torchrun"
            and "--nproc-per-node=$(PET_NPROC_PER_NODE)" in c["command"]
        )
        assert c["command"][-5:] == ["cluster.launcher=local", "trainer.num_nodes=3", "trainer.devices=8",
                                     "trainer.accelerator=gpu", "trainer.strategy=ddp"]  # fmt: skip
        assert (
            pod["nodeSelector"] == {"pool": "h100"}
            and pod["tolerations"][0]["key"] == "nvidia.com/gpu"
        )
        shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
        assert shm["emptyDir"]["medium"] == "Memory"
        assert (
            pod["securityContext"]["runAsNonRoot"]
            and c["securityContext"]["allowPrivilegeEscalation"] is False
        )
        secret_env = {
            e["name"]: e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e
        }
        assert secret_env == {
            "AWS_ACCESS_KEY_ID": "visionflow-minio",
            "AWS_SECRET_ACCESS_KEY": "visionflow-minio",
        }


def test_cpu_job_runs_the_plain_entrypoint_one_process_per_pod():
    job = _job("cluster.nodes=2")
    validate_job(job)
    c = _container(job)
    assert c["command"][:2] == ["visionflow", "train"] and "trainer.accelerator=cpu" in c["command"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert job["spec"]["nprocPerNode"] == "1"
    assert "Worker" not in _job()["spec"]["pytorchReplicaSpecs"]  # one node: a Master alone


def test_job_names_are_valid_and_distinct():
    names = {job_name(r) for r in ("Run_7", "run-7", "a" * 200)}
    assert len(names) == 3
    for n in names:
        assert len(n) <= 50 and n == n.lower() and n[0].isalpha()


def test_a_local_store_or_tracking_cannot_run_on_a_cluster():
    with pytest.raises(ConfigError, match="needs a shared artifact store"):
        build_pytorchjob(load_config(["run_id=x"]), [])
    with pytest.raises(ConfigError, match="needs an MLflow tracking server"):
        build_pytorchjob(load_config(["storage=minio", "run_id=x"]), [])


def test_invalid_pod_fields_are_caught_by_the_kubernetes_schema():
    job = _job()
    _container(job)["resources"]["limits"]["cpu"] = {"not": "a quantity"}
    with pytest.raises(ValueError, match=r"Master pod template is invalid for Kubernetes 1.30"):
        validate_job(job)


def test_render_job_prints_the_manifest(capsys):
    from visionflow.cli import main

    assert main(["cluster", "render-job", *CLUSTER, "cluster.nodes=2"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "PyTorchJob" and job["metadata"]["name"] == job_name("Run_7")
    validate_job(job)
