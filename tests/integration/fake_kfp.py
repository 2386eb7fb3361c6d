"""A stand-in for the Kubeflow Pipelines API server (v2beta1), for tests only.

A real KFP API server needs a Kubernetes cluster, MySQL and Argo, none of which can run here, so
this module serves the few KFP v2beta1 HTTP endpoints that `kfp.Client` 2.17 calls when
visionflow uploads a pipeline and starts and follows a run, on 127.0.0.1, from memory:

    GET  /apis/v2beta1/healthz
    GET  /apis/v2beta1/pipelines                         (filter, namespace)
    POST /apis/v2beta1/pipelines                         (a pipeline without a version)
    GET  /apis/v2beta1/pipelines/{id}
    POST /apis/v2beta1/pipelines/upload                  (multipart: uploadfile; name, namespace)
    GET  /apis/v2beta1/pipelines/{id}/versions           (filter)
    GET  /apis/v2beta1/pipelines/{id}/versions/{vid}
    POST /apis/v2beta1/pipelines/upload_version          (multipart: uploadfile; name, pipelineid)
    GET  /apis/v2beta1/experiments                       (filter, namespace)
    POST /apis/v2beta1/experiments
    GET  /apis/v2beta1/experiments/{id}
    POST /apis/v2beta1/runs
    GET  /apis/v2beta1/runs/{id}

It answers as the real server does where the client can tell: JSON with proto field names, empty
lists left out, 409 for a duplicate pipeline or version name, 400 for a run parameter the
pipeline does not declare, 401 without the expected bearer token, 403 for a namespace the caller
may not use and 400 for an experiment without a namespace in multi-user mode. It keeps every
uploaded package's bytes and every created run (with its runtime parameters) for tests to check,
and plays each run through a scripted state sequence, one state per `GET /runs/{id}`.
"""

from __future__ import annotations

import email.parser
import email.policy
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

import yaml

API = "/apis/v2beta1"
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class HttpError(Exception):
    def __init__(self, status: int, message: str, code: int = 3):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


@dataclass
class Version:
    id: str
    pipeline_id: str
    name: str
    package: bytes
    created_at: str

    def json(self) -> dict[str, Any]:
        return {"pipeline_id": self.pipeline_id, "pipeline_version_id": self.id,
                "name": self.name, "display_name": self.name, "created_at": self.created_at}  # fmt: skip

    def parameters(self) -> dict[str, Any]:
        spec = next(yaml.load_all(self.package, Loader=_LOADER))
        return spec.get("root", {}).get("inputDefinitions", {}).get("parameters", {})


@dataclass
class Run:
    id: str
    display_name: str
    experiment_id: str
    pipeline_id: str
    version_id: str
    parameters: dict[str, Any]
    states: list[str]
    created_at: str
    service_account: str = ""
    state: str = "PENDING"
    polls: int = 0

    def json(self) -> dict[str, Any]:
        out = {"run_id": self.id, "display_name": self.display_name,
               "experiment_id": self.experiment_id, "state": self.state,
               "pipeline_version_reference": {"pipeline_id": self.pipeline_id,
                                              "pipeline_version_id": self.version_id},
               "runtime_config": {"parameters": self.parameters},
               "storage_state": "AVAILABLE", "created_at": self.created_at}  # fmt: skip
        if self.state == "FAILED":
            out["error"] = {"code": 2, "message": "task 'train' failed: exit code 1"}
        return out


@dataclass
class FakeKFP:
    """The fake server's state and controls. Use as a context manager, or start()/stop().

    Args:
        multi_user: Answer healthz as a multi-user deployment: experiments need a namespace.
        namespaces: The namespaces the caller may use (multi-user mode).
        token: When set, every request must carry `Authorization: Bearer <token>`.
        run_states: The states each new run goes through, one per GET after its creation.
    """

    multi_user: bool = False
    namespaces: tuple[str, ...] = ()
    token: str | None = None
    run_states: list[str] = field(default_factory=lambda: ["RUNNING", "SUCCEEDED"])

    pipelines: dict[str, dict[str, Any]] = field(default_factory=dict)
    versions: dict[str, Version] = field(default_factory=dict)
    experiments: dict[str, dict[str, Any]] = field(default_factory=dict)
    runs: dict[str, Run] = field(default_factory=dict)
    uploads: list[bytes] = field(default_factory=list)  # every package received, in order
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path)
    unknown: list[tuple[str, str]] = field(default_factory=list)  # requests nothing answered

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ---- lifecycle ----
    @property
    def url(self) -> str:
        assert self._server is not None, "start() the fake first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeKFP:
        fake = self

        class Handler(_Handler):
            kfp = fake

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeKFP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- for tests ----
    def versions_of(self, pipeline_id: str) -> list[Version]:
        return [v for v in self.versions.values() if v.pipeline_id == pipeline_id]

    def experiment_named(self, name: str) -> dict[str, Any]:
        (exp,) = [e for e in self.experiments.values() if e["display_name"] == name]
        return exp

    # ---- the API ----
    def _new_id(self, kind: str) -> str:
        return f"{kind}-{next(self._ids):04d}"

    def _check_namespace(self, namespace: str) -> None:
        if self.multi_user and namespace and namespace not in self.namespaces:
            raise HttpError(403, "Failed to authorize with API: PermissionDenied: User is not "
                            f"authorized in namespace '{namespace}'", code=7)  # fmt: skip

    def handle(self, method: str, path: str, query: dict[str, str], body: bytes,
               content_type: str) -> dict[str, Any]:  # fmt: skip
        with self._lock:
            return self._route(method, path, query, body, content_type)

    def _route(self, method, path, query, body, content_type) -> dict[str, Any]:
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        m = re.fullmatch(rf"{API}/(.+)", path)
        route = m.group(1) if m else ""
        if method == "GET" and route == "healthz":
            return {"multi_user": self.multi_user, "pipeline_store": "database"}

        if route == "pipelines" and method == "GET":
            namespace = query.get("namespace", "")
            self._check_namespace(namespace)
            found = [p for p in self.pipelines.values()
                     if p["namespace"] == namespace and _matches(p, query.get("filter"))]  # fmt: skip
            return _listing("pipelines", found)
        if route == "pipelines" and method == "POST":
            p = json.loads(body or b"{}")
            return self._create_pipeline(p.get("name") or p.get("display_name", ""),
                                         p.get("namespace", ""), p.get("description", ""), now)  # fmt: skip
        if route == "pipelines/upload" and method == "POST":
            data, filename = _uploaded_file(body, content_type)
            name = query.get("name") or query.get("display_name") or filename
            pipeline = self._create_pipeline(name, query.get("namespace", ""), "", now)
            self._add_version(pipeline["pipeline_id"], name, data, now)
            return pipeline
        if route == "pipelines/upload_version" and method == "POST":
            data, filename = _uploaded_file(body, content_type)
            pipeline_id = query.get("pipelineid", "")
            if pipeline_id not in self.pipelines:
                raise HttpError(400, "Failed to create a pipeline version")
            name = query.get("name") or query.get("display_name") or filename
            return self._add_version(pipeline_id, name, data, now).json()
        if m := re.fullmatch(r"pipelines/([^/]+)", route):
            return self._get(self.pipelines, m.group(1), "Pipeline")
        if m := re.fullmatch(r"pipelines/([^/]+)/versions", route):
            self._get(self.pipelines, m.group(1), "Pipeline")
            found = [v.json() for v in self.versions_of(m.group(1))]
            return _listing("pipeline_versions",
                            [v for v in found if _matches(v, query.get("filter"))])  # fmt: skip
        if m := re.fullmatch(r"pipelines/([^/]+)/versions/([^/]+)", route):
            return self._get(self.versions, m.group(2), "PipelineVersion").json()

        if route == "experiments" and method == "GET":
            namespace = query.get("namespace", "")
            self._check_namespace(namespace)
            found = [e for e in self.experiments.values()
                     if e["namespace"] == namespace and _matches(e, query.get("filter"))]  # fmt: skip
            return _listing("experiments", found)
        if route == "experiments" and method == "POST":
            e = json.loads(body or b"{}")
            namespace = e.get("namespace") or ""
            if self.multi_user and not namespace:
                raise HttpError(400, "Invalid input error: An experiment cannot have an empty "
                                "namespace in multi-user mode")  # fmt: skip
            self._check_namespace(namespace)
            exp = {"experiment_id": self._new_id("exp"), "display_name": e["display_name"],
                   "namespace": namespace if self.multi_user else "", "created_at": now,
                   "storage_state": "AVAILABLE"}  # fmt: skip
            self.experiments[exp["experiment_id"]] = exp
            return exp
        if m := re.fullmatch(r"experiments/([^/]+)", route):
            return self._get(self.experiments, m.group(1), "Experiment")

        if route == "runs" and method == "POST":
            return self._create_run(json.loads(body or b"{}"), now).json()
        if m := re.fullmatch(r"runs/([^/]+)", route):
            run = self._get(self.runs, m.group(1), "Run")
            if run.polls < len(run.states):
                run.state = run.states[run.polls]
            run.polls += 1
            return run.json()
        self.unknown.append((method, path))
        raise HttpError(404, f"Not Found: {method} {path}", code=5)

    def _get(self, table: dict, key: str, kind: str) -> Any:
        if key not in table:
            raise HttpError(404, f"{kind} {key} not found", code=5)
        return table[key]

    def _create_pipeline(self, name: str, namespace: str, description: str, now: str) -> dict:
        self._check_namespace(namespace)
        if any(p["name"] == name and p["namespace"] == namespace for p in self.pipelines.values()):
            raise HttpError(409, "Failed to create a pipeline and a pipeline version", code=6)
        p = {"pipeline_id": self._new_id("pipeline"), "name": name, "display_name": name,
             "namespace": namespace, "description": description, "created_at": now}  # fmt: skip
        self.pipelines[p["pipeline_id"]] = p
        return p

    def _add_version(self, pipeline_id: str, name: str, data: bytes, now: str) -> Version:
        if any(v.name == name for v in self.versions_of(pipeline_id)):
            raise HttpError(409, "Failed to create a pipeline version", code=6)
        try:
            spec = next(yaml.load_all(data, Loader=_LOADER))
            assert isinstance(spec, dict) and "pipelineInfo" in spec
        except Exception:  # noqa: BLE001  (what the real server says for any unreadable file)
            raise HttpError(400, "Failed to read a pipeline spec file") from None
        self.uploads.append(data)
        version = Version(self._new_id("version"), pipeline_id, name, data, now)
        self.versions[version.id] = version
        return version

    def _create_run(self, body: dict[str, Any], now: str) -> Run:
        exp = self._get(self.experiments, body.get("experiment_id", ""), "Experiment")
        self._check_namespace(exp["namespace"])
        ref = body.get("pipeline_version_reference") or {}
        version = self._get(self.versions, ref.get("pipeline_version_id", ""), "PipelineVersion")
        if ref.get("pipeline_id") != version.pipeline_id:
            raise HttpError(
                400, "Invalid input error: pipeline version does not belong to the pipeline"
            )
        params = (body.get("runtime_config") or {}).get("parameters") or {}
        unknown = set(params) - set(version.parameters())
        if unknown:
            raise HttpError(
                400, f"Invalid input error: unrecognized input parameter(s) {sorted(unknown)}"
            )
        run = Run(self._new_id("run"), body.get("display_name", ""), exp["experiment_id"],
                  version.pipeline_id, version.id, params, list(self.run_states), now,
                  body.get("service_account") or "")  # fmt: skip
        self.runs[run.id] = run
        return run


class _Handler(BaseHTTPRequestHandler):
    kfp: FakeKFP

    def _serve(self, method: str) -> None:
        parts = urlsplit(self.path)
        self.kfp.requests.append((method, parts.path))
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        query = {k: v[0] for k, v in parse_qs(parts.query).items()}
        try:
            if self.kfp.token is not None and (
                self.headers.get("Authorization") != f"Bearer {self.kfp.token}"
            ):
                raise HttpError(401, "Unauthenticated: Request header error: there is no user "
                                "identity header.", code=16)  # fmt: skip
            status, out = 200, self.kfp.handle(method, parts.path, query, body,
                                               self.headers.get("Content-Type", ""))  # fmt: skip
        except HttpError as e:
            status, out = e.status, {"error": e.message, "code": e.code, "message": e.message}
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        self._serve("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._serve("POST")

    def log_message(self, format: str, *args: Any) -> None:  # quiet; requests are recorded
        pass


def _listing(key: str, items: list[dict[str, Any]]) -> dict[str, Any]:
    # proto3 JSON leaves out an empty repeated field, as the real server does
    return {key: items, "total_size": len(items)} if items else {}


def _matches(item: dict[str, Any], filter_json: str | None) -> bool:
    if not filter_json:
        return True
    for p in json.loads(filter_json).get("predicates", []):
        if p.get("operation") not in ("EQUALS", 1):
            raise HttpError(400, f"fake KFP: unsupported filter operation {p.get('operation')}")
        value = p.get("stringValue", p.get("string_value"))
        if item.get(p["key"]) != value:
            return False
    return True


def _uploaded_file(body: bytes, content_type: str) -> tuple[bytes, str]:
    """The `uploadfile` part of a multipart/form-data body, as the real server reads it."""
    if not content_type.startswith("multipart/form-data"):
        raise HttpError(400, "Failed to read pipeline from file")
    msg = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
        f"Content-Type: {content_type}\r\n\r\n".encode() + body
    )
    for part in msg.iter_parts():
        if part.get_param("name", header="content-disposition") == "uploadfile":
            return part.get_payload(decode=True), part.get_filename() or ""
    raise HttpError(400, "Failed to read pipeline from file")
