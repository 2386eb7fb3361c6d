"""Rebuild a trained network from a checkpoint in the artifact store."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from visionflow.core.factories import build_model
from visionflow.storage import split_uri


def load_network(
    checkpoint_uri: str, endpoint: str | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """The network (in eval mode, on CPU) and its spec, from a Lightning checkpoint's URI."""
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
    net.load_state_dict(weights)
    return net.eval(), spec
