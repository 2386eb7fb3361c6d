"""The PyTorchJob launcher against a stand-in Kubernetes API server (tests/cluster_sim/apiserver.py).

No cluster runs here: the fake server answers the launcher's requests over real HTTP on
127.0.0.1 and plays the Training Operator's part (conditions, pods, the Master's log).
"""

from __future__ import annotations

import _thread
import os
import signal
import threading
import time

import pytest

from tests.cluster_sim.apiserver import FakeKubernetes, JobLife, Step, succeeding
from visionflow.cluster.launcher import LaunchCancelled, LaunchError, LaunchTimeout, launch

NS = "team-a"
NAME = "vf-run-1-abc123"
POLL = 0.05


def manifest(
    name: str = NAME, namespace: str = NS, workers: int = 1, secret: str = "s3-creds"
) -> dict:
    """A small PyTorchJob in the shape the builder produces (a Master, Workers, secret env)."""
    env = [{"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}
           for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")]  # fmt: skip
    template = {
        "metadata": {"labels": {"app.kubernetes.io/name": "visionflow"}},
        "spec": {"containers": [{"name": "pytorch", "image": "visionflow-train:test",
                                 "command": ["visionflow", "train", "run_id=run-1"], "env": env}]},
    }  # fmt: skip
    replicas = {"Master": {"replicas": 1, "restartPolicy": "OnFailure", "template": template}}
    if workers:
        replicas["Worker"] = {
            "replicas": workers,
            "restartPolicy": "OnFailure",
            "template": template,
        }
    return {
        "apiVersion": "kubeflow.org/v1",
        "kind": "PyTorchJob",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/name": "visionflow"},
        },
        "spec": {
            "nprocPerNode": "1",
            "runPolicy": {
                "backoffLimit": 2,
                "activeDeadlineSeconds": 3600,
                "cleanPodPolicy": "None",
            },
            "pytorchReplicaSpecs": replicas,
        },
    }


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
        job or manifest(), timeout_s=timeout_s, poll_s=POLL, api_client=fake.api_client(), **kwargs
    )
    return result, lines


def test_success_streams_the_masters_log_while_it_runs(k8s):
    fake = k8s(life=succeeding([f"epoch {i}" for i in range(5)] + ["done"], running_polls=6))
    reads_at_line: dict[str, int] = {}
    lines: list[str] = []

    def log(line: str) -> None:
        lines.append(line)
        reads_at_line[line] = fake.job_reads(NAME)

    job = launch(manifest(), timeout_s=10, poll_s=POLL, api_client=fake.api_client(), log=log,
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
    start = time.monotonic()

    with pytest.raises(LaunchTimeout, match="did not finish before the timeout") as err:
        run(fake, timeout_s=0.6)

    assert time.monotonic() - start < 5
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
    start = time.monotonic()

    with pytest.raises(LaunchError) as err:
        run(fake, timeout_s=30, required_secrets=["s3-creds"])

    assert time.monotonic() - start < 5
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
    start = time.monotonic()

    with pytest.raises(
        LaunchError, match=r"cannot reach the Kubernetes API server at http://127\.0\.0\.1:9"
    ):
        launch(manifest(), timeout_s=60, poll_s=POLL, api_client=api, log=lambda line: None)

    assert time.monotonic() - start < 5


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
        run(fake, manifest(namespace="team-b"))

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
    fake.add_job(manifest(), JobLife([Step("Failed", message="earlier attempt failed")]))

    _, lines = run(fake)

    assert lines == ["second attempt"]
    assert [d["name"] for d in fake.deleted] == [NAME]  # the earlier, finished one
    assert [m["metadata"]["name"] for m in fake.created] == [NAME]


def test_rerun_follows_a_still_running_job_of_the_same_run(k8s):
    # An earlier launcher was killed (SIGKILL: no cleanup); its job, same manifest, still runs.
    from visionflow.cluster.launcher import _checked_copy

    fake = k8s()
    fake.add_job(_checked_copy(manifest()), succeeding(["from the earlier attempt", "done"]))

    _, lines = run(fake)

    assert lines == ["from the earlier attempt", "done"]
    assert fake.created == [] and fake.deleted == []


def test_a_running_job_with_another_spec_is_left_alone(k8s):
    fake = k8s()
    other = manifest()
    other["spec"]["runPolicy"]["backoffLimit"] = 7
    from visionflow.cluster.launcher import _checked_copy

    fake.add_job(_checked_copy(other), JobLife([Step("Running")]))

    with pytest.raises(
        LaunchError, match="already running in namespace 'team-a' with a different spec"
    ):
        run(fake)

    assert fake.deleted == []
