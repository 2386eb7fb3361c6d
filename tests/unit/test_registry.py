import pytest

import visionflow.compose.validation  # noqa: F401  (fills every registry)
from visionflow.core.registry import (
    CALLBACKS,
    DATAMODULES,
    MODELS,
    TRANSFORMS,
    Registry,
    UnknownNameError,
)


def test_register_get_and_list_with_wildcards():
    reg = Registry("widget")

    @reg.register("alpha_one")
    def a(): ...

    @reg.register()
    def beta(): ...

    assert reg.get("alpha_one") is a and reg.get("beta") is beta
    assert reg.list() == ["alpha_one", "beta"]
    assert reg.list("alpha*") == ["alpha_one"]
    assert reg.list("*ta") == ["beta"]
    assert "beta" in reg and len(reg) == 2


def test_unknown_name_lists_what_exists():
    reg = Registry("widget")
    reg.register("one")(lambda: None)
    with pytest.raises(UnknownNameError, match=r"unknown widget 'two'; available: one"):
        reg.get("two")


def test_registering_another_object_under_a_taken_name_fails():
    reg = Registry("widget")
    reg.register("x")(lambda: 1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.register("x")(lambda: 2)


def test_the_registries_are_filled_by_importing_the_package():
    assert {"simple_cnn", "resnet18"} <= set(MODELS.list())
    assert {"shapes", "imagefolder"} <= set(DATAMODULES.list())
    assert {"resize", "random_crop", "horizontal_flip"} <= set(TRANSFORMS.list())
    assert "plain_progress" in CALLBACKS
