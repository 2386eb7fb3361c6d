"""What the API server (and the operators' admission webhooks) accept when a job is created.

Each `validate_*` function returns the list of `Cause`s a real cluster would report for an
object, empty when it is accepted. Two layers, checked in the order a real API server applies
them:

1. The schema. A CustomResourceDefinition's structural schema is the typed Go API, which the
   kubeflow SDKs mirror: PyTorchJob through kubeflow-training's openapi-generator models
   (`kubeflow.training.models`, pod templates as kubernetes client `V1PodTemplateSpec`),
   TrainJob through kubeflow-trainer-api's pydantic models. Those models accept anything when
   constructed, so `strict_check` walks them itself: every key must be a declared field, every
   required field present, every value of its declared type (quantities as int or a quantity
   string, int-or-string fields as either), each mistake reported with its JSON path
   (`spec.pytorchReplicaSpecs.Master.template.spec.containers[0].image`; map keys are dotted,
   as the schema validator writes them).

   A real API server *prunes* unknown fields of a CRD, or answers 400 "unknown field" when the
   client asks for `fieldValidation=Strict`; this stand-in refuses them with 422 so that a
   typo in a manifest can never pass silently.

2. The operator's rules, written here from its source (field paths as `field.Path` renders
   them there, map keys in brackets: `spec.pytorchReplicaSpecs[Master].replicas`):

   - PyTorchJob, Training Operator v1.9 (kubeflow.org/v1):
     https://github.com/kubeflow/training-operator/blob/release-1.9/pkg/webhooks/pytorch/pytorchjob_webhook.go
     https://github.com/kubeflow/training-operator/blob/release-1.9/pkg/webhooks/utils/utils.go
     https://github.com/kubeflow/training-operator/blob/release-1.9/pkg/common/util/webhooks.go
   - TrainJob, Kubeflow Trainer v2.3 (trainer.kubeflow.org/v1alpha1): the kubebuilder markers
     and CEL rules of
     https://github.com/kubeflow/trainer/blob/master/pkg/apis/trainer/v1alpha1/trainjob_types.go
     and the torch plugin's reserved environment variables
     (pkg/runtime/framework/plugins/torch/torch.go, pkg/constants/constants.go).

   Rules beyond the source are marked "stricter than the operator" where they are written.

A NetworkPolicy is checked against the Kubernetes 1.30 schema (kubernetes-validate, strict).
"""

from __future__ import annotations

import functools
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass
from datetime import datetime
from typing import Any

PYTORCHJOB = ("kubeflow.org", "v1", "PyTorchJob", "pytorchjobs")
TRAINJOB = ("trainer.kubeflow.org", "v1alpha1", "TrainJob", "trainjobs")
K8S_VERSION = "1.30.0"

# The field.ErrorType names the API server puts in a Status's causes.
INVALID = "FieldValueInvalid"
REQUIRED = "FieldValueRequired"
NOT_SUPPORTED = "FieldValueNotSupported"
TYPE_INVALID = "FieldValueTypeInvalid"
FORBIDDEN = "FieldValueForbidden"


@dataclass(frozen=True)
class Cause:
    """One reason an object is invalid, as a Status cause: field path, reason, message."""

    field: str
    reason: str
    message: str
    layer: str = "schema"  # schema | webhook: who refuses it on a real cluster

    def as_dict(self) -> dict[str, str]:
        return {"reason": self.reason, "message": self.message, "field": self.field}

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def _show(value: Any) -> str:
    """A value as field errors print it: strings quoted, numbers bare, the rest by JSON type."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(_json_type(value))


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def invalid(field: str, value: Any, detail: str, layer: str = "schema") -> Cause:
    return Cause(field, INVALID, f"Invalid value: {_show(value)}: {detail}", layer)


def required(field: str, detail: str = "", layer: str = "schema") -> Cause:
    return Cause(field, REQUIRED, "Required value" + (f": {detail}" if detail else ""), layer)


def not_supported(field: str, value: Any, supported, layer: str = "schema") -> Cause:
    values = ", ".join(json.dumps(v) for v in supported)
    return Cause(
        field,
        NOT_SUPPORTED,
        f"Unsupported value: {_show(value)}: supported values: {values}",
        layer,
    )


def forbidden(field: str, detail: str, layer: str = "webhook") -> Cause:
    return Cause(field, FORBIDDEN, f"Forbidden: {detail}", layer)


def type_invalid(field: str, value: Any, expected: str) -> Cause:
    got = _json_type(value)
    return Cause(
        field,
        TYPE_INVALID,
        f'Invalid value: "{got}": {field} in body must be of type {expected}: "{got}"',
    )


def invalid_status(kind: str, group: str, name: str | None, causes: list[Cause]) -> dict:
    """The 422 Status body the API server answers for an invalid object."""
    errors = [str(c) for c in causes]
    summary = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'{kind}.{group} "{name or ""}" is invalid: {summary}',
        "reason": "Invalid",
        "details": {
            "name": name or "",
            "group": group,
            "kind": kind,
            "causes": [c.as_dict() for c in causes],
        },
        "code": 422,
    }


def webhook_denied_status(webhook: str, causes: list[Cause]) -> dict:
    """What a cluster answers when a validating webhook refuses an object: controller-runtime's
    `admission.Denied` (403 Forbidden) carrying the aggregated field errors."""
    errors = [str(c) for c in causes]
    summary = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": f'admission webhook "{webhook}" denied the request: {summary}',
        "reason": "Forbidden",
        "details": {},
        "code": 403,
    }


# --- the strict schema walk ----------------------------------------------------------------------
#
# A type is a tuple: ("model", cls), ("list", T), ("dict", T), ("str",), ("int",), ("float",),
# ("bool",), ("any",), ("datetime",), ("quantity",), ("int-or-string",).

QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
_PRIMITIVES = {
    "str": ("str",),
    "int": ("int",),
    "float": ("float",),
    "bool": ("bool",),
    "object": ("any",),
    "datetime": ("datetime",),
    "date": ("str",),
    "Quantity": ("quantity",),
}


@functools.cache
def _special_fields() -> dict[str, dict[str, str]]:
    """Kubernetes client class -> {json key: "quantity" | "int-or-string"}, from the 1.30 schema.

    The generated client types quantities as `str` and IntOrString as `object`; the schema
    says which fields they are.
    """
    from importlib import resources

    defs_file = resources.files("kubernetes_validate").joinpath(
        f"kubernetes-json-schema/v{K8S_VERSION}-local-strict/_definitions.json"
    )
    definitions = json.loads(defs_file.read_text())["$defs"]
    kinds = {
        "io.k8s.apimachinery.pkg.api.resource.Quantity": "quantity",
        "io.k8s.apimachinery.pkg.util.intstr.IntOrString": "int-or-string",
    }
    out: dict[str, dict[str, str]] = {}
    for name, schema in definitions.items():
        parts = name.split(".")
        if len(parts) < 3 or not re.fullmatch(r"v\d+((alpha|beta)\d+)?", parts[-2]):
            continue
        cls = parts[-2].capitalize() + parts[-1]
        for key, prop in (schema.get("properties") or {}).items():
            ref = prop.get("$ref") or (prop.get("additionalProperties") or {}).get("$ref") or ""
            special = kinds.get(ref.rsplit("/", 1)[-1])
            if special:
                out.setdefault(cls, {})[key] = special
    return out


def _model_class(name: str):
    import kubernetes.client.models as k8s_models
    from kubeflow.training import models as kf_models

    for module in (kf_models, k8s_models):
        if hasattr(module, name):
            return getattr(module, name)
    # The training SDK names a few Kubernetes types by their Go package: K8sIoApiAutoscalingV2X.
    if m := re.fullmatch(r"K8sIoApi[A-Z][a-z]+(V\d+(?:(?:alpha|beta)\d+)?)(\w+)", name):
        return getattr(k8s_models, m.group(1) + m.group(2), None)
    return None


def _parse_openapi(spec: str) -> tuple:
    if spec.startswith("list[") and spec.endswith("]"):
        return ("list", _parse_openapi(spec[5:-1]))
    if spec.startswith("dict(") and spec.endswith(")"):
        return ("dict", _parse_openapi(spec[5:-1].split(",", 1)[1].strip()))
    if spec in _PRIMITIVES:
        return _PRIMITIVES[spec]
    cls = _model_class(spec)
    if cls is None:
        raise TypeError(f"unknown type {spec!r} in the SDK models: the strict check cannot walk it")
    return ("model", cls)


@functools.cache
def _openapi_fields(cls) -> dict[str, tuple[tuple, bool]]:
    """json key -> (type, required) of an openapi-generator model class."""
    special = _special_fields().get(cls.__name__, {})
    fields: dict[str, tuple[tuple, bool]] = {}
    for attr, spec in cls.openapi_types.items():
        key = cls.attribute_map[attr]
        kind = _parse_openapi(spec)
        if key in special:
            inner = (special[key],)
            kind = ("dict", inner) if kind[0] == "dict" else inner
        setter = getattr(cls, attr).fset
        # The generated setters of required fields refuse None ("must not be `None`").
        needed = setter is not None and "must not be `None`" in inspect.getsource(setter)
        fields[key] = (kind, needed)
    return fields


def _parse_annotation(annotation) -> tuple:
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _parse_annotation(args[0])
    if origin in (typing.Union, types.UnionType):
        kinds = [_parse_annotation(a) for a in args if a is not type(None)]
        if len(kinds) == 1:
            return kinds[0]
        if {k[0] for k in kinds} <= {"int", "float"}:
            return ("float",)
        return ("any",)
    if origin is list:
        return ("list", _parse_annotation(args[0]))
    if origin is dict:
        return ("dict", _parse_annotation(args[1]))
    if annotation is str:
        return ("str",)
    if annotation is bool:
        return ("bool",)
    if annotation is int:
        return ("int",)
    if annotation is float:
        return ("float",)
    if annotation is datetime:
        return ("datetime",)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if "one_of_schemas" in annotation.model_fields:  # a oneOf wrapper
            return ("quantity",) if "Quantity" in annotation.__name__ else ("int-or-string",)
        return ("model", annotation)
    return ("any",)


@functools.cache
def _pydantic_fields(cls) -> dict[str, tuple[tuple, bool]]:
    return {
        (info.alias or name): (_parse_annotation(info.annotation), info.is_required())
        for name, info in cls.model_fields.items()
    }


def _fields(cls) -> dict[str, tuple[tuple, bool]]:
    return _pydantic_fields(cls) if hasattr(cls, "model_fields") else _openapi_fields(cls)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def strict_check(value: Any, kind: tuple, path: str = "") -> list[Cause]:
    """Every unknown field, missing required field and wrongly typed value under `value`."""
    causes: list[Cause] = []
    _walk(value, kind, path, causes)
    return causes


def _walk(value: Any, kind: tuple, path: str, causes: list[Cause]) -> None:
    tag = kind[0]
    if value is None or tag == "any":
        return  # null is "not set"; required fields are checked by their parent
    if tag == "model":
        if not isinstance(value, dict):
            causes.append(type_invalid(path, value, "object"))
            return
        fields = _fields(kind[1])
        for key in value:
            if key not in fields:
                where = _join(path, key)
                causes.append(
                    invalid(where, key, f'unknown field "{where}": field not declared in schema')
                )
        for key, (sub, needed) in fields.items():
            if value.get(key) is None:
                if needed:
                    causes.append(required(_join(path, key)))
                continue
            _walk(value[key], sub, _join(path, key), causes)
    elif tag == "list":
        if not isinstance(value, list):
            causes.append(type_invalid(path, value, "array"))
            return
        for i, item in enumerate(value):
            _walk(item, kind[1], f"{path}[{i}]", causes)
    elif tag == "dict":
        if not isinstance(value, dict):
            causes.append(type_invalid(path, value, "object"))
            return
        for key, item in value.items():
            _walk(item, kind[1], _join(path, str(key)), causes)
    elif tag == "str":
        if not isinstance(value, str):
            causes.append(type_invalid(path, value, "string"))
    elif tag == "int":
        if not isinstance(value, int) or isinstance(value, bool):
            causes.append(type_invalid(path, value, "integer"))
    elif tag == "float":
        if not isinstance(value, int | float) or isinstance(value, bool):
            causes.append(type_invalid(path, value, "number"))
    elif tag == "bool":
        if not isinstance(value, bool):
            causes.append(type_invalid(path, value, "boolean"))
    elif tag == "datetime":
        if not isinstance(value, str):
            causes.append(type_invalid(path, value, "string"))
        elif not _rfc3339(value):
            causes.append(invalid(path, value, "must be an RFC 3339 date-time"))
    elif tag == "quantity":
        # The CRD schema of a Quantity: int-or-string, the string matching the quantity grammar.
        if isinstance(value, bool) or not isinstance(value, int | str):
            causes.append(type_invalid(path, value, "integer or string"))
        elif isinstance(value, str) and not QUANTITY.match(value):
            causes.append(invalid(path, value, f"should match '{QUANTITY.pattern}'"))
    elif tag == "int-or-string" and (isinstance(value, bool) or not isinstance(value, int | str)):
        causes.append(type_invalid(path, value, "integer or string"))


def _rfc3339(text: str) -> bool:
    try:
        datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


# --- names ----------------------------------------------------------------------------------------

DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _dns1035_errors(name: str) -> list[str]:
    """apimachinery's IsDNS1035Label messages."""
    errs = []
    if len(name) > 63:
        errs.append("must be no more than 63 characters")
    if not DNS1035_LABEL.match(name):
        errs.append(
            "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start "
            "with an alphabetic character, and end with an alphanumeric character (e.g. "
            "'my-name',  or 'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
        )
    return errs


def _metadata_name(obj: dict) -> list[Cause]:
    """What the API server itself requires of every object's name (generateName not supported)."""
    name = (obj.get("metadata") or {}).get("name")
    if not isinstance(name, str) or not name:
        return [required("metadata.name", "name or generateName is required")]
    if len(name) > 253 or not DNS1123_SUBDOMAIN.match(name):
        return [
            invalid(
                "metadata.name",
                name,
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric "
                "characters, '-' or '.', and must start and end with an alphanumeric character",
            )
        ]
    return []


# --- PyTorchJob -----------------------------------------------------------------------------------

PYTORCH_REPLICA_TYPES = ("Master", "Worker")
PYTORCH_CONTAINER = "pytorch"
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("None", "Running", "All")
MANAGED_BY = ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue")
NPROC_WORDS = ("auto", "cpu", "gpu")
PYTORCH_WEBHOOK = "validator.pytorchjob.training-operator.kubeflow.org"


def validate_pytorchjob(obj: Any) -> list[Cause]:
    """The causes a v1.9 cluster (CRD schema, then the operator's webhook) reports; [] if valid."""
    from kubeflow.training.models import KubeflowOrgV1PyTorchJob

    if not isinstance(obj, dict):
        return [type_invalid("", obj, "object")]
    causes = strict_check(obj, ("model", KubeflowOrgV1PyTorchJob))
    causes += _metadata_name(obj)
    if causes:
        return causes  # schema errors stop the request before admission webhooks run
    return _pytorchjob_rules(obj)


def _pytorchjob_rules(job: dict) -> list[Cause]:
    causes: list[Cause] = []
    name = job["metadata"]["name"]
    if errs := _dns1035_errors(name):
        causes.append(invalid("metadata.name", name, "should match: " + ",".join(errs), "webhook"))
    spec = job.get("spec") or {}
    policy = spec.get("runPolicy") or {}
    managed = policy.get("managedBy")
    if managed is not None and managed not in MANAGED_BY:
        causes.append(not_supported("spec.runPolicy.managedBy", managed, MANAGED_BY, "webhook"))

    # Stricter than the operator: its Go API enumerates these values (common_types.go), but the
    # v1.9 webhook does not check them; a typo then misbehaves in the controller at run time.
    clean = policy.get("cleanPodPolicy")
    if clean is not None and clean not in CLEAN_POD_POLICIES:
        causes.append(
            not_supported("spec.runPolicy.cleanPodPolicy", clean, CLEAN_POD_POLICIES, "webhook")
        )
    for key in ("backoffLimit", "ttlSecondsAfterFinished", "activeDeadlineSeconds"):
        # apimachinery's ValidateNonnegativeField, as the operators apply it to a RunPolicy
        if isinstance(policy.get(key), int) and policy[key] < 0:
            causes.append(
                invalid(
                    f"spec.runPolicy.{key}",
                    policy[key],
                    "must be greater than or equal to 0",
                    "webhook",
                )
            )
    nproc = spec.get("nprocPerNode")
    # Stricter than the operator: the API documents "auto, cpu, gpu or an int" (what torchrun
    # takes); the operator passes anything on to PET_NPROC_PER_NODE.
    if nproc is not None and nproc not in NPROC_WORDS and not re.fullmatch(r"[1-9][0-9]*", nproc):
        causes.append(
            invalid("spec.nprocPerNode", nproc, "must be auto, cpu, gpu or an integer", "webhook")
        )

    specs = spec.get("pytorchReplicaSpecs")
    base = "spec.pytorchReplicaSpecs"
    if specs is None:
        causes.append(required(base, "must be required", "webhook"))
        specs = {}
    elastic = spec.get("elasticPolicy")
    if elastic is not None:
        if "Worker" not in specs:
            causes.append(
                required(
                    f"{base}[Worker]", "must be configured if elastic policy is used", "webhook"
                )
            )
        if elastic.get("nProcPerNode") is not None and nproc is not None:
            causes.append(
                forbidden(
                    "spec.elasticPolicy.nProcPerNode", "must not be used with spec.nprocPerNode"
                )
            )
    for rtype, rspec in specs.items():
        role = f"{base}[{rtype}]"
        containers_path = f"{role}.template.spec.containers"
        if rtype not in PYTORCH_REPLICA_TYPES:
            causes.append(not_supported(role, rtype, PYTORCH_REPLICA_TYPES, "webhook"))
        rspec = rspec or {}
        containers = ((rspec.get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            causes.append(required(containers_path, "must be specified", "webhook"))
        for i, container in enumerate(containers):
            if not container.get("image"):
                causes.append(
                    required(f"{containers_path}[{i}].image", "must be required", "webhook")
                )
        if not any(c.get("name") == PYTORCH_CONTAINER for c in containers):
            causes.append(
                required(
                    containers_path,
                    f"must have at least one container with name {PYTORCH_CONTAINER}",
                    "webhook",
                )
            )
        replicas = rspec.get("replicas")
        if rtype == "Master" and replicas is not None and replicas != 1:
            causes.append(forbidden(f"{role}.replicas", "must be 1"))
        elif rtype != "Master" and replicas is not None and replicas < 1:
            causes.append(forbidden(f"{role}.replicas", "must be at least 1"))
        restart = rspec.get("restartPolicy")
        # Stricter than the operator (see cleanPodPolicy above).
        if restart is not None and restart not in RESTART_POLICIES:
            causes.append(
                not_supported(f"{role}.restartPolicy", restart, RESTART_POLICIES, "webhook")
            )
    return causes


# --- TrainJob -------------------------------------------------------------------------------------

TRAINJOB_MANAGED_BY = ("trainer.kubeflow.org/trainjob-controller", "kueue.x-k8s.io/multikueue")
TORCHRUN_RESERVED_ENVS = (
    "PET_NNODES",
    "PET_NPROC_PER_NODE",
    "PET_NODE_RANK",
    "PET_MASTER_ADDR",
    "PET_MASTER_PORT",
)
RUNTIME_KINDS = ("ClusterTrainingRuntime", "TrainingRuntime")
TRAINJOB_WEBHOOK = "validator.trainjob.trainer.kubeflow.org"


def validate_trainjob(obj: Any) -> list[Cause]:
    """The causes a Trainer v2.3 cluster reports for a TrainJob; [] if it is accepted."""
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    if not isinstance(obj, dict):
        return [type_invalid("", obj, "object")]
    causes = strict_check(obj, ("model", TrainerV1alpha1TrainJob))
    causes += _metadata_name(obj)
    causes += _trainjob_schema_rules(obj) if not causes else []
    if causes:
        return causes
    return _trainjob_webhook_rules(obj)


def _too_long(field: str, value: Any, limit: int) -> list[Cause]:
    if isinstance(value, str) and len(value) > limit:
        return [Cause(field, "FieldValueTooLong", f"Too long: may not be more than {limit} bytes")]
    return []


def _trainjob_schema_rules(job: dict) -> list[Cause]:
    """The CRD's kubebuilder markers and CEL rules (trainjob_types.go)."""
    causes: list[Cause] = []
    name = job["metadata"]["name"]
    if not DNS1035_LABEL.match(name):
        causes.append(
            invalid("metadata.name", name, "metadata.name must match RFC 1035 DNS label format")
        )
    if len(name) > 63:
        causes.append(
            invalid("metadata.name", name, "metadata.name must be no more than 63 characters")
        )
    spec = job.get("spec")
    if spec is None:  # runtimeRef is +required, so a TrainJob without a spec cannot run
        return [*causes, required("spec.runtimeRef")]
    ref = spec.get("runtimeRef") or {}
    if "runtimeRef" in spec and not ref.get("name"):
        causes.append(
            Cause(
                "spec.runtimeRef.name",
                INVALID,
                'Invalid value: "": should be at least 1 chars long',
            )
        )
    for key in ("name", "apiGroup", "kind"):
        causes += _too_long(f"spec.runtimeRef.{key}", ref.get(key), 253)
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and deadline < 1:
        causes.append(
            invalid("spec.activeDeadlineSeconds", deadline, "should be greater than or equal to 1")
        )
    managed = spec.get("managedBy")
    if managed is not None and managed not in TRAINJOB_MANAGED_BY:
        causes.append(
            invalid(
                "spec.managedBy",
                managed,
                "ManagedBy must be trainer.kubeflow.org/trainjob-controller or "
                "kueue.x-k8s.io/multikueue if set",
            )
        )
    trainer = spec.get("trainer") or {}
    causes += _too_long("spec.trainer.image", trainer.get("image"), 500)
    for key in ("command", "args", "env"):
        if len(trainer.get(key) or []) > 128:
            causes.append(
                Cause(
                    f"spec.trainer.{key}",
                    "FieldValueTooMany",
                    "Too many: must have at most 128 items",
                )
            )
    # Stricter than the Trainer (its API has no minimum on numNodes): fewer than one node is a
    # JobSet without a trainer pod, which never runs.
    nodes = trainer.get("numNodes")
    if nodes is not None and nodes < 1:
        causes.append(
            invalid("spec.trainer.numNodes", nodes, "should be greater than or equal to 1")
        )
    procs = trainer.get("numProcPerNode")
    if procs is not None and procs < 1:  # stricter, for the same reason
        causes.append(
            invalid("spec.trainer.numProcPerNode", procs, "should be greater than or equal to 1")
        )
    return causes


def _trainjob_webhook_rules(job: dict) -> list[Cause]:
    """The Trainer's validating webhook: a known runtime kind, no torchrun env set by hand."""
    causes: list[Cause] = []
    ref = job["spec"]["runtimeRef"]
    kind = ref.get("kind", "ClusterTrainingRuntime")
    group = ref.get("apiGroup", "trainer.kubeflow.org")
    if kind not in RUNTIME_KINDS or group != "trainer.kubeflow.org":
        causes.append(
            Cause("spec.runtimeRef", INVALID, f"unsupported runtime: {kind}.{group}", "webhook")
        )
    env = (job["spec"].get("trainer") or {}).get("env") or []
    reserved = sorted({e.get("name") for e in env} & set(TORCHRUN_RESERVED_ENVS))
    if reserved:
        causes.append(
            Cause(
                "spec.trainer.env",
                INVALID,
                f'Invalid value: "array": must not have reserved envs: {reserved}',
                "webhook",
            )
        )
    return causes


# --- NetworkPolicy --------------------------------------------------------------------------------

_JSONSCHEMA_REASONS = {
    "required": REQUIRED,
    "type": TYPE_INVALID,
    "enum": NOT_SUPPORTED,
    "additionalProperties": INVALID,
}


def validate_networkpolicy(obj: Any) -> list[Cause]:
    """A NetworkPolicy against the Kubernetes 1.30 schema (strict: no unknown fields)."""
    import kubernetes_validate

    if not isinstance(obj, dict):
        return [type_invalid("", obj, "object")]
    causes = _metadata_name(obj)
    try:
        kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        field = ".".join(f"[{p}]" if isinstance(p, int) else str(p) for p in err.path)
        field = field.replace(".[", "[")
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            for key in sorted(set(err.instance) - set(err.schema.get("properties") or {})):
                where = _join(field, key)
                message = f'unknown field "{where}": field not declared in schema'
                causes.append(invalid(where, key, message))
        else:
            causes.append(
                Cause(field, _JSONSCHEMA_REASONS.get(err.validator, INVALID), err.message)
            )
    except (kubernetes_validate.SchemaNotFoundError, KeyError) as err:
        causes.append(
            Cause("apiVersion", INVALID, f"no NetworkPolicy schema for this object: {err}")
        )
    return causes
