"""Detection: per-image boxes, labels and scores out; COCO mAP (torchmetrics) as the metrics.

Predictors take a list of float images (3, H, W) in [0, 1] and return one
`{"boxes" (K, 4) XYXY pixels, "labels" (K,) from 1, "scores" (K,)}` dict of numpy arrays per
image. The ONNX file takes one image `images` (3, H, W) and returns `boxes`, `labels` and
`scores`; it is run image by image. The TorchScript file is scripted (torchvision's detectors
cannot be traced) and returns `(losses, detections)` like every scripted torchvision detector.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from visionflow.vision.tasks.base import Scores, Task, onnx_export, pyplot, save_figure

# Parity compares the detections a user would act on: those scoring at least this much.
CONFIDENT = 0.5
OUTPUTS = ("boxes", "labels", "scores")
# Why detectors go through the TorchScript-based ONNX exporter (measured with torch 2.14 and
# torchvision 0.29: torch.export stops at batched NMS after about two minutes).
LEGACY_EXPORT = (
    "torch.export cannot trace torchvision's detectors: NMS keeps a data-dependent count"
)


class _Outputs(torch.nn.Module):
    """A detector whose ONNX outputs are OUTPUTS in that order, for one image.

    torchvision's detectors return one dict per image, and their key orders differ (Faster
    R-CNN: boxes, labels, scores; RetinaNet and SSD: boxes, scores, labels); the exporter names
    a dict's values by position, so without this RetinaNet's scores would be called `labels`.
    """

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, images: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        detections = self.net(images)[0]
        return tuple(detections[key] for key in OUTPUTS)


def _numpy(detections) -> list[dict[str, np.ndarray]]:
    return [{k: d[k].detach().cpu().numpy() for k in OUTPUTS} for d in detections]


class DetectionTask(Task):
    name = "detection"
    metric = "map_50"
    quantizable = False  # int8 of the RPN/RoI pipeline in ONNX Runtime is not supported here
    figure = "detections.png"

    def collate(self):
        from visionflow.vision.data.shards import collate_detection

        return collate_detection

    def torch_predictor(self, net):
        def predict(images: list[np.ndarray]):
            with torch.inference_mode():
                out = net([torch.from_numpy(x) for x in images])
            if isinstance(out, tuple):  # scripted: (losses, detections)
                out = out[1]
            return _numpy(out)

        return predict

    def ort_predictor(self, session):
        name = session.get_inputs()[0].name

        def predict(images: list[np.ndarray]):
            outs = []
            for x in images:
                boxes, labels, scores = session.run(
                    list(OUTPUTS), {name: np.ascontiguousarray(x, dtype=np.float32)}
                )
                outs.append({"boxes": boxes, "labels": labels, "scores": scores})
            return outs

        return predict

    def to_numpy(self, images, targets):
        x = [im.cpu().numpy() for im in images]
        y = [{k: t[k].cpu().numpy() for k in ("boxes", "labels")} for t in targets]
        return x, y

    def evaluate(self, predict, loader, classes, max_samples=None):
        from torchmetrics.detection import MeanAveragePrecision

        metric = MeanAveragePrecision(iou_type="bbox", class_metrics=True, backend="pycocotools")
        examples, count = None, 0
        for x, y in self.batches(loader, max_samples):
            out = predict(x)
            metric.update(
                [{k: torch.from_numpy(np.asarray(d[k])) for k in OUTPUTS} for d in out],
                [{k: torch.from_numpy(t[k]) for k in ("boxes", "labels")} for t in y],
            )
            count += len(x)
            if examples is None:
                examples = (x[:8], out[:8], y[:8])
        r = metric.compute()
        metrics = {k: float(r[k]) for k in ("map", "map_50", "map_75", "mar_100")}
        per_class = {}
        labels, aps = r["classes"].reshape(-1).tolist(), r["map_per_class"].reshape(-1).tolist()
        for label, ap in zip(labels, aps, strict=True):
            if 1 <= label <= len(classes):
                per_class[classes[label - 1]] = {"ap": float(ap)}
                metrics[f"ap/{classes[label - 1]}"] = float(ap)
        return Scores(metrics["map_50"], metrics, per_class, None, count), examples

    def compare_batch(self, reference, other):
        """Per image: the confident detections must match in number and labels (in score
        order); the difference is the largest of |score difference| and |box difference| as a
        share of the image's longer side, infinite where any box or score is NaN or infinite."""
        finite = all(
            np.isfinite(d[k]).all() for d in (*reference, *other) for k in ("boxes", "scores")
        )
        if not finite:
            return math.inf, 0.0, len(reference)
        worst, agree = 0.0, 0
        for ref, oth in zip(reference, other, strict=True):
            a, b = ref["scores"] >= CONFIDENT, oth["scores"] >= CONFIDENT
            same = a.sum() == b.sum() and np.array_equal(ref["labels"][a], oth["labels"][b])
            agree += int(same)
            if same and a.any():
                side = max(float(ref["boxes"].max()), 1.0)
                worst = max(
                    worst,
                    float(np.abs(ref["boxes"][a] - oth["boxes"][b]).max()) / side,
                    float(np.abs(ref["scores"][a] - oth["scores"][b]).max()),
                )
            elif not same:
                worst = max(worst, 1.0)
        return worst, float(agree), len(reference)

    def plot(self, scores, classes, examples, path: Path) -> Path:
        """Test images with the true boxes (white) and confident predictions (coloured)."""
        import matplotlib.patches as patches

        plt = pyplot()

        images, predicted, truth = examples
        k = len(images)
        fig, axes = plt.subplots(1, k, figsize=(2.2 * k, 2.6), squeeze=False)
        colours = plt.get_cmap("tab10")
        for j in range(k):
            ax = axes[0][j]
            ax.imshow(np.clip(images[j].transpose(1, 2, 0), 0, 1))
            for x0, y0, x1, y1 in truth[j]["boxes"]:
                ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                               edgecolor="white", linestyle="--", linewidth=1))  # fmt: skip
            d = predicted[j]
            for box, label, score in zip(d["boxes"], d["labels"], d["scores"], strict=True):
                if score < CONFIDENT:
                    continue
                x0, y0, x1, y1 = box
                c = colours(int(label) % 10)
                ax.add_patch(patches.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False,
                                               edgecolor=c, linewidth=1.5))  # fmt: skip
                name = classes[int(label) - 1] if 1 <= label <= len(classes) else str(label)
                ax.text(x0, y0, f"{name} {score:.2f}", color="white", fontsize=6,
                        backgroundcolor=c, va="bottom")  # fmt: skip
            ax.set_axis_off()
        fig.suptitle(f"mAP@.5 {scores.score:.3f} (white: truth)")
        return save_figure(fig, path)

    def export_onnx(self, net, path, image_size, opset=18):
        example = ([torch.rand(3, image_size, image_size)],)
        axes = {"images": {1: "height", 2: "width"}, **{k: {0: "detections"} for k in OUTPUTS}}
        return onnx_export(
            _Outputs(net).eval(), example, path, list(OUTPUTS), axes, opset, legacy=LEGACY_EXPORT
        )

    def export_torchscript(self, net, path, image_size):
        torch.jit.save(torch.jit.script(net.eval()), str(path))
        return path

    def example_output(self, predict, image_size):
        return None  # a list of dicts per batch: no MLflow schema describes it
