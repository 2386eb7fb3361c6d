"""quantize: int8 post-training static quantization of the ONNX model, measured against fp32.

The int8 model is portable: QDQ, uint8 activations, int8 per-channel weights kept to 7 bits
(`reduce_range`). On x86-64 CPUs without VNNI (AVX2, AVX-512F/BW), ONNX Runtime multiplies uint8
by int8 with VPMADDUBSW, which adds two products into 16 bits and saturates when they overflow:
with 8-bit weights that can happen (2 x 255 x 127 > 32,767), and a model that loses 0.2 points
on a VNNI host lost 4.8 on an AVX2 one. With 7-bit weights it cannot (2 x 255 x 64 < 32,767), so
the same file computes the same on AVX2, AVX-512, VNNI and AMX hosts. `make bench` compares the
settings ONNX Runtime offers on the host it runs on.

Calibration uses training images. The task's main metric (accuracy, mIoU), the agreement of
int8's decisions with fp32's, and the speed of both at batch 1 and 64 are measured side by side
on this host, and recorded with its CPU. int8 is optional: when it loses more than
`quantize.max_accuracy_drop` points it is rejected, nothing is stored, and the run goes on with
the fp32 model (`quantize.required=true` fails the step instead). For a task without int8
support (detection) the step says so and the run goes on with fp32.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from visionflow.compose.data import build_datamodule
from visionflow.host import describe_host, host_cpu
from visionflow.results import ExportResult, QuantizeResult
from visionflow.runs import save_step
from visionflow.sessions import ort_session
from visionflow.storage import open_store, split_uri
from visionflow.vision.inference import bench
from visionflow.vision.tasks import get_task

log = logging.getLogger("visionflow.quantize")

# How the int8 model is made: onnxruntime.quantization.quantize_static's arguments, by name
# (see the module's docstring for why 7-bit weights). `make bench` compares the alternatives.
SETTINGS = {
    "quant_format": "QDQ",
    "activation_type": "QUInt8",  # per tensor
    "weight_type": "QInt8",
    "per_channel": True,
    "reduce_range": True,  # 7-bit weights: no 16-bit saturation on any x86-64 host
    "calibrate_method": "MinMax",
}
BATCHES = (1, 64)

STORED, REJECTED, UNSUPPORTED = "stored", "rejected", "unsupported"


class QuantizeError(RuntimeError):
    """The int8 model loses more accuracy than allowed, and `quantize.required` is set."""


def quantize_int8(
    fp32_path: Path,
    out_path: Path,
    calibration: Iterable[np.ndarray],
    settings: dict[str, object] = SETTINGS,
) -> Path:
    """Static int8 quantization with `settings`, after ORT's pre-processing.

    Pre-processing runs shape inference and graph optimisation, which folds BatchNorm into the
    convolutions, so that each Conv+ReLU quantizes as one fused int8 kernel.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
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

    enums = {"quant_format": QuantFormat, "activation_type": QuantType, "weight_type": QuantType,
             "calibrate_method": CalibrationMethod}  # fmt: skip
    kwargs = {k: enums[k][v] if k in enums else v for k, v in settings.items()}
    prepped = out_path.with_suffix(".prep.onnx")
    quant_pre_process(str(fp32_path), str(prepped), skip_symbolic_shape=True)
    quantize_static(str(prepped), str(out_path), Reader(calibration), **kwargs)
    prepped.unlink()
    return out_path


def bench_batches(sessions: dict[str, object], image_size: int, repeats: int) -> dict[str, float]:
    """`bench` at each of BATCHES on random images: median ms as {"<name>_b<batch>": ms}."""
    rng = np.random.default_rng(0)
    latency = {}
    for b in BATCHES:
        batch = rng.random((b, 3, image_size, image_size), dtype=np.float32)
        for name, ms in bench(sessions, batch, repeats).items():
            latency[f"{name}_b{b}"] = ms
    return latency


def quantize(cfg, dataset_id: str, exported: ExportResult) -> QuantizeResult:
    """Quantize export's fp32 ONNX model, measure it on the dataset, store it if good."""
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    task = get_task(exported.task)
    host = host_cpu()
    if not task.quantizable:
        reason = f"int8 quantization is not supported for {task.name}; the fp32 model is used"
        log.warning(reason)
        result = QuantizeResult("", UNSUPPORTED, reason, task.metric, host=host)
        save_step(store, cfg.run_id, "quantize", result)
        return result
    dm = build_datamodule(cfg, store, dataset_id, task.name)
    src_store, key = split_uri(exported.onnx_uri, cfg.storage.endpoint)
    with tempfile.TemporaryDirectory() as tmp:
        fp32 = src_store.get_file(key, Path(tmp) / "model.onnx")
        calibration = _calibration_batches(dm, cfg.quantize.calibration_samples)
        int8 = quantize_int8(fp32, Path(tmp) / "model.int8.onnx", calibration)
        sessions = {"fp32": ort_session(fp32), "int8": ort_session(int8)}
        predict = {name: task.ort_predictor(s) for name, s in sessions.items()}
        test, classes = dm.test_dataloader(), exported.classes
        fp32_score = task.evaluate(predict["fp32"], test, classes)[0].score
        int8_score = task.evaluate(predict["int8"], test, classes)[0].score
        parity = task.parity(predict["fp32"], predict["int8"], test, cfg.export.max_samples)
        result = QuantizeResult(
            int8_uri="",
            status=STORED,
            reason="",
            metric=task.metric,
            settings=dict(SETTINGS),
            host=host,
            fp32_score=fp32_score,
            int8_score=int8_score,
            accuracy_drop=(fp32_score - int8_score) * 100,
            parity=parity,
        )
        log.info(
            "int8: %s %.4f vs fp32 %.4f (drop %.2f points); agreement with fp32 %.2f%% on %d "
            "test images", task.metric, int8_score, fp32_score, result.accuracy_drop,
            parity.agreement * 100, parity.samples,
        )  # fmt: skip
        if result.accuracy_drop > cfg.quantize.max_accuracy_drop:
            result.status = REJECTED
            result.reason = (
                f"int8 rejected: it loses {result.accuracy_drop:.2f} points of {task.metric} "
                f"(fp32 {fp32_score:.4f}, int8 {int8_score:.4f}), more than "
                f"quantize.max_accuracy_drop={cfg.quantize.max_accuracy_drop}"
            )
            if cfg.quantize.required:
                raise QuantizeError(
                    f"{result.reason}, and quantize.required is set; nothing was stored"
                )
            log.warning("%s; no int8 file is stored and the run goes on with fp32", result.reason)
            save_step(store, cfg.run_id, "quantize", result)
            return result
        ms = bench_batches(sessions, exported.image_size, cfg.quantize.bench_repeats)
        result.latency_ms = ms
        result.speedup_b1 = ms["fp32_b1"] / ms["int8_b1"]
        result.speedup_b64 = ms["fp32_b64"] / ms["int8_b64"]
        result.faster_variant = {
            f"batch_{b}": "int8" if getattr(result, f"speedup_b{b}") > 1 else "fp32"
            for b in BATCHES
        }
        faster = set(result.faster_variant.values()) == {"int8"}
        result.serve_variant = "int8" if faster else "fp32"
        (log.info if faster else log.warning)(speed_verdict(result))
        result.int8_uri = store.put_file(int8, f"models/{cfg.run_id}/model.int8.onnx")
    save_step(store, cfg.run_id, "quantize", result)
    return result


def speed_verdict(r: QuantizeResult) -> str:
    """One plain sentence: which variant is faster on the measuring host, and by how much."""
    where = f"on this host, {describe_host(r.host)}"
    ratios = f"{r.speedup_b1:.2f}x fp32's speed at batch 1 and {r.speedup_b64:.2f}x at batch 64"
    if r.serve_variant == "int8":
        return f"int8 is faster than fp32 {where}: {ratios}; the registered model runs int8"
    slower = " and ".join(str(b) for b in BATCHES if r.faster_variant[f"batch_{b}"] == "fp32")
    return (
        f"int8 is SLOWER than fp32 at batch {slower} {where}: {ratios}; the registered model "
        "runs fp32 (the int8 file is stored beside it)"
    )


def _calibration_batches(dm, samples: int, batch_size: int = 32) -> Iterator[np.ndarray]:
    """Training images with the evaluation transform (no augmentation), a fixed subset."""
    from torch.utils.data import DataLoader, Subset

    train = dm.dataset("train")
    ds = type(train)(train.shards, dm.eval_transform, train.task)
    idx = np.random.default_rng(0).permutation(len(ds))[:samples]
    for images, _ in DataLoader(Subset(ds, idx.tolist()), batch_size=batch_size):
        yield images.numpy()
