"""The CPU this process runs on, as quantize records it and serving and the reports describe it,
and how many of its cores this process may use.

A leaf: plain Python, no torch, so the run summary can describe quantize's host cheaply.
"""

from __future__ import annotations

import math
import os
import platform
from pathlib import Path

# The CPU features that decide how ONNX Runtime runs int8: AVX2 or AVX-512 multiply uint8 by int8
# into 16-bit sums (VPMADDUBSW), VNNI and AMX into 32-bit ones; ARM's dot-product extensions.
INT8_FLAGS = (
    "sse4_1", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx_vnni",
    "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm",
)  # fmt: skip


def host_cpu(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, str]:
    """The CPU this process runs on: its model name, architecture, and its int8-relevant flags."""
    model, flags = platform.processor() or "unknown", set()
    try:
        lines = Path(cpuinfo).read_text().splitlines()
    except OSError:  # not Linux: the model name is all there is
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model Name") and value.strip():
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return {
        "cpu": model,
        "arch": platform.machine(),
        "flags": " ".join(f for f in INT8_FLAGS if f in flags),
    }


def describe_host(host: dict[str, str]) -> str:
    """`host_cpu()` in one line: "AMD EPYC (x86_64; sse4_1 avx avx2 fma)"."""
    return f"{host['cpu']} ({host['arch']}; {host['flags'] or 'no int8 flags read'})"


def usable_cpus(cgroup: str | Path = "/sys/fs/cgroup") -> int:
    """The cores this process may keep busy: those it may run on, capped by its cgroup's CPU
    quota (`cpu_quota`)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    quota = cpu_quota(cgroup)
    return min(cores or 1, quota) if quota is not None else cores or 1


def cpu_quota(cgroup: str | Path = "/sys/fs/cgroup") -> int | None:
    """The whole CPUs this process's cgroup allows per period (a Kubernetes pod's CPU limit; at
    least 1), from cgroup v2's `cpu.max` or v1's CFS files; None where it sets no limit.
    `os.cpu_count()` counts the node's cores: a pod limited to 4 CPUs on a 64-core node that
    starts 64 threads is stalled by the quota each period, every thread holding up the others at
    each parallel region."""
    root = Path(cgroup)
    try:
        if (v2 := root / "cpu.max").is_file():
            quota, period = v2.read_text().split()[:2]
        else:
            quota = (root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota == "max" or int(quota) <= 0:
            return None
        return max(1, math.floor(int(quota) / int(period)))
    except (OSError, ValueError):
        return None
