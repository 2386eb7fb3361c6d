"""The TrainJob (trainer.kubeflow.org/v1alpha1, Kubeflow Trainer v2) that runs a step's training
(train's, or optimize's fine-tuning: pytorchjob.JOB_STEPS).

`cluster.api=trainjob` selects it instead of the PyTorchJob. The job refers to a torch
ClusterTrainingRuntime (`cluster.runtime`, `torch-distributed` by default) whose replicated job
`node` (container `node`) runs the training: `numNodes` pods, each under torchrun, which reads
the PET_* variables the runtime's torch plugin sets (PET_NNODES, PET_NPROC_PER_NODE,
PET_NODE_RANK from the Job's completion index, PET_MASTER_ADDR: pod 0 of the JobSet, and
PET_MASTER_PORT: 29500). Image, command, env and resources come from the same config, through
the same functions, as the PyTorchJob's (`pytorchjob.pod_template`); the rest of the pod goes in
a runtime patch (`spec.runtimePatches`, which replaced podTemplateOverrides in Trainer v2.3).

What a runtime patch may set, and so what this job carries, per the v1alpha1 API:
- the pod: serviceAccountName, securityContext, volumes, nodeSelector, tolerations, affinity
  and labels;
- the `node` container: securityContext and volumeMounts (its env only through `trainer.env`;
  image, command and resources only through `trainer`).
Not settable from a TrainJob, and so left to the runtime: automountServiceAccountToken, the
container's workingDir (the command passes an absolute workdir= instead), imagePullPolicy, the
restart policy and the JobSet's failure policy (`cluster.backoff_limit` and
`cluster.restart_policy` apply to PyTorchJobs only), and a TTL: v1alpha1 has no
ttlSecondsAfterFinished (kubeflow/trainer#4052), so a finished TrainJob stays until it is
deleted: with the run (its ownerReference to the step's pod) or by hand.

`validate_trainjob` checks the manifest strictly against kubeflow_trainer_api's models (a field
they do not know is an error, not dropped) and the pod it describes against Kubernetes 1.30.
"""

from __future__ import annotations

from typing import Any

from visionflow.cluster.pytorchjob import (
    K8S_VERSION,
    WORKDIR,
    check_cluster_config,
    check_pod_values,
    check_schema,
    job_command,
    job_metadata,
    pod_template,
    validate_metadata,
)
from visionflow.core.config import ConfigError

GROUP, VERSION, PLURAL, KIND = "trainer.kubeflow.org", "v1alpha1", "trainjobs", "TrainJob"
API_VERSION = f"{GROUP}/{VERSION}"
RUNTIME_KIND = "ClusterTrainingRuntime"
CONTAINER = "node"  # the trainer container of a torch runtime
REPLICATED_JOB = "node"  # the JobSet's replicated job that runs the trainer
TRAINER_PORT = 29500  # PET_MASTER_PORT: where rank 0's rendezvous listens
# Labels JobSet puts on the pods (the JobSet is named after the TrainJob) and the indexed Job's
# completion index: the master is pod 0 of job 0 of replicated job `node`.
JOBSET_NAME_LABEL = "jobset.sigs.k8s.io/jobset-name"
REPLICATED_JOB_LABEL = "jobset.sigs.k8s.io/replicatedjob-name"
JOB_INDEX_LABEL = "jobset.sigs.k8s.io/job-index"
COMPLETION_INDEX_LABEL = "batch.kubernetes.io/job-completion-index"
PATCH_MANAGER = "visionflow"  # the runtimePatches entry this job owns
# Set by the runtime's torch plugin; a TrainJob that sets them is rejected.
TORCHRUN_ENV = frozenset(
    {"PET_NNODES", "PET_NPROC_PER_NODE", "PET_NODE_RANK", "PET_MASTER_ADDR", "PET_MASTER_PORT"}
)
# The pod fields a runtime patch may set (PodSpecPatch), copied from the PyTorchJob pod.
POD_PATCH_FIELDS = (
    "serviceAccountName",
    "securityContext",
    "volumes",
    "nodeSelector",
    "tolerations",
    "affinity",
)


def _quantities(resources: dict[str, Any]) -> dict[str, Any]:
    """Resource quantities as strings, the form TrainJob's typed API takes."""
    return {kind: {k: str(v) for k, v in values.items()} for kind, values in resources.items()}


def build_trainjob(
    cfg,
    overrides: list[str],
    owner: dict[str, Any] | None = None,
    dataset_id: str | None = None,
    *,
    step: str = "train",
    checkpoint_uri: str | None = None,
) -> dict[str, Any]:
    """The TrainJob manifest for this run's `step` (train, or optimize on `checkpoint_uri`) on
    `dataset_id` (see the module's docstring and pytorchjob.job_command).

    `owner`: an ownerReference (`pytorchjob.step_owner()`: the pipeline step's pod).
    """
    check_cluster_config(cfg, "a TrainJob")
    c = cfg.cluster
    if not c.runtime:
        raise ConfigError(
            "cluster.runtime must name a torch ClusterTrainingRuntime (kubectl get "
            "clustertrainingruntimes), e.g. torch-distributed"
        )
    procs = max(int(c.gpus_per_node), 1)
    command = job_command(
        cfg,
        overrides,
        step=step,
        dataset_id=dataset_id,
        checkpoint_uri=checkpoint_uri,
        always_torchrun=True,
        workdir=f"{WORKDIR}/.visionflow",
    )
    template = pod_template(cfg, command)
    pod, (container,) = template["spec"], template["spec"]["containers"]
    pod_patch: dict[str, Any] = {k: pod[k] for k in POD_PATCH_FIELDS if k in pod}
    pod_patch["containers"] = [
        {
            "name": CONTAINER,
            "securityContext": container["securityContext"],
            "volumeMounts": container["volumeMounts"],
        }
    ]
    meta = job_metadata(cfg, owner, step)
    replicated_job = {
        "name": REPLICATED_JOB,
        "template": {
            "metadata": {"labels": dict(meta["labels"])},
            "spec": {"template": {"metadata": template["metadata"], "spec": pod_patch}},
        },
    }
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": meta,
        "spec": {
            "runtimeRef": {"apiGroup": GROUP, "kind": RUNTIME_KIND, "name": c.runtime},
            "activeDeadlineSeconds": int(c.active_deadline_seconds),
            "trainer": {
                "image": container["image"],
                "command": container["command"],
                "env": container["env"],
                "numNodes": int(c.nodes),
                "numProcPerNode": procs,
                "resourcesPerNode": _quantities(container["resources"]),
            },
            "runtimePatches": [
                {
                    "manager": PATCH_MANAGER,
                    "trainingRuntimeSpec": {
                        "template": {"spec": {"replicatedJobs": [replicated_job]}}
                    },
                }
            ],
        },
    }


def validate_trainjob(job: dict[str, Any], k8s_version: str = K8S_VERSION) -> None:
    """Check the TrainJob strictly against the v1alpha1 models, and its pod against Kubernetes.

    ValueError names the field. kubeflow_trainer_api's models drop fields they do not know;
    here a field that does not survive the model's round trip is an error, as the API server's
    strict field validation would make it.
    """
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob
    from pydantic import ValidationError

    if job.get("apiVersion") != API_VERSION or job.get("kind") != KIND:
        raise ValueError(f"not a {API_VERSION} {KIND}: {job.get('apiVersion')}/{job.get('kind')}")
    try:
        parsed = TrainerV1alpha1TrainJob.from_dict(job)
    except ValidationError as err:
        first = err.errors()[0]
        leaf = [str(p) for p in first["loc"]]
        where = _find(job, leaf[-1] if leaf else "", first.get("input")) or ".".join(leaf)
        raise ValueError(
            f"the TrainJob is invalid for {API_VERSION} at {where}: {first['msg']} "
            f"(got {first.get('input')!r})"
        ) from None
    unknown = _first_unknown(job, parsed.to_dict(), "")
    if unknown:
        raise ValueError(f"the TrainJob has a field {API_VERSION} does not define: {unknown}")
    validate_metadata(job["metadata"], k8s_version)
    spec = job["spec"]
    if not spec["runtimeRef"].get("name"):
        raise ValueError("the TrainJob's spec.runtimeRef.name is empty")
    trainer = spec.get("trainer") or {}
    for key in ("numNodes", "numProcPerNode"):
        if key in trainer and trainer[key] < 1:
            raise ValueError(f"spec.trainer.{key} must be at least 1, got {trainer[key]}")
    reserved = sorted(TORCHRUN_ENV & {e["name"] for e in trainer.get("env") or []})
    if reserved:
        raise ValueError(
            f"spec.trainer.env sets {reserved}, which the torch runtime sets itself (torchrun's "
            "PET_* variables)"
        )
    _validate_pod(job, k8s_version)


def _find(value: Any, key: str, leaf: Any, path: str = "") -> str | None:
    """The path of the first `key` in `value` that holds `leaf` (pydantic's error locations
    here are relative to the nested model that failed)."""
    if isinstance(value, dict):
        for k, v in value.items():
            here = f"{path}.{k}".lstrip(".")
            if k == key and v == leaf:
                return here
            if found := _find(v, key, leaf, here):
                return found
    elif isinstance(value, list):
        for i, v in enumerate(value):
            if found := _find(v, key, leaf, f"{path}[{i}]"):
                return found
    return None


def _first_unknown(given: Any, parsed: Any, path: str) -> str | None:
    """The first path in `given` that the parsed model does not have."""
    if isinstance(given, dict):
        if not isinstance(parsed, dict):
            return path or "."
        for key, value in given.items():
            if key not in parsed:
                return f"{path}.{key}".lstrip(".")
            found = _first_unknown(value, parsed[key], f"{path}.{key}")
            if found:
                return found
    elif isinstance(given, list):
        if not isinstance(parsed, list) or len(parsed) != len(given):
            return path
        for i, (a, b) in enumerate(zip(given, parsed, strict=True)):
            found = _first_unknown(a, b, f"{path}[{i}]")
            if found:
                return found
    return None


def pod_patch(job: dict[str, Any]) -> dict[str, Any]:
    """This job's patch of the `node` replicated job's pod template ({} when there is none)."""
    for patch in job["spec"].get("runtimePatches") or []:
        if patch.get("manager") != PATCH_MANAGER:
            continue
        runtime = patch.get("trainingRuntimeSpec") or {}
        for rjob in ((runtime.get("template") or {}).get("spec") or {}).get("replicatedJobs") or []:
            if rjob.get("name") == REPLICATED_JOB:
                return ((rjob.get("template") or {}).get("spec") or {}).get("template") or {}
    return {}


def _validate_pod(job: dict[str, Any], k8s_version: str) -> None:
    """The trainer pod the runtime will make, as far as this job sets it, as a Kubernetes Pod."""
    trainer = job["spec"].get("trainer") or {}
    patch = pod_patch(job)
    spec = dict(patch.get("spec") or {})
    containers = spec.pop("containers", None) or []
    names = [ct.get("name") for ct in containers]
    if set(names) - {CONTAINER}:
        raise ValueError(
            f"the runtime patch names containers {names}; a torch runtime's trainer container "
            f"is {CONTAINER!r}"
        )
    node = {"name": CONTAINER, "image": trainer.get("image") or "runtime-image"}
    for key in ("command", "args", "env"):
        if trainer.get(key):
            node[key] = trainer[key]
    if trainer.get("resourcesPerNode"):
        node["resources"] = trainer["resourcesPerNode"]
    for patched in containers:
        if patched.get("env"):
            raise ValueError(
                f"the runtime patch sets env on container {CONTAINER!r}: a TrainJob sets the "
                "trainer's env in spec.trainer.env only"
            )
        node.update({k: v for k, v in patched.items() if k != "name"})
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": f"{job['metadata']['name']}-{REPLICATED_JOB}-0-0",
            **(patch.get("metadata") or {}),
        },
        "spec": {**spec, "containers": [node]},
    }
    check_schema(pod, "the TrainJob's trainer pod", k8s_version)
    check_pod_values(pod["spec"], "the TrainJob's trainer pod")
