"""Run a PyTorchJob (kubeflow.org/v1) to completion through the Kubernetes API.

`launch(job, timeout_s=...)` creates the job, streams the Master's log into `log` line by line
while it runs, and returns the final job object once the Training Operator marks it Succeeded.
Everything else ends in `LaunchError` with a message that names the cause, and every job this
call created (or adopted) is deleted again on the way out: on failure, on timeout, on
KeyboardInterrupt and on SIGTERM (KFP cancels a step by terminating its pod).

What the launcher relies on, and why:

- Pods are found by the labels the current Training Operator (v1.5 and later) sets:
  `training.kubeflow.org/job-name=<job>`; the Master is the pod whose
  `training.kubeflow.org/replica-type` is `master` (the operator lowercases the replica type)
  or whose `training.kubeflow.org/job-role` is `master`. The pre-1.5 labels (`job-name`,
  `pytorch-job-name`, `replica-type`) are not looked for.
- The job's state is its `status.conditions`: Created, Running, Restarting, then Succeeded or
  Failed (a condition counts when its status is "True"), as the operator writes them.
- Missing Secrets. The Role a KFP step gets (pytorchjobs create/get/list/watch/delete, pods
  get/list/watch, pods/log get) cannot read Secrets, and the launcher does not need it to: the
  kubelet reports a missing Secret (or a missing key in one) on the pod as a container waiting
  with reason CreateContainerConfigError, and the launcher fails fast on that with a message
  naming the Secret and the namespace, then deletes the job. Where the service account may also
  `get` the named Secrets (a Role with resourceNames), the same check runs before anything is
  created, which saves waiting for a GPU node to be scheduled only to find a Secret missing; a
  403 on that read is not an error, only a note that the check moves to the pods.
- The Master's log is followed as `masterlog` describes: lines arrive as they are written, none
  twice, and `log` is only ever called from the calling thread.
- The API server may be briefly unreachable during a long training: polling tolerates that for
  `API_GRACE_S`; before the job exists, any failure to reach it is an immediate LaunchError.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import re
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from visionflow.cluster.kubeapi import (
    CONNECT_TIMEOUT_S,
    READ_TIMEOUT_S,
    error_status,
    is_transient,
    is_unreachable,
)
from visionflow.cluster.masterlog import MasterLog

GROUP, VERSION, PLURAL, KIND = "kubeflow.org", "v1", "pytorchjobs", "PyTorchJob"
JOB_NAME_LABEL = "training.kubeflow.org/job-name"
REPLICA_TYPE_LABEL = "training.kubeflow.org/replica-type"
JOB_ROLE_LABEL = "training.kubeflow.org/job-role"
MANIFEST_HASH_ANNOTATION = "visionflow/manifest-sha256"
SA_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"

API_GRACE_S = 60.0  # how long polling rides out an unreachable API server
PROPAGATION = "Foreground"  # the job goes away after its pods: a rerun can reuse the name

_log = logging.getLogger(__name__)
_master_log = logging.getLogger("visionflow.cluster.master")


class LaunchError(RuntimeError):
    """The job could not be run to success; the message says why and what to do."""

    status: int | None = None  # the HTTP status of the API error behind it, if there was one


class LaunchTimeout(LaunchError):
    """The job did not finish within `timeout_s`; it has been deleted."""


class LaunchCancelled(LaunchError):
    """The process received SIGTERM while launching; the job has been deleted."""


def launch(
    job: dict[str, Any],
    *,
    timeout_s: float,
    required_secrets: Iterable[str] = (),
    poll_s: float = 5.0,
    log: Callable[[str], None] = _master_log.info,
    api_client=None,
) -> dict[str, Any]:
    """Run the PyTorchJob manifest `job` to completion and return the final job object.

    `required_secrets` are checked before the job is created where the service account may read
    them; Secrets the manifest references (not marked optional) are checked the same way.
    Missing ones are otherwise caught from the pods' status once they are scheduled.
    `api_client` (a `kubernetes.client.ApiClient`) replaces the in-cluster config / kubeconfig.

    Raises LaunchError (LaunchTimeout, LaunchCancelled) and re-raises KeyboardInterrupt, in every
    case after deleting the job if this call created or adopted it. ValueError: not a PyTorchJob.
    """
    if timeout_s is None or timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s!r}")
    if poll_s <= 0:
        raise ValueError(f"poll_s must be positive, got {poll_s!r}")
    job = _checked_copy(job)
    api = api_client if api_client is not None else _default_client()
    run = _Launch(api, job, list(required_secrets), poll_s, log)
    with _sigterm_raises(run.label) as guard:
        return run.run(time.monotonic() + timeout_s, guard)


# --- configuration and the manifest -------------------------------------------------------------


def _default_client():
    from kubernetes import client, config

    cfg = client.Configuration()
    try:
        config.load_incluster_config(client_configuration=cfg)
    except config.ConfigException:
        try:
            config.load_kube_config(client_configuration=cfg)
        except (config.ConfigException, OSError, TypeError, ValueError) as exc:
            raise LaunchError(
                "no Kubernetes configuration: this process does not run in a pod with a service "
                f"account, and no usable kubeconfig was found ($KUBECONFIG or ~/.kube/config): {exc}"
            ) from None
    cfg.retries = 1  # fail in seconds on an unreachable server; polling has its own grace
    return client.ApiClient(cfg)


def _checked_copy(job: dict[str, Any]) -> dict[str, Any]:
    if (
        not isinstance(job, dict)
        or job.get("apiVersion") != f"{GROUP}/{VERSION}"
        or job.get("kind") != KIND
    ):
        got = (
            f"{job.get('apiVersion')}/{job.get('kind')}"
            if isinstance(job, dict)
            else type(job).__name__
        )
        raise ValueError(f"not a {GROUP}/{VERSION} {KIND} manifest: {got}")
    job = copy.deepcopy(job)
    meta = job.setdefault("metadata", {})
    if not meta.get("name"):
        raise ValueError("the PyTorchJob manifest has no metadata.name")
    if "Master" not in (job.get("spec") or {}).get("pytorchReplicaSpecs", {}):
        raise ValueError("the PyTorchJob manifest has no spec.pytorchReplicaSpecs.Master")
    if not meta.get("namespace"):
        meta["namespace"] = _own_namespace()
    digest = hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()
    meta.setdefault("annotations", {})[MANIFEST_HASH_ANNOTATION] = digest
    return job


def _own_namespace() -> str:
    try:
        with open(SA_NAMESPACE_FILE) as f:
            return f.read().strip() or "default"
    except OSError:
        return "default"


def _secret_refs(job: dict[str, Any]) -> dict[str, set[str]]:
    """Secrets the pod templates need (not marked optional), each with the keys they read."""
    refs: dict[str, set[str]] = {}
    for replica in job["spec"]["pytorchReplicaSpecs"].values():
        spec = ((replica or {}).get("template") or {}).get("spec") or {}
        for ct in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]:
            for env in ct.get("env") or []:
                ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                if ref and ref.get("name") and not ref.get("optional"):
                    refs.setdefault(ref["name"], set()).add(ref.get("key", ""))
            for src in ct.get("envFrom") or []:
                ref = src.get("secretRef")
                if ref and ref.get("name") and not ref.get("optional"):
                    refs.setdefault(ref["name"], set())
        for vol in spec.get("volumes") or []:
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
def _sigterm_raises(label: str) -> Iterator[_Guard]:
    guard = _Guard()
    if threading.current_thread() is not threading.main_thread():
        _log.debug("launch() runs outside the main thread: SIGTERM is left to the process")
        yield guard
        return

    def on_sigterm(signum, frame):
        if guard.armed:
            guard.armed = False
            raise LaunchCancelled(f"SIGTERM received: PyTorchJob {label} was cancelled")

    previous = signal.signal(signal.SIGTERM, on_sigterm)
    try:
        yield guard
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the launch ---------------------------------------------------------------------------------


class _Launch:
    def __init__(self, api, job, required_secrets, poll_s, log):
        from kubernetes import client

        self.custom = client.CustomObjectsApi(api)
        self.core = client.CoreV1Api(api)
        self.host = api.configuration.host
        self.job, self.poll_s = job, poll_s
        self.name, self.ns = job["metadata"]["name"], job["metadata"]["namespace"]
        self.label = f"{self.ns}/{self.name}"
        self.refs = _secret_refs(job)
        self.required = list(dict.fromkeys([*required_secrets, *sorted(self.refs)]))
        self.owned = False  # this call created or adopted the job: it deletes it on the way out
        self.noted: set[str] = set()  # pod notes already logged
        self.master_log = MasterLog(self.core, self.ns, log, self.note)
        self.unreachable_since: float | None = None

    # - the whole life ---------------------------------------------------------------------------

    def run(self, deadline: float, guard: _Guard) -> dict[str, Any]:
        try:
            self.preflight()
            self.create(deadline)
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
                f"'{self.ns}' bound to it that allows pytorchjobs.kubeflow.org create, get, list, "
                "watch and delete; pods get, list and watch; pods/log get. If the namespace is "
                f"not the one you meant, fix metadata.namespace (now '{self.ns}')."
            )
        if exc.status == 404 and details.get("kind") == "namespaces":
            return LaunchError(
                f"namespace '{self.ns}' does not exist ({what}): {message}. Set the job's "
                "namespace to your Kubeflow profile's namespace (cluster.namespace)."
            )
        if exc.status == 422:
            return LaunchError(
                f"the API server rejected PyTorchJob {self.label} as invalid: {message}"
            )
        return LaunchError(f"{what} failed: HTTP {exc.status} {exc.reason}: {message}")

    def preflight(self) -> None:
        # The namespace answers, we may use PyTorchJobs in it, and the Training Operator's CRD
        # is installed (its API path 404s otherwise).
        try:
            self.call(f"listing PyTorchJobs in namespace '{self.ns}'",
                      self.custom.list_namespaced_custom_object, GROUP, VERSION, self.ns, PLURAL, limit=1)  # fmt: skip
        except LaunchError as err:
            if err.status == 404:
                raise LaunchError(
                    f"the API server at {self.host} has no {PLURAL}.{GROUP}/{VERSION} resource: "
                    "the Kubeflow Training Operator (PyTorchJob CRD) is not installed on this "
                    f"cluster. Install it, or train with cluster.launcher=local. ({err})"
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
                self.call(f"creating PyTorchJob {self.label}", self.custom.create_namespaced_custom_object,
                          GROUP, VERSION, self.ns, PLURAL, self.job)  # fmt: skip
                _log.info("created PyTorchJob %s", self.label)
                return
            except LaunchError as err:
                if err.status is not None and err.status != 409:
                    self.owned = False  # the server answered: nothing was created
                if err.status != 409:
                    raise
            self.owned = False  # it exists, but not because of us
            if self.take_over_existing(deadline):
                return
        raise LaunchError(f"PyTorchJob {self.label} still exists after it was deleted; try again")

    def take_over_existing(self, deadline: float) -> bool:
        """A job of this name exists (an earlier attempt of the same run). True: adopted it."""
        existing = self.call(f"reading PyTorchJob {self.label}", self.custom.get_namespaced_custom_object,
                             GROUP, VERSION, self.ns, PLURAL, self.name)  # fmt: skip
        ours = self.job["metadata"]["annotations"][MANIFEST_HASH_ANNOTATION]
        theirs = ((existing.get("metadata") or {}).get("annotations") or {}).get(
            MANIFEST_HASH_ANNOTATION
        )
        state = _terminal(existing)
        if state is None and theirs == ours:
            _log.info(
                "PyTorchJob %s from an earlier attempt of this run is still running: following it",
                self.label,
            )
            self.owned = True
            return True
        if state is None:
            raise LaunchError(
                f"a PyTorchJob named '{self.name}' is already running in namespace '{self.ns}' "
                f"with a different spec; delete it first (kubectl -n {self.ns} delete pytorchjob "
                f"{self.name}) or use another run_id"
            )
        _log.info(
            "removing the %s PyTorchJob %s left by an earlier attempt of this run",
            state.lower(),
            self.label,
        )
        self.delete_and_wait(deadline)
        return False

    def delete_and_wait(self, deadline: float) -> None:
        try:
            self.call(f"deleting PyTorchJob {self.label}", self.custom.delete_namespaced_custom_object,
                      GROUP, VERSION, self.ns, PLURAL, self.name, propagation_policy=PROPAGATION)  # fmt: skip
        except LaunchError as err:
            if err.status != 404:
                raise
        while time.monotonic() < deadline:
            try:
                self.call(f"reading PyTorchJob {self.label}", self.custom.get_namespaced_custom_object,
                          GROUP, VERSION, self.ns, PLURAL, self.name)  # fmt: skip
            except LaunchError as err:
                if err.status == 404:
                    return
                raise
            time.sleep(min(self.poll_s, max(0.0, deadline - time.monotonic())))
        raise LaunchTimeout(
            f"PyTorchJob {self.label} from an earlier attempt was not gone before the timeout"
        )

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
                    f"PyTorchJob {self.label} did not finish before the timeout "
                    f"(state: {last_state or 'not started'}); deleting it{self.master_log.tail_text()}"
                )
            try:
                obj = self.poll(f"reading PyTorchJob {self.label}", self.custom.get_namespaced_custom_object,
                                GROUP, VERSION, self.ns, PLURAL, self.name)  # fmt: skip
            except ApiException as exc:
                if exc.status == 404:
                    self.owned = False
                    raise LaunchError(
                        f"PyTorchJob {self.label} was deleted by someone else while it ran"
                    ) from None
                raise self.api_error(f"reading PyTorchJob {self.label}", exc) from None
            if obj is None:
                continue
            state, condition = _state(obj)
            if state != last_state:
                _log.info("PyTorchJob %s: %s%s", self.label, state or "Pending",
                          f" ({condition.get('message')})" if condition.get("message") else "")  # fmt: skip
                last_state = state
            pods = self.poll(f"listing the pods of PyTorchJob {self.label}", self.list_pods)
            if pods is not None:
                self.inspect(pods)
            if state in ("Succeeded", "Failed"):
                complete = self.master_log.finish()
                if state == "Succeeded":
                    return obj
                raise LaunchError(
                    f"PyTorchJob {self.label} failed: {condition.get('message') or condition.get('reason') or 'no message'}"
                    f"{self.master_log.tail_text(complete)}"
                )

    def list_pods(self, **kwargs) -> list[dict[str, Any]]:
        from kubernetes.client.exceptions import ApiException

        try:
            resp = self.core.list_namespaced_pod(self.ns, label_selector=f"{JOB_NAME_LABEL}={self.name}",
                                                 _preload_content=False, **kwargs)  # fmt: skip
        except ApiException as exc:
            if is_transient(exc):
                raise  # poll() rides it out
            raise self.api_error(f"listing the pods of PyTorchJob {self.label}", exc) from None
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
            for cond in status.get("conditions") or []:
                if (
                    cond.get("type") == "PodScheduled"
                    and cond.get("status") == "False"
                    and cond.get("message")
                ):
                    self.note(f"pod {name} is not scheduled yet: {cond['message']}")
        masters = [
            p
            for p in pods
            if _is_master(p) and not (p.get("metadata") or {}).get("deletionTimestamp")
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

    # - cleaning up --------------------------------------------------------------------------------

    def delete(self, why: str) -> None:
        """Delete the job (and, through the garbage collector, its pods); never raises."""
        try:
            self.custom.delete_namespaced_custom_object(
                GROUP, VERSION, self.ns, PLURAL, self.name, propagation_policy=PROPAGATION,
                _request_timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            )  # fmt: skip
            _log.info("deleted PyTorchJob %s (%s)", self.label, why.splitlines()[0][:200])
        except BaseException as exc:  # noqa: BLE001 - the original error matters more
            if getattr(exc, "status", None) == 404:
                return
            _log.error("could not delete PyTorchJob %s (%s); delete it by hand: kubectl -n %s delete "
                       "pytorchjob %s", self.label, exc, self.ns, self.name)  # fmt: skip


def _conditions(obj: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        c for c in ((obj.get("status") or {}).get("conditions") or []) if c.get("status") == "True"
    ]


def _terminal(obj: dict[str, Any]) -> str | None:
    types = {c.get("type") for c in _conditions(obj)}
    return "Failed" if "Failed" in types else "Succeeded" if "Succeeded" in types else None


def _state(obj: dict[str, Any]) -> tuple[str | None, dict[str, Any]]:
    """The job's state (Succeeded/Failed win over the rest) and that condition."""
    true = _conditions(obj)
    for wanted in ("Failed", "Succeeded"):
        for c in true:
            if c.get("type") == wanted:
                return wanted, c
    if not true:
        return None, {}
    return true[-1].get("type"), true[-1]


def _is_master(pod: dict[str, Any]) -> bool:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return (
        labels.get(REPLICA_TYPE_LABEL, "").lower() == "master"
        or labels.get(JOB_ROLE_LABEL) == "master"
    )
