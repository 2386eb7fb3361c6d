"""Every registered model trains: a forward and a backward pass at the size it is used at."""

import pytest
import torch

from visionflow.core.factories import build_model
from visionflow.core.registry import MODELS


@pytest.mark.parametrize("name", MODELS.list())
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
