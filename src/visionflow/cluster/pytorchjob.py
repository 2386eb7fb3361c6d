"""The PyTorchJob (kubeflow.org/v1) that runs the train step on a cluster.

One typed builder turns the run's config into the manifest: a Master and `nodes - 1` Workers,
each a pod running the same `visionflow train` entrypoint (under torchrun when a pod has several
GPUs). The Training Operator injects MASTER_ADDR, MASTER_PORT, WORLD_SIZE, RANK and the PET_*
variables; rank 0 alone writes checkpoints and results. Pod templates are validated against the
Kubernetes 1.30 schemas before anything is submitted.
"""

from __future__ import annotations

import hashlib
import re
from types import SimpleNamespace
from typing import Any

from visionflow import TRAIN_IMAGE
from visionflow.core.config import ConfigError

API_VERSION = "kubeflow.org/v1"
CONTAINER = "pytorch"  # the Training Operator finds the training container by this name
PORT_NAME = "pytorchjob-port"
K8S_VERSION = "1.30.0"
WORKDIR = "/var/visionflow"  # an emptyDir: the root filesystem stays read-only


def job_name(run_id: str) -> str:
    """A DNS-1123 name for the run's job; pod names append `-worker-NN`, so it stays short."""
    base = re.sub(r"[^a-z0-9-]+", "-", run_id.lower()).strip("-")
    digest = hashlib.sha256(run_id.encode()).hexdigest()[:6]
    return f"vf-{base[:36].strip('-')}-{digest}"


def train_command(cfg, overrides: list[str]) -> list[str]:
    """The command every pod runs: the ordinary train step, told how it is distributed."""
    c = cfg.cluster
    gpus = c.gpus_per_node
    procs = max(gpus, 1)
    settings = [
        f"run_id={cfg.run_id}",
        "cluster.launcher=local",  # inside the job: train here, never launch another job
        f"trainer.num_nodes={c.nodes}",
        f"trainer.devices={procs}",
        f"trainer.accelerator={'gpu' if gpus else 'cpu'}",
    ]
    if c.nodes * procs > 1:
        settings.append("trainer.strategy=ddp")
    args = [o for o in overrides if not o.startswith(("run_id=", "cluster.launcher="))] + settings
    if procs == 1:
        return ["visionflow", "train", *args]
    # Several processes per pod: torchrun starts them; $(VAR) is expanded by the kubelet from
    # the variables the Training Operator sets on the container.
    return [
        "torchrun",
        "--nnodes=$(PET_NNODES)",
        "--nproc-per-node=$(PET_NPROC_PER_NODE)",
        "--node-rank=$(PET_NODE_RANK)",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "-m",
        "visionflow.cli",
        "train",
        *args,
    ]


def _env(cfg) -> list[dict[str, Any]]:
    c = cfg.cluster
    env: list[dict[str, Any]] = [
        {"name": "VISIONFLOW_HOME", "value": WORKDIR},
        {"name": "HOME", "value": WORKDIR},  # caches (matplotlib, torch) under a writable mount
        {"name": "MLFLOW_TRACKING_URI", "value": cfg.tracking.uri},
    ]
    if cfg.storage.endpoint:
        env.append({"name": "AWS_ENDPOINT_URL", "value": cfg.storage.endpoint})
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


def _pod_template(cfg, command: list[str]) -> dict[str, Any]:
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


def build_pytorchjob(cfg, overrides: list[str]) -> dict[str, Any]:
    """The PyTorchJob manifest for this run's training."""
    from omegaconf import OmegaConf

    c = cfg.cluster
    if c.nodes < 1:
        raise ConfigError(f"cluster.nodes must be at least 1, got {c.nodes}")
    if c.clean_pod_policy not in ("None", "Running", "All"):
        raise ConfigError(
            f"cluster.clean_pod_policy must be None, Running or All, got {c.clean_pod_policy!r}"
        )
    if not cfg.storage.root.startswith("s3://"):
        raise ConfigError(
            f"a PyTorchJob needs a shared artifact store, but storage.root is {cfg.storage.root!r}: "
            "pods do not share a local directory; use storage=minio"
        )
    if not cfg.tracking.uri.startswith(("http://", "https://")):
        raise ConfigError(
            f"a PyTorchJob needs an MLflow tracking server, but tracking.uri is {cfg.tracking.uri!r}; "
            "use tracking=server"
        )
    c = OmegaConf.to_container(c, resolve=True)  # plain values for the manifest
    command = train_command(cfg, overrides)
    replicas: dict[str, Any] = {}
    for role, count in (("Master", 1), ("Worker", c["nodes"] - 1)):
        if count:
            template = _pod_template(cfg, command)
            replicas[role] = {
                "replicas": count,
                "restartPolicy": c["restart_policy"],
                "template": template,
            }
    return {
        "apiVersion": API_VERSION,
        "kind": "PyTorchJob",
        "metadata": {
            "name": job_name(cfg.run_id),
            "namespace": c["namespace"],
            "labels": {
                "app.kubernetes.io/name": "visionflow",
                "app.kubernetes.io/component": "train",
                "visionflow/run-id": _label(cfg.run_id),
            },  # fmt: skip
        },
        "spec": {
            "nprocPerNode": str(max(c["gpus_per_node"], 1)),
            "runPolicy": {
                "backoffLimit": c["backoff_limit"],
                "activeDeadlineSeconds": c["active_deadline_seconds"],
                "cleanPodPolicy": c["clean_pod_policy"],
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


def validate_job(job: dict[str, Any], k8s_version: str = K8S_VERSION) -> None:
    """Check the job's shape and validate every pod template as a Pod of Kubernetes 1.30.

    kubernetes-validate has no schema for the PyTorchJob CRD itself, so its envelope is checked
    here and its pod templates, which carry everything that can be wrong, by the real schemas.
    """
    import kubernetes_validate

    if job.get("apiVersion") != API_VERSION or job.get("kind") != "PyTorchJob":
        raise ValueError(
            f"not a {API_VERSION} PyTorchJob: {job.get('apiVersion')}/{job.get('kind')}"
        )
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
        try:
            kubernetes_validate.validate(pod, k8s_version, strict=True)
        except kubernetes_validate.ValidationError as err:
            path = "/".join(str(p) for p in err.path)
            raise ValueError(
                f"{role} pod template is invalid for Kubernetes {k8s_version} at {path}: {err.message}"
            ) from None
