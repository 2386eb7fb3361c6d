"""visionflow's training step (Lightning + ClassificationModule) vs a plain PyTorch loop.

Both train the same network from the same initial weights on the same pre-made batches, with
the same optimizer and schedule, in this process; runs alternate so that machine load hits both
alike. Prints images/second of each and the ratio ours / plain (1.0 = no overhead).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch.utils.data import DataLoader

from visionflow.compose.models import build_model
from visionflow.core.config import load_config, to_container
from visionflow.vision.modules import ClassificationModule


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def plain_loop(net, batches, optim_cfg, precision: str) -> float:
    opt = instantiate(optim_cfg["optimizer"], params=net.parameters())
    sched = instantiate(optim_cfg["scheduler"])(opt, total_steps=max(len(batches), 8))  # as ours
    device = batches[0][0].device.type
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed")
    net.train()
    _sync()
    start = time.perf_counter()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
    _sync()
    return time.perf_counter() - start


class Timer(pl.Callback):
    """Times the training batches only, as the plain loop is timed (no set-up or teardown)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _sync()
        self.start = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _sync()
        self.seconds = time.perf_counter() - self.start


def lightning_loop(net, batches, optim_cfg, device: str, precision: str) -> float:
    module = ClassificationModule(net, spec={}, optim=optim_cfg)
    timer = Timer()
    trainer = pl.Trainer(
        accelerator=device, devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        precision=precision,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        limit_val_batches=0, callbacks=[timer],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return timer.seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="simple_cnn")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--channels-last", action="store_true")
    args = p.parse_args(argv)
    import logging
    import warnings

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # Lightning's advice about the loop we chose to run
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config([f"model={args.model}"])
    optim_cfg = to_container(cfg.optim)
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net0 = build_model(cfg.model, num_classes=10).to(device, memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(args.batch_size, 3, args.image_size, args.image_size, generator=g),
         torch.randint(0, 10, (args.batch_size,), generator=g))
        for _ in range(args.steps)
    ]  # fmt: skip
    # Both loops get the same batches, already on the device (synthetic data: the step is measured,
    # not the loader).
    batches = [(x.to(device, memory_format=fmt), y.to(device)) for x, y in batches]
    prec = args.precision
    plain_loop(copy.deepcopy(net0), batches[:3], optim_cfg, prec)  # warm-up
    lightning_loop(copy.deepcopy(net0), batches[:3], optim_cfg, device, prec)
    times = {"plain": [], "ours": []}
    for _ in range(args.repeats):
        times["plain"].append(plain_loop(copy.deepcopy(net0), batches, optim_cfg, prec))
        times["ours"].append(lightning_loop(copy.deepcopy(net0), batches, optim_cfg, device, prec))
    images = args.steps * args.batch_size
    rate = {k: images / statistics.median(v) for k, v in times.items()}
    where = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu threads={torch.get_num_threads()}"
    )
    print(f"model={args.model} image={args.image_size}px batch={args.batch_size} steps={args.steps} "
          f"repeats={args.repeats} precision={prec} channels_last={args.channels_last} device={where}")  # fmt: skip
    print(f"  plain PyTorch loop : {rate['plain']:10.1f} img/s")
    print(f"  visionflow (ours)  : {rate['ours']:10.1f} img/s")
    print(f"  ratio ours/plain   : {rate['ours'] / rate['plain']:.3f}")


if __name__ == "__main__":
    main()
