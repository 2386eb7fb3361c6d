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
from torchvision.models.segmentation.lraspp import LRASPP

from visionflow.core.config import ConfigError
from visionflow.core.registry import MODELS
from visionflow.vision.models.classification import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    faster_batchnorm,
    plain_features,
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
def lraspp_mobilenet_v3(
    num_classes: int, pretrained_backbone: bool = False, backbone: str = "large"
) -> nn.Module:
    """LR-ASPP on mobilenet_v3_large: the fastest of the three (stride 8 and 16 features).

    `backbone=tiny` puts the head on four plain VGG-style stages of 16 to 128 channels instead
    (stride 4 and 16 features), which learn the shapes from scratch in a CPU minute.
    """
    if backbone == "large":
        return _build(tvseg.lraspp_mobilenet_v3_large, num_classes, pretrained_backbone)
    if backbone != "tiny":
        raise ConfigError(f"model.backbone must be 'large' or 'tiny', got {backbone!r}")
    if pretrained_backbone:
        raise ConfigError("model.backbone=tiny has no pretrained weights")
    return SegmentationNet(LRASPP(_LowHigh(), 32, 128, num_classes + 1, inter_channels=64))


class _LowHigh(nn.Module):
    """LR-ASPP's backbone for `tiny`: the stride-4 (`low`) and stride-16 (`high`) features of
    four plain stages."""

    def __init__(self) -> None:
        super().__init__()
        stages = plain_features(16, stages=4)
        self.low, self.high = stages[:2], stages[2:]

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        low = self.low(x)
        return {"low": low, "high": self.high(low)}


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
