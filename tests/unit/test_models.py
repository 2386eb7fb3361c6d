"""Every registered model trains: a forward and a backward pass at the size it is used at."""

import pytest
import torch

from visionflow.core.factories import build_model
from visionflow.core.registry import MODELS


@pytest.mark.parametrize("name", MODELS.list())
def test_forward_backward(name):
    torch.manual_seed(0)
    net = build_model({"name": name}, num_classes=4).train()
    x = torch.rand(2, 3, 64, 64)
    logits = net(x)
    assert logits.shape == (2, 4)
    torch.nn.functional.cross_entropy(logits, torch.tensor([0, 3])).backward()
    grads = [p.grad for p in net.parameters() if p.requires_grad]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
