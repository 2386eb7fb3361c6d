"""Pods as local processes: what a kubelet does for one container, on this machine.

`ProcessPod` is a Pod whose one container runs as a local process group, started the way a
kubelet starts a container:

- its own empty directory (`<pod_root>/<pod>-<uid8>`) is its filesystem root: each volume
  mount is the directory `<pod dir><mountPath>` (emptyDir: empty; secret / configMap: the keys
  as files; any other volume type: an empty directory stands in), the working directory is
  `<pod dir><workingDir>` (the pod dir itself when none is set), and every mount path written in
  the environment, the command or its args is rewritten to its directory here (so
  `HOME=/var/visionflow` lands in the pod's own `work` volume). HOME is the pod directory unless
  the manifest sets it.
- the environment is exactly: the image's (`base_env`, e.g. PATH), HOSTNAME = the pod name, the
  kubelet's KUBERNETES_SERVICE_HOST / KUBERNETES_SERVICE_PORT / KUBERNETES_PORT (pointing at the
  fake API server), then the container's `envFrom` and `env` in order, each value `$(VAR)`-expanded
  against the variables defined before it, as the kubelet does. `valueFrom` resolves
  secretKeyRef / configMapKeyRef from the objects added to the fake (a missing one, not marked
  optional, keeps the container waiting with CreateContainerConfigError and the kubelet's
  message, and it starts once the object is added) and fieldRef (metadata.name / namespace /
  uid / labels['k'] / annotations['k'], spec.nodeName / serviceAccountName, status.podIP /
  hostIP). Nothing of the test process's own environment leaks in.
- command + args, `$(VAR)`-expanded (`$$` escapes), run with stdout and stderr together as the
  pod's log, one line per line, kept per container instance.
- the pod's restartPolicy: Always and OnFailure restart the container in place after
  `restart_delay_s` (restartCount + 1, waiting CrashLoopBackOff meanwhile, a fresh log, the same
  volumes); Never leaves the pod Succeeded or Failed. A process killed by a signal exits 128+n.
- deletion: SIGTERM to the process group, SIGKILL after the grace period, then the pod is gone.

`NetworkHook` decides each pod's address and may wrap its command (a later network-namespace
module gives each pod its own IP and runs it inside its namespace). The default puts every pod
on 127.0.0.1.

Not simulated: images (no image filesystem, no ENTRYPOINT: a container without `command` runs
its `args`), users and securityContext, resource limits (no cgroups), init and sidecar
containers (one container per pod), probes, lifecycle hooks, subPath, the downward API volume,
resourceFieldRef, service links other than KUBERNETES_*, TLS (KUBERNETES_SERVICE_HOST/PORT point
at plain HTTP, so in-cluster config inside a pod would not work against the fake).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import os
import re
import signal
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

NODE_NAME = "fake-node"
HOST_IP = "127.0.0.1"


class NetworkHook:
    """Where pods live on the network. Default: every pod on this host's loopback, unwrapped.

    A network-namespace module subclasses this: `address` gives each pod its own IP (asked for
    the Master's pod name before that pod starts, since MASTER_ADDR is set when a job's pods are
    made), `wrap` runs the command inside the pod's namespace, `release` frees both when the pod
    is gone.
    """

    def address(self, namespace: str, pod: str) -> str:
        return "127.0.0.1"

    def wrap(self, namespace: str, pod: str, argv: list[str]) -> list[str]:
        return argv

    def release(self, namespace: str, pod: str) -> None:
        return None


def default_base_env() -> dict[str, str]:
    """What an image would set: PATH with this virtualenv's bin first (so `visionflow` and
    `python` are the venv's), a UTF-8 locale."""
    return {
        "PATH": os.pathsep.join(
            [str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]
        ),
        "LANG": "C.UTF-8",
    }


class ConfigError(Exception):
    """A container cannot be configured (the kubelet's CreateContainerConfigError)."""


class MountError(Exception):
    """A volume cannot be set up: the pod stays ContainerCreating (event FailedMount)."""


class Host(Protocol):
    """What a pod needs from the cluster around it (the fake API server implements it)."""

    cond: threading.Condition
    pod_root: Path
    base_env: dict[str, str]
    network: NetworkHook
    restart_delay_s: float
    grace_s: float
    unschedulable: str | None
    closed: bool  # the fake has shut down: nothing starts any more

    def api_address(self) -> tuple[str, int]: ...
    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def config_map_data(self, namespace: str, name: str) -> dict[str, str] | None: ...
    def record_event(
        self,
        namespace: str,
        involved: dict,
        reason: str,
        message: str,
        type_: str = "Normal",
        component: str = "kubelet",
    ) -> None: ...
    def pod_changed(self, pod: ProcessPod) -> None: ...
    def pod_gone(self, pod: ProcessPod) -> None: ...
    def track(self, thread: threading.Thread | threading.Timer) -> None: ...


# --- $(VAR) expansion, as the kubelet does it (k8s.io/kubernetes third_party expansion) ----------


def expand(text: str, *contexts: dict[str, str]) -> str:
    """`$(NAME)` -> its value from the first context that has it (kept as is if none does);
    `$$` -> `$`; any other `$` is kept."""
    out: list[str] = []
    checkpoint = 0
    cursor = 0
    while cursor < len(text):
        if text[cursor] == "$" and cursor + 1 < len(text):
            out.append(text[checkpoint:cursor])
            rest = text[cursor + 1 :]
            if rest[0] == "$":
                out.append("$")
                advance = 1
            elif rest[0] == "(":
                close = rest.find(")", 1)
                if close == -1:
                    out.append("$(")
                    advance = 1
                else:
                    name = rest[1:close]
                    value = next((c[name] for c in contexts if name in c), None)
                    out.append(value if value is not None else f"$({name})")
                    advance = close + 1
            else:
                out.append("$" + rest[0])
                advance = 1
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    return "".join(out) + text[checkpoint:]


# --- one container instance ----------------------------------------------------------------------


class ContainerRun:
    """One instance of the container: its process and its log."""

    def __init__(self, pod: ProcessPod, restart_count: int):
        self.pod = pod
        self.restart_count = restart_count
        self.container_id = "fake://" + uuid.uuid4().hex
        self.lines: list[str] = []
        self.proc: subprocess.Popen | None = None
        self.started_at = ""
        self.finished_at = ""
        self.exit_code: int | None = None
        self.ended = False

    def log_done(self) -> bool:
        """A followed log of this instance ends when it has exited (or its pod is gone)."""
        return self.ended or self.pod.gone

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


# --- the pod --------------------------------------------------------------------------------------


class ProcessPod:
    """A Pod (one container) whose container runs as a local process group."""

    def __init__(
        self,
        host: Host,
        *,
        namespace: str,
        name: str,
        labels: dict[str, str],
        annotations: dict[str, str] | None,
        owner: dict | None,
        spec: dict,
        container: str,
        on_change: Callable[[ProcessPod], None] | None = None,
    ):
        self.host = host
        self.namespace, self.name = namespace, name
        self.uid = str(uuid.uuid4())
        self.labels = dict(labels)
        self.annotations = dict(annotations or {})
        self.owner = owner
        self.spec = spec  # the pod spec as the operator made it (env injected, restartPolicy set)
        self.container_name = container
        self.container = next(c for c in spec["containers"] if c["name"] == container)
        self.on_change = on_change
        self.created = _now()
        self.dir = host.pod_root / f"{name}-{self.uid[:8]}"
        self.ip = ""
        self.phase = "Pending"
        self.scheduled: tuple[str, str, str] | None = None  # (status, reason, message)
        self.started_at = ""
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.last_state: dict = {}
        self.restart_count = 0
        self.runs: list[ContainerRun] = []
        self.mounts: list[tuple[str, Path]] = []  # (container path, directory here)
        self.deletion_timestamp: str | None = None
        self.gone = False
        self.restart_timer: threading.Timer | None = None

    # - identity ----------------------------------------------------------------------------------

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    def involved(self) -> dict:
        return {
            "kind": "Pod",
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "apiVersion": "v1",
            "fieldPath": f"spec.containers{{{self.container_name}}}",
        }

    def event(self, reason: str, message: str, type_: str = "Normal", component: str = "kubelet"):
        self.host.record_event(self.namespace, self.involved(), reason, message, type_, component)

    @property
    def restart_policy(self) -> str:
        return self.spec.get("restartPolicy") or "Always"

    @property
    def current(self) -> ContainerRun | None:
        return self.runs[-1] if self.runs else None

    @property
    def pid(self) -> int | None:
        run = self.current
        return run.pid if run and run.alive() else None

    def log_source(self, previous: bool = False) -> ContainerRun | None:
        if previous:
            return self.runs[-2] if len(self.runs) > 1 else None
        return self.current

    # - scheduling and starting (all under host.cond) --------------------------------------------

    def schedule(self) -> None:
        """The scheduler's turn: bind the pod to the node, or leave it Pending (unschedulable)."""
        if self.gone or self.deletion_timestamp or (self.scheduled and self.scheduled[0] == "True"):
            return
        if self.host.unschedulable:
            message = self.host.unschedulable
            if self.scheduled != ("False", "Unschedulable", message):
                self.scheduled = ("False", "Unschedulable", message)
                self.event("FailedScheduling", message, "Warning", "default-scheduler")
            return
        self.scheduled = ("True", "", "")
        self.ip = self.host.network.address(self.namespace, self.name)
        self.event(
            "Scheduled",
            f"Successfully assigned {self.namespace}/{self.name} to {NODE_NAME}",
            component="default-scheduler",
        )
        self.try_start()

    def try_start(self) -> None:
        """The kubelet's turn: set up volumes and the environment, then start the container.

        A Secret or ConfigMap that is missing keeps the container waiting with
        CreateContainerConfigError; `try_start` runs again when one is added."""
        if self.host.closed or self.gone or self.deletion_timestamp:
            return
        if not self.scheduled or self.scheduled[0] != "True":
            return
        if self.current is not None and not self.current.ended:
            return
        try:
            self.mount_volumes()
        except MountError as err:
            message = str(err)
            if self.state.get("waiting", {}).get("message") != message:
                self.event("FailedMount", message, "Warning")
            self.state = {"waiting": {"reason": "ContainerCreating", "message": message}}
            self.notify()
            return
        try:
            argv, env, cwd = self.prepare()
        except ConfigError as err:
            message = str(err)
            if self.state.get("waiting", {}).get("message") != message:
                self.event("Failed", f"Error: {message}", "Warning")
            self.state = {"waiting": {"reason": "CreateContainerConfigError", "message": message}}
            self.notify()
            return
        run = ContainerRun(self, self.restart_count)
        self.runs.append(run)
        argv = self.host.network.wrap(self.namespace, self.name, argv)
        try:
            run.proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as err:  # what a container runtime reports when exec fails
            missing = isinstance(err, FileNotFoundError)
            detail = (
                f'exec: "{argv[0]}": executable file not found in $PATH'
                if missing
                else f'exec: "{argv[0]}": {err.strerror}'
            )
            run.started_at = run.finished_at = _now()
            self.container_exited(run, 128, reason="StartError", message=detail)
            return
        run.started_at = _now()
        self.started_at = self.started_at or run.started_at
        self.state = {"running": {"startedAt": run.started_at}}
        self.phase = "Running"
        self.event("Created", f"Created container {self.container_name}")
        self.event("Started", f"Started container {self.container_name}")
        pump = threading.Thread(
            target=self._pump, args=(run,), name=f"pod-{self.name}", daemon=True
        )
        self.host.track(pump)
        pump.start()
        self.notify()

    def mount_volumes(self) -> None:
        if self.mounts:
            return  # volumes outlive container restarts, as emptyDir does
        self.dir.mkdir(parents=True, exist_ok=True)
        volumes = {v["name"]: v for v in self.spec.get("volumes") or []}
        mounts: list[tuple[str, Path]] = []
        made: dict[str, Path] = {}
        for mount in self.container.get("volumeMounts") or []:
            path = mount["mountPath"].rstrip("/")
            if not path:
                continue  # a mount over / would be this machine's root
            where = self.dir / path.lstrip("/")
            volume = volumes.get(mount["name"], {})
            if mount["name"] in made:
                where.parent.mkdir(parents=True, exist_ok=True)
                if not where.exists():
                    where.symlink_to(made[mount["name"]], target_is_directory=True)
            else:
                where.mkdir(parents=True, exist_ok=True)
                try:
                    self.fill_volume(volume, where)
                except ConfigError as err:
                    raise MountError(
                        f'MountVolume.SetUp failed for volume "{mount["name"]}" : {err}'
                    ) from None
                made[mount["name"]] = where
            mounts.append((path, where))
        work = (self.container.get("workingDir") or "").rstrip("/")
        if work and not any(work == p or work.startswith(p + "/") for p, _ in mounts):
            (self.dir / work.lstrip("/")).mkdir(parents=True, exist_ok=True)
            mounts.append((work, self.dir / work.lstrip("/")))
        self.mounts = sorted(mounts, key=lambda m: -len(m[0]))

    def fill_volume(self, volume: dict, where: Path) -> None:
        for kind, lookup, name_key, noun in (
            ("secret", self.host.secret_data, "secretName", "secret"),
            ("configMap", self.host.config_map_data, "name", "configmap"),
        ):
            source = volume.get(kind)
            if source is None:
                continue
            data = lookup(self.namespace, source.get(name_key, ""))
            if data is None:
                if source.get("optional"):
                    return
                raise ConfigError(f'{noun} "{source.get(name_key)}" not found')
            items = source.get("items") or [{"key": k, "path": k} for k in data]
            for item in items:
                if item["key"] not in data:
                    raise ConfigError(
                        f"couldn't find key {item['key']} in {noun} {source.get(name_key)}"
                    )
                target = where / item["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(data[item["key"]])

    def map_path(self, text: str) -> str:
        """Container paths under a mount (or the working dir) -> their directories here, in one
        pass (a replacement is never rewritten again, e.g. when pod_root itself is under /tmp)."""
        if not self.mounts:
            return text
        where = dict(self.mounts)
        alternatives = "|".join(re.escape(path) for path, _ in self.mounts)  # longest first
        pattern = rf"(?<![\w./-])({alternatives})(?=/|$|[^\w.-])"
        return re.sub(pattern, lambda m: str(where[m.group(1)]), text)

    def prepare(self) -> tuple[list[str], dict[str, str], str]:
        """(argv, environment, working directory) of the next container instance."""
        ctr = self.container
        api_host, api_port = self.host.api_address()
        service_env = {
            "KUBERNETES_SERVICE_HOST": api_host,
            "KUBERNETES_SERVICE_PORT": str(api_port),
            "KUBERNETES_PORT": f"tcp://{api_host}:{api_port}",
        }
        defined: dict[str, str] = {}
        for source in ctr.get("envFrom") or []:
            defined.update(self.env_from(source))
        for var in ctr.get("env") or []:
            if "valueFrom" in (var or {}) and var["valueFrom"] is not None:
                value = self.value_from(var["name"], var["valueFrom"])
                if value is None:
                    continue  # an optional reference to something missing: not set
            else:
                value = expand(var.get("value") or "", defined, service_env)
            defined[var["name"]] = value
        context = {**service_env, **defined}
        command = [expand(a, context) for a in ctr.get("command") or []]
        args = [expand(a, context) for a in ctr.get("args") or []]
        argv = [self.map_path(a) for a in command + args]
        if not argv:
            raise ConfigError(
                "the container has no command: images are not simulated, so there is no "
                "ENTRYPOINT to run"
            )
        env = {**self.host.base_env, "HOME": str(self.dir), "HOSTNAME": self.name}
        env.update(service_env)
        env.update({k: self.map_path(v) for k, v in defined.items()})
        work = ctr.get("workingDir")
        cwd = self.map_path(work) if work else str(self.dir)
        return argv, env, cwd

    def env_from(self, source: dict) -> dict[str, str]:
        prefix = source.get("prefix") or ""
        for kind, lookup, noun in (
            ("secretRef", self.host.secret_data, "secret"),
            ("configMapRef", self.host.config_map_data, "configmap"),
        ):
            ref = source.get(kind)
            if ref is None:
                continue
            data = lookup(self.namespace, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    return {}
                raise ConfigError(f'{noun} "{ref.get("name")}" not found')
            return {prefix + k: v for k, v in data.items()}
        return {}

    def value_from(self, var: str, source: dict) -> str | None:
        for kind, lookup, noun, title in (
            ("secretKeyRef", self.host.secret_data, "secret", "Secret"),
            ("configMapKeyRef", self.host.config_map_data, "configmap", "ConfigMap"),
        ):
            ref = source.get(kind)
            if ref is None:
                continue
            data = lookup(self.namespace, ref.get("name", ""))
            if data is None:
                if ref.get("optional"):
                    return None
                raise ConfigError(f'{noun} "{ref.get("name")}" not found')
            if ref.get("key") not in data:
                if ref.get("optional"):
                    return None
                where = f"{self.namespace}/{ref.get('name')}"
                raise ConfigError(f"couldn't find key {ref.get('key')} in {title} {where}")
            return data[ref["key"]]
        if (ref := source.get("fieldRef")) is not None:
            return self.field_value(var, ref.get("fieldPath", ""))
        raise ConfigError(f"env {var}: valueFrom {sorted(source)} is not simulated")

    def field_value(self, var: str, path: str) -> str:
        if m := re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", path):
            return (self.labels if m.group(1) == "labels" else self.annotations).get(m.group(2), "")
        values = {
            "metadata.name": self.name,
            "metadata.namespace": self.namespace,
            "metadata.uid": self.uid,
            "spec.nodeName": NODE_NAME,
            "spec.serviceAccountName": self.spec.get("serviceAccountName") or "default",
            "status.podIP": self.ip,
            "status.hostIP": HOST_IP,
        }
        if path not in values:
            raise ConfigError(f"env {var}: unsupported fieldPath: {path}")
        return values[path]

    # - the process --------------------------------------------------------------------------------

    def _pump(self, run: ContainerRun) -> None:
        """Reads the container's output into its log, then reports its exit."""
        assert run.proc is not None and run.proc.stdout is not None
        cond = self.host.cond
        for raw in run.proc.stdout:
            line = raw.decode("utf-8", "replace").rstrip("\n").rstrip("\r")
            with cond:
                run.lines.append(line)
                cond.notify_all()
        run.proc.stdout.close()
        code = run.proc.wait()
        with cond:
            self.container_exited(run, 128 - code if code < 0 else code)

    def container_exited(self, run: ContainerRun, code: int, reason: str = "", message: str = ""):
        """The container instance ended with `code`: the restart policy decides what follows."""
        run.exit_code, run.ended = code, True
        run.finished_at = run.finished_at or _now()
        terminated = {
            "exitCode": code,
            "reason": reason or ("Completed" if code == 0 else "Error"),
            "startedAt": run.started_at,
            "finishedAt": run.finished_at,
            "containerID": run.container_id,
        }
        if message:
            terminated["message"] = message
        policy = self.restart_policy
        again = policy == "Always" or (policy == "OnFailure" and code != 0)
        if self.deletion_timestamp or self.gone:
            self.state = {"terminated": terminated}
            self.finish_deletion()
        elif again and not self.host.closed:
            self.last_state = {"terminated": terminated}
            self.restart_count += 1
            backoff = (
                f"back-off {self.host.restart_delay_s:g}s restarting failed container="
                f"{self.container_name} pod={self.name}_{self.namespace}({self.uid})"
            )
            self.state = {"waiting": {"reason": "CrashLoopBackOff", "message": backoff}}
            self.event(
                "BackOff",
                f"Back-off restarting failed container {self.container_name} in "
                f"pod {self.name}_{self.namespace}({self.uid})",
                "Warning",
            )
            timer = threading.Timer(self.host.restart_delay_s, self._restart)
            timer.daemon = True
            self.restart_timer = timer
            self.host.track(timer)
            timer.start()
        else:
            self.state = {"terminated": terminated}
            self.phase = "Succeeded" if code == 0 else "Failed"
        self.host.cond.notify_all()
        self.notify()

    def _restart(self) -> None:
        with self.host.cond:
            self.restart_timer = None
            self.try_start()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the container's process group (e.g. a node losing the pod)."""
        run = self.current
        if run is None or not run.alive():
            raise ProcessLookupError(f"pod {self.namespace}/{self.name} has no running container")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.proc.pid, sig)

    # - deletion -----------------------------------------------------------------------------------

    def delete(self, grace_s: float | None = None) -> None:
        """Graceful deletion: SIGTERM now, SIGKILL after the grace period, then the pod is gone."""
        if self.gone:
            return
        if self.restart_timer is not None:
            self.restart_timer.cancel()
            self.restart_timer = None
        if self.deletion_timestamp is None:
            self.deletion_timestamp = _now()
        run = self.current
        if run is None or not run.alive():
            self.finish_deletion()
            return
        grace = self.host.grace_s if grace_s is None else grace_s
        self.event("Killing", f"Stopping container {self.container_name}")
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.proc.pid, signal.SIGTERM)
        killer = threading.Thread(
            target=self._kill_after, args=(run, grace), daemon=True, name=f"kill-{self.name}"
        )
        self.host.track(killer)
        killer.start()
        self.notify()

    @staticmethod
    def _kill_after(run: ContainerRun, grace: float) -> None:
        try:
            run.proc.wait(timeout=max(grace, 0))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(run.proc.pid, signal.SIGKILL)

    def finish_deletion(self) -> None:
        if self.gone:
            return
        self.gone = True
        self.host.network.release(self.namespace, self.name)
        self.host.cond.notify_all()
        self.host.pod_gone(self)

    def notify(self) -> None:
        self.host.pod_changed(self)
        if self.on_change is not None:
            self.on_change(self)

    def force_kill(self) -> None:
        """At shutdown: kill whatever still runs, without waiting for a grace period."""
        if self.restart_timer is not None:
            self.restart_timer.cancel()
        for run in self.runs:
            if run.alive():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(run.proc.pid, signal.SIGKILL)

    # - the API object -----------------------------------------------------------------------------

    def ready(self) -> bool:
        return "running" in self.state and not self.deletion_timestamp

    def to_json(self) -> dict[str, Any]:
        scheduled = self.scheduled or ("False", "", "")
        conditions = [
            {
                "type": "PodScheduled",
                "status": scheduled[0],
                "lastProbeTime": None,
                "lastTransitionTime": self.created,
            }
        ]
        if scheduled[1]:
            conditions[0].update(reason=scheduled[1], message=scheduled[2])
        if scheduled[0] == "True":
            ready = "True" if self.ready() else "False"
            for ctype, status in (
                ("Initialized", "True"),
                ("ContainersReady", ready),
                ("Ready", ready),
            ):
                conditions.append(
                    {
                        "type": ctype,
                        "status": status,
                        "lastProbeTime": None,
                        "lastTransitionTime": self.created,
                    }
                )
        run = self.current
        status: dict[str, Any] = {
            "phase": self.phase,
            "conditions": conditions,
            "qosClass": "Burstable",
        }
        if scheduled[0] == "True":
            status.update(hostIP=HOST_IP, podIP=self.ip, podIPs=[{"ip": self.ip}])
            status["startTime"] = self.started_at or self.created
            cs = {
                "name": self.container_name,
                "image": self.container.get("image", ""),
                "imageID": "",
                "ready": self.ready(),
                "started": "running" in self.state,
                "restartCount": self.restart_count,
                "state": dict(self.state),
                "lastState": dict(self.last_state),
            }
            if run is not None:
                cs["containerID"] = run.container_id
            status["containerStatuses"] = [cs]
        meta: dict[str, Any] = {
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
            "resourceVersion": "1",
            "creationTimestamp": self.created,
            "labels": dict(self.labels),
        }
        if self.annotations:
            meta["annotations"] = dict(self.annotations)
        if self.owner:
            meta["ownerReferences"] = [dict(self.owner)]
        if self.deletion_timestamp:
            meta["deletionTimestamp"] = self.deletion_timestamp
            meta["deletionGracePeriodSeconds"] = int(self.host.grace_s)
        spec = dict(self.spec)
        if scheduled[0] == "True":
            spec["nodeName"] = NODE_NAME
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}
        return copy.deepcopy(pod)  # callers get a snapshot, never the live state


def decode_secret(data: dict[str, str]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode("utf-8", "replace") for k, v in data.items()}


def _now() -> str:
    from datetime import UTC, datetime

    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
