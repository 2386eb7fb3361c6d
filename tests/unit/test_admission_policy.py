"""The chart's ValidatingAdmissionPolicy (templates/admission-policy.yaml), evaluated offline.

The chart is rendered as in test_chart.py; the policy's CEL (matchConditions, variables,
validations, messageExpressions) is taken from the rendered YAML and evaluated with the `cel`
library against admission requests shaped as the API server builds them (`object`, `oldObject`,
`request`, `variables`). `Admission` mirrors Kubernetes' rules: matchConstraints first, then every
matchCondition must be true (one false: the policy does not apply; an error: failurePolicy), then
each validation must be true, or the request gets its messageExpression, else its message; an
error counts as a failure (failurePolicy Fail). The binding's validationActions decide whether a
failure denies. The policy uses standard CEL only, so this library and the API server agree.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import cel
import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from visionflow.cluster.pytorchjob import build_pytorchjob
from visionflow.core.config import load_config

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "visionflow"
CASES = ["defaults"] + sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))
RELEASE, NAMESPACE = "visionflow", "ml-team"
K8S_VERSION = "1.30.0"
APP = yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]
TRAIN_IMAGE = f"ghcr.io/visionflow/visionflow-train:{APP}"
CPU_IMAGE = f"ghcr.io/visionflow/visionflow:{APP}"
CHART_USER = f"system:serviceaccount:{NAMESPACE}:{RELEASE}"
POLICY_KINDS = ("ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
# kind -> (group, version, resource) of the request the API server would see.
RESOURCES = {
    "PyTorchJob": ("kubeflow.org", "v1", "pytorchjobs"),
    "TFJob": ("kubeflow.org", "v1", "tfjobs"),
    "TrainJob": ("trainer.kubeflow.org", "v1alpha1", "trainjobs"),
}
# Functions of standard CEL that the cel library and Kubernetes' CEL share. Kubernetes' own
# libraries (strings ext, lists, regex, quantity, ...) stay out, so these tests mean something.
PORTABLE_CALLS = {"has", "size", "all", "exists", "exists_one", "map", "filter", "string", "int"}


def values_of(case: str) -> dict:
    return (
        {}
        if case == "defaults"
        else yaml.safe_load((CHART / "ci" / f"{case}.yaml").read_text()) or {}
    )


def render(values: dict, name: str = RELEASE, namespace: str = NAMESPACE) -> list[dict]:
    """The chart's documents, after validating the values against values.schema.json."""
    return copy.deepcopy(_render(json.dumps(values, sort_keys=True), name, namespace))


@functools.cache
def _render(values: str, name: str, namespace: str) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(json.loads(values)))
        rendered = chart.render(json.loads(values), name=name, namespace=namespace, is_install=True)
    return [
        d
        for path, text in sorted(rendered.items())
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]


def policy_docs(docs: list[dict]) -> tuple[dict, dict]:
    (policy,) = [d for d in docs if d["kind"] == POLICY_KINDS[0]]
    (binding,) = [d for d in docs if d["kind"] == POLICY_KINDS[1]]
    return policy, binding


# - the evaluator ---------------------------------------------------------------------------------


@dataclass
class Review:
    matched: bool
    failures: list[str] = field(default_factory=list)  # the messages of failed validations
    actions: tuple[str, ...] = ()
    failed: list[int] = field(default_factory=list)  # their indexes in spec.validations

    @property
    def allowed(self) -> bool:
        return not (self.failures and "Deny" in self.actions)


class Admission:
    """One ValidatingAdmissionPolicy and its binding, as the API server evaluates them."""

    def __init__(self, policy: dict, binding: dict):
        self.spec = policy["spec"]
        assert binding["spec"]["policyName"] == policy["metadata"]["name"]
        assert not {"matchResources", "paramRef"} & set(binding["spec"]), "not evaluated here"
        assert not {"paramKind", "auditAnnotations"} & set(self.spec), "not evaluated here"
        self.actions = tuple(binding["spec"]["validationActions"])
        self.failure_policy = self.spec.get("failurePolicy", "Fail")
        self.programs: dict[str, cel.Program] = {}

    def run(self, expression: str, context: dict):
        if expression not in self.programs:
            self.programs[expression] = cel.compile(expression)
        return self.programs[expression].execute(context)

    def constraints_match(self, request: dict, namespace_labels: dict) -> bool:
        constraints = self.spec["matchConstraints"]
        assert set(constraints) <= {"resourceRules", "namespaceSelector", "matchPolicy"}
        assert constraints.get("matchPolicy", "Equivalent") == "Equivalent"
        selector = constraints.get("namespaceSelector", {})
        assert set(selector) <= {"matchLabels"}, "only matchLabels is evaluated here"
        if any(namespace_labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
            return False
        res = request["resource"]

        def hit(wanted: list[str], value: str) -> bool:
            return "*" in wanted or value in wanted

        return any(
            hit(r["apiGroups"], res["group"])
            and hit(r["apiVersions"], res["version"])
            and hit(r["resources"], res["resource"])
            and hit(r["operations"], request["operation"])
            for r in constraints["resourceRules"]
        )

    def review(
        self,
        obj: dict,
        *,
        user: str = CHART_USER,
        operation: str = "CREATE",
        old: dict | None = None,
        namespace: str = NAMESPACE,
    ) -> Review:
        group, version, resource = RESOURCES[obj["kind"]]
        request = {
            "uid": "0",
            "kind": {"group": group, "version": version, "kind": obj["kind"]},
            "resource": {"group": group, "version": version, "resource": resource},
            "name": obj["metadata"].get("name", ""),
            "namespace": namespace,
            "operation": operation,
            "userInfo": {"username": user, "groups": ["system:authenticated"]},
            "dryRun": False,
        }
        if not self.constraints_match(request, {"kubernetes.io/metadata.name": namespace}):
            return Review(matched=False)
        # The object as the API server holds it: JSON, with the request's namespace.
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["namespace"] = namespace
        context = {"object": obj, "oldObject": old, "request": request}
        errors = []
        for condition in self.spec.get("matchConditions", []):  # no `variables` here
            try:
                result = self.run(condition["expression"], context)
            except Exception as err:  # any evaluation error counts
                errors.append(f"{condition['name']}: {err}")
                continue
            assert isinstance(result, bool), condition
            if not result:
                return Review(matched=False)
        if errors:
            assert self.failure_policy == "Fail"
            return Review(matched=True, failures=errors, actions=self.actions)
        # Variables are evaluated lazily and once; one that fails fails what reads it.
        values, broken = {}, {}
        for var in self.spec.get("variables", []):
            if any(re.search(rf"variables\.{b}\b", var["expression"]) for b in broken):
                broken[var["name"]] = "reads a variable that failed"
                continue
            try:
                values[var["name"]] = self.run(var["expression"], {**context, "variables": values})
            except Exception as err:  # it fails what reads it
                broken[var["name"]] = str(err)
        context["variables"] = values
        failures, failed = [], []
        for index, rule in enumerate(self.spec["validations"]):
            failed_vars = [b for b in broken if re.search(rf"variables\.{b}\b", rule["expression"])]
            try:
                if failed_vars:
                    raise RuntimeError(f"variables {failed_vars} failed: {broken}")
                result = self.run(rule["expression"], context)
                assert isinstance(result, bool), rule["expression"]
            except Exception as err:  # failurePolicy Fail: a failure
                failures.append(f"expression {rule['expression']!r} resulted in error: {err}")
                failed.append(index)
                continue
            if not result:
                failures.append(self.message(rule, context))
                failed.append(index)
        return Review(matched=True, failures=failures, actions=self.actions, failed=failed)

    def message(self, rule: dict, context: dict) -> str:
        if "messageExpression" in rule:
            try:
                text = self.run(rule["messageExpression"], context)
            except Exception:  # Kubernetes falls back to `message`
                text = ""
            if isinstance(text, str) and text.strip() and "\n" not in text:
                return text
        return rule.get("message") or f"failed expression: {rule['expression']}"


@pytest.fixture(scope="module")
def admission() -> Admission:
    return Admission(*policy_docs(render({})))


# - jobs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def builder_job(tmp_path_factory):
    """build_pytorchjob's job, from the chart's own cluster config: (case, *overrides) -> job."""
    made: dict[tuple, dict] = {}
    home = tmp_path_factory.mktemp("home")

    def make(case: str = "defaults", *overrides: str) -> dict:
        key = (case, *overrides)
        if key not in made:
            docs = render(values_of(case))
            (cm,) = [
                d
                for d in docs
                if d["kind"] == "ConfigMap" and d["metadata"]["name"].endswith("-config")
            ]
            site = tmp_path_factory.mktemp("site")
            (site / "site").mkdir()
            (site / "site" / "cluster.yaml").write_text(cm["data"]["cluster.yaml"])
            args = ["run_id=policy-test", *overrides]
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("VISIONFLOW_HOME", str(home))
                for var in ("VISIONFLOW_SITE_CONFIG", "MLFLOW_TRACKING_URI", "AWS_ENDPOINT_URL"):
                    mp.delenv(var, raising=False)
                cfg = load_config([f"hydra.searchpath=[file://{site}]", "+site=cluster", *args])
            made[key] = build_pytorchjob(cfg, args)
        return copy.deepcopy(made[key])

    return make


def pods_of(job: dict) -> list[dict]:
    return [r["template"]["spec"] for r in job["spec"]["pytorchReplicaSpecs"].values()]


def worker(job: dict) -> dict:
    return job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"]["spec"]


def trainjob(**spec) -> dict:
    """A TrainJob (trainer.kubeflow.org/v1alpha1) as a visionflow builder would make it: the
    chart's image, and a runtime patch that makes the runtime's pods restricted."""
    pod = {
        "serviceAccountName": RELEASE,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": 10001,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [
            {
                "name": "node",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [{"name": "work", "mountPath": "/var/visionflow"}],
            }
        ],
        "volumes": [{"name": "work", "emptyDir": {}}],
    }
    patch = {
        "replicatedJobs": [{"name": "node", "template": {"spec": {"template": {"spec": pod}}}}]
    }
    job = {
        "apiVersion": "trainer.kubeflow.org/v1alpha1",
        "kind": "TrainJob",
        "metadata": {"name": "vf-policy-test"},
        "spec": {
            "runtimeRef": {"name": "torch-distributed"},
            "trainer": {
                "image": TRAIN_IMAGE,
                "command": ["visionflow", "train", "run_id=policy-test"],
                "numNodes": 2,
            },
            "runtimePatches": [
                {"manager": "visionflow", "trainingRuntimeSpec": {"template": {"spec": patch}}}
            ],
        },
    }
    job["spec"].update(spec)
    return job


def trainjob_pod(job: dict) -> dict:
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]
    return patch["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def failures(admission: Admission, job: dict, **kwargs) -> list[str]:
    review = admission.review(job, **kwargs)
    assert review.matched, "the policy did not apply"
    return review.failures


# - the rendered objects --------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_policy_and_binding_are_valid_kubernetes_1_30(case):
    docs = [d for d in render(values_of(case)) if d["kind"] in POLICY_KINDS]
    assert sorted(d["kind"] for d in docs) == sorted(POLICY_KINDS)
    for doc in docs:
        assert doc["apiVersion"] == "admissionregistration.k8s.io/v1"
        try:
            assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == "1.30"
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{doc['kind']} at {'/'.join(map(str, err.path))}: {err.message}")
    _, binding = policy_docs(docs)
    wanted = values_of(case).get("admissionPolicy", {}).get("validationActions", ["Deny"])
    assert binding["spec"]["validationActions"] == wanted


def test_kubernetes_validate_refuses_a_broken_policy():
    policy, _ = policy_docs(render({}))
    broken = copy.deepcopy(policy)
    broken["spec"]["validations"][0]["messageExpresion"] = "'typo'"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


def test_policy_matches_the_chart_service_account_jobs_and_denies():
    policy, binding = policy_docs(render({}))
    spec = policy["spec"]
    assert spec["failurePolicy"] == "Fail"
    assert binding["spec"] == {
        "policyName": policy["metadata"]["name"],
        "validationActions": ["Deny"],
    }
    rules = {
        (g, r, op)
        for rule in spec["matchConstraints"]["resourceRules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for op in rule["operations"]
    }
    assert rules == {
        (g, r, op)
        for g, r in (("kubeflow.org", "pytorchjobs"), ("trainer.kubeflow.org", "trainjobs"))
        for op in ("CREATE", "UPDATE")
    }
    assert spec["matchConstraints"]["namespaceSelector"] == {
        "matchLabels": {"kubernetes.io/metadata.name": NAMESPACE}
    }
    (condition,) = spec["matchConditions"]
    assert CHART_USER in condition["expression"]


def test_every_expression_is_portable_cel_and_every_validation_has_a_message():
    spec = policy_docs(render({}))[0]["spec"]
    expressions = [c["expression"] for c in spec["matchConditions"]]
    expressions += [v["expression"] for v in spec["variables"]]
    for rule in spec["validations"]:
        expressions += [rule["expression"], rule["messageExpression"]]
        assert rule["message"].startswith("visionflow: ") and "\n" not in rule["message"]
    for expression in expressions:
        cel.compile(expression)  # parses
        calls = set(
            re.findall(r"([A-Za-z_]\w*)\s*\(", re.sub(r"'[^']*'|\"[^\"]*\"", "", expression))
        )
        assert calls <= PORTABLE_CALLS, (calls - PORTABLE_CALLS, expression)
    # Variables may read only earlier ones (the API server refuses anything else).
    names = [v["name"] for v in spec["variables"]]
    for i, var in enumerate(spec["variables"]):
        read = set(re.findall(r"variables\.(\w+)", var["expression"]))
        assert read <= set(names[:i]), (var["name"], read)


def test_allowed_images_and_accounts_are_what_the_chart_renders():
    spec = policy_docs(render({}))[0]["spec"]
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    assert json.loads(variables["images"]) == [TRAIN_IMAGE, CPU_IMAGE]
    assert json.loads(variables["serviceAccounts"]) == [RELEASE]
    digest = "sha256:" + "1" * 64
    spec = policy_docs(
        render(
            {
                "image": {"digest": digest},
                "trainImage": {"tag": "0.1.0-cu130"},
                "serviceAccount": {"name": "trainer"},
                "config": {"cluster": {"image": "registry.example.com/vf-train:7"}},
            }
        )
    )[0]["spec"]
    variables = {v["name"]: v["expression"] for v in spec["variables"]}
    assert json.loads(variables["images"]) == [
        "ghcr.io/visionflow/visionflow-train:0.1.0-cu130",
        f"ghcr.io/visionflow/visionflow:{APP}@{digest}",
        "registry.example.com/vf-train:7",
    ]
    assert json.loads(variables["serviceAccounts"]) == ["trainer"]
    assert f"system:serviceaccount:{NAMESPACE}:trainer" in spec["matchConditions"][0]["expression"]
    # No service account of the chart's own: the namespace's default one.
    spec = policy_docs(render({"serviceAccount": {"create": False}}))[0]["spec"]
    assert f'system:serviceaccount:{NAMESPACE}:default"' in spec["matchConditions"][0]["expression"]


def test_values_turn_the_policy_off_or_to_warnings():
    kinds = {d["kind"] for d in render({"admissionPolicy": {"enabled": False}})}
    assert not kinds & set(POLICY_KINDS) and "ConfigMap" in kinds
    _, binding = policy_docs(render({"admissionPolicy": {"validationActions": ["Warn", "Audit"]}}))
    assert binding["spec"]["validationActions"] == ["Warn", "Audit"]
    for bad in (["Deny", "Warn"], [], ["Block"], ["Deny", "Deny"]):
        with pytest.raises(helm.HelmValuesError):
            render({"admissionPolicy": {"validationActions": bad}})


def test_names_are_per_release_and_namespace():
    names = {
        policy_docs(render({}, name=name, namespace=ns))[0]["metadata"]["name"]
        for name, ns in (("visionflow", "team-a"), ("visionflow", "team-b"), ("other", "team-a"))
    }
    assert names == {
        "visionflow-team-a-jobs",
        "visionflow-team-b-jobs",
        "other-visionflow-team-a-jobs",
    }
    long_ns = "n" * 63
    long_names = {
        policy_docs(render({}, name="r" * 53, namespace=ns))[0]["metadata"]["name"]
        for ns in (long_ns, long_ns[:-1] + "m")
    }
    assert len(long_names) == 2
    for name in long_names:
        assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


# - what it admits --------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize(
    "overrides",
    [
        ("cluster.nodes=1",),
        ("cluster.nodes=3",),
        ("cluster.nodes=3", f"cluster.service_account={RELEASE}"),
        ("cluster.nodes=2", "cluster.gpus_per_node=8"),
    ],
    ids=["1-node", "3-nodes", "3-nodes-chart-sa", "2-gpu-nodes"],
)
def test_the_builders_pytorchjob_is_admitted(case, overrides, builder_job):
    admission = Admission(*policy_docs(render(values_of(case))))
    job = builder_job(case, *overrides)
    assert len(pods_of(job)) == (1 if "cluster.nodes=1" in overrides else 2)
    review = admission.review(job)
    assert review.matched and review.allowed and review.failures == [], review.failures
    assert admission.review(job, operation="UPDATE", old=job).failures == []


def _context_on_containers(pod: dict):
    """runAsNonRoot and seccompProfile on every container instead of on the pod."""
    for c in pod["containers"]:
        c["securityContext"].update(runAsNonRoot=True, seccompProfile={"type": "RuntimeDefault"})
    del pod["securityContext"]["runAsNonRoot"], pod["securityContext"]["seccompProfile"]


def _init_container_of_the_cpu_image(pod: dict):
    restricted = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    pod["initContainers"] = [{"name": "fetch", "image": CPU_IMAGE, "securityContext": restricted}]


@pytest.mark.parametrize(
    "change",
    [
        _context_on_containers,
        lambda pod: pod["containers"][0]["securityContext"]["capabilities"].update(
            add=["NET_BIND_SERVICE"]
        ),
        lambda pod: pod.update(serviceAccountName=RELEASE),
        _init_container_of_the_cpu_image,
    ],
    ids=["container-level-context", "net-bind-service", "chart-sa", "init-with-cpu-image"],
)
def test_restricted_variants_are_admitted(change, admission, builder_job):
    job = builder_job("defaults", "cluster.nodes=2")
    for pod in pods_of(job):
        change(pod)
    assert failures(admission, job) == []


# - what it refuses -------------------------------------------------------------------------------


def _set(path: str, value):
    """A change to every pod of the job: set the dotted path (container 0 under `c.`)."""

    def change(pod: dict):
        target = pod["containers"][0] if path.startswith("c.") else pod
        *parents, last = path.removeprefix("c.").split(".")
        for key in parents:
            target = target.setdefault(key, {})
        if value is None:
            target.pop(last, None)
        else:
            target[last] = value

    return change


FOREIGN = "docker.io/library/python:3.12"
BAD_PYTORCHJOBS = {
    # id: (change to every pod, words the refusal must contain)
    "foreign-image": (
        _set("c.image", FOREIGN),
        f"not one of the chart's images ({TRAIN_IMAGE}, {CPU_IMAGE}) (container pytorch: {FOREIGN})",
    ),
    "other-tag": (_set("c.image", TRAIN_IMAGE + "-dev"), f"container pytorch: {TRAIN_IMAGE}-dev"),
    "tag-of-a-digest": (
        _set("c.image", f"{TRAIN_IMAGE}@sha256:{'2' * 64}"),
        "not one of the chart's images",
    ),
    "no-image": (_set("c.image", None), "(container pytorch: no image)"),
    "other-sa": (
        _set("serviceAccountName", "admin"),
        "other than the chart's (visionflow) or none (service account admin)",
    ),
    "deprecated-sa-field": (_set("serviceAccount", "admin"), "(service account admin)"),
    "hostpath": (
        lambda pod: pod["volumes"].append({"name": "host", "hostPath": {"path": "/"}}),
        "mounts a hostPath volume (volume host)",
    ),
    "hostNetwork": (
        _set("hostNetwork", True),
        "shares a namespace of the node (hostNetwork, hostPID, hostIPC) (hostNetwork)",
    ),
    "hostPID": (_set("hostPID", True), "(hostPID)"),
    "hostIPC": (_set("hostIPC", True), "(hostIPC)"),
    "privileged": (
        _set("c.securityContext.privileged", True),
        "runs a privileged container (container pytorch)",
    ),
    "no-runAsNonRoot": (
        _set("securityContext.runAsNonRoot", None),
        "may run as root: runAsNonRoot must be true (on the pod or every container) and runAsUser not 0 (container pytorch)",
    ),
    "runAsNonRoot-false": (_set("c.securityContext.runAsNonRoot", False), "may run as root"),
    "pod-runAsNonRoot-false": (
        lambda pod: (
            _set("securityContext.runAsNonRoot", False)(pod)
            or _set("c.securityContext.runAsNonRoot", True)(pod)
        ),
        "may run as root: runAsNonRoot must be true (on the pod or every container) and runAsUser not 0 (the pod)",
    ),
    "runAsUser-0": (_set("c.securityContext.runAsUser", 0), "may run as root"),
    "pod-runAsUser-0": (_set("securityContext.runAsUser", 0), "(the pod)"),
    "no-allowPrivilegeEscalation": (
        _set("c.securityContext.allowPrivilegeEscalation", None),
        "allows privilege escalation: every container must set allowPrivilegeEscalation false (container pytorch)",
    ),
    "allowPrivilegeEscalation": (
        _set("c.securityContext.allowPrivilegeEscalation", True),
        "allows privilege escalation",
    ),
    "capabilities-kept": (
        _set("c.securityContext.capabilities", {"drop": []}),
        "keeps Linux capabilities: every container must drop ALL and add none but NET_BIND_SERVICE (container pytorch)",
    ),
    "no-capabilities": (_set("c.securityContext.capabilities", None), "keeps Linux capabilities"),
    "capability-added": (
        _set("c.securityContext.capabilities.add", ["SYS_ADMIN"]),
        "keeps Linux capabilities",
    ),
    "no-seccomp": (
        _set("securityContext.seccompProfile", None),
        "runs without the RuntimeDefault seccomp profile (on the pod or every container) (container pytorch)",
    ),
    "seccomp-unconfined": (
        _set("c.securityContext.seccompProfile", {"type": "Unconfined"}),
        "every container) (container pytorch)",
    ),
    "pod-seccomp-unconfined": (
        lambda pod: (
            _set("securityContext.seccompProfile", {"type": "Unconfined"})(pod)
            or _set("c.securityContext.seccompProfile", {"type": "RuntimeDefault"})(pod)
        ),
        "RuntimeDefault seccomp profile (on the pod or every container) (the pod)",
    ),
    "init-foreign-image": (
        lambda pod: pod.update(
            initContainers=[
                {
                    "name": "fetch",
                    "image": FOREIGN,
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ]
        ),
        f"(container fetch: {FOREIGN})",
    ),
    "init-not-restricted": (
        lambda pod: pod.update(initContainers=[{"name": "fetch", "image": TRAIN_IMAGE}]),
        None,  # two rules: see test_an_unrestricted_init_container_breaks_two_rules
    ),
}


@pytest.mark.parametrize("case", [k for k, (_, words) in BAD_PYTORCHJOBS.items() if words])
def test_each_violation_is_refused_with_its_message(case, admission, builder_job):
    change, words = BAD_PYTORCHJOBS[case]
    job = builder_job("defaults", "cluster.nodes=3")
    change(worker(job))  # the Workers alone: every replica's template is checked
    review = admission.review(job)
    assert review.matched and not review.allowed
    (message,) = review.failures  # exactly one rule, the one broken
    assert message.startswith(f"visionflow: PyTorchJob {job['metadata']['name']} "), message
    assert words in message, message


def test_an_unrestricted_init_container_breaks_two_rules(admission, builder_job):
    job = builder_job("defaults", "cluster.nodes=2")
    BAD_PYTORCHJOBS["init-not-restricted"][0](worker(job))
    found = failures(admission, job)
    assert len(found) == 2 and all("(container fetch)" in m for m in found), found
    assert "privilege escalation" in found[0] and "Linux capabilities" in found[1]


def test_every_validation_can_refuse(admission, builder_job):
    """Between them, the bad jobs above and the TrainJobs below fail every validation."""
    jobs = [trainjob(trainer={"image": FOREIGN})]
    for change, _ in BAD_PYTORCHJOBS.values():
        jobs.append(builder_job("defaults", "cluster.nodes=2"))
        change(worker(jobs[-1]))
    seen = {i for job in jobs for i in admission.review(job).failed}
    assert seen == set(range(len(admission.spec["validations"])))


def test_a_broken_message_expression_falls_back_to_the_message(builder_job):
    policy, binding = policy_docs(render({}))
    for rule in policy["spec"]["validations"]:
        rule["messageExpression"] = "variables.noSuchVariable"
    job = builder_job("defaults", "cluster.nodes=1")
    _set("hostNetwork", True)(pods_of(job)[0])
    (message,) = failures(Admission(policy, binding), job)
    assert (
        message
        == "visionflow: a training job shares a namespace of the node (hostNetwork, hostPID, hostIPC)"
    )


def test_images_must_match_exactly_as_the_chart_renders_them(builder_job):
    """Pinned by digest in the chart: the same repository and tag without the digest is refused."""
    digest = "sha256:" + "3" * 64
    admission = Admission(*policy_docs(render({"trainImage": {"digest": digest}})))
    job = builder_job("defaults", "cluster.nodes=1")
    assert "not one of the chart's images" in failures(admission, job)[0]
    _set("c.image", f"{TRAIN_IMAGE}@{digest}")(pods_of(job)[0])
    assert failures(admission, job) == []


def test_config_overrides_of_image_and_account_are_allowed(builder_job):
    values = {
        "config": {
            "cluster": {"image": "registry.example.com/vf-train:7", "service_account": "trainer"}
        }
    }
    admission = Admission(*policy_docs(render(values)))
    job = builder_job("defaults", "cluster.nodes=2")
    for pod in pods_of(job):
        _set("c.image", "registry.example.com/vf-train:7")(pod)
        pod["serviceAccountName"] = "trainer"
    assert failures(admission, job) == []


def test_warn_only_binding_reports_but_admits(builder_job):
    admission = Admission(
        *policy_docs(render({"admissionPolicy": {"validationActions": ["Warn"]}}))
    )
    job = builder_job("defaults", "cluster.nodes=1")
    _set("hostPID", True)(pods_of(job)[0])
    review = admission.review(job)
    assert review.failures and review.allowed


# - whom and what it applies to -------------------------------------------------------------------


@pytest.mark.parametrize(
    "user",
    [
        f"system:serviceaccount:{NAMESPACE}:default-editor",
        f"system:serviceaccount:other-team:{RELEASE}",
        "alice@example.com",
    ],
)
def test_requests_of_other_users_are_not_matched(user, admission, builder_job):
    job = builder_job("defaults", "cluster.nodes=2")
    _set("c.image", FOREIGN)(worker(job))
    for bad in (job, trainjob(trainer={"image": FOREIGN})):
        assert failures(admission, bad)  # from the chart's account: refused
        review = admission.review(bad, user=user)
        assert not review.matched and review.allowed


def test_other_namespaces_operations_and_kinds_are_not_matched(admission, builder_job):
    job = builder_job("defaults", "cluster.nodes=2")
    _set("hostNetwork", True)(worker(job))
    assert not admission.review(job, namespace="other-team").matched
    assert not admission.review(job, operation="DELETE", old=job).matched
    tfjob = {**job, "kind": "TFJob"}
    assert not admission.review(tfjob).matched
    assert admission.review(job, operation="UPDATE", old=job).failures


# - TrainJobs -------------------------------------------------------------------------------------


def test_a_trainjob_of_the_v1alpha1_api_is_what_the_tests_send():
    """The TrainJob here is a valid Kubeflow Trainer (v2.3) object: no field is unknown to it."""
    from kubeflow_trainer_api.models.trainer_v1alpha1_train_job import TrainerV1alpha1TrainJob

    job = trainjob()
    assert TrainerV1alpha1TrainJob.from_dict(job).to_dict() == job


def test_a_restricted_trainjob_of_the_chart_image_is_admitted(admission):
    assert failures(admission, trainjob()) == []
    assert failures(admission, trainjob(trainer={"image": CPU_IMAGE})) == []
    bare = trainjob()
    del bare["spec"]["runtimePatches"]  # the runtime's pods as they are
    assert failures(admission, bare) == []


BAD_TRAINJOBS = {
    "foreign-image": (
        lambda job: job["spec"]["trainer"].update(image=FOREIGN),
        f"must set spec.trainer.image to one of the chart's images ({TRAIN_IMAGE}, {CPU_IMAGE}), not {FOREIGN}",
    ),
    "runtime-image": (
        lambda job: job["spec"]["trainer"].pop("image"),
        "not none (the runtime image)",
    ),
    "hostpath": (
        lambda job: trainjob_pod(job)["volumes"].append(
            {"name": "host", "hostPath": {"path": "/"}}
        ),
        "mounts a hostPath volume (volume host)",
    ),
    "other-sa": (
        lambda job: trainjob_pod(job).update(serviceAccountName="admin"),
        "(service account admin)",
    ),
    "privileged": (
        lambda job: trainjob_pod(job)["containers"][0]["securityContext"].update(privileged=True),
        "runs a privileged container (container node)",
    ),
    "runAsNonRoot-false": (
        lambda job: trainjob_pod(job)["securityContext"].update(runAsNonRoot=False),
        "may run as root",
    ),
    "escalation": (
        lambda job: trainjob_pod(job)["containers"][0]["securityContext"].update(
            allowPrivilegeEscalation=True
        ),
        "allowPrivilegeEscalation false (container node)",
    ),
    "capabilities": (
        lambda job: trainjob_pod(job)["containers"][0]["securityContext"].update(
            capabilities={"add": ["SYS_ADMIN"], "drop": ["ALL"]}
        ),
        "but NET_BIND_SERVICE (container node)",
    ),
    "seccomp": (
        lambda job: trainjob_pod(job)["securityContext"].update(
            seccompProfile={"type": "Unconfined"}
        ),
        "RuntimeDefault seccomp profile (on the pod or every container) (the pod)",
    ),
    # Older Trainer APIs' overrides are checked too.
    "v2.0-podSpecOverrides": (
        lambda job: job["spec"].update(
            podSpecOverrides=[{"targetJobs": [{"name": "node"}], "serviceAccountName": "admin"}]
        ),
        "(service account admin)",
    ),
    "v2.1-podTemplateOverrides": (
        lambda job: job["spec"].update(
            podTemplateOverrides=[
                {
                    "targetJobs": [{"name": "node"}],
                    "spec": {"volumes": [{"name": "docker", "hostPath": {"path": "/var/run"}}]},
                }
            ]
        ),
        "mounts a hostPath volume (volume docker)",
    ),
}


@pytest.mark.parametrize("case", BAD_TRAINJOBS)
def test_each_trainjob_violation_is_refused(case, admission):
    change, words = BAD_TRAINJOBS[case]
    job = trainjob()
    change(job)
    review = admission.review(job)
    assert review.matched and not review.allowed
    (message,) = review.failures
    assert message.startswith("visionflow: TrainJob vf-policy-test "), message
    assert words in message, message


def test_trainjob_patches_may_leave_settings_to_the_runtime(admission):
    """A patch that sets no security context leaves the runtime's: not a violation by itself."""
    job = trainjob()
    pod = trainjob_pod(job)
    del pod["securityContext"], pod["containers"][0]["securityContext"]
    assert failures(admission, job) == []
