"""LightningModules: one per task, owning the step logic; the network comes from the registry.

`VisionModule` holds what every task shares: the optimizer and schedule from `optim`, how the
network runs (`train.*`: channels_last, torch.compile, gradient checkpointing) and the `spec`
that travels inside every checkpoint so that later steps can rebuild the network from it alone.

A step costs what the plain PyTorch loop costs, plus a few operations on the device: what a task
measures per batch (loss, accuracy) is added to the epoch's sums there, and logged once, as the
epoch's means, when the epoch ends. `train/loss_step` is logged on the steps the Trainer sends
to its loggers (`trainer.log_every_n_steps`), as a CPU copy that the progress display reads
without waiting for the device. Nothing is logged with `sync_dist`: the sums are added up over
the ranks explicitly, in hooks every rank runs at the same point, so no reader on one rank (the
progress display runs on rank 0 alone) can start a collective the others never join.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn

from visionflow.core.config import ConfigError
from visionflow.vision.metrics import IGNORE_INDEX, mean_iou, segmentation_metrics
from visionflow.vision.models.checkpointing import enable_gradient_checkpointing


class VisionModule(pl.LightningModule):
    """Optimizer, schedule, network options and the checkpoint's spec, for every task.

    `channels_last` and `compile` change how the network runs, not what it computes;
    checkpoints keep the plain network's parameter names either way.
    """

    monitor = "val/loss"  # the validation metric that picks best.ckpt
    mode = "min"

    def __init__(
        self,
        net: nn.Module,
        spec: dict[str, Any],
        optim: dict[str, Any],
        channels_last: bool = False,
        compile: bool = False,
        gradient_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.memory_format = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=self.memory_format)
        if gradient_checkpointing:
            enable_gradient_checkpointing(self.net)
        if compile:
            self.net.compile()  # in place: state_dict keys stay those of the plain network
        self.spec = spec
        self.optim = optim
        self.input_size: int | None = None  # set by ProgressiveResizing: train at this size
        # Per split, since its means were last logged: {name: sum over images, on the device}
        # and the number of images.
        self._sums: dict[str, dict[str, torch.Tensor]] = {}
        self._images: dict[str, int] = {}

    def setup(self, stage: str) -> None:
        """A network with a data-dependent initialisation (`init_from_data(images)`, such as
        fast_cifar's whitened stem) gets it from the first training images here: before DDP
        copies rank 0's weights to the other ranks, and before a resumed run's checkpoint
        replaces it."""
        init = getattr(self.net, "init_from_data", None)
        if stage != "fit" or init is None:
            return
        if self.trainer.datamodule is None:
            raise RuntimeError(
                f"{type(self.net).__name__} initialises itself from the training data: "
                "fit it with a datamodule"
            )
        images, count = [], 0
        for batch in self.trainer.datamodule.train_dataloader():
            images.append(batch[0].cpu())
            count += len(batch[0])
            if count >= DATA_INIT_IMAGES:
                break
        init(torch.cat(images)[:DATA_INIT_IMAGES])

    def configure_optimizers(self):
        optimizer = instantiate(self.optim["optimizer"], _partial_=True)(self._param_groups())
        for group in optimizer.param_groups:
            if group["lr_scale"] != 1.0:  # a scaled step, the same decay per step
                group["lr"] *= group["lr_scale"]
                group["weight_decay"] /= group["lr_scale"]
        if not self.optim.get("scheduler"):
            return optimizer
        make = instantiate(self.optim["scheduler"])
        scheduler = make(
            optimizer,
            **_schedule_length(make, self.trainer.estimated_stepping_batches),
            **_per_group_max_lr(make, optimizer),
        )
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "step"},
        }

    def _param_groups(self) -> list[dict[str, Any]]:
        """One group, or two when `optim.norm_lr_scale` != 1: normalisation layers' parameters
        (BatchNorm, GroupNorm, LayerNorm scales and shifts) step `norm_lr_scale` times faster
        with their weight decay divided by it, so that they decay as much per step as the rest.
        A high rate for BatchNorm shifts is what lets short schedules converge (airbench)."""
        scale = float(self.optim.get("norm_lr_scale", 1.0))
        if scale <= 0:
            raise ConfigError(f"optim.norm_lr_scale must be > 0, got {scale}")
        params = list(self.parameters())
        if scale == 1.0:
            return [{"params": params, "lr_scale": 1.0}]
        norms = {
            id(p)
            for m in self.modules()
            if isinstance(m, NORM_LAYERS)
            for p in m.parameters(recurse=False)
        }
        return [
            {"params": [p for p in params if id(p) not in norms], "lr_scale": 1.0},
            {"params": [p for p in params if id(p) in norms], "lr_scale": scale},
        ]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["visionflow"] = self.spec

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Resuming keeps this run's schedule length: a run resumed with more epochs stretches
        the rest of its schedule instead of stepping past the end of the old one (OneCycleLR
        raises there). The step count and everything else come from the checkpoint."""
        for state in checkpoint.get("lr_schedulers", []):
            for key in SCHEDULE_LENGTH_KEYS:
                state.pop(key, None)

    def _step(self, batch, split: str) -> torch.Tensor:
        """The loss of one batch of `split`, adding what the task measures to the epoch's sums."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        self._log_step_loss(loss)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _add(self, split: str, batch_size: int, **means: torch.Tensor) -> None:
        """Add a batch's means (over its `batch_size` images) to `split`'s sums, on the device."""
        sums = self._sums.setdefault(split, {})
        for name, mean in means.items():
            if name in sums:
                sums[name].add_(mean.detach(), alpha=batch_size)
            else:  # float32 whatever the precision: bf16 sums would round away small batches
                sums[name] = mean.detach().float() * batch_size
        self._images[split] = self._images.get(split, 0) + batch_size

    def _log_step_loss(self, loss: torch.Tensor) -> None:
        """`train/loss_step`, the mean over ranks, on the steps whose values the Trainer sends
        to its loggers (every `trainer.log_every_n_steps`, counted as Lightning counts them)."""
        every = self.trainer.log_every_n_steps
        if not every or (self.global_step + 1) % every:
            return
        loss = self.trainer.strategy.reduce(loss.detach(), reduce_op="mean")
        self.log("train/loss_step", loss.cpu(), on_step=True, on_epoch=False, prog_bar=True)

    def _log_epoch_means(self, split: str) -> None:
        """Log `split`'s means over the images added since they were last logged, over all
        ranks (one all-reduce), and start new sums. Training's loss is `train/loss_epoch`."""
        sums, images = self._sums.pop(split, {}), self._images.pop(split, 0)
        if not sums:  # the same on every rank: they all ran the same number of batches
            return
        names = list(sums)
        total = torch.stack([*(sums[n] for n in names), sums[names[0]].new_tensor(images)])
        total = self.trainer.strategy.reduce(total, reduce_op="sum")
        means = (total[:-1] / total[-1]).cpu()
        for name, mean in zip(names, means, strict=True):
            key = "train/loss_epoch" if (split, name) == ("train", "loss") else f"{split}/{name}"
            self.log(key, mean, on_step=False, on_epoch=True, prog_bar=name in ON_BAR, batch_size=1)

    def on_train_batch_end(self, outputs, batch, batch_idx: int) -> None:
        """The epoch's last batch logs its means: before the epoch-end hooks of callbacks (the
        progress display's among them), which Lightning calls before this module's."""
        progress, trainer = self.trainer.fit_loop.epoch_loop.batch_progress, self.trainer
        if (
            progress.is_last_batch
            or progress.current.ready == trainer.num_training_batches
            or 0 <= trainer.max_steps <= self.global_step
        ):
            self._log_epoch_means("train")

    def on_train_epoch_end(self) -> None:
        self._log_epoch_means("train")  # an epoch stopped before its last batch

    def on_validation_epoch_end(self) -> None:
        self._log_epoch_means("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch_means("test")

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.contiguous(memory_format=self.memory_format))

    def _resized(self, images: torch.Tensor, masks: torch.Tensor | None = None):
        """Images (and masks) at `input_size` while progressive resizing asks for another size."""
        size = self.input_size
        if not self.training or size is None or images.shape[-1] == size:
            return images, masks
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        if masks is not None:
            masks = F.interpolate(masks[:, None].float(), size=(size, size), mode="nearest")
            masks = masks[:, 0].long()
        return images, masks


class ClassificationModule(VisionModule):
    """Cross-entropy training of any registered classifier, with accuracy on every split
    (torchmetrics' micro accuracy per batch, which the epoch's batch-size-weighted mean makes
    the accuracy over the epoch's images, as evaluation measures it: vision/metrics.py).

    `batch_transform` (MixUp/CutMix, from `transforms.batch`) mixes training batches on the
    device; the labels become soft targets and training accuracy is against their argmax.
    """

    monitor, mode = "val/acc", "max"

    def __init__(self, *args, batch_transform=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.batch_transform = batch_transform
        self.label_smoothing = float(self.optim.get("label_smoothing", 0.0))

    def _step(self, batch, split: str) -> torch.Tensor:
        images, labels = batch
        if split == "train":
            images, _ = self._resized(images)
            if self.batch_transform is not None:
                images, labels = self.batch_transform(images, labels)
        logits = self(images)
        smoothing = self.label_smoothing if split == "train" else 0.0
        loss = F.cross_entropy(logits, labels, label_smoothing=smoothing)
        hard = labels.argmax(1) if labels.ndim == 2 else labels
        acc = (logits.argmax(1) == hard).float().mean()
        self._add(split, len(images), loss=loss, acc=acc)
        return loss


class DetectionModule(VisionModule):
    """torchvision detectors: their own losses in training, COCO mAP on validation.

    Batches are (list of images, list of targets) with labels counted from 1. The detector
    returns losses in train mode and detections in eval mode, so validation reports mAP
    (torchmetrics' COCO evaluation): `val/map` (mAP@[.5:.95], which picks best.ckpt) and
    `val/map_50`.
    """

    monitor, mode = "val/map", "max"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        from torchmetrics.detection import MeanAveragePrecision

        self.val_map = MeanAveragePrecision(iou_type="bbox", backend="pycocotools")

    def forward(self, images):
        return self.net(list(images))

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        images, targets = batch
        if self.input_size is not None:
            images, targets = _rescale_detection(images, targets, self.input_size)
        losses = self.net(list(images), list(targets))
        loss = sum(losses.values())
        self._add("train", len(images), loss=loss, **losses)  # the detector's own, by name
        self._log_step_loss(loss)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.val_map.update(self(images), list(targets))

    def on_validation_epoch_end(self) -> None:
        result = self.val_map.compute()  # over every rank's detections (torchmetrics syncs)
        self.val_map.reset()
        self.log("val/map", result["map"], prog_bar=True)
        self.log("val/map_50", result["map_50"], prog_bar=True)


def _rescale_detection(images, targets, size: int):
    """Progressive resizing for detection: square images of `size`, boxes scaled with them."""
    out_images, out_targets = [], []
    for image, target in zip(images, targets, strict=True):
        h, w = image.shape[-2:]
        out_images.append(
            F.interpolate(image[None], size=(size, size), mode="bilinear", antialias=True)[0]
        )
        scale = torch.tensor([size / w, size / h, size / w, size / h], device=image.device)
        out_targets.append({**target, "boxes": target["boxes"] * scale})
    return out_images, out_targets


class SegmentationModule(VisionModule):
    """Per-pixel cross-entropy (255 ignored); mIoU and pixel accuracy as evaluation measures
    them (vision/metrics.py).

    Class 0 is the background and counts in the mean IoU, as in Pascal VOC and torchvision's
    reference recipe. `val/miou` picks best.ckpt.
    """

    monitor, mode = "val/miou", "max"

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        n = len(self.spec["classes"]) + 1
        self.metrics = nn.ModuleDict({split: segmentation_metrics(n) for split in ("val", "test")})

    def _step(self, batch, split: str) -> torch.Tensor:
        images, masks = batch
        masks = masks.as_subclass(torch.Tensor)
        if split == "train":
            images, masks = self._resized(images, masks)
        logits = self(images)
        loss = F.cross_entropy(logits, masks, ignore_index=IGNORE_INDEX)
        self._add(split, len(images), loss=loss)
        if split != "train":
            self.metrics[split].update(logits.argmax(1), masks)
        return loss

    def _epoch_end(self, split: str) -> None:
        self._log_epoch_means(split)
        result = self.metrics[split].compute()  # over every rank's pixels (torchmetrics syncs)
        self.metrics[split].reset()
        self.log(f"{split}/miou", mean_iou(result["iou"]), prog_bar=True)
        self.log(f"{split}/pixel_acc", result["pixel_acc"], prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")


DATA_INIT_IMAGES = 5000  # training images a data-dependent initialisation sees
ON_BAR = ("loss", "acc")  # the epoch means the progress display shows
NORM_LAYERS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
# What a scheduler's state says about the run's length (OneCycleLR's, CosineAnnealingLR's).
SCHEDULE_LENGTH_KEYS = ("total_steps", "_schedule_phases", "T_max")

MODULES: dict[str, type[VisionModule]] = {
    "classification": ClassificationModule,
    "detection": DetectionModule,
    "segmentation": SegmentationModule,
}


def _schedule_length(make, total_steps: int) -> dict[str, int]:
    """Fill in the schedule's length (OneCycleLR's total_steps, cosine's T_max) if not given."""
    func = getattr(make, "func", make)
    given = getattr(make, "keywords", {})
    params = inspect.signature(func).parameters
    for name in ("total_steps", "T_max"):
        if name in params and name not in given:
            # OneCycleLR divides by its phase lengths: a smoke run of a few steps would crash.
            return {name: max(int(total_steps), 8)}
    return {}


def _per_group_max_lr(make, optimizer: torch.optim.Optimizer) -> dict[str, list[float]]:
    """OneCycleLR sets absolute rates from `max_lr`: one number becomes one per group, scaled
    like the groups' own rates (other schedules scale each group's rate and need nothing)."""
    max_lr = getattr(make, "keywords", {}).get("max_lr")
    if not isinstance(max_lr, int | float):
        return {}
    return {"max_lr": [max_lr * group["lr_scale"] for group in optimizer.param_groups]}
