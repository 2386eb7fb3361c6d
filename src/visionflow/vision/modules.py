"""LightningModules: one per task, owning the step logic; the network comes from the registry.

`VisionModule` holds what every task shares: the optimizer and schedule from `optim`, how the
network runs (`train.*`: channels_last, torch.compile, gradient checkpointing) and the `spec`
that travels inside every checkpoint so that later steps can rebuild the network from it alone.
"""

from __future__ import annotations

import inspect
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from torch import nn
from torchmetrics.functional.classification import multiclass_accuracy

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
        """The loss of one batch of `split`, logging what the task measures."""
        raise NotImplementedError

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _log(self, split: str, name: str, value, batch_size: int, on_step=False, bar=True) -> None:
        """`batch_size` weights the epoch mean (Lightning cannot infer it from list batches)."""
        self.log(
            f"{split}/{name}", value, on_step=on_step, on_epoch=True, prog_bar=bar,
            sync_dist=True, batch_size=batch_size,
        )  # fmt: skip

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
        # validate_args=False: checking the labels' range would wait for the device every step
        acc = multiclass_accuracy(logits, hard, logits.shape[1], "micro", validate_args=False)
        self._log(split, "loss", loss, len(images), on_step=split == "train")
        self._log(split, "acc", acc, len(images))
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
        self._log("train", "loss", loss, len(images), on_step=True)
        for name, value in losses.items():
            self._log("train", name, value, len(images), bar=False)
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        images, targets = batch
        self.val_map.update(self(images), list(targets))

    def on_validation_epoch_end(self) -> None:
        result = self.val_map.compute()
        self.val_map.reset()
        self.log("val/map", result["map"], prog_bar=True, sync_dist=True)
        self.log("val/map_50", result["map_50"], prog_bar=True, sync_dist=True)


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
        self._log(split, "loss", loss, len(images), on_step=split == "train")
        if split != "train":
            self.metrics[split].update(logits.argmax(1), masks)
        return loss

    def _epoch_end(self, split: str) -> None:
        result = self.metrics[split].compute()
        self.metrics[split].reset()
        self.log(f"{split}/miou", mean_iou(result["iou"]), prog_bar=True)
        self.log(f"{split}/pixel_acc", result["pixel_acc"], prog_bar=True)

    def on_validation_epoch_end(self) -> None:
        self._epoch_end("val")

    def on_test_epoch_end(self) -> None:
        self._epoch_end("test")


DATA_INIT_IMAGES = 5000  # training images a data-dependent initialisation sees
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
