"""ONNX Runtime sessions: one factory, so that a model file runs the same way wherever it runs.

Quantize times fp32 against int8 with `ort_session`, and serving, batch inference and the
registered pyfunc model (`serving/onnx_pyfunc.py`) run the files it chose with the same
settings. A leaf without torch: loading the pyfunc model imports this module and ONNX Runtime
only.
"""

from __future__ import annotations

from pathlib import Path

from visionflow.host import usable_cpus


def ort_session(path: str | Path, threads: int | None = None):
    """An `onnxruntime.InferenceSession` on the CPU: all graph optimisations, `threads` intra-op
    threads (default: the cores this process may use, at most 8), no busy-waiting between runs."""
    import onnxruntime as ort  # heavy: loaded when a session is made, not with vision.tasks

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads or min(usable_cpus(), 8)
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
