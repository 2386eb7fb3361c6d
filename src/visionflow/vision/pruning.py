"""Structured channel pruning (torch-pruning), and the pruned shape a checkpoint records.

`prune_to_macs` removes whole channels, the least important by the L2 norm of their group (a
convolution's output channel together with the BatchNorm entries and next layer's inputs that
depend on it), in small uniform steps until the network's MACs fall to the target share. The
result is a smaller dense network: no masks, no sparse kernels, so it is faster everywhere.

A pruned network no longer matches its registered builder's shapes. `layer_shapes` records what
pruning changed as plain values (layer name -> {"out_channels": 11, ...}) that travel in the
checkpoint's spec, and `reshape_layers` applies them to a freshly built network before its state
dict is loaded, so that checkpoints keep holding tensors and plain values only (`weights_only`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

# The attributes of torch's layers that name a channel count (or group count): what torch-pruning
# changes, and all a reloaded layer needs besides its tensors' shapes.
SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features",
               "num_features", "num_channels", "num_groups", "normalized_shape")  # fmt: skip

# The pruning schedule's resolution: each step removes 1% more of every prunable layer's channels.
STEPS = 100
# Channel counts stay multiples of this: CPU convolution kernels work on blocks of 8 or 16
# channels, so 11 channels cost what 16 do. simple_cnn at half its MACs ran 1.04x faster in ONNX
# Runtime with 11/22/45 channels, 2.5x with 8/24/48.
ROUND_TO = 8


def layer_shapes(net: nn.Module) -> dict[str, dict[str, Any]]:
    """{layer name: {attribute: value}} of every layer with channel counts (SHAPE_ATTRS)."""
    return {
        name: {a: getattr(m, a) for a in SHAPE_ATTRS if hasattr(m, a)}
        for name, m in net.named_modules()
        if any(hasattr(m, a) for a in SHAPE_ATTRS)
    }


def changed_shapes(
    before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]]
) -> dict[str, dict[str, Any]]:
    """The layers of `after` whose channel counts differ from `before`'s."""
    return {name: attrs for name, attrs in after.items() if attrs != before.get(name)}


def reshape_layers(
    net: nn.Module, shapes: dict[str, dict[str, Any]], state_dict: dict[str, torch.Tensor]
) -> nn.Module:
    """Give the layers named in `shapes` (from `changed_shapes`) those channel counts, and their
    parameters and buffers the shapes `state_dict` holds, so that it loads (strictly) after.

    Only the named layers change: a mismatch anywhere else still fails in load_state_dict.
    """
    for name, attrs in shapes.items():
        layer = net.get_submodule(name)
        for attr, value in attrs.items():
            if attr not in SHAPE_ATTRS or not hasattr(layer, attr):
                raise ValueError(f"pruned layer {name!r} ({type(layer).__name__}) has no {attr!r}")
            setattr(layer, attr, tuple(value) if isinstance(value, list) else value)
        tensors = [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]
        for key, tensor in tensors:
            stored = state_dict.get(f"{name}.{key}" if name else key)
            if stored is None or stored.shape == tensor.shape:
                continue
            empty = torch.empty(stored.shape, dtype=tensor.dtype)
            if isinstance(tensor, nn.Parameter):
                empty = nn.Parameter(empty, requires_grad=tensor.requires_grad)
            setattr(layer, key, empty)
    return net


def macs_and_params(net: nn.Module, image_size: int) -> tuple[int, int]:
    """Multiply-accumulates of one image's forward pass, and the parameter count."""
    import torch_pruning as tp

    example = torch.zeros(1, 3, image_size, image_size)
    macs, params = tp.utils.count_ops_and_params(net.eval(), example)
    return int(macs), int(params)


def output_layers(net: nn.Module, num_classes: int) -> list[nn.Module]:
    """The layers that produce the class scores: every Linear or convolution with `num_classes`
    outputs. Pruning must leave them their outputs (it still prunes their inputs)."""
    return [
        m
        for m in net.modules()
        if (isinstance(m, nn.Linear) and m.out_features == num_classes)
        or (isinstance(m, nn.modules.conv._ConvNd) and m.out_channels == num_classes)
    ]


def prune_to_macs(
    net: nn.Module, image_size: int, target_macs: float, keep: list[nn.Module]
) -> dict[str, dict[str, Any]]:
    """Prune `net` in place to at most `target_macs` of its MACs; returns `changed_shapes`.

    Channels go by the L2 norm of their group, the same share from every layer (in multiples of
    ROUND_TO), 1% (STEPS) at a time until the MACs reach the target; the layers in `keep` keep
    their outputs.
    """
    import torch_pruning as tp

    if not 0 < target_macs < 1:
        raise ValueError(f"target_macs must be in (0, 1), got {target_macs}")
    net.eval()
    before = layer_shapes(net)
    budget = target_macs * macs_and_params(net, image_size)[0]
    pruner = tp.pruner.BasePruner(
        net,
        torch.zeros(1, 3, image_size, image_size),
        importance=tp.importance.GroupMagnitudeImportance(p=2),
        pruning_ratio=1.0,  # reached at step STEPS; we stop well before
        iterative_steps=STEPS,
        ignored_layers=keep,
        round_to=ROUND_TO,
    )
    while macs_and_params(net, image_size)[0] > budget:
        if pruner.current_step == STEPS:
            raise ValueError(f"cannot prune the network to {target_macs:.0%} of its MACs")
        pruner.step()
    return changed_shapes(before, layer_shapes(net))
