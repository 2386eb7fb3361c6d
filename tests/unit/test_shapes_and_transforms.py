import numpy as np
import pytest
import torch

from visionflow.core.config import ConfigError
from visionflow.vision.data.shapes import SHAPE_CLASSES, make_shape
from visionflow.vision.transforms import build_transform


def test_shapes_are_deterministic_by_seed_and_index():
    a, b, c = make_shape(7, 3), make_shape(7, 3), make_shape(8, 3)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert not np.array_equal(np.asarray(a.image), np.asarray(c.image))


def test_shape_labels_boxes_and_masks_agree():
    for i in range(20):
        s = make_shape(0, i, size=40)
        assert s.label == i % len(SHAPE_CLASSES)
        mask = np.asarray(s.mask) > 0
        ys, xs = np.nonzero(mask)
        assert s.box == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
        assert mask.mean() > 0.02  # the shape is really there


def test_transforms_from_config_end_in_float_tensors():
    from visionflow.vision.data.shapes import make_shape

    tf = build_transform(
        [{"name": "resize"}, {"name": "random_crop", "padding": 2}], 24, "transforms.train"
    )
    out = tf(make_shape(0, 0, size=32).image)
    assert out.dtype == torch.float32 and out.shape == (3, 24, 24)
    assert out.min() >= 0.0 and out.max() <= 1.0


def test_unknown_transform_and_bad_parameter_fail_at_config_time():
    with pytest.raises(
        ConfigError, match=r"transforms.train\[0\]: unknown transform 'blur'; available: "
    ):
        build_transform([{"name": "blur"}], 32, "transforms.train")
    with pytest.raises(
        ConfigError,
        match=r"transforms.eval\[1\] \(random_crop\): .*'pad'.*accepted parameters: \['padding', 'padding_mode'\]",
    ):
        build_transform(
            [{"name": "resize"}, {"name": "random_crop", "pad": 1}], 32, "transforms.eval"
        )
