"""The cluster side of the simulation: the API server with its Training Operator, each job pod
on its own network address, the job's NetworkPolicy enforced, and what a run's jobs did.

- `tls_pair`: a self-signed certificate for 127.0.0.1: in-cluster clients (a step pod's service
  account: token, ca.crt) speak only https to the API server.
- `PodNetHook`: apiserver's network hook over netns.PodNetwork: each job pod its own network
  namespace and IP (MASTER_ADDR is the Master pod's IP; the Worker really dials another host),
  the S3 and MLflow servers reachable at their 127.0.0.1 URLs from inside.
- `JobWatch`: follows the jobs while a run goes: their pods and restarts, the NetworkPolicy the
  launcher creates (applied to the pod network: only the job's pods may reach the rendezvous
  port) and a probe of it from a namespace outside the job; optionally SIGKILLs a Worker once
  a mid-epoch checkpoint of the run is in the store (preemption).
"""

from __future__ import annotations

import datetime
import ipaddress
import threading
import time
from pathlib import Path
from typing import Any

from tests.cluster_sim.pods import NetworkHook, ProcessPod


def tls_pair(directory: Path) -> tuple[Path, Path]:
    """(certificate, key) files: self-signed, for IP 127.0.0.1, valid for a day."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kube-apiserver (simulated)")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_file, key_file = directory / "apiserver.crt", directory / "apiserver.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )  # fmt: skip
    )
    return cert_file, key_file


class PodNetHook(NetworkHook):
    """Each job pod in its own network namespace of `net` (a started netns.PodNetwork)."""

    def __init__(self, net):
        self.net = net

    def address(self, namespace: str, pod: str) -> str:
        try:
            return self.net.address(pod).ip
        except KeyError:
            return self.net.add_pod(pod).ip

    def wrap(self, namespace: str, pod: str, argv: list[str]) -> list[str]:
        self.address(namespace, pod)
        return self.net.wrap(pod, argv)


class JobWatch(threading.Thread):
    """What the run's jobs did, seen from outside (see the module docstring)."""

    OUTSIDER = "outsider"

    def __init__(self, api, net, *, kill_worker_when=None, poll_s: float = 0.3):
        super().__init__(name="job-watch", daemon=True)
        self.api, self.net, self.poll_s = api, net, poll_s
        self.kill_worker_when = kill_worker_when  # () -> bool, e.g. a mid-epoch checkpoint
        self.jobs: dict[str, dict[str, Any]] = {}  # name -> replicas, pods {name: restarts}
        self.enforced: set[tuple[str, str]] = set()
        self.probe: dict[str, Any] = {}
        self.killed: list[str] = []
        self.stopping = threading.Event()
        self.error: BaseException | None = None
        self.first = len(api.created)  # jobs created before this run are not its
        if net is not None:
            try:
                net.address(self.OUTSIDER)
            except KeyError:  # the first run on this network
                net.add_outsider(self.OUTSIDER)

    def stop(self) -> None:
        self.stopping.set()
        self.join(timeout=10)

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.step()
                time.sleep(self.poll_s)
        except BaseException as err:  # noqa: BLE001 - reported by summary()
            self.error = err

    def step(self) -> None:
        with self.api.cond:
            manifests = list(self.api.created)[self.first :]
            pods = [p for p in self.api.pods.values() if isinstance(p, ProcessPod)]
            policies = list(self.api.policies.values())
        for m in manifests:
            job = self.jobs.setdefault(m["metadata"]["name"], {"pods": {}})
            job["replicas"] = {
                role: spec.get("replicas", 1)
                for role, spec in m["spec"]["pytorchReplicaSpecs"].items()
            }
        for pod in pods:
            name = pod.labels.get("training.kubeflow.org/job-name")
            if name in self.jobs:
                known = self.jobs[name]["pods"].get(pod.name, 0)
                self.jobs[name]["pods"][pod.name] = max(known, pod.restart_count)
        if self.net is None:
            return
        for policy in policies:
            self.enforce(policy, pods)
        self.maybe_kill(pods)

    def enforce(self, policy: dict, pods: list[ProcessPod]) -> None:
        """The policy's ingress rule on the pod network: its port, from its selected pods."""
        selector = policy["spec"]["podSelector"].get("matchLabels", {})
        selected = [p for p in pods if _matches(p.labels, selector) and p.ip]
        for rule in policy["spec"].get("ingress", []):
            sources = [
                p for p in pods for peer in rule.get("from", [])
                if "podSelector" in peer and _matches(p.labels, peer["podSelector"].get("matchLabels", {}))
            ]  # fmt: skip
            # A rule without ports admits its sources on every port; the pod network filters
            # per port, so it is applied to the port that matters here, the rendezvous port.
            annotated = policy["metadata"].get("annotations", {}).get("visionflow/rendezvous-port")
            ports = rule.get("ports") or ([{"port": int(annotated)}] if annotated else [])
            for port in ports:
                for pod in selected:
                    key = (pod.name, str(port["port"]))
                    if key not in self.enforced:
                        self.net.isolate_port(pod.name, int(port["port"]),
                                              [s.name for s in sources])  # fmt: skip
                        self.enforced.add(key)
                    if pod.labels.get("training.kubeflow.org/replica-type") == "master":
                        self.try_probe(pod, int(port["port"]), sources)

    def try_probe(self, master: ProcessPod, port: int, sources: list[ProcessPod]) -> None:
        """Once the Master listens: a Worker connects, a pod outside the job is refused."""
        if self.probe.get("worker") is True:
            return
        workers = [s for s in sources if s.name != master.name]
        if not workers or master.phase != "Running":
            return
        worker = self.net.can_connect(workers[0].name, master.ip, port, timeout=1.0)
        if worker is True:
            outsider = self.net.can_connect(self.OUTSIDER, master.ip, port, timeout=1.0)
            self.probe = {"port": port, "worker": True, "outsider": str(outsider or "refused")
                          if outsider is not True else "connected"}  # fmt: skip

    def maybe_kill(self, pods: list[ProcessPod]) -> None:
        if self.kill_worker_when is None or self.killed:
            return
        workers = [p for p in pods if p.labels.get("training.kubeflow.org/replica-type") == "worker"
                   and p.phase == "Running"]  # fmt: skip
        if workers and self.kill_worker_when():
            import signal

            self.api.kill_pod(workers[0].name, signal.SIGKILL)
            self.killed.append(workers[0].name)

    def summary(self) -> dict[str, Any]:
        if self.error is not None:
            raise RuntimeError(f"the job watch failed: {self.error!r}") from self.error
        return {"jobs": self.jobs, "probe": self.probe, "killed": self.killed}


def _matches(labels: dict[str, str], selector: dict[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())
