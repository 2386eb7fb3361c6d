import pytest
import torch

from visionflow.compose.models import build_model
from visionflow.core.config import ConfigError
from visionflow.core.contracts import check_classifier, check_datamodule, model_params


def test_model_options_are_checked_against_the_builder():
    builder, params = model_params({"name": "simple_cnn", "width": 8})
    assert params == {"width": 8} and callable(builder)
    with pytest.raises(
        ConfigError,
        match=r"model.depth is not a parameter of model 'simple_cnn'; did you mean width\?",
    ):
        model_params({"name": "simple_cnn", "depth": 3})
    with pytest.raises(ConfigError, match=r"model.width='wide': model 'simple_cnn' takes int"):
        model_params({"name": "simple_cnn", "width": "wide"})
    with pytest.raises(ConfigError, match=r"model.num_classes is not an option"):
        model_params({"name": "simple_cnn", "num_classes": 3})
    with pytest.raises(ConfigError, match=r"unknown model 'nope'; available: .*resnet18"):
        model_params({"name": "nope"})


def test_classifier_with_wrong_output_shape_fails_early():
    net = build_model({"name": "simple_cnn", "width": 4}, num_classes=3)
    check_classifier(net, num_classes=3, image_size=32)
    with pytest.raises(ValueError, match=r"must return logits of shape \(2, 5\)"):
        check_classifier(net, num_classes=5, image_size=32)


def test_classifier_that_cannot_take_the_image_size_fails_early():
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 2))
    with pytest.raises(ValueError, match=r"is data.image_size right"):
        check_classifier(net, num_classes=2, image_size=16)


class FakeDM:
    tasks = ("classification",)
    classes = ["a", "b"]
    image_size = 32

    def train_dataloader(self): ...
    def val_dataloader(self): ...
    def test_dataloader(self): ...


def test_datamodule_must_support_the_task():
    check_datamodule(FakeDM(), "classification")
    with pytest.raises(
        ConfigError, match=r"has no labels for segmentation; it supports: classification"
    ):
        check_datamodule(FakeDM(), "segmentation")
    with pytest.raises(TypeError, match="not a visionflow DataModule"):
        check_datamodule(object(), "classification")
