"""The TrainJob builder (Kubeflow Trainer v2, trainer.kubeflow.org/v1alpha1) and its strict
validation against kubeflow_trainer_api's models; no cluster needed."""

import copy

import pytest

from visionflow.cluster.netpolicy import build_network_policy, validate_network_policy
from visionflow.cluster.pytorchjob import (
    POD_NAME_ENV,
    POD_UID_ENV,
    WORKDIR,
    build_pytorchjob,
    step_owner,
)
from visionflow.cluster.trainjob import (
    CONTAINER,
    JOBSET_NAME_LABEL,
    PATCH_MANAGER,
    REPLICATED_JOB,
    build_trainjob,
    pod_patch,
    validate_trainjob,
)
from visionflow.core.config import ConfigError, load_config

CLUSTER = ["storage=minio", "tracking=server", "run_id=Run_7", "cluster.api=trainjob"]
POD_UID = "3f0c9a52-8d1e-4c1b-9a57-0c1d2e3f4a5b"


@pytest.fixture(scope="module")
def gpu_job():
    args = [*CLUSTER, "cluster.nodes=2", "cluster.gpus_per_node=8", "cluster.service_account=trainer",
            "cluster.node_selector={pool: h100}", "workdir=/somewhere/else",
            "cluster.tolerations=[{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}]"]  # fmt: skip
    cfg = load_config(args)
    owner = step_owner({POD_NAME_ENV: "train-pod", POD_UID_ENV: POD_UID})
    return cfg, args, build_trainjob(cfg, args, owner)


def test_trainjob_runs_the_train_command_on_numnodes_torch_nodes(gpu_job):
    _, _, job = gpu_job
    validate_trainjob(job)
    spec = job["spec"]
    assert spec["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org", "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }  # fmt: skip
    trainer = spec["trainer"]
    assert trainer["numNodes"] == 2 and trainer["numProcPerNode"] == 8
    assert trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "8"  # quantities: strings
    command = trainer["command"]
    assert command[0] == "torchrun"
    # the runtime's torch plugin sets the PET_* variables; MASTER_ADDR is a PyTorchJob's
    assert "--master-addr=$(PET_MASTER_ADDR)" in command
    assert "--master-port=$(PET_MASTER_PORT)" in command
    assert command[command.index("-m") + 1 : command.index("-m") + 3] == ["visionflow.cli", "train"]
    assert command[-5:] == ["cluster.launcher=local", "trainer.num_nodes=2", "trainer.devices=8",
                            "trainer.accelerator=gpu", "trainer.strategy=ddp"]  # fmt: skip
    # no workingDir in a TrainJob: the workdir is absolute, on the writable emptyDir
    workdirs = [a for a in command if a.startswith("workdir=")]
    assert workdirs == [f"workdir={WORKDIR}/.visionflow"]
    assert spec["activeDeadlineSeconds"] == 86400


def test_trainjob_gets_the_same_image_env_and_resources_as_the_pytorchjob(gpu_job):
    cfg, args, job = gpu_job
    master = build_pytorchjob(cfg, args)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    container = master["spec"]["containers"][0]
    trainer = job["spec"]["trainer"]
    assert trainer["image"] == container["image"]
    assert trainer["env"] == container["env"]
    assert trainer["resourcesPerNode"] == {
        kind: {k: str(v) for k, v in values.items()}
        for kind, values in container["resources"].items()
    }
    patch = pod_patch(job)
    pod = patch["spec"]
    for key in ("securityContext", "volumes", "nodeSelector", "tolerations"):
        assert pod[key] == master["spec"][key], key
    assert pod["serviceAccountName"] == "trainer"
    assert patch["metadata"]["labels"]["visionflow/run-id"] == "Run_7"
    (node,) = pod["containers"]
    assert node["name"] == CONTAINER == "node"
    assert node["securityContext"]["readOnlyRootFilesystem"] is True
    assert node["volumeMounts"] == container["volumeMounts"]
    assert "env" not in node  # a TrainJob sets the node container's env in spec.trainer only


def test_trainjob_carries_owner_and_labels_and_no_ttl_field(gpu_job):
    _, _, job = gpu_job
    meta = job["metadata"]
    assert meta["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "train-pod", "uid": POD_UID}
    ]
    assert meta["labels"]["app.kubernetes.io/component"] == "train"
    assert "namespace" not in meta  # the launcher's own
    # v1alpha1 has no ttlSecondsAfterFinished: setting it would be an unknown field
    with_ttl = copy.deepcopy(job)
    with_ttl["spec"]["ttlSecondsAfterFinished"] = 3600
    with pytest.raises(ValueError, match="spec.ttlSecondsAfterFinished"):
        validate_trainjob(with_ttl)
    (patch,) = job["spec"]["runtimePatches"]
    assert patch["manager"] == PATCH_MANAGER
    (rjob,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rjob["name"] == REPLICATED_JOB


def _broken(job, mutate):
    job = copy.deepcopy(job)
    mutate(job)
    return job


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        # the pre-v2.3 API's name for runtime patches: unknown here, not silently dropped
        (lambda j: j["spec"].update(podTemplateOverrides=[]), "spec.podTemplateOverrides"),
        (lambda j: j["spec"]["trainer"].update(numNodes="2"),
         r"at spec.trainer.numNodes: Input should be a valid integer \(got '2'\)"),
        (lambda j: j["spec"]["trainer"].update(numNodes=0), "numNodes must be at least 1"),
        (lambda j: j["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "4"}),
         "PET_NNODES"),
        (lambda j: j["spec"]["trainer"]["resourcesPerNode"]["limits"].update(cpu="lots"),
         r"node.resources.limits.cpu is not a Kubernetes quantity: 'lots'"),
        (lambda j: pod_patch(j)["spec"]["securityContext"].update(runAsUser="root"),
         r"replicatedJobs\[0\].template.spec.template.spec.securityContext.runAsUser: Input"),
        (lambda j: pod_patch(j)["spec"]["volumes"].pop(0), "mounts volume 'dshm'"),
        (lambda j: pod_patch(j)["spec"]["containers"][0].update(env=[{"name": "A", "value": "b"}]),
         "sets env on container 'node'"),
        (lambda j: pod_patch(j)["spec"]["containers"][0].update(name="trainer"),
         "a torch runtime's trainer container is 'node'"),
        (lambda j: pod_patch(j)["spec"]["volumes"][0].update(emptyDirr={}), "emptyDirr"),
        (lambda j: j.update(kind="PyTorchJob"), "not a trainer.kubeflow.org/v1alpha1 TrainJob"),
    ],
)  # fmt: skip
def test_validation_is_strict(gpu_job, mutate, message):
    _, _, job = gpu_job
    with pytest.raises(ValueError, match=message):
        validate_trainjob(_broken(job, mutate))


def test_runtime_is_configurable_and_must_be_named():
    args = [*CLUSTER, "cluster.runtime=torch-cuda-251"]
    job = build_trainjob(load_config(args), args)
    validate_trainjob(job)
    assert job["spec"]["runtimeRef"]["name"] == "torch-cuda-251"
    assert job["spec"]["trainer"]["numProcPerNode"] == 1  # CPU: one process per node
    with pytest.raises(ConfigError, match="cluster.runtime must name a torch"):
        build_trainjob(load_config([*CLUSTER, "cluster.runtime="]), CLUSTER)


def test_trainjob_network_policy_selects_the_jobset_pods(gpu_job):
    _, _, job = gpu_job
    job = {**job, "metadata": {**job["metadata"], "namespace": "team-a"}}
    policy = build_network_policy(job, "7b6a5c4d-3e2f-4a1b-8c9d-0e1f2a3b4c5d")
    validate_network_policy(policy)
    selector = {"matchLabels": {JOBSET_NAME_LABEL: job["metadata"]["name"]}}
    assert policy["spec"]["podSelector"] == selector
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": selector}]}]
    assert policy["metadata"]["annotations"]["visionflow/rendezvous-port"] == "29500"
    (owner,) = policy["metadata"]["ownerReferences"]
    assert (owner["apiVersion"], owner["kind"]) == ("trainer.kubeflow.org/v1alpha1", "TrainJob")
