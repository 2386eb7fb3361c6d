"""The cifar10_fast measurement: prepare, decode once, compile, then time the training alone.

Run through `scripts/gpu_session.sh` (whose header explains the setup). Uses visionflow's pieces
directly (config, prepare, the cached datamodule, the registered model, ClassificationModule,
a Lightning Trainer) with no logger and no checkpoints, so neither MLflow nor an artifact
server is needed. Phases, each timed on its own:

  prepare   JPEG tree -> validated, split WebDataset shards (visionflow prepare)
  decode    shards -> uint8 tensors on the GPU (once)
  warmup    torch.compile and cuDNN autotuning: a few training steps and one validation pass
            on the same network, whose weights and BatchNorm statistics are then reset
  train     trainer.fit on the reset network: the number this recipe is judged by (CUDA
            synchronised at both ends; no validation inside). The fit's setup whitens the
            stem from 5,000 training images first, outside the clock
  evaluate  validation accuracy, plain and with horizontal-flip test-time augmentation
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

import numpy as np


def pack(src: Path, dst: Path) -> None:
    """An ImageFolder tree of JPEGs -> one .npz of their bytes (fits the device's transfer)."""
    names, blobs = [], []
    for path in sorted(src.glob("*/*")):
        names.append(f"{path.parent.name}/{path.name}")
        blobs.append(path.read_bytes())
    sizes = np.array([len(b) for b in blobs], dtype=np.int64)
    dst.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dst, names=np.array(names), sizes=sizes, data=np.frombuffer(b"".join(blobs), np.uint8))
    print(f"packed {len(names)} files, {sizes.sum() / 1e6:.1f} MB -> {dst}")


def unpack(src: Path, dst: Path) -> int:
    z = np.load(src)
    data, offsets = z["data"], np.concatenate([[0], np.cumsum(z["sizes"])])
    for i, name in enumerate(z["names"]):
        path = dst / str(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data[offsets[i] : offsets[i + 1]].tobytes())
    return len(z["names"])


class Stopwatch:
    """Wall time of the fit's training loop, CUDA synchronised at both ends."""

    def __init__(self):
        import lightning.pytorch as pl
        import torch

        outer = self

        class _Callback(pl.Callback):
            def on_train_start(self, trainer, module):
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                outer.start = time.perf_counter()

            def on_train_end(self, trainer, module):
                torch.cuda.synchronize() if torch.cuda.is_available() else None
                outer.seconds = time.perf_counter() - outer.start

        self.callback, self.seconds = _Callback(), float("nan")


def flip_tta_accuracy(module, batches) -> tuple[float, float]:
    """(plain, flip-TTA) accuracy of `module` over `batches`, under the trainer's precision."""
    import torch

    images, _ = next(iter(batches))
    was_training = module.training
    module.to(images.device).eval()  # Lightning hands the module back on the CPU after a run
    right = right_tta = total = 0
    dtype = torch.bfloat16 if module.device.type == "cuda" else torch.float32
    with torch.no_grad(), torch.autocast(module.device.type, dtype, enabled=dtype != torch.float32):
        for images, labels in batches:
            logits = module(images).float()
            both = logits + module(images.flip(3)).float()
            right += (logits.argmax(1) == labels).sum().item()
            right_tta += (both.argmax(1) == labels).sum().item()
            total += len(labels)
    # Lightning's fit keeps each module's mode as it finds it: a network left in eval mode would
    # train with frozen BatchNorm statistics.
    module.train(was_training)
    return right / total, right_tta / total


def trainer(cfg, callbacks, **extra):
    import lightning.pytorch as pl

    args = {k: v for k, v in dict(cfg.trainer).items() if v is not None}
    args.update(extra)
    return pl.Trainer(
        **args, callbacks=callbacks, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        default_root_dir=str(Path(cfg.workdir) / "lightning"),
    )  # fmt: skip


def run(
    root: Path, workdir: Path, overrides: list[str], variants: list[list[str]],
    experiment: str = "cifar10_fast",
) -> list[dict]:  # fmt: skip
    import lightning.pytorch as pl
    import torch

    from visionflow.compose.data import build_datamodule
    from visionflow.compose.models import build_model
    from visionflow.compose.training import build_module
    from visionflow.core.config import load_config, to_container
    from visionflow.steps.prepare import prepare
    from visionflow.storage import open_store

    base = [f"experiment={experiment}", f"data.root={root}", f"workdir={workdir}", *overrides]
    cfg = load_config(base)
    times = {}
    t = time.perf_counter()
    prepared = prepare(cfg)
    times["prepare_s"] = time.perf_counter() - t
    counts = {s: prepared.manifest["splits"][s]["count"] for s in ("train", "val", "test")}

    store = open_store(cfg.storage.root, cfg.storage.endpoint)
    dm = build_datamodule(cfg, store, prepared.dataset_id, "classification")
    t = time.perf_counter()
    dm.decoded("train")
    dm.decoded("val")
    torch.cuda.synchronize() if torch.cuda.is_available() else None
    times["decode_s"] = time.perf_counter() - t

    pl.seed_everything(cfg.seed, verbose=False)
    net = build_model(cfg.model, num_classes=len(dm.classes))
    initial = copy.deepcopy(net.state_dict())  # each fit whitens the stem again, in its setup
    module = build_module(cfg, net, {"task": "classification", "classes": dm.classes})

    t = time.perf_counter()  # compile + autotune, on the very network timed below
    warm = trainer(cfg, [], max_epochs=1)  # one whole epoch: every shape and path once
    warm.fit(module, datamodule=dm)
    warm.validate(module, datamodule=dm, verbose=False)
    flip_tta_accuracy(module, dm.val_dataloader())
    times["warmup_s"] = time.perf_counter() - t

    results = []
    for extra in [[], *variants]:
        vcfg = load_config(base + extra)
        net.load_state_dict(initial)  # fresh weights and BatchNorm statistics, same compiled code
        module.optim = to_container(vcfg.optim)
        module.label_smoothing = float(vcfg.optim.label_smoothing)
        pl.seed_everything(vcfg.seed, verbose=False)
        watch = Stopwatch()
        fit = trainer(vcfg, [watch.callback], limit_val_batches=0)
        fit.fit(module, datamodule=dm)
        acc, acc_tta = flip_tta_accuracy(module, dm.val_dataloader())
        epochs = fit.current_epoch
        result = {
            "overrides": base[3:] + extra,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "torch": torch.__version__,
            "split": counts,
            "epochs": epochs,
            "batch_size": vcfg.data.batch_size,
            "steps": fit.global_step,
            "train_s": round(watch.seconds, 3),
            "train_images_per_s": round(fit.global_step * vcfg.data.batch_size / watch.seconds),
            "val_accuracy": round(acc, 4),
            "val_accuracy_flip_tta": round(acc_tta, 4),
            "target": {  # issue 4: >= 90% validation accuracy in <= 10 s on one H100
                "train_s<=10": watch.seconds <= 10,
                "val_accuracy>=0.90": acc >= 0.90,
                "val_accuracy_flip_tta>=0.90": acc_tta >= 0.90,
            },
            **{k: round(v, 2) for k, v in times.items()},
            "timed": "train_s: trainer.fit's training loop only (CUDA synchronised), after "
            "compile/autotune warm-up on the same network (weights reset), with data already "
            "decoded on the device; prepare/decode/warmup are one-time costs, not in it, and "
            "nor is whitening the stem (the fit's setup, before training starts)",
        }
        print(json.dumps(result), flush=True)
        results.append(result)
    return results


def main(argv: list[str]) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pack", nargs=2, metavar=("TREE", "NPZ"), help="pack a JPEG tree and exit")
    p.add_argument("--unpack", nargs=2, metavar=("NPZ", "TREE"), help="unpack one and exit")
    p.add_argument("--data", help="the ImageFolder tree of JPEGs")
    p.add_argument("--workdir", default="/tmp/visionflow-cifar10-fast")
    p.add_argument("--out", default=os.environ.get("OUT", "."), help="for cifar10_fast.json")
    p.add_argument("--variant", action="append", default=[], help="extra overrides, one run each")
    p.add_argument("--experiment", default="cifar10_fast", help="cifar10_fast_smoke: CPU size")
    p.add_argument("overrides", nargs="*", help="Hydra overrides for every run")
    args = p.parse_args(argv)
    if args.pack:
        return pack(Path(args.pack[0]), Path(args.pack[1]))
    if args.unpack:
        t = time.perf_counter()
        n = unpack(Path(args.unpack[0]), Path(args.unpack[1]))
        return print(f"unpacked {n} files in {time.perf_counter() - t:.1f}s")
    variants = [v.split() for v in args.variant]
    root = Path(args.data).resolve()
    results = run(root, Path(args.workdir), args.overrides, variants, args.experiment)
    out = Path(args.out) / "cifar10_fast.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results[0] if len(results) == 1 else results, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1:])
