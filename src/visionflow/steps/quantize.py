"""quantize: int8 post-training static quantization of the ONNX model, measured against fp32.

Calibration uses training images. The task's main metric (accuracy, mIoU) and the speed of
int8 and fp32 are measured side by side in one process on this machine's CPU, at batch 1 and
batch 64. The step fails when the metric drops by more than `quantize.max_accuracy_drop`
points, and then stores nothing. For a task without int8 support (detection) the step says so,
records it, and the run goes on with the fp32 model.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionflow.core.factories import build_datamodule, task_of
from visionflow.runs import load_step, save_step
from visionflow.storage import open_store, split_uri
from visionflow.vision.inference import ort_predictor, ort_session
from visionflow.vision.tasks import get_task

log = logging.getLogger("visionflow.quantize")


class QuantizeError(RuntimeError):
    """The int8 model loses more accuracy than allowed."""


@dataclass
class QuantizeResult:
    int8_uri: str  # "" when the task has no int8 model
    supported: bool
    reason: str  # why not, when not supported
    metric: str  # the task's main metric, measured for fp32 and int8
    fp32_score: float | None = None
    int8_score: float | None = None
    accuracy_drop: float | None = None  # points (x100) of the metric
    # "fp32_b1", "int8_b1", "fp32_b64", "int8_b64": median milliseconds per batch
    latency_ms: dict[str, float] = field(default_factory=dict)
    speedup_b1: float | None = None
    speedup_b64: float | None = None


def quantize_int8(fp32_path: Path, out_path: Path, calibration: Iterable[np.ndarray]) -> Path:
    """Static int8 quantization (QDQ, per-channel weights) after ORT's pre-processing.

    Pre-processing runs shape inference and graph optimisation, which folds BatchNorm into the
    convolutions, so that each Conv+ReLU quantizes as one fused int8 kernel.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self, batches: Iterable[np.ndarray]) -> None:
            self._it: Iterator[np.ndarray] = iter(batches)

        def get_next(self):
            batch = next(self._it, None)
            return None if batch is None else {"images": batch.astype(np.float32)}

    prepped = out_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
    quantize_static(
        str(prepped),
        str(out_path),
        Reader(calibration),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
    )
    prepped.unlink()
    return out_path


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


def quantize(cfg, dataset_id: str | None = None, onnx_uri: str | None = None) -> QuantizeResult:
    """Quantize the fp32 ONNX model (default: this run's export), measure it, store it if good."""
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    dataset_id = dataset_id or load_step(store, cfg.run_id, "prepare")["dataset_id"]
    onnx_uri = onnx_uri or load_step(store, cfg.run_id, "export")["onnx_uri"]
    task = get_task(task_of(cfg))
    if not task.quantizable:
        reason = f"int8 quantization is not supported for {task.name}; the fp32 model is used"
        log.warning(reason)
        result = QuantizeResult("", False, reason, task.metric)
        save_step(store, cfg.run_id, "quantize", result)
        return result
    dm = build_datamodule(cfg, store, dataset_id)
    src_store, key = split_uri(onnx_uri, cfg.storage.endpoint)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = src_store.get_file(key, Path(tmp) / "model.onnx")
        calibration = _calibration_batches(dm, cfg.quantize.calibration_samples)
        int8 = quantize_int8(fp32, Path(tmp) / "model.int8.onnx", calibration)
        sessions = {"fp32": ort_session(fp32), "int8": ort_session(int8)}
        test, classes = dm.test_dataloader(), dm.classes
        fp32_score = task.evaluate(task.ort_predictor(sessions["fp32"]), test, classes)[0].score
        int8_score = task.evaluate(task.ort_predictor(sessions["int8"]), test, classes)[0].score
        drop = (fp32_score - int8_score) * 100
        size = int(dm.image_size)
        rng = np.random.default_rng(0)
        latency = {}
        for b in (1, 64):
            batch = rng.random((b, 3, size, size), dtype=np.float32)
            for name, ms in bench(sessions, batch, cfg.quantize.bench_repeats).items():
                latency[f"{name}_b{b}"] = ms
        result = QuantizeResult(
            int8_uri="",
            supported=True,
            reason="",
            metric=task.metric,
            fp32_score=fp32_score,
            int8_score=int8_score,
            accuracy_drop=drop,
            latency_ms=latency,
            speedup_b1=latency["fp32_b1"] / latency["int8_b1"],
            speedup_b64=latency["fp32_b64"] / latency["int8_b64"],
        )
        log.info(
            "int8: %s %.4f vs fp32 %.4f (drop %.2f points); speed-up %.2fx at batch 1, %.2fx at batch 64",
            task.metric, int8_score, fp32_score, drop, result.speedup_b1, result.speedup_b64,
        )  # fmt: skip
        if drop > cfg.quantize.max_accuracy_drop:
            raise QuantizeError(
                f"int8 model loses {drop:.2f} points of {task.metric} (fp32 {fp32_score:.4f}, int8 "
                f"{int8_score:.4f}), more than quantize.max_accuracy_drop="
                f"{cfg.quantize.max_accuracy_drop}; nothing was stored"
            )
        result.int8_uri = store.put_file(int8, f"models/{cfg.run_id}/model.int8.onnx")
    save_step(store, cfg.run_id, "quantize", result)
    return result


def _calibration_batches(dm, samples: int, batch_size: int = 32) -> Iterator[np.ndarray]:
    """Training images with the evaluation transform (no augmentation), a fixed subset."""
    from torch.utils.data import DataLoader, Subset

    train = dm.dataset("train")
    ds = type(train)(train.shards, dm.eval_transform, train.task)
    idx = np.random.default_rng(0).permutation(len(ds))[:samples]
    for images, _ in DataLoader(Subset(ds, idx.tolist()), batch_size=batch_size):
        yield images.numpy()
