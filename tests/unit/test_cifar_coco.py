"""CIFAR pickles and COCO instances: tiny fixtures in the real on-disk formats, read and prepared."""

import io
import json
import pickle
import tarfile

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image
from pycocotools import mask as mask_utils

from visionflow.core.config import DataConfig, load_config
from visionflow.steps.prepare import prepare
from visionflow.storage import open_store
from visionflow.vision.data.cifar import Cifar10DataModule, Cifar100DataModule
from visionflow.vision.data.coco import CocoDataModule

CIFAR10_NAMES = [b"airplane", b"automobile", b"bird", b"cat", b"deer",
                 b"dog", b"frog", b"horse", b"ship", b"truck"]  # fmt: skip


def _dump(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # as torchvision's files: bytes keys, numpy data


def _batch(rng, labels, labels_key=b"labels", more=None):
    data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
    return {
        b"batch_label": b"batch",
        labels_key: list(labels),
        b"data": data,
        b"filenames": [f"{i}.png".encode() for i in range(len(labels))],
        **(more or {}),
    }


def make_cifar10(root, per_batch=6, n_test=6):
    """cifar-10-batches-py/ under root: 5 batches of per_batch images in classes 0-2."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for b in range(1, 6):
        labels = [(b * per_batch + j) % 3 for j in range(per_batch)]
        batches[f"data_batch_{b}"] = _batch(rng, labels)
        _dump(folder / f"data_batch_{b}", batches[f"data_batch_{b}"])
    batches["test_batch"] = _batch(rng, [j % 3 for j in range(n_test)])
    _dump(folder / "test_batch", batches["test_batch"])
    _dump(
        folder / "batches.meta",
        {b"label_names": CIFAR10_NAMES, b"num_cases_per_batch": per_batch, b"num_vis": 3072},
    )
    return batches


def _cfg(**data):
    """The data config as prepare hands it to raw_samples."""
    return OmegaConf.merge(OmegaConf.structured(DataConfig), data)


def _decode(raw):
    return np.asarray(Image.open(io.BytesIO(raw)))


# --- CIFAR ---------------------------------------------------------------------------------------


def test_cifar10_pixels_labels_names_and_the_fixed_test_split(tmp_path):
    batches = make_cifar10(tmp_path)
    classes, samples = Cifar10DataModule.raw_samples(_cfg(root=str(tmp_path)), seed=0)
    samples = list(samples)
    assert classes == [n.decode() for n in CIFAR10_NAMES]
    assert len(samples) == 36
    train, test = samples[:30], samples[30:]
    assert all(s.split is None for s in train) and all(s.split == "test" for s in test)
    for s in (train[0], train[7], train[29], test[5]):
        batch_name, row = s.source.rsplit("/", 1)[-1].split("#")
        batch = batches[batch_name]
        expected = batch[b"data"][int(row)].reshape(3, 32, 32).transpose(1, 2, 0)
        assert s.ext == "png" and np.array_equal(_decode(s.read()), expected)
        assert s.label == batch[b"labels"][int(row)]
    assert [s.source.rsplit("/", 1)[-1] for s in test] == [f"test_batch#{i}" for i in range(6)]


def test_cifar100_reads_fine_labels_with_root_at_the_extracted_folder(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    train = _batch(rng, [0, 1, 2, 3, 4], b"fine_labels", {b"coarse_labels": [9] * 5})
    test = _batch(rng, [4, 3], b"fine_labels", {b"coarse_labels": [9] * 2})
    _dump(folder / "train", train)
    _dump(folder / "test", test)
    names = [f"fine{i}".encode() for i in range(100)]
    _dump(folder / "meta", {b"fine_label_names": names, b"coarse_label_names": [b"c"] * 20})
    classes, samples = Cifar100DataModule.raw_samples(_cfg(root=str(folder)), seed=0)
    samples = list(samples)
    assert len(classes) == 100 and classes[3] == "fine3"
    assert [s.label for s in samples] == [0, 1, 2, 3, 4, 4, 3]
    assert [s.split for s in samples] == [None] * 5 + ["test"] * 2
    expected = test[b"data"][1].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(_decode(samples[-1].read()), expected)


def test_cifar_max_samples_is_a_balanced_subset_of_training_fixed_by_seed(tmp_path):
    make_cifar10(tmp_path)

    def picked(seed):
        _, samples = Cifar10DataModule.raw_samples(_cfg(root=str(tmp_path), max_samples=9), seed)
        return [(s.source, s.label, s.split) for s in samples]

    a, b, other = picked(0), picked(0), picked(1)
    assert a == b and a != other
    train = [x for x in a if x[2] is None]
    assert len(train) == 9 and sorted(x[1] for x in train) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert sum(x[2] == "test" for x in a) == 6  # the test split stays whole


def test_missing_cifar_names_the_path_and_data_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="data.download=true") as err:
        Cifar10DataModule.raw_samples(_cfg(root=str(tmp_path)), seed=0)
    assert str(tmp_path / "cifar-10-batches-py") in str(err.value)
    make_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        Cifar10DataModule.raw_samples(_cfg(root=str(tmp_path)), seed=0)


def test_cifar_download_asks_torchvision_for_the_archive(tmp_path, monkeypatch):
    import torchvision.datasets

    calls = []

    def fake_cifar10(root, train, download):
        calls.append((root, download))
        make_cifar10(tmp_path)

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", fake_cifar10)
    classes, samples = Cifar10DataModule.raw_samples(
        _cfg(root=str(tmp_path), download=True), seed=0
    )
    assert calls == [(str(tmp_path), True)] and len(list(samples)) == 36


# --- COCO ----------------------------------------------------------------------------------------

W, H = 40, 30
CATEGORIES = [{"id": 18, "name": "dog"}, {"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
PERSON, CAR, DOG = 0, 1, 2  # contiguous, in category-id order


def _square(x0, y0, x1, y1):
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _uncompressed_rle(mask):
    """COCO's uncompressed RLE (as crowd annotations use): column-major runs, zeros first."""
    flat = np.asarray(mask, dtype=np.uint8).flatten(order="F")
    counts, value, run = [], 0, 0
    for v in flat:
        if v != value:
            counts.append(run)
            value, run = v, 0
        run += 1
    counts.append(run)
    return {"size": [mask.shape[0], mask.shape[1]], "counts": counts}


def make_coco(root, n_extra=0, prefix="im"):
    """Images under root/images and root/instances.json; returns the paths.

    im0: a dog polygon (5..25), a car as compressed RLE inside it, a crowd region (uncompressed
    RLE); im1: only a crowd; im2: nothing; im3: only a zero-width box; im4: a fractional car box
    and a person box running past the image's edge; then n_extra images of one square each.
    """
    (root / "images").mkdir(parents=True)
    car = np.zeros((H, W), dtype=np.uint8, order="F")
    car[10:15, 10:15] = 1
    car_rle = mask_utils.encode(np.asfortranarray(car))
    car_rle["counts"] = car_rle["counts"].decode()  # as in a JSON file
    crowd = np.zeros((H, W), dtype=np.uint8)
    crowd[20:28, 30:38] = 1
    anns = [
        (0, 18, [5, 5, 20, 20], _square(5, 5, 25, 25), 0, 400),
        (0, 3, [10, 10, 5, 5], car_rle, 0, 25),
        (0, 1, [30, 20, 8, 8], _uncompressed_rle(crowd), 1, 64),
        (1, 1, [0, 0, 10, 10], _uncompressed_rle(crowd), 1, 64),
        (3, 3, [4, 4, 0, 6], _square(4, 4, 4, 10), 0, 0),
        (4, 3, [2.5, 3.5, 4.0, 2.0], _square(2.5, 3.5, 6.5, 5.5), 0, 8),
        (4, 1, [35, 25, 10, 10], _square(35, 25, 40, 30), 0, 25),
    ]
    for i in range(n_extra):
        cat = (1, 18)[i % 2]
        anns.append((5 + i, cat, [1, 1, 10, 10], _square(1, 1, 11, 11), 0, 100))
    rng = np.random.default_rng(0)
    images = []
    for i in range(5 + n_extra):
        name = f"{prefix}{i}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8)).save(
            root / "images" / name
        )
        images.append({"id": 100 + i, "file_name": name, "width": W, "height": H})
    instances = {
        "images": images[::-1],  # any order in the file
        "annotations": [
            {
                "id": k,
                "image_id": 100 + img,
                "category_id": cat,
                "bbox": bbox,
                "segmentation": seg,
                "iscrowd": iscrowd,
                "area": area,
            }
            for k, (img, cat, bbox, seg, iscrowd, area) in enumerate(anns)
        ],
        "categories": CATEGORIES,
    }
    (root / "instances.json").write_text(json.dumps(instances))
    return root / "images", root / "instances.json"


def _coco(paths, seed=0, **more):
    images, annotations = paths
    cfg = _cfg(root=str(images), annotations=str(annotations), **more)
    classes, samples = CocoDataModule.raw_samples(cfg, seed)
    return classes, list(samples)


def _names(samples):
    return [s.source.rsplit("/", 1)[-1] for s in samples]


def test_coco_boxes_labels_and_skipped_images(tmp_path, caplog):
    with caplog.at_level("INFO", logger="visionflow.prepare"):
        classes, samples = _coco(make_coco(tmp_path))
    assert classes == ["person", "car", "dog"]
    assert _names(samples) == ["im0.jpg", "im4.jpg"]
    assert "3 skipped" in caplog.text  # only a crowd, nothing, a zero-area box
    a, b = samples
    assert a.extra["json"] == {"boxes": [[5.0, 5.0, 25.0, 25.0], [10.0, 10.0, 15.0, 15.0]],
                               "labels": [DOG, CAR]}  # fmt: skip
    assert a.label == DOG and a.ext == "jpg" and a.split is None
    # xywh → xyxy, clipped to the 40×30 image; the larger (person) object gives the label
    assert b.extra["json"] == {"boxes": [[35.0, 25.0, 40.0, 30.0], [2.5, 3.5, 6.5, 5.5]],
                               "labels": [PERSON, CAR]}  # fmt: skip
    assert b.label == PERSON
    assert _decode(a.read()).shape == (H, W, 3)


def test_coco_mask_polygons_rle_and_crowd(tmp_path):
    _, samples = _coco(make_coco(tmp_path))
    mask = _decode(samples[0].extra["mask.png"]())
    assert mask.shape == (H, W) and mask.dtype == np.uint8
    assert Image.open(io.BytesIO(samples[0].extra["mask.png"]())).mode == "L"
    car = np.zeros((H, W), bool)
    car[10:15, 10:15] = True
    dog = np.zeros((H, W), bool)
    dog[5:25, 5:25] = True  # pycocotools' raster of the 5..25 square
    crowd = np.zeros((H, W), bool)
    crowd[20:28, 30:38] = True
    assert (mask[car] == CAR + 1).all()  # the small RLE object is painted over the dog
    assert (mask[dog & ~car] == DOG + 1).all()
    assert (mask[crowd] == 255).all()
    assert (mask[~(dog | crowd)] == 0).all()


def test_coco_max_samples_and_a_fixed_test_split(tmp_path):
    paths = make_coco(tmp_path / "train", n_extra=10)
    a, b = _names(_coco(paths, max_samples=5)[1]), _names(_coco(paths, max_samples=5)[1])
    other = _names(_coco(paths, seed=3, max_samples=5)[1])
    everything = _names(_coco(paths)[1])
    assert len(a) == 5 and a == b and a != other
    assert len(everything) == 12 and set(a) <= set(everything)

    test_images, test_json = make_coco(tmp_path / "val", prefix="val")
    _, samples = _coco(paths, max_samples=3,
                       test_root=str(test_images), test_annotations=str(test_json))  # fmt: skip
    assert [s.split for s in samples] == [None] * 3 + ["test"] * 2  # the test split stays whole
    assert _names(samples)[3:] == ["val0.jpg", "val4.jpg"]


def test_coco_test_root_without_annotations_is_refused(tmp_path):
    with pytest.raises(ValueError, match="data.test_annotations"):
        _coco(make_coco(tmp_path), test_root=str(tmp_path))


def test_missing_coco_annotations_name_the_path(tmp_path):
    cfg = _cfg(root=str(tmp_path), annotations=str(tmp_path / "nope.json"))
    with pytest.raises(FileNotFoundError, match="nope.json"):
        CocoDataModule.raw_samples(cfg, 0)


# --- prepare -------------------------------------------------------------------------------------


def _shard_members(cfg, manifest, tmp_path):
    store = open_store(cfg.storage.root)
    names = []
    for split in ("train", "val", "test"):
        for shard in manifest["splits"][split]["shards"]:
            key = f"datasets/{manifest['id']}/{shard['name']}"
            with tarfile.open(store.get_file(key, tmp_path / shard["name"])) as tar:
                names += tar.getnames()
    return names


def test_prepare_shards_coco_with_boxes_and_masks(tmp_path):
    images, annotations = make_coco(tmp_path / "coco", n_extra=10)
    cfg = load_config([f"workdir={tmp_path}", "data=coco", f"data.root={images}",
                       f"data.annotations={annotations}", f"storage.root={tmp_path / 'store'}",
                       "data.val_fraction=0.2", "data.test_fraction=0.2"])  # fmt: skip
    m = prepare(cfg).manifest
    assert m["classes"] == ["person", "car", "dog"]
    # by label: person 5, car 1, dog 6 → val and test take round(0.2·n) of each
    assert {s: m["splits"][s]["count"] for s in m["splits"]} == {"train": 8, "val": 2, "test": 2}
    assert m["bad_files"] == []
    names = _shard_members(cfg, m, tmp_path)
    assert sum(n.endswith(".json") for n in names) == 12
    assert sum(n.endswith(".mask.png") for n in names) == 12


def test_prepare_shards_cifar10_with_the_official_test_split(tmp_path):
    make_cifar10(tmp_path / "cifar")
    cfg = load_config([f"workdir={tmp_path}", "data=cifar10", f"data.root={tmp_path / 'cifar'}",
                       f"storage.root={tmp_path / 'store'}", "data.val_fraction=0.2"])  # fmt: skip
    m = prepare(cfg).manifest
    assert m["classes"][:3] == ["airplane", "automobile", "bird"] and len(m["classes"]) == 10
    assert {s: m["splits"][s]["count"] for s in m["splits"]} == {"train": 24, "val": 6, "test": 6}
    assert m["splits"]["test"]["per_class"] == {"airplane": 2, "automobile": 2, "bird": 2}
    names = _shard_members(cfg, m, tmp_path)
    assert sum(n.endswith(".png") for n in names) == 36
