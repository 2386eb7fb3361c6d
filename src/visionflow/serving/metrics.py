"""Prometheus metrics of `visionflow serve`, and how two versions' answers are compared.

Everything is in the service's own CollectorRegistry, so two services in one process (tests)
never share counts and /metrics shows only what this service measured. Requests and latency
are by route, model, version and variant (fp32 | int8); batches, queue time and model-call
time by version; the A/B arm each request went to, the classes predicted, and in shadow mode
how often the challenger agrees with the champion.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from visionflow.serving.model import Spec

VERSION = ("model", "version", "variant")
# Seconds: from a fraction of a millisecond (a tiny model's call) to the 10 s default timeout.
LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
# A detection counts as predicted, and in the comparison of two versions, from this score on.
CONFIDENT = 0.5

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "visionflow_requests",
            "Requests by route, model, answering version and variant, and status code",
            ["route", *VERSION, "code"],
            registry=r,
        )
        self.latency = Histogram(
            "visionflow_request_seconds",
            "Time from routing to the answer (excluding the upload itself)",
            ["route", *VERSION],
            buckets=LATENCY,
            registry=r,
        )
        self.batch_size = Histogram(
            "visionflow_batch_size", "Images per model call", VERSION, buckets=BATCH, registry=r
        )
        self.queue = Histogram(
            "visionflow_queue_seconds",
            "Time a request's images waited for their model call",
            VERSION,
            buckets=LATENCY,
            registry=r,
        )
        self.model = Histogram(
            "visionflow_model_seconds",
            "Duration of one model call (one batch)",
            VERSION,
            buckets=LATENCY,
            registry=r,
        )
        self.queued = Gauge(
            "visionflow_queue_images", "Images waiting for a model call now", VERSION, registry=r
        )
        self.arms = Counter(
            "visionflow_arm_requests",
            "Requests routed by alias (the A/B arms of serve.split)",
            ["model", "alias", "version"],
            registry=r,
        )
        self.predicted = Counter(
            "visionflow_predicted_class",
            "Predicted classes: top-1 (classification), confident boxes' labels (detection), "
            "the largest non-background class (segmentation)",
            ["model", "version", "class"],
            registry=r,
        )
        shadow = ["model", "champion", "challenger"]
        self.shadow_images = Counter(
            "visionflow_shadow_images", "Images compared in shadow mode", shadow, registry=r
        )
        self.shadow_agreement = Counter(
            "visionflow_shadow_agreement",
            "Sum over compared images of the challenger's agreement with the champion (0..1)",
            shadow,
            registry=r,
        )
        self.shadow_rate = Gauge(
            "visionflow_shadow_agreement_rate",
            "Share of agreement so far: classification same top-1, segmentation same pixel "
            "class, detection same set of confident labels",
            shadow,
            registry=r,
        )
        self.shadow_skipped = Counter(
            "visionflow_shadow_skipped",
            "Shadow copies not compared (the challenger's queue was full or it failed)",
            [*shadow, "reason"],
            registry=r,
        )
        self.loaded = Gauge(
            "visionflow_loaded_version",
            "1 for each version loaded now, labelled with the aliases it serves",
            [*VERSION, "aliases"],
            registry=r,
        )
        self._shadow_totals: dict[tuple[str, str, str], tuple[int, float]] = {}

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def shadow(self, model: str, champion: int, challenger: int, agreement: list[float]) -> None:
        labels = (model, str(champion), str(challenger))
        self.shadow_images.labels(*labels).inc(len(agreement))
        self.shadow_agreement.labels(*labels).inc(sum(agreement))
        seen, agreed = self._shadow_totals.get(labels, (0, 0.0))
        seen, agreed = seen + len(agreement), agreed + sum(agreement)
        self._shadow_totals[labels] = (seen, agreed)
        self.shadow_rate.labels(*labels).set(agreed / seen if seen else 0.0)


def predicted_classes(spec: Spec, output: Any) -> list[str]:
    """The classes one image's raw output predicts, for the class-distribution metric."""
    if spec.task == "classification":
        return [spec.classes[int(np.argmax(output))]]
    if spec.task == "detection":
        return [_detection_label(spec, label) for label in _confident_labels(output)]
    counts = np.bincount(np.asarray(output).argmax(0).ravel(), minlength=len(spec.classes) + 1)
    if counts[1:].sum() == 0:
        return ["background"]
    return [spec.classes[int(np.argmax(counts[1:]))]]


def agreement(task: str, champion: Any, challenger: Any) -> float:
    """How far two versions' raw outputs for one image agree, from 0 to 1."""
    if task == "classification":
        return float(np.argmax(champion) == np.argmax(challenger))
    if task == "detection":
        return float(_confident_labels(champion) == _confident_labels(challenger))
    a, b = np.asarray(champion).argmax(0), np.asarray(challenger).argmax(0)
    if a.shape != b.shape:  # versions trained at other sizes: no pixel-wise comparison
        return 0.0
    return float((a == b).mean())


def _confident_labels(output: dict[str, Any]) -> set[int]:
    scores = np.asarray(output["scores"])
    return {int(label) for label in np.asarray(output["labels"])[scores >= CONFIDENT]}


def _detection_label(spec: Spec, label: int) -> str:
    return spec.classes[label - 1] if 0 < label <= len(spec.classes) else "?"
