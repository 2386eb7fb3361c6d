"""quantize: int8 post-training static quantization of the ONNX model, measured against fp32.

Calibration uses training images. Accuracy and speed of int8 and fp32 are measured side by side
in one process on this machine's CPU, at batch 1 and batch 64. The step fails when the accuracy
drop exceeds `quantize.max_accuracy_drop` points, and then stores nothing.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionflow.core.factories import build_datamodule
from visionflow.runs import load_step, save_step
from visionflow.storage import open_store, split_uri
from visionflow.vision.inference import accuracy, collect, ort_predictor, ort_session

log = logging.getLogger("visionflow.quantize")


class QuantizeError(RuntimeError):
    """The int8 model loses more accuracy than allowed."""


@dataclass
class QuantizeResult:
    int8_uri: str
    fp32_accuracy: float
    int8_accuracy: float
    accuracy_drop: float  # points (percent of the test set)
    latency_ms: dict[str, float]  # "fp32_b1", "int8_b1", "fp32_b64", "int8_b64": median per batch
    speedup_b1: float
    speedup_b64: float


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
    dm = build_datamodule(cfg, store, dataset_id)
    src_store, key = split_uri(onnx_uri, cfg.storage.endpoint)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = src_store.get_file(key, Path(tmp) / "model.onnx")
        calibration = _calibration_batches(dm, cfg.quantize.calibration_samples)
        int8 = quantize_int8(fp32, Path(tmp) / "model.int8.onnx", calibration)
        sessions = {"fp32": ort_session(fp32), "int8": ort_session(int8)}
        test = dm.test_dataloader()
        fp32_logits, labels = collect(ort_predictor(sessions["fp32"]), test)
        int8_logits, _ = collect(ort_predictor(sessions["int8"]), test)
        fp32_acc, int8_acc = accuracy(fp32_logits, labels), accuracy(int8_logits, labels)
        drop = (fp32_acc - int8_acc) * 100
        size = int(dm.image_size)
        rng = np.random.default_rng(0)
        latency = {}
        for b in (1, 64):
            batch = rng.random((b, 3, size, size), dtype=np.float32)
            for name, ms in bench(sessions, batch, cfg.quantize.bench_repeats).items():
                latency[f"{name}_b{b}"] = ms
        result = QuantizeResult(
            int8_uri="",
            fp32_accuracy=fp32_acc,
            int8_accuracy=int8_acc,
            accuracy_drop=drop,
            latency_ms=latency,
            speedup_b1=latency["fp32_b1"] / latency["int8_b1"],
            speedup_b64=latency["fp32_b64"] / latency["int8_b64"],
        )
        log.info(
            "int8: accuracy %.4f vs fp32 %.4f (drop %.2f points); speed-up %.2fx at batch 1, %.2fx at batch 64",
            int8_acc, fp32_acc, drop, result.speedup_b1, result.speedup_b64,
        )  # fmt: skip
        if drop > cfg.quantize.max_accuracy_drop:
            raise QuantizeError(
                f"int8 model loses {drop:.2f} accuracy points (fp32 {fp32_acc:.4f}, int8 {int8_acc:.4f}), "
                f"more than quantize.max_accuracy_drop={cfg.quantize.max_accuracy_drop}; nothing was stored"
            )
        result.int8_uri = store.put_file(int8, f"models/{cfg.run_id}/model.int8.onnx")
    save_step(store, cfg.run_id, "quantize", result)
    return result


def _calibration_batches(dm, samples: int, batch_size: int = 32) -> Iterator[np.ndarray]:
    """Training images with the evaluation transform (no augmentation), a fixed subset."""
    from torch.utils.data import DataLoader, Subset

    train = dm.dataset("train")
    ds = type(train)(train.shards, dm.eval_transform)
    idx = np.random.default_rng(0).permutation(len(ds))[:samples]
    for images, _ in DataLoader(Subset(ds, idx.tolist()), batch_size=batch_size):
        yield images.numpy()
