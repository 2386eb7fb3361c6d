"""Gradient checkpointing (`train.gradient_checkpointing=true`): keep only block boundaries'
activations in the forward pass and recompute the rest in the backward pass.

timm models do it themselves (`set_grad_checkpointing`). For other networks the blocks are the
children of the network's largest `nn.Sequential` of repeated blocks (ResNet's layers, the
`features` of MobileNet, EfficientNet and ConvNeXt, ViT's encoder layers). Each block's
`forward` is wrapped in place, so parameter names (and checkpoints) do not change.
"""

from __future__ import annotations

import functools

import torch.utils.checkpoint
from torch import nn

from visionflow.core.config import ConfigError


def _checkpointed(forward):
    @functools.wraps(forward)
    def run(*args, **kwargs):
        if not torch.is_grad_enabled():  # evaluation: nothing to save memory for
            return forward(*args, **kwargs)
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False, **kwargs)

    return run


def block_sequences(net: nn.Module) -> list[nn.Sequential]:
    """The Sequentials whose children are the network's blocks: those of the most children
    (ties: every one of them, e.g. ResNet's layer1..layer4 count together)."""
    seqs = [m for m in net.modules() if isinstance(m, nn.Sequential) and len(m) > 1]
    resnet_layers = [getattr(m, f"layer{i}", None) for m in net.modules() for i in range(1, 5)]
    resnet_layers = [m for m in resnet_layers if isinstance(m, nn.Sequential)]
    if resnet_layers:
        return resnet_layers
    if not seqs:
        return []
    longest = max(len(m) for m in seqs)
    return [m for m in seqs if len(m) == longest][:1]


def enable_gradient_checkpointing(net: nn.Module) -> int:
    """Checkpoint the network's blocks; returns how many. ConfigError if it has none."""
    inner = getattr(net, "net", net)  # Normalized / SegmentationNet wrap the real network
    if hasattr(inner, "set_grad_checkpointing"):  # timm
        inner.set_grad_checkpointing(True)
        return sum(1 for _ in inner.modules())
    blocks = [b for seq in block_sequences(inner) for b in seq]
    if len(blocks) < 2:
        raise ConfigError(
            f"train.gradient_checkpointing: {type(inner).__name__} has no sequence of blocks "
            "to checkpoint; switch it off for this model"
        )
    for block in blocks:
        block.forward = _checkpointed(block.forward)
    return len(blocks)
