"""Training telemetry: is the accelerator busy, and with what?

Logged once per training epoch under `perf/` (in MLflow through the trainer's logger, and in
`trainer.callback_metrics`, hence in the train step's `final_metrics`):

- `perf/images_per_s`: training images per second, all ranks together.
- `perf/step_time_s`: seconds of training per optimizer step, data wait included.
- `perf/data_wait_share`: the share of that time the loop waited for its next batch: from the
  epoch's start, and from the end of each batch, to the start of the next one. Whatever else runs
  between batches (a checkpoint saved mid-epoch) counts as waiting too.
- `perf/gflops_per_image`: the model's FLOPs per training image, forward and backward, counted by
  `torch.utils.flop_counter.FlopCounterMode` on the first real training step (eager, even when the
  network is compiled), and again whenever the training image size changes (progressive resizing).
- `perf/mfu`: model FLOPs utilisation: the FLOPs/s achieved over the GPU's dense bf16 peak
  (`PEAK_BF16`), whatever precision the run trains in; on a GPU the table lists.
- `perf/gpu_memory_peak_gib`: `torch.cuda.max_memory_allocated` over the epoch; on CUDA.
- `perf/gpu_utilisation`: the mean share of time the GPU ran a kernel (NVML, sampled every
  `utilisation_every_s` seconds at the end of a batch); on CUDA with nvidia-ml-py installed
  (`pip install visionflow[gpu]`; the training image has it).

The epoch's time is that of its training batches, validation excluded. Timing is the host's
`time.perf_counter`, with one `torch.cuda.synchronize` after the epoch's last batch so that the
queued GPU work counts; nothing waits for the device at any other step. The host can wait for
data while the GPU still runs queued work: the data wait share is an upper bound on the GPU's.

Under DDP each rank measures its own work; images/s adds up the ranks, peak memory is the
largest, the rest are means.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from typing import Any

import lightning.pytorch as pl
import torch
from torch.utils.flop_counter import FlopCounterMode

from visionflow.core.registry import CALLBACKS

log = logging.getLogger("visionflow.train")

# Dense (not 2:4 sparse) bf16 tensor-core peaks from NVIDIA's datasheets, in FLOP/s, matched in
# order against `torch.cuda.get_device_name`. (Lightning's `get_available_flops` lists sparse
# figures for the H200 and H100 NVL and finds neither "NVIDIA H200" nor "NVIDIA A10".)
PEAK_BF16: list[tuple[str, float]] = [
    (r"H100.*PCIe", 756e12),
    (r"H[12]00.*NVL", 835e12),
    (r"H[12]00", 989.4e12),  # SXM: "NVIDIA H100 80GB HBM3", "NVIDIA H200"
    (r"A100", 312e12),
    (r"\bL40S\b", 362e12),
    (r"\bL4\b", 121e12),
    (r"\bA10\b", 125e12),
    (r"\bT4\b", 65e12),  # no bf16 on Turing: its fp16 peak
]


def peak_bf16_flops(device_name: str) -> float | None:
    """The dense bf16 peak in FLOP/s of a GPU by its CUDA name; None for a GPU not in the table."""
    for pattern, flops in PEAK_BF16:
        if re.search(pattern, device_name, re.IGNORECASE):
            return flops
    return None


@CALLBACKS.register("telemetry")
class Telemetry(pl.Callback):
    """Throughput, step time, data wait, GPU memory and utilisation, FLOPs and MFU per epoch."""

    def __init__(self, utilisation_every_s: float = 0.5) -> None:
        super().__init__()
        self.utilisation_every_s = utilisation_every_s
        self.flops_per_image: float | None = None
        self._flops_key: Any = None  # the training input the FLOPs were counted for
        self._counting: contextlib.ExitStack | None = None
        self._counter: FlopCounterMode | None = None
        self._cuda = False
        self._peak: float | None = None
        self._sample_utilisation = False
        self._in_epoch = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        name = _gpu_name(pl_module.device)
        self._cuda = name is not None
        self._peak = peak_bf16_flops(name) if name is not None else None
        self._sample_utilisation = self._cuda and _utilisation(pl_module.device) is not None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._begin_epoch(trainer, pl_module)

    def _begin_epoch(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._images = 0
        self._first_step = trainer.global_step
        self._trained = self._waited = 0.0  # seconds
        self._busy: list[float] = []  # GPU utilisation samples
        self._ready = self._next_sample = time.perf_counter()
        self._in_epoch = True

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if not self._in_epoch:  # resumed mid-epoch: Lightning does not start that epoch again
            self._begin_epoch(trainer, pl_module)
        self._waited += time.perf_counter() - self._ready
        key = _input_key(pl_module, batch)
        if key != self._flops_key:
            self._flops_key = key
            self._count_flops()

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        images = len(_images_of(batch))
        self._images += images
        if self._counter is not None:
            self.flops_per_image = self._stop_counting() / images
        if self._cuda and batch_idx + 1 == trainer.num_training_batches:
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        self._trained += now - self._ready
        self._ready = now
        if self._sample_utilisation and now >= self._next_sample:
            self._next_sample = now + self.utilisation_every_s
            if (busy := _utilisation(pl_module.device)) is not None:
                self._busy.append(busy)

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._in_epoch:  # validation mid-epoch: the next batch's wait starts now
            self._ready = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._in_epoch = False
        steps = trainer.global_step - self._first_step
        if not self._images or not steps:
            return
        images_per_s = self._images / self._trained
        metrics = {
            "images_per_s": (images_per_s, "sum"),
            "step_time_s": (self._trained / steps, "mean"),
            "data_wait_share": (self._waited / self._trained, "mean"),
        }
        if self.flops_per_image is not None:
            metrics["gflops_per_image"] = (self.flops_per_image / 1e9, "mean")
            if self._peak is not None:
                metrics["mfu"] = (self.flops_per_image * images_per_s / self._peak, "mean")
        if self._cuda:
            peak_bytes = torch.cuda.max_memory_allocated(pl_module.device)
            metrics["gpu_memory_peak_gib"] = (peak_bytes / 2**30, "max")
            # NaN where NVML cannot say: every rank sends the same keys
            busy = sum(self._busy) / len(self._busy) if self._busy else float("nan")
            metrics["gpu_utilisation"] = (busy, "mean")
        for name, value in _over_ranks(trainer, metrics).items():
            pl_module.log(f"perf/{name}", value, on_step=False, on_epoch=True, batch_size=1)

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        if self._counter is not None:
            self._stop_counting()

    def _count_flops(self) -> None:
        """Count the FLOPs of the coming training step (until its batch ends), run eagerly:
        FlopCounterMode sees the operators a compiled graph would hide."""
        self._counting = contextlib.ExitStack()
        self._counting.enter_context(torch.compiler.set_stance("force_eager"))
        self._counter = self._counting.enter_context(FlopCounterMode(display=False))

    def _stop_counting(self) -> int:
        """The FLOPs counted since `_count_flops`."""
        assert self._counting is not None and self._counter is not None
        self._counting.close()
        flops = self._counter.get_total_flops()
        self._counting = self._counter = None
        return flops


def _over_ranks(trainer: pl.Trainer, metrics: dict[str, tuple[float, str]]) -> dict[str, float]:
    """Each metric over all ranks, by its reduction ("sum", "mean" of the ranks that measured
    it, "max"), in one all-gather from this hook, which every rank runs; a metric no rank
    measured (NaN) is left out. Logged already reduced: a value logged with `sync_dist` would be
    reduced by whichever rank reads it first, and the progress display reads on rank 0 alone."""
    names = list(metrics)
    local = torch.tensor([metrics[n][0] for n in names], dtype=torch.float64)
    device = trainer.strategy.root_device  # NCCL gathers from the GPU
    ranks = trainer.strategy.all_gather(local.to(device)).reshape(-1, len(names)).cpu()
    reduce = {"sum": torch.sum, "mean": torch.nanmean, "max": torch.amax}
    out = {n: float(reduce[metrics[n][1]](ranks[:, i])) for i, n in enumerate(names)}
    return {n: v for n, v in out.items() if v == v}


def _images_of(batch: Any) -> Any:
    """The images of a batch: a tensor, or a list of them (detection), first of `(images, targets)`."""
    return batch[0] if isinstance(batch, (list, tuple)) else batch


def _input_key(pl_module: pl.LightningModule, batch: Any) -> tuple:
    """What the FLOPs of a training step depend on: the images' shape and the size the module
    resizes them to (`input_size`, set by progressive resizing)."""
    images = _images_of(batch)
    shape = tuple(images.shape[1:]) if isinstance(images, torch.Tensor) else None
    return shape, getattr(pl_module, "input_size", None)


def _gpu_name(device: torch.device) -> str | None:
    """The CUDA name of the GPU the module trains on ("NVIDIA H200"); None on any other device."""
    return torch.cuda.get_device_name(device) if device.type == "cuda" else None


def _utilisation(device: torch.device) -> float | None:
    """The share of the last NVML sample period the GPU ran a kernel; None where NVML cannot
    say (nvidia-ml-py missing, a MIG slice, no driver): telemetry never stops training."""
    try:
        return torch.cuda.utilization(device) / 100
    except Exception as err:  # noqa: BLE001  (ModuleNotFoundError, NVMLError, RuntimeError)
        log.debug("no GPU utilisation: %s", err)
        return None
