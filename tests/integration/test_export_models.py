"""Every registered model exports to ONNX and TorchScript through its task's export code, and the
files compute what PyTorch computes; int8 files hold integer operators and are smaller.

Untrained networks at small inputs: parity is about the export, not about what was learnt. The
export step's own check (`Task.parity`) compares classification and segmentation outputs. For
detection it compares only confident detections, which an untrained detector has none of (and
RetinaNet's and SSD's initial scores are all equal, so their order is arbitrary): detectors
get noise on their weights, a score threshold of 0, and every detection is compared.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch

from visionflow.compose.models import build_model
from visionflow.core.registry import MODELS
from visionflow.sessions import ort_session
from visionflow.steps.quantize import quantize_int8
from visionflow.vision.tasks import get_task

pytestmark = pytest.mark.slow

SIZE = {"classification": 32, "segmentation": 32, "detection": 64}
# Detectors at the images' size, keeping their 10 best candidates whatever their score.
SMALL = {"min_size": 64, "max_size": 64}
ALL_DETECTIONS = {
    "fasterrcnn_mobilenet_v3": {"box_score_thresh": 0.0, "box_detections_per_img": 10, **SMALL},
    "retinanet_mobilenet_v3": {"score_thresh": 0.0, "detections_per_img": 10, **SMALL},
    "retinanet_resnet50": {"score_thresh": 0.0, **SMALL},
    "ssdlite_mobilenet_v3": {"score_thresh": 0.0, "detections_per_img": 10},
}
INTEGER_OPS = {"QLinearConv", "ConvInteger", "MatMulInteger", "QLinearMatMul"}


def _task(name: str) -> str:
    return getattr(MODELS.get(name), "task", "classification")


def _model_cfg(name: str) -> dict:
    if name == "timm":
        return {"name": "timm", "timm_name": "resnet10t"}
    return {"name": name, **ALL_DETECTIONS.get(name, {})}


def _images(task: str, size: int, count: int = 3):
    """Shapes-like inputs: a bright square on a dark background, one per image."""
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.2, (count, 3, size, size)).astype(np.float32)
    for i in range(count):
        lo = size // 4 + i
        x[i, i % 3, lo : lo + size // 2, lo : lo + size // 3] = 0.9
    return list(x) if task == "detection" else x


def _assert_same_detections(ours, theirs, size: int) -> None:
    for a, b in zip(ours, theirs, strict=True):
        assert len(a["boxes"]) > 0 and len(a["boxes"]) == len(b["boxes"])
        np.testing.assert_array_equal(a["labels"], b["labels"])
        np.testing.assert_allclose(a["boxes"], b["boxes"], atol=1e-3 * size)
        np.testing.assert_allclose(a["scores"], b["scores"], atol=1e-4)


def _cases():
    for name in MODELS.list():
        yield pytest.param(name, "torchscript", id=f"{name}-torchscript")
        yield pytest.param(name, "onnx", id=f"{name}-onnx")


@pytest.mark.parametrize(("name", "kind"), _cases())
def test_every_model_exports_with_parity(name, kind, tmp_path):
    task_name = _task(name)
    task, size = get_task(task_name), SIZE[task_name]
    torch.manual_seed(0)
    net = build_model(_model_cfg(name), num_classes=3, image_size=size).eval()
    if task_name == "detection":
        with torch.no_grad():  # distinct scores: a well-defined order of the detections
            for p in net.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    images = _images(task_name, size)
    reference = task.torch_predictor(net)
    if kind == "onnx":
        exported = task.ort_predictor(ort_session(task.export_onnx(net, tmp_path / "m.onnx", size)))
    else:
        scripted = task.export_torchscript(net, tmp_path / "model.pt", size)
        exported = task.torch_predictor(torch.jit.load(str(scripted)))
    if task_name == "detection":
        _assert_same_detections(reference(images), exported(images), size)
    else:
        parity = task.parity(reference, exported, [(torch.from_numpy(images), torch.zeros(3))])
        assert parity.samples == 3 and parity.agreement == 1.0
        assert parity.max_abs_diff <= 1e-4, parity


@pytest.mark.parametrize("name", ["simple_cnn", "mobilenet_v3_small", "lraspp_mobilenet_v3"])
def test_int8_files_hold_integer_operators_and_are_smaller(name, tmp_path):
    task_name = _task(name)
    task, size = get_task(task_name), SIZE[task_name]
    torch.manual_seed(0)
    net = build_model(_model_cfg(name), num_classes=3, image_size=size).eval()
    fp32 = task.export_onnx(net, tmp_path / "model.onnx", size)
    int8 = quantize_int8(fp32, tmp_path / "model.int8.onnx", [_images(task_name, size)])
    graph = onnx.load(str(int8)).graph
    ops = {node.op_type for node in graph.node}
    int8_weights = [t for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert ops & INTEGER_OPS or {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    assert int8_weights, "no int8 initializer: the weights were not quantized"
    assert int8.stat().st_size < fp32.stat().st_size
