"""Which failures are worth retrying, and the one policy that retries them.

A step that fails because a server did not answer (MinIO, MLflow, the network between) may
succeed a little later; a step that fails because of its input (a bad config, unusable data, a
model that loses too much accuracy in int8) fails the same way every time. Kubeflow Pipelines v2
retries a task whatever the cause, so the pipeline's components retry inside the step, for
transient causes only, and the pipeline keeps a KFP retry only where a lost pod is the thing to
survive (training, which resumes from its last checkpoint).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TypeVar

import tenacity

log = logging.getLogger("visionflow.retry")

T = TypeVar("T")

# The budget: a step runs at most ATTEMPTS times; it waits FIRST_WAIT_S before the first retry,
# twice that before the next (10 s, then 20 s).
ATTEMPTS = 3
FIRST_WAIT_S = 10.0

# MLflow's answers that mean "try again later" (HTTP 429, 503).
_TRANSIENT_MLFLOW_CODES = {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED"}
# S3's (MinIO's) answers that mean the same.
_TRANSIENT_S3_CODES = {"InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout"}


class TransientError(RuntimeError):
    """A failure that may not happen again: a server that did not answer, a dropped connection."""


def is_transient(err: BaseException) -> bool:
    """True when `err`, or an exception it was raised from or while handling, is a transient
    cause: our TransientError (an unreachable store or tracking server), a refused or dropped
    connection, a timeout, or a server's "try again later"."""
    import requests
    import urllib3

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
        if type(err).__name__ == "S3Error" and getattr(err, "code", None) in _TRANSIENT_S3_CODES:
            return True
        # `raise ... from None` says the earlier exception is not the cause: do not look past it
        err = err.__cause__ or (None if err.__suppress_context__ else err.__context__)
    return False


def retrying(
    fn: Callable[..., T], attempts: int = ATTEMPTS, first_wait_s: float = FIRST_WAIT_S
) -> Callable[..., T]:
    """`fn`, retried on transient failures only; any other failure is raised at once."""

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
