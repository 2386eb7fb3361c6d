"""Every registered model trains: a forward and a backward pass at the size it is used at."""

import pytest
import torch

from visionflow.compose.models import build_model
from visionflow.core.registry import MODELS


def _task(name: str) -> str:
    return getattr(MODELS.get(name), "task", "classification")


CLASSIFIERS = [n for n in MODELS.list() if _task(n) == "classification"]
DETECTORS = [n for n in MODELS.list() if _task(n) == "detection"]
SEGMENTERS = [n for n in MODELS.list() if _task(n) == "segmentation"]


def test_every_task_has_models():
    assert len(CLASSIFIERS) >= 10 and len(DETECTORS) >= 3 and len(SEGMENTERS) >= 3


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_forward_backward(name):
    torch.manual_seed(0)
    net = build_model({"name": name}, num_classes=4, image_size=64).train()
    x = torch.rand(2, 3, 64, 64)
    logits = net(x)
    assert logits.shape == (2, 4)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_image_size_follows_the_data_for_models_that_fix_it():
    net = build_model({"name": "vit_b_16"}, num_classes=3, image_size=32).eval()
    assert net.net.image_size == 32
    assert net(torch.rand(1, 3, 32, 32)).shape == (1, 3)


def test_any_timm_model_by_name_and_a_clear_error_for_unknown_ones():
    net = build_model({"name": "timm", "timm_name": "resnet10t"}, num_classes=3).eval()
    assert net(torch.rand(2, 3, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match=r"unknown timm model 'resnet9000'; similar: .*resnet"):
        build_model({"name": "timm", "timm_name": "resnet9000"}, num_classes=3)


def _backward_reaches_every_parameter(net, loss) -> None:
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


# retinanet_resnet50 resizes its inputs to the COCO recipe's 800 px, where one training step
# takes 40 s of CPU; at 320 px (the mobilenet detectors' size) it is the same network, in 6 s.
SMALLER = {"retinanet_resnet50": {"min_size": 320, "max_size": 320}}


@pytest.mark.parametrize(
    "name", [pytest.param(n, marks=pytest.mark.slow) if "resnet50" in n else n for n in DETECTORS]
)
def test_detectors_train_on_targets_and_detect_in_eval(name):
    torch.manual_seed(0)
    net = build_model({"name": name, **SMALLER.get(name, {})}, num_classes=3).train()
    images = [torch.rand(3, 96, 96), torch.rand(3, 96, 96)]
    targets = [
        {"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "labels": torch.tensor([1])},
        {"boxes": torch.tensor([[30.0, 5.0, 90.0, 40.0], [5.0, 50.0, 40.0, 90.0]]),
         "labels": torch.tensor([3, 2])},
    ]  # fmt: skip
    losses = net(images, targets)
    assert len(losses) >= 2 and all(torch.isfinite(v) for v in losses.values())
    _backward_reaches_every_parameter(net, sum(losses.values()))
    with torch.no_grad():
        out = net.eval()(images)
    assert len(out) == 2 and set(out[0]) == {"boxes", "labels", "scores"}
    assert all(int(label) in (1, 2, 3) for d in out for label in d["labels"])  # 0: background


@pytest.mark.parametrize("name", SEGMENTERS)
def test_segmenters_predict_every_pixel_with_a_background_class(name):
    torch.manual_seed(0)
    net = build_model({"name": name}, num_classes=3).train()
    logits = net(torch.rand(2, 3, 64, 64))
    assert logits.shape == (2, 4, 64, 64)  # 3 classes and the background
    masks = torch.randint(0, 4, (2, 64, 64))
    masks[:, :4] = 255  # ignored
    loss = torch.nn.functional.cross_entropy(logits, masks, ignore_index=255)
    _backward_reaches_every_parameter(net, loss)


def test_detector_options_fail_clearly():
    from visionflow.core.config import ConfigError

    with pytest.raises(ConfigError, match="anchor_sizes has 2 sizes; the FPN has 3 levels"):
        build_model({"name": "fasterrcnn_mobilenet_v3", "anchor_sizes": [32, 64]}, num_classes=2)
    with pytest.raises(ConfigError, match=r"strides=\[8, 7\]: give increasing strides from"):
        build_model({"name": "fasterrcnn_mobilenet_v3", "strides": [8, 7]}, num_classes=2)
