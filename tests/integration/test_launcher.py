"""The launcher against a stand-in Kubernetes API server (tests/cluster_sim/apiserver.py).

No cluster runs here: the fake server answers the launcher's requests over real HTTP on
127.0.0.1, admits what it is sent as the API server would (strictly), and plays the Training
Operator's and the Trainer's part (conditions, pods, the Master's log), the scheduler's and the
garbage collector's. Every job launched is what the builders build from a real config.
"""

from __future__ import annotations

import _thread
import copy
import functools
import logging
import os
import signal
import threading
import time

import pytest

from tests.cluster_sim.apiserver import FakeKubernetes, JobLife, Step, succeeding
from visionflow.cluster import launcher as launcher_module
from visionflow.cluster.launcher import (
    LaunchCancelled,
    LaunchError,
    LaunchTimeout,
    PodsPending,
    _checked_copy,
    launch,
)
from visionflow.cluster.pytorchjob import JOB_NAME_LABEL, job_name
from visionflow.cluster.training import build_job
from visionflow.cluster.trainjob import JOBSET_NAME_LABEL
from visionflow.core.config import load_config

NS = "team-a"
RUN_ID = "run-1"
NAME = job_name(RUN_ID)
POLL = 0.05
CONFIG = ["storage=minio", "tracking=server", "storage.root=s3://visionflow",
          "tracking.uri=http://127.0.0.1:5000", "cluster.s3_secret=s3-creds",
          f"run_id={RUN_ID}"]  # fmt: skip
UNSCHEDULABLE = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu."


@functools.cache
def _built(api: str, nodes: int, extra: tuple[str, ...]) -> dict:
    args = [*CONFIG, f"cluster.api={api}", f"cluster.nodes={nodes}", *extra]
    return build_job(load_config(args), args)  # validated, as train_on_cluster launches it


def built(*extra: str, api: str = "pytorchjob", nodes: int = 2, owner: dict | None = None) -> dict:
    """The job the builder makes from a real config (no namespace: the launcher's own)."""
    job = copy.deepcopy(_built(api, nodes, extra))
    if owner is not None:
        job["metadata"]["ownerReferences"] = [owner]
    return job


@pytest.fixture(autouse=True)
def service_account_namespace(tmp_path, monkeypatch):
    """This process runs "in a pod" of namespace team-a: its service account's namespace file."""
    path = tmp_path / "serviceaccount-namespace"
    path.write_text(NS)
    monkeypatch.setattr(launcher_module, "SA_NAMESPACE_FILE", str(path))
    return path


@pytest.fixture
def k8s():
    """make(**kwargs) -> a started FakeKubernetes; all are stopped after the test."""
    fakes: list[FakeKubernetes] = []

    def make(**kwargs) -> FakeKubernetes:
        fake = FakeKubernetes(**kwargs).__enter__()
        fakes.append(fake)
        return fake

    yield make
    for fake in fakes:
        fake.__exit__(None, None, None)


def run(fake: FakeKubernetes, job: dict | None = None, timeout_s: float = 10, **kwargs):
    lines: list[str] = []
    kwargs.setdefault("log", lines.append)
    result = launch(
        job or built(), timeout_s=timeout_s, poll_s=POLL, api_client=fake.api_client(), **kwargs
    )
    return result, lines


def test_success_streams_the_masters_log_while_it_runs(k8s):
    fake = k8s(life=succeeding([f"epoch {i}" for i in range(5)] + ["done"], running_polls=6))
    reads_at_line: dict[str, int] = {}
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        reads_at_line[line] = fake.job_reads(NAME)

    job = launch(built(), timeout_s=10, poll_s=POLL, api_client=fake.api_client(), log=log,
                 required_secrets=["s3-creds"])  # fmt: skip

    assert lines == ["epoch 0", "epoch 1", "epoch 2", "epoch 3", "epoch 4", "done"]
    # the Running step's lines arrived while the job was still running (reads 2..7), not at the end
    assert reads_at_line["epoch 0"] < 1 + 6 + 1
    types = {c["type"]: c["status"] for c in job["status"]["conditions"]}
    assert types["Succeeded"] == "True" and types["Running"] == "False"
    assert [m["metadata"]["name"] for m in fake.created] == [NAME]
    assert fake.created[0]["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] == 1
    assert fake.deleted == []  # a finished job stays for `kubectl logs`; a rerun replaces it
    # the step's Role may not read Secrets: the launcher tried once, then relied on the pods
    assert [r[2] for r in fake.requested("GET", "/secrets/")] == [403]


def test_failure_raises_with_the_masters_last_lines_and_deletes_the_job(k8s):
    log_lines = [f"step {i:02d}" for i in range(40)] + ["RuntimeError: CUDA out of memory"]
    fake = k8s(life=JobLife([
        Step("Created"),
        Step("Running", 3, log=log_lines),
        Step("Failed", message=f"PyTorchJob {NAME} is failed because 1 Master replica(s) failed."),
    ]))  # fmt: skip

    with pytest.raises(LaunchError) as err:
        run(fake)

    msg = str(err.value)
    assert "1 Master replica(s) failed" in msg
    assert "RuntimeError: CUDA out of memory" in msg and "step 39" in msg and "step 11" in msg
    assert "step 10" not in msg  # only the last 30 lines
    assert fake.deleted == [{"namespace": NS, "name": NAME, "propagationPolicy": "Foreground"}]


def test_timeout_deletes_the_job(k8s):
    fake = k8s(life=JobLife([Step("Created"), Step("Running", log=["still training"])]))
    with pytest.raises(LaunchTimeout, match="did not finish before the timeout") as err:
        run(fake, timeout_s=0.6)

    assert "still training" in str(err.value)
    assert [d["name"] for d in fake.deleted] == [NAME]


@pytest.mark.parametrize(
    ("waiting", "expected"),
    [
        ('secret "s3-creds" not found', "secret 's3-creds' not found in namespace 'team-a'"),
        ("couldn't find key AWS_SECRET_ACCESS_KEY in Secret team-a/s3-creds",
         "secret 's3-creds' in namespace 'team-a' has no key 'AWS_SECRET_ACCESS_KEY'"),
    ],
)  # fmt: skip
def test_missing_secret_seen_on_the_pods_fails_fast_and_deletes_the_job(k8s, waiting, expected):
    # The Role cannot read Secrets: the kubelet's CreateContainerConfigError on the pod tells.
    fake = k8s(life=JobLife([Step("Created", waiting=("CreateContainerConfigError", waiting))]))
    with pytest.raises(LaunchError) as err:  # not LaunchTimeout: it did not wait for the pods
        run(fake, timeout_s=30, required_secrets=["s3-creds"])

    assert not isinstance(err.value, LaunchTimeout)
    assert expected in str(err.value)
    assert "kubectl -n team-a" in str(err.value)
    assert [d["name"] for d in fake.deleted] == [NAME]


def test_missing_secret_is_caught_before_creating_when_secrets_are_readable(k8s):
    fake = k8s(forbid=(), secrets={NS: {"other": {"x": "eA=="}}})

    with pytest.raises(
        LaunchError, match="secret 's3-creds' not found in namespace 'team-a': create it"
    ) as err:
        run(fake, required_secrets=["s3-creds"])

    assert "--from-literal=AWS_ACCESS_KEY_ID=..." in str(err.value)
    assert fake.created == [] and fake.deleted == []


def test_missing_key_is_caught_before_creating_when_secrets_are_readable(k8s):
    fake = k8s(forbid=(), secrets={NS: {"s3-creds": {"AWS_ACCESS_KEY_ID": "eA=="}}})

    with pytest.raises(LaunchError, match="has no key 'AWS_SECRET_ACCESS_KEY'"):
        run(fake)

    assert fake.created == []


def test_unreachable_api_server_fails_within_seconds_naming_the_host():
    from kubernetes import client

    api = client.ApiClient(client.Configuration(host="http://127.0.0.1:9"))
    with pytest.raises(
        LaunchError, match=r"cannot reach the Kubernetes API server at http://127\.0\.0\.1:9"
    ) as err:
        launch(built(), timeout_s=60, poll_s=POLL, api_client=api, log=lambda line: None)

    assert not isinstance(err.value, LaunchTimeout)  # it gave up on the host, not on the job


def test_polling_rides_out_a_short_api_outage(k8s):
    fake = k8s(life=succeeding(["epoch 0", "done"]))
    fake.fail_reads = [503, 503, 503]

    _, lines = run(fake)

    assert lines == ["epoch 0", "done"]
    assert [r[2] for r in fake.requested("GET", f"/pytorchjobs/{NAME}")][:3] == [503, 503, 503]


def test_losing_the_api_server_mid_run_fails_naming_the_host(k8s, monkeypatch):
    import visionflow.cluster.launcher as launcher

    monkeypatch.setattr(launcher, "API_GRACE_S", 0.3)
    fake = k8s(life=JobLife([Step("Created"), Step("Running", log=["epoch 0"])]))

    def log(line: str) -> None:
        fake.down = True  # the API server goes away once training has started

    with pytest.raises(LaunchError, match=f"cannot reach the Kubernetes API server at {fake.host}"):
        run(fake, log=log)


def test_wrong_namespace_names_it(k8s):
    fake = k8s()

    with pytest.raises(LaunchError, match="namespace 'team-b' does not exist"):
        run(fake, built("cluster.namespace=team-b"))

    assert fake.created == [] and fake.deleted == []


def test_forbidden_names_the_missing_permissions(k8s):
    fake = k8s(forbid={("list", "pytorchjobs"), ("get", "secrets")})

    with pytest.raises(LaunchError) as err:
        run(fake)

    msg = str(err.value)
    assert (
        'User "system:serviceaccount:team-a:pipeline-runner" cannot list resource "pytorchjobs"'
        in msg
    )
    assert "needs a Role in namespace 'team-a'" in msg
    assert fake.created == []


def test_missing_training_operator_says_so(k8s):
    fake = k8s(crd_installed=False)

    with pytest.raises(LaunchError, match="Training Operator .* is not installed"):
        run(fake)


def later(action, delay: float = 0.1):
    """A log callback that, on the first Master line (so surely inside launch), fires `action`
    from another thread a little later, while the launcher waits in its loop."""
    timers: list[threading.Timer] = []

    def log(line: str) -> None:
        if not timers:
            timers.append(threading.Timer(delay, action))
            timers[0].start()

    return log, timers


def test_sigterm_deletes_the_job_and_restores_the_handler(k8s):
    fake = k8s(life=JobLife([Step("Created"), Step("Running", log=["training"])]))
    previous = signal.getsignal(signal.SIGTERM)
    log, timers = later(lambda: os.kill(os.getpid(), signal.SIGTERM))

    with pytest.raises(LaunchCancelled, match="SIGTERM"):
        run(fake, timeout_s=10, log=log)

    timers[0].join()
    assert signal.getsignal(signal.SIGTERM) is previous
    assert [d["name"] for d in fake.deleted] == [NAME]


@pytest.fixture
def ctrl_c_raises():
    """SIGINT raising KeyboardInterrupt, as on a terminal. A process a shell starts in the
    background without job control inherits SIGINT ignored, and then interrupt_main() does
    nothing."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_keyboard_interrupt_deletes_the_job(k8s, ctrl_c_raises):
    fake = k8s(life=JobLife([Step("Created"), Step("Running", log=["training"])]))
    log, timers = later(_thread.interrupt_main)

    with pytest.raises(KeyboardInterrupt):
        run(fake, timeout_s=10, log=log)

    timers[0].join()
    assert [d["name"] for d in fake.deleted] == [NAME]


def test_a_restarted_master_is_followed_without_repeating_lines(k8s):
    fake = k8s(life=JobLife([
        Step("Created"),
        Step("Running", 3, log=["attempt 1: epoch 0"]),
        Step("Restarting", 2, new_pod=True),
        Step("Running", 3, log=["attempt 2: resumed from last.ckpt", "attempt 2: epoch 1"]),
        Step("Succeeded"),
    ]))  # fmt: skip

    _, lines = run(fake)

    assert lines == [
        "attempt 1: epoch 0",
        "attempt 2: resumed from last.ckpt",
        "attempt 2: epoch 1",
    ]


def test_rerun_replaces_a_finished_job_of_the_same_run(k8s):
    fake = k8s(life=succeeding(["second attempt"]))
    fake.add_job(
        _checked_copy(built()), JobLife([Step("Failed", message="earlier attempt failed")])
    )

    _, lines = run(fake)

    assert lines == ["second attempt"]
    assert [d["name"] for d in fake.deleted] == [NAME]  # the earlier, finished one
    assert [m["metadata"]["name"] for m in fake.created] == [NAME]


def test_rerun_follows_a_still_running_job_of_the_same_run(k8s):
    # An earlier launcher was killed (SIGKILL: no cleanup); its job, same manifest, still runs.
    fake = k8s()
    fake.add_job(_checked_copy(built()), succeeding(["from the earlier attempt", "done"]))

    _, lines = run(fake)

    assert lines == ["from the earlier attempt", "done"]
    assert fake.created == [] and fake.deleted == []


def test_a_running_job_with_another_spec_is_left_alone(k8s):
    fake = k8s()
    other = built("cluster.backoff_limit=7")
    fake.add_job(_checked_copy(other), JobLife([Step("Running")]))

    with pytest.raises(
        LaunchError, match="already running in namespace 'team-a' with a different spec"
    ):
        run(fake)

    assert fake.deleted == []


# --- what goes with the job: owner, NetworkPolicy, TTL, namespace ---------------------------------


def _owner(fake: FakeKubernetes, name: str = "train-step-pod", namespace: str = NS) -> dict:
    """The KFP step's own pod in the fake, as the ownerReference step_owner() makes for it."""
    uid = fake.add_pod(namespace, name, labels={"pipelines.kubeflow.org/v2_component": "true"})
    return {"apiVersion": "v1", "kind": "Pod", "name": name, "uid": uid}


def _delete_pod(fake: FakeKubernetes, name: str, namespace: str = NS) -> None:
    from kubernetes import client

    client.CoreV1Api(fake.api_client()).delete_namespaced_pod(name, namespace)


def test_the_job_and_its_network_policy_go_when_the_step_pod_is_deleted(k8s):
    fake = k8s(life=succeeding(["epoch 0", "done"]))
    owner = _owner(fake)

    job, _ = run(fake, built(owner=owner))

    (created,) = fake.created
    assert created["metadata"]["ownerReferences"] == [owner]  # no blockOwnerDeletion
    assert (NS, NAME) in fake.jobs and (NS, NAME) in fake.policies  # kept after success
    _delete_pod(fake, "train-step-pod")  # the run is deleted
    fake.wait_until(lambda: not fake.jobs and not fake.policies, what="the GC")
    gone = {(c["kind"], c["name"], c["by"]) for c in fake.collected}
    assert {("PyTorchJob", NAME, "gc"), ("NetworkPolicy", NAME, "gc")} <= gone
    assert job["metadata"]["uid"]


def test_network_policy_admits_only_the_jobs_pods_and_is_owned_by_the_job(k8s):
    fake = k8s()

    job, _ = run(fake)

    (policy,) = fake.created_policies
    selector = {"matchLabels": {JOB_NAME_LABEL: NAME}}
    assert policy["metadata"]["name"] == NAME and policy["metadata"]["namespace"] == NS
    assert policy["spec"]["podSelector"] == selector
    assert policy["spec"]["ingress"] == [{"from": [{"podSelector": selector}]}]
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (ref,) = policy["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"]) == ("PyTorchJob", NAME, job["metadata"]["uid"])
    # the job's pods carry the label the policy selects
    pods = fake.all_pods(NS)
    assert pods and all(p.to_json()["metadata"]["labels"][JOB_NAME_LABEL] == NAME for p in pods)


def test_a_failed_job_takes_its_network_policy_with_it(k8s):
    fake = k8s(life=JobLife([Step("Created"), Step("Failed", message="1 Master replica failed")]))

    with pytest.raises(LaunchError, match="1 Master replica failed"):
        run(fake)

    assert [d["name"] for d in fake.deleted] == [NAME]
    assert fake.created_policies and not fake.policies  # collected with the job


def test_a_stale_network_policy_of_the_same_name_is_replaced(k8s):
    from kubernetes import client

    fake = k8s()
    stale = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
             "metadata": {"name": NAME, "ownerReferences": [_owner(fake, "someone-else")]},
             "spec": {"podSelector": {}, "policyTypes": ["Ingress"]}}  # fmt: skip
    client.NetworkingV1Api(fake.api_client()).create_namespaced_network_policy(NS, stale)

    job, _ = run(fake)

    policy = fake.policies[(NS, NAME)]
    assert [r["uid"] for r in policy["metadata"]["ownerReferences"]] == [job["metadata"]["uid"]]
    assert [r[2] for r in fake.requested("POST", "/networkpolicies")] == [201, 409, 201]


def test_without_networkpolicy_rights_the_job_is_deleted_and_the_verbs_named(k8s):
    fake = k8s(forbid={("get", "secrets"), ("create", "networkpolicies")})

    with pytest.raises(LaunchError) as err:
        run(fake)

    msg = str(err.value)
    assert 'cannot create resource "networkpolicies"' in msg
    assert "networkpolicies.networking.k8s.io create, get and delete" in msg
    assert "events list" in msg
    assert [d["name"] for d in fake.deleted] == [NAME]


def test_a_finished_job_expires_after_its_ttl_with_its_policy(k8s):
    fake = k8s(life=succeeding(["done"], running_polls=1))

    run(fake, built("cluster.ttl_seconds_after_finished=1"))

    assert fake.created[0]["spec"]["runPolicy"]["ttlSecondsAfterFinished"] == 1
    assert (NS, NAME) in fake.jobs  # kept for `kubectl logs` ...
    fake.wait_until(lambda: not fake.jobs and not fake.policies, timeout=10, what="the TTL")
    gone = {(c["kind"], c["by"]) for c in fake.collected}  # ... until the TTL, not the launcher
    assert {("PyTorchJob", "ttl"), ("NetworkPolicy", "gc")} <= gone
    assert fake.deleted == []


def test_namespace_is_read_from_the_service_account_file(k8s, service_account_namespace):
    fake = k8s(namespaces=("team-a", "team-b"))
    service_account_namespace.write_text("team-b\n")
    owner = _owner(fake, namespace="team-b")

    job, _ = run(fake, built(owner=owner))

    assert "namespace" not in built()["metadata"]  # the builder leaves it to the launcher
    assert job["metadata"]["namespace"] == "team-b"
    assert fake.created[0]["metadata"]["ownerReferences"] == [owner]
    assert ("team-b", NAME) in fake.policies
    assert fake.requested("POST", "/namespaces/team-b/pytorchjobs")


def test_an_owner_in_another_namespace_is_dropped_not_sent(k8s, caplog):
    # The step's pod is in team-a; cluster.namespace sends the job to team-b. An ownerReference
    # cannot cross namespaces: sent, the garbage collector would delete the job at once.
    fake = k8s(namespaces=("team-a", "team-b"))
    owner = _owner(fake)

    with caplog.at_level(logging.WARNING, "visionflow.cluster.launcher"):
        job, _ = run(fake, built("cluster.namespace=team-b", owner=owner))

    assert "ownerReferences" not in fake.created[0]["metadata"]
    assert job["metadata"]["namespace"] == "team-b"
    assert "an ownerReference cannot cross namespaces" in caplog.text


def test_outside_a_pod_the_namespace_is_the_kubeconfig_contexts(
    k8s, service_account_namespace, tmp_path, monkeypatch
):
    service_account_namespace.unlink()  # not in a pod: no service account mount
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\ncurrent-context: lab\n"
        "clusters: [{name: lab, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: me, user: {token: x}}]\n"
        "contexts: [{name: lab, context: {cluster: lab, user: me, namespace: team-b}}]\n"
    )
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    fake = k8s(namespaces=("team-b",))

    job, _ = run(fake)

    assert job["metadata"]["namespace"] == "team-b"


def test_a_rerun_from_a_new_step_pod_follows_the_running_job(k8s):
    # A KFP retry runs in a new pod: the job of the first attempt names the old pod as owner.
    fake = k8s()
    first = _owner(fake, "train-step-attempt-1")
    fake.add_job(_checked_copy(built(owner=first)), succeeding(["from attempt 1", "done"]))

    _, lines = run(fake, built(owner=_owner(fake, "train-step-attempt-2")))

    assert lines == ["from attempt 1", "done"]
    assert fake.created == [] and fake.deleted == []
    assert (NS, NAME) in fake.policies  # the adopted job gets its policy too


# --- pods that do not start -----------------------------------------------------------------------


def test_unschedulable_pods_fail_after_the_pending_timeout_naming_the_reason(k8s):
    fake = k8s(life=JobLife([Step("Created", unschedulable=UNSCHEDULABLE)]))
    start = time.monotonic()

    with pytest.raises(PodsPending) as err:
        run(fake, built("cluster.gpus_per_node=8"), timeout_s=30, pending_timeout_s=0.5)

    assert time.monotonic() - start >= 0.5  # it waited out the pending timeout
    msg = str(err.value)
    assert msg.startswith(f"PyTorchJob {NS}/{NAME}: its pods were not all running after 0.5 s")
    assert "(cluster.pending_timeout_s), so it was deleted" in msg
    # the scheduler's reason, from the pods' FailedScheduling events and their condition
    assert (
        f"cannot be scheduled: {UNSCHEDULABLE} (FailedScheduling event; PodScheduled "
        "False: Unschedulable)" in msg
    )
    assert "cluster.gpus_per_node" in msg  # what to change
    assert [d["name"] for d in fake.deleted] == [NAME]
    assert [r[2] for r in fake.requested("GET", f"/namespaces/{NS}/events")] == [200, 200]


def test_pods_that_schedule_within_the_pending_timeout_run_to_the_end(k8s):
    fake = k8s(life=JobLife([
        Step("Created", 4, unschedulable=UNSCHEDULABLE),  # the autoscaler adds a node ...
        Step("Running", 2, log=["epoch 0"]),
        Step("Succeeded", log=["done"]),
    ]))  # fmt: skip

    # The pods are pending for 4 reads of the job: well under a second idle, but a CI run with
    # both cores busy once took over 2 s. The timeout is what the launcher must not hit here
    # (that it fails once hit is the test above's).
    _, lines = run(fake, pending_timeout_s=30)

    assert lines == ["epoch 0", "done"] and fake.deleted == []


def test_a_scheduled_pod_that_never_starts_is_named_with_its_last_warning(k8s):
    # The site config's ConfigMap is not in the job's namespace: the kubelet cannot mount it.
    fake = k8s(life=JobLife([Step("Created", waiting=("ContainerCreating", ""))]))
    mount = 'MountVolume.SetUp failed for volume "site" : configmap "visionflow-config" not found'
    for pod in (f"{NAME}-master-0", f"{NAME}-worker-0"):
        fake.record_event(NS, {"kind": "Pod", "namespace": NS, "name": pod, "uid": pod},
                          "FailedMount", mount, "Warning")  # fmt: skip

    with pytest.raises(PodsPending) as err:
        run(fake, built("cluster.site_config_map=visionflow-config"), pending_timeout_s=0.3)

    msg = str(err.value)
    assert (
        f"pod {NAME}-master-0 is scheduled but container pytorch is waiting: ContainerCreating"
        in msg
    )
    assert f"(last warning: FailedMount: {mount})" in msg
    assert "kubectl -n team-a describe pod" in msg
    assert [d["name"] for d in fake.deleted] == [NAME]


def test_without_events_rights_the_pending_message_still_names_the_condition(k8s):
    fake = k8s(
        life=JobLife([Step("Created", unschedulable=UNSCHEDULABLE)]),
        forbid={("get", "secrets"), ("list", "events")},
    )

    with pytest.raises(PodsPending) as err:
        run(fake, timeout_s=30, pending_timeout_s=0.3)

    assert f"cannot be scheduled: {UNSCHEDULABLE} (PodScheduled False: Unschedulable)" in str(
        err.value
    )
    assert {r[2] for r in fake.requested("GET", "/events")} == {403}
    assert [d["name"] for d in fake.deleted] == [NAME]


# --- TrainJob (Kubeflow Trainer v2) ---------------------------------------------------------------


def test_trainjob_runs_streaming_node_0s_log_with_its_network_policy(k8s):
    fake = k8s(life=succeeding([f"epoch {i}" for i in range(3)] + ["done"]))
    owner = _owner(fake)

    job, lines = run(fake, built(api="trainjob", owner=owner), required_secrets=["s3-creds"])

    assert lines == ["epoch 0", "epoch 1", "epoch 2", "done"]  # node 0's container `node`
    assert {c["type"] for c in job["status"]["conditions"]} == {"Complete"}
    (created,) = fake.created_trainjobs
    assert created["spec"]["trainer"]["numNodes"] == 2
    assert created["metadata"]["ownerReferences"] == [owner]
    assert fake.created == [] and fake.deleted_trainjobs == []
    (policy,) = fake.created_policies
    selector = {"matchLabels": {JOBSET_NAME_LABEL: NAME}}
    assert policy["spec"]["podSelector"] == selector
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "TrainJob"
    _delete_pod(fake, "train-step-pod")
    fake.wait_until(lambda: not fake.trainjobs and not fake.policies, what="the GC")


def test_trainjob_failure_deletes_it_with_node_0s_last_lines(k8s):
    fake = k8s(life=JobLife([
        Step("Created"),
        Step("Running", 2, log=["epoch 0", "RuntimeError: NCCL timeout"]),
        Step("Failed", message="jobset failed due to one or more job failures"),
    ]))  # fmt: skip

    with pytest.raises(LaunchError) as err:
        run(fake, built(api="trainjob"))

    msg = str(err.value)
    assert f"TrainJob {NS}/{NAME} failed: jobset failed" in msg
    assert "RuntimeError: NCCL timeout" in msg
    assert [d["name"] for d in fake.deleted_trainjobs] == [NAME]
    assert not fake.policies


def test_unschedulable_trainjob_pods_fail_after_the_pending_timeout(k8s):
    fake = k8s(life=JobLife([Step("Created", unschedulable=UNSCHEDULABLE)]))

    with pytest.raises(PodsPending, match=f"scheduled: {UNSCHEDULABLE} \\(FailedScheduling event"):
        run(fake, built(api="trainjob"), timeout_s=30, pending_timeout_s=0.3)

    assert [d["name"] for d in fake.deleted_trainjobs] == [NAME]


def test_missing_trainer_says_so(k8s):
    fake = k8s(trainer_installed=False)

    with pytest.raises(LaunchError, match=r"Kubeflow Trainer v2 \(TrainJob CRD\) is not installed"):
        run(fake, built(api="trainjob"))

    assert fake.created_trainjobs == []


def test_an_invalid_trainjob_is_refused_by_the_api_server_with_its_reason(k8s):
    fake = k8s()
    job = built(api="trainjob")
    job["spec"]["trainer"]["numNodes"] = "two"  # what validate_trainjob would have caught

    with pytest.raises(
        LaunchError, match=f"the API server rejected TrainJob {NS}/{NAME} as invalid"
    ):
        run(fake, job)

    assert fake.created_trainjobs == [] and fake.rejected
