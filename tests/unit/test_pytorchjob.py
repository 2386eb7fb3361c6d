"""The PyTorchJob builder, its NetworkPolicy, `visionflow cluster render-job` (a dry run; no
cluster needed), and when and how the train step launches a cluster job (cluster.training)."""

import json
import logging

import pytest
import yaml

from visionflow import TRAIN_IMAGE
from visionflow.cluster import training
from visionflow.cluster.netpolicy import build_network_policy, validate_network_policy
from visionflow.cluster.pytorchjob import (
    JOB_NAME_LABEL,
    POD_NAME_ENV,
    POD_UID_ENV,
    build_pytorchjob,
    job_name,
    step_owner,
    validate_job,
    validate_metadata,
)
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
        "ttlSecondsAfterFinished": 3600,
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
    job = _job()
    _container(job)["resources"]["requests"]["memory"] = "16 GB"  # a string, but no quantity
    with pytest.raises(ValueError, match=r"pytorch.resources.requests.memory is not a Kubernetes"):
        validate_job(job)


def test_render_job_prints_the_manifest(capsys):
    from visionflow.cli import main

    assert main(["cluster", "render-job", *CLUSTER, "cluster.nodes=2"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "PyTorchJob" and job["metadata"]["name"] == job_name("Run_7")
    validate_job(job)


# --- lifecycle: owner, TTL, restarts, namespace ---------------------------------------------------

POD_UID = "3f0c9a52-8d1e-4c1b-9a57-0c1d2e3f4a5b"
JOB_UID = "7b6a5c4d-3e2f-4a1b-8c9d-0e1f2a3b4c5d"


def test_step_owner_needs_both_pod_variables():
    assert step_owner({POD_NAME_ENV: "train-pod-x", POD_UID_ENV: POD_UID}) == {
        "apiVersion": "v1", "kind": "Pod", "name": "train-pod-x", "uid": POD_UID,
    }  # fmt: skip
    assert step_owner({POD_NAME_ENV: "train-pod-x"}) is None
    assert step_owner({POD_UID_ENV: POD_UID, POD_NAME_ENV: " "}) is None
    assert step_owner({}) is None


def test_the_job_is_owned_by_the_step_pod_without_blocking_its_deletion():
    args = [*CLUSTER]
    owner = step_owner({POD_NAME_ENV: "train-pod-x", POD_UID_ENV: POD_UID})
    job = build_pytorchjob(load_config(args), args, owner)
    validate_job(job)
    (ref,) = job["metadata"]["ownerReferences"]
    assert ref == {"apiVersion": "v1", "kind": "Pod", "name": "train-pod-x", "uid": POD_UID}
    assert "ownerReferences" not in _job()["metadata"]  # from a laptop: no owner

    blocking = {**job["metadata"], "ownerReferences": [{**ref, "blockOwnerDeletion": True}]}
    with pytest.raises(ValueError, match="blockOwnerDeletion"):
        validate_metadata(blocking)
    no_uid = {**job["metadata"], "ownerReferences": [{k: v for k, v in ref.items() if k != "uid"}]}
    with pytest.raises(ValueError, match="ownerReferences"):
        validate_metadata(no_uid)


def test_defaults_restart_preempted_pods_and_expire_finished_jobs():
    job = _job()
    validate_job(job)
    policy = job["spec"]["runPolicy"]
    assert policy["backoffLimit"] == 3 and policy["ttlSecondsAfterFinished"] == 3600
    assert job["spec"]["pytorchReplicaSpecs"]["Master"]["restartPolicy"] == "OnFailure"
    assert _job("cluster.ttl_seconds_after_finished=60")["spec"]["runPolicy"][
        "ttlSecondsAfterFinished"
    ] == 60  # fmt: skip
    kept = _job("cluster.ttl_seconds_after_finished=null")["spec"]["runPolicy"]
    assert "ttlSecondsAfterFinished" not in kept


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("cluster.backoff_limit=-1", "cluster.backoff_limit must be 0 or more, got -1"),
        ("cluster.ttl_seconds_after_finished=-5", "cluster.ttl_seconds_after_finished must be"),
        ("cluster.pending_timeout_s=-1", "cluster.pending_timeout_s must be 0"),
        ("cluster.restart_policy=Sometimes", "cluster.restart_policy must be one of OnFailure"),
        ("cluster.nodes=0", "cluster.nodes must be at least 1"),
    ],
)
def test_bad_lifecycle_settings_are_refused(override, message):
    with pytest.raises(ConfigError, match=message):
        _job(override)


def test_validate_job_rejects_what_a_run_policy_cannot_hold():
    job = _job()
    job["spec"]["runPolicy"]["ttlSecondsAfterFinished"] = -1
    with pytest.raises(ValueError, match="runPolicy.ttlSecondsAfterFinished must be an integer"):
        validate_job(job)
    job = _job()
    job["spec"]["runPolicy"]["ttlSecondsAfterFinish"] = 60  # a typo the operator would drop
    with pytest.raises(ValueError, match="ttlSecondsAfterFinish"):
        validate_job(job)


def test_namespace_is_left_to_the_launcher_unless_configured():
    assert "namespace" not in _job()["metadata"]
    assert _job("cluster.namespace=team-a")["metadata"]["namespace"] == "team-a"


@pytest.mark.parametrize(
    ("overrides", "threads"),
    [
        (["cluster.cpu=500m"], "1"),
        (["cluster.cpu=6"], "6"),
        (["cluster.cpu=16", "cluster.gpus_per_node=4"], "4"),
    ],  # fmt: skip
)
def test_each_training_process_gets_its_share_of_the_pods_cpu_as_threads(overrides, threads):
    job = _job("cluster.nodes=2", *overrides)
    for role in ("Master", "Worker"):
        env = {e["name"]: e.get("value") for e in _container(job, role)["env"]}
        assert env["OMP_NUM_THREADS"] == threads
    with pytest.raises(ConfigError, match="cluster.cpu is not a Kubernetes quantity: 'lots'"):
        _job("cluster.cpu=lots")


def test_site_config_map_is_mounted_where_the_steps_have_it():
    job = _job("cluster.site_config_map=visionflow-config")
    validate_job(job)
    pod = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    (site,) = [v for v in pod["volumes"] if v["name"] == "site"]
    assert site["configMap"]["name"] == "visionflow-config"
    mount = next(m for m in _container(job)["volumeMounts"] if m["name"] == "site")
    assert mount == {"name": "site", "mountPath": "/var/run/visionflow/site", "readOnly": True}
    env = {e["name"]: e.get("value") for e in _container(job)["env"]}
    assert env["VISIONFLOW_SITE_CONFIG"] == "/var/run/visionflow/site/cluster.yaml"
    assert "VISIONFLOW_SITE_CONFIG" not in {e["name"] for e in _container(_job())["env"]}


# --- the NetworkPolicy ----------------------------------------------------------------------------


def test_network_policy_admits_only_the_jobs_own_pods_and_goes_with_the_job():
    job = _job("cluster.namespace=team-a", "cluster.nodes=2", "cluster.port=29999")
    policy = build_network_policy(job, JOB_UID)
    validate_network_policy(policy)  # strict, Kubernetes 1.30
    name = job["metadata"]["name"]
    selector = {"matchLabels": {JOB_NAME_LABEL: name}}
    assert policy["metadata"]["name"] == name and policy["metadata"]["namespace"] == "team-a"
    assert policy["spec"]["podSelector"] == selector
    assert policy["spec"]["policyTypes"] == ["Ingress"]  # egress (MinIO, MLflow, DNS) untouched
    (rule,) = policy["spec"]["ingress"]
    assert rule["from"] == [{"podSelector": selector}]  # no namespaceSelector, no ipBlock
    assert policy["metadata"]["annotations"]["visionflow/rendezvous-port"] == "29999"
    assert policy["metadata"]["ownerReferences"] == [
        {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "name": name, "uid": JOB_UID}
    ]


def test_an_invalid_network_policy_is_caught_by_the_schema():
    policy = build_network_policy(_job("cluster.namespace=team-a"), JOB_UID)
    policy["spec"]["ingress"][0]["from"][0]["podSelecter"] = {}  # unknown field
    with pytest.raises(ValueError, match="NetworkPolicy is invalid for Kubernetes 1.30"):
        validate_network_policy(policy)


# --- when the train step launches a cluster job (cluster.training) --------------------------------


K8S = {"KUBERNETES_SERVICE_HOST": "10.0.0.1"}


@pytest.mark.parametrize(
    ("launcher", "env", "step", "expected"),
    [
        ("auto", {"VISIONFLOW_KFP_STEP": "train", **K8S}, "train", True),
        ("auto", {"VISIONFLOW_KFP_STEP": "optimize", **K8S}, "optimize", True),
        ("auto", K8S, "train", False),  # a notebook pod
        ("auto", {"VISIONFLOW_KFP_STEP": "train"}, "train", False),  # a laptop with the marker
        ("auto", {"VISIONFLOW_KFP_STEP": "evaluate", **K8S}, "train", False),
        ("auto", {"VISIONFLOW_KFP_STEP": "train", **K8S}, "optimize", False),  # another step's
        ("auto", {"VISIONFLOW_KFP_STEP": "optimize", **K8S}, "train", False),
        ("local", {"VISIONFLOW_KFP_STEP": "train", **K8S}, "train", False),
        ("pytorchjob", {}, "train", True),  # explicitly, from anywhere with a kubeconfig
        ("pytorchjob", {}, "optimize", True),
    ],
)
def test_auto_launches_only_inside_the_pipelines_own_step(monkeypatch, launcher, env, step,
                                                          expected):  # fmt: skip
    for var in ("VISIONFLOW_KFP_STEP", "KUBERNETES_SERVICE_HOST"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    cfg = load_config([f"cluster.launcher={launcher}"])
    assert training.use_pytorchjob(cfg, step=step) is expected


def test_an_unknown_launcher_or_api_is_refused():
    with pytest.raises(ConfigError, match="cluster.launcher must be one of auto, local"):
        training.use_pytorchjob(load_config(["cluster.launcher=kubernetes"]))
    args = [*CLUSTER, "cluster.api=mpijob"]
    with pytest.raises(ConfigError, match="cluster.api must be one of pytorchjob, trainjob"):
        training.build_job(load_config(args), args)


class _Launched(Exception):
    pass


@pytest.fixture
def launched(monkeypatch):
    """Replaces launcher.launch: records its arguments and stops run_on_cluster there."""
    import visionflow.cluster.launcher as launcher

    calls: list[tuple[dict, dict]] = []

    def fake_launch(job, **kwargs):
        calls.append((job, kwargs))
        raise _Launched

    monkeypatch.setattr(launcher, "launch", fake_launch)
    for var in (POD_NAME_ENV, POD_UID_ENV, "VISIONFLOW_SITE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    return calls


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_run_on_cluster_launches_the_built_job_owned_by_the_step_pod(launched, monkeypatch, api):
    monkeypatch.setenv(POD_NAME_ENV, "visionflow-train-abc")
    monkeypatch.setenv(POD_UID_ENV, POD_UID)
    args = [*CLUSTER, f"cluster.api={api}", "cluster.pending_timeout_s=600",
            "cluster.active_deadline_seconds=7200", "cluster.s3_secret=team-s3"]  # fmt: skip
    cfg = load_config(args)
    with pytest.raises(_Launched):
        training.run_on_cluster(cfg, args, "abc123")
    ((job, kwargs),) = launched
    assert job == training.build_job(cfg, args, step_owner(), "abc123")  # what the builder builds
    assert job["kind"] == {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}[api]
    # The pods train on the dataset the step was given, not on whatever the run's record says.
    assert '"train", "--dataset", "abc123"' in json.dumps(job)
    assert job["metadata"]["ownerReferences"][0]["uid"] == POD_UID
    assert kwargs == {"timeout_s": 7200, "required_secrets": ["team-s3"], "pending_timeout_s": 600}


@pytest.mark.parametrize("api", ["pytorchjob", "trainjob"])
def test_optimize_fine_tunes_in_its_own_job_on_the_training_nodes(launched, api):
    """optimize=prune inside the pipeline's optimize step: the same pods as training (GPUs,
    resources, DDP) run `visionflow optimize` on the checkpoint the step was given, in a job
    whose name and labels are optimize's, so that it never collides with the run's train job."""
    args = [*CLUSTER, f"cluster.api={api}", "cluster.nodes=2", "cluster.gpus_per_node=4",
            "optimize=prune"]  # fmt: skip
    cfg = load_config(args)
    ckpt = "s3://visionflow/checkpoints/Run_7/best.ckpt"
    with pytest.raises(_Launched):
        training.run_on_cluster(cfg, args, "abc123", step="optimize", checkpoint_uri=ckpt)
    ((job, _),) = launched
    train_job = training.build_job(cfg, args, None, "abc123")
    assert job == training.build_job(
        cfg, args, None, "abc123", step="optimize", checkpoint_uri=ckpt
    )  # validated, as launched
    name = job["metadata"]["name"]
    assert name == job_name("Run_7", "optimize") != train_job["metadata"]["name"]
    assert name.endswith("-optimize") and len(name) <= 46
    assert job["metadata"]["labels"]["app.kubernetes.io/component"] == "optimize"
    command = (
        _container(job)["command"] if api == "pytorchjob" else job["spec"]["trainer"]["command"]
    )
    i = command.index("visionflow.cli")  # 4 GPUs a pod: under torchrun
    assert command[i + 1 : i + 6] == ["optimize", "--dataset", "abc123", "--checkpoint", ckpt]
    assert {"optimize=prune", "cluster.launcher=local", "trainer.strategy=ddp",
            "trainer.num_nodes=2", "trainer.devices=4"} <= set(command)  # fmt: skip
    # Everything but the step is training's: the same nodes, GPUs, resources and environment.
    for built in (job, train_job):
        built.pop("metadata")
        if api == "trainjob":
            built["spec"]["trainer"].pop("command")
            (patch,) = built["spec"]["runtimePatches"]
            (replicated,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
            replicated["template"]["metadata"].pop("labels")  # the job's
        else:
            for role in ("Master", "Worker"):
                _container(built, role).pop("command")
    assert job == train_job


def test_only_train_and_optimize_run_as_cluster_jobs():
    with pytest.raises(ValueError, match="no cluster job runs the evaluate step"):
        job_name("Run_7", "evaluate")
    with pytest.raises(ValueError, match="no cluster job runs the export step"):
        training.use_pytorchjob(load_config(CLUSTER), step="export")


def test_run_on_cluster_without_the_pod_variables_says_there_is_no_owner(launched, caplog):
    args = [*CLUSTER, "cluster.pending_timeout_s=0"]
    with caplog.at_level(logging.INFO, "visionflow.cluster"), pytest.raises(_Launched):
        training.run_on_cluster(load_config(args), args, "abc123")
    ((job, kwargs),) = launched
    assert "ownerReferences" not in job["metadata"]
    assert kwargs["pending_timeout_s"] is None  # 0: no limit
    assert "no ownerReference on PyTorchJob" in caplog.text
    assert "VISIONFLOW_POD_NAME" in caplog.text and "ttl_seconds_after_finished" in caplog.text


def test_render_job_prints_the_trainjob_when_cluster_api_says_so(capsys):
    from visionflow.cli import main
    from visionflow.cluster.trainjob import validate_trainjob

    assert main(["cluster", "render-job", *CLUSTER, "cluster.api=trainjob", "cluster.nodes=2"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    assert job["kind"] == "TrainJob" and job["spec"]["trainer"]["numNodes"] == 2
    validate_trainjob(job)
