"""A registered model version, loaded for serving and batch inference.

`ModelRef.parse` reads `name`, `name@alias` or `name/version`; `resolve` turns it into a version
number with the MLflow client; `load_version` downloads that version's files and opens its ONNX
files with the ONNX Runtime settings quantize measured with (`sessions.ort_session`).
A `LoadedVersion` preprocesses images as evaluate did (its recorded `transforms.eval`), runs a
batch, and describes each image's outputs as JSON: labels, boxes, or a mask.
"""

from __future__ import annotations

import base64
import io
import logging
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from visionflow.host import describe_host, host_cpu
from visionflow.sessions import ort_session
from visionflow.vision.images import Preprocess
from visionflow.vision.inference import bench

log = logging.getLogger("visionflow.serve")

VARIANTS = ("auto", "fp32", "int8")
_REF = re.compile(r"^(?P<name>[A-Za-z0-9][\w.\-]*)(?:@(?P<alias>[\w\-]+)|/(?P<version>\d+))?$")


class ModelNotFound(LookupError):
    """No such registered model, version or alias."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None = None
    version: int | None = None

    @classmethod
    def parse(cls, text: str) -> ModelRef:
        m = _REF.match(text.strip())
        if not m:
            raise ValueError(
                f"model {text!r}: expected NAME, NAME@ALIAS or NAME/VERSION "
                "(e.g. visionflow-shapes@champion)"
            )
        version = m["version"]
        return cls(m["name"], m["alias"], int(version) if version else None)

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        return f"{self.name}/{self.version}" if self.version is not None else self.name


def resolve(client, ref: ModelRef) -> int:
    """The version number `ref` names now: the alias's, the given one, or the latest."""
    from mlflow.exceptions import MlflowException

    try:
        if ref.alias:
            return int(client.get_model_version_by_alias(ref.name, ref.alias).version)
        if ref.version is not None:
            return int(client.get_model_version(ref.name, str(ref.version)).version)
        versions = client.search_model_versions(f"name = '{ref.name}'")
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            raise ModelNotFound(f"model {ref}: not in the registry ({err.message})") from None
        raise
    if not versions:
        raise ModelNotFound(f"model {ref.name}: not in the registry")
    return max(int(v.version) for v in versions)


@dataclass
class Spec:
    """What a version's registration recorded about its input and outputs."""

    task: str
    classes: list[str]
    image_size: int
    preprocess: list[dict[str, Any]] | None
    default_variant: str

    @classmethod
    def from_model_config(cls, config: dict[str, Any]) -> Spec:
        return cls(
            task=config.get("task", "classification"),
            classes=list(config.get("classes", [])),
            image_size=int(config["image_size"]),
            preprocess=config.get("preprocess"),
            default_variant=config.get("variant", "fp32"),
        )


@dataclass
class LoadedVersion:
    name: str
    version: int
    spec: Spec
    variant: str  # the file this version runs: fp32 or int8
    reason: str  # why that variant
    sessions: dict[str, Any]  # variant -> onnxruntime.InferenceSession
    files: dict[str, Path]
    tags: dict[str, str] = field(default_factory=dict)
    _preprocess: Preprocess | None = None

    @property
    def session(self):
        return self.sessions[self.variant]

    @property
    def input_shape(self) -> list[int]:
        """(-1 for the batch) 3, H, W for dense tasks; detection takes one image (3, H, W)."""
        size = self.spec.image_size
        return [3, size, size] if self.spec.task == "detection" else [-1, 3, size, size]

    def preprocess(self, image: Image.Image) -> np.ndarray:
        if self._preprocess is None:
            self._preprocess = Preprocess(
                self.spec.preprocess, self.spec.image_size, self.spec.task
            )
        return self._preprocess(image)

    def infer(self, batch: np.ndarray) -> list[Any]:
        """Raw outputs, one per image: logits (dense tasks) or {"boxes", "labels", "scores"}."""
        name = self.session.get_inputs()[0].name
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if self.spec.task != "detection":
            return list(self.session.run(None, {name: batch})[0])
        outs = []
        for image in batch:  # the detection graph takes one image at a time
            boxes, labels, scores = self.session.run(None, {name: image})
            outs.append({"boxes": boxes, "labels": labels, "scores": scores})
        return outs

    def describe(self, output: Any, original_size: tuple[int, int], top_k: int = 5) -> dict:
        """One image's output as JSON, in the original image's pixels ((width, height))."""
        return describe(self.spec, output, original_size, top_k)


def describe(spec: Spec, output: Any, original_size: tuple[int, int], top_k: int) -> dict:
    width, height = original_size
    if spec.task == "classification":
        logits = np.asarray(output, dtype=np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        best = np.argsort(-p, kind="stable")[:top_k]
        return {"labels": [{"label": spec.classes[i], "score": float(p[i])} for i in best]}
    if spec.task == "detection":
        size = spec.image_size
        scale = np.array([width / size, height / size, width / size, height / size])
        boxes = []
        for box, label, score in zip(
            output["boxes"], output["labels"], output["scores"], strict=True
        ):
            xyxy = np.clip(np.asarray(box, dtype=np.float64) * scale, 0, [width, height] * 2)
            name = spec.classes[int(label) - 1] if 0 < int(label) <= len(spec.classes) else "?"
            boxes.append(
                {"box": [round(float(v), 2) for v in xyxy], "label": name, "score": float(score)}
            )
        return {"boxes": boxes}
    # segmentation: class 0 is the background, class k + 1 is classes[k]
    mask = np.asarray(output).argmax(0).astype(np.uint8)
    mask_image = Image.fromarray(mask, "L").resize((width, height), Image.NEAREST)
    full = np.asarray(mask_image)
    names = ["background", *spec.classes]
    counts = np.bincount(full.ravel(), minlength=len(names))[: len(names)]
    buf = io.BytesIO()
    mask_image.save(buf, format="PNG")
    return {
        "mask_png": base64.b64encode(buf.getvalue()).decode("ascii"),
        "class_share": {n: float(c / full.size) for n, c in zip(names, counts, strict=True)},
    }


def load_version(
    name: str,
    version: int,
    variant: str = "auto",
    threads: int | None = None,
    batch_size: int = 32,
    workdir: Path | None = None,
) -> LoadedVersion:
    """Download a registered version and open its ONNX files; choose its variant.

    `auto` runs int8 only where this host runs it faster than fp32, at batch 1 and at
    `batch_size`, timed side by side now (quantize's timing was on its own host).
    """
    import mlflow

    if variant not in VARIANTS:
        raise ValueError(f"serve.variant={variant!r}: one of {', '.join(VARIANTS)}")
    client = mlflow.MlflowClient()
    mv = client.get_model_version(name, str(version))
    dst = Path(tempfile.mkdtemp(prefix=f"{name}-v{version}-", dir=workdir))
    local = Path(
        mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=dst)
    )
    model = mlflow.models.Model.load(local)
    pyfunc = model.flavors.get("python_function", {})
    spec = Spec.from_model_config(pyfunc.get("config") or {})  # register's model_config
    files = {p.name: p for p in local.rglob("*.onnx")}
    paths = {"fp32": files.get("model.onnx"), "int8": files.get("model.int8.onnx")}
    if paths["fp32"] is None:
        raise ModelNotFound(f"model {name}/{version}: no model.onnx among its files")
    if variant == "int8" and paths["int8"] is None:
        raise ValueError(f"model {name}/{version} has no int8 file; use serve.variant=fp32")
    wanted = [variant] if variant != "auto" else [v for v in ("fp32", "int8") if paths[v]]
    sessions = {v: ort_session(paths[v], threads) for v in wanted}
    loaded = LoadedVersion(
        name, int(version), spec, wanted[0], "", sessions,
        {k: v for k, v in paths.items() if v}, dict(mv.tags),
    )  # fmt: skip
    if variant != "auto":
        loaded.reason = f"serve.variant={variant}"
    elif len(wanted) == 1:
        loaded.reason = "the version has no int8 file"
    else:
        loaded.variant, loaded.reason = _faster(loaded, batch_size)
        del sessions["fp32" if loaded.variant == "int8" else "int8"]
    log.info("%s v%d runs %s: %s", name, version, loaded.variant, loaded.reason)
    return loaded


def _faster(loaded: LoadedVersion, batch_size: int, repeats: int = 10) -> tuple[str, str]:
    """int8 where it is faster than fp32 here at batch 1 and `batch_size`, timed side by side."""
    rng = np.random.default_rng(0)
    size = loaded.spec.image_size
    ratios = {}
    for b in sorted({1, batch_size}):
        batch = rng.random((b, 3, size, size), dtype=np.float32)
        ms = bench(loaded.sessions, batch, repeats)
        ratios[b] = ms["fp32"] / ms["int8"]
    said = ", ".join(f"{r:.2f}x fp32's speed at batch {b}" for b, r in ratios.items())
    where = describe_host(host_cpu())
    if all(r > 1 for r in ratios.values()):
        return "int8", f"int8 runs at {said} on this host, {where}"
    return "fp32", f"int8 is not faster here ({said}) on this host, {where}"
