"""The transforms registry: every transform keeps boxes and masks on the image, for every task
it claims, and really fails (in torchvision) for the tasks it does not claim.

The sample is a coloured rectangle (the object) on a darker background, with its box and a
mask. After a transform, the object is found again *in the image pixels*: each pixel goes to
the nearer of two colours, the mean colour under the mask's object and under its background.
The mask only supplies those two colours, which colour transforms may have changed; if the mask
had drifted from the image, the colours mix and the pixels found disagree with the mask
(checked on purpose in `test_the_check_sees_a_shifted_mask`). The box is then compared with the
bounding box of the pixels found, and the mask with the pixels themselves.
"""

from __future__ import annotations

import inspect
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torchvision import tv_tensors
from torchvision.transforms import v2

from visionflow.core.config import ConfigError, config_dir, load_config
from visionflow.core.registry import TRANSFORMS
from visionflow.vision.transforms import MASK_FILL, TASKS, build_transform, resolve_step
from visionflow.vision.transforms.batch import build_batch_transform, check_batch_transforms

H, W, SIZE = 80, 96, 64  # input canvas, image_size (every resize changes the geometry)
RECT = (24, 18, 66, 50)  # x0, y0, x1, y1 (off-centre: every flip moves it)
OBJECT, BACKGROUND = (230, 180, 90), (20, 60, 40)
CLASS_VALUE = 3  # mask value of the object (class 2)
IGNORE_PATCH = (slice(4, 10), slice(4, 10))  # 255 in the input mask, background in the image
SEEDS = range(8)
BOX_TOL = 2.0  # px, between the box and the object found in the image

# Parameters that make each transform act on every call, and strongly.
STRONG = {
    "random_rotation": {"degrees": 45.0},
    "random_affine": {"degrees": 30.0, "translate": 0.15, "shear": 15.0},
    "random_perspective": {"distortion": 0.5},
    "random_zoom_out": {"max_scale": 2.5},
    "elastic": {"alpha": 100.0},
    "color_jitter": {"brightness": 0.5, "contrast": 0.5, "saturation": 0.5, "hue": 0.2},
    "grayscale": {"p": 1.0},
}


def params_for(name: str) -> dict:
    always = {"p": 1.0} if "p" in inspect.signature(TRANSFORMS.get(name)).parameters else {}
    return {**always, **STRONG.get(name, {})}


def sample(task: str):
    image = np.empty((H, W, 3), np.uint8)
    image[:] = BACKGROUND
    x0, y0, x1, y1 = RECT
    image[y0:y1, x0:x1] = OBJECT
    mask = torch.zeros(H, W, dtype=torch.int64)
    mask[y0:y1, x0:x1] = CLASS_VALUE
    mask[IGNORE_PATCH] = MASK_FILL
    image = PIL.Image.fromarray(image)
    if task == "classification":
        return (image,)
    if task == "segmentation":
        return image, tv_tensors.Mask(mask)
    boxes = tv_tensors.BoundingBoxes([list(RECT)], format="XYXY", canvas_size=(H, W))
    # The mask rides along only to name the object's colour after a colour transform.
    return image, {"boxes": boxes, "labels": torch.tensor([2]), "masks": tv_tensors.Mask(mask)}


def mask_of(target) -> torch.Tensor:
    return target if isinstance(target, torch.Tensor) else target["masks"]


def judgeable(target) -> bool:
    """Enough of the object and of the background is left to compare."""
    mask = mask_of(target)
    return (mask == CLASS_VALUE).sum() >= 50 and (mask == 0).sum() >= 50


def grow(region: torch.Tensor) -> torch.Tensor:
    """The region and the pixels next to it (8-neighbourhood)."""
    return F.max_pool2d(region[None, None].float(), 3, 1, 1)[0, 0] > 0


def misalignment(image: torch.Tensor, target) -> str | None:
    """Why the target disagrees with the image; None if it agrees or too little is left."""
    if not judgeable(target):
        return None
    mask = mask_of(target)
    boxes = None if isinstance(target, torch.Tensor) else target["boxes"]
    x = image.float()
    obj, bg = mask == CLASS_VALUE, mask == 0
    c_obj, c_bg = x[:, obj].mean(1), x[:, bg].mean(1)
    assert (c_obj - c_bg).norm() > 0.02, "the colours collapsed: the check would be void"
    d_obj = (x - c_obj[:, None, None]).norm(dim=0)
    d_bg = (x - c_bg[:, None, None]).norm(dim=0)
    found = (d_obj < d_bg) & (mask != MASK_FILL)
    # Interpolation blurs the image's edges, never the mask's: allow 1 px there, nothing more.
    near_obj, near_bg = grow(obj), grow(~obj)
    off = (found & ~near_obj) | (~found & ~near_bg & (mask != MASK_FILL))
    if off.any():
        return f"{off.sum().item()} pixels off the mask by more than 1 px"
    if boxes is None:
        return None
    if len(boxes) != 1:
        return f"{len(boxes)} boxes for one visible object"
    ys, xs = torch.nonzero(found, as_tuple=True)
    seen = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], dtype=torch.float32)
    err = (boxes[0].float() - seen).abs().max().item()
    return f"box {boxes[0].tolist()} vs object {seen.tolist()}" if err > BOX_TOL else None


def run(tf, task: str, seed: int):
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RandomErasing warns that it passes targets through
        out = tf(*sample(task))
    return out if task != "classification" else (out, None)


def check_output(image: torch.Tensor, target) -> None:
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert image.min() >= 0.0 and image.max() <= 1.0
    if target is not None:
        mask = mask_of(target)
        assert isinstance(mask, tv_tensors.Mask) and mask.dtype == torch.int64
        assert set(mask.unique().tolist()) <= {0, CLASS_VALUE, MASK_FILL}


CLAIMED = [(n, t) for n in TRANSFORMS.list() for t in TRANSFORMS.get(n).tasks]
UNCLAIMED = [(n, t) for n in TRANSFORMS.list() for t in TASKS if t not in TRANSFORMS.get(n).tasks]


@pytest.mark.parametrize("name,task", CLAIMED, ids=[f"{n}-{t}" for n, t in CLAIMED])
def test_transform_keeps_targets_on_the_image(name, task):
    tf = build_transform([{"name": name, **params_for(name)}], SIZE, "transforms.train", task)
    plain = build_transform([], SIZE, "transforms.train", task)
    judged, changed = 0, False
    for seed in SEEDS:
        image, target = run(tf, task, seed)
        check_output(image, target)
        changed |= image.shape != (3, H, W) or not torch.equal(image, run(plain, task, seed)[0])
        if task != "classification":
            assert (why := misalignment(image, target)) is None, f"seed {seed}: {why}"
            judged += judgeable(target)
    assert changed, f"{name} never changed the image: the test says nothing"
    if task != "classification":
        assert judged >= len(SEEDS) // 2, "the object was mostly cropped away: too few checks"


@pytest.mark.parametrize("name,task", UNCLAIMED, ids=[f"{n}-{t}" for n, t in UNCLAIMED])
def test_unclaimed_tasks_are_refused_and_really_broken_in_torchvision(name, task):
    with pytest.raises(ConfigError, match=rf"\[0\] \({name}\): .*{task}.*supported tasks: "):
        build_transform([{"name": name}], SIZE, "transforms.train", task)
    # The same transform forced into a pipeline: torchvision rejects the sample, or moves the
    # targets off the image. If this starts passing, torchvision learnt it: claim the task.
    _, factory, params = resolve_step(
        {"name": name, **params_for(name)},
        "t",
        TRANSFORMS,
        {"image_size": SIZE, "task": task},
    )
    op, to_float = factory(**params), v2.ToDtype(torch.float32, scale=True)
    ops = [v2.ToImage(), *([to_float, op] if factory.on_float else [op, to_float])]
    if task == "detection":
        ops.append(v2.SanitizeBoundingBoxes())
    try:
        outputs = [run(v2.Compose(ops), task, seed) for seed in SEEDS]
    except TypeError as err:  # torchvision refuses the sample
        assert "not supported by" in str(err) or "requires input sample" in str(err)
        return
    assert task != "classification", f"{name} ran on a classification sample"
    assert any(misalignment(*out) for out in outputs), f"torchvision handles {name} for {task} now"


def test_the_check_sees_a_shifted_mask():
    image, mask = build_transform([], SIZE, "t", "segmentation")(*sample("segmentation"))
    assert misalignment(image, mask) is None
    assert misalignment(image, tv_tensors.Mask(mask.roll(10, dims=1))) is not None
    image, target = build_transform([], SIZE, "t", "detection")(*sample("detection"))
    assert misalignment(image, target) is None
    target["boxes"] = target["boxes"] + 4
    assert "box" in misalignment(image, target)


def test_ignore_value_survives_geometry_and_fills_invented_pixels():
    resize = build_transform([{"name": "resize"}], SIZE, "t", "segmentation")
    _, mask = run(resize, "segmentation", 0)
    assert mask[:10, :10].eq(MASK_FILL).sum() >= 16  # the 6×6 ignore patch, resized to ~4×5
    rotate = build_transform(
        [{"name": "random_rotation", "degrees": 30.0}], SIZE, "t", "segmentation"
    )
    rotated_in = []
    for seed in SEEDS:  # a rotation leaves the corners without a source pixel
        image, mask = sample("segmentation")
        mask[IGNORE_PATCH] = 0
        torch.manual_seed(seed)
        image, mask = rotate(image, mask)
        invented = mask == MASK_FILL
        rotated_in.append(invented.sum().item())
        assert (image[:, invented & ~grow(~invented)] == 0).all()  # the image's fill there
    assert sum(n > 20 for n in rotated_in) >= len(SEEDS) // 2, rotated_in


def test_detection_drops_boxes_that_leave_the_image():
    tf = build_transform([{"name": "horizontal_flip", "p": 1.0}], SIZE, "t", "detection")
    image, target = sample("detection")
    target["boxes"] = tv_tensors.BoundingBoxes(
        [list(RECT), [95, 10, 95, 20]], format="XYXY", canvas_size=(H, W)
    )
    target["labels"] = torch.tensor([2, 4])
    _, out = tf(image, target)
    assert out["labels"].tolist() == [2] and len(out["boxes"]) == 1


def test_random_erasing_runs_on_the_float_image_wherever_listed():
    tf = build_transform(
        [{"name": "random_erasing", "p": 1.0, "value": "random"}, {"name": "resize"}], SIZE, "t"
    )
    assert [type(t).__name__ for t in tf.transforms][-2:] == ["ToDtype", "RandomErasing"]
    torch.manual_seed(0)
    out = tf(sample("classification")[0])
    assert out.dtype == torch.float32 and out.shape == (3, SIZE, SIZE)


def test_config_errors_name_the_step_the_transform_and_the_task():
    with pytest.raises(ConfigError, match=r"t\.train\[1\]: unknown transform 'blur'; available: "):
        build_transform([{"name": "resize"}, {"name": "blur"}], SIZE, "t.train")
    with pytest.raises(
        ConfigError,
        match=r"t\.train\[0\] \(rand_augment\): not available for task 'detection'; "
        r"supported tasks: \['classification'\]",
    ):
        build_transform([{"name": "rand_augment"}], SIZE, "t.train", "detection")
    bad = [
        ({"name": "horizontal_flip", "p": -0.1}, r" \(horizontal_flip\): .*\[0.0, 1.0\]"),
        ({"name": "horizontal_flip", "p": "often"}, r" \(horizontal_flip\): p must be float"),
        (
            {"name": "auto_augment", "policy": "coco"},
            r" \(auto_augment\): policy must be one of \['imagenet'",
        ),
        ({"name": "color_jitter", "brightness": -1.0}, r" \(color_jitter\): .*brightness"),
        ({"name": "random_rotation", "expand": 1}, r" \(random_rotation\): expand must be bool"),
        (
            {"name": "resize", "size": 3},
            r" \(resize\): .*'size'.*accepted parameters: \['factor', 'keep_",
        ),
        ({"name": "resize", "task": "detection"}, r" \(resize\): \['task'\] come from the run"),
        ({"p": 0.5}, r": each transform needs a `name`"),
    ]
    for step, message in bad:
        with pytest.raises(ConfigError, match=r"t\.train\[0\]" + message):
            build_transform([step], SIZE, "t.train")
    with pytest.raises(ConfigError, match=r"padding_mode 'reflect' cannot carry boxes"):
        build_transform(
            [{"name": "random_crop", "padding_mode": "reflect"}], SIZE, "t", "detection"
        )
    with pytest.raises(ConfigError, match=r"unknown task 'depth'"):
        build_transform([], SIZE, "t", "depth")


@pytest.mark.parametrize("steps", [[{"name": "mixup"}], [{"name": "mixup"}, {"name": "cutmix"}]])
def test_batch_transforms_give_soft_labels(steps):
    tf = build_batch_transform(steps, 5, "transforms.batch")
    images, labels = torch.rand(16, 3, 8, 8), torch.randint(0, 5, (16,))
    kinds = set()
    for seed in range(6):
        torch.manual_seed(seed)
        out, soft = tf(images, labels)
        assert out.shape == images.shape and out.dtype == torch.float32
        assert soft.shape == (16, 5) and soft.dtype == torch.float32
        torch.testing.assert_close(soft.sum(1), torch.ones(16))
        # Each row mixes its own label with the previous image's, the one it was mixed with.
        own = torch.nn.functional.one_hot(labels, 5) + torch.nn.functional.one_hot(
            labels.roll(1), 5
        )
        assert (soft[own == 0] == 0).all()
        # CutMix leaves pixels of one image or the other; MixUp blends them.
        kinds.add("cut" if torch.isin(out, torch.cat([images, images.roll(1, 0)])).all() else "mix")
    assert kinds == ({"mix"} if len(steps) == 1 else {"mix", "cut"})


def test_batch_transform_config_errors():
    assert build_batch_transform([], 5, "transforms.batch") is None
    for step, message in [
        ({"name": "mixdown"}, r": unknown batch transform 'mixdown'; available: cutmix, mixup"),
        ({"name": "mixup", "alpha": -1.0}, r" \(mixup\): alpha must be > 0"),
        ({"name": "cutmix", "alpha": "big"}, r" \(cutmix\): alpha must be float"),
        (
            {"name": "cutmix", "beta": 1.0},
            r" \(cutmix\): .*'beta'.*accepted parameters: \['alpha'\]",
        ),
        ({"name": "mixup", "num_classes": 3}, r" \(mixup\): \['num_classes'\] come from the run"),
    ]:
        with pytest.raises(ConfigError, match=r"transforms\.batch\[0\]" + message):
            build_batch_transform([step], 5, "transforms.batch")
    check_batch_transforms([{"name": "mixup"}], "classification", "transforms.batch")
    check_batch_transforms([], "detection", "transforms.batch")
    with pytest.raises(ConfigError, match=r"transforms\.batch: .*classification only.*'detection'"):
        check_batch_transforms([{"name": "mixup"}], "detection", "transforms.batch")


PRESETS = sorted(p.stem for p in (config_dir() / "transforms").glob("*.yaml"))
PRESET_TASK = {"detection": "detection", "segmentation": "segmentation"}


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_builds_for_its_task(preset):
    task = PRESET_TASK.get(preset, "classification")
    cfg = OmegaConf.to_container(load_config([f"transforms={preset}"]).transforms)
    for part in ("train", "eval"):
        tf = build_transform(cfg[part], SIZE, f"transforms.{part}", task)
        for seed in range(4):
            image, target = run(tf, task, seed)
            check_output(image, target)
            if task != "classification":
                assert (why := misalignment(image, target)) is None, f"{part} {seed}: {why}"
    check_batch_transforms(cfg["batch"], task, "transforms.batch")
    build_batch_transform(cfg["batch"], 5, "transforms.batch")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_batch_transforms_run_on_a_gpu_batch():
    tf = build_batch_transform([{"name": "mixup"}, {"name": "cutmix"}], 5, "transforms.batch")
    images, labels = torch.rand(8, 3, 16, 16, device="cuda"), torch.arange(8, device="cuda") % 5
    for _ in range(4):
        out, soft = tf(images, labels)
        assert out.device == soft.device == images.device and soft.shape == (8, 5)
