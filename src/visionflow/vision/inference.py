"""Predictors over numpy batches with PyTorch, TorchScript or ONNX Runtime (see vision/tasks),
and `bench`, which times ONNX Runtime sessions side by side (quantize and serving)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch


def torch_predictor(net: torch.nn.Module) -> Callable[[np.ndarray], np.ndarray]:
    def predict(x: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return net(torch.from_numpy(x)).float().numpy()

    return predict


def ort_predictor(session) -> Callable[[np.ndarray], np.ndarray]:
    name = session.get_inputs()[0].name

    def predict(x: np.ndarray) -> np.ndarray:
        return session.run(None, {name: np.ascontiguousarray(x, dtype=np.float32)})[0]

    return predict


def bench(sessions: dict[str, object], batch: np.ndarray, repeats: int) -> dict[str, float]:
    """Median milliseconds per run of each session on `batch`, runs interleaved so that load on
    the machine hits every session alike."""
    runs = {name: ort_predictor(s) for name, s in sessions.items()}
    for run in runs.values():
        run(batch)  # warm-up
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(batch)
            times[name].append((time.perf_counter() - start) * 1000)
    return {name: statistics.median(t) for name, t in times.items()}
