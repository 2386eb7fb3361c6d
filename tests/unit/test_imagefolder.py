"""ImageFolder trees: classes from folder names, a separate test tree, subsampling."""

import random

from PIL import Image

from visionflow.core.config import load_config
from visionflow.steps.prepare import prepare


def make_tree(root, classes=("cat", "dog", "eel"), per_class=10, size=20, seed=0):
    rng = random.Random(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (size, size), colour).save(root / c / f"{i:03d}.jpg", quality=90)
    return root


def test_test_root_is_the_test_split_and_root_gives_train_and_val(tmp_path):
    make_tree(tmp_path / "train", per_class=10)
    make_tree(tmp_path / "val", per_class=4, seed=1)
    cfg = load_config([f"workdir={tmp_path}", "data=imagefolder", f"data.root={tmp_path / 'train'}",
                       f"data.test_root={tmp_path / 'val'}", "data.val_fraction=0.2"])  # fmt: skip
    m = prepare(cfg).manifest
    assert m["classes"] == ["cat", "dog", "eel"]
    assert m["splits"]["test"]["count"] == 12  # all of val/, nothing carved from train/
    assert m["splits"]["val"]["count"] == 6 and m["splits"]["train"]["count"] == 24
    assert m["test_source"] == str(tmp_path / "val")


def test_a_test_class_unknown_to_training_is_reported(tmp_path):
    make_tree(tmp_path / "train", classes=("cat", "dog"), per_class=20)
    make_tree(tmp_path / "val", classes=("cat", "owl"), per_class=1)
    cfg = load_config([f"workdir={tmp_path}", "data=imagefolder", f"data.root={tmp_path / 'train'}",
                       f"data.test_root={tmp_path / 'val'}", "data.max_bad_fraction=0.1"])  # fmt: skip
    m = prepare(cfg).manifest
    assert [b["source"].rsplit("/", 2)[-2] for b in m["bad_files"]] == ["owl"]
    assert m["splits"]["test"]["count"] == 1


def test_max_per_class_subsamples_deterministically(tmp_path):
    make_tree(tmp_path / "imgs", per_class=30)
    args = [
        f"workdir={tmp_path}",
        "data=imagefolder",
        f"data.root={tmp_path / 'imgs'}",
        "data.max_per_class=10",
    ]
    a = prepare(load_config(args))
    b = prepare(load_config(args))
    assert sum(a.manifest["splits"][s]["count"] for s in a.manifest["splits"]) == 30
    assert a.dataset_id == b.dataset_id
