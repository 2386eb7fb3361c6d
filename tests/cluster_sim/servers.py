"""Real servers on 127.0.0.1: moto's S3 server and `mlflow server`, as their own processes.

MinIO's own server is not installable here; moto's server mode is a real HTTP S3 endpoint that
the MinIO SDK talks to exactly as it would to MinIO. The MLflow server is the real one, with a
sqlite backend and its artifact store on that S3 server. Used by the integration tests'
fixtures and by `make cluster-sim`.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BUCKET = "visionflow"
# moto accepts any credentials; these are test values, not secrets.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "test-access",
    "AWS_SECRET_ACCESS_KEY": "test-secret-value",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ok(url: str, timeout: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(
                f"{proc.args[0]} exited ({proc.returncode}):\n{log.read_text()[-3000:]}"
            )
        try:
            with urllib.request.urlopen(url, timeout=1) as resp:
                if resp.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"{url} not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@dataclass(frozen=True)
class S3:
    endpoint: str

    def client(self):
        from minio import Minio

        return Minio(self.endpoint.removeprefix("http://"), access_key=S3_ENV["AWS_ACCESS_KEY_ID"],
                     secret_key=S3_ENV["AWS_SECRET_ACCESS_KEY"], secure=False)  # fmt: skip

    def keys(self, bucket: str = BUCKET, prefix: str = "") -> list[str]:
        return sorted(
            o.object_name for o in self.client().list_objects(bucket, prefix=prefix, recursive=True)
        )


@contextlib.contextmanager
def s3_server(work: Path, buckets: tuple[str, ...] = (BUCKET,)) -> Iterator[S3]:
    """moto's S3 server as its own process, with `buckets` made."""
    work.mkdir(parents=True, exist_ok=True)
    port, log = free_port(), work / "moto.log"
    proc = start(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        {**os.environ, **S3_ENV},
        log,
    )
    try:
        wait_ok(f"http://127.0.0.1:{port}/moto-api/", 30, proc, log)
        s3 = S3(f"http://127.0.0.1:{port}")
        for bucket in buckets:
            s3.client().make_bucket(bucket)
        yield s3
    finally:
        stop(proc)


@contextlib.contextmanager
def mlflow_server(s3_server: S3, work: Path) -> Iterator[str]:
    """A real `mlflow server`: sqlite backend, artifacts proxied to s3://visionflow/mlflow."""
    work.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {
        **os.environ, **S3_ENV,
        "MLFLOW_S3_ENDPOINT_URL": s3_server.endpoint,
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # no job runner: starts in seconds
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }  # fmt: skip
    cmd = [str(Path(sys.executable).with_name("mlflow")), "server",
           "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
           "--serve-artifacts", "--artifacts-destination", f"s3://{BUCKET}/mlflow",
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    proc = start(cmd, env, work / "server.log")
    try:
        wait_ok(f"http://127.0.0.1:{port}/health", 120, proc, work / "server.log")
        yield f"http://127.0.0.1:{port}"
    finally:
        stop(proc)
