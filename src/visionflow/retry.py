"""Which failures are worth retrying, and the one policy that retries them.

A call that fails because a server did not answer (MinIO, MLflow, the network between) may
succeed a little later; a call that fails because of its input (a bad config, unusable data, a
missing bucket, a refused credential) fails the same way every time. So:

- **Transient failures** (`is_transient`): a refused, reset or dropped connection, a timeout,
  HTTP 5xx and 429, S3's `SlowDown`, `ServiceUnavailable`, `InternalError`, `RequestTimeout`.
  Everything else (403, 404, `NoSuchBucket`, a bad request) fails at once.
- **A server that never answered is misconfigured, one that answered once is in an outage.**
  A step checks each server once when it starts (`S3Store` looks for its bucket,
  `tracking.check_reachable` asks MLflow's `/health`), without retrying: a wrong endpoint is the
  user's to fix and fails in seconds, naming it. Every call after that retries transient
  failures with exponential backoff and full jitter (waits drawn from 0 to 0.5 s, 1 s, 2 s, ...
  up to MAX_WAIT_S) for OUTAGE_BUDGET_S, then fails naming the service and the operation
  (`ServiceUnavailable`). No attempt waits longer than ATTEMPT_TIMEOUT_S for an answer.
- **S3 calls** go through `call` (tenacity); the MinIO SDK's own retries are off.
  **MLflow calls** are retried by MLflow's own HTTP client, set from this policy by
  `mlflow_http_env` (the same budget, timeout and transient statuses): MLflow's fluent API,
  its model registry and its artifact transfers have no hook for wrapping each request, and two
  retry layers would multiply.
- **Steps** (`retrying`): Kubeflow Pipelines v2 retries a task whatever the cause, so the
  pipeline's components retry the whole step, a few times, for transient causes only. This is
  for a step that starts while a server is down (the start check above fails it fast) and for
  an outage longer than a call's budget; the pipeline keeps a KFP retry only where a lost pod is
  the thing to survive (training, which resumes from its last checkpoint).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import TypeVar

import tenacity

log = logging.getLogger("visionflow.retry")

T = TypeVar("T")

# A call: retried for at least this long after its first failure ...
OUTAGE_BUDGET_S = 120.0
# ... waiting at most this long between attempts (so a server that is back is seen soon) ...
MAX_WAIT_S = 10.0
# ... and at most this long for an answer to one attempt (a server that accepts and hangs).
ATTEMPT_TIMEOUT_S = 30

# A step: it runs at most ATTEMPTS times; it waits FIRST_WAIT_S before the first retry,
# twice that before the next (10 s, then 20 s).
ATTEMPTS = 3
FIRST_WAIT_S = 10.0

# MLflow's answers that mean "try again later" (HTTP 429, 503).
_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
# S3's (MinIO's) answers that mean the same.
_TRANSIENT_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


class TransientError(RuntimeError):
    """A failure that may not happen again: a server that did not answer, a dropped connection."""


class ServiceUnavailable(TransientError):
    """A service failed a call transiently for the whole retry budget."""


def is_transient(err: BaseException) -> bool:
    """True when `err`, or an exception it was raised from or while handling, is a transient
    cause: our TransientError (an unreachable store or tracking server), a refused or dropped
    connection, a timeout, or a server's "try again later" (an HTTP 5xx or 429, S3's SlowDown)."""
    import requests
    import urllib3
    from minio.error import InvalidResponseError, S3Error, ServerError

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(
            err,
            TransientError
            | ConnectionError
            | TimeoutError
            | urllib3.exceptions.HTTPError
            | requests.exceptions.ConnectionError
            | requests.exceptions.Timeout,
        ):
            return True
        if getattr(err, "error_code", None) in _TRANSIENT_MLFLOW_CODES:
            return True
        if isinstance(err, S3Error) and err.code in _TRANSIENT_S3_CODES:
            return True
        # An answer that is not S3's XML: a proxy's or load balancer's 502, 503, 504
        if isinstance(err, ServerError) and err.status_code >= 500:
            return True
        if isinstance(err, InvalidResponseError) and _status_of(err) >= 500:
            return True
        # `raise ... from None` says the earlier exception is not the cause: do not look past it
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return False


def _status_of(err: BaseException) -> int:
    """The HTTP status in the MinIO SDK's InvalidResponseError, which keeps it only in its text."""
    found = re.search(r"Response code: (\d+)", str(err))
    return int(found[1]) if found else 0


def call(fn: Callable[[], T], service: str, operation: str, budget_s: float = OUTAGE_BUDGET_S) -> T:
    """`fn()`, retried on transient failures for `budget_s`; then `ServiceUnavailable` naming
    `service` and `operation`. Any other failure is raised at once."""
    start = time.monotonic()

    def say(state: tenacity.RetryCallState) -> None:
        log.warning(
            "%s: %s failed (%s); retrying for up to %.0f s more",
            service, operation, state.outcome.exception(), budget_s - state.seconds_since_start,
        )  # fmt: skip

    try:
        return tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=tenacity.stop_after_delay(budget_s),
            wait=tenacity.wait_random_exponential(multiplier=0.5, max=MAX_WAIT_S),
            before_sleep=say,
        )(fn)
    except tenacity.RetryError as gave_up:
        last = gave_up.last_attempt.exception()
        raise ServiceUnavailable(
            f"{service} did not answer for {time.monotonic() - start:.0f} s: "
            f"{operation} failed: {last}"
        ) from last


def mlflow_http_env() -> dict[str, str]:
    """MLflow's HTTP client settings (environment variables) for this policy.

    MLflow retries through urllib3: connection errors, timeouts, HTTP 408, 429 and 5xx, with
    waits of 0, 2, 4, 8 ... s (times BACKOFF_FACTOR, plus up to BACKOFF_JITTER s each), so the
    number of retries is the first whose waits add up to OUTAGE_BUDGET_S.
    """
    factor, retries, waited = 1, 1, 0.0
    while waited < OUTAGE_BUDGET_S:
        retries += 1
        waited += min(factor * 2 ** (retries - 1), 120)  # urllib3's longest wait
    return {
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries),
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": str(factor),
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1.0",
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(ATTEMPT_TIMEOUT_S),
    }


def retrying(
    fn: Callable[..., T], attempts: int = ATTEMPTS, first_wait_s: float = FIRST_WAIT_S
) -> Callable[..., T]:
    """The step `fn`, rerun on transient failures only; any other failure is raised at once."""

    def say(state: tenacity.RetryCallState) -> None:
        log.warning(
            "transient failure (attempt %d of %d): %s; retrying in %.0f s",
            state.attempt_number, attempts, state.outcome.exception(), state.next_action.sleep,
        )  # fmt: skip

    return tenacity.Retrying(
        retry=tenacity.retry_if_exception(is_transient),
        stop=tenacity.stop_after_attempt(attempts),
        wait=tenacity.wait_exponential(multiplier=first_wait_s, exp_base=2, min=first_wait_s),
        before_sleep=say,
        reraise=True,
    ).wraps(fn)
