"""What every call to the Kubernetes API shares: timeouts and reading its errors."""

from __future__ import annotations

import json
from typing import Any

CONNECT_TIMEOUT_S = 5.0
READ_TIMEOUT_S = 30.0


def error_status(exc) -> tuple[str, dict[str, Any]]:
    """The message and details of an ApiException's Status body (or its raw body)."""
    body = getattr(exc, "body", None) or ""
    if isinstance(body, bytes):
        body = body.decode("utf-8", "replace")
    try:
        parsed = json.loads(body)
    except (TypeError, ValueError):
        return (body.strip() or str(getattr(exc, "reason", "") or exc)), {}
    if not isinstance(parsed, dict):
        return str(parsed), {}
    return str(parsed.get("message") or getattr(exc, "reason", "") or body), parsed.get(
        "details"
    ) or {}


def is_unreachable(exc: BaseException) -> bool:
    import urllib3
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        return exc.status == 0
    return isinstance(exc, urllib3.exceptions.HTTPError | OSError)


def is_transient(exc: BaseException) -> bool:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException) and exc.status:
        return exc.status == 429 or exc.status >= 500
    return is_unreachable(exc)
