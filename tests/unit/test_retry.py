"""Transient failures are retried in process, within the budget; any other failure at once."""

import pytest

from visionflow.core.config import ConfigError
from visionflow.retry import is_transient, retrying
from visionflow.steps.quantize import QuantizeError
from visionflow.storage import StorageError, open_store
from visionflow.tracking import TrackingError, check_reachable


class Flaky:
    """Fails with each of `errors` in turn, then returns "done"."""

    def __init__(self, *errors: BaseException) -> None:
        self.errors, self.calls = list(errors), 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


def test_transient_failures_are_retried_until_the_step_succeeds():
    step = Flaky(ConnectionRefusedError("refused"), TimeoutError("slow"))
    assert retrying(step, attempts=3, first_wait_s=0)("cfg") == "done"
    assert step.calls == 3


def test_the_budget_ends_with_the_last_transient_failure():
    step = Flaky(*(ConnectionResetError(f"reset {i}") for i in range(5)))
    with pytest.raises(ConnectionResetError, match="reset 2"):
        retrying(step, attempts=3, first_wait_s=0)()
    assert step.calls == 3


@pytest.mark.parametrize(
    "error",
    [
        QuantizeError("int8 rejected: ..., and quantize.required is set"),
        ConfigError("unknown key"),
        StorageError("bucket 'x' does not exist"),
        ValueError("the model does not fit the data"),
    ],
)
def test_deterministic_failures_are_raised_at_once(error):
    step = Flaky(error)
    with pytest.raises(type(error)):
        retrying(step, attempts=3, first_wait_s=0)()
    assert step.calls == 1


def test_an_unreachable_tracking_server_or_store_is_transient(monkeypatch):
    # Port 9 (discard) on loopback: nothing listens, the connection is refused.
    with pytest.raises(TrackingError) as tracking:
        check_reachable("http://127.0.0.1:9", timeout=2)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test-access")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test-secret-value")
    with pytest.raises(StorageError, match="cannot reach S3 endpoint") as store:
        open_store("s3://bucket", "http://127.0.0.1:9")
    assert is_transient(tracking.value) and is_transient(store.value)


def test_the_cause_decides_unless_it_was_suppressed():
    try:
        try:
            raise ConnectionError("dropped")
        except ConnectionError as err:
            raise RuntimeError("API request failed") from err  # as MLflow wraps it
    except RuntimeError as wrapped:
        assert is_transient(wrapped)
    try:
        try:
            raise ConnectionError("dropped")
        except ConnectionError:
            raise ValueError("a message that replaces it") from None
    except ValueError as replaced:
        assert not is_transient(replaced)
