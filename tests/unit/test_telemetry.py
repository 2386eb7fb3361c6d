"""The telemetry callback: what it logs under perf/ each epoch of a real (tiny, CPU) fit, and
its table of GPU peaks."""

from __future__ import annotations

import time

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers.logger import Logger
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode

from visionflow.callbacks.resizing import ProgressiveResizing
from visionflow.callbacks.telemetry import Telemetry, peak_bf16_flops

CPU_KEYS = {
    "perf/images_per_s",
    "perf/step_time_s",
    "perf/data_wait_share",
    "perf/gflops_per_image",
}


class Recorder(Logger):
    """Keeps every `log_metrics` call."""

    def __init__(self) -> None:
        super().__init__()
        self.logged: list[dict[str, float]] = []

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params, *args, **kwargs) -> None:
        pass

    def log_metrics(self, metrics, step=None) -> None:
        self.logged.append(dict(metrics))

    def epochs(self) -> list[dict[str, float]]:
        """Each epoch's perf/ values."""
        return [
            {k: v for k, v in m.items() if k.startswith("perf/")}
            for m in self.logged
            if "perf/images_per_s" in m
        ]


class Classifier(pl.LightningModule):
    """`net` trained with SGD; resizes its training images to `input_size` when set, as
    visionflow's modules do for progressive resizing."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net
        self.input_size: int | None = None

    def training_step(self, batch, batch_idx):
        images, labels = batch
        if self.input_size:
            images = F.interpolate(images, size=self.input_size, mode="bilinear")
        return F.cross_entropy(self.net(images), labels)

    def validation_step(self, batch, batch_idx):
        images, labels = batch
        return F.cross_entropy(self.net(images), labels)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Sleepy(Dataset):
    """A dataset that takes `seconds` per image."""

    def __init__(self, data: Dataset, seconds: float) -> None:
        self.data, self.seconds = data, seconds

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i):
        time.sleep(self.seconds)
        return self.data[i]


def _images(n: int = 32, size: int = 4) -> TensorDataset:
    return TensorDataset(torch.randn(n, 3, size, size), torch.randint(0, 3, (n,)))


def _fit(tmp_path, net, train, *callbacks, val=None, **trainer_args) -> tuple[Recorder, pl.Trainer]:
    """Two epochs on `train` in batches of 4 with the telemetry callback."""
    logger = Recorder()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=2, logger=logger,
        callbacks=[Telemetry(), *callbacks], default_root_dir=tmp_path, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
        **trainer_args,
    )  # fmt: skip
    trainer.fit(
        Classifier(net),
        DataLoader(train, batch_size=4),
        DataLoader(val, batch_size=4) if val is not None else None,
    )
    return logger, trainer


def test_each_epoch_logs_throughput_step_time_data_wait_and_flops(tmp_path):
    linear = nn.Linear(3 * 4 * 4, 3)
    logged, trainer = _fit(tmp_path, nn.Sequential(nn.Flatten(), linear), _images(),
                           val=_images(8), accumulate_grad_batches=2)  # fmt: skip
    epochs = logged.epochs()
    assert len(epochs) == 2
    for perf in epochs:
        assert set(perf) == CPU_KEYS  # no GPU memory, utilisation or MFU on a CPU
        assert perf["perf/images_per_s"] > 0
        # images/s x s/step = the images of one optimizer step: 2 batches of 4
        assert perf["perf/images_per_s"] * perf["perf/step_time_s"] == pytest.approx(8)
        assert 0 <= perf["perf/data_wait_share"] <= 1
        # one Linear layer: 2·in·out per image forward, as much for the weights' gradient (the
        # images need none)
        flops = 4 * linear.in_features * linear.out_features
        assert perf["perf/gflops_per_image"] == pytest.approx(flops / 1e9)
    assert trainer.callback_metrics.keys() >= CPU_KEYS  # hence the train step's final_metrics


def test_a_slow_loader_shows_as_data_wait(tmp_path):
    net = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3))
    fast = _fit(tmp_path, net, _images())[0].epochs()
    slow = _fit(tmp_path, net, Sleepy(_images(), seconds=0.005))[0].epochs()
    for quick, waiting in zip(fast, slow, strict=True):
        assert waiting["perf/data_wait_share"] > quick["perf/data_wait_share"]
        assert waiting["perf/images_per_s"] < quick["perf/images_per_s"]


def test_flops_are_counted_again_when_progressive_resizing_changes_the_size(tmp_path):
    def net() -> nn.Module:
        return nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)
        )

    def counted(size: int) -> float:  # forward and backward of one batch, per image
        images = torch.randn(4, 3, size, size)
        with FlopCounterMode(display=False) as counter:
            net()(images).sum().backward()
        return counter.get_total_flops() / len(images) / 1e9

    logged, _ = _fit(tmp_path, net(), _images(size=8), ProgressiveResizing([4, 8]))
    small, full = (perf["perf/gflops_per_image"] for perf in logged.epochs())
    assert small == pytest.approx(counted(4))
    assert full == pytest.approx(counted(8)) and full > small


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989.4e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA A10", 125e12),
        ("Tesla T4", 65e12),
        ("NVIDIA A10G", None),  # AWS's variant: NVIDIA publishes no figure for it, so no MFU
        ("NVIDIA GeForce GTX 1080", None),
    ],
)
def test_gpu_peaks_by_device_name(name, peak):
    assert peak_bf16_flops(name) == peak


class FakeGpu:
    """What the callback reads from CUDA and NVML, for a fit that runs on the CPU: this machine
    has no GPU, so these reads are mocked (`torch.cuda`'s peak memory, synchronize and
    utilisation, and the device's name); the callback's own arithmetic and logging run as they
    would on a GPU."""

    def __init__(self, monkeypatch, name: str, peak_gib: float, busy_percent: int | None) -> None:
        self.resets = self.syncs = 0
        self.peak_bytes = int(peak_gib * 2**30)
        self.busy_percent = busy_percent
        monkeypatch.setattr("visionflow.callbacks.telemetry._gpu_name", lambda device: name)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", self._reset)
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: self.peak_bytes)
        monkeypatch.setattr(torch.cuda, "synchronize", self._sync)
        monkeypatch.setattr(torch.cuda, "utilization", self._utilization)

    def _reset(self, device=None) -> None:
        self.resets += 1

    def _sync(self, device=None) -> None:
        self.syncs += 1

    def _utilization(self, device=None) -> int:
        if self.busy_percent is None:
            raise ModuleNotFoundError("No module named 'pynvml'")
        return self.busy_percent


def test_on_a_gpu_each_epoch_adds_peak_memory_utilisation_and_mfu(tmp_path, monkeypatch):
    gpu = FakeGpu(monkeypatch, "NVIDIA H200", peak_gib=3.5, busy_percent=80)
    linear = nn.Linear(3 * 4 * 4, 3)
    logged, _ = _fit(tmp_path, nn.Sequential(nn.Flatten(), linear), _images())
    epochs = logged.epochs()
    assert len(epochs) == 2
    gpu_keys = {"perf/gpu_memory_peak_gib", "perf/gpu_utilisation", "perf/mfu"}
    for perf in epochs:
        assert set(perf) == CPU_KEYS | gpu_keys
        assert perf["perf/gpu_memory_peak_gib"] == pytest.approx(3.5)
        assert perf["perf/gpu_utilisation"] == pytest.approx(0.8)
        # MFU: FLOPs per image x images/s over the H200's dense bf16 peak
        achieved = perf["perf/gflops_per_image"] * 1e9 * perf["perf/images_per_s"]
        assert perf["perf/mfu"] == pytest.approx(achieved / 989.4e12)
    assert gpu.resets == 2  # the peak is each epoch's own
    assert gpu.syncs == 2  # once per epoch, after its last batch: no wait at any other step


def test_without_nvml_or_a_known_peak_the_gpu_epoch_leaves_those_out(tmp_path, monkeypatch):
    FakeGpu(monkeypatch, "NVIDIA GeForce GTX 1080", peak_gib=1.0, busy_percent=None)
    logged, _ = _fit(tmp_path, nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 3)), _images())
    for perf in logged.epochs():
        assert set(perf) == CPU_KEYS | {"perf/gpu_memory_peak_gib"}
