"""Detection and segmentation metrics on known predictions: what each metric rewards."""

from __future__ import annotations

import numpy as np
import pytest
import torch


def test_detection_metric_rewards_right_boxes_and_parity_catches_wrong_labels():
    from visionflow.vision.tasks import get_task

    task = get_task("detection")
    truth = [{"boxes": np.array([[4.0, 4.0, 30.0, 30.0]], np.float32), "labels": np.array([2])}]
    images = [torch.zeros(3, 32, 32)]

    def predicting(box, label):
        return lambda x: [{"boxes": np.array([box], np.float32), "labels": np.array([label]),
                           "scores": np.array([0.9], np.float32)}]  # fmt: skip

    loader = [(images, [{k: torch.from_numpy(v) for k, v in truth[0].items()}])]
    right, _ = task.evaluate(predicting([4, 4, 30, 30], 2), loader, ["a", "b"])
    wrong_place, _ = task.evaluate(predicting([20, 20, 31, 31], 2), loader, ["a", "b"])
    wrong_class, _ = task.evaluate(predicting([4, 4, 30, 30], 1), loader, ["a", "b"])
    assert right.score == pytest.approx(1.0)
    assert wrong_place.score == 0.0 and wrong_class.score == 0.0
    same = task.compare_batch(
        predicting([4, 4, 30, 30], 2)(None), predicting([4, 4, 30, 30], 2)(None)
    )
    other = task.compare_batch(
        predicting([4, 4, 30, 30], 2)(None), predicting([4, 4, 30, 30], 1)(None)
    )
    assert same == (0.0, 1.0, 1) and other[1] == 0.0


def test_segmentation_metric_ignores_255_and_counts_the_background():
    from visionflow.vision.tasks import get_task

    task = get_task("segmentation")
    masks = torch.zeros(1, 4, 4, dtype=torch.long)
    masks[0, :2, :2] = 1  # class 0 (label 1) in one corner
    masks[0, 3, 3] = 255  # ignored

    def logits_for(pred):
        return lambda x: np.eye(3, dtype=np.float32)[pred].transpose(0, 3, 1, 2)

    loader = [(torch.zeros(1, 3, 4, 4), masks)]
    perfect = masks.clone().numpy()
    perfect[perfect == 255] = 2  # a wrong guess on an ignored pixel costs nothing
    s, _ = task.evaluate(logits_for(perfect), loader, ["a", "b"])
    assert s.score == pytest.approx(1.0) and s.metrics["pixel_acc"] == pytest.approx(1.0)
    assert np.isnan(s.per_class["b"]["iou"])  # neither present nor predicted: left out
    half = perfect.copy()
    half[0, :2, 0] = 0  # 2 of the 4 class pixels called background
    s, _ = task.evaluate(logits_for(half), loader, ["a", "b"])
    assert s.per_class["a"]["iou"] == pytest.approx(0.5)
    assert s.per_class["background"]["iou"] == pytest.approx(11 / 13)
    assert s.score == pytest.approx((0.5 + 11 / 13) / 2)
