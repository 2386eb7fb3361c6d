"""transforms=none: images reach the network untouched."""

from __future__ import annotations

import numpy as np
from omegaconf import OmegaConf
from PIL import Image

from visionflow.core.config import load_config
from visionflow.vision.transforms import build_transform


def test_transforms_none_leaves_the_image_size_alone(tmp_path):
    cfg = load_config(["transforms=none", f"workdir={tmp_path}", "data.image_size=32"])
    image = Image.fromarray(np.zeros((37, 50, 3), np.uint8))
    for split in ("train", "eval"):
        steps = OmegaConf.to_container(cfg.transforms[split])
        assert build_transform(steps, 32, f"transforms.{split}")(image).shape == (3, 37, 50)
