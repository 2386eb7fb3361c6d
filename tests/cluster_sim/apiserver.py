"""A stand-in for the Kubernetes API server and the Kubeflow operators: no cluster runs here.

`FakeKubernetes` is an HTTP server on 127.0.0.1 (a free port, in a thread) that answers in the
shapes the real API server uses (JSON objects, `Status` bodies for errors, chunked streaming for
`follow=true` logs):

    GET/POST   /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs                list / create
    GET/DELETE /apis/kubeflow.org/v1/namespaces/{ns}/pytorchjobs/{name}         read / delete
    GET/POST   /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs    list / create
    GET/DELETE /apis/trainer.kubeflow.org/v1alpha1/namespaces/{ns}/trainjobs/{name}
    GET/POST   /apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies      list / create
    GET/DELETE /apis/networking.k8s.io/v1/namespaces/{ns}/networkpolicies/{name}
    GET        /api/v1/namespaces/{ns}/pods?labelSelector=...                   list
    GET/DELETE /api/v1/namespaces/{ns}/pods/{pod}                               read / delete
    GET        /api/v1/namespaces/{ns}/pods/{pod}/log    (container, follow, tailLines, previous)
    GET        /api/v1/namespaces/{ns}/secrets/{name}, .../configmaps/{name}     read
    GET        /api/v1/namespaces/{ns}/events?fieldSelector=involvedObject.name=X,...

What is simulated:

- Admission: a created PyTorchJob, TrainJob or NetworkPolicy is validated as `operator_api`
  describes (typed schema, strictly, then the operator's rules); an invalid one gets 422 with a
  Status whose causes name each field. Unknown namespaces 404, existing names 409.
- The Training Operator (v1.9), in one of two modes (`pods=`):
  * "scripted" (default): a job's pods walk through a `JobLife`: each `Step` is a job condition
    (Created, Running, Restarting, Succeeded, Failed) that lasts a number of reads of the job
    (the launcher's polls), may write lines to the Master's log and sets the pods' state; a
    step may hold the pods unschedulable. The last step lasts forever.
  * "process": a job's Master and Workers run as local processes (see `pods.py`: their own
    directories, exactly the environment the manifest gives plus the kubelet's and the
    operator's variables, the restart policy applied in place). The operator's controller is
    played as its source does: Created, Running, Restarting, Succeeded, Failed conditions and
    replicaStatuses, success when the Master exits 0, ExitCode restarts (exit codes >= 128 make
    a new pod, lower ones fail the job), runPolicy.backoffLimit over the containers' restart
    counts, activeDeadlineSeconds, cleanPodPolicy on finish, ttlSecondsAfterFinished.
  TrainJobs (Trainer v2.3) always follow a scripted `JobLife`: pods labelled as JobSet labels
  them, conditions Complete / Failed as the Trainer copies them from its JobSet (Trainer v2.3
  writes no Created or Running condition; Suspended is not simulated).
- The scheduler: `Step(unschedulable=...)` or `set_unschedulable(...)` keeps pods Pending with
  PodScheduled False (reason Unschedulable) and records a FailedScheduling Event on each.
- The garbage collector: an object whose ownerReferences all name objects that are gone is
  deleted (jobs, NetworkPolicies, plain pods), cascading; deleting a job deletes its pods
  (Foreground: the job stays, with a deletionTimestamp, until its pods' processes are gone).
- Events recorded by the scheduler, the kubelet and the operator, listed with field selectors.
- RBAC, roughly: `forbid` holds (verb, resource) pairs answered 403 the way a Role would; by
  default the Role a KFP step gets (no `get` on Secrets).

Not simulated: watches, PUT/PATCH, resourceVersion semantics, TLS and authentication, Services
and DNS (MASTER_ADDR is the Master pod's address, 127.0.0.1 unless a `NetworkHook` says
otherwise), elastic PyTorchJobs (elasticPolicy is validated, its PET_RDZV_* env not injected),
gang scheduling, suspend, the operator's work-queue requeue count in the backoff check, TrainJob
runtimes (a TrainJob never runs processes), and what `pods.py` lists for the kubelet.

Created and deleted objects, and every request, are recorded for the tests to assert on.
"""

from __future__ import annotations

import atexit
import base64
import copy
import json
import re
import secrets as _secrets
import signal
import threading
import time
import uuid
import weakref
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from tests.cluster_sim import operator_api as api
from tests.cluster_sim.pods import NetworkHook, ProcessPod, decode_secret, default_base_env

GROUP_PATH = "/apis/kubeflow.org/v1/namespaces/"
TRAINER_PATH = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"
NETWORKING_PATH = "/apis/networking.k8s.io/v1/namespaces/"
CORE_PATH = "/api/v1/namespaces/"
SERVICE_ACCOUNT = "pipeline-runner"
# What a KFP step's Role allows here: no Secrets.
STEP_ROLE_FORBIDS = frozenset({("get", "secrets")})

PYTORCH_CONTAINER = "pytorch"
PYTORCH_PORT_NAME = "pytorchjob-port"
PYTORCH_DEFAULT_PORT = 23456  # the operator's default when the Master declares no port
TRAINER_CONTAINER = "node"
TRAINER_JOB = "node"  # the ReplicatedJob of a TrainJob's JobSet that runs training
OPERATOR = "pytorchjob-controller"


@dataclass
class Step:
    """One state of a job's life, seen on `polls` reads of the job (the last step: forever)."""

    condition: str  # Created | Running | Restarting | Succeeded | Failed
    polls: int = 1
    log: list[str] = field(default_factory=list)  # Master log lines written as the step begins
    message: str = ""  # the condition's message
    waiting: tuple[str, str] | None = None  # (reason, message) of a container that cannot start
    new_pod: bool = False  # the operator replaced the Master pod (new uid, fresh log)
    unschedulable: str | None = None  # the scheduler's message: pods stay Pending, unscheduled


@dataclass
class JobLife:
    steps: list[Step]


def succeeding(lines: list[str], running_polls: int = 3) -> JobLife:
    """Created, then Running (writing `lines`, all but the last), then Succeeded."""
    return JobLife(
        [
            Step("Created"),
            Step("Running", running_polls, log=lines[:-1]),
            Step("Succeeded", log=lines[-1:], message="PyTorchJob succeeded"),
        ]
    )


def now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# --- scripted jobs -------------------------------------------------------------------------------


class _Pod:
    """A pod of a scripted job: its state is set by the job's steps; the Master holds a log."""

    def __init__(
        self,
        job: _Job,
        replica: str,
        index: int,
        *,
        name: str | None = None,
        labels: dict[str, str] | None = None,
        annotations: dict[str, str] | None = None,
        container: str = PYTORCH_CONTAINER,
        owner: dict | None = None,
    ):
        self.job, self.replica, self.index = job, replica, index
        self.name = name or f"{job.name}-{replica}-{index}"
        self.namespace = job.ns
        self.uid = str(uuid.uuid4())
        self.created = now()
        self.container = container
        self.custom_labels, self.annotations, self.owner = labels, annotations, owner
        self.lines: list[str] = []
        self.state: dict = {"waiting": {"reason": "ContainerCreating"}}
        self.phase = "Pending"
        self.restarts = 0
        self.scheduled: tuple[str, str, str] = ("True", "", "")  # (status, reason, message)
        self.gone = False  # deleted or replaced: its log streams end

    def log_done(self) -> bool:
        return self.gone or "terminated" in self.state

    def labels(self) -> dict[str, str]:
        if self.custom_labels is not None:
            return dict(self.custom_labels)
        labels = {
            "training.kubeflow.org/operator-name": OPERATOR,
            "training.kubeflow.org/job-name": self.job.name,
            "training.kubeflow.org/replica-type": self.replica,
            "training.kubeflow.org/replica-index": str(self.index),
        }
        if self.replica == "master":
            labels["training.kubeflow.org/job-role"] = "master"
        return labels

    def to_json(self) -> dict:
        owner = self.owner or {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "name": self.job.name,
            "uid": self.job.uid,
            "controller": True,
        }
        scheduled = {"type": "PodScheduled", "status": self.scheduled[0]}
        if self.scheduled[1]:
            scheduled.update(reason=self.scheduled[1], message=self.scheduled[2])
        meta = {
            "name": self.name,
            "namespace": self.job.ns,
            "uid": self.uid,
            "creationTimestamp": self.created,
            "labels": self.labels(),
            "ownerReferences": [owner],
        }
        if self.annotations:
            meta["annotations"] = dict(self.annotations)
        status: dict[str, Any] = {"phase": self.phase, "conditions": [scheduled]}
        if self.scheduled[0] == "True":
            status["containerStatuses"] = [
                {
                    "name": self.container,
                    "image": "visionflow-train:test",
                    "imageID": "",
                    "ready": "running" in self.state,
                    "restartCount": self.restarts,
                    "state": copy.deepcopy(self.state),
                }
            ]
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": meta,
            "spec": {"containers": [{"name": self.container, "image": "visionflow-train:test"}]},
            "status": status,
        }


class _Job:
    """A scripted PyTorchJob: its conditions and its pods follow a `JobLife`, one step per read."""

    kind = "PyTorchJob"
    group = "kubeflow.org"

    def __init__(self, manifest: dict, life: JobLife, polls_done: int = 0, fake=None):
        self.fake = fake  # records events and TTLs when set
        self.manifest = copy.deepcopy(manifest)
        self.name = manifest["metadata"]["name"]
        self.ns = manifest["metadata"]["namespace"]
        self.uid = str(uuid.uuid4())
        self.manifest["metadata"].update(uid=self.uid, creationTimestamp=now(), resourceVersion="1")
        self.life = life
        self.reads = 0
        self.step_index = -1
        self.conditions: list[dict] = []
        self.completion_time: str | None = None
        self.make_pods()
        self.enter(0)
        for _ in range(polls_done):
            self.read()

    def make_pods(self) -> None:
        specs = self.manifest["spec"]["pytorchReplicaSpecs"]
        self.master = _Pod(self, "master", 0)
        self.workers = [
            _Pod(self, "worker", i) for i in range((specs.get("Worker") or {}).get("replicas", 0))
        ]

    def new_master(self) -> _Pod:
        return _Pod(self, "master", 0)

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
                self.master = self.new_master()
            self.set_condition(step.condition, step.message)
            state, phase = self.pod_state(step)
            for pod in self.pods:
                pod.state, pod.phase = copy.deepcopy(state), phase
                self.schedule(pod, step.unschedulable)
            self.master.lines.extend(step.log)
            if step.condition in ("Succeeded", "Failed") and self.completion_time is None:
                self.completion_time = now()
                if self.fake is not None:
                    self.fake.job_finished(self)

    def schedule(self, pod: _Pod, unschedulable: str | None) -> None:
        if unschedulable:
            if pod.scheduled != ("False", "Unschedulable", unschedulable) and self.fake:
                self.fake.record_event(
                    self.ns,
                    _involved_pod(pod),
                    "FailedScheduling",
                    unschedulable,
                    "Warning",
                    "default-scheduler",
                )
            pod.scheduled = ("False", "Unschedulable", unschedulable)
            pod.state, pod.phase = {"waiting": {"reason": "ContainerCreating"}}, "Pending"
        else:
            pod.scheduled = ("True", "", "")

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
        self.conditions.append(
            {
                "type": ctype,
                "status": "True",
                "reason": f"PyTorchJob{ctype}",
                "message": message or f"PyTorchJob {self.name} is {ctype.lower()}.",
                "lastUpdateTime": now(),
                "lastTransitionTime": now(),
            }
        )

    def to_json(self) -> dict:
        obj = copy.deepcopy(self.manifest)
        obj["status"] = {
            "conditions": copy.deepcopy(self.conditions),
            "startTime": self.manifest["metadata"]["creationTimestamp"],
        }
        if self.completion_time:
            obj["status"]["completionTime"] = self.completion_time
        return obj

    def delete(self, propagation: str | None = None) -> None:
        for pod in self.pods:
            pod.gone = True


class _TrainJob(_Job):
    """A scripted TrainJob (trainer.kubeflow.org/v1alpha1): the pods of its JobSet's `node`
    ReplicatedJob, labelled as JobSet and the Job controller label them; rank = completion index."""

    kind = "TrainJob"
    group = "trainer.kubeflow.org"

    def make_pods(self) -> None:
        trainer = self.manifest["spec"].get("trainer") or {}
        self.nodes = int(trainer.get("numNodes") or 1)
        self.job_uid = str(uuid.uuid4())
        self.master = self.node_pod(0)
        self.workers = [self.node_pod(i) for i in range(1, self.nodes)]

    def new_master(self) -> _Pod:
        return self.node_pod(0)

    def node_pod(self, rank: int) -> _Pod:
        child = f"{self.name}-{TRAINER_JOB}-0"  # <jobset>-<replicatedJob>-<job index>
        suffix = "".join(_secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))
        labels = {
            "batch.kubernetes.io/controller-uid": self.job_uid,
            "batch.kubernetes.io/job-name": child,
            "controller-uid": self.job_uid,
            "job-name": child,
            "batch.kubernetes.io/job-completion-index": str(rank),
            "jobset.sigs.k8s.io/jobset-name": self.name,
            "jobset.sigs.k8s.io/jobset-uid": self.uid,
            "jobset.sigs.k8s.io/replicatedjob-name": TRAINER_JOB,
            "jobset.sigs.k8s.io/replicatedjob-replicas": "1",
            "jobset.sigs.k8s.io/job-index": "0",
            "jobset.sigs.k8s.io/job-key": child,
            "trainer.kubeflow.org/trainjob-ancestor-step": "trainer",
        }
        annotations = {"batch.kubernetes.io/job-completion-index": str(rank)}
        owner = {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "name": child,
            "uid": self.job_uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        return _Pod(
            self,
            TRAINER_JOB,
            rank,
            name=f"{child}-{rank}-{suffix}",
            labels=labels,
            annotations=annotations,
            container=TRAINER_CONTAINER,
            owner=owner,
        )

    def set_condition(self, ctype: str, message: str) -> None:
        """Trainer v2.3 copies only the JobSet's terminal conditions (metav1.Condition)."""
        terminal = {
            "Succeeded": ("Complete", "AllJobsCompleted", "jobset completed successfully"),
            "Failed": ("Failed", "FailedJobs", "jobset failed due to one or more job failures"),
        }
        if ctype not in terminal:
            return
        ctype, reason, default = terminal[ctype]
        self.conditions = [c for c in self.conditions if c["type"] != ctype]
        self.conditions.append(
            {
                "type": ctype,
                "status": "True",
                "reason": reason,
                "message": message or default,
                "lastTransitionTime": now(),
                "observedGeneration": 1,
            }
        )

    def to_json(self) -> dict:
        obj = copy.deepcopy(self.manifest)
        pods = self.pods
        running = sum(p.phase in ("Pending", "Running") for p in pods)
        ready = all(p.phase in ("Running", "Succeeded") for p in pods)
        status: dict[str, Any] = {
            "jobsStatus": [
                {
                    "name": TRAINER_JOB,
                    "active": 1 if running else 0,
                    "ready": 1 if ready and running else 0,
                    "succeeded": 1 if all(p.phase == "Succeeded" for p in pods) else 0,
                    "failed": 1 if any(p.phase == "Failed" for p in pods) else 0,
                    "suspended": 0,
                }
            ],
        }
        if self.conditions:
            status["conditions"] = copy.deepcopy(self.conditions)
        obj["status"] = status
        return obj


def _involved_pod(pod) -> dict:
    return {
        "kind": "Pod",
        "namespace": pod.namespace,
        "name": pod.name,
        "uid": pod.uid,
        "apiVersion": "v1",
    }


# --- the Training Operator, with pods as processes ------------------------------------------------


def _set_job_condition(conditions: list[dict], ctype: str, reason: str, message: str) -> bool:
    """The operator's SetCondition: nothing after Failed, nothing if unchanged; Restarting and
    Running replace each other; Succeeded and Failed turn Running False. True if it changed."""
    if any(c["type"] == "Failed" and c["status"] == "True" for c in conditions):
        return False
    current = next((c for c in conditions if c["type"] == ctype), None)
    if current and current["status"] == "True" and current["reason"] == reason:
        return False
    stamp = now()
    new = {
        "type": ctype,
        "status": "True",
        "reason": reason,
        "message": message,
        "lastUpdateTime": stamp,
        "lastTransitionTime": current["lastTransitionTime"]
        if current and current["status"] == "True"
        else stamp,
    }
    kept = []
    for c in conditions:
        if c["type"] == ctype or {c["type"], ctype} == {"Running", "Restarting"}:
            continue
        if ctype in ("Failed", "Succeeded") and c["type"] == "Running":
            c["status"] = "False"
        kept.append(c)
    conditions[:] = [*kept, new]
    return True


class _ProcessJob:
    """A PyTorchJob whose pods run as local processes, driven as the v1.9 controller drives it
    (pkg/controller.v1/common/job.go, pod.go; pkg/controller.v1/pytorch/*.go)."""

    kind = "PyTorchJob"
    group = "kubeflow.org"

    def __init__(self, fake: FakeKubernetes, manifest: dict):
        self.fake = fake
        self.manifest = copy.deepcopy(manifest)
        meta = self.manifest["metadata"]
        self.name, self.ns = meta["name"], meta["namespace"]
        self.uid = str(uuid.uuid4())
        meta.update(uid=self.uid, creationTimestamp=now(), resourceVersion="1", generation=1)
        spec = self.manifest["spec"]
        # The operator's defaults (SetDefaults_PyTorchJob), applied to its view, not the object.
        self.specs: dict[str, dict] = {}
        for rtype in ("Master", "Worker"):
            if rtype in spec["pytorchReplicaSpecs"]:
                rspec = copy.deepcopy(spec["pytorchReplicaSpecs"][rtype])
                rspec.setdefault("replicas", 1)
                rspec["restartPolicy"] = rspec.get("restartPolicy") or "OnFailure"
                self.specs[rtype] = rspec
        self.policy = {"cleanPodPolicy": "None", **(spec.get("runPolicy") or {})}
        self.nproc = spec.get("nprocPerNode") or "auto"
        self.reads = 0
        self.conditions: list[dict] = []
        self.replica_statuses: dict[str, dict] = {}
        self.start_time = now()
        self.completion_time: str | None = None
        self.pods: dict[tuple[str, int], ProcessPod] = {}
        self.deleting: str | None = None  # the propagation policy once deletion began
        self.deletion_timestamp: str | None = None
        self.cleaned = False
        self.busy = False
        self.again = False
        self.timers: list[threading.Timer] = []
        message = f"PyTorchJob {self.name} is created."
        _set_job_condition(self.conditions, "Created", "PyTorchJobCreated", message)
        deadline = self.policy.get("activeDeadlineSeconds")
        if deadline is not None:
            self.after(deadline, self.past_deadline)

    # - helpers -----------------------------------------------------------------------------------

    def involved(self) -> dict:
        return {
            "kind": "PyTorchJob",
            "namespace": self.ns,
            "name": self.name,
            "uid": self.uid,
            "apiVersion": "kubeflow.org/v1",
        }

    def event(self, reason: str, message: str, type_: str = "Normal") -> None:
        self.fake.record_event(self.ns, self.involved(), reason, message, type_, OPERATOR)

    def after(self, seconds: float, action) -> None:
        def fire():
            with self.fake.cond:
                if not self.deleting and not self.fake.closed:
                    action()

        timer = threading.Timer(seconds, fire)
        timer.daemon = True
        self.timers.append(timer)
        self.fake.track(timer)
        timer.start()

    def finished(self) -> bool:
        return any(
            c["type"] in ("Succeeded", "Failed") and c["status"] == "True" for c in self.conditions
        )

    def total_replicas(self) -> int:
        return sum(int(s["replicas"]) for s in self.specs.values())

    def master_port(self) -> int:
        for ctr in (
            self.specs.get("Master", {}).get("template", {}).get("spec", {}).get("containers", [])
        ):
            if ctr.get("name") == PYTORCH_CONTAINER:
                for port in ctr.get("ports") or []:
                    if port.get("name") == PYTORCH_PORT_NAME:
                        return int(port["containerPort"])
        return PYTORCH_DEFAULT_PORT

    # - pods ---------------------------------------------------------------------------------------

    def operator_env(self, rtype: str, index: int) -> list[dict]:
        """What setPodEnv (envvar.go, master.go) appends to every container of a replica."""
        env = [{"name": "PYTHONUNBUFFERED", "value": "0"}]
        total = self.total_replicas()
        if "Master" in self.specs:
            port = str(self.master_port())
            addr = self.fake.network.address(self.ns, f"{self.name}-master-0")
            rank = index + 1 if rtype == "Worker" else index
            nproc = int(self.nproc) if self.nproc.isdigit() else 1
            env += [
                {"name": "MASTER_PORT", "value": port},
                {"name": "PET_MASTER_PORT", "value": port},
                {"name": "MASTER_ADDR", "value": addr},
                {"name": "PET_MASTER_ADDR", "value": addr},
                {"name": "WORLD_SIZE", "value": str(total * nproc)},
                {"name": "RANK", "value": str(rank)},
                {"name": "PET_NPROC_PER_NODE", "value": self.nproc},
                {"name": "PET_NODE_RANK", "value": str(rank)},
            ]
        if "elasticPolicy" not in self.manifest["spec"]:
            env.append({"name": "PET_NNODES", "value": str(total)})
        return env

    def create_pod(self, rtype: str, index: int) -> None:
        rspec = self.specs[rtype]
        template = copy.deepcopy(rspec.get("template") or {})
        tmeta = template.get("metadata") or {}
        spec = template.get("spec") or {}
        labels = {
            **(tmeta.get("labels") or {}),
            "training.kubeflow.org/operator-name": OPERATOR,
            "training.kubeflow.org/job-name": self.name,
            "training.kubeflow.org/replica-type": rtype.lower(),
            "training.kubeflow.org/replica-index": str(index),
        }
        if rtype == "Master":
            labels["training.kubeflow.org/job-role"] = "master"
        for ctr in spec.get("containers") or []:
            ctr["env"] = [*(ctr.get("env") or []), *self.operator_env(rtype, index)]
        main = next(c for c in spec["containers"] if c["name"] == PYTORCH_CONTAINER)
        ports = main.setdefault("ports", [])
        if not any(p.get("name") == PYTORCH_PORT_NAME for p in ports):  # setPytorchDefaultPort
            ports.append({"name": PYTORCH_PORT_NAME, "containerPort": PYTORCH_DEFAULT_PORT})
        if spec.get("restartPolicy"):
            self.event(
                "SettedPodTemplateRestartPolicy",
                "Restart policy in pod template will be "
                "overwritten by restart policy in replica spec",
                "Warning",
            )
        policy = rspec["restartPolicy"]
        spec["restartPolicy"] = "Never" if policy == "ExitCode" else policy
        owner = {
            "apiVersion": "kubeflow.org/v1",
            "kind": "PyTorchJob",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }
        name = f"{self.name}-{rtype.lower()}-{index}"
        pod = ProcessPod(
            self.fake,
            namespace=self.ns,
            name=name,
            labels=labels,
            annotations=tmeta.get("annotations"),
            owner=owner,
            spec=spec,
            container=PYTORCH_CONTAINER,
            on_change=lambda p: self.reconcile(),
        )
        self.pods[(rtype, index)] = pod
        self.fake.pods[pod.key] = pod
        self.event("SuccessfulCreatePod", f"Created pod: {name}")
        self.event("SuccessfulCreateService", f"Created service: {name}")
        pod.schedule()

    def delete_pod(self, pod: ProcessPod) -> None:
        if pod.deletion_timestamp or pod.gone:
            return
        self.event("SuccessfulDeletePod", f"Deleted pod: {pod.name}")
        pod.delete()

    # - the controller -----------------------------------------------------------------------------

    def reconcile(self) -> None:
        """One ReconcileJobs pass (re-run until nothing changes; never re-entered)."""
        if self.busy:
            self.again = True
            return
        self.busy = True
        try:
            self.again = True
            while self.again:
                self.again = False
                self._reconcile()
        finally:
            self.busy = False
        self.fake.cond.notify_all()

    def _reconcile(self) -> None:
        if self.deleting:
            return
        if self.finished():
            self.clean_up()
            return
        if self.past_backoff_limit():
            self.fail(
                f"Job {self.name} has failed because it has reached the specified backoff limit"
            )
            return
        snapshot: dict[str, list[ProcessPod]] = {rtype: [] for rtype in self.specs}
        for rtype, rspec in self.specs.items():
            for index in range(int(rspec["replicas"])):
                pod = self.pods.get((rtype, index))
                if pod is not None and pod.gone:
                    del self.pods[(rtype, index)]
                    pod = None
                if pod is None:
                    self.create_pod(rtype, index)
                    continue
                snapshot[rtype].append(pod)
                if pod.phase == "Failed" and not pod.deletion_timestamp:
                    self.failed_pod(rtype, rspec, pod)
        self.update_status(snapshot)
        if self.finished():
            self.clean_up()

    def failed_pod(self, rtype: str, rspec: dict, pod: ProcessPod) -> None:
        code = (pod.state.get("terminated") or {}).get("exitCode", 0xBEEF)
        self.event("ExitedWithCode", f"Pod: {pod.namespace}.{pod.name} exited with code {code}")
        policy = rspec["restartPolicy"]
        if (policy == "ExitCode" and code >= 128) or policy in ("OnFailure", "Always"):
            self.delete_pod(pod)  # a new pod replaces it once it is gone
            message = f"job {self.name} is restarting because {rtype} replica(s) failed."
            self.event("PyTorchJobRestarting", message, "Warning")
            _set_job_condition(self.conditions, "Restarting", "PyTorchJobRestarting", message)
        elif policy == "ExitCode":
            message = f'job "{self.name}" is failing because "{rtype}" replica(s) failed.'
            self.event("PyTorchJobFailed", message, "Warning")
            _set_job_condition(self.conditions, "Failed", "PyTorchJobFailed", message)
            self.completion_time = self.completion_time or now()

    def update_status(self, snapshot: dict[str, list[ProcessPod]]) -> None:
        """updateJobReplicaStatuses + the PyTorch UpdateJobStatus."""
        for rtype, pods in snapshot.items():
            labels = (
                f"training.kubeflow.org/job-name={self.name},training.kubeflow.org/"
                f"operator-name={OPERATOR},training.kubeflow.org/replica-type={rtype.lower()}"
            )
            self.replica_statuses[rtype] = {
                "active": sum(p.phase == "Running" for p in pods),
                "succeeded": sum(p.phase == "Succeeded" for p in pods),
                "failed": sum(p.phase == "Failed" for p in pods),
                "selector": labels,
            }
        for rtype, rspec in self.specs.items():
            counts = self.replica_statuses[rtype]
            replicas = int(rspec["replicas"])
            running, succeeded, failed = counts["active"], counts["succeeded"], counts["failed"]
            if rtype == "Master":
                if running > 0:
                    _set_job_condition(
                        self.conditions,
                        "Running",
                        "PyTorchJobRunning",
                        f"PyTorchJob {self.name} is running.",
                    )
                if replicas - succeeded == 0:
                    message = f"PyTorchJob {self.name} is successfully completed."
                    if _set_job_condition(
                        self.conditions, "Succeeded", "PyTorchJobSucceeded", message
                    ):
                        self.event("PyTorchJobSucceeded", message)
                        self.completion_time = self.completion_time or now()
                    return
            if failed > 0 and replicas > succeeded + running:
                if rspec["restartPolicy"] != "Never":
                    message = (
                        f"PyTorchJob {self.name} is restarting because {failed} {rtype} "
                        "replica(s) failed."
                    )
                    if _set_job_condition(
                        self.conditions, "Restarting", "PyTorchJobRestarting", message
                    ):
                        self.event("PyTorchJobRestarting", message, "Warning")
                else:
                    message = f"PyTorchJob {self.name} is failed because {failed} {rtype} replica(s) failed."
                    if _set_job_condition(self.conditions, "Failed", "PyTorchJobFailed", message):
                        self.event("PyTorchJobFailed", message)
                        self.completion_time = self.completion_time or now()

    def past_backoff_limit(self) -> bool:
        """PastBackoffLimit: the restart counts of running pods whose replica restarts."""
        limit = self.policy.get("backoffLimit")
        if limit is None:
            return False
        total = 0
        for (rtype, _), pod in self.pods.items():
            counted = self.specs[rtype]["restartPolicy"] in ("OnFailure", "Always", "ExitCode")
            if counted and pod.phase == "Running" and not pod.gone:
                total += pod.restart_count
        return total > 0 if limit == 0 else total >= limit

    def past_deadline(self) -> None:
        if not self.finished():
            self.fail(
                f"Job {self.name} has failed because it was active longer than specified deadline"
            )

    def fail(self, message: str) -> None:
        """A job past its limits: Failed, and every pod deleted (job.go, jobExceedsLimit).

        The condition is set first: a pod whose process has already exited is gone at once,
        and the reconcile that follows must see a finished job, not a missing pod to replace."""
        self.completion_time = self.completion_time or now()
        self.event("PyTorchJobFailed", message)
        _set_job_condition(self.conditions, "Failed", "PyTorchJobFailed", message)
        for pod in list(self.pods.values()):
            self.delete_pod(pod)
        self.clean_up()

    def clean_up(self) -> None:
        """On finish: cleanPodPolicy, replica counts, the TTL (once)."""
        if self.cleaned:
            return
        self.cleaned = True
        policy = self.policy.get("cleanPodPolicy") or "None"
        for pod in list(self.pods.values()):
            if policy == "All" or (policy == "Running" and pod.phase in ("Running", "Pending")):
                self.delete_pod(pod)
        if any(c["type"] == "Succeeded" and c["status"] == "True" for c in self.conditions):
            for counts in self.replica_statuses.values():
                counts["succeeded"] += counts["active"]
                counts["active"] = 0
        ttl = self.policy.get("ttlSecondsAfterFinished")
        if ttl is not None:
            self.after(ttl, lambda: self.fake.remove_job(self, "Background", by="ttl"))

    # - the API object -----------------------------------------------------------------------------

    def read(self) -> dict:
        self.reads += 1
        return self.to_json()

    def to_json(self) -> dict:
        obj = copy.deepcopy(self.manifest)
        status: dict[str, Any] = {
            "conditions": copy.deepcopy(self.conditions),
            "replicaStatuses": {
                rtype: {k: v for k, v in counts.items() if v}
                for rtype, counts in self.replica_statuses.items()
            },
            "startTime": self.start_time,
            "lastReconcileTime": now(),
        }
        if self.completion_time:
            status["completionTime"] = self.completion_time
        obj["status"] = status
        if self.deletion_timestamp:
            obj["metadata"]["deletionTimestamp"] = self.deletion_timestamp
            if self.deleting == "Foreground":
                obj["metadata"]["finalizers"] = ["foregroundDeletion"]
        return obj

    def delete(self, propagation: str | None) -> None:
        """Begin deletion: timers stop, pods are deleted (left running with Orphan)."""
        self.deleting = propagation or "Background"
        self.deletion_timestamp = now()
        for timer in self.timers:
            timer.cancel()
        for pod in list(self.pods.values()):
            if self.deleting == "Orphan":
                pod.owner, pod.on_change = None, None
            else:
                pod.delete()

    def pods_gone(self) -> bool:
        return all(p.gone for p in self.pods.values()) or self.deleting == "Orphan"


class _PlainPod:
    """A pod no controller owns (e.g. the KFP step's own pod): no process, always Running."""

    def __init__(self, namespace: str, name: str, labels: dict[str, str] | None):
        self.namespace, self.name = namespace, name
        self.uid = str(uuid.uuid4())
        self.labels = dict(labels or {})
        self.created = now()
        self.gone = False
        self.deletion_timestamp = None

    @property
    def key(self) -> tuple[str, str]:
        return self.namespace, self.name

    def log_source(self, previous: bool = False):
        return None

    def to_json(self) -> dict:
        return {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "uid": self.uid,
                "creationTimestamp": self.created,
                "labels": dict(self.labels),
            },
            "spec": {
                "containers": [{"name": "main", "image": "kfp-step:test"}],
                "serviceAccountName": SERVICE_ACCOUNT,
            },
            "status": {
                "phase": "Running",
                "podIP": "127.0.0.1",
                "conditions": [
                    {"type": "PodScheduled", "status": "True"},
                    {"type": "Ready", "status": "True"},
                ],
                "containerStatuses": [
                    {
                        "name": "main",
                        "image": "kfp-step:test",
                        "imageID": "",
                        "ready": True,
                        "restartCount": 0,
                        "state": {"running": {"startedAt": self.created}},
                    }
                ],
            },
        }


# --- the server -----------------------------------------------------------------------------------

_LIVE: weakref.WeakSet[FakeKubernetes] = weakref.WeakSet()


@atexit.register
def _kill_leftovers() -> None:
    """No pod process outlives the interpreter, even when a fake was never closed."""
    for fake in list(_LIVE):
        fake.kill_all()


class FakeKubernetes:
    """The fake API server. Use as a context manager; `api_client()` points the client at it.

    pods="scripted" (default): jobs follow `life` (a `JobLife`); pods="process": a PyTorchJob's
    pods run as local processes, each in a directory under `pod_root`, with `base_env` (default:
    `pods.default_base_env()`) as the image's environment; `network` gives pods their addresses
    (default 127.0.0.1). `restart_delay_s` is the kubelet's back-off before restarting a
    container, `grace_s` the termination grace period. `webhook_denials=True` answers operator-
    rule violations as a real cluster's validating webhook does (403, "admission webhook ...
    denied the request: ...") instead of 422. `unschedulable`: the scheduler's message while no
    node fits (pods stay Pending; see `set_unschedulable`).
    """

    def __init__(
        self,
        namespaces=("team-a",),
        secrets: dict[str, dict[str, dict[str, str]]] | None = None,
        forbid=STEP_ROLE_FORBIDS,
        crd_installed: bool = True,
        life: JobLife | None = None,
        *,
        pods: str = "scripted",
        pod_root: Path | None = None,
        base_env: dict[str, str] | None = None,
        network: NetworkHook | None = None,
        restart_delay_s: float = 0.2,
        grace_s: float = 5.0,
        webhook_denials: bool = False,
        trainer_installed: bool = True,
        unschedulable: str | None = None,
    ):
        if pods not in ("scripted", "process"):
            raise ValueError(f"pods must be 'scripted' or 'process', got {pods!r}")
        if pods == "process" and pod_root is None:
            raise ValueError(
                "pods='process' needs pod_root: the directory the pods' own dirs go in"
            )
        self.namespaces = set(namespaces)
        self.secrets = secrets or {}  # namespace -> name -> data (base64, as the API serves it)
        self.config_maps: dict[str, dict[str, dict[str, str]]] = {}  # namespace -> name -> data
        self.forbid = set(forbid)
        self.crd_installed = crd_installed
        self.trainer_installed = trainer_installed
        self.life = life or succeeding(["training", "done"])
        self.mode = pods
        self.pod_root = Path(pod_root) if pod_root is not None else Path("/nonexistent")
        self.base_env = dict(base_env) if base_env is not None else default_base_env()
        self.network = network or NetworkHook()
        self.restart_delay_s = restart_delay_s
        self.grace_s = grace_s
        self.webhook_denials = webhook_denials
        self.unschedulable = unschedulable
        self.jobs: dict[tuple[str, str], _Job | _ProcessJob] = {}  # PyTorchJobs
        self.trainjobs: dict[tuple[str, str], _TrainJob] = {}
        self.pods: dict[tuple[str, str], ProcessPod | _PlainPod] = {}  # process and plain pods
        self.policies: dict[tuple[str, str], dict] = {}  # NetworkPolicies, as stored
        self.events: list[dict] = []
        self.created: list[dict] = []  # PyTorchJob manifests as posted
        self.created_trainjobs: list[dict] = []
        self.created_policies: list[dict] = []
        self.rejected: list[dict] = []  # {"kind", "name", "status"}: what admission refused
        self.deleted: list[dict] = []  # PyTorchJobs deleted by request: namespace, name, policy
        self.deleted_trainjobs: list[dict] = []
        self.collected: list[dict] = []  # deleted by the GC or a TTL: kind, namespace, name, by
        self.requests: list[tuple[str, str, int]] = []  # (method, path, status)
        self.fail_reads: list[int] = []  # statuses the next reads of a job answer with (503, ...)
        self.down = False  # True: every request is dropped (connection closed, no answer)
        self.cond = threading.Condition()
        self.threads: list[threading.Thread] = []
        self.closed = False
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="fake-k8s",
            daemon=True,
        )

    scheme = "http"

    def serve_tls(self, certfile: Path, keyfile: Path) -> None:
        """Answer over TLS with this certificate (before __enter__), as a real API server does:
        in-cluster clients (a pod's service account: token and ca.crt) speak only https."""
        import ssl

        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(str(certfile), str(keyfile))
        self.server.socket = ctx.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https"

    @property
    def host(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.server.server_address[1]}"

    def api_address(self) -> tuple[str, int]:
        return "127.0.0.1", self.server.server_address[1]

    def api_client(self):
        from kubernetes import client

        return client.ApiClient(client.Configuration(host=self.host))

    def __enter__(self) -> FakeKubernetes:
        _LIVE.add(self)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        with self.cond:
            self.closed = True
            for job in [*self.jobs.values(), *self.trainjobs.values()]:
                if isinstance(job, _ProcessJob):
                    for timer in job.timers:
                        timer.cancel()
                else:
                    job.delete()
            self.cond.notify_all()
        self.kill_all()
        for thread in list(self.threads):
            if isinstance(thread, threading.Timer):
                thread.cancel()
            elif thread.is_alive() and thread is not threading.current_thread():
                thread.join(timeout=5)
        self.server.shutdown()
        self.server.server_close()
        _LIVE.discard(self)

    def kill_all(self) -> None:
        """SIGKILL every pod process still running."""
        with self.cond:
            for pod in list(self.pods.values()):
                if isinstance(pod, ProcessPod):
                    pod.force_kill()

    # - the Host side of pods.py -------------------------------------------------------------------

    def track(self, thread: threading.Thread | threading.Timer) -> None:
        self.threads = [t for t in self.threads if t.is_alive()]
        self.threads.append(thread)

    def secret_data(self, namespace: str, name: str) -> dict[str, str] | None:
        data = self.secrets.get(namespace, {}).get(name)
        return decode_secret(data) if data is not None else None

    def config_map_data(self, namespace: str, name: str) -> dict[str, str] | None:
        data = self.config_maps.get(namespace, {}).get(name)
        return dict(data) if data is not None else None

    def pod_changed(self, pod: ProcessPod) -> None:
        self.cond.notify_all()

    def pod_gone(self, pod: ProcessPod) -> None:
        if self.pods.get(pod.key) is pod:
            del self.pods[pod.key]
        if pod.on_change is not None and not self.closed:
            pod.on_change(pod)
        for key, job in list(self.jobs.items()):
            if isinstance(job, _ProcessJob) and job.deleting and job.pods_gone():
                del self.jobs[key]
        self.collect()
        self.cond.notify_all()

    def record_event(
        self,
        namespace: str,
        involved: dict,
        reason: str,
        message: str,
        type_: str = "Normal",
        component: str = "kubelet",
    ) -> None:
        """An Event, counted like the event correlator does when it repeats."""
        with self.cond:
            stamp = now()
            for ev in self.events:
                if (
                    ev["involvedObject"].get("uid") == involved.get("uid")
                    and ev["reason"] == reason
                    and ev["message"] == message
                ):
                    ev["count"] += 1
                    ev["lastTimestamp"] = stamp
                    return
            source = {"component": component}
            if component == "kubelet":
                source["host"] = "fake-node"
            self.events.append(
                {
                    "apiVersion": "v1",
                    "kind": "Event",
                    "metadata": {
                        "name": f"{involved['name']}.{uuid.uuid4().hex[:16]}",
                        "namespace": namespace,
                        "uid": str(uuid.uuid4()),
                        "creationTimestamp": stamp,
                        "resourceVersion": "1",
                    },
                    "involvedObject": dict(involved),
                    "reason": reason,
                    "message": message,
                    "type": type_,
                    "count": 1,
                    "firstTimestamp": stamp,
                    "lastTimestamp": stamp,
                    "eventTime": None,
                    "source": source,
                    "reportingComponent": component,
                    "reportingInstance": "",
                }
            )
            self.cond.notify_all()

    # - scripting ----------------------------------------------------------------------------------

    def add_job(self, manifest: dict, life: JobLife, polls_done: int = 0) -> None:
        """A job that exists before the test starts (an earlier attempt's), always scripted."""
        with self.cond:
            job = _Job(manifest, life, polls_done, fake=self)
            self.jobs[(job.ns, job.name)] = job

    def add_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """A Secret with these plain-text values (served base64-encoded in `data`, as the API
        does). Pods waiting for it start."""
        encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
        with self.cond:
            self.secrets.setdefault(namespace, {})[name] = encoded
            self.retry_waiting_pods()

    def add_config_map(self, namespace: str, name: str, data: dict[str, str]) -> None:
        """A ConfigMap; pods waiting for it start."""
        with self.cond:
            self.config_maps.setdefault(namespace, {})[name] = dict(data)
            self.retry_waiting_pods()

    def add_pod(self, namespace: str, name: str, labels: dict[str, str] | None = None) -> str:
        """A plain Running pod (e.g. the KFP step's own) that other objects may name in their
        ownerReferences; deleting it garbage-collects them. Returns its uid."""
        with self.cond:
            if (namespace, name) in self.pods:
                raise ValueError(f"pod {namespace}/{name} already exists")
            pod = _PlainPod(namespace, name, labels)
            self.pods[pod.key] = pod
            return pod.uid

    def set_unschedulable(self, message: str | None) -> None:
        """While set, new pods stay Pending with this scheduler message; None schedules them."""
        with self.cond:
            self.unschedulable = message
            for pod in list(self.pods.values()):
                if isinstance(pod, ProcessPod) and not pod.gone:
                    pod.schedule()
            self.cond.notify_all()

    def retry_waiting_pods(self) -> None:
        """The kubelet retries containers that wait for a Secret or ConfigMap (env or volume)."""
        for pod in list(self.pods.values()):
            waiting = pod.state.get("waiting", {}) if isinstance(pod, ProcessPod) else {}
            config = waiting.get("reason") == "CreateContainerConfigError"
            if config or waiting.get("message", "").startswith("MountVolume.SetUp failed"):
                pod.try_start()

    def kill_pod(self, name: str, sig: int = signal.SIGKILL, namespace: str | None = None) -> None:
        """Send `sig` to a pod's container process (preemption, OOM kill ...); its restart
        policy applies afterwards."""
        with self.cond:
            self.process_pod(name, namespace).kill(sig)

    def process_pod(self, name: str, namespace: str | None = None) -> ProcessPod:
        with self.cond:
            for (ns, pod_name), pod in self.pods.items():
                if pod_name == name and namespace in (None, ns) and isinstance(pod, ProcessPod):
                    return pod
        raise KeyError(f"no process pod named {name!r}" + (f" in {namespace}" if namespace else ""))

    def pod_dir(self, name: str, namespace: str | None = None) -> Path:
        """The directory a process pod runs in (its filesystem root)."""
        return self.process_pod(name, namespace).dir

    def pod_json(self, name: str, namespace: str | None = None) -> dict:
        with self.cond:
            return self.process_pod(name, namespace).to_json()

    def wait_until(self, predicate, timeout: float = 10.0, what: str = "") -> None:
        """Block until `predicate()` (called under the fake's lock) is true."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while not predicate():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(
                        f"timed out after {timeout:g} s waiting for {what or predicate}"
                    )
                self.cond.wait(min(remaining, 0.1))

    def job_reads(self, name: str, namespace: str = "team-a") -> int:
        with self.cond:
            job = self.jobs.get((namespace, name)) or self.trainjobs.get((namespace, name))
            return job.reads if job else -1

    def requested(self, method: str, fragment: str) -> list[tuple[str, str, int]]:
        return [r for r in self.requests if r[0] == method and fragment in r[1]]

    # - lifecycle of jobs --------------------------------------------------------------------------

    def job_finished(self, job: _Job) -> None:
        """A scripted job reached Succeeded/Failed: its TTL starts."""
        ttl = ((job.manifest.get("spec") or {}).get("runPolicy") or {}).get(
            "ttlSecondsAfterFinished"
        )
        if ttl is None or job.kind != "PyTorchJob":
            return

        def expire():
            with self.cond:
                if self.jobs.get((job.ns, job.name)) is job:
                    self.remove_job(job, "Background", by="ttl")

        timer = threading.Timer(ttl, expire)
        timer.daemon = True
        self.track(timer)
        timer.start()

    def remove_job(self, job, propagation: str | None, by: str) -> None:
        """Delete a job (request, GC or TTL): its pods go, then dependents are collected."""
        table = self.trainjobs if job.kind == "TrainJob" else self.jobs
        key = (job.ns, job.name)
        if table.get(key) is not job:
            return
        if by != "api":
            self.collected.append(
                {"kind": job.kind, "namespace": job.ns, "name": job.name, "by": by}
            )
        job.delete(propagation)
        foreground = isinstance(job, _ProcessJob) and propagation == "Foreground"
        if not (foreground and not job.pods_gone()) and table.get(key) is job:
            del table[key]  # else it stays, with a deletionTimestamp, until its pods are gone
        self.collect()
        self.cond.notify_all()

    def live_uids(self) -> set[tuple[str, str]]:
        """(namespace, uid) of every object that exists."""
        live = {(j.ns, j.uid) for j in [*self.jobs.values(), *self.trainjobs.values()]}
        live |= {(p.namespace, p.uid) for p in self.pods.values() if not p.gone}
        live |= {(ns, p["metadata"]["uid"]) for (ns, _), p in self.policies.items()}
        for job in [*self.jobs.values(), *self.trainjobs.values()]:
            if isinstance(job, _Job):
                live |= {(job.ns, p.uid) for p in job.pods}
        return live

    def orphaned(self, namespace: str, name: str, kind: str, obj: dict, live) -> bool:
        """True when every owner is gone. As the real garbage collector does, an owner in
        another namespace counts as absent (namespaced owners must share the dependent's
        namespace), with an OwnerRefInvalidNamespace event on the dependent."""
        refs = (obj.get("metadata") or {}).get("ownerReferences") or []
        if not refs:
            return False
        elsewhere = {uid for _, uid in live}
        for ref in refs:
            if (namespace, ref.get("uid")) in live:
                return False
            if ref.get("uid") in elsewhere:
                involved = {
                    "kind": kind,
                    "namespace": namespace,
                    "name": name,
                    "uid": obj["metadata"].get("uid", ""),
                }
                message = (
                    f"ownerRef [{ref.get('apiVersion')}/{ref.get('kind')}, namespace: "
                    f"{namespace}, name: {ref.get('name')}, uid: {ref.get('uid')}] does "
                    f'not exist in namespace "{namespace}"'
                )
                self.record_event(
                    namespace,
                    involved,
                    "OwnerRefInvalidNamespace",
                    message,
                    "Warning",
                    "garbage-collector-controller",
                )
        return True

    def collect(self) -> None:
        """The garbage collector: delete what only gone owners own, until nothing changes."""
        changed = True
        while changed:
            changed = False
            live = self.live_uids()
            for table in (self.jobs, self.trainjobs):
                for job in list(table.values()):
                    if getattr(job, "deleting", None):
                        continue
                    if self.orphaned(job.ns, job.name, job.kind, job.manifest, live):
                        self.remove_job(job, "Background", by="gc")
                        changed = True
            for key, policy in list(self.policies.items()):
                if self.orphaned(key[0], key[1], "NetworkPolicy", policy, live):
                    del self.policies[key]
                    self.collected.append(
                        {"kind": "NetworkPolicy", "namespace": key[0], "name": key[1], "by": "gc"}
                    )
                    changed = True

    # - the API ------------------------------------------------------------------------------------

    def forbidden(self, verb: str, resource: str, ns: str, name: str | None, group: str = ""):
        what = f"{resource}{'.' + group if group else ''}"
        subject = f'{what} "{name}"' if name else what
        return 403, status(
            403,
            "Forbidden",
            f'{subject} is forbidden: User "system:serviceaccount:{ns}:{SERVICE_ACCOUNT}" '
            f'cannot {verb} resource "{resource}" in API group "{group}" in the namespace "{ns}"',
            {"name": name, "kind": resource, "group": group},
        )

    def handle(self, method: str, path: str, query: dict, body: bytes):
        """Returns (status, json) or (200, _Stream)."""
        if path.startswith(GROUP_PATH):
            if not self.crd_installed:
                return 404, "404 page not found\n"
            m = re.fullmatch(r"([^/]+)/pytorchjobs(?:/([^/]+))?", path[len(GROUP_PATH) :])
            if not m:
                return 404, "404 page not found\n"
            return self.pytorchjobs(method, m.group(1), m.group(2), query, body)
        if path.startswith(TRAINER_PATH):
            m = re.fullmatch(r"([^/]+)/trainjobs(?:/([^/]+))?", path[len(TRAINER_PATH) :])
            if not self.trainer_installed or not m:
                return 404, "404 page not found\n"
            return self.jobs_api(api.TRAINJOB, method, m.group(1), m.group(2), query, body)
        if path.startswith(NETWORKING_PATH):
            m = re.fullmatch(r"([^/]+)/networkpolicies(?:/([^/]+))?", path[len(NETWORKING_PATH) :])
            if not m:
                return 404, "404 page not found\n"
            return self.networkpolicies(method, m.group(1), m.group(2), query, body)
        if path.startswith(CORE_PATH):
            rest = path[len(CORE_PATH) :]
            if m := re.fullmatch(r"([^/]+)/pods", rest):
                return self.list_pods(m.group(1), query) if method == "GET" else (405, {})
            if m := re.fullmatch(r"([^/]+)/pods/([^/]+)", rest):
                return self.one_pod(method, m.group(1), m.group(2), query, body)
            if m := re.fullmatch(r"([^/]+)/pods/([^/]+)/log", rest):
                return self.pod_log(m.group(1), m.group(2), query)
            if m := re.fullmatch(r"([^/]+)/secrets/([^/]+)", rest):
                return self.read_secret(m.group(1), m.group(2))
            if m := re.fullmatch(r"([^/]+)/configmaps/([^/]+)", rest):
                return self.read_config_map(m.group(1), m.group(2))
            if m := re.fullmatch(r"([^/]+)/events", rest):
                return self.list_events(m.group(1), query) if method == "GET" else (405, {})
        return 404, "404 page not found\n"

    def authorize(self, method: str, plural: str, ns: str, name: str | None, group: str = ""):
        """(verb, None), or (verb, the 405 or 403 answer) for a collection or one object."""
        verb = {"GET": "get" if name else "list", "POST": "create", "DELETE": "delete"}.get(method)
        if verb is None or (verb == "create" and name):
            return verb, (405, status(
                405, "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            ))  # fmt: skip
        if (verb, plural) in self.forbid:
            return verb, self.forbidden(verb, plural, ns, name, group)
        return verb, None

    def pytorchjobs(self, method: str, ns: str, name: str | None, query: dict, body: bytes):
        return self.jobs_api(api.PYTORCHJOB, method, ns, name, query, body)

    def jobs_api(
        self, kind: tuple, method: str, ns: str, name: str | None, query: dict, body: bytes
    ):
        group, version, kind_name, plural = kind
        table = self.trainjobs if kind_name == "TrainJob" else self.jobs
        details = {"group": group, "kind": plural}
        verb, refusal = self.authorize(method, plural, ns, name, group)
        if refusal:
            return refusal
        with self.cond:
            if verb == "list":
                items = [j.to_json() for (n, _), j in table.items() if n == ns]
                return 200, {
                    "apiVersion": f"{group}/{version}",
                    "kind": f"{kind_name}List",
                    "metadata": {"resourceVersion": "1"},
                    "items": items,
                }
            if verb == "create":
                return self.create_job(kind, ns, body)
            job = table.get((ns, name))
            if job is None:
                return 404, status(
                    404,
                    "NotFound",
                    f'{plural}.{group} "{name}" not found',
                    {"name": name, **details},
                )
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
            record = {"namespace": ns, "name": name, "propagationPolicy": policy}
            (self.deleted_trainjobs if kind_name == "TrainJob" else self.deleted).append(record)
            self.remove_job(job, policy, by="api")
            return 200, status(200, "", "", {"name": name, **details, "uid": job.uid}, "Success")

    def create_job(self, kind: tuple, ns: str, body: bytes):
        group, version, kind_name, plural = kind
        table = self.trainjobs if kind_name == "TrainJob" else self.jobs
        try:
            manifest = json.loads(body)
        except ValueError as err:
            return 400, status(400, "BadRequest", f"the request body is not JSON: {err}")
        if not isinstance(manifest, dict):
            return 400, status(400, "BadRequest", "the request body is not a JSON object")
        if manifest.get("apiVersion") != f"{group}/{version}" or manifest.get("kind") != kind_name:
            return 400, status(
                400,
                "BadRequest",
                f"the API version in the data ({manifest.get('apiVersion')}) "
                f"and kind ({manifest.get('kind')}) do not match the expected "
                f"{group}/{version} {kind_name}",
            )
        meta = (
            manifest.setdefault("metadata", {})
            if isinstance(manifest.get("metadata", {}), dict)
            else None
        )
        if meta is not None and meta.get("namespace") not in (None, ns):
            return 400, status(
                400,
                "BadRequest",
                "the namespace of the provided object does not match "
                "the namespace sent on the request",
            )
        name = meta.get("name") if meta else None
        if ns not in self.namespaces:
            return 404, status(
                404, "NotFound", f'namespaces "{ns}" not found', {"name": ns, "kind": "namespaces"}
            )
        if meta is not None:
            meta["namespace"] = ns
        validate = api.validate_trainjob if kind_name == "TrainJob" else api.validate_pytorchjob
        causes = validate(manifest)
        if causes:
            if self.webhook_denials and all(c.layer == "webhook" for c in causes):
                webhook = api.TRAINJOB_WEBHOOK if kind_name == "TrainJob" else api.PYTORCH_WEBHOOK
                body_ = api.webhook_denied_status(webhook, causes)
            else:
                body_ = api.invalid_status(kind_name, group, name, causes)
            self.rejected.append({"kind": kind_name, "name": name, "status": body_})
            return body_["code"], body_
        if (ns, name) in table:
            return 409, status(
                409,
                "AlreadyExists",
                f'{plural}.{group} "{name}" already exists',
                {"name": name, "group": group, "kind": plural},
            )
        posted = copy.deepcopy(manifest)
        if kind_name == "TrainJob":
            self.created_trainjobs.append(posted)
            job = _TrainJob(manifest, self.life, fake=self)
        elif self.mode == "process":
            self.created.append(posted)
            job = _ProcessJob(self, manifest)
        else:
            self.created.append(posted)
            job = _Job(manifest, self.life, fake=self)
        table[(ns, name)] = job
        if isinstance(job, _ProcessJob):
            job.reconcile()
        self.collect()  # owners that do not exist: the GC deletes it at once, as a cluster's does
        return 201, job.to_json()

    def networkpolicies(self, method: str, ns: str, name: str | None, query: dict, body: bytes):
        group, plural = "networking.k8s.io", "networkpolicies"
        verb, refusal = self.authorize(method, plural, ns, name, group)
        if refusal:
            return refusal
        with self.cond:
            if verb == "list":
                selector = (query.get("labelSelector") or [""])[0]
                items = [
                    copy.deepcopy(p)
                    for (n, _), p in self.policies.items()
                    if n == ns and _selects(selector, p["metadata"].get("labels") or {})
                ]
                return 200, {
                    "apiVersion": "networking.k8s.io/v1",
                    "kind": "NetworkPolicyList",
                    "metadata": {"resourceVersion": "1"},
                    "items": items,
                }
            if verb == "create":
                try:
                    policy = json.loads(body)
                except ValueError as err:
                    return 400, status(400, "BadRequest", f"the request body is not JSON: {err}")
                if not isinstance(policy, dict):
                    return 400, status(400, "BadRequest", "the request body is not a JSON object")
                if ns not in self.namespaces:
                    return 404, status(
                        404,
                        "NotFound",
                        f'namespaces "{ns}" not found',
                        {"name": ns, "kind": "namespaces"},
                    )
                policy.setdefault("metadata", {})["namespace"] = ns
                causes = api.validate_networkpolicy(policy)
                new_name = (policy.get("metadata") or {}).get("name")
                if causes:
                    body_ = api.invalid_status("NetworkPolicy", group, new_name, causes)
                    self.rejected.append(
                        {"kind": "NetworkPolicy", "name": new_name, "status": body_}
                    )
                    return 422, body_
                if (ns, new_name) in self.policies:
                    return 409, status(
                        409,
                        "AlreadyExists",
                        f'{plural}.{group} "{new_name}" already exists',
                        {"name": new_name, "group": group, "kind": plural},
                    )
                self.created_policies.append(copy.deepcopy(policy))
                policy["metadata"].update(
                    uid=str(uuid.uuid4()),
                    creationTimestamp=now(),
                    resourceVersion="1",
                    generation=1,
                )
                self.policies[(ns, new_name)] = policy
                self.collect()
                return 201, copy.deepcopy(policy)
            policy = self.policies.get((ns, name))
            if policy is None:
                return 404, status(
                    404,
                    "NotFound",
                    f'{plural}.{group} "{name}" not found',
                    {"name": name, "group": group, "kind": plural},
                )
            if verb == "get":
                return 200, copy.deepcopy(policy)
            del self.policies[(ns, name)]
            self.collect()
            return 200, status(
                200,
                "",
                "",
                {"name": name, "group": group, "kind": plural, "uid": policy["metadata"]["uid"]},
                "Success",
            )

    def all_pods(self, ns: str) -> list:
        """Every pod of the namespace: scripted jobs' pods, process pods and plain pods."""
        pods = [
            p
            for j in [*self.jobs.values(), *self.trainjobs.values()]
            if isinstance(j, _Job) and j.ns == ns
            for p in j.pods
        ]
        return pods + [p for (n, _), p in self.pods.items() if n == ns and not p.gone]

    def find_pod(self, ns: str, name: str):
        for pod in self.all_pods(ns):
            if pod.name == name:
                return pod
        return None

    def list_pods(self, ns: str, query: dict):
        if ("list", "pods") in self.forbid:
            return self.forbidden("list", "pods", ns, None)
        selector = (query.get("labelSelector") or [""])[0]
        with self.cond:
            pods = [p.to_json() for p in self.all_pods(ns)]
        items = [p for p in pods if _selects(selector, p["metadata"].get("labels") or {})]
        return 200, {
            "apiVersion": "v1",
            "kind": "PodList",
            "metadata": {"resourceVersion": "1"},
            "items": items,
        }

    def one_pod(self, method: str, ns: str, name: str, query: dict, body: bytes):
        verb = {"GET": "get", "DELETE": "delete"}.get(method)
        if verb is None:
            return 405, status(
                405,
                "MethodNotAllowed",
                "the server does not allow this method on the requested resource",
            )
        if (verb, "pods") in self.forbid:
            return self.forbidden(verb, "pods", ns, name)
        with self.cond:
            pod = self.find_pod(ns, name)
            if pod is None:
                return 404, status(
                    404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}
                )
            if verb == "get":
                return 200, pod.to_json()
            options = json.loads(body) if body else {}
            grace = (query.get("gracePeriodSeconds") or [options.get("gracePeriodSeconds")])[0]
            if isinstance(pod, ProcessPod):
                pod.delete(None if grace is None else float(grace))
            elif isinstance(pod, _PlainPod):
                pod.gone = True
                del self.pods[pod.key]
            else:  # a scripted job's pod: the operator makes a new one in its place
                pod.gone = True
                if pod is pod.job.master:
                    pod.job.master = pod.job.new_master()
                else:
                    pod.job.workers[pod.job.workers.index(pod)] = _Pod(
                        pod.job, pod.replica, pod.index
                    )
            self.collect()
            self.cond.notify_all()
            return 200, pod.to_json()

    def pod_log(self, ns: str, name: str, query: dict):
        if ("get", "pods/log") in self.forbid:
            return self.forbidden("get", "pods/log", ns, name)
        try:
            previous, follow = _flag(query, "previous"), _flag(query, "follow")
        except ValueError as err:
            return 400, status(400, "BadRequest", str(err))
        with self.cond:
            pod = self.find_pod(ns, name)
            if pod is None:
                return 404, status(
                    404, "NotFound", f'pods "{name}" not found', {"name": name, "kind": "pods"}
                )
            container = (query.get("container") or [None])[0]
            own = getattr(pod, "container_name", None) or getattr(pod, "container", "main")
            if container and container != own:
                return 400, status(
                    400, "BadRequest", f"container {container} is not valid for pod {name}"
                )
            if isinstance(pod, _Pod):
                if pod.scheduled[0] != "True":
                    return 400, status(
                        400, "BadRequest", f"pod {name} does not have a host assigned"
                    )
                if previous:
                    return 400, status(
                        400,
                        "BadRequest",
                        f'previous terminated container "{own}" in pod "{name}" not found',
                    )
                if "waiting" in pod.state:
                    reason = pod.state["waiting"].get("reason", "")
                    return 400, status(
                        400,
                        "BadRequest",
                        f'container "{own}" in pod "{name}" is waiting to start: {reason}',
                    )
                source = pod
            else:
                source = pod.log_source(previous)
                if source is None:
                    if previous:
                        return 400, status(
                            400,
                            "BadRequest",
                            f'previous terminated container "{own}" in pod "{name}" not found',
                        )
                    if isinstance(pod, ProcessPod) and (
                        not pod.scheduled or pod.scheduled[0] != "True"
                    ):
                        return 400, status(
                            400, "BadRequest", f"pod {name} does not have a host assigned"
                        )
                    if isinstance(pod, _PlainPod):
                        return 200, ""
                    reason = pod.state.get("waiting", {}).get("reason", "ContainerCreating")
                    return 400, status(
                        400,
                        "BadRequest",
                        f'container "{own}" in pod "{name}" is waiting to start: {reason}',
                    )
            lines = list(source.lines)
        if follow:
            return 200, _Stream(self, source)
        tail = query.get("tailLines")
        if tail:
            lines = lines[-int(tail[0]) :] if int(tail[0]) else []
        return 200, "".join(f"{line}\n" for line in lines)

    def read_secret(self, ns: str, name: str):
        if ("get", "secrets") in self.forbid:
            return self.forbidden("get", "secrets", ns, name)
        data = self.secrets.get(ns, {}).get(name)
        if data is None:
            return 404, status(
                404, "NotFound", f'secrets "{name}" not found', {"name": name, "kind": "secrets"}
            )
        return 200, {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {"name": name, "namespace": ns},
            "data": dict(data),
        }

    def read_config_map(self, ns: str, name: str):
        if ("get", "configmaps") in self.forbid:
            return self.forbidden("get", "configmaps", ns, name)
        data = self.config_maps.get(ns, {}).get(name)
        if data is None:
            return 404, status(
                404,
                "NotFound",
                f'configmaps "{name}" not found',
                {"name": name, "kind": "configmaps"},
            )
        return 200, {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": ns},
            "data": dict(data),
        }

    def list_events(self, ns: str, query: dict):
        if ("list", "events") in self.forbid:
            return self.forbidden("list", "events", ns, None)
        try:
            wanted = _field_selector((query.get("fieldSelector") or [""])[0])
        except ValueError as err:
            return 400, status(400, "BadRequest", str(err))
        with self.cond:
            items = [
                copy.deepcopy(e)
                for e in self.events
                if e["metadata"]["namespace"] == ns
                and all((_event_field(e, k) == v) == equal for k, v, equal in wanted)
            ]
        return 200, {
            "apiVersion": "v1",
            "kind": "EventList",
            "metadata": {"resourceVersion": "1"},
            "items": items,
        }


def _flag(query: dict, name: str) -> bool:
    """A boolean query parameter as the API server parses it (Go's strconv.ParseBool): the
    Python client sends `True`, curl users `true` or `1`."""
    value = (query.get(name) or ["false"])[0]
    if value in ("1", "t", "T", "TRUE", "true", "True"):
        return True
    if value in ("0", "f", "F", "FALSE", "false", "False", ""):
        return False
    raise ValueError(f"invalid boolean {value!r} for {name}")


_EVENT_FIELDS = (
    "involvedObject.kind",
    "involvedObject.namespace",
    "involvedObject.name",
    "involvedObject.uid",
    "involvedObject.apiVersion",
    "involvedObject.resourceVersion",
    "involvedObject.fieldPath",
    "reason",
    "reportingComponent",
    "source",
    "type",
    "metadata.name",
    "metadata.namespace",
)


def _field_selector(text: str) -> list[tuple[str, str, bool]]:
    """`a=b,c!=d` -> [(a, b, True), (c, d, False)], refusing fields events cannot select on."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        m = re.fullmatch(r"([^=!]+)(==|=|!=)(.*)", part)
        if not m:
            raise ValueError(f"invalid field selector: {part!r}")
        if m.group(1) not in _EVENT_FIELDS:
            raise ValueError(
                f'"{m.group(1)}" is not a known field selector: only "{", ".join(_EVENT_FIELDS)}"'
            )
        out.append((m.group(1), m.group(3), m.group(2) != "!="))
    return out


def _event_field(event: dict, key: str) -> str:
    if key == "source":
        return event["source"].get("component", "")
    head, _, tail = key.partition(".")
    value = event.get(head) if not tail else (event.get(head) or {}).get(tail)
    return "" if value is None else str(value)


def _selects(selector: str, labels: dict[str, str]) -> bool:
    """A label selector's equality and existence terms: k=v, k==v, k!=v, k, !k."""
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if m := re.fullmatch(r"([^=!]+)(==|=|!=)(.*)", term):
            key, op, value = m.group(1).strip(), m.group(2), m.group(3).strip()
            if (labels.get(key) == value) != (op != "!="):
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


class _Stream:
    """A followed log: one container instance's lines as they are written, until it ends."""

    def __init__(self, fake: FakeKubernetes, source):
        self.fake, self.source = fake, source

    def lines(self):
        sent = 0
        while True:
            with self.fake.cond:
                while sent == len(self.source.lines) and not self.finished():
                    self.fake.cond.wait(0.5)
                new = self.source.lines[sent:]
                done = self.finished() and sent + len(new) == len(self.source.lines)
            yield from new
            sent += len(new)
            if done:
                return

    def finished(self) -> bool:
        return self.fake.closed or self.source.log_done()


def status(
    code: int, reason: str, message: str, details: dict | None = None, outcome: str = "Failure"
) -> dict:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": outcome,
        "message": message,
        "reason": reason,
        "details": details or {},
        "code": code,
    }


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
            try:
                code, payload = fake.handle(self.command, url.path, parse_qs(url.query), body)
            except Exception as exc:  # noqa: BLE001 - a bug in the fake: say so, do not hang up
                code = 500
                payload = status(500, "InternalError", f"the fake API server failed: {exc!r}")
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
