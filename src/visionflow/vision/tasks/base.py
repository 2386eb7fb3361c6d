"""The task interface, and what its implementations share: records, plotting and ONNX export.

A `Task` says how to run a network or an ONNX/TorchScript file over a test loader, how to score
the outputs (the task's main metric is the quality gate and decides the champion), how to compare
an exported file with PyTorch, and how to export. The implementations live beside this module;
`visionflow.vision.tasks.get_task` picks one by name.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from visionflow.results import Parity
from visionflow.vision.inference import ort_predictor, torch_predictor

# The ONNX file's metadata key that says which exporter wrote it: "dynamo" (torch.export), or
# "legacy (<why>)" for the TorchScript-based exporter.
EXPORTER_KEY = "onnx_exporter"


@dataclass
class Scores:
    """A task's evaluation of outputs against targets."""

    score: float  # the main metric (Task.metric)
    metrics: dict[str, float]  # everything worth logging, by name
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)  # a table's rows
    confusion: list[list[int]] | None = None  # classification: rows true, columns predicted
    num_samples: int = 0


class Task:
    """The interface; one subclass per task below."""

    name: str
    metric: str  # the main test metric: quality gate and champion decision
    quantizable: bool = False
    figure: str  # the evaluation picture's file name

    def collate(self) -> Callable | None:
        """The DataLoader's collate_fn (None: PyTorch's default)."""
        return None

    def torch_predictor(self, net) -> Callable[[Any], Any]:
        raise NotImplementedError

    def ort_predictor(self, session) -> Callable[[Any], Any]:
        raise NotImplementedError

    def to_numpy(self, images, targets) -> tuple[Any, Any]:
        """One loader batch as the predictors and metrics take it."""
        raise NotImplementedError

    def batches(self, loader: Iterable, max_samples: int | None = None):
        """(images, targets) from the loader, as the predictors take them, up to max_samples."""
        seen = 0
        for images, targets in loader:
            x, y = self.to_numpy(images, targets)
            if max_samples is not None:
                x, y = x[: max_samples - seen], y[: max_samples - seen]
            yield x, y
            seen += len(x)
            if max_samples is not None and seen >= max_samples:
                return

    def evaluate(
        self, predict: Callable, loader: Iterable, classes: list[str], max_samples=None
    ) -> tuple[Scores, Any]:
        """Scores of `predict` on the loader's images, and a few (images, outputs, targets)
        examples from its first batch for the picture."""
        raise NotImplementedError

    def compare_batch(self, reference, other) -> tuple[float, float, int]:
        """(max |diff|, agreeing units, units) for one batch of outputs; the difference is NaN
        or infinite where either output is."""
        raise NotImplementedError

    def parity(
        self, reference: Callable, other: Callable, loader: Iterable, max_samples=None
    ) -> Parity:
        """How `other` (an exported file) differs from `reference` (PyTorch), batch by batch."""
        worst, agree, units, samples = 0.0, 0.0, 0, 0
        for images, _ in self.batches(loader, max_samples):
            diff, a, n = self.compare_batch(reference(images), other(images))
            # np.maximum, unlike max(), keeps a NaN: a model with NaN outputs fails parity
            worst, agree, units = float(np.maximum(worst, diff)), agree + a, units + n
            samples += len(images)
        return Parity(worst, agree / max(units, 1), samples)

    def plot(self, scores: Scores, classes: list[str], examples: Any, path: Path) -> Path:
        """A picture of the evaluation (confusion matrix, predictions on test images)."""
        raise NotImplementedError

    def export_onnx(self, net, path: Path, image_size: int, opset: int = 18) -> Path:
        raise NotImplementedError

    def export_torchscript(self, net, path: Path, image_size: int) -> Path:
        raise NotImplementedError

    def example_output(self, predict: Callable, image_size: int):
        """The output for one blank image, for the registered model's signature (None: the
        signature describes the input only)."""
        raise NotImplementedError


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display here or in pods)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    pyplot().close(fig)
    return path


def onnx_export(
    net,
    example: tuple,
    path: Path,
    outputs: list[str],
    axes: dict,
    opset: int,
    legacy: str | None = None,
) -> Path:
    """`net` as ONNX with input `images` and the named outputs, through torch.export (the
    `dynamo` exporter); the TorchScript-based exporter only where torch.export cannot take the
    model: `legacy` says why beforehand, or the dynamo exporter's failure does. `axes` names the
    dynamic dimensions, {input or output: {dim: name}}. The file's metadata records the exporter
    (EXPORTER_KEY; `exporter_of` reads it)."""
    if legacy is None:
        shapes = ({dim: torch.export.Dim(name) for dim, name in axes["images"].items()},)
        try:
            program = torch.onnx.export(
                net, example, input_names=["images"], output_names=outputs,
                dynamic_shapes=shapes, opset_version=opset, dynamo=True, verbose=False,
            )  # fmt: skip
        except torch.onnx.OnnxExporterError as err:
            legacy = f"the dynamo exporter failed: {str(err).splitlines()[0]}"
        else:
            program.model.metadata_props[EXPORTER_KEY] = "dynamo"
            program.save(str(path))
            return path
    with warnings.catch_warnings():
        # Tracing torchvision's detectors warns about every data-dependent branch it freezes
        # (TracerWarning) and every tensor it copies (torchvision.ops.boxes, torch.nn.functional);
        # parity on test images, not these, decides whether the trace is right.
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", "To copy construct from a tensor", UserWarning)
        torch.onnx.export(
            net, example, str(path), input_names=["images"], output_names=outputs,
            dynamic_axes=axes, opset_version=opset, dynamo=False,
        )  # fmt: skip
    model = onnx.load(str(path))
    onnx.helper.set_model_props(model, {EXPORTER_KEY: f"legacy ({legacy})"})
    onnx.save(model, str(path))
    return path


def exporter_of(path: Path) -> str:
    """Which exporter wrote an ONNX file of ours (EXPORTER_KEY in its metadata), or ""."""
    model = onnx.load(str(path), load_external_data=False)
    return next((p.value for p in model.metadata_props if p.key == EXPORTER_KEY), "")


class DenseTask(Task):
    """A task whose network maps an image batch to one dense array (logits per image or per
    pixel): the same predictors, exports and parity for classification and segmentation."""

    def torch_predictor(self, net):
        return torch_predictor(net)

    def ort_predictor(self, session):
        return ort_predictor(session)

    def to_numpy(self, images, targets):
        # cached loaders serve GPU batches; masks arrive as tv_tensors.Mask
        return images.cpu().numpy(), targets.as_subclass(torch.Tensor).cpu().numpy()

    def compare_batch(self, reference, other):
        """Max |difference| of the outputs, and how many argmaxes over dimension 1 agree."""
        same = reference.argmax(1) == other.argmax(1)
        with np.errstate(invalid="ignore"):  # inf - inf is NaN, which fails parity: no warning
            diff = float(np.abs(reference - other).max())
        return diff, float(same.sum()), int(same.size)

    def export_onnx(self, net, path, image_size, opset=18):
        """ONNX with a dynamic batch dimension; input `images` (N, 3, H, W) float in [0, 1]."""
        example = (torch.rand(2, 3, image_size, image_size),)
        axes = {"images": {0: "batch"}, "logits": {0: "batch"}}
        return onnx_export(net, example, path, ["logits"], axes, opset)

    def export_torchscript(self, net, path, image_size):
        # No trace check: it re-traces and compares graphs, which differ for ViT's shape asserts
        # ("Graphs differed across invocations") though the outputs agree; export's parity on
        # real images is the check that counts.
        example = torch.rand(2, 3, image_size, image_size)
        scripted = torch.jit.trace(net.eval(), example, check_trace=False)
        torch.jit.save(torch.jit.freeze(scripted.eval()), str(path))
        return path

    def example_output(self, predict, image_size):
        return predict(np.zeros((1, 3, image_size, image_size), np.float32))
