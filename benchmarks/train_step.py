"""visionflow's training step (Lightning + ClassificationModule) vs a plain PyTorch loop.

Both train the same network from the same initial weights on the same pre-made batches, already
on the device, with the same optimizer and schedule, in this process. Ours runs as the train step
runs it: the config's Trainer arguments (`log_every_n_steps`, ...), the module's `train.*`
options, the progress display and the config's callbacks, with a logger that sends nothing.
Checkpoints are left out (they write files, which is not the step's cost).

The first step is timed apart: ours counts the model's FLOPs there for its telemetry, once per
fit (and again if the image size changes). The ratio compares the steady state, every later
step, where a step's overhead shows (1.0 = no overhead); it is the median over rounds.

How the two take turns depends on the device (`--turns` chooses):
- CPU, step by step: after each of ours, a callback runs one plain step, each timed on its own.
  Steps next to each other see the same machine: a shared CPU's speed drifts by a fifth over
  seconds, more than the overhead measured. A CPU runs each operation to its end, so nothing
  that the plain loop would overlap is lost.
- GPU, run by run, the first of each pair taking turns: the device runs queued work while the
  host prepares the next step, which waiting after each step would undo; it is waited for after
  the first step and the last only.

Without `--model` it measures a table (`--table`; default: the device's): on a CPU simple_cnn and
resnet18 at 32 px (resnet50 at 224 px takes minutes a step there: GPU only), and simple_cnn at
16 px with 8 images a batch, a step so short that the host's own work per step shows, as it does
in front of a fast GPU.
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
from visionflow.compose.training import build_callbacks, build_module, progress_callback
from visionflow.core.config import load_config, to_container

# (model, image size, batch size, steps per round, rounds) measured without --model
TABLES = {
    "cpu": [("simple_cnn", 32, 128, 30, 5), ("resnet18", 32, 32, 12, 5),
            ("simple_cnn", 16, 8, 150, 3)],
    "cuda": [("simple_cnn", 32, 512, 100, 5), ("resnet18", 32, 512, 100, 5),
             ("resnet50", 224, 256, 30, 3)],
    # the cuda table's models at a CPU's size, for a smoke run of scripts/gpu_session.sh
    "smoke": [("simple_cnn", 32, 4, 3, 1), ("resnet18", 32, 4, 3, 1), ("resnet50", 64, 2, 3, 1)],
}  # fmt: skip


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Plain:
    """The plain PyTorch loop, one step at a time."""

    def __init__(self, net, optim_cfg, precision: str, steps: int) -> None:
        self.net = net.train()
        self.opt = instantiate(optim_cfg["optimizer"], params=net.parameters())
        # the schedule's length as ours sets it (vision/modules.py)
        self.sched = instantiate(optim_cfg["scheduler"])(self.opt, total_steps=max(steps, 8))
        device = next(net.parameters()).device.type
        self.autocast = torch.autocast(
            device, dtype=torch.bfloat16, enabled=precision == "bf16-mixed"
        )

    def step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        with self.autocast:
            loss = F.cross_entropy(self.net(x), y)
        loss.backward()
        self.opt.step()
        self.sched.step()


def _sync_at(index: int, steps: int) -> None:
    """Wait for the device after the first and the last step only: the times of the steps in
    between add up right, and the device runs queued work while the host prepares the next
    step, as in training. (A CPU runs each operation to its end: every step's time is its own.)"""
    if index in (0, steps - 1):
        _sync()


class Clock(pl.Callback):
    """Ours' step times, each from the end of the step before (or the epoch's start) to the end
    of this one; the last callback, so that the others' work on each batch counts. With `plain`
    (step by step, CPU), one plain step runs after each of ours, timed apart and left out."""

    def __init__(self, steps: int, plain: Plain | None = None, batches=None) -> None:
        self.steps, self.plain, self.batches = steps, plain, batches
        self.ours: list[float] = []
        self.plain_steps: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        _sync()
        self._mark = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync_at(batch_idx, self.steps)
        now = time.perf_counter()
        self.ours.append(now - self._mark)
        self._mark = now
        if self.plain is not None:
            self.plain.step(*self.batches[batch_idx])
            _sync_at(batch_idx, self.steps)
            self._mark = time.perf_counter()
            self.plain_steps.append(self._mark - now)


def plain_run(plain: Plain, batches) -> list[float]:
    """The plain loop's step times."""
    times = []
    _sync()
    mark = time.perf_counter()
    for i, (x, y) in enumerate(batches):
        plain.step(x, y)
        _sync_at(i, len(batches))
        now = time.perf_counter()
        times.append(now - mark)
        mark = now
    return times


def fit_ours(net, batches, cfg, device: str, precision: str, timer: Clock) -> dict[str, float]:
    """One fit of ours; returns what its telemetry logged (`perf/...`, without the prefix)."""
    module = build_module(cfg, net, {"task": "classification", "classes": list(range(10))})
    args = {k: v for k, v in plain(cfg.trainer).items() if v is not None}
    args.update(accelerator=device, devices=1, strategy="auto", max_epochs=1, precision=precision,
                limit_train_batches=None, limit_val_batches=0, num_sanity_val_steps=0)  # fmt: skip
    trainer = pl.Trainer(
        **args, logger=DummyLogger(), enable_checkpointing=False, enable_model_summary=False,
        callbacks=[progress_callback(), *build_callbacks(cfg.callbacks), timer],
    )  # fmt: skip
    trainer.fit(module, train_dataloaders=DataLoader(batches, batch_size=None, shuffle=False))
    return {
        k.removeprefix("perf/"): float(v)
        for k, v in trainer.callback_metrics.items()
        if k.startswith("perf/")
    }


def measure(model: str, image_size: int, batch_size: int, steps: int, rounds: int,
            precision: str, channels_last: bool, turns: str) -> dict[str, float]:  # fmt: skip
    """Images/second of each after the first step and the first step's milliseconds (medians
    over rounds), the median of the rounds' ratios, and what ours' telemetry logged in its last
    round (`telemetry`: on a GPU, its memory, utilisation and MFU as well)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if steps < 2:
        raise SystemExit("--steps: at least 2 (the first step is timed apart)")
    cfg = load_config(
        [f"model={model}", f"trainer.precision={precision}", f"train.channels_last={channels_last}"]
    )
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

    def new_plain() -> Plain:
        return Plain(copy.deepcopy(net0), optim_cfg, precision, steps)

    telemetry: dict[str, float] = {}

    def ours(timer: Clock) -> list[float]:
        telemetry.clear()
        telemetry.update(fit_ours(copy.deepcopy(net0), batches, cfg, device, precision, timer))
        return timer.ours

    def step_by_step() -> dict[str, list[float]]:
        timer = Clock(steps, new_plain(), batches)
        return {"ours": ours(timer), "plain": timer.plain_steps}

    def run_by_run(r: int) -> dict[str, list[float]]:
        runs = {
            "plain": lambda: plain_run(new_plain(), batches),
            "ours": lambda: ours(Clock(steps)),
        }
        order = ("plain", "ours") if r % 2 == 0 else ("ours", "plain")
        return {name: runs[name]() for name in order}

    one_round = run_by_run if turns == "run" else lambda r: step_by_step()
    one_round(1)  # warm-up: allocator, kernels' choice, Lightning's first fit
    first: dict[str, list[float]] = {"plain": [], "ours": []}
    rest: dict[str, list[float]] = {"plain": [], "ours": []}
    for r in range(rounds):
        for name, times in one_round(r).items():
            first[name].append(times[0])
            rest[name].append(sum(times[1:]))
    images = (steps - 1) * batch_size
    ratios = [p / o for p, o in zip(rest["plain"], rest["ours"], strict=True)]
    return {
        "plain": images / statistics.median(rest["plain"]),
        "ours": images / statistics.median(rest["ours"]),
        "ratio": statistics.median(ratios),
        "low": min(ratios),
        "high": max(ratios),
        "plain_first_ms": 1000 * statistics.median(first["plain"]),
        "ours_first_ms": 1000 * statistics.median(first["ours"]),
        "telemetry": dict(telemetry),
    }


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", help="one model (default: a table's)")
    p.add_argument("--table", choices=sorted(TABLES), help="the cases (default: the device's)")
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=20, help="steps per round")
    p.add_argument("--repeats", type=int, default=5, help="rounds (fits of ours)")
    p.add_argument("--precision", default="32-true", choices=["32-true", "bf16-mixed"])
    p.add_argument("--channels-last", action="store_true")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    p.add_argument("--turns", choices=["step", "run"],
                   help="take turns step by step or run by run (default: step on a CPU, run on a GPU)")  # fmt: skip
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")  # Lightning's advice about the loop we chose to run
    device = "cuda" if torch.cuda.is_available() else "cpu"
    cases = (
        [(args.model, args.image_size, args.batch_size, args.steps, args.repeats)]
        if args.model
        else TABLES[args.table or device]
    )
    where = (
        torch.cuda.get_device_name()
        if device == "cuda"
        else f"cpu threads={torch.get_num_threads()}"
    )
    turns = args.turns or ("run" if device == "cuda" else "step")
    print(f"device={where} precision={args.precision} channels_last={args.channels_last} "
          f"turns={turns}")  # fmt: skip
    print(f"  {'model':<11}{'image':>6}{'batch':>6}{'steps':>6}{'rounds':>7}"
          f"{'plain img/s':>13}{'ours img/s':>12}{'ours/plain':>11}{'range':>12}"
          f"{'1st step ms plain':>19}{'ours':>8}")  # fmt: skip
    for model, size, batch, steps, rounds in cases:
        m = measure(model, size, batch, steps, rounds, args.precision, args.channels_last, turns)
        print(f"  {model:<11}{size:>6}{batch:>6}{steps:>6}{rounds:>7}"
              f"{m['plain']:>13.1f}{m['ours']:>12.1f}{m['ratio']:>11.3f}"
              f"{m['low']:>6.3f}-{m['high']:.3f}"
              f"{m['plain_first_ms']:>19.1f}{m['ours_first_ms']:>8.1f}")  # fmt: skip
        # its epoch includes the first step (which counts the FLOPs), left out of the ratio; taking
        # turns step by step, the plain steps run between ours count as ours' data wait
        caveat = " (plain's steps counted as data wait)" if turns == "step" else ""
        print(
            f"    ours' telemetry, last round{caveat}: "
            + " ".join(f"{k}={v:.4g}" for k, v in sorted(m["telemetry"].items())),
            flush=True,
        )


if __name__ == "__main__":
    main()
