"""Batch inference over a DataLoader with PyTorch, TorchScript or ONNX Runtime."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch


def collect(
    predict: Callable[[np.ndarray], np.ndarray], loader: Iterable, max_samples: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(logits, labels) for the loader's batches, stopping after max_samples images."""
    outs, labels, seen = [], [], 0
    for images, target in loader:
        x, y = images.cpu().numpy(), target.cpu().numpy()  # cached loaders serve GPU batches
        if max_samples is not None and seen + len(x) > max_samples:
            x, y = x[: max_samples - seen], y[: max_samples - seen]
        outs.append(predict(x))
        labels.append(y)
        seen += len(x)
        if max_samples is not None and seen >= max_samples:
            break
    return np.concatenate(outs), np.concatenate(labels)


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


def accuracy(logits: np.ndarray, labels: np.ndarray) -> float:
    return float((logits.argmax(1) == labels).mean())
