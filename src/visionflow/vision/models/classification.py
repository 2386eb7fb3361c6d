"""Classification networks.

Every builder takes `num_classes` plus its own keyword options and returns a plain `nn.Module`
mapping float images in [0, 1] (N, 3, H, W) to logits. Input normalisation lives inside the
network (`Normalized`), so exported ONNX/TorchScript files take raw [0, 1] pixels and a server
needs no preprocessing constants beyond the image size.
"""

from __future__ import annotations

import re

import torch
import torchvision
from torch import nn

from visionflow.core.registry import MODELS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Normalized(nn.Module):
    """Standardises the input with fixed per-channel statistics, then runs `net`."""

    def __init__(self, net: nn.Module, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x - self.mean) / self.std)


def faster_batchnorm(net: nn.Module, momentum: float = 0.1) -> nn.Module:
    """PyTorch's default BatchNorm momentum for networks trained from scratch.

    torchvision's MobileNetV3 (and the detection and segmentation models on it) sets 0.01,
    tuned for long ImageNet runs: its running statistics then lag the weights for hundreds of
    steps, and a short run evaluates with statistics from untrained weights.
    """
    for m in net.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.momentum = momentum
    return net


def _conv_bn(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)
    )


def plain_features(width: int, stages: int) -> nn.Sequential:
    """`stages` VGG-style stages, each a strided 3x3 convolution that halves the resolution and
    one more 3x3 convolution, `width` channels doubling per stage: strides 2, 4, ... 2**stages.

    The `tiny` backbone of the detection and segmentation models: from scratch, it learns the
    shapes in a CPU minute, where mobilenet_v3 needs thousands of images and several epochs.
    """
    blocks, cin = [], 3
    for k in range(stages):
        cout = width * 2**k
        down = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )
        blocks.append(nn.Sequential(down, _conv_bn(cout, cout)))
        cin = cout
    return nn.Sequential(*blocks)


class SimpleCNN(nn.Module):
    """Three VGG-style stages of two 3x3 convolutions, then global pooling and a linear head.

    Small enough to train on a laptop CPU in a minute, big enough for int8 to pay off.
    """

    def __init__(self, num_classes: int, width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            _conv_bn(3, w), _conv_bn(w, w), nn.MaxPool2d(2),
            _conv_bn(w, 2 * w), _conv_bn(2 * w, 2 * w), nn.MaxPool2d(2),
            _conv_bn(2 * w, 4 * w), _conv_bn(4 * w, 4 * w),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )  # fmt: skip
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(4 * w, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@MODELS.register("simple_cnn")
def simple_cnn(num_classes: int, width: int = 32, dropout: float = 0.0) -> nn.Module:
    return Normalized(SimpleCNN(num_classes, width=width, dropout=dropout))


def _torchvision(name: str, num_classes: int, pretrained: bool) -> nn.Module:
    if pretrained:
        # Weights download on first use: never in tests, and only when the user asks.
        net = torchvision.models.get_model(name, weights="DEFAULT")
        _reset_classifier(net, num_classes)
    else:
        net = torchvision.models.get_model(name, weights=None, num_classes=num_classes)
    return Normalized(net)


def _reset_classifier(net: nn.Module, num_classes: int) -> None:
    if isinstance(getattr(net, "fc", None), nn.Linear):
        net.fc = nn.Linear(net.fc.in_features, num_classes)
    elif isinstance(getattr(net, "classifier", None), nn.Sequential):
        last = net.classifier[-1]
        net.classifier[-1] = nn.Linear(last.in_features, num_classes)
    else:
        raise ValueError(f"don't know where the classifier of {type(net).__name__} is")


@MODELS.register("resnet18")
def resnet18(num_classes: int, pretrained: bool = False) -> nn.Module:
    return _torchvision("resnet18", num_classes, pretrained)


@MODELS.register("resnet50")
def resnet50(num_classes: int, pretrained: bool = False) -> nn.Module:
    return _torchvision("resnet50", num_classes, pretrained)


@MODELS.register("mobilenet_v3_small")
def mobilenet_v3_small(num_classes: int, pretrained: bool = False) -> nn.Module:
    return _torchvision("mobilenet_v3_small", num_classes, pretrained)


@MODELS.register("mobilenet_v3_large")
def mobilenet_v3_large(num_classes: int, pretrained: bool = False) -> nn.Module:
    return _torchvision("mobilenet_v3_large", num_classes, pretrained)


@MODELS.register("efficientnet_b0")
def efficientnet_b0(num_classes: int, pretrained: bool = False) -> nn.Module:
    return _torchvision("efficientnet_b0", num_classes, pretrained)


@MODELS.register("convnext_tiny")
def convnext_tiny(num_classes: int, pretrained: bool = False) -> nn.Module:
    return _torchvision("convnext_tiny", num_classes, pretrained)


@MODELS.register("vit_b_16")
def vit_b_16(num_classes: int, image_size: int = 224, pretrained: bool = False) -> nn.Module:
    """ViT-B/16; its position embeddings fix the input size (filled in from data.image_size)."""
    if pretrained:
        if image_size != 224:
            raise ValueError("pretrained vit_b_16 weights are for 224 px images")
        return _torchvision("vit_b_16", num_classes, pretrained)
    net = torchvision.models.vit_b_16(weights=None, num_classes=num_classes, image_size=image_size)
    return Normalized(net)


@MODELS.register("cifar_resnet18")
def cifar_resnet18(num_classes: int) -> nn.Module:
    """ResNet-18 for 32 px inputs: a 3x3 stride-1 stem and no max pooling (as in the CIFAR
    literature), so the last stage still sees 4x4 features instead of 1x1."""
    net = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    return Normalized(net, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))


@MODELS.register("timm")
def timm_model(
    num_classes: int, timm_name: str = "resnet18", pretrained: bool = False
) -> nn.Module:
    """Any timm model by name (`model=timm model.timm_name=convnext_nano`). Pretrained weights
    download from the Hugging Face hub on first use, so they stay off by default."""
    import timm

    if timm_name not in timm.list_models():
        family = re.match(r"[a-z]*", timm_name.lower()).group()  # resnet9000 -> resnet
        close = timm.list_models(f"*{family}*")[:10] if family else []
        raise ValueError(f"unknown timm model {timm_name!r}; similar: {', '.join(close) or 'none'}")
    net = timm.create_model(timm_name, pretrained=pretrained, num_classes=num_classes)
    cfg = net.pretrained_cfg
    return Normalized(net, mean=cfg.get("mean", IMAGENET_MEAN), std=cfg.get("std", IMAGENET_STD))
