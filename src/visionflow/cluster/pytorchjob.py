"""The PyTorchJob (kubeflow.org/v1) that runs a step's training on a cluster, and what goes with
it: the train step's, and the optimize step's fine-tuning of the pruned network (`JOB_STEPS`).

One typed builder turns the run's config into the manifest: a Master and `nodes - 1` Workers,
each a pod running the same `visionflow train` (or `visionflow optimize`) entrypoint (under
torchrun when a pod has several GPUs). The Training Operator injects MASTER_ADDR, MASTER_PORT,
WORLD_SIZE, RANK and the PET_* variables; rank 0 alone writes checkpoints and results. Pod
templates are validated against the Kubernetes 1.30 schemas before anything is submitted. The
TrainJob builder (`trainjob`) shares the config checks, the command and the pod settings defined
here.

The job's lifecycle is bounded whoever launches it:

- ownerReferences: inside the pipeline's train or optimize step (env VISIONFLOW_POD_NAME and
  VISIONFLOW_POD_UID, from the downward API) the job names the step's pod as its owner, so the
  garbage collector deletes it with the run. No blockOwnerDeletion: that needs `update` on
  pods/finalizers.
- runPolicy.ttlSecondsAfterFinished (`cluster.ttl_seconds_after_finished`): a finished job,
  kept for `kubectl logs`, goes after that long.
- restartPolicy OnFailure and backoffLimit (`cluster.backoff_limit`, 3): a preempted or failed
  pod is restarted inside the job and training resumes from its last checkpoint (optimize's
  fine-tuning starts again: it is short and keeps no checkpoint to resume from).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

from visionflow import TRAIN_IMAGE
from visionflow.core.config import ConfigError

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
API_VERSION = f"{GROUP}/{VERSION}"
CONTAINER = "pytorch"  # the Training Operator finds the training container by this name
PORT_NAME = "pytorchjob-port"
# Labels the Training Operator (v1.5 and later) puts on a job's pods.
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
JOB_ROLE_LABEL = "training.kubeflow.org/job-role"
K8S_VERSION = "1.30.0"
# The steps that run as a cluster job, each under its own job name (job_name).
JOB_STEPS = ("train", "optimize")
WORKDIR = "/var/visionflow"  # an emptyDir: the root filesystem stays read-only
RESTART_POLICIES = ("OnFailure", "Always", "Never", "ExitCode")
# The pipeline's train and optimize steps name their own pod (downward API): the job's owner.
POD_NAME_ENV, POD_UID_ENV = "VISIONFLOW_POD_NAME", "VISIONFLOW_POD_UID"
# The pipeline sets it, to the step's name, on those steps alone: `cluster.launcher=auto`
# launches a job only there (training.use_pytorchjob).
KFP_STEP_ENV = "VISIONFLOW_KFP_STEP"
# Where the pipeline's steps mount the site config (visionflow.core.config.site_overrides); the
# training pods mount `cluster.site_config_map` at the same place.
SITE_DIR, SITE_KEY, SITE_ENV = "/var/run/visionflow/site", "cluster.yaml", "VISIONFLOW_SITE_CONFIG"


def check_job_step(step: str) -> None:
    """ValueError unless `step` is one that runs as a cluster job (JOB_STEPS)."""
    if step not in JOB_STEPS:
        raise ValueError(f"no cluster job runs the {step} step (only {', '.join(JOB_STEPS)})")


def job_name(run_id: str, step: str = "train") -> str:
    """A DNS-1123 name for the run's job of `step`: train's, or another step's with the step's
    name at its end (a run's train job may still exist when its optimize job starts). Pod names
    append `-worker-NN`, so it stays within 46 characters."""
    check_job_step(step)
    suffix = "" if step == "train" else f"-{step}"
    base = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:6]
    return f"vf-{base[: 36 - len(suffix)].strip('-')}-{digest}{suffix}"


def step_owner(environ: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The ownerReference to the pipeline step's own pod, or None outside such a step.

    The pipeline sets VISIONFLOW_POD_NAME and VISIONFLOW_POD_UID on its train and optimize tasks
    (downward API metadata.name, metadata.uid); both are needed.
    """
    env = os.environ if environ is None else environ
    name, uid = env.get(POD_NAME_ENV, "").strip(), env.get(POD_UID_ENV, "").strip()
    if not (name and uid):
        return None
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def check_cluster_config(cfg, what: str = "a cluster job") -> None:
    """The checks both builders share; ConfigError names the key and what to do."""
    c = cfg.cluster
    if c.nodes < 1:
        raise ConfigError(f"cluster.nodes must be at least 1, got {c.nodes}")
    if c.gpus_per_node < 0:
        raise ConfigError(f"cluster.gpus_per_node must be 0 or more, got {c.gpus_per_node}")
    if c.backoff_limit < 0:
        raise ConfigError(
            f"cluster.backoff_limit must be 0 or more, got {c.backoff_limit}: it is how many "
            "times a failed or preempted pod is restarted inside the job (3 by default)"
        )
    if c.ttl_seconds_after_finished is not None and c.ttl_seconds_after_finished < 0:
        raise ConfigError(
            "cluster.ttl_seconds_after_finished must be 0 or more (seconds a finished job is "
            f"kept), or null to keep it, got {c.ttl_seconds_after_finished}"
        )
    if c.active_deadline_seconds < 1:
        raise ConfigError(
            f"cluster.active_deadline_seconds must be positive, got {c.active_deadline_seconds}"
        )
    if c.pending_timeout_s < 0:
        raise ConfigError(
            f"cluster.pending_timeout_s must be 0 (no limit) or more, got {c.pending_timeout_s}"
        )
    if not cfg.storage.root.startswith("s3://"):
        raise ConfigError(
            f"{what} needs a shared artifact store, but storage.root is {cfg.storage.root!r}: "
            "pods do not share a local directory; use storage=minio"
        )
    if not cfg.tracking.uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"{what} needs an MLflow tracking server, but tracking.uri is {cfg.tracking.uri!r}; "
            "use tracking=server"
        )


def job_command(
    cfg,
    overrides: list[str],
    *,
    step: str = "train",
    dataset_id: str | None = None,
    checkpoint_uri: str | None = None,
    always_torchrun: bool = False,
    workdir: str | None = None,
) -> list[str]:
    """The command every pod runs: the ordinary `step` (train, or optimize on `checkpoint_uri`),
    told how it is distributed and, with `dataset_id`, which prepared dataset to train on (else
    the run's, from its record).

    A PyTorchJob's pods run `visionflow <step>` directly when each has one process: the Training
    Operator sets the variables torch.distributed reads (MASTER_ADDR, RANK, ...). A TrainJob's
    runtime sets only torchrun's PET_* variables, so its pods always start under torchrun
    (`always_torchrun`); `workdir` then replaces any workdir= override (a TrainJob cannot set
    the container's working directory).
    """
    check_job_step(step)
    c = cfg.cluster
    gpus = c.gpus_per_node
    procs = max(gpus, 1)
    settings = [
        f"run_id={cfg.run_id}",
        "cluster.launcher=local",  # inside the job: run here, never launch another job
        f"trainer.num_nodes={c.nodes}",
        f"trainer.devices={procs}",
        f"trainer.accelerator={'gpu' if gpus else 'cpu'}",
    ]
    if c.nodes * procs > 1:
        settings.append("trainer.strategy=ddp")
    dropped = ("run_id=", "cluster.launcher=", *(("workdir=",) if workdir else ()))
    args = [o for o in overrides if not o.startswith(dropped)]
    if workdir:
        args.append(f"workdir={workdir}")
    args += settings
    if checkpoint_uri:
        args = ["--checkpoint", checkpoint_uri, *args]
    if dataset_id:
        args = ["--dataset", dataset_id, *args]
    if procs == 1 and not always_torchrun:
        return ["visionflow", step, *args]
    # torchrun starts the processes; $(VAR) is expanded by the kubelet from the variables the
    # operator sets on the container (a TrainJob's runtime: PET_MASTER_ADDR, PET_MASTER_PORT).
    master = "PET_MASTER" if always_torchrun else "MASTER"
    return [
        "torchrun",
        "--nnodes=$(PET_NNODES)",
        "--nproc-per-node=$(PET_NPROC_PER_NODE)",
        "--node-rank=$(PET_NODE_RANK)",
        f"--master-addr=$({master}_ADDR)",
        f"--master-port=$({master}_PORT)",
        "-m",
        "visionflow.cli",
        step,
        *args,
    ]


def threads_per_process(cpu: str, processes: int) -> int:
    """torch's threads for each of a pod's training processes: their share of its CPU (at least
    one). Unset, torch starts one per core of the node, not of the pod's limit, and threads
    beyond the CPU the pod may use wait for each other in every parallel region."""
    from kubernetes.utils.quantity import parse_quantity

    try:
        cores = parse_quantity(cpu)
    except (ValueError, TypeError, ArithmeticError):
        raise ConfigError(
            f"cluster.cpu is not a Kubernetes quantity: {cpu!r} (e.g. 4, 500m)"
        ) from None
    return max(1, int(cores) // processes)


def _env(cfg) -> list[dict[str, Any]]:
    c = cfg.cluster
    threads = threads_per_process(str(c.cpu), max(c.gpus_per_node, 1))
    env: list[dict[str, Any]] = [
        {"name": "VISIONFLOW_HOME", "value": WORKDIR},
        {"name": "HOME", "value": WORKDIR},  # caches (matplotlib, torch) under a writable mount
        {"name": "MLFLOW_TRACKING_URI", "value": cfg.tracking.uri},
        {"name": "OMP_NUM_THREADS", "value": str(threads)},
    ]
    if cfg.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": cfg.storage.endpoint})
    if c.site_config_map:
        env.append({"name": SITE_ENV, "value": f"{SITE_DIR}/{SITE_KEY}"})
    secrets = [(c.s3_secret, ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"), False)]
    if c.mlflow_secret:
        secrets.append(
            (c.mlflow_secret, ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"), True)
        )
    for secret, keys, optional in secrets:
        for key in keys:
            ref = {"name": secret, "key": key, "optional": optional}
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    return env


def pod_template(cfg, command: list[str]) -> dict[str, Any]:
    """The training pod: one container, restricted security, emptyDirs for what it writes."""
    from omegaconf import OmegaConf

    c = SimpleNamespace(**OmegaConf.to_container(cfg.cluster, resolve=True))  # plain values
    limits: dict[str, Any] = {"cpu": c.cpu, "memory": c.memory}
    if c.gpus_per_node:
        limits["nvidia.com/gpu"] = c.gpus_per_node
    spec: dict[str, Any] = {
        "automountServiceAccountToken": False,  # training needs no Kubernetes API
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "runAsGroup": 10001,
            "fsGroup": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": CONTAINER,
                "image": c.image or TRAIN_IMAGE,
                "imagePullPolicy": "IfNotPresent",
                "command": list(command),
                "workingDir": WORKDIR,
                "env": _env(cfg),
                "ports": [{"name": PORT_NAME, "containerPort": c.port, "protocol": "TCP"}],
                "resources": {"requests": {"cpu": c.cpu, "memory": c.memory}, "limits": limits},
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "dshm", "mountPath": "/dev/shm"},
                    {"name": "work", "mountPath": WORKDIR},
                    {"name": "tmp", "mountPath": "/tmp"},
                ],
            }
        ],
        "volumes": [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": c.shm_size}},
            {"name": "work", "emptyDir": {}},
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if c.site_config_map:  # the release's site config, read-only, where the steps have it
        items = [{"key": SITE_KEY, "path": SITE_KEY}]
        spec["volumes"].append(
            {"name": "site", "configMap": {"name": c.site_config_map, "items": items}}
        )
        spec["containers"][0]["volumeMounts"].append(
            {"name": "site", "mountPath": SITE_DIR, "readOnly": True}
        )
    if c.service_account:
        spec["serviceAccountName"] = c.service_account
    if c.node_selector:
        spec["nodeSelector"] = c.node_selector
    if c.tolerations:
        spec["tolerations"] = c.tolerations
    if c.affinity:
        spec["affinity"] = c.affinity
    return {
        "metadata": {
            "labels": {
                "app.kubernetes.io/name": "visionflow",
                "visionflow/run-id": _label(cfg.run_id),
            }
        },
        "spec": spec,
    }


def _label(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", value)[:63].strip("-_.")


def labels(cfg, step: str = "train") -> dict[str, str]:
    """The labels of the job and of what goes with it."""
    return {
        "app.kubernetes.io/name": "visionflow",
        "app.kubernetes.io/component": step,
        "visionflow/run-id": _label(cfg.run_id),
    }


def job_metadata(cfg, owner: dict[str, Any] | None, step: str = "train") -> dict[str, Any]:
    """name, namespace (left to the launcher when cluster.namespace is unset), labels, owner."""
    meta: dict[str, Any] = {"name": job_name(cfg.run_id, step)}
    if cfg.cluster.namespace:
        meta["namespace"] = cfg.cluster.namespace
    meta["labels"] = labels(cfg, step)
    if owner is not None:
        meta["ownerReferences"] = [dict(owner)]
    return meta


def build_pytorchjob(
    cfg,
    overrides: list[str],
    owner: dict[str, Any] | None = None,
    dataset_id: str | None = None,
    *,
    step: str = "train",
    checkpoint_uri: str | None = None,
) -> dict[str, Any]:
    """The PyTorchJob manifest for this run's `step` (train, or optimize on `checkpoint_uri`),
    on `dataset_id`: see job_command.

    `owner`: an ownerReference (`step_owner()`: the pipeline step's pod) the job is deleted with.
    Without cluster.namespace the manifest has no namespace: the launcher uses its own.
    """
    from omegaconf import OmegaConf

    check_cluster_config(cfg, "a PyTorchJob")
    if cfg.cluster.clean_pod_policy not in ("None", "Running", "All"):
        raise ConfigError(
            "cluster.clean_pod_policy must be None, Running or All, "
            f"got {cfg.cluster.clean_pod_policy!r}"
        )
    if cfg.cluster.restart_policy not in RESTART_POLICIES:
        raise ConfigError(
            f"cluster.restart_policy must be one of {', '.join(RESTART_POLICIES)}, got "
            f"{cfg.cluster.restart_policy!r}; OnFailure restarts a failed or preempted pod, and "
            "training resumes from its last checkpoint"
        )
    c = OmegaConf.to_container(cfg.cluster, resolve=True)  # plain values for the manifest
    command = job_command(
        cfg, overrides, step=step, dataset_id=dataset_id, checkpoint_uri=checkpoint_uri
    )
    replicas: dict[str, Any] = {}
    for role, count in (("Master", 1), ("Worker", c["nodes"] - 1)):
        if count:
            replicas[role] = {
                "replicas": count,
                "restartPolicy": c["restart_policy"],
                "template": pod_template(cfg, command),
            }
    run_policy: dict[str, Any] = {
        "backoffLimit": c["backoff_limit"],
        "activeDeadlineSeconds": c["active_deadline_seconds"],
        "cleanPodPolicy": c["clean_pod_policy"],
    }
    if c["ttl_seconds_after_finished"] is not None:
        run_policy["ttlSecondsAfterFinished"] = c["ttl_seconds_after_finished"]
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": job_metadata(cfg, owner, step),
        "spec": {
            "nprocPerNode": str(max(c["gpus_per_node"], 1)),
            "runPolicy": run_policy,
            "pytorchReplicaSpecs": replicas,
        },
    }


def check_pod_values(spec: dict[str, Any], where: str) -> None:
    """What the schemas leave to the API server: quantities parse, mounts name a volume."""
    from kubernetes.utils.quantity import parse_quantity

    volumes = {v.get("name") for v in spec.get("volumes") or []}
    quantities = [
        (f"volumes[{v.get('name')}].emptyDir.sizeLimit", (v.get("emptyDir") or {}).get("sizeLimit"))
        for v in spec.get("volumes") or []
    ]
    for ct in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
        for kind, values in (ct.get("resources") or {}).items():
            for resource, value in (values or {}).items():
                quantities.append((f"{ct.get('name')}.resources.{kind}.{resource}", value))
        for mount in ct.get("volumeMounts") or []:
            if mount.get("name") not in volumes:
                raise ValueError(
                    f"{where}: container {ct.get('name')} mounts volume {mount.get('name')!r}, "
                    f"which the pod does not define ({sorted(v for v in volumes if v)})"
                )
    for path, value in quantities:
        if value is None:
            continue
        try:
            parse_quantity(value)
        except (ValueError, TypeError, ArithmeticError):
            raise ValueError(
                f"{where}: {path} is not a Kubernetes quantity: {value!r} (e.g. 4, 500m, 16Gi)"
            ) from None


def check_schema(obj: dict[str, Any], what: str, k8s_version: str = K8S_VERSION) -> None:
    """`obj` against Kubernetes' own schema for its kind (strict: no unknown fields); a
    ValueError names `what`, the field's path and the schema's message."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, k8s_version, strict=True)
    except kubernetes_validate.ValidationError as err:
        path = "/".join(str(p) for p in err.path)
        raise ValueError(
            f"{what} is invalid for Kubernetes {k8s_version} at {path}: {err.message}"
        ) from None


def validate_metadata(meta: dict[str, Any], k8s_version: str = K8S_VERSION) -> None:
    """The job's metadata (name, labels, ownerReferences) against Kubernetes' ObjectMeta schema."""
    carrier = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta}
    check_schema(carrier, "the job's metadata", k8s_version)
    for ref in meta.get("ownerReferences") or []:
        if ref.get("blockOwnerDeletion"):
            raise ValueError(
                "the job's ownerReferences may not set blockOwnerDeletion: that needs update on "
                f"the owner's finalizers, which the launcher's Role does not have ({ref})"
            )


def validate_job(job: dict[str, Any], k8s_version: str = K8S_VERSION) -> None:
    """Check the job's shape and validate every pod template as a Pod of Kubernetes 1.30.

    kubernetes-validate has no schema for the PyTorchJob CRD itself, so its envelope is checked
    here (runPolicy against the Training Operator's v1 RunPolicy fields, metadata as ObjectMeta)
    and its pod templates, which carry everything else that can be wrong, by the real schemas.
    """
    from kubeflow.training.models import KubeflowOrgV1RunPolicy

    if job.get("apiVersion") != API_VERSION or job.get("kind") != KIND:
        raise ValueError(f"not a {API_VERSION} {KIND}: {job.get('apiVersion')}/{job.get('kind')}")
    validate_metadata(job["metadata"], k8s_version)
    policy = job["spec"].get("runPolicy") or {}
    unknown = set(policy) - set(KubeflowOrgV1RunPolicy.attribute_map.values())
    if unknown:
        raise ValueError(
            f"runPolicy has fields a kubeflow.org/v1 RunPolicy lacks: {sorted(unknown)}"
        )
    for key in ("backoffLimit", "activeDeadlineSeconds", "ttlSecondsAfterFinished"):
        value = policy.get(key)
        if value is not None and (
            not isinstance(value, int) or isinstance(value, bool) or value < 0
        ):
            raise ValueError(f"runPolicy.{key} must be an integer >= 0, got {value!r}")
    specs = job["spec"]["pytorchReplicaSpecs"]
    if (
        set(specs) - {"Master", "Worker"}
        or "Master" not in specs
        or specs["Master"]["replicas"] != 1
    ):
        raise ValueError(f"a PyTorchJob needs exactly one Master and optional Workers, got {specs}")
    for role, spec in specs.items():
        template = spec["template"]
        names = [ct["name"] for ct in template["spec"]["containers"]]
        if CONTAINER not in names:
            raise ValueError(
                f"{role}: the training container must be named {CONTAINER!r}, got {names}"
            )
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": f"{job['metadata']['name']}-{role.lower()}-0",
                **template.get("metadata", {}),
            },
            "spec": template["spec"],
        }
        check_schema(pod, f"{role} pod template", k8s_version)
        check_pod_values(template["spec"], f"{role} pod template")
