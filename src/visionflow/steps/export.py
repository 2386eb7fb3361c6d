"""export: ONNX and TorchScript, each checked against PyTorch on real test images.

A file is uploaded only after its parity check passes: a model that disagrees with its source is
never stored where a later step would pick it up. What is compared depends on the task (see
vision/tasks): logits for classification and segmentation, the confident detections' boxes,
scores and labels for detection. Every output of PyTorch and of the exported file must be
finite: a NaN compares false with any tolerance, so a NaN model would otherwise pass.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import torch

from visionflow.compose.data import build_datamodule
from visionflow.compose.models import load_network
from visionflow.results import ExportResult
from visionflow.runs import save_step
from visionflow.sessions import ort_session
from visionflow.steps.evaluate import NonFiniteOutputError, finite_outputs
from visionflow.storage import open_store
from visionflow.vision.tasks import get_task
from visionflow.vision.tasks.base import exporter_of

log = logging.getLogger("visionflow.export")


class ExportError(RuntimeError):
    """An exported model does not match the PyTorch model."""


def export(cfg, dataset_id: str, checkpoint_uri: str) -> ExportResult:
    """Export the checkpoint; store the files only if parity holds on the dataset's test images.

    The result carries the checkpoint's task, classes and image size on to quantize and register.
    """
    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    net, spec = load_network(checkpoint_uri, cfg.storage.endpoint)
    task = get_task(spec["task"])
    size = spec["image_size"]
    loader = build_datamodule(cfg, store, dataset_id, task.name).test_dataloader()
    limit = cfg.export.max_samples
    reference = finite_outputs(task.torch_predictor(net), "PyTorch")

    with tempfile.TemporaryDirectory() as tmp:
        onnx_path = task.export_onnx(net, Path(tmp) / "model.onnx", size)
        ts_path = task.export_torchscript(net, Path(tmp) / "model.torchscript.pt", size)
        exported = {
            "ONNX": task.ort_predictor(ort_session(onnx_path)),
            "TorchScript": task.torch_predictor(torch.jit.load(str(ts_path))),
        }
        try:
            onnx_parity, ts_parity = (
                task.parity(reference, finite_outputs(predict, name), loader, limit)
                for name, predict in exported.items()
            )
        except NonFiniteOutputError as err:
            raise ExportError(f"{err}: parity fails, nothing was stored") from None
        for name, p in (("ONNX", onnx_parity), ("TorchScript", ts_parity)):
            log.info(
                "%s parity on %d test images: max |diff| %.2e, agreement %.4f",
                name, p.samples, p.max_abs_diff, p.agreement,
            )  # fmt: skip
            if problem := p.problem(cfg.export.atol, cfg.export.min_agreement):
                raise ExportError(
                    f"{name} export disagrees with PyTorch on {p.samples} test images: {problem}; "
                    "nothing was stored"
                )
        prefix = f"models/{cfg.run_id}"
        onnx_uri = store.put_file(onnx_path, f"{prefix}/model.onnx")
        ts_uri = store.put_file(ts_path, f"{prefix}/model.torchscript.pt")
        exporter = exporter_of(onnx_path)
    log.info("ONNX exporter: %s", exporter)
    result = ExportResult(
        task.name, onnx_uri, ts_uri, onnx_parity, ts_parity, size, list(spec["classes"]), exporter
    )
    save_step(store, cfg.run_id, "export", result)
    return result
