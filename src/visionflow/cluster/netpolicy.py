"""The NetworkPolicy the launcher creates next to a training job (PyTorchJob or TrainJob).

It admits traffic to the job's pods from the job's own pods only, and is owned by the job.
"""

from __future__ import annotations

from typing import Any

from visionflow.cluster import pytorchjob, trainjob


def pod_selector(job: dict[str, Any]) -> dict[str, str]:
    """The label selector of the job's pods, as its operator labels them."""
    if job.get("kind") == pytorchjob.KIND:
        return {pytorchjob.JOB_NAME_LABEL: job["metadata"]["name"]}
    if job.get("kind") == trainjob.KIND:
        return {trainjob.JOBSET_NAME_LABEL: job["metadata"]["name"]}
    raise ValueError(f"no pods known for a {job.get('apiVersion')}/{job.get('kind')}")


def rendezvous_port(job: dict[str, Any]) -> int:
    """The port torch.distributed's rendezvous (the TCPStore on rank 0) listens on."""
    if job.get("kind") == pytorchjob.KIND:
        master = job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
        for container in master["containers"]:
            for port in container.get("ports") or []:
                if port.get("name") == pytorchjob.PORT_NAME:
                    return int(port["containerPort"])
        return 23456  # the Training Operator's default
    return trainjob.TRAINER_PORT


def build_network_policy(job: dict[str, Any], uid: str) -> dict[str, Any]:
    """The NetworkPolicy that admits traffic to the job's pods from the job's own pods only.

    It selects the job's pods and admits ingress only from pods with the same job label, so the
    rendezvous port (`rendezvous_port`) is reachable from the job's pods and from nothing else.
    All ports are open between them: NCCL and gloo connect the ranks on ephemeral ports beside
    the rendezvous, and a policy that admitted the rendezvous port alone would hang multi-node
    training at its first collective. policyTypes is [Ingress]: the pods still reach MinIO,
    MLflow and DNS. Its ownerReference to the job (`uid`, from the create response) makes the
    garbage collector delete it with the job (by TTL, by the launcher, or with the run).
    """
    meta = job["metadata"]
    selector = pod_selector(job)
    port = rendezvous_port(job)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": meta["name"],
            "namespace": meta["namespace"],
            "labels": dict(meta.get("labels") or {}),
            "annotations": {"visionflow/rendezvous-port": str(port)},
            "ownerReferences": [
                {
                    "apiVersion": job["apiVersion"],
                    "kind": job["kind"],
                    "name": meta["name"],
                    "uid": uid,
                }
            ],
        },
        "spec": {
            "podSelector": {"matchLabels": dict(selector)},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"podSelector": {"matchLabels": dict(selector)}}]}],
        },
    }


def validate_network_policy(
    policy: dict[str, Any], k8s_version: str = pytorchjob.K8S_VERSION
) -> None:
    """The policy against Kubernetes' networking.k8s.io/v1 schema (strict: no unknown fields)."""
    pytorchjob.check_schema(policy, "the job's NetworkPolicy", k8s_version)
