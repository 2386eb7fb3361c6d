"""Upload a compiled pipeline to Kubeflow Pipelines and run it, through `kfp.Client`.

A package is uploaded once per content: its version is named `<pipeline>-<sha256[:12]>` of the
package bytes, and an upload first looks that version up, so the same package uploaded twice
(by `visionflow pipeline upload`, `submit` or the Helm hook) is one pipeline version.

Credentials, first found wins: a bearer token in `$KF_PIPELINES_TOKEN`; in a pod, the projected
service-account token kfp reads (`$KF_PIPELINES_SA_TOKEN_PATH`, default
/var/run/secrets/kubeflow/pipelines/token); then kfp's own mechanisms (IAP client id, the
cookie or header in ~/.config/kfp/context.json). No credential is ever logged or printed.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

log = logging.getLogger("visionflow.cluster.kfp")

TOKEN_ENV = "KF_PIPELINES_TOKEN"
HEALTHZ = "/apis/v2beta1/healthz"
CONNECT_TIMEOUT_S = 5.0
SUCCEEDED = {"SUCCEEDED", "SKIPPED"}
FAILED = {"FAILED", "CANCELED"}
_TOKEN_HINT = (
    f"set {TOKEN_ENV} to a bearer token the cluster accepts, e.g. "
    "`kubectl create token <serviceaccount> -n <namespace> --audience pipelines.kubeflow.org`"
)


class SubmitError(RuntimeError):
    """Uploading or running a pipeline on Kubeflow failed; the message says why.

    `status` is the HTTP status when the server answered, None when it could not be reached.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class SubmitResult:
    """A started (or, with wait=True, finished) run."""

    run_id: str
    url: str
    state: str
    experiment_id: str = ""
    pipeline_id: str = ""
    version_id: str = ""


def version_name(pipeline_name: str, package: bytes) -> str:
    """The pipeline version name for a package: the same bytes, the same name."""
    return f"{pipeline_name}-{hashlib.sha256(package).hexdigest()[:12]}"


def run_url(host: str, run_id: str) -> str:
    """The run's page in the KFP UI (`$KF_PIPELINES_UI_ENDPOINT` if the UI lives elsewhere)."""
    ui = os.environ.get("KF_PIPELINES_UI_ENDPOINT") or host
    return f"{ui.rstrip('/')}/#/runs/details/{run_id}"


def params_from_overrides(overrides: list[str]) -> dict[str, Any]:
    """Pipeline parameters from Hydra `key=value` overrides: `run_id=` is its own parameter.

    They are checked here against the run parameters' allow-list (visionflow.kfp.params), as
    the configure step will check them on the cluster: a refused one (storage, tracking,
    `_target_`, `${...}`, ...) fails before anything is uploaded.
    """
    from visionflow.kfp.params import check_override, check_run_id

    run_ids = [o.split("=", 1)[1] for o in overrides if o.startswith("run_id=")]
    rest = [check_override(o) for o in overrides if not o.startswith("run_id=")]
    return {"overrides": rest, "run_id": check_run_id(run_ids[-1]) if run_ids else ""}


def upload(
    host: str, package: Path, pipeline_name: str, *, namespace: str | None = None, client=None
) -> tuple[str, str]:
    """Upload a compiled pipeline package as a version of `pipeline_name`, once per content.

    Creates the pipeline if it does not exist; adds the version unless one with this content's
    name is already there. Returns (pipeline_id, version_id).
    """
    data, spec = _read_package(Path(package))
    client, namespace = _open(host, namespace, client)
    return _upload(client, host, Path(package), data, spec, pipeline_name, namespace)


def submit(
    host: str,
    package: Path,
    pipeline_name: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    *,
    wait: bool = False,
    timeout_s: float = 86400,
    namespace: str | None = None,
    client=None,
    service_account: str | None = None,
    poll_s: float = 10.0,
) -> SubmitResult:
    """Upload the package (see `upload`), then run that version in `experiment`.

    The experiment is created if it does not exist. `service_account` runs the pipeline's pods
    as that Kubernetes service account (None: the cluster's default for pipeline runs). With
    wait=True, follows the run, polling every poll_s seconds, until it ends; raises SubmitError
    if it ends FAILED or CANCELED or is still going after timeout_s.
    """
    package = Path(package)
    data, spec = _read_package(package)
    _check_params(spec, params)
    client, namespace = _open(host, namespace, client)
    pipeline_id, version_id = _upload(client, host, package, data, spec, pipeline_name, namespace)
    with _api(f"getting or creating experiment '{experiment}'", host, namespace):
        experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
    with _api(f"starting run '{run_name}'", host, namespace):
        run = client.run_pipeline(
            experiment_id=experiment_id,
            job_name=run_name,
            params=params,
            pipeline_id=pipeline_id,
            version_id=version_id,
            service_account=service_account,
        )
    result = SubmitResult(run.run_id, run_url(host, run.run_id), _state(run), experiment_id,
                          pipeline_id, version_id)  # fmt: skip
    log.info("run '%s' started in experiment '%s': %s", run_name, experiment, result.url)
    return _wait(client, host, result, run_name, timeout_s, poll_s) if wait else result


# ---- connecting ----


def _open(host: str, namespace: str | None, client) -> tuple[Any, str | None]:
    """A kfp.Client for host, after checking in seconds that a KFP API answers there."""
    if client is not None:
        return client, namespace or client.get_user_namespace() or None
    if not re.match(r"https?://[^/]", host or ""):
        raise SubmitError(f"host must be an http:// or https:// URL, got {host!r}")
    host = host.rstrip("/")
    token, credentials = _credentials()
    health = _healthz(host, token)
    multi_user = bool(health.get("multi_user"))
    if namespace and not multi_user:
        log.warning("Kubeflow Pipelines at %s is single-user; namespace '%s' is ignored",
                    host, namespace)  # fmt: skip
        namespace = None
    import kfp

    kwargs: dict[str, Any] = {"existing_token": token} if token else {}
    if credentials is not None:
        kwargs["credentials"] = credentials
    with _api("connecting", host, namespace):
        client = kfp.Client(host=host, namespace=namespace or "kubeflow", **kwargs)
    namespace = namespace or (client.get_user_namespace() if multi_user else None) or None
    if multi_user and not namespace:
        raise SubmitError(
            f"Kubeflow Pipelines at {host} is multi-user: pass a namespace (your Kubeflow "
            "profile's namespace, e.g. --namespace kubeflow-user-example-com)"
        )
    return client, namespace


def _credentials() -> tuple[str | None, Any]:
    """(bearer token, kfp credentials object); both None leaves it to kfp's own mechanisms."""
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token:
        return token, None
    from kfp.client import (
        KF_PIPELINES_SA_TOKEN_ENV,
        KF_PIPELINES_SA_TOKEN_PATH,
        ServiceAccountTokenVolumeCredentials,
    )

    path = os.environ.get(KF_PIPELINES_SA_TOKEN_ENV) or KF_PIPELINES_SA_TOKEN_PATH
    if os.path.isfile(path):  # in a pod with a projected KFP token (e.g. the Helm hook Job)
        return Path(path).read_text().strip(), ServiceAccountTokenVolumeCredentials(path)
    return None, None


def _healthz(host: str, token: str | None) -> dict[str, Any]:
    """GET the KFP healthz with a short timeout, so a wrong host fails in seconds, not minutes."""
    import certifi
    import urllib3

    http = urllib3.PoolManager(
        retries=False,
        timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=CONNECT_TIMEOUT_S),
        cert_reqs="CERT_REQUIRED",
        ca_certs=certifi.where(),
    )
    headers = {"Accept": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    try:
        resp = http.request("GET", host + HEALTHZ, headers=headers, redirect=False)
    except urllib3.exceptions.HTTPError as e:
        raise SubmitError(
            f"cannot reach Kubeflow Pipelines at {host}: {_reason(e)}. Check the URL (for a "
            "port-forward: `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`, then "
            "--host http://localhost:8080)"
        ) from None
    if resp.status in (301, 302, 303, 307, 308):
        login = (resp.headers.get("Location") or "").split("?")[0]
        raise SubmitError(
            f"Kubeflow Pipelines at {host} redirected the API call to a login page ({login}): "
            f"the API needs credentials; {_TOKEN_HINT}",
            resp.status,
        )
    if resp.status in (401, 403):
        why = f"the token in {TOKEN_ENV} was refused" if token else _TOKEN_HINT
        raise SubmitError(
            f"Kubeflow Pipelines at {host} refused the request (HTTP {resp.status}): {why}",
            resp.status,
        )
    if resp.status == 404:
        raise SubmitError(
            f"no Kubeflow Pipelines API at {host} (GET {HEALTHZ} answered 404): "
            "is this the KFP UI or API address?",
            404,
        )
    if resp.status != 200:
        raise SubmitError(
            f"Kubeflow Pipelines at {host} is not healthy: HTTP {resp.status} "
            f"{_body_message(resp.data)}",
            resp.status,
        )
    try:
        return resp.json()
    except ValueError:
        raise SubmitError(
            f"{host} answered GET {HEALTHZ} but not as a Kubeflow Pipelines API (not JSON): "
            "is this the KFP UI or API address?"
        ) from None


@contextlib.contextmanager
def _api(what: str, host: str, namespace: str | None) -> Iterator[None]:
    """Turn kfp/HTTP errors into SubmitError; keep kfp's own prints out of our output."""
    import kfp_server_api
    import urllib3

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed), warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # kfp.Client's version notice
            yield
    except kfp_server_api.ApiException as e:
        raise _api_error(e, what, host, namespace) from None
    except urllib3.exceptions.HTTPError as e:
        raise SubmitError(f"{what}: lost Kubeflow Pipelines at {host}: {_reason(e)}") from None
    except (ValueError, TimeoutError) as e:  # kfp: several experiments of a name, healthz retries
        raise SubmitError(f"{what} at {host}: {e}") from None
    finally:
        for line in printed.getvalue().splitlines():
            log.debug("kfp: %s", line)


def _api_error(e, what: str, host: str, namespace: str | None) -> SubmitError:
    status, msg = e.status or None, _body_message(e.body) or str(e.reason or "")
    if status is None:
        return SubmitError(f"{what}: cannot reach Kubeflow Pipelines at {host}: {msg}")
    if status == 401:
        return SubmitError(f"{what}: Kubeflow Pipelines at {host} refused the credentials "
                           f"(HTTP 401: {msg}); {_TOKEN_HINT}", status)  # fmt: skip
    if status == 403 and namespace:
        return SubmitError(
            f"{what}: not allowed in namespace '{namespace}' at {host} (HTTP 403: {msg}); the "
            "namespace does not exist or your identity has no access to it",
            status,
        )
    if status == 403:
        return SubmitError(f"{what}: not allowed at {host} (HTTP 403: {msg}); {_TOKEN_HINT}",
                           status)  # fmt: skip
    return SubmitError(f"{what} failed at {host}: HTTP {status}: {msg}", status)


def _body_message(body: bytes | str | None) -> str:
    """The server's own error message: grpc-gateway's `message` or the upload handler's."""
    if not body:
        return ""
    text = body.decode(errors="replace") if isinstance(body, bytes) else body
    try:
        data = json.loads(text)
        return str(data.get("message") or data.get("error_message") or data.get("error") or "")
    except (ValueError, AttributeError):
        return text.strip()[:300]


def _reason(e: Exception) -> str:
    # urllib3 puts the connection's repr first: keep only what happened
    return re.sub(r"^\w*Connection(Pool)?\(.*?\):\s*", "", str(e)) or type(e).__name__


# ---- the package ----


def _read_package(package: Path) -> tuple[bytes, dict[str, Any]]:
    if package.suffix not in (".yaml", ".yml"):  # the API server picks its reader by suffix
        raise SubmitError(f"pipeline package must be a compiled .yaml file, got {package}")
    try:
        data = package.read_bytes()
    except OSError as e:
        raise SubmitError(
            f"cannot read pipeline package {package}: {e.strerror}. Compile it first: "
            "`visionflow pipeline compile -o FILE`"
        ) from None
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    try:  # a second YAML document, if any, holds the platform (Kubernetes) spec
        spec = next(yaml.load_all(data, Loader=loader))
    except (yaml.YAMLError, StopIteration):
        spec = None
    if not isinstance(spec, dict) or "pipelineInfo" not in spec or "root" not in spec:
        raise SubmitError(f"{package} is not a compiled KFP pipeline (no pipelineInfo/root)")
    return data, spec


_TYPES = {"STRING": str, "NUMBER_INTEGER": int, "NUMBER_DOUBLE": (int, float),
          "BOOLEAN": bool, "LIST": list, "STRUCT": dict}  # fmt: skip


def _check_params(spec: dict[str, Any], params: dict[str, Any]) -> None:
    """Fail before any network call on a parameter the pipeline does not take or a wrong type."""
    declared = spec["root"].get("inputDefinitions", {}).get("parameters", {})
    unknown = sorted(set(params) - set(declared))
    if unknown:
        raise SubmitError(
            f"unknown pipeline parameter(s) {', '.join(unknown)}; the pipeline takes: "
            f"{', '.join(sorted(declared))}"
        )
    for name, value in params.items():
        kind = declared[name].get("parameterType", "")
        want = _TYPES.get(kind)
        wrong_bool = isinstance(value, bool) and kind in ("NUMBER_INTEGER", "NUMBER_DOUBLE")
        if want is not None and (not isinstance(value, want) or wrong_bool):
            raise SubmitError(
                f"pipeline parameter {name} is {kind}, got {type(value).__name__} {value!r}"
            )


# ---- upload, run, wait ----


def _equals(key: str, value: str) -> str:
    return json.dumps({"predicates": [{"operation": "EQUALS", "key": key, "stringValue": value}]})


def _upload(client, host: str, package: Path, data: bytes, spec: dict[str, Any],
            pipeline_name: str, namespace: str | None) -> tuple[str, str]:  # fmt: skip
    import kfp_server_api

    version = version_name(pipeline_name, data)
    with _api(f"looking up pipeline '{pipeline_name}'", host, namespace):
        pipeline_id = _find_pipeline(client, pipeline_name, namespace)
        if pipeline_id is None:
            # A pipeline without a version, so that its only version carries the content name.
            description = spec["pipelineInfo"].get("description")
            body = kfp_server_api.V2beta1Pipeline(name=pipeline_name, display_name=pipeline_name,
                                                  description=description, namespace=namespace)  # fmt: skip
            try:
                pipeline_id = client.pipelines.pipeline_service_create_pipeline(body).pipeline_id
                log.info("created pipeline '%s' (%s)", pipeline_name, pipeline_id)
            except kfp_server_api.ApiException as e:
                if e.status != 409:  # 409: created meanwhile by someone else
                    raise
                pipeline_id = _find_pipeline(client, pipeline_name, namespace)
    with _api(f"uploading version '{version}' of pipeline '{pipeline_name}'", host, namespace):
        version_id = _find_version(client, pipeline_id, version)
        if version_id is not None:
            log.info("pipeline '%s' already has version '%s'", pipeline_name, version)
            return pipeline_id, version_id
        try:
            version_id = client.upload_pipeline_version(
                str(package), version, pipeline_id=pipeline_id
            ).pipeline_version_id
            log.info("uploaded pipeline '%s' version '%s'", pipeline_name, version)
        except kfp_server_api.ApiException as e:
            if e.status != 409:
                raise
            version_id = _find_version(client, pipeline_id, version)
    if not pipeline_id or not version_id:
        raise SubmitError(f"pipeline '{pipeline_name}' version '{version}' vanished at {host}")
    return pipeline_id, version_id


def _find_pipeline(client, name: str, namespace: str | None) -> str | None:
    found = client.list_pipelines(filter=_equals("display_name", name), namespace=namespace,
                                  page_size=100).pipelines or []  # fmt: skip
    ids = [p.pipeline_id for p in found if name in (p.display_name, p.name)]
    if len(ids) > 1:
        raise SubmitError(f"{len(ids)} pipelines are named '{name}'; rename or delete all but one")
    return ids[0] if ids else None


def _find_version(client, pipeline_id: str, name: str) -> str | None:
    found = client.list_pipeline_versions(pipeline_id, filter=_equals("display_name", name),
                                          page_size=100).pipeline_versions or []  # fmt: skip
    ids = [v.pipeline_version_id for v in found if name in (v.display_name, v.name)]
    return ids[0] if ids else None


def _state(run) -> str:
    return str(getattr(run, "state", None) or "PENDING")


def _wait(client, host: str, result: SubmitResult, run_name: str, timeout_s: float,
          poll_s: float, max_misses: int = 5) -> SubmitResult:  # fmt: skip
    """Poll the run until it ends; a few transient errors in a row (5xx, network) are retried."""
    deadline, state, misses = time.monotonic() + timeout_s, result.state, 0
    while True:
        try:
            with _api(f"following run '{run_name}' ({result.run_id})", host, None):
                run = client.get_run(result.run_id)
            misses = 0
        except SubmitError as e:
            transient = e.status is None or e.status >= 500
            misses += 1
            if not transient or misses > max_misses:
                raise
            log.warning("%s; retrying", e)
            run = None
        if run is not None and _state(run) != state:
            state = _state(run)
            log.info("run '%s' is %s", run_name, state)
        if state in SUCCEEDED:
            return dataclasses.replace(result, state=state)
        if state in FAILED:
            error = getattr(run, "error", None)
            why = f": {error.message}" if getattr(error, "message", None) else ""
            raise SubmitError(
                f"run '{run_name}' ({result.run_id}) ended {state}{why}; see {result.url}"
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise SubmitError(
                f"run '{run_name}' ({result.run_id}) is still {state} after {timeout_s:g} s; "
                f"it goes on in the cluster: {result.url}"
            )
        time.sleep(min(poll_s, left))
