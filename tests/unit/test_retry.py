"""Transient failures are retried in process, within the budget; any other failure at once:
whole steps (`retrying`) and single calls to S3 (`call`) or MLflow (its client, set from here)."""

import pytest
import urllib3
from minio.error import InvalidResponseError, S3Error, ServerError

from visionflow.core.config import ConfigError
from visionflow.retry import (
    OUTAGE_BUDGET_S,
    ServiceUnavailable,
    call,
    is_transient,
    mlflow_http_env,
    retrying,
)
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


# ------------------------------------------------------------------ calls: the outage budget


def _s3_error(code: str) -> S3Error:
    return S3Error(None, code, f"{code} message", "bucket/key", "request", "host")


@pytest.mark.parametrize(
    ("error", "transient"),
    [
        (_s3_error("SlowDown"), True),
        (_s3_error("ServiceUnavailable"), True),
        (ServerError("server failed with HTTP status code 503", 503), True),
        (InvalidResponseError(502, "text/html", "<html>Bad Gateway</html>"), True),
        (_s3_error("AccessDenied"), False),
        (_s3_error("NoSuchBucket"), False),
        (InvalidResponseError(403, "text/html", "<html>Forbidden</html>"), False),
    ],
)
def test_s3_answers_that_mean_try_again_later_are_transient(error, transient):
    assert is_transient(error) is transient


def test_a_call_is_retried_through_transient_failures():
    put = Flaky(ConnectionResetError("reset"), _s3_error("SlowDown"))
    assert call(put, "S3 endpoint http://minio:9000", "put_file(a, b)") == "done"
    assert put.calls == 3


def test_a_call_that_outlasts_the_budget_names_the_service_and_the_operation():
    put = Flaky(*(ConnectionRefusedError(f"refused {i}") for i in range(3)))
    with pytest.raises(ServiceUnavailable) as failed:
        call(put, "S3 endpoint http://minio:9000", "put_file(a, b)", budget_s=0)
    message = str(failed.value)
    assert "S3 endpoint http://minio:9000" in message and "put_file(a, b) failed" in message
    assert isinstance(failed.value.__cause__, ConnectionRefusedError)
    assert is_transient(failed.value)  # a step may still be rerun, later


@pytest.mark.parametrize("error", [_s3_error("AccessDenied"), _s3_error("NoSuchBucket")])
def test_a_call_fails_at_once_on_a_lasting_error(error):
    get = Flaky(error)
    with pytest.raises(S3Error):
        call(get, "S3 endpoint http://minio:9000", "get_file(a, b)")
    assert get.calls == 1


def test_mlflow_retries_for_the_whole_budget():
    """MLflow's client, set by mlflow_http_env, waits out at least OUTAGE_BUDGET_S (60 s or
    more) between its attempts, as urllib3 (which it retries through) counts the waits."""
    env = mlflow_http_env()
    retries = int(env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"])
    retry = urllib3.Retry(
        total=retries, backoff_factor=int(env["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"])
    )
    waited = 0.0
    for _ in range(retries):
        retry = retry.increment("POST", "/api/2.0/mlflow/runs/log-batch", error=ConnectionError())
        waited += retry.get_backoff_time()
    assert waited >= OUTAGE_BUDGET_S >= 60
