"""A small, fast CIFAR network for speed-run training (`model=fast_cifar`).

The shape follows the published fast-CIFAR recipes (airbench, after David Page's ResNet-9
work): a patchy 2x2 stem, three stages of two 3x3 convolutions with max pooling, BatchNorm
and GELU, global max pooling and a bias-free linear head whose logits are scaled down. No
residual connections: at this depth they cost more time than they buy accuracy.

Choices that matter for short schedules:
- BatchNorm scales are frozen at 1 (only the shifts learn): every convolution is then scale
  invariant, so weight decay sets the effective step size and high learning rates stay stable.
- `logit_scale` < 1 keeps early logits small, which works like a gentler head learning rate.
- The 2x2 stem is frozen: pairs of opposite filters (so GELU loses nothing) over an orthonormal
  basis of the 12-dim patch space, replaced by the patches' whitening basis (which trains
  noticeably faster) when training starts: the training module calls `init_from_data` with the
  first 5,000 training images. Only the stem's bias learns.
- Each convolution starts as an identity on its first input channels (dirac), plus noise.
"""

from __future__ import annotations

import torch
from torch import nn

from visionflow.core.registry import MODELS
from visionflow.vision.models.classification import Normalized

# CIFAR-10 training-set statistics: the net standardises its own [0, 1] input.
CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR_STD = (0.2470, 0.2435, 0.2616)


def _norm(channels: int, momentum: float) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(channels, momentum=momentum)
    bn.weight.requires_grad_(False)
    return bn


class ConvStage(nn.Module):
    """conv → max-pool → BN → GELU → conv → BN → GELU; halves the resolution."""

    def __init__(self, cin: int, cout: int, bn_momentum: float) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.pool = nn.MaxPool2d(2)
        self.norm1 = _norm(cout, bn_momentum)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.norm2 = _norm(cout, bn_momentum)
        self.act = nn.GELU()
        for conv in (self.conv1, self.conv2):
            with torch.no_grad():
                nn.init.dirac_(conv.weight[: conv.in_channels])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act(self.norm1(self.pool(self.conv1(x))))
        return self.act(self.norm2(self.conv2(x)))


class FastCIFARNet(nn.Module):
    """Stem, three `ConvStage`s, global max pooling, linear head (scaled logits)."""

    def __init__(
        self,
        num_classes: int,
        widths: tuple[int, int, int] = (64, 256, 256),
        stem_width: int = 24,
        logit_scale: float = 1 / 9,
        bn_momentum: float = 0.1,
    ) -> None:
        super().__init__()
        if stem_width % 2:
            raise ValueError(f"stem_width must be even (filter pairs), got {stem_width}")
        self.stem = nn.Sequential(nn.Conv2d(3, stem_width, 2, bias=True), nn.GELU())
        basis = torch.linalg.qr(torch.randn(12, 12))[0].T  # rows: orthonormal patch directions
        self._set_stem(basis.repeat(stem_width // 24 + 1, 1)[: stem_width // 2])
        chans = (stem_width, *widths)
        self.stages = nn.Sequential(
            *(ConvStage(a, b, bn_momentum) for a, b in zip(chans[:-1], chans[1:], strict=True))
        )
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.head = nn.Linear(widths[-1], num_classes, bias=False)
        self.logit_scale = logit_scale

    def _set_stem(self, filters: torch.Tensor) -> None:
        conv = self.stem[0]
        with torch.no_grad():
            conv.weight.copy_(torch.cat([filters, -filters]).view_as(conv.weight))
            conv.bias.zero_()
        conv.weight.requires_grad_(False)

    @torch.no_grad()
    def whiten_stem(self, images: torch.Tensor, eps: float = 5e-4) -> None:
        """Set the stem to whiten 2x2 patches of `images` (normalised, N x 3 x H x W): the
        eigenvectors of their covariance, strongest first, scaled by 1/sqrt(eigenvalue)."""
        patches = torch.nn.functional.unfold(images.float(), 2).transpose(1, 2).reshape(-1, 12)
        patches = patches - patches.mean(0)
        cov = patches.T @ patches / len(patches)
        values, vectors = torch.linalg.eigh(cov)  # ascending
        filters = (vectors / (values + eps).sqrt()).T.flip(0)
        self._set_stem(
            filters.repeat(self.stem[0].out_channels // 24 + 1, 1)[: len(self.stem[0].weight) // 2]
        )

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stages(self.stem(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x)) * self.logit_scale


class FastCIFAR(Normalized):
    """The registered model: standardises [0, 1] input, and whitens its stem from data."""

    def init_from_data(self, images: torch.Tensor) -> None:
        """`images` in [0, 1], N x 3 x H x W: set the stem to whiten their 2x2 patches."""
        self.net.whiten_stem((images.to(self.mean) - self.mean) / self.std)


@MODELS.register("fast_cifar")
def fast_cifar(
    num_classes: int,
    width: int = 64,
    wide_width: int = 256,
    logit_scale: float = 1 / 9,
    bn_momentum: float = 0.1,
) -> nn.Module:
    """The fast CIFAR net: stage widths (width, wide_width, wide_width)."""
    net = FastCIFARNet(
        num_classes, (width, wide_width, wide_width), logit_scale=logit_scale,
        bn_momentum=bn_momentum,
    )  # fmt: skip
    return FastCIFAR(net, mean=CIFAR_MEAN, std=CIFAR_STD)
