"""The shard loader's fast paths give the pixels of the slow ones: decoding JPEG files with
libjpeg-turbo directly, and moving whole batches for `[resize, random_crop, horizontal_flip]`."""

import io
import itertools

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image
from torchvision.transforms.v2 import functional as F

from visionflow.compose.data import batch_augment
from visionflow.core.config import load_config
from visionflow.vision.data.cached import BatchAugment
from visionflow.vision.data.resumable import EpochOrder, ShardBatches
from visionflow.vision.data.shards import ShardDataset, decode_pixels
from visionflow.vision.images import decode_image
from visionflow.vision.transforms import build_transform

BASIC = [{"name": "resize"}, {"name": "random_crop", "padding": 2}, {"name": "horizontal_flip"}]


def _encoded(image: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **options)
    return buf.getvalue()


def _picture(h=12, w=20, seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("case", ["rgb", "rotated", "grey", "cmyk", "png"])
def test_decode_pixels_gives_decode_images_pixels(case):
    picture = _picture()
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to view"
    data = {
        "rgb": _encoded(picture, "JPEG"),
        "rotated": _encoded(picture, "JPEG", exif=exif),
        "grey": _encoded(picture.convert("L"), "JPEG"),
        "cmyk": _encoded(picture.convert("CMYK"), "JPEG"),
        "png": _encoded(picture.convert("P"), "PNG"),
    }[case]
    pixels = decode_pixels(data)
    assert pixels.dtype == torch.uint8 and pixels.shape[0] == 3
    np.testing.assert_array_equal(pixels.permute(1, 2, 0).numpy(), np.asarray(decode_image(data)))


def test_batch_moves_are_torchvisions_flip_pad_and_crop():
    images = torch.randint(0, 256, (50, 3, 5, 7), dtype=torch.uint8)
    moves = torch.tensor(list(itertools.product((0, 1), range(5), range(5))))  # every move
    out = BatchAugment(translate=2, flip_p=0.5).apply(images, moves)
    for image, (flip, dy, dx), got in zip(images, moves.tolist(), out, strict=True):
        want = F.horizontal_flip(image) if flip else image
        want = F.pad(want, [2], padding_mode="reflect")
        torch.testing.assert_close(got, F.crop(want, dy, dx, 5, 7), rtol=0, atol=0)


def _shards(tmp_path, n=8, size=10) -> list:
    path = tmp_path / "train-00000.tar"
    with wds.TarWriter(str(path)) as tar:
        for i in range(n):
            picture = _encoded(_picture(size, size, seed=i), "JPEG")
            tar.write({"__key__": f"{i:08d}", "jpg": picture, "cls": str(i % 3).encode()})
    return [path]


def _epoch(dataset, collate_fn) -> list:
    order = EpochOrder(len(dataset), shuffle=True, seed=3)
    return list(ShardBatches(dataset, order, batch_size=3, collate_fn=collate_fn))


def test_batched_shard_path_gives_what_the_steps_give_per_sample(tmp_path):
    shards = _shards(tmp_path)
    steps = [{"name": "resize"}, {"name": "random_crop", "padding": 0}, {"name": "horizontal_flip", "p": 0.0}]  # fmt: skip
    per_sample = ShardDataset(shards, build_transform(steps, 8, "t"))
    augment = BatchAugment(resize=8)  # no move: the batches must be the per-sample ones exactly
    batched = ShardDataset(shards, augment.per_sample)
    for (x, y), (want_x, want_y) in zip(
        _epoch(batched, augment.collate), _epoch(per_sample, None), strict=True
    ):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8)
        torch.testing.assert_close(x, want_x, rtol=0, atol=0)
        assert torch.equal(y, want_y)

    # With moves, each image is one of the per-sample steps' outcomes, and an epoch is a
    # function of the seed and the epoch alone.
    augment = BatchAugment(translate=2, flip_p=0.5, resize=8)
    batched = ShardDataset(shards, augment.per_sample)
    plain = ShardDataset(shards, build_transform([{"name": "resize"}], 8, "t"))
    first, again = _epoch(batched, augment.collate), _epoch(batched, augment.collate)
    for (x, _), (x2, _) in zip(first, again, strict=True):
        torch.testing.assert_close(x, x2, rtol=0, atol=0)
    images = torch.cat([x for x, _ in first])
    order = EpochOrder(len(plain), shuffle=True, seed=3).indices(0).tolist()
    moved = 0
    for image, index in zip(images, order, strict=True):
        source = plain[index][0]
        outcomes = []
        for flipped in (source, F.horizontal_flip(source)):
            padded = torch.nn.functional.pad(flipped[None], (2, 2, 2, 2), mode="reflect")[0]
            outcomes += [padded[:, dy : dy + 8, dx : dx + 8] for dy in range(5) for dx in range(5)]
        assert any(torch.equal(image, o) for o in outcomes)
        moved += not torch.equal(image, source)
    assert moved > 4  # 1 in 50 moves is none


def test_the_shard_path_batches_only_what_has_a_batched_version(tmp_path):
    def augment(*overrides):
        return batch_augment(load_config([f"workdir={tmp_path}", *overrides]))

    assert augment() == BatchAugment(translate=2, flip_p=0.5, resize=32)  # transforms=basic
    assert augment("transforms=cifar") is None  # AutoAugment: per sample
    assert augment("transforms.train=[{name: random_crop}]") is None  # no resize first: a crop
