"""A stand-in for the Kubernetes API server, for the launcher's tests: no cluster can run here.

`FakeKubernetes` is a small HTTP server on 127.0.0.1 (a free port, in a thread) that answers
exactly the requests `visionflow.cluster.launcher` makes, in the shapes the real API server
uses (JSON objects, `Status` bodies for errors, chunked streaming for `follow=true` logs):

    GET/POST  /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs          list / create
    GET/DELETE /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{name}   read / delete
    GET       /api/v1/namespaces/{ns}/pods?labelSelector=k=v,...          list
    GET       /api/v1/namespaces/{ns}/pods/{pod}/log                      log (follow, tailLines)
    GET       /api/v1/namespaces/{ns}/secrets/{name}                      read

It also simulates the Kubeflow Training Operator: a created PyTorchJob gets a Master pod (and
Worker pods) labelled as the operator labels them, and walks through a scripted `JobLife`:
each step is a job condition (Created, Running, Restarting, Succeeded, Failed) that lasts a
number of reads of the job (the launcher's polls), may write lines to the Master's log, and
sets the pods' state (waiting, running, terminated). The last step lasts forever, so a life
that ends in Running never finishes. Created and deleted jobs, and every request, are recorded
for the tests to assert on.

By default the server enforces the Role a KFP step gets (no `get` on Secrets), like a cluster.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

GROUP_PATH = "/apis/kubeflow.org/v1/namespaces/"
CORE_PATH = "/api/v1/namespaces/"
SERVICE_ACCOUNT = "pipeline-runner"
# What a KFP step's Role allows here: no Secrets.
STEP_ROLE_FORBIDS = frozenset({("get", "secrets")})


@dataclass
class Step:
    """One state of a job's life, seen on `polls` reads of the job (the last step: forever)."""

    condition: str  # Created | Running | Restarting | Succeeded | Failed
    polls: int = 1
    log: list[str] = field(default_factory=list)  # Master log lines written as the step begins
    message: str = ""  # the condition's message
    waiting: tuple[str, str] | None = None  # (reason, message) of a container that cannot start
    new_pod: bool = False  # the operator replaced the Master pod (new uid, fresh log)


@dataclass
class JobLife:
    steps: list[Step]


def succeeding(lines: list[str], running_polls: int = 3) -> JobLife:
    """Created, then Running (writing `lines`, all but the last), then Succeeded."""
    return JobLife([Step("Created"), Step("Running", running_polls, log=lines[:-1]),
                    Step("Succeeded", log=lines[-1:], message="PyTorchJob succeeded")])  # fmt: skip


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Pod:
    def __init__(self, job: _Job, replica: str, index: int):
        self.job, self.replica, self.index = job, replica, index
        self.name = f"{job.name}-{replica}-{index}"
        self.uid = str(uuid.uuid4())
        self.created = now()
        self.lines: list[str] = []
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.phase = "Pending"
        self.restarts = 0
        self.gone = False  # deleted or replaced: its log streams end

    def to_json(self) -> dict:
        labels = {
            "training.kubeflow.org/operator-name": "pytorchjob-controller",
            "training.kubeflow.org/job-name": self.job.name,
            "training.kubeflow.org/replica-type": self.replica,
            "training.kubeflow.org/replica-index": str(self.index),
        }
        if self.replica == "master":
            labels["training.kubeflow.org/job-role"] = "master"
        scheduled = {"type": "PodScheduled", "status": "True"}
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.job.ns,
                "uid": self.uid,
                "creationTimestamp": self.created,
                "labels": labels,
                "ownerReferences": [
                    {
                        "apiVersion": "kubeflow.org/v1",
                        "kind": "PyTorchJob",
                        "name": self.job.name,
                        "uid": self.job.uid,
                        "controller": True,
                    }
                ],
            },  # fmt: skip
            "spec": {"containers": [{"name": "pytorch", "image": "visionflow-train:test"}]},
            "status": {
                "phase": self.phase,
                "conditions": [scheduled],
                "containerStatuses": [
                    {
                        "name": "pytorch",
                        "image": "visionflow-train:test",
                        "imageID": "",
                        "ready": "running" in self.state,
                        "restartCount": self.restarts,
                        "state": copy.deepcopy(self.state),
                    }
                ],
            },  # fmt: skip
        }


class _Job:
    def __init__(self, manifest: dict, life: JobLife, polls_done: int = 0):
        self.manifest = copy.deepcopy(manifest)
        self.name = manifest["metadata"]["name"]
        self.ns = manifest["metadata"]["namespace"]
        self.uid = str(uuid.uuid4())
        self.manifest["metadata"].update(uid=self.uid, creationTimestamp=now(), resourceVersion="1")
        self.life = life
        self.reads = 0
        self.step_index = -1
        self.conditions: list[dict] = []
        specs = manifest["spec"]["pytorchReplicaSpecs"]
        self.master = _Pod(self, "master", 0)
        self.workers = [
            _Pod(self, "worker", i) for i in range((specs.get("Worker") or {}).get("replicas", 0))
        ]
        self.enter(0)
        for _ in range(polls_done):
            self.read()

    @property
    def pods(self) -> list[_Pod]:
        return [self.master, *self.workers]

    def read(self) -> dict:
        """A read of the job: the operator's clock ticks once."""
        self.reads += 1
        bound = 0
        for i, step in enumerate(self.life.steps):
            bound += step.polls
            if self.reads <= bound or i == len(self.life.steps) - 1:
                if i != self.step_index:
                    self.enter(i)
                break
        return self.to_json()

    def enter(self, index: int) -> None:
        for i in range(self.step_index + 1, index + 1):  # no step is skipped
            step = self.life.steps[i]
            self.step_index = i
            if step.new_pod:
                self.master.gone = True
                self.master = _Pod(self, "master", 0)
            self.set_condition(step.condition, step.message)
            state, phase = self.pod_state(step)
            for pod in self.pods:
                pod.state, pod.phase = copy.deepcopy(state), phase
            self.master.lines.extend(step.log)

    @staticmethod
    def pod_state(step: Step) -> tuple[dict, str]:
        if step.waiting:
            return {"waiting": {"reason": step.waiting[0], "message": step.waiting[1]}}, "Pending"
        return {
            "Created": ({"waiting": {"reason": "ContainerCreating"}}, "Pending"),
            "Running": ({"running": {"startedAt": now()}}, "Running"),
            "Restarting": ({"waiting": {"reason": "ContainerCreating"}}, "Pending"),
            "Succeeded": ({"terminated": {"exitCode": 0, "reason": "Completed"}}, "Succeeded"),
            "Failed": ({"terminated": {"exitCode": 1, "reason": "Error"}}, "Failed"),
        }[step.condition]

    def set_condition(self, ctype: str, message: str) -> None:
        """As the operator does: one condition per type; Running turns False at the end."""
        if ctype in ("Succeeded", "Failed", "Restarting"):
            for c in self.conditions:
                if c["type"] == "Running":
                    c["status"] = "False"
        if ctype == "Running":
            for c in self.conditions:
                if c["type"] == "Restarting":
                    c["status"] = "False"
        self.conditions = [c for c in self.conditions if c["type"] != ctype]
        self.conditions.append({
            "type": ctype, "status": "True", "reason": f"PyTorchJob{ctype}",
            "message": message or f"PyTorchJob {self.name} is {ctype.lower()}.",
            "lastUpdateTime": now(), "lastTransitionTime": now(),
        })  # fmt: skip

    def to_json(self) -> dict:
        obj = copy.deepcopy(self.manifest)
        obj["status"] = {
            "conditions": copy.deepcopy(self.conditions),
            "startTime": self.manifest["metadata"]["creationTimestamp"],
        }
        return obj


class FakeKubernetes:
    """The fake API server. Use as a context manager; `api_client()` points the client at it."""

    def __init__(
        self,
        namespaces=("team-a",),
        secrets: dict[str, dict[str, dict[str, str]]] | None = None,
        forbid=STEP_ROLE_FORBIDS,
        crd_installed: bool = True,
        life: JobLife | None = None,
    ):
        self.namespaces = set(namespaces)
        self.secrets = secrets or {}  # namespace -> name -> data
        self.forbid = set(forbid)
        self.crd_installed = crd_installed
        self.life = life or succeeding(["training", "done"])
        self.jobs: dict[tuple[str, str], _Job] = {}
        self.created: list[dict] = []  # manifests as posted
        self.deleted: list[dict] = []  # {"namespace", "name", "propagationPolicy"}
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.fail_reads: list[int] = []  # statuses the next reads of a job answer with (503, ...)
        self.down = False  # True: every request is dropped (connection closed, no answer)
        self.cond = threading.Condition()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="fake-k8s", daemon=True)  # fmt: skip

    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def api_client(self):
        from kubernetes import client

        return client.ApiClient(client.Configuration(host=self.host))

    def __enter__(self) -> FakeKubernetes:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.cond:
            for job in self.jobs.values():
                for pod in job.pods:
                    pod.gone = True
            self.cond.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # - scripting --------------------------------------------------------------------------------

    def add_job(self, manifest: dict, life: JobLife, polls_done: int = 0) -> None:
        """A job that exists before the test starts (an earlier attempt's)."""
        with self.cond:
            job = _Job(manifest, life, polls_done)
            self.jobs[(job.ns, job.name)] = job

    def job_reads(self, name: str, namespace: str = "team-a") -> int:
        with self.cond:
            job = self.jobs.get((namespace, name))
            return job.reads if job else -1

    def requested(self, method: str, fragment: str) -> list[tuple[str, str, int]]:
        return [r for r in self.requests if r[0] == method and fragment in r[1]]

    # - the API ------------------------------------------------------------------------------------

    def forbidden(self, verb: str, resource: str, ns: str, name: str | None, group: str = ""):
        what = f"{resource}{'.' + group if group else ''}"
        subject = f'{what} "{name}"' if name else what
        return 403, status(403, "Forbidden", f'{subject} is forbidden: User "system:serviceaccount:{ns}:{SERVICE_ACCOUNT}" '
                                             f'cannot {verb} resource "{resource}" in API group "{group}" in the namespace "{ns}"',
                           {"name": name, "kind": resource, "group": group})  # fmt: skip

    def handle(self, method: str, path: str, query: dict, body: bytes):
        """Returns (status, json) or (200, _Stream)."""
        if path.startswith(GROUP_PATH):
            if not self.crd_installed:
                return 404, "404 page not found\n"
            m = re.fullmatch(r"([^/]+)/pytorchjobs(?:/([^/]+))?", path[len(GROUP_PATH) :])
            if not m:
                return 404, "404 page not found\n"
            return self.pytorchjobs(method, m.group(1), m.group(2), query, body)
        if path.startswith(CORE_PATH):
            rest = path[len(CORE_PATH) :]
            if m := re.fullmatch(r"([^/]+)/pods", rest):
                return self.list_pods(m.group(1), query) if method == "GET" else (405, {})
            if m := re.fullmatch(r"([^/]+)/pods/([^/]+)/log", rest):
                return self.pod_log(m.group(1), m.group(2), query)
            if m := re.fullmatch(r"([^/]+)/secrets/([^/]+)", rest):
                return self.read_secret(m.group(1), m.group(2))
        return 404, "404 page not found\n"

    def pytorchjobs(self, method: str, ns: str, name: str | None, query: dict, body: bytes):
        verb = {"GET": "get" if name else "list", "POST": "create", "DELETE": "delete"}.get(method)
        if verb is None:
            return 405, status(405, "MethodNotAllowed", "method not allowed")
        if (verb, "pytorchjobs") in self.forbid:
            return self.forbidden(verb, "pytorchjobs", ns, name, "kubeflow.org")
        with self.cond:
            if verb == "list":
                items = [j.to_json() for (n, _), j in self.jobs.items() if n == ns]
                return 200, {
                    "apiVersion": "kubeflow.org/v1",
                    "kind": "PyTorchJobList",
                    "metadata": {},
                    "items": items,
                }
            if verb == "create":
                manifest = json.loads(body)
                name = manifest["metadata"]["name"]
                if ns not in self.namespaces:
                    return 404, status(
                        404,
                        "NotFound",
                        f'namespaces "{ns}" not found',
                        {"name": ns, "kind": "namespaces"},
                    )
                if (ns, name) in self.jobs:
                    return 409, status(409, "AlreadyExists", f'pytorchjobs.kubeflow.org "{name}" already exists',
                                       {"name": name, "group": "kubeflow.org", "kind": "pytorchjobs"})  # fmt: skip
                self.created.append(copy.deepcopy(manifest))
                manifest["metadata"]["namespace"] = ns
                job = _Job(manifest, self.life)
                self.jobs[(ns, name)] = job
                return 201, job.to_json()
            job = self.jobs.get((ns, name))
            if job is None:
                return 404, status(404, "NotFound", f'pytorchjobs.kubeflow.org "{name}" not found',
                                   {"name": name, "group": "kubeflow.org", "kind": "pytorchjobs"})  # fmt: skip
            if verb == "get" and self.fail_reads:
                code = self.fail_reads.pop(0)
                return code, status(
                    code,
                    "ServiceUnavailable",
                    "the server is currently unable to handle the request",
                )
            if verb == "get":
                obj = job.read()
                self.cond.notify_all()  # the step may have written log lines or ended the pods
                return 200, obj
            options = json.loads(body) if body else {}
            policy = (query.get("propagationPolicy") or [options.get("propagationPolicy")])[0]
            self.deleted.append({"namespace": ns, "name": name, "propagationPolicy": policy})
            del self.jobs[(ns, name)]
            for pod in job.pods:
                pod.gone = True
            self.cond.notify_all()
            return 200, status(
                200,
                "",
                "",
                {"name": name, "group": "kubeflow.org", "kind": "pytorchjobs"},
                "Success",
            )

    def list_pods(self, ns: str, query: dict):
        if ("list", "pods") in self.forbid:
            return self.forbidden("list", "pods", ns, None)
        wanted = dict(
            part.split("=", 1)
            for part in (query.get("labelSelector") or [""])[0].split(",")
            if "=" in part
        )
        with self.cond:
            pods = [p.to_json() for j in self.jobs.values() if j.ns == ns for p in j.pods]
        items = [
            p for p in pods if all(p["metadata"]["labels"].get(k) == v for k, v in wanted.items())
        ]
        return 200, {"apiVersion": "v1", "kind": "PodList", "metadata": {}, "items": items}

    def find_pod(self, ns: str, name: str) -> _Pod | None:
        for job in self.jobs.values():
            for pod in job.pods:
                if job.ns == ns and pod.name == name:
                    return pod
        return None

    def pod_log(self, ns: str, name: str, query: dict):
        if ("get", "pods/log") in self.forbid:
            return self.forbidden("get", "pods/log", ns, name)
        with self.cond:
            pod = self.find_pod(ns, name)
            if pod is None:
                return 404, status(
                    404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}
                )
            if "waiting" in pod.state:
                reason = pod.state["waiting"].get("reason", "")
                return 400, status(
                    400,
                    "BadRequest",
                    f'container "pytorch" in pod "{name}" is waiting to start: {reason}',
                )
            lines = list(pod.lines)
        if (query.get("follow") or ["false"])[0] == "true":
            return 200, _Stream(self, pod)
        tail = query.get("tailLines")
        if tail:
            lines = lines[-int(tail[0]) :]
        return 200, "".join(f"{line}\n" for line in lines)

    def read_secret(self, ns: str, name: str):
        if ("get", "secrets") in self.forbid:
            return self.forbidden("get", "secrets", ns, name)
        data = self.secrets.get(ns, {}).get(name)
        if data is None:
            return 404, status(
                404, "NotFound", f'secrets "{name}" not found', {"name": name, "kind": "secrets"}
            )
        return 200, {"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                     "metadata": {"name": name, "namespace": ns}, "data": dict(data)}  # fmt: skip


class _Stream:
    """A followed log: the pod's lines as they are written, until its container ends."""

    def __init__(self, fake: FakeKubernetes, pod: _Pod):
        self.fake, self.pod = fake, pod

    def lines(self):
        sent = 0
        while True:
            with self.fake.cond:
                while sent == len(self.pod.lines) and not self.finished():
                    self.fake.cond.wait(0.5)
                new = self.pod.lines[sent:]
                done = self.finished() and sent + len(new) == len(self.pod.lines)
            yield from new
            sent += len(new)
            if done:
                return

    def finished(self) -> bool:
        return self.pod.gone or "terminated" in self.pod.state


def status(
    code: int, reason: str, message: str, details: dict | None = None, outcome: str = "Failure"
) -> dict:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": outcome, "message": message,
            "reason": reason, "details": details or {}, "code": code}  # fmt: skip


def _handler(fake: FakeKubernetes):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # One buffered write per response (flushed by the server after each request) and no
        # Nagle: headers and body in separate segments would cost a delayed ACK (~40 ms) each.
        wbufsize = -1
        disable_nagle_algorithm = True

        def log_message(self, *args) -> None:  # quiet
            pass

        def _any(self) -> None:
            if fake.down:
                self.close_connection = True  # the client sees the connection dropped
                return
            url = urlsplit(self.path)
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            code, payload = fake.handle(self.command, url.path, parse_qs(url.query), body)
            fake.requests.append((self.command, url.path, code))
            if isinstance(payload, _Stream):
                self.send_response(code)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    for line in payload.lines():
                        data = f"{line}\n".encode()
                        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                    self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    self.close_connection = True
                return
            if isinstance(payload, str):
                data, ctype = payload.encode(), "text/plain"
            else:
                data, ctype = json.dumps(payload).encode(), "application/json"
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _any

    return Handler
