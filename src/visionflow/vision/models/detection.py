"""Detection networks: torchvision's Faster R-CNN, RetinaNet and SSDlite.

Every builder takes `num_classes` (object classes; the background class is added here) plus its
own options and returns torchvision's detector: in training mode it maps `(images, targets)` to
a dict of losses, in eval mode `images` to one `{"boxes", "labels", "scores"}` dict per image.
Images are float tensors in [0, 1]; the detector normalises and resizes them itself
(`min_size`/`max_size`), and boxes come back in the input image's pixels. Labels count from 1:
0 is the background.

The mobilenet_v3 detectors are sized by options (which feature strides feed the FPN, its
width, the anchor sizes, the box head's width and sampling) so that one builder serves both
320-800 px COCO images and 64 px shapes on a laptop CPU. Pretrained weights are off by
default: nothing is downloaded unless `pretrained_backbone=true`.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torchvision.models.detection import FasterRCNN, RetinaNet
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.backbone_utils import BackboneWithFPN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.misc import FrozenBatchNorm2d

from visionflow.core.config import ConfigError
from visionflow.core.registry import MODELS
from visionflow.vision.models.classification import faster_batchnorm, plain_features

ASPECT_RATIOS = (0.5, 1.0, 2.0)


def detection_model(name: str):
    """Register a detection builder: `task` tells the steps which LightningModule and metrics."""

    def add(builder):
        builder.task = "detection"
        return MODELS.register(name)(builder)

    return add


def mobilenet_fpn(
    variant: str, strides: list[int], channels: int, pretrained: bool
) -> BackboneWithFPN:
    """mobilenet_v3 `features` (or, for `tiny`, five plain VGG-style stages of 16 to 256
    channels, strides 2-32) with an FPN over the last block of each stride in `strides`.

    The FPN adds one max-pooled level on top, so it outputs len(strides) + 1 maps.
    """
    if variant not in ("large", "small", "tiny"):
        raise ConfigError(f"model.backbone must be 'large', 'small' or 'tiny', got {variant!r}")
    if variant == "tiny":
        if pretrained:
            raise ConfigError("model.backbone=tiny has no pretrained weights")
        features = plain_features(16, stages=5)
    else:
        weights = "DEFAULT" if pretrained else None
        norm = FrozenBatchNorm2d if pretrained else nn.BatchNorm2d  # torchvision's convention
        features = getattr(torchvision.models, f"mobilenet_v3_{variant}")(
            weights=weights, norm_layer=norm
        ).features
        if not pretrained:
            faster_batchnorm(features)
    # Each block's stride and width, from one small forward pass.
    found: dict[int, tuple[int, int]] = {}  # stride -> (last block index, channels)
    x = torch.zeros(1, 3, 64, 64)
    with torch.no_grad():
        for i, block in enumerate(features.eval()):
            x = block(x)
            found[64 // x.shape[-1]] = (i, x.shape[1])
    features.train()
    bad = [s for s in strides if s not in found]
    if bad or not strides or sorted(strides) != list(strides):
        raise ConfigError(
            f"model.strides={list(strides)}: give increasing strides from {sorted(found)}"
        )
    return_layers = {str(found[s][0]): str(k) for k, s in enumerate(strides)}
    return BackboneWithFPN(
        features, return_layers, [found[s][1] for s in strides], channels, norm_layer=None
    )


def _anchors(sizes: list[int], levels: int) -> AnchorGenerator:
    if len(sizes) != levels:
        raise ConfigError(
            f"model.anchor_sizes has {len(sizes)} sizes; the FPN has {levels} levels "
            "(one per stride plus a pooled one): give one size per level"
        )
    return AnchorGenerator(tuple((int(s),) for s in sizes), (ASPECT_RATIOS,) * levels)


@detection_model("fasterrcnn_mobilenet_v3")
def fasterrcnn_mobilenet_v3(
    num_classes: int,
    backbone: str = "large",
    pretrained_backbone: bool = False,
    strides: list = (16, 32),  # noqa: B006 (a tuple: never mutated)
    fpn_channels: int = 256,
    anchor_sizes: list = (64, 128, 256),  # noqa: B006
    representation_size: int = 1024,
    min_size: int = 320,
    max_size: int = 640,
    rpn_pre_nms_top_n_train: int = 2000,
    rpn_post_nms_top_n_train: int = 2000,
    rpn_pre_nms_top_n_test: int = 150,
    rpn_post_nms_top_n_test: int = 150,
    rpn_batch_size_per_image: int = 256,
    box_batch_size_per_image: int = 512,
    box_detections_per_img: int = 100,
    box_score_thresh: float = 0.05,
) -> nn.Module:
    """Faster R-CNN on a mobilenet_v3 FPN. The defaults follow torchvision's
    `fasterrcnn_mobilenet_v3_large_320_fpn` (input size, proposal counts), with the stride-16
    map added to the FPN and one anchor size per level, so that small objects have anchors."""
    body = mobilenet_fpn(backbone, list(strides), fpn_channels, pretrained_backbone)
    names = [str(k) for k in range(len(strides))]
    return FasterRCNN(
        body,
        rpn_anchor_generator=_anchors(list(anchor_sizes), len(strides) + 1),
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(fpn_channels * 7 * 7, representation_size),
        box_predictor=FastRCNNPredictor(representation_size, num_classes + 1),
        min_size=min_size,
        max_size=max_size,
        rpn_pre_nms_top_n_train=rpn_pre_nms_top_n_train,
        rpn_post_nms_top_n_train=rpn_post_nms_top_n_train,
        rpn_pre_nms_top_n_test=rpn_pre_nms_top_n_test,
        rpn_post_nms_top_n_test=rpn_post_nms_top_n_test,
        rpn_batch_size_per_image=rpn_batch_size_per_image,
        box_batch_size_per_image=box_batch_size_per_image,
        box_detections_per_img=box_detections_per_img,
        box_score_thresh=box_score_thresh,
    )


@detection_model("retinanet_mobilenet_v3")
def retinanet_mobilenet_v3(
    num_classes: int,
    backbone: str = "large",
    pretrained_backbone: bool = False,
    strides: list = (16, 32),  # noqa: B006
    fpn_channels: int = 256,
    anchor_sizes: list = (64, 128, 256),  # noqa: B006
    min_size: int = 320,
    max_size: int = 640,
    detections_per_img: int = 100,
    score_thresh: float = 0.05,
) -> nn.Module:
    """RetinaNet (focal loss, one stage) on the same mobilenet_v3 FPN as Faster R-CNN."""
    body = mobilenet_fpn(backbone, list(strides), fpn_channels, pretrained_backbone)
    return RetinaNet(
        body,
        num_classes=num_classes + 1,
        anchor_generator=_anchors(list(anchor_sizes), len(strides) + 1),
        min_size=min_size,
        max_size=max_size,
        detections_per_img=detections_per_img,
        score_thresh=score_thresh,
    )


@detection_model("retinanet_resnet50")
def retinanet_resnet50(
    num_classes: int,
    pretrained_backbone: bool = False,
    min_size: int = 800,
    max_size: int = 1333,
    score_thresh: float = 0.05,
) -> nn.Module:
    """torchvision's `retinanet_resnet50_fpn_v2` (the COCO recipe's model)."""
    return torchvision.models.detection.retinanet_resnet50_fpn_v2(
        weights=None,
        weights_backbone="DEFAULT" if pretrained_backbone else None,
        num_classes=num_classes + 1,
        min_size=min_size,
        max_size=max_size,
        score_thresh=score_thresh,
    )


@detection_model("ssdlite_mobilenet_v3")
def ssdlite_mobilenet_v3(
    num_classes: int,
    pretrained_backbone: bool = False,
    score_thresh: float = 0.001,
    detections_per_img: int = 300,
) -> nn.Module:
    """torchvision's `ssdlite320_mobilenet_v3_large`: inputs are resized to 320x320."""
    return torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None,
        weights_backbone="DEFAULT" if pretrained_backbone else None,
        num_classes=num_classes + 1,
        score_thresh=score_thresh,
        detections_per_img=detections_per_img,
    )
