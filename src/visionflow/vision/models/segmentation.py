"""Segmentation networks: torchvision's DeepLabV3, LR-ASPP and FCN.

Every builder takes `num_classes` (object classes; the background class 0 is added here) and
returns a network mapping float images in [0, 1] (N, 3, H, W) to per-pixel logits
(N, num_classes + 1, H, W). Like the classifiers, it normalises its input itself, so exported
files take raw pixels. Pretrained backbone weights are off by default (nothing is downloaded).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models import segmentation as tvseg

from visionflow.core.registry import MODELS
from visionflow.vision.models.classification import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    faster_batchnorm,
)


def segmentation_model(name: str):
    """Register a segmentation builder: `task` tells the steps which module and metrics."""

    def add(builder):
        builder.task = "segmentation"
        return MODELS.register(name)(builder)

    return add


class SegmentationNet(nn.Module):
    """Normalises the input, runs a torchvision segmentation model, returns its `out` logits."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)["out"]


def _build(builder, num_classes: int, pretrained_backbone: bool, **kwargs) -> nn.Module:
    net = builder(
        weights=None,
        weights_backbone="DEFAULT" if pretrained_backbone else None,
        num_classes=num_classes + 1,
        **kwargs,
    )
    return SegmentationNet(net if pretrained_backbone else faster_batchnorm(net))


@segmentation_model("lraspp_mobilenet_v3")
def lraspp_mobilenet_v3(num_classes: int, pretrained_backbone: bool = False) -> nn.Module:
    """LR-ASPP on mobilenet_v3_large: the fastest of the three (stride 8 and 16 features)."""
    return _build(tvseg.lraspp_mobilenet_v3_large, num_classes, pretrained_backbone)


@segmentation_model("deeplabv3_mobilenet_v3")
def deeplabv3_mobilenet_v3(num_classes: int, pretrained_backbone: bool = False) -> nn.Module:
    """DeepLabV3 (atrous spatial pyramid pooling) on a dilated mobilenet_v3_large."""
    return _build(
        tvseg.deeplabv3_mobilenet_v3_large, num_classes, pretrained_backbone, aux_loss=False
    )


@segmentation_model("deeplabv3_resnet50")
def deeplabv3_resnet50(num_classes: int, pretrained_backbone: bool = False) -> nn.Module:
    return _build(tvseg.deeplabv3_resnet50, num_classes, pretrained_backbone, aux_loss=False)


@segmentation_model("fcn_resnet50")
def fcn_resnet50(num_classes: int, pretrained_backbone: bool = False) -> nn.Module:
    """The fully convolutional baseline on a dilated resnet50."""
    return _build(tvseg.fcn_resnet50, num_classes, pretrained_backbone, aux_loss=False)
