"""A step's threads follow its pod's CPU limit (host.cpu_quota, kfp.io.threads_within_cpu_limit):
torch and ONNX Runtime count the node's cores, not the pod's share."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from visionflow.host import cpu_quota, usable_cpus


def _cgroup(tmp_path, v2: str | None = None, v1: tuple[str, str] | None = None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    if v2 is not None:
        (tmp_path / "cpu.max").write_text(v2 + "\n")
    if v1 is not None:
        (tmp_path / "cpu").mkdir()
        (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text(v1[0] + "\n")
        (tmp_path / "cpu" / "cpu.cfs_period_us").write_text(v1[1] + "\n")
    return tmp_path


@pytest.mark.parametrize(
    ("v2", "v1", "quota"),
    [
        ("max 100000", None, None),  # v2, no limit
        ("400000 100000", None, 4),
        ("150000 100000", None, 1),  # 1.5 CPUs: one thread never waits for the quota
        ("50000 100000", None, 1),  # half a CPU: still one thread
        (None, ("-1", "100000"), None),  # v1, no limit
        (None, ("200000", "100000"), 2),
        ("garbage", None, None),
        (None, None, None),  # no cgroup files (not Linux, no cgroup mounted)
    ],
)
def test_the_cgroup_cpu_quota_in_whole_cpus(tmp_path, v2, v1, quota):
    assert cpu_quota(_cgroup(tmp_path, v2, v1)) == quota


def test_usable_cpus_are_capped_by_the_quota_not_raised_by_it(tmp_path):
    cores = len(os.sched_getaffinity(0))
    assert usable_cpus(_cgroup(tmp_path / "a", v2="100000 100000")) == 1
    assert usable_cpus(_cgroup(tmp_path / "b", v2=f"{100000 * (cores + 8)} 100000")) == cores
    assert usable_cpus(_cgroup(tmp_path / "c", v2="max 100000")) == cores


PROBE = """
import json, os, sys, torch
from visionflow.kfp.io import threads_within_cpu_limit
threads_within_cpu_limit(sys.argv[1])
print(json.dumps([torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")]))
"""


def _probe(cgroup, env) -> list:
    out = subprocess.run([sys.executable, "-c", PROBE, str(cgroup)], env=env, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return json.loads(out.strip().splitlines()[-1])


@pytest.fixture
def one_cpu_pod(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("needs 2 cores to tell a limit of 1 from the default")
    return _cgroup(tmp_path / "cg", v2="100000 100000")


def test_a_step_under_a_cpu_limit_runs_that_many_threads(one_cpu_pod):
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    assert _probe(one_cpu_pod, env) == [1, "1"]


def test_omp_num_threads_set_by_the_user_wins(one_cpu_pod):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    assert _probe(one_cpu_pod, env) == [2, "2"]
