"""Predictors over numpy batches with PyTorch, TorchScript or ONNX Runtime (see vision/tasks)."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def torch_predictor(net: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x)).float().numpy()

    return predict


def ort_session(path: str | Path, threads: int | None = None):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or min(os.cpu_count() or 1, 8)
    opts.log_severity_level = 3
    # Idle ORT workers busy-wait by default: with two sessions timed side by side (quantize's
    # fp32 vs int8), the idle one's spinning threads steal the cores the other is measured on.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_graph_session(path: str | Path):
    """The ONNX graph run op by op, without ONNX Runtime's fusions: for an int8 QDQ model,
    Dequantize, the float op, Quantize. This is what the quantized model means, computed without
    int8 kernels, so comparing it with `ort_session` shows what this host's kernels change
    (saturation, where they have it)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def ort_predictor(session) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return predict


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
