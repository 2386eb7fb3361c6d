"""export: ONNX (dynamic batch) and TorchScript, each checked against PyTorch on real test images.

A file is uploaded only after its parity check passes: a model that disagrees with its source is
never stored where a later step would pick it up.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from visionflow.core.factories import build_datamodule
from visionflow.runs import load_step, save_step
from visionflow.storage import open_store
from visionflow.vision.checkpoints import load_classifier
from visionflow.vision.inference import collect, ort_predictor, ort_session, torch_predictor

log = logging.getLogger("visionflow.export")


class ExportError(RuntimeError):
    """An exported model does not match the PyTorch model."""


@dataclass
class Parity:
    max_abs_diff: float
    top1_agreement: float
    samples: int


@dataclass
class ExportResult:
    onnx_uri: str
    torchscript_uri: str
    onnx: Parity
    torchscript: Parity
    image_size: int


def export_onnx(net: torch.nn.Module, path: Path, image_size: int, opset: int = 18) -> Path:
    """ONNX with a dynamic batch dimension; input `images` (N, 3, H, W) float in [0, 1]."""
    example = torch.rand(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            net,
            (example,),
            str(path),
            input_names=["images"],
            output_names=["logits"],
            dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}},
            opset_version=opset,
            dynamo=False,
        )
    return path


def export_torchscript(net: torch.nn.Module, path: Path, image_size: int) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.trace(net, torch.rand(2, 3, image_size, image_size))
        scripted = torch.jit.freeze(scripted.eval())
        torch.jit.save(scripted, str(path))
    return path


def parity(reference: np.ndarray, other: np.ndarray) -> Parity:
    return Parity(
        max_abs_diff=float(np.abs(reference - other).max()),
        top1_agreement=float((reference.argmax(1) == other.argmax(1)).mean()),
        samples=len(reference),
    )


def export(cfg, dataset_id: str | None = None, checkpoint_uri: str | None = None) -> ExportResult:
    """Export the checkpoint (default: this run's best); store the files only if parity holds."""
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    dataset_id = dataset_id or load_step(store, cfg.run_id, "prepare")["dataset_id"]
    checkpoint_uri = checkpoint_uri or load_step(store, cfg.run_id, "train")["checkpoint_uri"]
    net, spec = load_classifier(checkpoint_uri, cfg.storage.endpoint)
    size = spec["image_size"]
    loader = build_datamodule(cfg, store, dataset_id).test_dataloader()
    limit = cfg.export.max_samples
    reference, _ = collect(torch_predictor(net), loader, limit)

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = export_onnx(net, Path(tmp) / "model.onnx", size)
        onnx_parity = parity(
            reference, collect(ort_predictor(ort_session(onnx_path)), loader, limit)[0]
        )
        ts_path = export_torchscript(net, Path(tmp) / "model.torchscript.pt", size)
        scripted = torch.jit.load(str(ts_path))
        ts_parity = parity(reference, collect(torch_predictor(scripted), loader, limit)[0])
        for name, p in (("ONNX", onnx_parity), ("TorchScript", ts_parity)):
            log.info(
                "%s parity on %d test images: max |diff| %.2e, top-1 agreement %.4f",
                name,
                p.samples,
                p.max_abs_diff,
                p.top1_agreement,
            )
            if p.max_abs_diff > cfg.export.atol or p.top1_agreement < cfg.export.min_top1_agreement:
                raise ExportError(
                    f"{name} export disagrees with PyTorch on {p.samples} test images: max |logit diff| "
                    f"{p.max_abs_diff:.2e} (limit {cfg.export.atol:.0e}), top-1 agreement "
                    f"{p.top1_agreement:.4f} (limit {cfg.export.min_top1_agreement}); nothing was stored"
                )
        prefix = f"models/{cfg.run_id}"
        onnx_uri = store.put_file(onnx_path, f"{prefix}/model.onnx")
        ts_uri = store.put_file(ts_path, f"{prefix}/model.torchscript.pt")
    result = ExportResult(onnx_uri, ts_uri, onnx_parity, ts_parity, size)
    save_step(store, cfg.run_id, "export", result)
    return result
