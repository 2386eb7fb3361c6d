"""Two registers at once against a real `mlflow server` leave the better model champion.

Each repetition registers a worse and a better version of a fresh model from two threads, each
with its own client, as register does once the model is logged: the version is created with
its tags, then `elect_champion` runs. The interleaving is forced, not left to luck: one writer
reads the registry before the other's version exists, both have decided before either writes
the alias, and one writer finishes before the other writes; the repetitions take each writer
first in turn, so in one of them the worse writer's stale write lands last.
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import mlflow
import pytest

from visionflow.steps import register

WAIT = 60  # seconds any thread waits for the other before the test fails
SCORES = {"worse": 0.6, "better": 0.8}
# (reads first, writes the alias first): every combination, the stale write last twice.
ORDERS = [("worse", "better"), ("worse", "worse"), ("better", "better"), ("better", "worse")]
ORDERS.append(ORDERS[0])


class Paced:
    """A client whose first alias write runs `hook` before it: the writer has decided."""

    def __init__(self, client, hook):
        self._client, self._hook = client, hook

    def __getattr__(self, name):
        return getattr(self._client, name)

    def set_registered_model_alias(self, *args):
        hook, self._hook = self._hook, None
        if hook is not None:
            hook()
        return self._client.set_registered_model_alias(*args)


@pytest.fixture(scope="module")
def source(mlflow_server, tmp_path_factory):
    """One logged artifact every version points at: the registry compares tags, not files."""
    mlflow.set_tracking_uri(mlflow_server)
    model = Path(tmp_path_factory.mktemp("model")) / "MLmodel"
    model.write_text("flavors: {}\n")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(model), "model")
    return run.info.run_id, f"{run.info.artifact_uri}/model"


@pytest.mark.slow
@pytest.mark.parametrize("repetition", range(len(ORDERS)))
def test_two_concurrent_registers_leave_the_better_model_champion(
    mlflow_server, source, repetition
):
    run_id, uri = source
    reader, first_writer = ORDERS[repetition]
    name = f"race-{repetition}"
    mlflow.MlflowClient(tracking_uri=mlflow_server).create_registered_model(name)
    read, decided, first_done = (
        threading.Event(),
        threading.Barrier(2, timeout=WAIT),
        threading.Event(),
    )

    def before_first_write(role: str) -> None:
        if role == reader:
            read.set()  # it has read the registry, without the other's version
        decided.wait()
        if role != first_writer:
            assert first_done.wait(WAIT), "the first writer did not finish"

    def register_as(role: str) -> tuple[int, str]:
        if role != reader:
            assert read.wait(WAIT), "the first reader did not read"
        client = Paced(
            mlflow.MlflowClient(tracking_uri=mlflow_server), lambda: before_first_write(role)
        )
        tags = {"task": "classification", "classes": "a,b", "test_split": "split",
                "gate": "passed", "test_accuracy": repr(SCORES[role])}  # fmt: skip
        number = int(client.create_model_version(name, uri, run_id, tags=tags).version)
        try:
            return number, register.elect_champion(client, name, number)[1]
        finally:
            if role == first_writer:
                first_done.set()

    with ThreadPoolExecutor(2) as pool:
        futures = {role: pool.submit(register_as, role) for role in SCORES}
        (better, _), (worse, why_not) = futures["better"].result(), futures["worse"].result()

    client = mlflow.MlflowClient(tracking_uri=mlflow_server)
    assert int(client.get_model_version_by_alias(name, "champion").version) == better
    assert f"does not beat champion v{better} (0.8000)" in why_not
    assert client.get_model_version(name, str(worse)).tags["champion_decision"] == why_not
