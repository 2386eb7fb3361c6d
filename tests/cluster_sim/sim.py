"""`make cluster-sim`: a Helm release and a run started from the Kubeflow UI, on one machine.

1. Renders charts/visionflow with ci/sim-values.yaml (release `vf-sim`, namespace `ml-team`), the
   S3 and MLflow endpoints set to the servers started here on 127.0.0.1 (moto's S3 server, a real
   `mlflow server`), and takes the compiled pipeline the release ships (its kfp ConfigMap).
2. Creates what an operator creates before `helm install`: the Secret named in the values.
3. Runs that pipeline with its default parameters, as a run started from the UI with nothing
   changed, through kfp_runner (each step its own pod: process, mount namespace, environment and
   files from the rendered manifests only). The train step reaches the stand-in API server
   (apiserver.py) as its in-cluster API server and runs the training as a PyTorchJob, whose
   Master and Worker are processes too.
4. Checks what a cluster would show: the model registered in the MLflow server, the artifacts in
   the bucket, every step confined to its own directory, no credential in any step's environment
   or log that is not the Secret's.

Prints one JSON summary: the pipeline's own summary plus `pytorchjob`, `replicas`, `restarts`
and `isolation`.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from tests.cluster_sim import sandbox, servers
from tests.cluster_sim.apiserver import STEP_ROLE_FORBIDS, FakeKubernetes
from tests.cluster_sim.cluster import JobWatch, PodNetHook, tls_pair
from tests.cluster_sim.kfp_runner import Cluster, PipelineRun
from tests.cluster_sim.netns import PodNetwork

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "visionflow"
SIM_VALUES = CHART / "ci" / "sim-values.yaml"
RELEASE, NAMESPACE = "vf-sim", "ml-team"
# Set in this process only: a step whose environment or log shows it got more than its pod spec.
CANARY = "canary-of-the-simulation-process"


def render(values: dict[str, Any], release: str = RELEASE, namespace: str = NAMESPACE):
    import helm_python as helm

    with helm.Chart.load(CHART) as chart:
        chart.validate_schema(chart.merge_values(values))
        rendered = chart.render(values, name=release, namespace=namespace, is_install=True)
    return [
        d
        for path, text in sorted(rendered.items())
        if not path.endswith("NOTES.txt")
        for d in yaml.safe_load_all(text)
        if d
    ]


def image_env(dockerfile: Path) -> dict[str, str]:
    """The ENV of the Dockerfile's last stage, with its venv and home mapped to this machine's."""
    text = dockerfile.read_text().replace("\\\n", " ")
    last_stage = text.split("\nFROM ")[-1]
    env: dict[str, str] = {}
    for line in last_stage.splitlines():
        if line.startswith("ENV "):
            for key, value in re.findall(r"(\w+)=(\S*)", line[4:]):
                env[key] = value
    venv = str(Path(sys.executable).parent.parent)
    home = f"{sandbox.POD_VIEW}/work"
    out = {}
    for key, value in env.items():
        value = value.replace("$PATH", "/usr/local/bin:/usr/bin:/bin").replace("/opt/venv", venv)
        value = value.replace("/home/visionflow", home)
        out[key] = value
    git = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True
    )
    out["VISIONFLOW_GIT_COMMIT"] = git.stdout.strip() or "unknown"
    return out


def merged(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        out[key] = merged(out.get(key, {}), value) if isinstance(value, dict) else value
    return out


class Simulation(contextlib.AbstractContextManager):
    """The release and its servers; `run(params)` starts one pipeline run, as from the UI."""

    def __init__(self, root: Path, *, echo: Callable[[str], None] = print):
        self.root, self.echo = root, echo
        self.stack = contextlib.ExitStack()

    def __enter__(self) -> Simulation:
        sandbox.check()
        self.root.mkdir(parents=True, exist_ok=True)
        os.environ["AWS_SECRET_ACCESS_KEY"] = CANARY  # never to reach a step
        try:
            self._start()
        except BaseException:
            self.stack.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stack.close()

    def _start(self) -> None:
        self.s3 = self.stack.enter_context(servers.s3_server(self.root / "s3"))
        self.tracking = self.stack.enter_context(
            servers.mlflow_server(self.s3, self.root / "mlflow")
        )
        values = merged(
            yaml.safe_load(SIM_VALUES.read_text()),
            {"storage": {"endpoint": self.s3.endpoint}, "mlflow": {"trackingUri": self.tracking}},
        )
        self.bucket = values["storage"]["bucket"]
        docs = render(values)
        config_maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
        minio = merged(yaml.safe_load((CHART / "values.yaml").read_text())["minio"],
                       values.get("minio", {}))  # fmt: skip
        self.secret = {
            minio["accessKeyKey"]: servers.S3_ENV["AWS_ACCESS_KEY_ID"],
            minio["secretKeyKey"]: servers.S3_ENV["AWS_SECRET_ACCESS_KEY"],
        }
        (self.package,) = [d["data"]["pipeline-training.yaml"] for d in docs
                           if d["kind"] == "ConfigMap" and "pipeline-training.yaml" in d["data"]]  # fmt: skip
        self.net = self.stack.enter_context(PodNetwork())
        self.net.expose_host_ports([_port(self.s3.endpoint), _port(self.tracking)])
        self.api = FakeKubernetes(
            namespaces=(NAMESPACE,), forbid=STEP_ROLE_FORBIDS, pods="process",
            pod_root=self.root / "job-pods", base_env=image_env(REPO / "images" / "train.Dockerfile"),
            network=PodNetHook(self.net),
        )  # fmt: skip
        cert, key = tls_pair(self.root / "tls")
        self.api.serve_tls(cert, key)
        self.stack.enter_context(self.api)
        self.api.add_secret(NAMESPACE, minio["existingSecret"], self.secret)
        for name, data in config_maps.items():
            self.api.add_config_map(NAMESPACE, name, data)
        host, port = self.api.api_address()
        self.cluster = Cluster(
            namespace=NAMESPACE,
            config_maps=config_maps,
            secrets={minio["existingSecret"]: self.secret},
            image_env=image_env(REPO / "images" / "cpu.Dockerfile"),
            api_host=host,
            api_port=port,
            ca_cert=cert.read_bytes(),
            on_pod_start=lambda ns, pod: self.api.add_pod(ns, pod, {"app": "kfp-step"}),
            on_pod_end=lambda ns, pod: self.api.one_pod("DELETE", ns, pod, {}, b""),
        )

    def pipeline_run(self, params: dict[str, Any] | None = None, *,
                     job_name: str | None = None) -> PipelineRun:  # fmt: skip
        return PipelineRun(self.package, params or {}, self.cluster, self.s3, self.root / "kfp",
                           job_name=job_name, echo=self.echo)  # fmt: skip

    def run(self, params: dict[str, Any] | None = None, *, job_name: str | None = None,
            until: str | None = None, kill_worker_when=None) -> dict[str, Any]:  # fmt: skip
        """One run with `params` over the defaults, checked; raises TaskFailed.

        Returns the pipeline's summary (none with `until`, which stops after that task) plus
        `jobs` (each cluster job's replicas and its pods' restarts, as launched), `pytorchjob` and
        `replicas` (train's),
        `restarts` (all jobs' pods), `killed`, `train` and `optimized` (what the train and
        optimize steps output),
        `isolation`, and for a whole run `registered` and `bucket_keys`. `kill_worker_when` (a
        function of no arguments): once it is true while the job's Worker runs, the Worker is
        killed with SIGKILL (a preempted pod)."""
        run = self.pipeline_run(params, job_name=job_name)
        watch = JobWatch(self.api, self.net, kill_worker_when=kill_worker_when)
        watch.start()
        try:
            outputs = run.run(until=until)
        finally:
            watch.stop()
        summary = json.loads(outputs["Output"]) if "Output" in outputs else {}
        jobs = watch.summary()
        # train's job, then optimize's when the run prunes, as launched
        summary["jobs"] = {n: {"replicas": j.get("replicas", {}),
                               "restarts": sum(j.get("pods", {}).values())}
                           for n, j in jobs["jobs"].items()}  # fmt: skip
        name = next(iter(jobs["jobs"]), None)
        job = jobs["jobs"].get(name, {})
        summary["pytorchjob"] = name
        summary["replicas"] = job.get("replicas", {})
        summary["restarts"] = sum(sum(j.get("pods", {}).values()) for j in jobs["jobs"].values())
        summary["killed"] = jobs["killed"]
        model = run.records["train"].artifacts["model"]["metadata"]
        summary["train"] = {k: model.get(k) for k in ("best_score", "resumed_from_step", "monitor",
                                                   "mlflow_run_id")}  # fmt: skip
        metrics = run.records["train"].artifacts["metrics"]["metadata"]
        summary["train"]["global_step"] = metrics.get("global_step")
        if "optimize" in run.records:  # what the optimize step output: the run's model
            summary["optimized"] = run.records["optimize"].artifacts["optimized"]["metadata"]
        summary["isolation"] = self.isolation(run)
        summary["isolation"]["rendezvous_port"] = jobs["probe"]
        if jobs["probe"].get("outsider") != "refused":
            summary["isolation"]["problems"].append(
                f"the rendezvous port was not refused to a pod outside the job: {jobs['probe']}"
            )
        if "model_name" in summary:
            summary["registered"] = registered(self.tracking, summary)
            summary["bucket_keys"] = len(self.s3.keys(self.bucket))
        return summary

    def checkpoint_step(self, run_id: str) -> int | None:
        """The global step of the run's last.ckpt in the store, if there is one."""
        import tempfile

        import torch

        key = f"checkpoints/{run_id}/last.ckpt"
        if key not in self.s3.keys(self.bucket, prefix=key):
            return None
        with tempfile.TemporaryDirectory() as tmp:
            self.s3.client().fget_object(self.bucket, key, f"{tmp}/last.ckpt")
            return int(torch.load(f"{tmp}/last.ckpt", map_location="cpu", weights_only=True)
                       ["global_step"])  # fmt: skip

    def isolation(self, run: PipelineRun) -> dict[str, Any]:
        """What held: each step's environment and log, and the disk outside its own directory."""
        allowed = set(self.secret.values())
        problems = []
        for name, rec in run.records.items():
            for key, value in rec.env.items():
                if CANARY in value:
                    problems.append(f"{name}: ${key} holds this process's environment")
                if re.search(r"SECRET|PASSWORD|TOKEN|ACCESS_KEY", key) and value not in allowed:
                    problems.append(f"{name}: ${key} is a credential that is not the Secret's")
            text = (run.root / "pods" / rec.pod / "log.txt").read_text(errors="replace")
            if any(value in text for value in [*allowed, CANARY]):
                problems.append(f"{name}: its log shows a credential")
        refused = self.probe_writes(run)
        problems += [f"a pod could write to {path}" for path, ok in refused.items() if not ok]
        return {
            "steps": len(run.records),
            "env_only_from_manifests": not any("$" in p or "log" in p for p in problems),
            "writes_outside_own_dir_refused": all(refused.values()),
            "problems": problems,
        }

    def probe_writes(self, run: PipelineRun) -> dict[str, bool]:
        """A pod made like the steps' tries to write where no step may: each must fail."""
        pod_dir = run.root / "pods" / "write-probe"
        sandbox.prepare(pod_dir, {})
        others = [p for p in (run.root / "pods").iterdir() if p != pod_dir]
        targets = [REPO / "probe", Path.home() / "probe", self.root / "probe",
                   *(p / "work" / "probe" for p in others[:2]), Path("/etc/visionflow-probe")]  # fmt: skip
        code = (
            "import json,sys\nout={}\nfor p in sys.argv[1:]:\n"
            "    try:\n        open(p,'w').close(); out[p]=False\n"
            "    except OSError:\n        out[p]=True\nprint(json.dumps(out))"
        )
        argv = [sys.executable, "-c", code, *map(str, targets)]
        proc = subprocess.run(sandbox.wrap(pod_dir, argv, hide=run.root / "pods"),
                              capture_output=True, text=True, env={"PATH": "/usr/bin:/bin"})  # fmt: skip
        return json.loads(proc.stdout)


def registered(tracking: str, summary: dict[str, Any]) -> dict[str, Any]:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking)
    version = client.get_model_version(summary["model_name"], str(summary["model_version"]))
    return {"name": version.name, "version": version.version, "status": version.status}


def _port(url: str) -> int:
    from urllib.parse import urlsplit

    return urlsplit(url).port
