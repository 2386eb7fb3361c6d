"""Kubeflow Pipelines' backend, played on this machine for one compiled pipeline (KFP v2 IR).

What KFP does for a run, and what this does instead:

- Its driver resolves each task's inputs from the pipeline's parameters and upstream outputs:
  the same, read from the compiled YAML (`root.dag.tasks`, `componentInputParameter`,
  `taskOutputParameter`, `taskOutputArtifact`, `runtimeValue`), in dependency order.
- Each task runs in its own pod: the executor's container command and args, `{{$}}` replaced by
  the executor input. Here: its own process in its own mount namespace (sandbox.py), with its own
  empty working directory, HOME and /tmp, and exactly the environment a pod gets — the image's
  ENV (images/cpu.Dockerfile), the container spec's env, the kfp-kubernetes platform config's
  ConfigMap keys, Secret keys and downward-API fields, what the kubelet adds
  (KUBERNETES_SERVICE_HOST/PORT, HOSTNAME) and what KFP adds (KFP_POD_NAME, KFP_POD_UID) — and
  exactly the files its volumes mount (ConfigMaps, the service-account token, ca.crt and
  namespace). Nothing of this process's own environment reaches a step.
- Its launcher moves artifacts through the pipeline root in object storage: the same, through the
  S3 server (bucket `mlpipeline`): a task's outputs are uploaded when it ends and its inputs
  downloaded into the next task's directory. (KFP hands components `/minio/...` paths of a
  `minio://` URI; here the URI is the local path, as under kfp.local.)
- A task's retry policy (`retryPolicy.maxRetryCount`) reruns it in a fresh pod.

Not played: caching, conditions and loops (the pipeline has none), the UI, the metadata store.
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.cluster_sim import sandbox

log = logging.getLogger("cluster-sim.kfp")
PIPELINE_ROOT_BUCKET = "mlpipeline"
JOB_NAME_PLACEHOLDER = "{{$.pipeline_job_name}}"


class TaskFailed(RuntimeError):
    """A task's pod ended with a non-zero exit; `task`, `exit_code` and `log_tail` say more."""

    def __init__(self, task: str, exit_code: int, log_tail: str):
        super().__init__(f"task {task} failed (exit {exit_code}):\n{log_tail}")
        self.task, self.exit_code, self.log_tail = task, exit_code, log_tail


@dataclass
class Cluster:
    """What the cluster gives a pod: objects by name, the API server, the service account."""

    namespace: str
    config_maps: dict[str, dict[str, str]]
    secrets: dict[str, dict[str, str]]
    image_env: dict[str, str]  # the image's ENV
    api_host: str = ""  # KUBERNETES_SERVICE_HOST/PORT, when an API server plays along
    api_port: int = 0
    ca_cert: bytes = b""
    token: str = field(default_factory=lambda: secrets.token_hex(16))
    on_pod_start: Callable[[str, str], str] | None = None  # (namespace, pod) -> uid
    on_pod_end: Callable[[str, str], None] | None = None


@dataclass
class TaskRecord:
    name: str
    pod: str
    exit_code: int
    seconds: float
    env: dict[str, str]
    outputs: dict[str, Any] = field(default_factory=dict)  # parameter outputs
    artifacts: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> key, metadata
    attempts: int = 1


class PipelineRun:
    """One run of a compiled pipeline package with `params` over its defaults."""

    def __init__(self, package: str, params: dict[str, Any], cluster: Cluster, s3, root: Path,
                 *, job_name: str | None = None, echo: Callable[[str], None] = print):  # fmt: skip
        docs = list(yaml.safe_load_all(package))
        self.spec = docs[0]
        self.platform = (
            (docs[1] if len(docs) > 1 else {}).get("platforms", {}).get("kubernetes", {})
        )
        self.cluster, self.s3, self.root, self.echo = cluster, s3, root, echo
        self.job = job_name or f"{self.spec['pipelineInfo']['name']}-{secrets.token_hex(3)}"
        defaults = {
            name: p.get("defaultValue")
            for name, p in self.spec["root"]
            .get("inputDefinitions", {})
            .get("parameters", {})
            .items()
        }
        unknown = set(params) - set(defaults)
        if unknown:
            raise ValueError(f"not parameters of this pipeline: {sorted(unknown)}")
        self.params = {**defaults, **params}
        self.records: dict[str, TaskRecord] = {}
        if not s3.client().bucket_exists(PIPELINE_ROOT_BUCKET):
            s3.client().make_bucket(PIPELINE_ROOT_BUCKET)

    # - the DAG -------------------------------------------------------------------------------

    def order(self) -> list[str]:
        tasks = self.spec["root"]["dag"]["tasks"]
        deps = {name: set(t.get("dependentTasks", [])) for name, t in tasks.items()}
        for name, t in tasks.items():
            for kind in ("parameters", "artifacts"):
                for spec in t.get("inputs", {}).get(kind, {}).values():
                    producer = (
                        spec.get("taskOutputParameter") or spec.get("taskOutputArtifact") or {}
                    ).get("producerTask")
                    if producer:
                        deps[name].add(producer)
        done: list[str] = []
        while len(done) < len(tasks):
            ready = sorted(n for n in tasks if n not in done and deps[n] <= set(done))
            if not ready:
                raise ValueError(f"the pipeline's DAG has a cycle among {set(tasks) - set(done)}")
            done.append(ready[0])
        return done

    def run(self, *, until: str | None = None) -> dict[str, Any]:
        """Run every task (or those up to `until`, in order); returns the pipeline's outputs
        (none with `until`). Raises TaskFailed on the first failure."""
        order = self.order()
        if until is not None:
            order = order[: order.index(until) + 1]
        self.echo(f"[kfp] run {self.job}: {' → '.join(order)}")
        for name in order:
            self.run_task(name)
        if until is not None:
            return {}
        outputs = {}
        for out, spec in self.spec["root"]["dag"].get("outputs", {}).get("parameters", {}).items():
            src = spec["valueFromParameter"]
            outputs[out] = self.records[src["producerSubtask"]].outputs[src["outputParameterKey"]]
        return outputs

    # - one task ------------------------------------------------------------------------------

    def run_task(self, name: str) -> TaskRecord:
        task = self.spec["root"]["dag"]["tasks"][name]
        component = self.spec["components"][task["componentRef"]["name"]]
        executor_label = component["executorLabel"]
        container = self.spec["deploymentSpec"]["executors"][executor_label]["container"]
        platform = (
            self.platform.get("deploymentSpec", {}).get("executors", {}).get(executor_label, {})
        )
        retries = task.get("retryPolicy", {}).get("maxRetryCount", 0)
        for attempt in range(1, retries + 2):
            pod = f"{self.job}-{name}-{secrets.token_hex(3)}"
            try:
                record = self.run_pod(name, pod, task, component, container, platform)
            except TaskFailed:
                if attempt > retries:
                    raise
                self.echo(f"[kfp] {name}: attempt {attempt} failed; KFP retries it")
                continue
            record.attempts = attempt
            self.records[name] = record
            return record
        raise AssertionError("unreachable")

    def run_pod(self, name, pod, task, component, container, platform) -> TaskRecord:
        pod_dir = self.root / "pods" / pod
        uid = str(uuid.uuid4())
        if self.cluster.on_pod_start:
            uid = self.cluster.on_pod_start(self.cluster.namespace, pod)
        files = self.service_account_files()
        files.update(self.config_map_files(platform))
        sandbox.prepare(pod_dir, files)
        art_dir = pod_dir / "artifacts"
        executor_input = self.executor_input(name, task, component, art_dir)
        env = self.pod_env(pod, uid, container, platform)
        args = [a.replace("{{$}}", json.dumps(executor_input)) for a in container.get("args", [])]
        argv = [*container["command"], *args]
        shm = next(
            (d.get("sizeLimit") for d in platform.get("emptyDirMounts", [])
             if d["mountPath"] == "/dev/shm"), None,
        )  # fmt: skip
        log_path = pod_dir / "log.txt"
        self.echo(f"[kfp] {name}: pod {pod} started")
        started = time.monotonic()
        with open(log_path, "wb") as out:
            proc = subprocess.run(
                sandbox.wrap(pod_dir, argv, hide=self.root / "pods", shm_size=shm),
                env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            )  # fmt: skip
        seconds = time.monotonic() - started
        if self.cluster.on_pod_end:
            self.cluster.on_pod_end(self.cluster.namespace, pod)
        text = log_path.read_text(errors="replace")
        if proc.returncode != 0:
            self.echo(f"[kfp] {name}: pod {pod} failed (exit {proc.returncode}) in {seconds:.0f} s")
            raise TaskFailed(name, proc.returncode, "\n".join(text.splitlines()[-30:]))
        record = TaskRecord(name, pod, proc.returncode, seconds, env)
        self.collect_outputs(record, component, art_dir)
        self.echo(f"[kfp] {name}: pod {pod} succeeded in {seconds:.0f} s")
        return record

    # - inputs --------------------------------------------------------------------------------

    def executor_input(self, name, task, component, art_dir: Path) -> dict[str, Any]:
        view = Path(sandbox.POD_VIEW) / "artifacts"
        params = {}
        for key, spec in task.get("inputs", {}).get("parameters", {}).items():
            params[key] = self.parameter_value(spec)
        arts = {}
        input_types = component.get("inputDefinitions", {}).get("artifacts", {})
        for key, spec in task.get("inputs", {}).get("artifacts", {}).items():
            src = spec["taskOutputArtifact"]
            upstream = self.records[src["producerTask"]].artifacts[src["outputArtifactKey"]]
            local = art_dir / "in" / key
            self.download(upstream["key"], local)
            arts[key] = {"artifacts": [{
                "name": key, "type": input_types[key]["artifactType"],
                "uri": str(view / "in" / key), "metadata": upstream["metadata"],
            }]}  # fmt: skip
        outputs: dict[str, Any] = {"parameters": {}, "artifacts": {}}
        for key, spec in component.get("outputDefinitions", {}).get("artifacts", {}).items():
            (art_dir / "out").mkdir(parents=True, exist_ok=True)
            outputs["artifacts"][key] = {"artifacts": [{
                "name": key, "type": spec["artifactType"],
                "uri": str(view / "out" / key), "metadata": {},
            }]}  # fmt: skip
        for key in component.get("outputDefinitions", {}).get("parameters", {}):
            outputs["parameters"][key] = {"outputFile": str(view / "params" / key)}
        (art_dir / "params").mkdir(parents=True, exist_ok=True)
        outputs["outputFile"] = str(view / "executor_output.json")
        return {"inputs": {"parameterValues": params, "artifacts": arts}, "outputs": outputs}

    def parameter_value(self, spec: dict[str, Any]) -> Any:
        if "componentInputParameter" in spec:
            return self.params[spec["componentInputParameter"]]
        if "taskOutputParameter" in spec:
            src = spec["taskOutputParameter"]
            return self.records[src["producerTask"]].outputs[src["outputParameterKey"]]
        if "runtimeValue" in spec:
            value = spec["runtimeValue"]["constant"]
            return (
                value.replace(JOB_NAME_PLACEHOLDER, self.job) if isinstance(value, str) else value
            )
        raise ValueError(f"an input the simulation does not resolve: {spec}")

    # - what the pod gets ---------------------------------------------------------------------

    def service_account_files(self) -> dict[str, bytes | str]:
        sa = "/var/run/secrets/kubernetes.io/serviceaccount/"
        files: dict[str, bytes | str] = {sa + "namespace": self.cluster.namespace}
        if self.cluster.api_host:
            files[sa + "token"] = self.cluster.token
            files[sa + "ca.crt"] = self.cluster.ca_cert
        return files

    def config_map_files(self, platform) -> dict[str, bytes | str]:
        files: dict[str, bytes | str] = {}
        for vol in platform.get("configMapAsVolume", []):
            data = self.cluster.config_maps.get(vol["configMapName"])
            if data is None:
                if vol.get("optional"):
                    continue
                raise TaskFailed("?", -1, f'configmap "{vol["configMapName"]}" not found')
            for key, value in data.items():
                files[f"{vol['mountPath'].rstrip('/')}/{key}"] = value
        return files

    def pod_env(self, pod: str, uid: str, container, platform) -> dict[str, str]:
        env = dict(self.cluster.image_env)
        env.update({e["name"]: e["value"] for e in container.get("env", [])})
        for kind, objects, key_field in (
            ("configMapAsEnv", self.cluster.config_maps, "configMapKey"),
            ("secretAsEnv", self.cluster.secrets, "secretKey"),
        ):
            for ref in platform.get(kind, []):
                name = ref.get("configMapName") or ref.get("secretName")
                data = objects.get(name)
                for item in ref["keyToEnv"]:
                    if data is None or item[key_field] not in data:
                        if ref.get("optional"):
                            continue
                        what = "configmap" if kind.startswith("configMap") else "secret"
                        raise TaskFailed(
                            pod, -1,
                            f"CreateContainerConfigError: {what} {name!r} or its key "
                            f"{item[key_field]!r} not found in namespace {self.cluster.namespace}",
                        )  # fmt: skip
                    env[item["envVar"]] = data[item[key_field]]
        fields = {"metadata.name": pod, "metadata.uid": uid,
                  "metadata.namespace": self.cluster.namespace}  # fmt: skip
        for f in platform.get("fieldPathAsEnv", []):
            env[f["name"]] = fields[f["fieldPath"]]
        env.update(HOSTNAME=pod, KFP_POD_NAME=pod, KFP_POD_UID=uid,
                   HOME=f"{sandbox.POD_VIEW}/work")  # fmt: skip
        if self.cluster.api_host:
            env.update(KUBERNETES_SERVICE_HOST=self.cluster.api_host,
                       KUBERNETES_SERVICE_PORT=str(self.cluster.api_port))  # fmt: skip
        return env

    # - outputs -------------------------------------------------------------------------------

    def collect_outputs(self, record: TaskRecord, component, art_dir: Path) -> None:
        out_file = art_dir / "executor_output.json"
        executor_output = json.loads(out_file.read_text()) if out_file.is_file() else {}
        record.outputs = dict(executor_output.get("parameterValues", {}))
        for key in component.get("outputDefinitions", {}).get("parameters", {}):
            if key not in record.outputs and (art_dir / "params" / key).is_file():
                record.outputs[key] = (art_dir / "params" / key).read_text()
        written = executor_output.get("artifacts", {})
        for key in component.get("outputDefinitions", {}).get("artifacts", {}):
            entries = written.get(key, {}).get("artifacts", [{}])
            metadata = entries[0].get("metadata", {}) if entries else {}
            object_key = f"v2/artifacts/{self.job}/{record.name}/{key}"
            self.upload(art_dir / "out" / key, object_key)
            record.artifacts[key] = {"key": object_key, "metadata": metadata}

    def upload(self, path: Path, key: str) -> None:
        client = self.s3.client()
        if path.is_dir():
            for f in sorted(p for p in path.rglob("*") if p.is_file()):
                client.fput_object(PIPELINE_ROOT_BUCKET, f"{key}/{f.relative_to(path)}", str(f))
        elif path.is_file():
            client.fput_object(PIPELINE_ROOT_BUCKET, key, str(path))

    def download(self, key: str, path: Path) -> None:
        client = self.s3.client()
        objects = list(client.list_objects(PIPELINE_ROOT_BUCKET, prefix=key, recursive=True))
        for obj in objects:
            rel = obj.object_name[len(key) :].lstrip("/")
            client.fget_object(
                PIPELINE_ROOT_BUCKET, obj.object_name, str(path / rel if rel else path)
            )
