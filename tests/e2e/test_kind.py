"""End to end on a kind cluster (`make kind-up`, then `make e2e`): opt-in, never in CI.

A tiny pipeline run through the real KFP API, with training as a 2-worker CPU PyTorchJob.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        os.environ.get("VISIONFLOW_E2E") != "1", reason="needs `make kind-up` (Docker)"
    ),
]
KFP_HOST = os.environ.get("KFP_HOST", "http://localhost:8080")


def test_tiny_pipeline_with_a_two_worker_pytorchjob():
    cmd = [str(Path(sys.executable).with_name("visionflow")), "pipeline", "submit", "--host", KFP_HOST, "--wait",
           "--timeout", "3600", "experiment=shapes_tiny", "storage=minio", "tracking=server",
           "cluster.nodes=3", "cluster.cpu=1", "cluster.memory=2Gi", "cluster.shm_size=256Mi"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=4000)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["state"] == "SUCCEEDED"
