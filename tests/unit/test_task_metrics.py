"""The tasks' metrics and reports: main metric by name, bounded reports at 1,000 classes, parity
that refuses NaN, and how ONNX files are exported."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from torch import nn

from visionflow.kfp.reports import evaluation_html
from visionflow.results import EvaluateResult
from visionflow.steps.evaluate import report_markdown
from visionflow.vision.tasks import get_task
from visionflow.vision.tasks.base import exporter_of


def _one_hot_logits(classes: int):
    """A predictor whose logits pick the class an image's first pixel names."""
    return lambda x: np.eye(classes, dtype=np.float32)[x[:, 0, 0, 0].astype(np.int64)]


def _classification_loader(truth, predicted, batch=256):
    """Batches of 1x1 images whose first pixel is the class to predict, and the true labels."""
    images = torch.tensor(predicted, dtype=torch.float32).reshape(-1, 1, 1, 1).expand(-1, 3, 1, 1)
    labels = torch.tensor(truth)
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, len(labels), batch)]


def _perfect(task: str):
    """A loader and a predictor that gets every image right, for each task (classes a, b)."""
    if task == "classification":
        truth = [0, 1, 1, 0]
        return _classification_loader(truth, truth), _one_hot_logits(2)
    if task == "segmentation":
        masks = torch.zeros(1, 4, 4, dtype=torch.long)
        masks[0, :2, :2] = 1
        predicted = masks.numpy()
        return [(torch.zeros(1, 3, 4, 4), masks)], lambda x: np.eye(3, dtype=np.float32)[
            predicted
        ].transpose(0, 3, 1, 2)
    box = np.array([[4.0, 4.0, 30.0, 30.0]], np.float32)
    target = {"boxes": torch.from_numpy(box), "labels": torch.tensor([1])}
    found = {"boxes": box, "labels": np.array([1]), "scores": np.array([0.9], np.float32)}
    return [([torch.zeros(3, 32, 32)], [target])], lambda x: [found]


@pytest.mark.parametrize("task", ["classification", "detection", "segmentation"])
def test_the_main_metric_is_reported_under_its_name(task):
    """The gate, the registry and MLflow's `test/<metric>` read the main metric by name."""
    t = get_task(task)
    loader, predict = _perfect(task)
    scores, _ = t.evaluate(predict, loader, ["a", "b"])
    assert scores.metrics[t.metric] == pytest.approx(1.0)


def test_a_1000_class_evaluation_has_a_bounded_picture_and_names_the_top_confusions(tmp_path):
    classes = [f"class{i:03d}" for i in range(1000)]
    truth = np.arange(3000) % 1000
    predicted = truth.copy()
    predicted[[7, 1007, 2007]] = 42  # every class007 image called class042
    predicted[[500, 1500]] = 9  # two class500 images called class009
    predicted[999] = 0
    task = get_task("classification")
    loader = _classification_loader(truth.tolist(), predicted.tolist())
    scores, examples = task.evaluate(_one_hot_logits(1000), loader, classes)
    assert scores.score == pytest.approx(2994 / 3000)
    assert scores.num_samples == 3000 and scores.per_class["class500"]["recall"] == pytest.approx(
        1 / 3
    )
    assert not any("/" in name for name in scores.metrics)  # no 3,000 per-class MLflow metrics

    png = task.plot(scores, classes, examples, tmp_path / task.figure)
    with Image.open(png) as image:
        assert max(image.size) <= 1000

    result = EvaluateResult(
        task=task.name, metric=task.metric, score=scores.score, gate_passed=True, gate="passed", min_score=0.0,
        classes=classes, metrics=scores.metrics, per_class=scores.per_class,
        confusion=scores.confusion, figure_png=str(png), num_samples=scores.num_samples,
    )  # fmt: skip
    top = report_markdown(result).split("Top confusions:")[1].splitlines()
    assert [line for line in top if line.startswith("| class")] == [
        "| class007 | class042 | 3 |",
        "| class500 | class009 | 2 |",
        "| class999 | class000 | 1 |",
    ]
    page = evaluation_html(SimpleNamespace(storage=SimpleNamespace(endpoint=None)), result)
    assert "<td>class007</td><td>class042</td><td>3</td>" in page


def test_a_small_confusion_matrix_keeps_its_class_names(tmp_path):
    """Up to 30 classes the figure is the labelled grid, which grows with the class count."""
    task = get_task("classification")
    sizes = []
    for n in (3, 30):
        classes = [f"c{i}" for i in range(n)]
        truth = list(range(n))
        scores, examples = task.evaluate(
            _one_hot_logits(n), _classification_loader(truth, truth), classes
        )
        assert f"precision/c{n - 1}" in scores.metrics
        with Image.open(task.plot(scores, classes, examples, tmp_path / f"{n}.png")) as image:
            sizes.append(image.size[0])
    assert sizes[0] < sizes[1]


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_outputs_that_are_not_finite_fail_parity(task, bad):
    t = get_task(task)
    loader, reference = _perfect(task)

    def broken(x):
        out = reference(x).copy()
        out.flat[0] = bad
        return out

    for ref, other in ((reference, broken), (broken, broken)):
        assert t.parity(ref, other, loader).problem(atol=1e-4, min_agreement=0.0) is not None


def test_detections_that_are_not_finite_fail_parity():
    t = get_task("detection")
    loader, reference = _perfect("detection")

    def broken(x):
        (d,) = reference(x)
        return [{**d, "boxes": d["boxes"] + np.float32(np.nan)}]

    parity = t.parity(reference, broken, loader)
    assert parity.problem(atol=1e-2, min_agreement=0.0) is not None


class _Branching(nn.Module):
    """A network whose output depends on its input's values through Python control flow:
    torch.export refuses it, tracing freezes the branch taken."""

    def forward(self, x):
        if x.mean() > 0.5:
            return x.flatten(1)[:, :4] * 2
        return x.flatten(1)[:, :4]


def test_onnx_goes_through_torch_export_with_a_dynamic_batch(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten()).eval()
    path = get_task("classification").export_onnx(net, tmp_path / "m.onnx", 16)
    assert exporter_of(path) == "dynamo"
    session = ort.InferenceSession(str(path))
    for batch in (1, 5):
        x = np.random.rand(batch, 3, 16, 16).astype(np.float32)
        (out,) = session.run(None, {"images": x})
        np.testing.assert_allclose(out, net(torch.from_numpy(x)).detach().numpy(), atol=1e-5)


def test_onnx_falls_back_to_the_legacy_exporter_and_says_why(tmp_path):
    path = get_task("classification").export_onnx(_Branching().eval(), tmp_path / "m.onnx", 4)
    exporter = exporter_of(path)
    assert exporter.startswith("legacy (the dynamo exporter failed")
    (out,) = ort.InferenceSession(str(path)).run(None, {"images": np.zeros((3, 3, 4, 4), "f")})
    assert out.shape == (3, 4)
