"""Run a cluster training job to completion through the Kubernetes API.

`launch(job, timeout_s=...)` takes a PyTorchJob (kubeflow.org/v1, the Training Operator) or a
TrainJob (trainer.kubeflow.org/v1alpha1, Kubeflow Trainer v2) manifest, creates it, creates the
NetworkPolicy that keeps its pods to themselves, streams the Master's log into `log` line by
line while it runs, and returns the final job object once the operator marks it Succeeded
(a TrainJob: Complete). Everything else ends in `LaunchError` with a message that names the
cause, and every job this call created (or adopted) is deleted again on the way out: on
failure, on timeout, on pods that stay Pending, on KeyboardInterrupt and on SIGTERM (KFP
cancels a step by terminating its pod).

What the launcher relies on, and why:

- Pods are found by the labels their operator sets. A PyTorchJob's (Training Operator v1.5 and
  later): `training.kubeflow.org/job-name=<job>`; the Master is the pod whose
  `training.kubeflow.org/replica-type` is `master` (the operator lowercases the replica type)
  or whose `training.kubeflow.org/job-role` is `master`. A TrainJob's are JobSet's:
  `jobset.sigs.k8s.io/jobset-name=<job>`; the Master is completion index 0
  (`batch.kubernetes.io/job-completion-index`) of job 0 of replicated job `node`.
- The job's state is its `status.conditions` (a condition counts when its status is "True"):
  a PyTorchJob's Created, Running, Restarting, then Succeeded or Failed; a TrainJob's Complete
  or Failed (and Suspended).
- The namespace: the manifest's, else this pod's own (its service account's namespace file,
  `SA_NAMESPACE_FILE`), else the kubeconfig context's, else `default`. An ownerReference to a
  Pod is only kept when the job runs in that pod's namespace: owners cannot cross namespaces,
  and the garbage collector would delete the job at once.
- The NetworkPolicy (`netpolicy.build_network_policy`) is created right after the job, owned
  by it (the uid from the create response), so it goes wherever the job goes.
- Pending: when the job's pods are not all running for `pending_timeout_s` (nothing can
  schedule them, an image cannot be pulled, a quota holds them back), the job is deleted and
  the error names the reason: the pods' FailedScheduling events and PodScheduled condition.
- Missing Secrets. The Role a KFP step gets cannot read Secrets, and the launcher does not
  need it to: the kubelet reports a missing Secret (or a missing key in one) on the pod as a
  container waiting with reason CreateContainerConfigError, and the launcher fails fast on that
  with a message naming the Secret and the namespace, then deletes the job. Where the service
  account may also `get` the named Secrets (a Role with resourceNames), the same check runs
  before anything is created, which saves waiting for a GPU node to be scheduled only to find a
  Secret missing; a 403 on that read is not an error, only a note that the check moves to the
  pods.
- The Master's log is followed as `masterlog` describes: lines arrive as they are written, none
  twice, and `log` is only ever called from the calling thread.
- The API server may be briefly unreachable during a long training: polling tolerates that for
  `API_GRACE_S`; before the job exists, any failure to reach it is an immediate LaunchError.

The kubernetes client is used directly, not kubeflow-training's TrainingClient: that client
wraps every API error into a RuntimeError with the raw response (no status to tell a missing CRD
from a 403 or a 409), knows no TrainJob, and adds nothing the few calls here need.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from visionflow.cluster import netpolicy, pytorchjob, trainjob
from visionflow.cluster.kubeapi import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    error_status,
    is_transient,
    is_unreachable,
)
from visionflow.cluster.masterlog import MasterLog

MANIFEST_HASH_ANNOTATION = "visionflow/manifest-sha256"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
NETWORKING = ("networking.k8s.io", "v1", "networkpolicies")

API_GRACE_S = 60.0  # how long polling rides out an unreachable API server
PENDING_TIMEOUT_S = 1800.0  # cluster.pending_timeout_s's default
PROPAGATION = "Foreground"  # the job goes away after its pods: a rerun can reuse the name
SCHEDULING_ADVICE = (
    "Ask for what the cluster's nodes have (cluster.nodes, cluster.gpus_per_node, cluster.cpu, "
    "cluster.memory, cluster.node_selector, cluster.tolerations), free capacity, or raise "
    "cluster.pending_timeout_s if it is only busy."
)

# The Role the launcher needs in the job's namespace, (API group, resource, verbs): what the
# chart's Role grants (charts/visionflow/templates/rbac.yaml) and a 403's message names.
JOB_VERBS = ("create", "get", "list", "watch", "delete")
ROLE_RULES = (
    ("kubeflow.org", "pytorchjobs", JOB_VERBS),
    ("trainer.kubeflow.org", "trainjobs", JOB_VERBS),
    ("networking.k8s.io", "networkpolicies", ("create", "get", "delete")),
    ("", "pods", ("get", "list", "watch")),
    ("", "pods/log", ("get",)),
    ("", "events", ("list",)),
)

_log = logging.getLogger(__name__)
_master_log = logging.getLogger("visionflow.cluster.master")


@dataclass(frozen=True)
class JobKind:
    """What the launcher needs to know of a kind of training job."""

    group: str
    version: str
    plural: str
    kind: str
    container: str  # the training container, whose log is followed
    job_label: str  # the pod label naming the job
    succeeded: str  # the condition type of success
    operator: str  # what serves the kind, for a missing CRD's message

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}"

    def is_master(self, pod: dict[str, Any]) -> bool:
        meta = pod.get("metadata") or {}
        labels = meta.get("labels") or {}
        if self.kind == pytorchjob.KIND:
            return (
                labels.get(pytorchjob.REPLICA_TYPE_LABEL, "").lower() == "master"
                or labels.get(pytorchjob.JOB_ROLE_LABEL) == "master"
            )
        index = labels.get(trainjob.COMPLETION_INDEX_LABEL) or (meta.get("annotations") or {}).get(
            trainjob.COMPLETION_INDEX_LABEL
        )
        return (
            labels.get(trainjob.REPLICATED_JOB_LABEL) == trainjob.REPLICATED_JOB
            and labels.get(trainjob.JOB_INDEX_LABEL, "0") == "0"
            and index == "0"
        )

    def pod_count(self, job: dict[str, Any]) -> int:
        """How many pods the job runs."""
        spec = job.get("spec") or {}
        if self.kind == pytorchjob.KIND:
            replicas = spec.get("pytorchReplicaSpecs") or {}
            return sum(int((r or {}).get("replicas", 1)) for r in replicas.values())
        return int((spec.get("trainer") or {}).get("numNodes") or 1)


PYTORCHJOB = JobKind(
    pytorchjob.GROUP, pytorchjob.VERSION, pytorchjob.PLURAL, pytorchjob.KIND, pytorchjob.CONTAINER,
    pytorchjob.JOB_NAME_LABEL, "Succeeded", "the Kubeflow Training Operator (PyTorchJob CRD)",
)  # fmt: skip
TRAINJOB = JobKind(
    trainjob.GROUP, trainjob.VERSION, trainjob.PLURAL, trainjob.KIND, trainjob.CONTAINER,
    trainjob.JOBSET_NAME_LABEL, "Complete", "Kubeflow Trainer v2 (TrainJob CRD)",
)  # fmt: skip
KINDS = {(k.api_version, k.kind): k for k in (PYTORCHJOB, TRAINJOB)}


class LaunchError(RuntimeError):
    """The job could not be run to success; the message says why and what to do."""

    status: int | None = None  # the HTTP status of the API error behind it, if there was one


class LaunchTimeout(LaunchError):
    """The job did not finish within `timeout_s`; it has been deleted."""


class LaunchCancelled(LaunchError):
    """The process received SIGTERM while launching; the job has been deleted."""


class PodsPending(LaunchError):
    """The job's pods were not all running within the pending timeout; it has been deleted."""


def launch(
    job: dict[str, Any],
    *,
    timeout_s: float,
    required_secrets: Iterable[str] = (),
    poll_s: float = 5.0,
    pending_timeout_s: float | None = PENDING_TIMEOUT_S,
    log: Callable[[str], None] = _master_log.info,
    api_client=None,
) -> dict[str, Any]:
    """Run the PyTorchJob or TrainJob manifest `job` to completion; return the final job object.

    `required_secrets` are checked before the job is created where the service account may read
    them; Secrets the manifest references (not marked optional) are checked the same way.
    Missing ones are otherwise caught from the pods' status once they are scheduled.
    `pending_timeout_s`: how long the job's pods may stay not all running (None or 0: no limit).
    `api_client` (a `kubernetes.client.ApiClient`) replaces the in-cluster config / kubeconfig.

    Raises LaunchError (LaunchTimeout, LaunchCancelled, PodsPending) and re-raises
    KeyboardInterrupt, in every case after deleting the job if this call created or adopted it.
    ValueError: not a PyTorchJob or TrainJob, or a NetworkPolicy that cannot be built for it.
    """
    if timeout_s is None or timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if poll_s <= 0:
        raise ValueError(f"poll_s must be positive, got {poll_s!r}")
    if pending_timeout_s is not None and pending_timeout_s < 0:
        raise ValueError(f"pending_timeout_s must be 0 or more, got {pending_timeout_s!r}")
    job = _checked_copy(job)
    # The policy is built and validated before anything is created (the uid comes later).
    netpolicy.validate_network_policy(
        netpolicy.build_network_policy(job, "00000000-0000-0000-0000-000000000000")
    )
    api = api_client if api_client is not None else _default_client()
    run = _Launch(api, job, list(required_secrets), poll_s, pending_timeout_s or None, log)
    with _sigterm_raises(run.what) as guard:
        return run.run(time.monotonic() + timeout_s, guard)


# --- configuration and the manifest -------------------------------------------------------------


def _default_client():
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        try:
            config.load_kube_config(config_file=_kubeconfig(), client_configuration=cfg)
        except (config.ConfigException, OSError, TypeError, ValueError) as exc:
            raise LaunchError(
                "no Kubernetes configuration: this process does not run in a pod with a service "
                f"account, and no usable kubeconfig was found ($KUBECONFIG or ~/.kube/config): {exc}"
            ) from None
    cfg.retries = 1  # fail in seconds on an unreachable server; polling has its own grace
    return client.ApiClient(cfg)


def _kubeconfig() -> str | None:
    """$KUBECONFIG as it is now (the client reads it once, at import), else the client's default."""
    return os.environ.get("KUBECONFIG") or None


def kind_of(job: Any) -> JobKind:
    """The job's kind; ValueError for anything but a PyTorchJob or a TrainJob manifest."""
    if isinstance(job, dict) and (job.get("apiVersion"), job.get("kind")) in KINDS:
        return KINDS[(job["apiVersion"], job["kind"])]
    got = (
        f"{job.get('apiVersion')}/{job.get('kind')}"
        if isinstance(job, dict)
        else type(job).__name__
    )
    raise ValueError(
        f"not a {PYTORCHJOB.api_version} {PYTORCHJOB.kind} or {TRAINJOB.api_version} "
        f"{TRAINJOB.kind} manifest: {got}"
    )


def _checked_copy(job: dict[str, Any]) -> dict[str, Any]:
    kind = kind_of(job)
    job = copy.deepcopy(job)
    meta = job.setdefault("metadata", {})
    if not meta.get("name"):
        raise ValueError(f"the {kind.kind} manifest has no metadata.name")
    spec = job.get("spec") or {}
    if kind is PYTORCHJOB and "Master" not in spec.get("pytorchReplicaSpecs", {}):
        raise ValueError("the PyTorchJob manifest has no spec.pytorchReplicaSpecs.Master")
    if kind is TRAINJOB and not (spec.get("runtimeRef") or {}).get("name"):
        raise ValueError("the TrainJob manifest has no spec.runtimeRef.name")
    if not meta.get("namespace"):
        meta["namespace"] = _own_namespace()
    _keep_owners_in_namespace(job)
    # The hash identifies the spec: an earlier attempt of the same run, from another pod (a KFP
    # retry), has other ownerReferences but is the same job.
    identity = {**job, "metadata": {k: v for k, v in meta.items() if k != "ownerReferences"}}
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    meta.setdefault("annotations", {})[MANIFEST_HASH_ANNOTATION] = digest
    return job


def _keep_owners_in_namespace(job: dict[str, Any]) -> None:
    """Drop an ownerReference to a Pod in another namespace (the GC would delete the job)."""
    meta = job["metadata"]
    refs = meta.get("ownerReferences") or []
    pods = [r for r in refs if r.get("apiVersion") == "v1" and r.get("kind") == "Pod"]
    home = _sa_namespace()
    if not pods or home is None or home == meta["namespace"]:
        return
    ttl = ((job.get("spec") or {}).get("runPolicy") or {}).get("ttlSecondsAfterFinished")
    _log.warning(
        "%s %s runs in namespace '%s' but this pod (%s) is in '%s': an ownerReference cannot "
        "cross namespaces, so the job is not tied to this run and is not deleted with it%s",
        job["kind"], meta["name"], meta["namespace"], pods[0].get("name"), home,
        "; its TTL removes it once finished" if ttl is not None else "",
    )  # fmt: skip
    kept = [r for r in refs if r not in pods]
    if kept:
        meta["ownerReferences"] = kept
    else:
        meta.pop("ownerReferences", None)


def _sa_namespace() -> str | None:
    """This pod's namespace, from its service account mount; None outside a pod."""
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or None
    except OSError:
        return None


def _own_namespace() -> str:
    """The pod's own namespace, else the kubeconfig's current context's, else `default`."""
    if ns := _sa_namespace():
        return ns
    try:
        from kubernetes import config

        _, current = config.list_kube_config_contexts(config_file=_kubeconfig())
        return (current.get("context") or {}).get("namespace") or "default"
    except Exception:  # noqa: BLE001 - no kubeconfig: the API's default namespace
        return "default"


def _secret_refs(job: dict[str, Any]) -> dict[str, set[str]]:
    """Secrets the pods need (not marked optional), each with the keys they read."""
    refs: dict[str, set[str]] = {}
    containers: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    spec = job.get("spec") or {}
    if job.get("kind") == trainjob.KIND:
        containers.append(spec.get("trainer") or {})
        pod = trainjob.pod_patch(job).get("spec") or {}
        containers += [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
        volumes += pod.get("volumes") or []
    for replica in (spec.get("pytorchReplicaSpecs") or {}).values():
        pod = ((replica or {}).get("template") or {}).get("spec") or {}
        containers += [*(pod.get("initContainers") or []), *(pod.get("containers") or [])]
        volumes += pod.get("volumes") or []
    for ct in containers:
        for env in ct.get("env") or []:
            ref = (env.get("valueFrom") or {}).get("secretKeyRef")
            if ref and ref.get("name") and not ref.get("optional"):
                refs.setdefault(ref["name"], set()).add(ref.get("key", ""))
        for src in ct.get("envFrom") or []:
            ref = src.get("secretRef")
            if ref and ref.get("name") and not ref.get("optional"):
                refs.setdefault(ref["name"], set())
    for vol in volumes:
        ref = vol.get("secret")
        if ref and ref.get("secretName") and not ref.get("optional"):
            refs.setdefault(ref["secretName"], set())
    return refs


# --- SIGTERM ------------------------------------------------------------------------------------


class _Guard:
    """Whether SIGTERM still raises; disarmed while cleaning up, so a second one cannot cut it."""

    def __init__(self) -> None:
        self.armed = True


@contextlib.contextmanager
def _sigterm_raises(what: str) -> Iterator[_Guard]:
    guard = _Guard()
    if threading.current_thread() is not threading.main_thread():
        _log.debug("launch() runs outside the main thread: SIGTERM is left to the process")
        yield guard
        return

    def on_sigterm(signum, frame):
        if guard.armed:
            guard.armed = False
            raise LaunchCancelled(f"SIGTERM received: {what} was cancelled")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield guard
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the launch ---------------------------------------------------------------------------------


class _Launch:
    def __init__(self, api, job, required_secrets, poll_s, pending_timeout_s, log):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.host = api.configuration.host
        self.kind = kind_of(job)
        self.job, self.poll_s, self.pending_timeout_s = job, poll_s, pending_timeout_s
        self.name, self.ns = job["metadata"]["name"], job["metadata"]["namespace"]
        self.label = f"{self.ns}/{self.name}"
        self.what = f"{self.kind.kind} {self.label}"
        self.refs = _secret_refs(job)
        self.required = list(dict.fromkeys([*required_secrets, *sorted(self.refs)]))
        self.owned = False  # this call created or adopted the job: it deletes it on the way out
        self.uid: str | None = None  # the job's, once created or adopted
        self.noted: set[str] = set()  # pod notes already logged
        self.master_log = MasterLog(self.core, self.ns, log, self.note, self.kind.container)
        self.unreachable_since: float | None = None
        self.pending_since: float | None = None

    def job_api(self, verb: str, *args, **kwargs):
        """A CustomObjectsApi call on this kind's resource in our namespace."""
        fn = getattr(self.custom, f"{verb}_namespaced_custom_object")
        k = self.kind
        return fn(k.group, k.version, self.ns, k.plural, *args, **kwargs)

    # - the whole life ---------------------------------------------------------------------------

    def run(self, deadline: float, guard: _Guard) -> dict[str, Any]:
        try:
            self.preflight()
            self.create(deadline)
            self.ensure_network_policy()
            return self.watch(deadline)
        except BaseException as exc:
            guard.armed = False  # a second SIGTERM must not interrupt the cleanup
            if self.owned:
                self.delete(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
            raise

    # - before creating anything -----------------------------------------------------------------

    def call(self, what: str, fn, *args, **kwargs):
        """One API request; any failure becomes a LaunchError that names the cause."""
        from kubernetes.client.exceptions import ApiException

        kwargs.setdefault("_request_timeout", (CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 0:
                raise self.unreachable(what, exc) from None
            err = self.api_error(what, exc)
            err.status = exc.status
            raise err from None
        except Exception as exc:
            if is_unreachable(exc):
                raise self.unreachable(what, exc) from None
            raise

    def unreachable(self, what: str, exc: BaseException) -> LaunchError:
        reason = getattr(exc, "reason", None) or exc
        return LaunchError(
            f"cannot reach the Kubernetes API server at {self.host} ({what}): {reason}. "
            "Check the cluster address (in-cluster: KUBERNETES_SERVICE_HOST; otherwise the "
            "kubeconfig's current context) and that the API server is up."
        )

    def api_error(self, what: str, exc) -> LaunchError:
        message, details = error_status(exc)
        if exc.status == 401:
            return LaunchError(
                f"the Kubernetes API server at {self.host} rejected our credentials ({what}): "
                f"{message}. Check the service account token or the kubeconfig's user."
            )
        if exc.status == 403:
            return LaunchError(
                f"forbidden ({what}): {message}. The service account needs a Role in namespace "
                f"'{self.ns}' bound to it that allows {_role_text(self.kind)} (the chart's Role, "
                "charts/visionflow/templates/rbac.yaml). If the namespace is not the one you "
                f"meant, fix metadata.namespace (now '{self.ns}')."
            )
        if exc.status == 404 and details.get("kind") == "namespaces":
            return LaunchError(
                f"namespace '{self.ns}' does not exist ({what}): {message}. Set the job's "
                "namespace to your Kubeflow profile's namespace (cluster.namespace)."
            )
        if exc.status == 422:
            hint = ""
            if self.kind is TRAINJOB:
                runtime = self.job["spec"]["runtimeRef"]["name"]
                hint = (
                    f" (cluster.runtime is '{runtime}': `kubectl get clustertrainingruntimes` "
                    "lists the runtimes installed)"
                )
            return LaunchError(f"the API server rejected {self.what} as invalid: {message}{hint}")
        return LaunchError(f"{what} failed: HTTP {exc.status} {exc.reason}: {message}")

    def preflight(self) -> None:
        # The namespace answers, we may use the kind in it, and its CRD is installed (its API
        # path 404s otherwise).
        k = self.kind
        try:
            self.call(f"listing {k.kind}s in namespace '{self.ns}'", self.job_api, "list", limit=1)
        except LaunchError as err:
            if err.status == 404:
                other = "cluster.api=trainjob" if k is PYTORCHJOB else "cluster.api=pytorchjob"
                raise LaunchError(
                    f"the API server at {self.host} has no {k.plural}.{k.group}/{k.version} "
                    f"resource: {k.operator} is not installed on this cluster. Install it, use "
                    f"{other} if that one is, or train with cluster.launcher=local. ({err})"
                ) from None
            raise
        for secret in self.required:
            if not self.check_secret(secret):
                break

    def check_secret(self, secret: str) -> bool:
        """Check a Secret before creating the job; False when we may not read Secrets at all."""
        try:
            obj = self.call(
                f"reading Secret '{secret}'", self.core.read_namespaced_secret, secret, self.ns
            )
        except LaunchError as err:
            if err.status == 403:
                _log.info("may not read Secrets in namespace '%s'; a missing Secret will show on "
                          "the pods' status instead", self.ns)  # fmt: skip
                return False
            if err.status == 404:
                raise LaunchError(self.missing_secret(secret)) from None
            raise
        present = set(obj.data or {}) | set(obj.string_data or {})
        for key in sorted(k for k in self.refs.get(secret, ()) if k):
            if key not in present:
                raise LaunchError(self.missing_key(secret, key))
        return True

    def missing_secret(self, secret: str) -> str:
        keys = sorted(k for k in self.refs.get(secret, ()) if k) or ["KEY"]
        literals = " ".join(f"--from-literal={k}=..." for k in keys)
        return (
            f"secret '{secret}' not found in namespace '{self.ns}': create it there "
            f"(kubectl -n {self.ns} create secret generic {secret} {literals}), or point the "
            f"config at the Secret that holds these credentials, or at the right namespace"
        )

    def missing_key(self, secret: str, key: str) -> str:
        return (
            f"secret '{secret}' in namespace '{self.ns}' has no key '{key}': add it "
            f"(kubectl -n {self.ns} edit secret {secret}) or fix the key the job reads"
        )

    # - creating -----------------------------------------------------------------------------------

    def create(self, deadline: float) -> None:
        for _attempt in range(2):
            self.owned = True  # from here on a cancelled request may still have created it
            try:
                created = self.call(f"creating {self.what}", self.job_api, "create", self.job)
            except LaunchError as err:
                if err.status is not None and err.status != 409:
                    self.owned = False  # the server answered: nothing was created
                if err.status != 409:
                    raise
            else:
                self.uid = (created.get("metadata") or {}).get("uid")
                _log.info("created %s", self.what)
                self.check_kept(created)
                self.started()
                return
            self.owned = False  # it exists, but not because of us
            if self.take_over_existing(deadline):
                self.started()
                return
        raise LaunchError(f"{self.what} still exists after it was deleted; try again")

    def started(self) -> None:
        self.pending_since = time.monotonic()
        if not self.uid:
            obj = self.call(f"reading {self.what}", self.job_api, "get", self.name)
            self.uid = (obj.get("metadata") or {}).get("uid")

    def check_kept(self, created: dict[str, Any]) -> None:
        """A TrainJob whose runtime patch the API server dropped would run without our pod
        settings (volumes, security context): an older Trainer's CRD prunes the field."""
        dropped = not (created.get("spec") or {}).get("runtimePatches")
        if self.kind is TRAINJOB and self.job["spec"].get("runtimePatches") and dropped:
            raise LaunchError(
                f"the API server dropped spec.runtimePatches from {self.what}: the Kubeflow "
                "Trainer on this cluster predates that field (Trainer v2.3's TrainJob API), "
                "so the job would run without its volumes and security context. Upgrade the "
                "Trainer, or use cluster.api=pytorchjob."
            )

    def take_over_existing(self, deadline: float) -> bool:
        """A job of this name exists (an earlier attempt of the same run). True: adopted it."""
        existing = self.call(f"reading {self.what}", self.job_api, "get", self.name)
        meta = existing.get("metadata") or {}
        ours = self.job["metadata"]["annotations"][MANIFEST_HASH_ANNOTATION]
        theirs = (meta.get("annotations") or {}).get(MANIFEST_HASH_ANNOTATION)
        state = _terminal(existing, self.kind)
        if meta.get("deletionTimestamp"):
            _log.info("%s from an earlier attempt is being deleted: waiting for it", self.what)
            self.wait_gone(deadline)
            return False
        if state is None and theirs == ours:
            _log.info(
                "%s from an earlier attempt of this run is still running: following it", self.what
            )
            self.owned = True
            self.uid = meta.get("uid")
            return True
        if state is None:
            k = self.kind.kind.lower()
            raise LaunchError(
                f"a {self.kind.kind} named '{self.name}' is already running in namespace "
                f"'{self.ns}' with a different spec; delete it first (kubectl -n {self.ns} "
                f"delete {k} {self.name}) or use another run_id"
            )
        _log.info(
            "removing the %s %s left by an earlier attempt of this run", state.lower(), self.what
        )
        self.delete_and_wait(deadline)
        return False

    def delete_and_wait(self, deadline: float) -> None:
        try:
            self.call(f"deleting {self.what}", self.job_api, "delete", self.name,
                      propagation_policy=PROPAGATION)  # fmt: skip
        except LaunchError as err:
            if err.status != 404:
                raise
        self.wait_gone(deadline)

    def wait_gone(self, deadline: float) -> None:
        while time.monotonic() < deadline:
            try:
                self.call(f"reading {self.what}", self.job_api, "get", self.name)
            except LaunchError as err:
                if err.status == 404:
                    return
                raise
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
        raise LaunchTimeout(f"{self.what} from an earlier attempt was not gone before the timeout")

    def ensure_network_policy(self) -> None:
        """Create the job's NetworkPolicy (owned by the job), replacing a stale one."""
        group, version, plural = NETWORKING
        policy = netpolicy.build_network_policy(self.job, self.uid or "")
        what = f"NetworkPolicy {self.label}"
        for _attempt in range(3):
            try:
                self.call(f"creating {what}", self.custom.create_namespaced_custom_object,
                          group, version, self.ns, plural, policy)  # fmt: skip
                _log.info("created %s: only the job's own pods reach its pods", what)
                return
            except LaunchError as err:
                if err.status != 409:
                    raise
            try:
                existing = self.call(f"reading {what}", self.custom.get_namespaced_custom_object,
                                     group, version, self.ns, plural, self.name)  # fmt: skip
            except LaunchError as err:
                if err.status == 404:
                    continue  # gone in between: create it again
                raise
            owners = {
                r.get("uid") for r in (existing.get("metadata") or {}).get("ownerReferences") or []
            }
            if self.uid in owners:
                return  # the adopted job's own
            _log.info("replacing %s left by an earlier job of this name", what)
            try:
                self.call(f"deleting {what}", self.custom.delete_namespaced_custom_object,
                          group, version, self.ns, plural, self.name)  # fmt: skip
            except LaunchError as err:
                if err.status != 404:
                    raise
        raise LaunchError(f"{what} from an earlier job kept coming back; delete it and try again")

    # - following --------------------------------------------------------------------------------

    def poll(self, what: str, fn, *args, **kwargs):
        """A request while the job runs: rides out an unreachable server for API_GRACE_S."""
        kwargs.setdefault("_request_timeout", (CONNECT_TIMEOUT_S, READ_TIMEOUT_S))
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if not is_transient(exc):
                raise
            now = time.monotonic()
            if self.unreachable_since is None:
                self.unreachable_since = now
                _log.warning("%s failed (%s); retrying for up to %.0f s", what, exc, self.grace)
            if now - self.unreachable_since > self.grace:
                if is_unreachable(exc):
                    raise self.unreachable(what, exc) from None
                raise LaunchError(f"{what} kept failing for {self.grace:.0f} s: {exc}") from None
            return None
        self.unreachable_since = None
        return result

    @property
    def grace(self) -> float:
        return max(API_GRACE_S, 3 * self.poll_s)

    def watch(self, deadline: float) -> dict[str, Any]:
        from kubernetes.client.exceptions import ApiException

        last_state = None
        while True:
            self.master_log.drain(min(time.monotonic() + self.poll_s, deadline))
            if time.monotonic() >= deadline:
                raise LaunchTimeout(
                    f"{self.what} did not finish before the timeout "
                    f"(state: {last_state or 'not started'}); deleting it{self.master_log.tail_text()}"
                )
            try:
                obj = self.poll(f"reading {self.what}", self.job_api, "get", self.name)
            except ApiException as exc:
                if exc.status == 404:
                    self.owned = False
                    raise LaunchError(
                        f"{self.what} was deleted by someone else while it ran"
                    ) from None
                raise self.api_error(f"reading {self.what}", exc) from None
            if obj is None:
                continue
            state, condition = _state(obj, self.kind)
            if state != last_state:
                _log.info("%s: %s%s", self.what, state or "Pending",
                          f" ({condition.get('message')})" if condition.get("message") else "")  # fmt: skip
                last_state = state
            pods = self.poll(f"listing the pods of {self.what}", self.list_pods)
            if pods is not None:
                self.inspect(pods)
            if state in ("Succeeded", "Failed"):
                complete = self.master_log.finish()
                if state == "Succeeded":
                    return obj
                raise LaunchError(
                    f"{self.what} failed: {condition.get('message') or condition.get('reason') or 'no message'}"
                    f"{self.master_log.tail_text(complete)}"
                )
            if pods is not None:
                self.check_pending(pods, condition)

    def list_pods(self, **kwargs) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self.core.list_namespaced_pod(self.ns, label_selector=f"{self.kind.job_label}={self.name}",
                                                 _preload_content=False, **kwargs)  # fmt: skip
        except ApiException as exc:
            if is_transient(exc):
                raise  # poll() rides it out
            raise self.api_error(f"listing the pods of {self.what}", exc) from None
        return json.loads(resp.data).get("items") or []

    def inspect(self, pods: list[dict[str, Any]]) -> None:
        """Fail fast on a pod that cannot start; note scheduling trouble; follow the Master."""
        for pod in pods:
            meta, status = pod.get("metadata") or {}, pod.get("status") or {}
            name = meta.get("name", "?")
            for cs in [
                *(status.get("initContainerStatuses") or []),
                *(status.get("containerStatuses") or []),
            ]:
                waiting = (cs.get("state") or {}).get("waiting") or {}
                reason, message = waiting.get("reason") or "", waiting.get("message") or ""
                if reason == "CreateContainerConfigError":
                    raise LaunchError(self.config_error(name, cs.get("name", "?"), message))
                if reason == "InvalidImageName":
                    raise LaunchError(f"pod {name}: invalid image name: {message}")
                if reason in ("ErrImagePull", "ImagePullBackOff", "CrashLoopBackOff"):
                    self.note(f"pod {name}: container {cs.get('name')}: {reason}: {message}")
            scheduled = _pod_scheduled(pod)
            if scheduled.get("status") == "False" and scheduled.get("message"):
                self.note(f"pod {name} is not scheduled yet: {scheduled['message']}")
        masters = [
            p
            for p in pods
            if self.kind.is_master(p) and not (p.get("metadata") or {}).get("deletionTimestamp")
        ]
        masters.sort(key=lambda p: (p.get("metadata") or {}).get("creationTimestamp") or "")
        self.master_log.pod = masters[-1] if masters else None
        self.master_log.follow()

    def note(self, text: str) -> None:
        if text not in self.noted:
            self.noted.add(text)
            _log.warning("%s", text)

    def config_error(self, pod: str, container: str, message: str) -> str:
        if m := re.search(r'secrets? "([^"]+)" not found', message):
            return self.missing_secret(m.group(1)) + f" (pod {pod}: {message})"
        if m := re.search(r"couldn't find key (\S+) in Secret ([^/\s]+)/(\S+)", message):
            return self.missing_key(m.group(3), m.group(1)) + f" (pod {pod}: {message})"
        return f"pod {pod}: container {container} cannot be configured: {message}"

    # - pods that do not start ---------------------------------------------------------------------

    def check_pending(self, pods: list[dict[str, Any]], condition: dict[str, Any]) -> None:
        """Fail once the pods have not all been running for pending_timeout_s."""
        live = [p for p in pods if not (p.get("metadata") or {}).get("deletionTimestamp")]
        waiting = [p for p in live if (p.get("status") or {}).get("phase") in (None, "", "Pending")]
        expected = self.kind.pod_count(self.job)
        now = time.monotonic()
        if not waiting and len(live) >= expected:
            self.pending_since = None
            return
        if self.pending_since is None:
            self.pending_since = now
        if self.pending_timeout_s is None or now - self.pending_since < self.pending_timeout_s:
            return
        raise PodsPending(self.pending_message(waiting, len(live), expected, condition))

    def pending_message(
        self, waiting: list[dict[str, Any]], live: int, expected: int, condition: dict[str, Any]
    ) -> str:
        reasons: list[str] = []
        unschedulable = False
        for pod in waiting[:3]:
            name = (pod.get("metadata") or {}).get("name", "?")
            scheduled = _pod_scheduled(pod)
            if scheduled.get("status") == "False":
                unschedulable = True
                reasons.append(self.unschedulable(name, scheduled))
                continue
            containers = (pod.get("status") or {}).get("containerStatuses") or []
            stuck = [
                f"container {cs.get('name')} is waiting: {w.get('reason') or '?'}"
                + (f": {w['message']}" if w.get("message") else "")
                for cs in containers
                if (w := (cs.get("state") or {}).get("waiting"))
            ]
            node = (pod.get("spec") or {}).get("nodeName")
            where = f" on node {node}" if node else ""
            text = f"pod {name} is scheduled{where} but " + ("; ".join(stuck) or "not running")
            # e.g. FailedMount: configmap "..." not found, or an image pull's failure
            if warning := self.newest_event(name, lambda e: e.get("type") == "Warning"):
                text += f" (last warning: {warning})"
            reasons.append(text)
        if len(waiting) > 3:
            reasons.append(f"and {len(waiting) - 3} more pods")
        if live < expected:
            state = condition.get("message") or condition.get("type") or "no condition yet"
            reasons.append(
                f"{live} of its {expected} pods exist (the job: {state}); the operator has not "
                "created the rest: a quota or a queue (Kueue) may hold them back"
            )
        advice = (
            SCHEDULING_ADVICE
            if unschedulable
            else f"Look at the pods (kubectl -n {self.ns} describe pod ...) or raise "
            "cluster.pending_timeout_s."
        )
        return (
            f"{self.what}: its pods were not all running after {self.pending_timeout_s:g} s "
            f"(cluster.pending_timeout_s), so it was deleted. {'. '.join(reasons)}. {advice}"
        )

    def unschedulable(self, pod: str, scheduled: dict[str, Any]) -> str:
        """Why a pod is not scheduled: its newest FailedScheduling event's message (the
        scheduler's reason, e.g. '0/3 nodes are available: 3 Insufficient nvidia.com/gpu.') and
        its PodScheduled condition."""
        event = self.newest_event(pod, lambda e: e.get("reason") == "FailedScheduling")
        message = scheduled.get("message") or ""
        reason = event or message or "no reason given"
        sources = ["FailedScheduling event"] if event else []
        condition = f"PodScheduled False: {scheduled.get('reason') or 'no reason'}"
        if message and message != reason:
            condition += f": {message}"
        sources.append(condition)
        return f"pod {pod} cannot be scheduled: {reason} ({'; '.join(sources)})"

    def newest_event(self, pod: str, wanted: Callable[[dict[str, Any]], bool]) -> str | None:
        """'reason: message' of the pod's newest event that is `wanted` (FailedScheduling's:
        the message alone); None when there is none or the events cannot be read."""
        try:
            resp = self.core.list_namespaced_event(
                self.ns, field_selector=f"involvedObject.name={pod}", _preload_content=False,
                _request_timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            )  # fmt: skip
            items = json.loads(resp.data).get("items") or []
        except Exception as exc:  # noqa: BLE001 - the condition still says why
            why = error_status(exc)[0] if hasattr(exc, "body") else exc
            _log.warning("could not read the events of pod %s: %s", pod, why)
            return None
        found = sorted((e for e in items if wanted(e) and e.get("message")), key=_event_time)
        if not found:
            return None
        event = found[-1]
        message = event["message"].strip()
        return (
            message
            if event.get("reason") == "FailedScheduling"
            else f"{event['reason']}: {message}"
        )

    # - cleaning up --------------------------------------------------------------------------------

    def delete(self, why: str) -> None:
        """Delete the job (and, through the garbage collector, its pods and NetworkPolicy);
        never raises."""
        try:
            self.job_api("delete", self.name, propagation_policy=PROPAGATION,
                         _request_timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S))  # fmt: skip
            _log.info("deleted %s (%s)", self.what, why.splitlines()[0][:200])
        except BaseException as exc:  # noqa: BLE001 - the original error matters more
            if getattr(exc, "status", None) == 404:
                return
            _log.error("could not delete %s (%s); delete it by hand: kubectl -n %s delete %s %s",
                       self.what, exc, self.ns, self.kind.kind.lower(), self.name)  # fmt: skip


def _role_text(kind: JobKind) -> str:
    """ROLE_RULES in words, for this kind's jobs: 'pytorchjobs.kubeflow.org create, ...; ...'."""
    parts = []
    for group, resource, verbs in ROLE_RULES:
        if group in (PYTORCHJOB.group, TRAINJOB.group) and resource != kind.plural:
            continue
        name = f"{resource}.{group}" if group else resource
        words = ", ".join(verbs[:-1]) + (" and " if len(verbs) > 1 else "") + verbs[-1]
        parts.append(f"{name} {words}")
    return "; ".join(parts)


def _pod_scheduled(pod: dict[str, Any]) -> dict[str, Any]:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "PodScheduled":
            return cond
    return {}


def _event_time(event: dict[str, Any]) -> str:
    meta = event.get("metadata") or {}
    return (
        event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or meta.get("creationTimestamp")
        or ""
    )


def _conditions(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c for c in ((obj.get("status") or {}).get("conditions") or []) if c.get("status") == "True"
    ]


def _terminal(obj: dict[str, Any], kind: JobKind = PYTORCHJOB) -> str | None:
    state, _ = _state(obj, kind)
    return state if state in ("Succeeded", "Failed") else None


def _state(obj: dict[str, Any], kind: JobKind = PYTORCHJOB) -> tuple[str | None, dict[str, Any]]:
    """The job's state (Succeeded/Failed win over the rest) and that condition. A TrainJob's
    Complete reads as Succeeded."""
    true = _conditions(obj)
    for wanted, name in (("Failed", "Failed"), (kind.succeeded, "Succeeded")):
        for c in true:
            if c.get("type") == wanted:
                return name, c
    if not true:
        return None, {}
    return true[-1].get("type"), true[-1]
