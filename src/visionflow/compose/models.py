"""The network a config names, or the trained one a checkpoint holds, and the run's task."""

from __future__ import annotations

import inspect
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn

import visionflow.vision.models  # noqa: F401  (fills the MODELS registry)
from visionflow.compose import plain
from visionflow.core.contracts import model_params, model_task
from visionflow.storage import split_uri
from visionflow.vision.pruning import reshape_layers


def build_model(model_cfg: Any, num_classes: int, image_size: int | None = None) -> nn.Module:
    """The registered network; a builder that takes `image_size` (e.g. ViT) gets the data's."""
    builder, params = model_params(plain(model_cfg))
    if image_size is not None and "image_size" in inspect.signature(builder).parameters:
        params.setdefault("image_size", image_size)
    return builder(num_classes=num_classes, **params)


def task_of(cfg: DictConfig) -> str:
    """The run's task, from its model (classification, detection or segmentation)."""
    return model_task(plain(cfg.model))


def load_network(
    checkpoint_uri: str, endpoint: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The network (in eval mode, on CPU) and its spec, from a Lightning checkpoint's URI.

    A pruned network (the optimize step's) is rebuilt from its registered builder and then given
    the channel counts its spec records under "pruned" (vision/pruning.py) before its weights
    load: the checkpoint holds tensors and plain values only, never a pickled module.
    """
    store, key = split_uri(checkpoint_uri, endpoint)
    with tempfile.TemporaryDirectory() as tmp:
        local = store.get_file(key, Path(tmp) / "model.ckpt")
        ckpt = torch.load(local, map_location="cpu", weights_only=True)
    spec = ckpt.get("visionflow")
    if spec is None:
        raise ValueError(
            f"{checkpoint_uri} is not a visionflow checkpoint (no 'visionflow' spec inside)"
        )
    net = build_model(
        spec["model"], num_classes=len(spec["classes"]), image_size=spec["image_size"]
    )
    weights = {
        k.removeprefix("net."): v for k, v in ckpt["state_dict"].items() if k.startswith("net.")
    }
    if pruned := spec.get("pruned"):
        reshape_layers(net, pruned, weights)
    net.load_state_dict(weights)
    return net.eval(), spec
