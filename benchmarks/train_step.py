"""visionflow's training step (Lightning + ClassificationModule) vs a plain PyTorch loop.

Both train the same network from the same initial weights on the same pre-made batches, already
on the device, with the same optimizer and schedule, in this process. Ours runs as the train step
runs it: the config's Trainer arguments (`log_every_n_steps`, ...), the module's `train.*`
options, the progress display and the config's callbacks, with a logger that sends nothing.
Checkpoints are left out (they write files, which is not the step's cost).

Runs alternate, in short rounds, the first of each pair taking turns, so that a machine loaded by
others slows both alike; the ratio is the median over rounds of ours/plain in each round (1.0 =
no overhead). On a CPU shared with other work, `--clock cpu --threads 1` times the CPU seconds
this process spends instead of wall-clock ones, which the others' load leaves out. Without `--model` it measures the table of the device at hand: on a CPU
simple_cnn and resnet18 at 32 px (resnet50 at 224 px takes minutes a step there: GPU only).
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
import warnings

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from lightning.pytorch.loggers.logger import DummyLogger
from torch.utils.data import DataLoader

from visionflow.compose import plain
from visionflow.compose.models import build_model
from visionflow.compose.training import build_callbacks, progress_callback
from visionflow.core.config import load_config, to_container
from visionflow.vision.modules import ClassificationModule

# (model, image size, batch size, steps per round, rounds) measured without --model
TABLES = {
    "cpu": [("simple_cnn", 32, 128, 4, 7), ("resnet18", 32, 32, 2, 3)],
    "cuda": [("simple_cnn", 32, 512, 100, 5), ("resnet18", 32, 512, 100, 5),
             ("resnet50", 224, 256, 30, 3)],
}  # fmt: skip


def clock() -> float:
    """Wall-clock seconds; this process's CPU seconds with `--clock cpu`."""
    return CLOCK()


CLOCK = time.perf_counter


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
    start = clock()
    for x, y in batches:
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        sched.step()
    _sync()
    return clock() - start


class Timer(pl.Callback):
    """Times the training batches only, as the plain loop is timed (no set-up or teardown)."""

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _sync()
        self.start = clock()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        _sync()
        self.seconds = clock() - self.start


def lightning_loop(net, batches, cfg, device: str, precision: str, channels_last: bool) -> float:
    options = to_container(cfg.train)
    options.pop("checkpoint_every_n_steps")  # the Trainer's (checkpoints are left out)
    options["channels_last"] = channels_last
    module = ClassificationModule(net, spec={}, optim=to_container(cfg.optim), **options)
    timer = Timer()
    args = {k: v for k, v in plain(cfg.trainer).items() if v is not None}
    args.update(accelerator=device, devices=1, strategy="auto", max_epochs=1, precision=precision,
                limit_train_batches=None, limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer = pl.Trainer(
        **args, logger=DummyLogger(), enable_checkpointing=False, enable_model_summary=False,
        callbacks=[timer, progress_callback(), *build_callbacks(cfg.callbacks)],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return timer.seconds


def measure(model: str, image_size: int, batch_size: int, steps: int, rounds: int,
            precision: str, channels_last: bool) -> dict[str, float]:  # fmt: skip
    """Images/second of each (the median over rounds) and the median of the rounds' ratios."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cfg = load_config([f"model={model}", f"trainer.precision={precision}"])
    optim_cfg = to_container(cfg.optim)
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net0 = build_model(cfg.model, num_classes=10).to(device, memory_format=fmt)
    g = torch.Generator().manual_seed(0)
    batches = [
        (torch.rand(batch_size, 3, image_size, image_size, generator=g),
         torch.randint(0, 10, (batch_size,), generator=g))
        for _ in range(steps)
    ]  # fmt: skip
    batches = [(x.to(device, memory_format=fmt), y.to(device)) for x, y in batches]
    runs = {
        "plain": lambda: plain_loop(copy.deepcopy(net0), batches, optim_cfg, precision),
        "ours": lambda: lightning_loop(
            copy.deepcopy(net0), batches, cfg, device, precision, channels_last
        ),
    }
    for run in runs.values():  # warm-up: allocator, kernels' choice, Lightning's first fit
        run()
    times: dict[str, list[float]] = {"plain": [], "ours": []}
    for r in range(rounds):
        for name in ("plain", "ours") if r % 2 == 0 else ("ours", "plain"):
            times[name].append(runs[name]())
    images = steps * batch_size
    return {
        "plain": images / statistics.median(times["plain"]),
        "ours": images / statistics.median(times["ours"]),
        "ratio": statistics.median(
            p / o for p, o in zip(times["plain"], times["ours"], strict=True)
        ),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="one model (default: the device's table)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds of ours and plain")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu: this process's CPU time (a CPU shared with other work; 1 thread)")  # fmt: skip
    args = p.parse_args(argv)
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # Lightning's advice about the loop we chose to run
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = (
        [(args.model, args.image_size, args.batch_size, args.steps, args.repeats)]
        if args.model
        else TABLES[device]
    )
    where = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu threads={torch.get_num_threads()}"
    )
    print(f"device={where} precision={args.precision} channels_last={args.channels_last} "
          f"clock={args.clock}")  # fmt: skip
    print(f"  {'model':<11}{'image':>6}{'batch':>6}{'steps':>6}{'rounds':>7}"
          f"{'plain img/s':>13}{'ours img/s':>12}{'ours/plain':>11}")  # fmt: skip
    for model, size, batch, steps, rounds in cases:
        m = measure(model, size, batch, steps, rounds, args.precision, args.channels_last)
        print(f"  {model:<11}{size:>6}{batch:>6}{steps:>6}{rounds:>7}"
              f"{m['plain']:>13.1f}{m['ours']:>12.1f}{m['ratio']:>11.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
