"""The Helm chart charts/visionflow, rendered offline for its defaults and every ci/ values file.

helm-python-sdk (Helm v4's Go SDK; no helm binary) lints and renders; kubernetes-validate checks
every manifest against Kubernetes 1.30's schemas (shipped in the package); checkov's Kubernetes
checks run on the rendered YAML. checkov cannot share this venv (it pins boto3, packaging,
networkx, ... below requirements.lock), so it is a separate executable: $CHECKOV, else
.venv-checkov/bin/checkov (`make checkov`), else `checkov` on PATH.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import importlib
import importlib.metadata
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from visionflow.kfp.compile import PIPELINES, compile_all, compiled_files
from visionflow.kfp.submit import version_name

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "visionflow"
CASES = ["defaults"] + sorted(p.stem for p in (CHART / "ci").glob("*.yaml"))
RELEASE, NAMESPACE = "visionflow", "ml-team"
K8S_VERSION = "1.30.0"
COMPONENTS = ("configure", "prepare", "train", "optimize", "evaluate", "export", "quantize", "register",
              "predict")  # fmt: skip
# Every pipeline visionflow compiles, shipped and uploaded by the chart (in this order) under the
# kfp.upload value and default name beside it.
PIPELINE_FILES = {name: CHART / "files" / "pipeline" / f"{name}.yaml" for name in PIPELINES}
UPLOAD_NAMES = {
    "training": ("pipelineName", "visionflow-training"),
    "batch_inference": ("batchPipelineName", "visionflow-batch-inference"),
}
# A Secret and keys other than the defaults, which every shipped pipeline must name instead.
OTHER_SECRET = {
    "minio": {"existingSecret": "team-s3", "accessKeyKey": "access", "secretKeyKey": "secret"}
}
REGENERATE = "regenerate it with `make compile`"
# What visionflow's launcher uses, and nothing more (test_rbac_is_exactly_what_the_launcher_uses).
JOB_VERBS = ("create", "get", "list", "watch", "delete")
LAUNCHER_RULES = (
    {("kubeflow.org", "pytorchjobs", v) for v in JOB_VERBS}
    | {("trainer.kubeflow.org", "trainjobs", v) for v in JOB_VERBS}
    | {("networking.k8s.io", "networkpolicies", v) for v in ("create", "get", "delete")}
    | {("", "pods", v) for v in ("get", "list", "watch")}
    | {("", "pods/log", "get")}
    | {("", "events", "list")}
)
# Kinds kubernetes-validate has no schema for (custom resources), each with the check used instead.
# The chart renders none; a new one fails test_manifests_are_valid_kubernetes until added here.
CUSTOM_RESOURCES: dict[tuple[str, str], object] = {}
POD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


def values_of(case: str) -> dict:
    return (
        {}
        if case == "defaults"
        else yaml.safe_load((CHART / "ci" / f"{case}.yaml").read_text()) or {}
    )


def render(values: dict, name: str = RELEASE) -> dict[str, str]:
    """Template path -> rendered text, after validating the values against values.schema.json."""
    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values))
        return chart.render(values, name=name, namespace=NAMESPACE, is_install=True)


def documents(rendered: dict[str, str]) -> list[dict]:
    return [
        d
        for path, text in sorted(rendered.items())
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]


@pytest.fixture(scope="module")
def rendered() -> dict[str, dict[str, str]]:
    return {case: render(values_of(case)) for case in CASES}


def find(docs: list[dict], kind: str, suffix: str = "") -> dict:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"].endswith(suffix)]
    return doc


def pod_spec(doc: dict) -> dict:
    if doc["kind"] == "Pod":
        return doc["spec"]
    if doc["kind"] == "CronJob":
        return doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    return doc["spec"]["template"]["spec"]


def containers(spec: dict) -> list[dict]:
    return spec.get("initContainers", []) + spec["containers"]


def chart_metadata() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


# - the chart as a whole ---------------------------------------------------------------------------


def test_ci_values_cover_the_defaults_and_everything_enabled():
    assert {"default-values", "all-enabled-values"} <= set(CASES)
    everything = values_of("all-enabled-values")
    assert everything["minio"]["enabled"] and everything["mlflow"]["enabled"]
    # The serving objects go through every per-case check (lint, schemas, pod security, checkov).
    assert everything["serving"]["enabled"]
    assert (
        everything["networkPolicy"]["enabled"] and everything["rbac"]["bindKubeflowPipelinesEdit"]
    )


@pytest.mark.parametrize("case", CASES)
def test_lint_reports_no_errors_or_warnings(case):
    report = helm.lint(
        CHART, values_of(case), strict=True, namespace=NAMESPACE, kube_version=f"v{K8S_VERSION}"
    )
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not report["errors"] and not problems, (report["errors"], problems)


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("network access during an offline check")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("case", CASES)
def test_manifests_are_valid_kubernetes_1_30(case, rendered, no_network):
    for doc in documents(rendered[case]):
        what = f"{case}: {doc['kind']}/{doc['metadata'].get('name')}"
        try:
            used = kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            check = CUSTOM_RESOURCES.get((doc["apiVersion"], doc["kind"]))
            assert check, (
                f"{what}: no Kubernetes schema for {doc['apiVersion']}; add a check to CUSTOM_RESOURCES"
            )
            check(doc)
            continue
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{what} at {'/'.join(map(str, err.path))}: {err.message}")
        assert used == "1.30", f"{what} was validated against Kubernetes {used}"


def test_kubernetes_validate_rejects_what_it_should(no_network):
    """The validator above is not vacuous: a custom kind, an unknown field, a wrong type fail."""
    with pytest.raises(kubernetes_validate.SchemaNotFoundError):
        kubernetes_validate.validate(
            {"apiVersion": "kubeflow.org/v1", "kind": "PyTorchJob", "metadata": {"name": "x"}},
            K8S_VERSION,
        )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "x"},
        "spec": {"containers": [{"name": "c", "image": "i:1"}]},
    }
    kubernetes_validate.validate(pod, K8S_VERSION, strict=True)
    for broken in (
        {"ports": [{"containerPort": "http"}]},
        {"securityContext": {"runAsUser": "root"}},
        {"resource": {}},
    ):
        bad = json.loads(json.dumps(pod))
        bad["spec"]["containers"][0].update(broken)
        with pytest.raises(kubernetes_validate.ValidationError):
            kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


def test_schema_and_templates_refuse_bad_values():
    for bad in (
        {"image": {"tag": "latest"}},
        {"minio": {"image": {"tag": "latest"}}},
        {"mlflow": {"replica": 2}},
        {"storage": {"bucket": "No_Such"}},
    ):
        with pytest.raises(helm.HelmValuesError):
            render(bad)
    with pytest.raises(helm.HelmRenderError, match="mlflow.existingSecret"):
        render({"mlflow": {"enabled": True}})
    with pytest.raises(helm.HelmRenderError, match="minio.existingSecret"):
        render({"minio": {"enabled": True, "existingSecret": ""}})


def test_names_stay_within_63_characters():
    docs = documents(
        render(
            {
                "mlflow": {"enabled": True, "existingSecret": "db"},
                "minio": {"enabled": True},
                "serving": {"enabled": True},
            },
            name="r" * 53,
        )
    )
    for doc in docs:
        name = doc["metadata"]["name"]
        assert len(name) <= 63 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name


def test_every_value_is_documented():
    """Every value has a `# --` comment on the line above it or above one of its parents."""
    parents: list[tuple[int, bool]] = []  # (indent, documented) of the keys we are inside
    previous = ""
    for number, line in enumerate((CHART / "values.yaml").read_text().splitlines(), 1):
        key = re.match(r"^( *)([A-Za-z][\w.-]*):(.*)$", line)
        item = re.match(r"^( *)- ", line)
        if key or item:
            indent = len((key or item).group(1))
            parents = [p for p in parents if p[0] < indent or (item and p[0] == indent)]
            documented = bool(key) and previous.lstrip().startswith("# --")
            covered = documented or any(d for _, d in parents)
            if key and not key.group(3).split("#")[0].strip():  # a parent: its children are checked
                parents.append((indent, documented))
            else:
                assert covered, f"values.yaml:{number}: {line.strip()!r} has no `# --` comment"
        if line.strip():
            previous = line


# - policy: images, RBAC, pod security, secrets ----------------------------------------------------


@pytest.mark.parametrize("case", CASES)
def test_every_image_has_a_fixed_tag(case, rendered):
    for doc in documents(rendered[case]):
        if doc["kind"] not in POD_KINDS:
            continue
        for c in containers(pod_spec(doc)):
            name, _, tag = c["image"].split("@")[0].rpartition(":")
            assert name and "/" not in tag and tag and tag != "latest", f"{case}: {c['image']}"


def test_default_images():
    docs = documents(render({}))
    app = chart_metadata()["appVersion"]
    job = find(docs, "Job", "pipeline-upload")
    assert pod_spec(job)["containers"][0]["image"] == f"ghcr.io/visionflow/visionflow:{app}"
    cluster = yaml.safe_load(find(docs, "ConfigMap", "-config")["data"]["cluster.yaml"])
    assert cluster["cluster"]["image"] == f"ghcr.io/visionflow/visionflow-train:{app}"
    everything = documents(
        render({"mlflow": {"enabled": True, "existingSecret": "db"}, "minio": {"enabled": True}})
    )
    images = {
        c["image"] for d in everything if d["kind"] in POD_KINDS for c in containers(pod_spec(d))
    }
    # The MLflow server is the same release as visionflow's client; MinIO is a dated release.
    assert f"ghcr.io/mlflow/mlflow:v{importlib.metadata.version('mlflow')}-full" in images
    assert any(
        re.fullmatch(r"quay\.io/minio/minio:RELEASE\.\d{4}-\d\d-\d\dT\d\d-\d\d-\d\dZ", i)
        for i in images
    )
    listed = {
        i["image"] for i in yaml.safe_load(chart_metadata()["annotations"]["artifacthub.io/images"])
    }
    assert listed == images | {cluster["cluster"]["image"]}, (
        "Chart.yaml's artifacthub.io/images is stale"
    )


@pytest.mark.parametrize("case", CASES)
def test_rbac_is_exactly_what_the_launcher_uses(case, rendered):
    docs = documents(rendered[case])
    assert not [d for d in docs if d["kind"] in ("ClusterRole", "ClusterRoleBinding")]
    (role,) = [d for d in docs if d["kind"] == "Role"]
    rules = {
        (g, r, v)
        for rule in role["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert rules == LAUNCHER_RULES
    from visionflow.cluster.launcher import ROLE_RULES  # what a 403's message asks for

    assert rules == {(g, r, v) for g, r, verbs in ROLE_RULES for v in verbs}
    assert all(
        set(rule) == {"apiGroups", "resources", "verbs"} for rule in role["rules"]
    )  # no resourceNames etc.
    binding = next(d for d in docs if d["kind"] == "RoleBinding" and d["roleRef"]["kind"] == "Role")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    sa = find(docs, "ServiceAccount")["metadata"]["name"]
    assert {"kind": "ServiceAccount", "name": sa, "namespace": NAMESPACE} in binding["subjects"]
    others = [d for d in docs if d["kind"] == "RoleBinding" and d is not binding]
    opted_in = values_of(case).get("rbac", {}).get("bindKubeflowPipelinesEdit", False)
    assert [d["roleRef"]["name"] for d in others] == (
        ["kubeflow-pipelines-edit"] if opted_in else []
    )


@pytest.mark.parametrize("case", CASES)
def test_every_pod_is_restricted(case, rendered):
    pods = [d for d in documents(rendered[case]) if d["kind"] in POD_KINDS]
    assert pods
    for doc in pods:
        spec, what = pod_spec(doc), f"{case}: {doc['kind']}/{doc['metadata']['name']}"
        ctx = spec["securityContext"]
        assert (
            ctx["runAsNonRoot"] is True
            and ctx["runAsUser"] > 0
            and ctx["seccompProfile"] == {"type": "RuntimeDefault"}
        ), what
        assert spec["automountServiceAccountToken"] is False, what
        assert not any(spec.get(k) for k in ("hostNetwork", "hostPID", "hostIPC")), what
        empty_dirs = {v["name"] for v in spec.get("volumes", []) if "emptyDir" in v}
        for c in containers(spec):
            sc = c["securityContext"]
            assert (
                sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"] is True
            ), (what, c["name"])
            assert sc["capabilities"] == {"drop": ["ALL"]} and not sc.get("privileged"), (
                what,
                c["name"],
            )
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), (what, c["name"], kind)
            if c in spec["containers"]:  # a writable /tmp beside the read-only root
                assert any(
                    m["mountPath"] == "/tmp" and m["name"] in empty_dirs for m in c["volumeMounts"]
                ), (what, c["name"])


@pytest.mark.parametrize("case", CASES)
def test_no_credentials_in_manifests(case, rendered):
    docs = documents(rendered[case])
    assert not [d for d in docs if d["kind"] == "Secret"]
    for doc in docs:
        if doc["kind"] in POD_KINDS:
            for c in containers(pod_spec(doc)):
                for env in c.get("env", []):
                    if re.search(r"KEY|SECRET|PASSWORD|BACKEND_STORE_URI", env["name"]):
                        assert (
                            set(env) == {"name", "valueFrom"} and "secretKeyRef" in env["valueFrom"]
                        ), (case, env)


# - checkov ---------------------------------------------------------------------------------------


def checkov_command() -> str:
    for candidate in (
        os.environ.get("CHECKOV"),
        REPO / ".venv-checkov" / "bin" / "checkov",
        shutil.which("checkov"),
    ):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail(
        "checkov not found: `make checkov` creates .venv-checkov, or set CHECKOV=/path/to/checkov"
    )


def strip_checkov_skips(text: str) -> str:
    return re.sub(r"(?m)^\s*checkov\.io/skip\d+:.*\n", "", text)


@pytest.mark.slow  # checkov over every rendered manifest
def test_checkov_kubernetes_checks_pass_and_every_skip_is_needed(rendered, tmp_path):
    """One checkov run over every case twice: as rendered, and with the skip annotations removed.

    As rendered nothing may fail; every skip carries a reason; and every skipped check fails
    without its annotation (a skip that is not needed any more must go).
    """
    for case, text in rendered.items():
        body = "\n---\n".join(v for k, v in sorted(text.items()) if not k.endswith("NOTES.txt"))
        for variant, content in (("annotated", body), ("stripped", strip_checkov_skips(body))):
            (tmp_path / variant).mkdir(exist_ok=True)
            (tmp_path / variant / f"{case}.yaml").write_text(content)
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "LOG_LEVEL": "WARNING"}  # no guideline download
    proc = subprocess.run(
        [checkov_command(), "--directory", str(tmp_path), "--framework", "kubernetes", "--skip-download", "--output", "json"],
        capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path,
    )  # fmt: skip
    report = json.loads(proc.stdout)
    assert report["summary"]["parsing_errors"] == 0 and report["summary"]["resource_count"] > 0, (
        proc.stderr[-2000:]
    )
    results = report["results"]

    def keyed(checks, variant):
        return {
            (c["file_path"].split("/")[-1], c["resource"], c["check_id"])
            for c in checks
            if f"/{variant}/" in c["file_path"]
        }

    failed = keyed(results.get("failed_checks", []), "annotated")
    assert not failed, "\n".join(f"{f}: {r}: {c}" for f, r, c in sorted(failed))
    skipped = [c for c in results.get("skipped_checks", []) if "/annotated/" in c["file_path"]]
    assert skipped, "no checkov skips seen: were the annotations read?"
    for check in skipped:
        assert len(check["check_result"].get("suppress_comment", "")) >= 30, (
            f"{check['check_id']} needs a reason"
        )
    assert keyed(skipped, "annotated") <= keyed(results.get("failed_checks", []), "stripped")


# - the pipeline: compiled files, upload hook, configs ---------------------------------------------


def test_compiled_files_are_current(tmp_path):
    """pipelines/, components/ and the chart's files/ hold what the code compiles today
    (`make compile` rewrites them all)."""
    compile_all(tmp_path)
    fresh = sorted(p.relative_to(tmp_path) for p in compiled_files(tmp_path))
    shipped = sorted(
        p.relative_to(REPO)
        for d in ("pipelines", "components", "charts/visionflow/files")
        for p in (REPO / d).rglob("*")
        if p.is_file()
    )
    assert shipped == fresh, REGENERATE
    for rel in fresh:
        assert (REPO / rel).read_bytes() == (tmp_path / rel).read_bytes(), (
            f"{rel} is stale: {REGENERATE}"
        )


@pytest.mark.parametrize("name", PIPELINES)
def test_compiled_pipeline_agrees_with_the_chart(name):
    """Each compiled pipeline names the objects of a release called `visionflow` with the
    default Secret and keys, and the chart's images."""
    import visionflow
    from visionflow.kfp import pipeline

    assert set(UPLOAD_NAMES) == set(PIPELINES)
    spec, platform = yaml.safe_load_all(PIPELINE_FILES[name].read_text())
    images = {e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values()}
    assert images == {visionflow.CPU_IMAGE}
    assert chart_metadata()["appVersion"] == visionflow.__version__
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())["minio"]
    docs = documents(render({}, name="visionflow"))
    assert find(docs, "ConfigMap", "-env")["metadata"]["name"] == pipeline.ENV_CONFIG_MAP
    assert find(docs, "ConfigMap", "-config")["metadata"]["name"] == pipeline.SITE_CONFIG_MAP
    env = find(docs, "ConfigMap", "-env")["data"]
    assert env["VISIONFLOW_SITE_CONFIG"] == f"{pipeline.SITE_MOUNT}/cluster.yaml"
    assert set(env) == {*pipeline.ENV_KEYS} | ({*pipeline.ENV_OPTIONAL_KEYS} & set(env))
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    assert all(e.get("secretAsEnv") for e in executors)
    for executor in executors:
        for ref in executor.get("secretAsEnv", []):
            assert ref["secretName"] == defaults["existingSecret"]
            assert {k["secretKey"] for k in ref["keyToEnv"]} == {
                defaults["accessKeyKey"],
                defaults["secretKeyKey"],
            }


@pytest.mark.parametrize("case", [*CASES, "other-secret"])
def test_kfp_configmap_ships_the_compiled_files_with_the_releases_names(case, rendered):
    """Each shipped pipeline is the compiled one with only the release's ConfigMap names, Secret
    name and Secret keys in place of the compiled defaults; the components are verbatim. The
    `other-secret` case is a release of another name with a Secret and keys of its own."""
    values = OTHER_SECRET if case == "other-secret" else values_of(case)
    docs = documents(render(values, name="team-a") if case == "other-secret" else rendered[case])
    data = find(docs, "ConfigMap", "-kfp")["data"]
    pipelines = {f"pipeline-{n}.yaml": path for n, path in PIPELINE_FILES.items()}
    expected = pipelines | {
        f"component-{n}.yaml": CHART / "files" / "components" / f"{n}.yaml" for n in COMPONENTS
    }
    assert set(data) == set(expected)
    for key, path in expected.items():
        if key not in pipelines:
            assert data[key] == path.read_text(), key
    minio = {**yaml.safe_load((CHART / "values.yaml").read_text())["minio"],
             **values.get("minio", {})}  # fmt: skip
    own = {
        "visionflow-env": find(docs, "ConfigMap", "-env")["metadata"]["name"],
        "visionflow-config": find(docs, "ConfigMap", "-config")["metadata"]["name"],
        "visionflow-minio": minio["existingSecret"],
        "AWS_ACCESS_KEY_ID": minio["accessKeyKey"],
        "AWS_SECRET_ACCESS_KEY": minio["secretKeyKey"],
    }
    if case == "other-secret":
        assert own == {
            "visionflow-env": "team-a-visionflow-env",
            "visionflow-config": "team-a-visionflow-config",
            "visionflow-minio": "team-s3",
            "AWS_ACCESS_KEY_ID": "access",
            "AWS_SECRET_ACCESS_KEY": "secret",
        }
    for key, path in pipelines.items():
        compiled = path.read_text().splitlines()
        shipped = data[key].splitlines()
        assert len(compiled) == len(shipped), key
        for before, after in zip(compiled, shipped, strict=True):
            if before != after:
                field, _, value = before.partition(": ")
                assert field.strip().removeprefix("- ") in (
                    "configMapName",
                    "secretName",
                    "constant",
                    "secretKey",
                )
                assert after == f"{field}: {own[value]}", (key, before, after)
        spec, platform = yaml.safe_load_all(data[key])
        executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
        assert executors, key
        for executor in executors:
            assert {r["configMapName"] for r in executor["configMapAsEnv"]} == {
                own["visionflow-env"]
            }
            assert {r["configMapName"] for r in executor["configMapAsVolume"]} == {
                own["visionflow-config"]
            }
            (secret,) = executor["secretAsEnv"]
            assert secret["secretName"] == secret["secretNameParameter"]["runtimeValue"]["constant"]
            assert secret["secretName"] == own["visionflow-minio"]
            assert {k["secretKey"] for k in secret["keyToEnv"]} == {
                own["AWS_ACCESS_KEY_ID"],
                own["AWS_SECRET_ACCESS_KEY"],
            }


@pytest.mark.parametrize("case", CASES)
def test_upload_hook(case, rendered):
    values = values_of(case)
    docs = documents(rendered[case])
    job = find(docs, "Job", "-pipeline-upload")
    notes = job["metadata"]["annotations"]
    assert set(notes["helm.sh/hook"].split(",")) == {"post-install", "post-upgrade"}
    assert set(notes["helm.sh/hook-delete-policy"].split(",")) == {
        "before-hook-creation",
        "hook-succeeded",
    }
    # Over every shipped package, in upload order: it changes when any of them does.
    data = find(docs, "ConfigMap", "-kfp")["data"]
    shipped = {n: data[f"pipeline-{n}.yaml"] for n in PIPELINES}
    assert notes["visionflow/pipeline-sha256"] == (
        hashlib.sha256("".join(shipped.values()).encode()).hexdigest()
    )
    spec = pod_spec(job)
    kfp = values.get("kfp", {})
    # One container per pipeline, each uploading its package under its own name; the same
    # container otherwise, with a home of its own (they run at once).
    names = {
        n: kfp.get("upload", {}).get(key, default) for n, (key, default) in UPLOAD_NAMES.items()
    }
    assert len(set(names.values())) == len(names)
    assert [c["name"] for c in spec["containers"]] == [
        f"upload-{n.replace('_', '-')}" for n in PIPELINES
    ]
    for n, c in zip(PIPELINES, spec["containers"], strict=True):
        assert c["command"] == [
            "visionflow", "pipeline", "upload",
            "--host", kfp.get("host", "http://ml-pipeline.kubeflow:8888"),
            "--package", f"/etc/visionflow/pipeline/{n}.yaml",
            "--name", names[n],
        ]  # fmt: skip
        assert {e["name"]: e["value"] for e in c["env"]} == {
            "KF_PIPELINES_SA_TOKEN_PATH": "/var/run/secrets/kubeflow/pipelines/token",
            "HOME": f"/tmp/{n}",
            "VISIONFLOW_HOME": f"/tmp/{n}/visionflow",
        }
        assert c["image"].startswith("ghcr.io/visionflow/visionflow:")
        for key in ("image", "imagePullPolicy", "securityContext", "resources", "volumeMounts"):
            assert c[key] == spec["containers"][0][key], key
        assert all(m.get("readOnly") for m in c["volumeMounts"] if m["mountPath"] != "/tmp")
    mount = next(
        m for m in spec["containers"][0]["volumeMounts"]
        if m["mountPath"] == "/etc/visionflow/pipeline"
    )  # fmt: skip
    volume = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    assert volume["configMap"]["name"] == find(docs, "ConfigMap", "-kfp")["metadata"]["name"]
    assert volume["configMap"]["items"] == [
        {"key": f"pipeline-{n}.yaml", "path": f"{n}.yaml"} for n in PIPELINES
    ]
    # NOTES names each uploaded pipeline and the version its package becomes.
    text = rendered[case][f"{CHART.name}/templates/NOTES.txt"]
    for n, package in shipped.items():
        version = version_name(names[n], package.encode())
        assert f'{n}: pipeline "{names[n]}", version "{version}"' in text
    assert spec["serviceAccountName"] == find(docs, "ServiceAccount")["metadata"]["name"]
    # Kubeflow Pipelines' token, not the Kubernetes API's.
    token = next(v for v in spec["volumes"] if "projected" in v)["projected"]["sources"][0][
        "serviceAccountToken"
    ]
    assert token["audience"] == "pipelines.kubeflow.org"
    off = render({**values, "kfp": {**kfp, "upload": {"enabled": False}}})
    assert not [d for d in documents(off) if d["kind"] == "Job"]
    assert "upload disabled" in off[f"{CHART.name}/templates/NOTES.txt"]
    same = {"pipelineName": "vision", "batchPipelineName": "vision"}
    with pytest.raises(helm.HelmRenderError, match="each pipeline needs a name of its own"):
        render({**values, "kfp": {**kfp, "upload": same}})
    render({**values, "kfp": {**kfp, "upload": {**same, "enabled": False}}})
    with pytest.raises(helm.HelmValuesError):
        render({**values, "kfp": {**kfp, "upload": {"batchPipelineName": ""}}})


def test_a_missing_pipeline_file_fails_with_its_name(tmp_path):
    chart = shutil.copytree(CHART, tmp_path / CHART.name)
    (chart / "files" / "pipeline" / "batch_inference.yaml").unlink()
    with (
        helm.Chart.load(chart) as loaded,
        pytest.raises(helm.HelmRenderError, match="files/pipeline/batch_inference.yaml is missing"),
    ):
        loaded.render({}, name=RELEASE, namespace=NAMESPACE, is_install=True)


@pytest.mark.parametrize("case", CASES)
def test_cluster_config_is_a_valid_visionflow_config(case, rendered, tmp_path, monkeypatch):
    """cluster.yaml composes with visionflow's own configs and schema (an unknown key fails)."""
    from visionflow.core.config import load_config

    monkeypatch.setenv("VISIONFLOW_HOME", str(tmp_path / "home"))
    for var in ("AWS_ENDPOINT_URL", "MLFLOW_TRACKING_URI"):
        monkeypatch.delenv(var, raising=False)
    docs = documents(rendered[case])
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "cluster.yaml").write_text(
        find(docs, "ConfigMap", "-config")["data"]["cluster.yaml"]
    )
    # As a step pod loads it: the env ConfigMap names the mounted file.
    monkeypatch.setenv("VISIONFLOW_SITE_CONFIG", str(tmp_path / "site" / "cluster.yaml"))
    cfg = load_config([])
    env = find(docs, "ConfigMap", "-env")["data"]
    values = values_of(case)
    assert cfg.storage.root == f"s3://{values.get('storage', {}).get('bucket', 'visionflow')}"
    assert cfg.storage.endpoint == env["AWS_ENDPOINT_URL"] == env["MLFLOW_S3_ENDPOINT_URL"]
    assert cfg.cluster.namespace is None  # the pod's own, from its service-account mount
    assert cfg.cluster.image.startswith("ghcr.io/visionflow/visionflow-train:")
    if "MLFLOW_TRACKING_URI" in env:
        assert cfg.tracking.uri == env["MLFLOW_TRACKING_URI"]
    for key, value in values.get("config", {}).get("cluster", {}).items():
        assert cfg.cluster[key] == value


# - MLflow, MinIO, NetworkPolicy, helm test --------------------------------------------------------


def test_mlflow_server():
    values = values_of("all-enabled-values")
    docs = documents(render(values))
    (c,) = pod_spec(find(docs, "Deployment", "-mlflow"))["containers"]
    cmd = c["command"]
    assert cmd[:2] == ["mlflow", "server"] and "--serve-artifacts" in cmd
    assert cmd[cmd.index("--backend-store-uri") + 1] == "$(MLFLOW_BACKEND_STORE_URI)"
    assert (
        cmd[cmd.index("--artifacts-destination") + 1]
        == f"s3://{values['storage']['bucket']}/mlflow"
    )
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0" and cmd[cmd.index("--port") + 1] == "5000"
    env = {e["name"]: e for e in c["env"]}
    assert (
        env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"]["name"]
        == values["mlflow"]["existingSecret"]
    )
    assert {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_S3_ENDPOINT_URL"} <= set(env)
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"]["path"] == "/health"
    # MLflow answers 403 to a Host header it does not list: the tracking URI's host must be listed.
    allowed = cmd[cmd.index("--allowed-hosts") + 1].split(",")
    tracking = urlsplit(find(docs, "ConfigMap", "-env")["data"]["MLFLOW_TRACKING_URI"]).netloc
    assert any(fnmatch.fnmatch(tracking, pattern) for pattern in allowed), (tracking, allowed)
    assert "mlflow.example.com" in allowed and "*" not in allowed


def test_minio():
    values = values_of("all-enabled-values")
    docs = documents(render(values))
    spec = pod_spec(find(docs, "Deployment", "-minio"))
    (init,), (c,) = spec["initContainers"], spec["containers"]
    assert init["command"] == ["mkdir", "-p", f"/data/{values['storage']['bucket']}"]
    assert c["livenessProbe"]["httpGet"]["path"] == "/minio/health/live"
    assert c["readinessProbe"]["httpGet"]["path"] == "/minio/health/ready"
    claim = next(v for v in spec["volumes"] if v["name"] == "data")["persistentVolumeClaim"][
        "claimName"
    ]
    pvc = find(docs, "PersistentVolumeClaim")
    assert (
        pvc["metadata"]["name"] == claim
        and pvc["spec"]["resources"]["requests"]["storage"] == "20Gi"
    )
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert find(docs, "Deployment", "-minio")["spec"]["strategy"]["type"] == "Recreate"


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_network_policies():
    docs = documents(render(values_of("all-enabled-values")))
    policies = {
        d["metadata"]["name"].removeprefix(f"{RELEASE}-"): d["spec"]
        for d in docs
        if d["kind"] == "NetworkPolicy"
    }
    assert set(policies) == {"default-deny", "mlflow", "minio", "serving"}
    deny = policies["default-deny"]
    assert deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
    for doc in docs:
        if doc["kind"] in POD_KINDS:
            labels = (
                doc["metadata"] if doc["kind"] == "Pod" else doc["spec"]["template"]["metadata"]
            )["labels"]
            assert selects(deny["podSelector"], labels), doc["metadata"]["name"]
    # visionflow's pipeline and PyTorchJob pods (not this release's) keep their traffic.
    assert not selects(
        deny["podSelector"], {"app.kubernetes.io/name": "visionflow", "visionflow/run-id": "r1"}
    )
    for name, port in (("mlflow", "http"), ("minio", "s3")):
        (rule,) = policies[name]["ingress"]
        assert {"podSelector": {}} in rule["from"] and rule["ports"] == [
            {"port": port, "protocol": "TCP"}
        ]
    assert not [
        d
        for d in documents(render({"networkPolicy": {"enabled": False}}))
        if d["kind"] == "NetworkPolicy"
    ]


def test_helm_test_pod_checks_each_service():
    docs = documents(render(values_of("all-enabled-values")))
    pod = find(docs, "Pod", "-test-health")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    urls = pod["spec"]["containers"][0]["command"][3:]
    assert urls == [
        f"http://{RELEASE}-mlflow.{NAMESPACE}:5000/health",
        f"http://{RELEASE}-minio.{NAMESPACE}:9000/minio/health/live",
        f"http://{RELEASE}-serving.{NAMESPACE}:80/v2/health/ready",
        "http://ml-pipeline.kubeflow:8888/apis/v2beta1/healthz",
    ]


# - serving ---------------------------------------------------------------------------------------

SERVING_KINDS = {
    "Deployment",
    "Service",
    "HorizontalPodAutoscaler",
    "PodDisruptionBudget",
    "NetworkPolicy",
}


def merged(base: dict, extra: dict) -> dict:
    """base with extra merged in, key by key (as Helm merges values files)."""
    out = json.loads(json.dumps(base))
    for key, value in extra.items():
        out[key] = (
            merged(out[key], value)
            if isinstance(value, dict) and isinstance(out.get(key), dict)
            else value
        )
    return out


def with_serving(case: str, **serving) -> dict:
    return merged(values_of(case), {"serving": {"enabled": True, **serving}})


def serving_docs(docs: list[dict]) -> list[dict]:
    return [
        d
        for d in docs
        if d["metadata"].get("labels", {}).get("app.kubernetes.io/component") == "serving"
    ]


def serving_container(docs: list[dict]) -> tuple[dict, dict]:
    spec = pod_spec(find(docs, "Deployment", "-serving"))
    (c,) = spec["containers"]
    return spec, c


def chart_values(values: dict) -> dict:
    """values.yaml with `values` merged over it: what the templates see."""
    return merged(yaml.safe_load((CHART / "values.yaml").read_text()), values)


def test_serving_renders_five_objects_and_nothing_else_changes():
    values = values_of("all-enabled-values")
    docs = documents(render(values))
    objects = serving_docs(docs)
    assert sorted(d["kind"] for d in objects) == sorted(SERVING_KINDS)
    assert {d["metadata"]["name"] for d in objects} == {f"{RELEASE}-serving"}
    assert all(d["metadata"]["namespace"] == NAMESPACE for d in objects)
    deployment = find(docs, "Deployment", "-serving")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], labels)
    assert find(docs, "Service", "-serving")["spec"]["selector"] == labels
    for kind in ("PodDisruptionBudget", "NetworkPolicy"):
        selector = find(docs, kind, "-serving")["spec"][
            "selector" if kind == "PodDisruptionBudget" else "podSelector"
        ]
        assert selects(selector, labels), kind
        for other in ("mlflow", "minio"):  # only the serving pods
            pod = find(docs, "Deployment", f"-{other}")["spec"]["template"]["metadata"]["labels"]
            assert not selects(selector, pod), (kind, other)
    # The autoscaler owns the replica count.
    hpa = find(docs, "HorizontalPodAutoscaler", "-serving")["spec"]
    scaling = values["serving"]["autoscaling"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert (hpa["minReplicas"], hpa["maxReplicas"]) == (
        scaling["minReplicas"],
        scaling["maxReplicas"],
    )
    (metric,) = hpa["metrics"]
    assert metric["resource"] == {
        "name": "cpu",
        "target": {
            "type": "Utilization",
            "averageUtilization": scaling["targetCPUUtilizationPercentage"],
        },
    }
    assert "replicas" not in deployment["spec"]
    assert (
        find(docs, "PodDisruptionBudget", "-serving")["spec"]["minAvailable"]
        == values["serving"]["pdb"]["minAvailable"]
    )
    # Off, the same values render the same objects less these five and the helm test's URL.
    off = documents(render(merged(values, {"serving": {"enabled": False}})))
    assert not serving_docs(off)

    def rest(ds):
        return [d for d in ds if d not in objects and d["kind"] != "Pod"]

    assert rest(docs) == rest(off)
    test_pod = find(docs, "Pod", "-test-health")["spec"]["containers"][0]["command"]
    assert [u for u in test_pod if "-serving." not in u] == (
        find(off, "Pod", "-test-health")["spec"]["containers"][0]["command"]
    )


@pytest.mark.parametrize("case", CASES)
def test_serving_renders_only_when_enabled(case, rendered):
    enabled = values_of(case).get("serving", {}).get("enabled", False)
    objects = serving_docs(documents(rendered[case]))
    assert sorted(d["kind"] for d in objects) == (sorted(SERVING_KINDS) if enabled else [])
    notes = rendered[case][f"{CHART.name}/templates/NOTES.txt"]
    assert ("Serving:" in notes) == enabled


def test_serving_without_autoscaling_has_fixed_replicas():
    docs = documents(render(with_serving("defaults", replicas=3, autoscaling={"enabled": False})))
    assert not [d for d in docs if d["kind"] == "HorizontalPodAutoscaler"]
    assert find(docs, "Deployment", "-serving")["spec"]["replicas"] == 3


@pytest.mark.parametrize("case", CASES)
def test_serving_pods_get_the_pipeline_steps_configmaps_and_secret(case):
    """The container gets the env ConfigMap, the site-config mount and the Secret's keys that
    each step of the pipelines this release ships gets, and nothing else of the kind."""
    docs = documents(render(with_serving(case)))
    spec, c = serving_container(docs)
    data = find(docs, "ConfigMap", "-kfp")["data"]
    shipped = [list(yaml.safe_load_all(data[f"pipeline-{n}.yaml"])) for n in PIPELINES]
    executors = [
        e
        for _, platform in shipped
        for e in platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    ]
    assert executors
    env_maps = {r["configMapName"] for e in executors for r in e["configMapAsEnv"]}
    mounts = {
        (r["configMapName"], r["mountPath"]) for e in executors for r in e["configMapAsVolume"]
    }
    secrets = {
        (r["secretName"], k["secretKey"], k["envVar"])
        for e in executors
        for r in e["secretAsEnv"]
        for k in r["keyToEnv"]
    }
    step_keys = {  # configMapKey -> (envVar, optional)
        k["configMapKey"]: (k["envVar"], r.get("optional", False))
        for e in executors
        for r in e["configMapAsEnv"]
        for k in r["keyToEnv"]
    }
    # Every step gets the same; one of each, and the names are the release's own.
    (env_map,) = env_maps
    (mount,) = mounts
    assert env_map == find(docs, "ConfigMap", "-env")["metadata"]["name"]
    assert mount[0] == find(docs, "ConfigMap", "-config")["metadata"]["name"]
    assert {s for s, _, _ in secrets} == {chart_values(values_of(case))["minio"]["existingSecret"]}
    # The env ConfigMap, whole: the same variables as a step's, which maps each key it holds (its
    # optional ones where present) to a variable of the key's name.
    assert c["envFrom"] == [{"configMapRef": {"name": env_map}}]
    env_data = find(docs, "ConfigMap", "-env")["data"]
    assert all(key == var for key, (var, _) in step_keys.items())
    assert set(env_data) <= set(step_keys)
    assert {k for k, (_, optional) in step_keys.items() if not optional} <= set(env_data)
    # The site config, where the env ConfigMap says it is.
    volumes = {v["name"]: v for v in spec["volumes"]}
    config_mounts = {
        (volumes[m["name"]]["configMap"]["name"], m["mountPath"])
        for m in c["volumeMounts"]
        if "configMap" in volumes[m["name"]]
    }
    assert config_mounts == mounts
    assert os.path.dirname(env_data["VISIONFLOW_SITE_CONFIG"]) == mount[1]
    # The Secret's keys, under the names the steps give them; no other Secret, no other ref.
    refs = {
        (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"], e["name"])
        for e in c["env"]
        if "valueFrom" in e
    }
    assert refs == secrets
    assert all("secretKeyRef" in e["valueFrom"] for e in c["env"] if "valueFrom" in e)
    # The chart's CPU image: the upload hook's, and in a default release the steps' own.
    assert c["image"] == pod_spec(find(docs, "Job", "-pipeline-upload"))["containers"][0]["image"]
    if case == "defaults":
        images = {
            e["container"]["image"]
            for spec_doc, _ in shipped
            for e in spec_doc["deploymentSpec"]["executors"].values()
        }
        assert images == {c["image"]}


def serve_args(c: dict) -> list[str]:
    cmd = c["command"]
    assert cmd[:2] == ["visionflow", "serve"]
    return cmd[3:]


@pytest.mark.parametrize(
    ("serving", "threads"),
    [
        ({}, 2),  # the default CPU limit, "2"
        ({"port": 9090, "model": "shapes/3", "serve": {"variant": "fp32", "refresh_s": 0}}, 2),
        ({"resources": {"limits": {"cpu": "1500m"}}, "serve": {"shadow": "challenger"}}, 1),
        ({"resources": {"limits": {"cpu": "250m"}}}, 1),
        ({"resources": {"limits": {"cpu": 4}}, "serve": {"max_pixels": 40_000_000}}, 4),
        ({"resources": {"limits": {"cpu": "8"}}, "serve": {"threads": 3, "top_k": 1}}, 3),
    ],
)
def test_serving_command_and_probes(serving, threads, tmp_path, monkeypatch):
    values = with_serving("defaults", **serving)
    settings = chart_values(values)["serving"]
    docs = documents(render(values))
    _, c = serving_container(docs)
    assert c["command"][:3] == ["visionflow", "serve", settings["model"]]
    args = serve_args(c)
    port = settings["port"]
    extra = {**settings["serve"], "threads": threads}
    assert args == [
        "serve.host=0.0.0.0",
        f"serve.port={port}",
        *(f"serve.{k}={extra[k]}" for k in sorted(extra)),
    ]
    # They are visionflow's own serve settings: the config composes them, or fails on a bad key.
    from visionflow.core.config import load_config

    monkeypatch.setenv("VISIONFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("VISIONFLOW_SITE_CONFIG", raising=False)
    serve = load_config(args).serve
    assert (serve.host, serve.port, serve.threads) == ("0.0.0.0", port, threads)
    for key, value in settings["serve"].items():
        assert serve[key] == value, key
    # The probes hit the service's health routes on the container port.
    (container_port,) = c["ports"]
    assert container_port == {"name": "http", "containerPort": port, "protocol": "TCP"}
    for probe, path in (
        ("readinessProbe", "/v2/health/ready"),
        ("livenessProbe", "/v2/health/live"),
        ("startupProbe", "/v2/health/live"),
    ):
        assert c[probe]["httpGet"] in (
            {"path": path, "port": "http"},
            {"path": path, "port": port},
        ), probe
    startup = c["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= settings["startupSeconds"]
    pod = find(docs, "Deployment", "-serving")["spec"]["template"]["metadata"]
    annotations = pod["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_serving_split_is_passed_as_a_hydra_dict():
    values = with_serving("defaults", serve={"split": {"champion": 0.9, "challenger": 0.1}})
    _, c = serving_container(documents(render(values)))
    assert "serve.split={challenger:0.1,champion:0.9}" in serve_args(c)


def test_serving_split_composes_in_visionflows_config(tmp_path, monkeypatch):
    from visionflow.core.config import load_config

    values = with_serving("defaults", serve={"split": {"champion": 0.9, "challenger": 0.1}})
    _, c = serving_container(documents(render(values)))
    monkeypatch.setenv("VISIONFLOW_HOME", str(tmp_path))
    monkeypatch.delenv("VISIONFLOW_SITE_CONFIG", raising=False)
    assert load_config(serve_args(c)).serve.split == {"champion": 0.9, "challenger": 0.1}


def test_serving_pod_writes_only_to_its_scratch_volume():
    docs = documents(render(with_serving("defaults")))
    spec, c = serving_container(docs)
    assert spec["automountServiceAccountToken"] is False
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    scratch = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    writable = [
        m["mountPath"] for m in c["volumeMounts"] if m["name"] in scratch and not m.get("readOnly")
    ]
    assert "/tmp" in writable
    env = {e["name"]: e.get("value") for e in c["env"]}
    for path in (env["HOME"], env["VISIONFLOW_HOME"], c["workingDir"]):
        assert any(path == w or path.startswith(w + "/") for w in writable), path
    # The mounts that are not scratch are read-only.
    assert all(m.get("readOnly") for m in c["volumeMounts"] if m["name"] not in scratch)


def egress_ports(rule: dict) -> set[tuple[int, str]]:
    return {(p["port"], p["protocol"]) for p in rule["ports"]}


@pytest.mark.parametrize(
    ("case", "extra", "mlflow_port", "s3_port"),
    [
        ("defaults", {}, 5000, 9000),  # visionflow's default MLflow, Kubeflow's MinIO
        ("external-services-values", {}, 443, 443),  # https URLs without a port
        ("sim-values", {}, 5000, 9000),
        (
            "defaults",
            {"mlflow": {"trackingUri": "http://mlflow.team:8081"}},
            8081,
            9000,
        ),
        ("defaults", {"storage": {"endpoint": "https://s3.team:7480"}}, 5000, 7480),
        ("all-enabled-values", {}, None, None),  # the chart's own servers: by pod
    ],
)
def test_serving_network_policy(case, extra, mlflow_port, s3_port, no_network):
    values = merged(with_serving(case), extra)
    settings = chart_values(values)
    docs = documents(render(values))
    for doc in serving_docs(docs):  # these renders are not among the cases: validate them here
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    policy = find(docs, "NetworkPolicy", "-serving")["spec"]
    np_values = settings["serving"]["networkPolicy"]
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    callers, metrics = policy["ingress"]
    assert callers == {"from": np_values["from"], "ports": [{"port": "http", "protocol": "TCP"}]}
    assert metrics == {
        "from": np_values["metricsFrom"],
        "ports": [{"port": "http", "protocol": "TCP"}],
    }
    dns, mlflow, s3 = policy["egress"]  # no other egress, and each rule names its ports
    assert dns == {
        "ports": [{"port": 53, "protocol": "UDP"}, {"port": 53, "protocol": "TCP"}],
        "to": np_values["dnsTo"],
    }
    for rule, component, port in ((mlflow, "mlflow", mlflow_port), (s3, "minio", s3_port)):
        if port is None:  # only the chart's pods, on their container port
            server = find(docs, "Deployment", f"-{component}")
            (peer,) = rule["to"]
            assert selects(peer["podSelector"], server["spec"]["template"]["metadata"]["labels"])
            assert set(peer) == {"podSelector"}
            (server_port,) = pod_spec(server)["containers"][0]["ports"]
            assert egress_ports(rule) == {(server_port["containerPort"], "TCP")}
        else:
            assert rule == {"ports": [{"port": port, "protocol": "TCP"}]}, component


def test_serving_network_policy_peers_and_switch():
    kubeflow_minio = {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kubeflow"}},
        "podSelector": {"matchLabels": {"app": "minio"}},
    }
    extra_rule = {"to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}], "ports": [{"port": 8443}]}
    values = with_serving(
        "defaults",
        networkPolicy={
            "s3To": [kubeflow_minio],
            "mlflowTo": [kubeflow_minio],
            "metricsFrom": [],
            "extraEgress": [extra_rule],
        },
    )
    policy = find(documents(render(values)), "NetworkPolicy", "-serving")["spec"]
    assert len(policy["ingress"]) == 1  # no metrics rule of its own
    assert [r.get("to") for r in policy["egress"][1:3]] == [[kubeflow_minio], [kubeflow_minio]]
    assert policy["egress"][3:] == [extra_rule]
    off = documents(render(merged(values, {"networkPolicy": {"enabled": False}})))
    assert not [d for d in off if d["kind"] == "NetworkPolicy"]
    assert {d["kind"] for d in serving_docs(off)} == SERVING_KINDS - {"NetworkPolicy"}


def test_serving_values_are_checked():
    from visionflow.core.config import ServeConfig

    schema = json.loads((CHART / "values.schema.json").read_text())
    serve_schema = schema["properties"]["serving"]["properties"]["serve"]
    # Every serve setting but the two the chart sets, and no other.
    assert set(serve_schema["properties"]) == {f.name for f in dataclasses.fields(ServeConfig)} - {
        "host",
        "port",
    }
    for bad in (
        {"serve": {"host": "127.0.0.1"}},
        {"serve": {"port": 1}},
        {"serve": {"no_such": 1}},
        {"serve": {"variant": "fp16"}},
        {"serve": {"split": {"champion": "most"}}},
        {"model": "no such model"},
        {"model": ""},
        {"pdb": {"minAvailable": "half"}},
        {"autoscaling": {"targetCPUUtilizationPercentage": 0}},
        {"service": {"type": "ExternalName"}},
        {"replica": 1},
    ):
        with pytest.raises(helm.HelmValuesError):
            render(with_serving("defaults", **bad))
    for bad, message in (
        ({"autoscaling": {"minReplicas": 4, "maxReplicas": 3}}, "minReplicas"),
        ({"pdb": {"minAvailable": 2}}, "minAvailable"),
        ({"replicas": 1, "autoscaling": {"enabled": False}}, "minAvailable"),
    ):
        with pytest.raises(helm.HelmRenderError, match=message):
            render(with_serving("defaults", **bad))
    render(
        with_serving(
            "defaults", replicas=1, autoscaling={"enabled": False}, pdb={"minAvailable": 0}
        )
    )


def test_notes_say_how_to_reach_the_service():
    values = with_serving("defaults", model="shapes@staging", service={"port": 80})
    notes = render(values)[f"{CHART.name}/templates/NOTES.txt"]
    svc = f"{RELEASE}-serving"
    assert f"kubectl -n {NAMESPACE} port-forward svc/{svc} 8080:80" in notes
    assert "curl -s http://localhost:8080/v2/health/ready" in notes
    assert "http://localhost:8080/v1/models/shapes:predict" in notes
    assert "Serving:" not in render({})[f"{CHART.name}/templates/NOTES.txt"]
