"""Predictors over numpy batches with PyTorch, TorchScript or ONNX Runtime (see vision/tasks)."""

from __future__ import annotations

import os
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


def ort_predictor(session) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return predict
