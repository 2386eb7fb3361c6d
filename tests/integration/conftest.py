"""Real servers on 127.0.0.1 for the integration tests (tests/cluster_sim/servers.py): moto's
S3 server and `mlflow server`, one of each per session."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cluster_sim import servers
from tests.cluster_sim.servers import BUCKET, S3_ENV, free_port  # noqa: F401  (for the tests)


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    with servers.s3_server(tmp_path_factory.mktemp("moto")) as s3:
        yield s3


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    with servers.mlflow_server(s3_server, tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def visionflow(
    *args: str, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """Run the `visionflow` command as a user would."""
    cmd = [str(Path(sys.executable).with_name("visionflow")), *args]
    return subprocess.run(
        cmd, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
