"""The background queue that checkpoint uploads and training metrics go through: in order,
bounded, a newer task of a name replacing a pending one, failures raised to the caller; and the
checkpoint uploads on it."""

import threading

import pytest
import torch

from visionflow.background import BackgroundError, BackgroundQueue
from visionflow.callbacks.checkpointing import StoreCheckpointIO
from visionflow.storage import LocalStore


class Gate:
    """A task that waits until opened: it keeps the worker busy while the test queues more."""

    def __init__(self) -> None:
        self.started, self.opened = threading.Event(), threading.Event()

    def __call__(self) -> None:
        self.started.set()
        assert self.opened.wait(timeout=30)


def test_tasks_run_in_order_and_flush_waits_for_them():
    queue, done = BackgroundQueue("test", maxsize=10), []
    for i in range(5):
        queue.submit(f"task {i}", lambda i=i: done.append(i))
    queue.flush()
    assert done == [0, 1, 2, 3, 4]


def test_a_newer_task_of_a_name_replaces_the_pending_one():
    queue, gate, done, discarded = BackgroundQueue("test", maxsize=10), Gate(), [], []
    queue.submit("gate", gate)
    assert gate.started.wait(timeout=30)
    queue.submit("old", lambda: done.append("old"), key="last.ckpt",
                 discard=lambda: discarded.append("old"))  # fmt: skip
    queue.submit("other", lambda: done.append("other"), key="best.ckpt")
    queue.submit("new", lambda: done.append("new"), key="last.ckpt")
    gate.opened.set()
    queue.flush()
    assert done == ["new", "other"] and discarded == ["old"]


def test_a_full_queue_makes_the_caller_wait():
    queue, gate, done = BackgroundQueue("test", maxsize=1), Gate(), []
    queue.submit("gate", gate)
    assert gate.started.wait(timeout=30)
    queue.submit("first", lambda: done.append(1))
    second = threading.Thread(target=queue.submit, args=("second", lambda: done.append(2)))
    second.start()
    second.join(timeout=0.5)
    assert second.is_alive()  # no room until the worker takes "first"
    gate.opened.set()
    second.join(timeout=30)
    queue.flush()
    assert done == [1, 2]


def test_a_failure_is_raised_to_the_caller_naming_the_task():
    queue, gate, discarded = BackgroundQueue("uploads", maxsize=10), Gate(), []

    def fail() -> None:
        gate()
        raise ConnectionError("store gone")

    queue.submit("upload of last.ckpt", fail)
    assert gate.started.wait(timeout=30)
    queue.submit("upload of best.ckpt", lambda: None, discard=lambda: discarded.append(1))
    gate.opened.set()
    with pytest.raises(BackgroundError, match="uploads: upload of last.ckpt failed: store gone"):
        queue.flush()
    assert discarded == [1]  # what was left is dropped, not run after the failure
    with pytest.raises(BackgroundError) as again:
        queue.submit("more", lambda: None)
    assert isinstance(again.value.__cause__, ConnectionError)


def test_a_failure_does_not_hide_the_error_already_raised(caplog):
    queue = BackgroundQueue("uploads", maxsize=10)
    queue.submit("upload of last.ckpt", lambda: 1 / 0)
    with pytest.raises(KeyError, match="training failed"):
        try:
            raise KeyError("training failed")
        finally:
            queue.flush()  # logs its own failure instead
    assert "upload of last.ckpt failed" in caplog.text


class SlowStore(LocalStore):
    """A store whose uploads wait for `gate`, recording what each one read."""

    def __init__(self, root, gate: Gate) -> None:
        super().__init__(root)
        self.gate, self.uploaded = gate, []

    def put_file(self, local, key):
        self.gate()
        self.uploaded.append(torch.load(local, weights_only=True)["global_step"])
        return super().put_file(local, key)


def test_checkpoints_upload_whole_while_training_writes_newer_ones(tmp_path):
    gate = Gate()
    store = SlowStore(tmp_path / "store", gate)
    io = StoreCheckpointIO(store, "checkpoints/run")
    local = tmp_path / "local" / "last.ckpt"
    left = local.parent / ".uploads" / "last.ckpt.7"  # by a killed run
    left.parent.mkdir(parents=True)
    left.write_bytes(b"stale")
    io.save_checkpoint({"global_step": 1}, local)
    assert gate.started.wait(timeout=30)  # uploading step 1 ...
    for step in (2, 3):  # ... while training saves two more: 3 replaces 2, still pending
        io.save_checkpoint({"global_step": step}, local)
    assert torch.load(local, weights_only=True)["global_step"] == 3
    gate.opened.set()
    io.teardown()
    assert store.uploaded == [1, 3]
    assert torch.load(store.uri("checkpoints/run/last.ckpt"), weights_only=True)["global_step"] == 3
    assert not any((local.parent / ".uploads").iterdir())
