"""visionflow's training loader vs torchvision's ImageFolder + DataLoader, on the same JPEGs.

A subset of the CIFAR-10 JPEGs (`--images`, evenly over the classes) is prepared once into a
temporary store by the prepare step (not timed). Then epochs of training batches are read,
alternating between the loaders so that machine load hits all alike; each prints the median
images/second over `--repeats` epochs, after one warm-up epoch that starts the workers:

- torchvision: `ImageFolder` (PIL decode) over the JPEG files of the training split, with
  `RandomCrop(32, padding=2, reflect)`, `RandomHorizontalFlip`, `ToTensor` per sample.
- visionflow, the shard path (`data=imagefolder`, `transforms=basic`, `data.cache=none`): the
  same files read from prepare's shards, decoded every epoch; the same steps (its `resize` is a
  no-op at 32 px, as torchvision's would be), the crop and flip run on whole batches.
- visionflow, cached (`data.cache=memory`, the `cifar10_fast` path on a CPU): the split decoded
  once (the time is printed, not in the figure), the crop and flip per batch in the main process,
  without workers: less work per epoch than the other two.

All three use `--workers` DataLoader workers (the cached path none), `--batch-size`, and end in
float [0, 1] images (visionflow's networks normalise inside, so neither loader normalises).
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets, transforms

REPO = Path(__file__).resolve().parents[1]
CANDIDATES = [
    Path(p)
    for p in (
        os.environ.get("VISIONFLOW_CIFAR10_JPEG", ""),
        REPO.parent / "shared" / "data" / "cifar10-jpeg" / "train",
        "/work/shared/data/cifar10-jpeg/train",
    )
    if str(p)
]


def subset_tree(root: Path, out: Path, images: int) -> int:
    """`out/<class>/<file>` links to the first `images / classes` files of each class of `root`."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    per_class = images // len(classes)
    for name in classes:
        (out / name).mkdir(parents=True)
        for f in sorted((root / name).iterdir())[:per_class]:
            (out / name / f.name).symlink_to(f)
    return per_class


def epoch_seconds(batches: Iterable) -> tuple[float, int]:
    """Seconds to read one epoch of (images, labels) batches, and the number of images."""
    start, n = time.perf_counter(), 0
    for images, _ in batches:
        n += len(images)
    return time.perf_counter() - start, n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--root", type=Path, help="the CIFAR-10 JPEG tree (train/<class>/*.jpg)")
    p.add_argument("--images", type=int, default=5000, help="subset size, over all classes")
    p.add_argument("--workers", type=int, default=2, help="DataLoader workers, both loaders")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3, help="timed epochs of each loader")
    args = p.parse_args(argv)
    root = args.root or next((c for c in CANDIDATES if (c / "airplane").is_dir()), None)
    if root is None or not root.is_dir():
        print(f"skipped: no CIFAR-10 JPEGs at {args.root or CANDIDATES} (--root DIR)")
        return
    logging.getLogger("visionflow").setLevel(logging.WARNING)
    # One thread in this process, as in each DataLoader worker: the cached path's per-batch work
    # runs here, and several threads on busy cores only wait for each other.
    torch.set_num_threads(1)

    from visionflow.compose.data import build_datamodule
    from visionflow.core.config import load_config
    from visionflow.steps.prepare import assign_splits, prepare
    from visionflow.storage import open_store
    from visionflow.vision.data.datamodules import ImageFolderDataModule

    with tempfile.TemporaryDirectory(prefix="visionflow-loader-bench-") as tmp:
        tree = Path(tmp) / "images"
        per_class = subset_tree(root, tree, args.images)
        # prepare needs val and test splits: one image of each class each, the rest is train
        share = 1 / per_class
        base = [f"workdir={tmp}/work", "run_id=loader-bench", "data=imagefolder",
                f"data.root={tree}", f"data.val_fraction={share}", f"data.test_fraction={share}",
                f"data.batch_size={args.batch_size}", f"data.num_workers={args.workers}"]  # fmt: skip
        cfg = load_config(base)
        dataset_id = prepare(cfg).dataset_id
        samples = list(ImageFolderDataModule.raw_samples(cfg.data, cfg.seed)[1])
        splits = assign_splits(samples, share, share, cfg.seed)
        train_files = {
            s.source for s, split in zip(samples, splits, strict=True) if split == "train"
        }

        store = open_store(cfg.storage.root, cfg.storage.endpoint)
        shard_path = build_datamodule(cfg, store, dataset_id, "classification")
        cached_cfg = load_config([*base, "data.cache=memory"])
        cached = build_datamodule(cached_cfg, store, dataset_id, "classification")
        start = time.perf_counter()
        cached.decoded("train")
        decode_once = time.perf_counter() - start

        reference = datasets.ImageFolder(
            str(tree),
            transforms.Compose([
                transforms.RandomCrop(32, padding=2, padding_mode="reflect"),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
            ]),
            is_valid_file=lambda path: path in train_files,
        )  # fmt: skip
        if len(reference) != len(shard_path.dataset("train")):
            raise RuntimeError("the two loaders would read different files")
        torchvision_loader = DataLoader(
            reference, args.batch_size, shuffle=True, num_workers=args.workers,
            persistent_workers=args.workers > 0, pin_memory=torch.cuda.is_available(),
        )  # fmt: skip
        loaders: dict[str, Callable[[], Iterable]] = {
            "torchvision": lambda: torchvision_loader,
            "shards": shard_path.train_dataloader,
            "cached": cached.train_dataloader,
        }
        made = {name: make() for name, make in loaders.items()}  # workers start in the warm-up
        times: dict[str, list[float]] = {name: [] for name in made}
        counts: dict[str, int] = {}
        for repeat in range(args.repeats + 1):
            for name, batches in made.items():
                seconds, counts[name] = epoch_seconds(batches)
                if repeat:  # the first epoch is the warm-up
                    times[name].append(seconds)
    rate = {name: counts[name] / statistics.median(t) for name, t in times.items()}
    ref = rate["torchvision"]
    print(f"{counts['shards']:,} CIFAR-10 JPEGs (32 px, the training split of {per_class} per "
          f"class) from {root}; batch {args.batch_size}, {args.workers} workers, "
          f"{args.repeats} epochs each, alternating, median; "
          f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    rows = [
        ("torchvision", "torchvision ImageFolder + DataLoader",
         "PIL decode, crop/flip/ToTensor per sample, in workers"),
        ("shards", "visionflow shard loader (cache=none)",
         "decoded every epoch, crop/flip per batch, in workers"),
        ("cached", "visionflow cached (cache=memory)",
         f"decoded ONCE ({decode_once:.1f} s, not counted), crop/flip per batch, no workers"),
    ]  # fmt: skip
    for name, label, work in rows:
        print(f"  {label:38s}: {rate[name]:10.0f} img/s  {rate[name] / ref:5.2f}x  ({work})")
    print(f"  ratio shard loader / torchvision     : {rate['shards'] / ref:.2f} (equal work)")


if __name__ == "__main__":
    main()
