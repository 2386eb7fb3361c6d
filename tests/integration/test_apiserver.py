"""The stand-in API server and operators (tests/cluster_sim): what they refuse at create time,
the API surface other code relies on, and PyTorchJobs whose pods run as local processes.

Every request goes through the kubernetes client over HTTP, as the launcher's do.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import sys
import time

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from tests.cluster_sim.apiserver import FakeKubernetes, JobLife, Step, succeeding

NS = "team-a"
KF = ("kubeflow.org", "v1", "pytorchjobs")
TJ = ("trainer.kubeflow.org", "v1alpha1", "trainjobs")
UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."
PORT = 29511


def container(command: list[str], **extra) -> dict:
    return {"name": "pytorch", "image": "visionflow-train:test", "command": command, **extra}


def pytorchjob(
    name: str = "demo",
    workers: int = 1,
    ctr: dict | None = None,
    restart: str = "OnFailure",
    volumes: list | None = None,
    **run_policy,
) -> dict:
    """A valid PyTorchJob: a Master and `workers` Workers running `ctr`."""
    ctr = ctr or container(["python", "-c", "print('hi')"])
    template = {
        "metadata": {"labels": {"app": "demo"}},
        "spec": {"containers": [ctr], "volumes": volumes or []},
    }
    specs = {"Master": {"replicas": 1, "restartPolicy": restart, "template": template}}
    if workers:
        specs["Worker"] = {
            "replicas": workers,
            "restartPolicy": restart,
            "template": copy.deepcopy(template),
        }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {"name": name, "labels": {"app": "demo"}},
        "spec": {
            "nprocPerNode": "1",
            "runPolicy": {"cleanPodPolicy": "Running", "backoffLimit": 3, **run_policy},
            "pytorchReplicaSpecs": specs,
        },
    }


def trainjob(name: str = "tj", nodes: int = 2) -> dict:
    return {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": name},
        "spec": {
            "runtimeRef": {"name": "torch-distributed"},
            "trainer": {
                "image": "visionflow-train:test",
                "command": ["visionflow", "train"],
                "numNodes": nodes,
                "env": [{"name": "RUN_ID", "value": "t1"}],
                "resourcesPerNode": {"limits": {"cpu": 2, "memory": "8Gi"}},
            },
        },
    }


def apis(fake: FakeKubernetes):
    api = fake.api_client()
    return client.CustomObjectsApi(api), client.CoreV1Api(api)


def create(fake: FakeKubernetes, obj: dict, kind=KF) -> dict:
    custom, _ = apis(fake)
    return custom.create_namespaced_custom_object(kind[0], kind[1], NS, kind[2], obj)


def get_job(fake: FakeKubernetes, name: str, kind=KF) -> dict:
    custom, _ = apis(fake)
    return custom.get_namespaced_custom_object(kind[0], kind[1], NS, kind[2], name)


def refused(fake: FakeKubernetes, obj: dict, kind=KF) -> tuple[int, dict]:
    with pytest.raises(ApiException) as err:
        create(fake, obj, kind)
    return err.value.status, json.loads(err.value.body)


def conditions(job: dict) -> dict[str, dict]:
    return {c["type"]: c for c in job["status"].get("conditions") or []}


def eventually(check, timeout: float = 15.0, what: str = ""):
    """Poll `check()` until it returns something truthy (exceptions count as not yet)."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            result = check()
            if result:
                return result
            last = result
        except (AssertionError, ApiException, KeyError, IndexError, ValueError) as exc:
            last = exc
        if time.monotonic() > deadline:
            raise AssertionError(f"{what or check} still not true after {timeout:g} s: {last!r}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def fake():
    with FakeKubernetes(namespaces=(NS, "kubeflow"), forbid=()) as f:
        yield f


@pytest.fixture
def procs(tmp_path):
    with FakeKubernetes(
        namespaces=(NS,),
        forbid=(),
        pods="process",
        pod_root=tmp_path / "pods",
        restart_delay_s=0.1,
        grace_s=2.0,
    ) as f:
        yield f


# --- admission -----------------------------------------------------------------------------------

MASTER = "spec.pytorchReplicaSpecs.Master"
MASTER_CTR = f"{MASTER}.template.spec.containers[0]"


def _set(path: str, value):
    def edit(job: dict) -> None:
        *parents, last = path.split("/")
        node = job
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        if value is _DELETE:
            del node[last]
        else:
            node[last] = value

    return edit


_DELETE = object()
_CTR = "spec/pytorchReplicaSpecs/Master/template/spec/containers/0"

PYTORCHJOB_MISTAKES = [
    # the schema: unknown fields, missing required ones, wrong types, at any depth
    (
        "unknown field",
        _set("spec/runPolicy/backofLimit", 2),
        "spec.runPolicy.backofLimit",
        "FieldValueInvalid",
        "field not declared in schema",
    ),
    (
        "unknown field in a container",
        _set(f"{_CTR}/imagee", "x"),
        f"{MASTER_CTR}.imagee",
        "FieldValueInvalid",
        "field not declared in schema",
    ),
    (
        "missing container name",
        _set(f"{_CTR}/name", _DELETE),
        f"{MASTER_CTR}.name",
        "FieldValueRequired",
        "Required value",
    ),
    (
        "missing runPolicy",
        _set("spec/runPolicy", _DELETE),
        "spec.runPolicy",
        "FieldValueRequired",
        "Required value",
    ),
    (
        "missing name",
        _set("metadata/name", _DELETE),
        "metadata.name",
        "FieldValueRequired",
        "name or generateName is required",
    ),
    (
        "replicas as a string",
        _set("spec/pytorchReplicaSpecs/Master/replicas", "1"),
        f"{MASTER}.replicas",
        "FieldValueTypeInvalid",
        "must be of type integer",
    ),
    (
        "env value as a number",
        _set(f"{_CTR}/env", [{"name": "X", "value": 5}]),
        f"{MASTER_CTR}.env[0].value",
        "FieldValueTypeInvalid",
        "must be of type string",
    ),
    (
        "a malformed quantity",
        _set(f"{_CTR}/resources", {"limits": {"memory": "16GB"}}),
        f"{MASTER_CTR}.resources.limits.memory",
        "FieldValueInvalid",
        "should match",
    ),
    # the operator's rules
    (
        "a replica type it does not know",
        _set(
            "spec/pytorchReplicaSpecs/Chief",
            {"replicas": 1, "template": {"spec": {"containers": [container(["x"])]}}},
        ),
        "spec.pytorchReplicaSpecs[Chief]",
        "FieldValueNotSupported",
        'supported values: "Master", "Worker"',
    ),
    (
        "two Masters",
        _set("spec/pytorchReplicaSpecs/Master/replicas", 2),
        "spec.pytorchReplicaSpecs[Master].replicas",
        "FieldValueForbidden",
        "must be 1",
    ),
    (
        "no Workers in a Worker spec",
        _set("spec/pytorchReplicaSpecs/Worker/replicas", 0),
        "spec.pytorchReplicaSpecs[Worker].replicas",
        "FieldValueForbidden",
        "must be at least 1",
    ),
    (
        "no container named pytorch",
        _set(f"{_CTR}/name", "trainer"),
        "spec.pytorchReplicaSpecs[Master].template.spec.containers",
        "FieldValueRequired",
        "must have at least one container with name pytorch",
    ),
    (
        "an empty image",
        _set(f"{_CTR}/image", ""),
        "spec.pytorchReplicaSpecs[Master].template.spec.containers[0].image",
        "FieldValueRequired",
        "must be required",
    ),
    (
        "an unknown restart policy",
        _set("spec/pytorchReplicaSpecs/Master/restartPolicy", "Sometimes"),
        "spec.pytorchReplicaSpecs[Master].restartPolicy",
        "FieldValueNotSupported",
        'supported values: "Always", "OnFailure", "Never", "ExitCode"',
    ),
    (
        "an unknown cleanPodPolicy",
        _set("spec/runPolicy/cleanPodPolicy", "Finished"),
        "spec.runPolicy.cleanPodPolicy",
        "FieldValueNotSupported",
        '"None", "Running", "All"',
    ),
    (
        "a negative backoffLimit",
        _set("spec/runPolicy/backoffLimit", -1),
        "spec.runPolicy.backoffLimit",
        "FieldValueInvalid",
        "must be greater than or equal to 0",
    ),
    (
        "a negative TTL",
        _set("spec/runPolicy/ttlSecondsAfterFinished", -5),
        "spec.runPolicy.ttlSecondsAfterFinished",
        "FieldValueInvalid",
        "greater than or equal to 0",
    ),
    (
        "a negative deadline",
        _set("spec/runPolicy/activeDeadlineSeconds", -1),
        "spec.runPolicy.activeDeadlineSeconds",
        "FieldValueInvalid",
        "greater than or equal to 0",
    ),
    (
        "a name starting with a digit",
        _set("metadata/name", "9demo"),
        "metadata.name",
        "FieldValueInvalid",
        "DNS-1035 label",
    ),
    (
        "an unknown manager",
        _set("spec/runPolicy/managedBy", "me"),
        "spec.runPolicy.managedBy",
        "FieldValueNotSupported",
        "kubeflow.org/training-operator",
    ),
    (
        "nprocPerNode not a count",
        _set("spec/nprocPerNode", "many"),
        "spec.nprocPerNode",
        "FieldValueInvalid",
        "auto, cpu, gpu or an integer",
    ),
]


@pytest.mark.parametrize(
    ("mistake", "edit", "field", "reason", "text"),
    PYTORCHJOB_MISTAKES,
    ids=[m[0] for m in PYTORCHJOB_MISTAKES],
)
def test_an_invalid_pytorchjob_is_refused_with_422_naming_the_field(
    fake, mistake, edit, field, reason, text
):
    job = pytorchjob()
    edit(job)

    code, body = refused(fake, job)

    assert code == 422
    assert body["kind"] == "Status" and body["reason"] == "Invalid" and body["code"] == 422
    assert body["details"]["kind"] == "PyTorchJob" and body["details"]["group"] == "kubeflow.org"
    name = job["metadata"].get("name", "")
    assert body["message"].startswith(f'PyTorchJob.kubeflow.org "{name}" is invalid: ')
    matching = [c for c in body["details"]["causes"] if c["field"] == field]
    assert matching, f"no cause for {field}: {body['details']['causes']}"
    assert matching[0]["reason"] == reason
    assert text in matching[0]["message"]
    assert f"{field}: " in body["message"]
    assert fake.jobs == {} and fake.created == []
    assert fake.rejected[-1]["kind"] == "PyTorchJob"


def test_several_mistakes_are_all_reported(fake):
    job = pytorchjob()
    job["spec"]["runPolicy"]["backofLimit"] = 1
    job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "one"

    code, body = refused(fake, job)

    assert code == 422
    fields = {c["field"] for c in body["details"]["causes"]}
    assert fields == {"spec.runPolicy.backofLimit", f"{MASTER}.replicas"}
    assert body["message"].count(": Invalid value") == 2 and "is invalid: [" in body["message"]


def test_webhook_denials_answer_as_a_real_cluster_does():
    with FakeKubernetes(namespaces=(NS,), forbid=(), webhook_denials=True) as f:
        job = pytorchjob()
        job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = 2
        code, body = refused(f, job)
        assert code == 403 and body["reason"] == "Forbidden"
        assert body["message"] == (
            'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the '
            "request: spec.pytorchReplicaSpecs[Master].replicas: Forbidden: must be 1"
        )
        job["spec"]["pytorchReplicaSpecs"]["Master"]["replicas"] = "2"  # the schema: still 422
        assert refused(f, job)[0] == 422


def test_the_builders_pytorchjob_is_accepted(fake):
    from visionflow.cluster.pytorchjob import build_pytorchjob
    from visionflow.core.config import load_config

    cfg = load_config(
        [
            "storage=minio",
            "tracking=server",
            "storage.root=s3://visionflow",
            "tracking.uri=http://127.0.0.1:5000",
            "cluster.nodes=2",
            "run_id=t1",
        ]
    )
    job = build_pytorchjob(cfg, [])
    custom, _ = apis(fake)
    ns = job["metadata"].get("namespace", NS)  # unset: the launcher fills in its own namespace

    created = custom.create_namespaced_custom_object("kubeflow.org", "v1", ns, "pytorchjobs", job)

    assert created["metadata"]["name"] == job["metadata"]["name"] and created["metadata"]["uid"]
    assert fake.rejected == []
    assert [c["spec"] for c in fake.created] == [job["spec"]]


TRAINJOB_MISTAKES = [
    (
        "unknown field",
        _set("spec/trainer/gpus", 8),
        "spec.trainer.gpus",
        "FieldValueInvalid",
        "field not declared in schema",
    ),
    (
        "missing runtimeRef",
        _set("spec/runtimeRef", _DELETE),
        "spec.runtimeRef",
        "FieldValueRequired",
        "Required value",
    ),
    (
        "missing runtimeRef name",
        _set("spec/runtimeRef/name", _DELETE),
        "spec.runtimeRef.name",
        "FieldValueRequired",
        "Required value",
    ),
    (
        "numNodes as a string",
        _set("spec/trainer/numNodes", "2"),
        "spec.trainer.numNodes",
        "FieldValueTypeInvalid",
        "must be of type integer",
    ),
    (
        "a malformed quantity",
        _set("spec/trainer/resourcesPerNode", {"limits": {"cpu": "two"}}),
        "spec.trainer.resourcesPerNode.limits.cpu",
        "FieldValueInvalid",
        "should match",
    ),
    (
        "a name that is no RFC 1035 label",
        _set("metadata/name", "9tj"),
        "metadata.name",
        "FieldValueInvalid",
        "must match RFC 1035 DNS label format",
    ),
    (
        "zero nodes",
        _set("spec/trainer/numNodes", 0),
        "spec.trainer.numNodes",
        "FieldValueInvalid",
        "greater than or equal to 1",
    ),
    (
        "a zero deadline",
        _set("spec/activeDeadlineSeconds", 0),
        "spec.activeDeadlineSeconds",
        "FieldValueInvalid",
        "greater than or equal to 1",
    ),
    (
        "an unknown manager",
        _set("spec/managedBy", "me"),
        "spec.managedBy",
        "FieldValueInvalid",
        "ManagedBy must be",
    ),
    (
        "torchrun's env set by hand",
        _set("spec/trainer/env", [{"name": "PET_NNODES", "value": "4"}]),
        "spec.trainer.env",
        "FieldValueInvalid",
        "must not have reserved envs: ['PET_NNODES']",
    ),
    (
        "an unknown runtime kind",
        _set("spec/runtimeRef/kind", "Runtime"),
        "spec.runtimeRef",
        "FieldValueInvalid",
        "unsupported runtime: Runtime.trainer.kubeflow.org",
    ),
]


@pytest.mark.parametrize(
    ("mistake", "edit", "field", "reason", "text"),
    TRAINJOB_MISTAKES,
    ids=[m[0] for m in TRAINJOB_MISTAKES],
)
def test_an_invalid_trainjob_is_refused_with_422_naming_the_field(
    fake, mistake, edit, field, reason, text
):
    job = trainjob()
    edit(job)

    code, body = refused(fake, job, TJ)

    assert code == 422 and body["reason"] == "Invalid"
    assert body["details"]["kind"] == "TrainJob"
    assert body["details"]["group"] == "trainer.kubeflow.org"
    assert body["message"].startswith(
        f'TrainJob.trainer.kubeflow.org "{job["metadata"]["name"]}" is invalid: '
    )
    matching = [c for c in body["details"]["causes"] if c["field"] == field]
    assert matching, f"no cause for {field}: {body['details']['causes']}"
    assert matching[0]["reason"] == reason and text in matching[0]["message"]
    assert fake.trainjobs == {} and fake.created_trainjobs == []


def test_a_networkpolicy_is_validated_against_kubernetes_1_30(fake):
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "p"},
        "spec": {"podSelector": {}, "policyTypes": ["Ingress"], "ingresss": []},
    }
    net = client.NetworkingV1Api(fake.api_client())

    with pytest.raises(ApiException) as err:
        net.create_namespaced_network_policy(NS, policy)

    body = json.loads(err.value.body)
    assert err.value.status == 422 and body["details"]["kind"] == "NetworkPolicy"
    assert [(c["field"], c["reason"]) for c in body["details"]["causes"]] == [
        ("spec.ingresss", "FieldValueInvalid")
    ]
    assert "field not declared in schema" in body["message"]
    assert fake.policies == {}


# --- the API surface ------------------------------------------------------------------------------


def test_secrets_and_config_maps_read_as_the_api_serves_them(fake):
    fake.add_secret(NS, "creds", {"AWS_ACCESS_KEY_ID": "key-id"})
    fake.add_config_map(NS, "settings", {"level": "debug"})
    _, core = apis(fake)

    secret = core.read_namespaced_secret("creds", NS)
    assert secret.data == {"AWS_ACCESS_KEY_ID": "a2V5LWlk"}  # base64, as the API serves it
    assert core.read_namespaced_config_map("settings", NS).data == {"level": "debug"}
    with pytest.raises(ApiException) as err:
        core.read_namespaced_secret("missing", NS)
    assert err.value.status == 404


def test_a_kfp_step_may_not_read_secrets():
    with FakeKubernetes(namespaces=(NS,)) as f:  # the default: the Role a KFP step gets
        f.add_secret(NS, "creds", {"k": "v"})
        with pytest.raises(ApiException) as err:
            apis(f)[1].read_namespaced_secret("creds", NS)
        assert err.value.status == 403
        assert 'cannot get resource "secrets"' in json.loads(err.value.body)["message"]


def test_network_policies_create_get_list_delete(fake):
    net = client.NetworkingV1Api(fake.api_client())
    policy = {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": "rendezvous", "labels": {"app": "demo"}},
        "spec": {
            "podSelector": {"matchLabels": {"app": "demo"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [{"podSelector": {"matchLabels": {"app": "demo"}}}],
                    "ports": [{"port": PORT, "protocol": "TCP"}],
                }
            ],
        },
    }

    created = net.create_namespaced_network_policy(NS, policy)

    assert created.metadata.uid and fake.created_policies == [
        {**policy, "metadata": {**policy["metadata"], "namespace": NS}}
    ]
    assert (
        net.read_namespaced_network_policy("rendezvous", NS).spec.ingress[0].ports[0].port == PORT
    )
    assert [
        p.metadata.name
        for p in net.list_namespaced_network_policy(NS, label_selector="app=demo").items
    ] == ["rendezvous"]
    assert net.list_namespaced_network_policy(NS, label_selector="app=other").items == []
    with pytest.raises(ApiException) as err:
        net.create_namespaced_network_policy(NS, policy)
    assert err.value.status == 409
    net.delete_namespaced_network_policy("rendezvous", NS)
    assert fake.policies == {}


def test_unschedulable_pods_stay_pending_with_a_failedscheduling_event(fake):
    fake.life = JobLife([Step("Created", 2, unschedulable=UNSCHEDULABLE), Step("Running")])
    create(fake, pytorchjob())
    _, core = apis(fake)

    get_job(fake, "demo")  # the first read: still unschedulable
    pods = core.list_namespaced_pod(NS, label_selector="training.kubeflow.org/job-name=demo").items

    assert {p.metadata.name for p in pods} == {"demo-master-0", "demo-worker-0"}
    for pod in pods:
        assert pod.status.phase == "Pending" and not pod.status.container_statuses
        scheduled = pod.status.conditions[0]
        assert (scheduled.type, scheduled.status, scheduled.reason, scheduled.message) == (
            "PodScheduled",
            "False",
            "Unschedulable",
            UNSCHEDULABLE,
        )
        events = core.list_namespaced_event(
            NS, field_selector=f"involvedObject.name={pod.metadata.name},involvedObject.kind=Pod"
        ).items
        assert [(e.reason, e.message, e.type) for e in events] == [
            ("FailedScheduling", UNSCHEDULABLE, "Warning")
        ]
    get_job(fake, "demo")
    get_job(fake, "demo")  # Running: scheduled now
    master = core.read_namespaced_pod("demo-master-0", NS)
    assert master.status.phase == "Running" and master.status.conditions[0].status == "True"
    with pytest.raises(ApiException) as err:
        core.list_namespaced_event(NS, field_selector="involvedObject.colour=red")
    assert err.value.status == 400


def test_a_finished_job_goes_after_its_ttl(fake):
    fake.life = succeeding(["done"], running_polls=1)
    create(fake, pytorchjob(ttlSecondsAfterFinished=1))

    job = eventually(lambda: (j := get_job(fake, "demo")) and "Succeeded" in conditions(j) and j)
    assert job["status"]["completionTime"]
    eventually(
        lambda: (
            fake.collected == [{"kind": "PyTorchJob", "namespace": NS, "name": "demo", "by": "ttl"}]
        ),
        what="the TTL",
    )
    with pytest.raises(ApiException) as err:
        get_job(fake, "demo")
    assert err.value.status == 404


def test_a_trainjob_follows_its_life_with_jobset_labelled_pods(fake):
    fake.life = succeeding(["epoch 0", "done"], running_polls=1)
    create(fake, trainjob(nodes=2), TJ)
    _, core = apis(fake)

    pods = core.list_namespaced_pod(NS, label_selector="jobset.sigs.k8s.io/jobset-name=tj").items
    by_rank = {p.metadata.labels["batch.kubernetes.io/job-completion-index"]: p for p in pods}
    assert sorted(by_rank) == ["0", "1"]
    for rank, pod in by_rank.items():
        assert pod.metadata.labels["jobset.sigs.k8s.io/replicatedjob-name"] == "node"
        assert pod.metadata.name.startswith(f"tj-node-0-{rank}-")
        assert pod.spec.containers[0].name == "node"
    assert "conditions" not in get_job(fake, "tj", TJ)["status"]  # Trainer v2.3: no Created
    get_job(fake, "tj", TJ)
    job = get_job(fake, "tj", TJ)
    complete = conditions(job)["Complete"]
    assert (complete["status"], complete["reason"]) == ("True", "AllJobsCompleted")
    assert job["status"]["jobsStatus"][0]["succeeded"] == 1
    log = core.read_namespaced_pod_log(by_rank["0"].metadata.name, NS, container="node")
    assert log == "epoch 0\ndone\n"


def test_deleting_the_owner_pod_collects_what_it_owns(fake):
    step_uid = fake.add_pod(NS, "kfp-step-pod", labels={"app": "kfp"})
    owner = {"apiVersion": "v1", "kind": "Pod", "name": "kfp-step-pod", "uid": step_uid}
    job = pytorchjob()
    job["metadata"]["ownerReferences"] = [owner]
    created = create(fake, job)
    net = client.NetworkingV1Api(fake.api_client())
    job_owner = {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "name": "demo",
        "uid": created["metadata"]["uid"],
    }
    for name, ref in (("by-step", owner), ("by-job", job_owner)):
        net.create_namespaced_network_policy(
            NS,
            {
                "apiVersion": "networking.k8s.io/v1",
                "kind": "NetworkPolicy",
                "metadata": {"name": name, "ownerReferences": [ref]},
                "spec": {"podSelector": {}},
            },
        )
    _, core = apis(fake)
    assert {
        p.metadata.name for p in core.list_namespaced_pod(NS, label_selector="app=kfp").items
    } == {"kfp-step-pod"}

    core.delete_namespaced_pod("kfp-step-pod", NS)

    assert fake.jobs == {} and fake.policies == {}
    assert sorted((c["kind"], c["name"]) for c in fake.collected) == [
        ("NetworkPolicy", "by-job"),
        ("NetworkPolicy", "by-step"),
        ("PyTorchJob", "demo"),
    ]
    assert core.list_namespaced_pod(NS).items == []
    assert fake.deleted == []  # nobody asked: the garbage collector did it


def test_an_owner_in_another_namespace_counts_as_absent(fake):
    step_uid = fake.add_pod("kubeflow", "kfp-step-pod")
    job = pytorchjob()
    job["metadata"]["ownerReferences"] = [
        {"apiVersion": "v1", "kind": "Pod", "name": "kfp-step-pod", "uid": step_uid}
    ]

    create(fake, job)  # accepted, then collected at once, as the real garbage collector does

    assert fake.jobs == {}
    assert fake.collected == [{"kind": "PyTorchJob", "namespace": NS, "name": "demo", "by": "gc"}]
    events = (
        apis(fake)[1]
        .list_namespaced_event(NS, field_selector="reason=OwnerRefInvalidNamespace")
        .items
    )
    assert len(events) == 1 and f'does not exist in namespace "{NS}"' in events[0].message


# --- pods as processes ----------------------------------------------------------------------------

SHOW_AND_WAIT = r"""
import json, os, pathlib, sys, time
seen = pathlib.Path("attempts")
attempt = int(seen.read_text()) + 1 if seen.exists() else 1
seen.write_text(str(attempt))
print(json.dumps({"env": dict(os.environ), "cwd": os.getcwd(), "argv": sys.argv[1:],
                  "attempt": attempt}), flush=True)  # PYTHONUNBUFFERED=0 leaves stdout buffered
print("to stderr", file=sys.stderr, flush=True)
while True:
    time.sleep(0.05)
"""

OPERATOR_ENV = {
    "PYTHONUNBUFFERED",
    "MASTER_ADDR",
    "MASTER_PORT",
    "WORLD_SIZE",
    "RANK",
    "PET_NNODES",
    "PET_NODE_RANK",
    "PET_NPROC_PER_NODE",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
}


def log_lines(fake, pod: str, **kwargs) -> list[str]:
    return (
        apis(fake)[1].read_namespaced_pod_log(pod, NS, container="pytorch", **kwargs).splitlines()
    )


def shown(fake, pod: str, **kwargs) -> dict:
    return json.loads(log_lines(fake, pod, **kwargs)[0])


def test_process_pods_env_dirs_log_restart_and_delete(procs, monkeypatch):
    monkeypatch.setenv("VF_TEST_PROCESS_ONLY", "must not leak into pods")
    procs.add_secret(NS, "creds", {"TOKEN": "s3cr3t"})
    procs.add_config_map(NS, "settings", {"level": "debug"})
    ctr = container(
        ["python", "-c", SHOW_AND_WAIT],
        args=["rank=$(RANK)", "$$(RANK)", "$(UNDEFINED)", "/var/work/data"],
        workingDir="/var/work",
        ports=[{"name": "pytorchjob-port", "containerPort": PORT}],
        env=[
            {"name": "HOME", "value": "/var/work"},
            {"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
            {"name": "GREETING", "value": "hello-$(POD)-$(RANK)"},  # RANK comes later: kept
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}},
            {
                "name": "LEVEL",
                "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "level"}},
            },
        ],
        volumeMounts=[{"name": "work", "mountPath": "/var/work"}],
    )
    create(procs, pytorchjob(ctr=ctr, volumes=[{"name": "work", "emptyDir": {}}]))

    master, worker = (
        eventually(lambda p=p: shown(procs, p)) for p in ("demo-master-0", "demo-worker-0")
    )

    expected_keys = {
        "PATH",
        "LANG",
        "HOME",
        "HOSTNAME",
        "KUBERNETES_SERVICE_HOST",
        "KUBERNETES_SERVICE_PORT",
        "KUBERNETES_PORT",
        "POD",
        "GREETING",
        "TOKEN",
        "LEVEL",
        *OPERATOR_ENV,
    }
    for out, rank, pod in ((master, 0, "demo-master-0"), (worker, 1, "demo-worker-0")):
        env, work = out["env"], procs.pod_dir(pod) / "var" / "work"
        assert set(env) == expected_keys  # exactly: nothing of this test process leaks in
        assert {k: env[k] for k in OPERATOR_ENV} == {
            "PYTHONUNBUFFERED": "0",
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(PORT),
            "PET_MASTER_ADDR": "127.0.0.1",
            "PET_MASTER_PORT": str(PORT),
            "WORLD_SIZE": "2",
            "RANK": str(rank),
            "PET_NODE_RANK": str(rank),
            "PET_NNODES": "2",
            "PET_NPROC_PER_NODE": "1",
        }
        assert env["HOSTNAME"] == env["POD"] == pod
        assert env["GREETING"] == f"hello-{pod}-$(RANK)"
        assert (env["TOKEN"], env["LEVEL"]) == ("s3cr3t", "debug")
        assert env["KUBERNETES_SERVICE_HOST"] == "127.0.0.1"
        assert env["KUBERNETES_SERVICE_PORT"] == str(procs.api_address()[1])
        assert env["PATH"].split(os.pathsep)[0] == os.path.dirname(sys.executable)
        assert env["HOME"] == out["cwd"] == str(work)  # /var/work, in the pod's own directory
        assert out["argv"] == [f"rank={rank}", "$(RANK)", "$(UNDEFINED)", f"{work}/data"]
        assert (work / "attempts").read_text() == "1"
    assert procs.pod_dir("demo-master-0") != procs.pod_dir("demo-worker-0")
    assert log_lines(procs, "demo-master-0")[1] == "to stderr"
    job = get_job(procs, "demo")
    assert conditions(job)["Running"]["status"] == "True"
    assert job["status"]["replicaStatuses"]["Master"]["active"] == 1

    # A followed log ends with its container; the kill (a preempted node) restarts it in place.
    core = apis(procs)[1]
    stream = core.read_namespaced_pod_log(
        "demo-master-0", NS, container="pytorch", follow=True, _preload_content=False
    )
    first_pid = procs.process_pod("demo-master-0").pid
    procs.kill_pod("demo-master-0", signal.SIGKILL)
    followed = stream.read().decode().splitlines()
    assert json.loads(followed[0])["attempt"] == 1 and followed[1] == "to stderr"

    status = eventually(
        lambda: (
            (s := core.read_namespaced_pod("demo-master-0", NS).status)
            and s.container_statuses[0].restart_count == 1
            and s.container_statuses[0].state.running
            and s
        )
    )
    assert status.container_statuses[0].last_state.terminated.exit_code == 137
    assert eventually(lambda: shown(procs, "demo-master-0"))["attempt"] == 2  # same volume
    assert shown(procs, "demo-master-0", previous=True)["attempt"] == 1
    assert not alive(first_pid)
    assert "Failed" not in conditions(get_job(procs, "demo"))  # 1 restart < backoffLimit 3
    backoff = core.list_namespaced_event(
        NS, field_selector="involvedObject.name=demo-master-0,reason=BackOff"
    ).items
    assert len(backoff) == 1 and backoff[0].type == "Warning"

    # Deleting the job stops its processes and removes its pods.
    pids = [procs.process_pod(p).pid for p in ("demo-master-0", "demo-worker-0")]
    apis(procs)[0].delete_namespaced_custom_object(
        *KF[:2], NS, KF[2], "demo", propagation_policy="Foreground"
    )
    eventually(lambda: procs.jobs == {}, what="the job's deletion")
    assert core.list_namespaced_pod(NS).items == []
    assert not any(alive(pid) for pid in pids)


def test_a_failing_container_restarts_until_the_backoff_limit_fails_the_job(procs):
    fails = container(["python", "-c", "import sys; print('attempt', flush=True); sys.exit(3)"])
    create(procs, pytorchjob("crash", workers=0, ctr=fails, backoffLimit=2))

    job = eventually(lambda: (j := get_job(procs, "crash")) and "Failed" in conditions(j) and j)

    failed = conditions(job)["Failed"]
    assert failed["reason"] == "PyTorchJobFailed"
    assert (
        failed["message"]
        == "Job crash has failed because it has reached the specified backoff limit"
    )
    assert conditions(job)["Running"]["status"] == "False"
    eventually(lambda: apis(procs)[1].list_namespaced_pod(NS).items == [], what="pods deleted")
    events = (
        apis(procs)[1].list_namespaced_event(NS, field_selector="involvedObject.name=crash").items
    )
    assert "PyTorchJobFailed" in {e.reason for e in events}


def test_never_fails_the_job_at_the_first_failure(procs):
    fails = container(["python", "-c", "import sys; print('boom', flush=True); sys.exit(1)"])
    create(procs, pytorchjob("once", workers=0, ctr=fails, restart="Never", cleanPodPolicy="None"))

    job = eventually(lambda: (j := get_job(procs, "once")) and "Failed" in conditions(j) and j)

    assert (
        conditions(job)["Failed"]["message"]
        == "PyTorchJob once is failed because 1 Master replica(s) failed."
    )
    pod = apis(procs)[1].read_namespaced_pod("once-master-0", NS)
    assert pod.status.phase == "Failed" and pod.status.container_statuses[0].restart_count == 0
    assert pod.status.container_statuses[0].state.terminated.exit_code == 1
    assert log_lines(procs, "once-master-0") == ["boom"]


def test_the_master_succeeding_ends_the_job_and_stops_its_workers(procs, tmp_path):
    go = tmp_path / "go"
    master_exits = container(
        [
            "python",
            "-c",
            f"import os, time\nwhile not os.path.exists({str(go)!r}): time.sleep(0.05)",
        ]
    )
    job = pytorchjob("ok", ctr=master_exits, cleanPodPolicy="Running", ttlSecondsAfterFinished=2)
    job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]["containers"][0]["command"] = [
        "python",
        "-c",
        "import time; print('waiting', flush=True); time.sleep(60)",
    ]
    create(procs, job)
    eventually(lambda: log_lines(procs, "ok-worker-0") == ["waiting"])
    worker_pid = procs.process_pod("ok-worker-0").pid
    go.touch()  # the Master exits 0

    done = eventually(lambda: (j := get_job(procs, "ok")) and "Succeeded" in conditions(j) and j)

    assert conditions(done)["Succeeded"]["message"] == "PyTorchJob ok is successfully completed."
    assert conditions(done)["Running"]["status"] == "False"
    assert done["status"]["replicaStatuses"]["Master"]["succeeded"] == 1
    eventually(lambda: not alive(worker_pid), what="the Worker stopped (cleanPodPolicy Running)")
    eventually(lambda: procs.jobs == {}, timeout=10, what="the TTL")
    assert procs.collected == [{"kind": "PyTorchJob", "namespace": NS, "name": "ok", "by": "ttl"}]


def test_exitcode_retries_signals_in_a_new_pod_and_fails_on_a_permanent_code(procs, tmp_path):
    trigger = tmp_path / "exit3"
    wait_or_exit = (
        f"import os, sys, time\nprint('up', flush=True)\n"
        f"while not os.path.exists({str(trigger)!r}): time.sleep(0.05)\nsys.exit(3)"
    )
    create(
        procs,
        pytorchjob(
            "codes",
            workers=0,
            ctr=container(["python", "-c", wait_or_exit]),
            restart="ExitCode",
            cleanPodPolicy="None",
        ),
    )
    eventually(lambda: log_lines(procs, "codes-master-0") == ["up"])
    first_uid = procs.process_pod("codes-master-0").uid

    procs.kill_pod("codes-master-0", signal.SIGKILL)  # 137: retryable, a new pod replaces it

    eventually(
        lambda: (
            procs.process_pod("codes-master-0").uid != first_uid
            and log_lines(procs, "codes-master-0") == ["up"]
        )
    )
    # Restarting was set, then replaced by Running once the new pod ran (as the operator does).
    events = (
        apis(procs)[1]
        .list_namespaced_event(
            NS, field_selector="involvedObject.name=codes,reason=PyTorchJobRestarting"
        )
        .items
    )
    assert [e.message for e in events] == [
        "job codes is restarting because Master replica(s) failed."
    ]
    assert conditions(get_job(procs, "codes"))["Running"]["status"] == "True"
    exited = (
        apis(procs)[1]
        .list_namespaced_event(NS, field_selector="involvedObject.name=codes,reason=ExitedWithCode")
        .items
    )
    assert [e.message for e in exited] == [f"Pod: {NS}.codes-master-0 exited with code 137"]
    trigger.touch()  # exit code 3: permanent
    job = eventually(lambda: (j := get_job(procs, "codes")) and "Failed" in conditions(j) and j)
    assert (
        conditions(job)["Failed"]["message"]
        == 'job "codes" is failing because "Master" replica(s) failed.'
    )


def test_a_missing_secret_and_no_free_node_keep_the_pod_waiting(procs):
    ctr = container(
        ["python", "-c", "import os; print(os.environ['TOKEN'])"],
        env=[{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "TOKEN"}}}],
    )
    procs.set_unschedulable(UNSCHEDULABLE)
    create(procs, pytorchjob("wait", workers=0, ctr=ctr, cleanPodPolicy="None"))
    core = apis(procs)[1]

    pod = core.read_namespaced_pod("wait-master-0", NS)
    assert pod.status.phase == "Pending" and pod.status.conditions[0].reason == "Unschedulable"
    events = core.list_namespaced_event(
        NS, field_selector="involvedObject.name=wait-master-0"
    ).items
    assert [(e.reason, e.message) for e in events] == [("FailedScheduling", UNSCHEDULABLE)]

    procs.set_unschedulable(None)  # a node frees up: now the Secret is missing
    waiting = (
        core.read_namespaced_pod("wait-master-0", NS).status.container_statuses[0].state.waiting
    )
    assert (waiting.reason, waiting.message) == (
        "CreateContainerConfigError",
        'secret "creds" not found',
    )
    procs.add_secret(NS, "creds", {})
    waiting = (
        core.read_namespaced_pod("wait-master-0", NS).status.container_statuses[0].state.waiting
    )
    assert waiting.message == "couldn't find key TOKEN in Secret team-a/creds"

    procs.add_secret(NS, "creds", {"TOKEN": "finally"})

    eventually(lambda: log_lines(procs, "wait-master-0") == ["finally"])
    eventually(lambda: "Succeeded" in conditions(get_job(procs, "wait")))


def test_a_secret_volume_waits_for_its_secret_then_holds_its_keys_as_files(procs):
    show = container(
        ["python", "-c", "print(open('/etc/creds/TOKEN').read(), flush=True)"],
        volumeMounts=[{"name": "creds", "mountPath": "/etc/creds"}],
    )
    volumes = [{"name": "creds", "secret": {"secretName": "creds"}}]
    create(procs, pytorchjob("vol", workers=0, ctr=show, volumes=volumes, cleanPodPolicy="None"))
    core = apis(procs)[1]

    waiting = (
        core.read_namespaced_pod("vol-master-0", NS).status.container_statuses[0].state.waiting
    )
    assert waiting.reason == "ContainerCreating"
    failed = 'MountVolume.SetUp failed for volume "creds" : secret "creds" not found'
    events = core.list_namespaced_event(
        NS, field_selector="involvedObject.name=vol-master-0,reason=FailedMount"
    ).items
    assert [e.message for e in events] == [failed]

    procs.add_secret(NS, "creds", {"TOKEN": "from-a-file"})

    eventually(lambda: log_lines(procs, "vol-master-0") == ["from-a-file"])
    assert (procs.pod_dir("vol-master-0") / "etc" / "creds" / "TOKEN").read_text() == "from-a-file"


def test_deleting_the_step_pod_stops_the_jobs_processes(procs):
    step_uid = procs.add_pod(NS, "kfp-step-pod")
    stubborn = (  # ignores SIGTERM: the kubelet's SIGKILL after the grace period ends it
        "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "print('up', flush=True)\ntime.sleep(60)"
    )
    job = pytorchjob("owned", workers=0, ctr=container(["python", "-c", stubborn]))
    step = {"apiVersion": "v1", "kind": "Pod", "name": "kfp-step-pod", "uid": step_uid}
    job["metadata"]["ownerReferences"] = [step]
    create(procs, job)
    eventually(lambda: log_lines(procs, "owned-master-0") == ["up"])
    pid = procs.process_pod("owned-master-0").pid
    start = time.monotonic()

    apis(procs)[1].delete_namespaced_pod("kfp-step-pod", NS)

    eventually(lambda: not alive(pid), what="the Master's process stopped")
    assert time.monotonic() - start >= procs.grace_s - 0.1  # SIGTERM was ignored
    eventually(lambda: procs.jobs == {} and procs.pods == {})
    assert procs.collected == [{"kind": "PyTorchJob", "namespace": NS, "name": "owned", "by": "gc"}]
