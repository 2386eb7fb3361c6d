"""predict: a registered model over a directory or an S3 prefix of images, into Parquet.

The input is listed once, recursively and sorted (image extensions only), and cut into shards of
`predict.shard_size` images. That listing, the shard size and the model version it resolved
(`name@alias` is resolved once, when the run starts) are stored first, as the run's plan
(`_plan.json` beside the predictions), so the run can be killed and rerun with the same run_id:
the rerun follows the stored plan, with the same images in the same shards and the same model
version and variant even if the alias has moved meanwhile, and skips every shard whose file is
already there. A shard's file is written whole and then put in the store in one step (the store
never shows half a file), so "the file exists" means "the shard is done".

One Parquet file per shard (`part-00000.parquet`, ...), one row per decodable image: its key (its
path relative to the input), the model's name, version and variant, the image's size, and the
task's outputs as typed columns (classification: `label`, `score`, `top_k`; detection: `boxes`;
segmentation: `mask_png`, `class_share`). Only one shard's images and rows are in memory at a
time. Each file's footer records its shard's undecodable images and class counts, so a resumed
run reports the whole run without reading finished shards' rows again.

Undecodable images are listed, with the reason, in the result and in `_bad_images.json`; past
`predict.max_bad_fraction` the step fails naming them (the finished shards are kept). The
throughput and a class histogram (top-1 labels, box labels, or mean pixel shares) go to MLflow,
under the run of this run_id, and to the Kubeflow UI (the component's metrics and report).
"""

from __future__ import annotations

import base64
import json
import logging
import re
import tempfile
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from visionflow.core.config import ConfigError
from visionflow.host import usable_cpus
from visionflow.storage import ArtifactStore, LocalStore, StorageError, StorageUnreachable

log = logging.getLogger("visionflow.predict")

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")
VARIANTS = ("auto", "fp32", "int8")
# Beside the shards; pyarrow.dataset and Spark skip names that start with "_".
PLAN, BAD_IMAGES, HISTOGRAM_PNG = "_plan.json", "_bad_images.json", "_class_histogram.png"
SHARD_META = b"visionflow.shard"  # a shard file's footer: its bad images and class counts
MAX_NAMED = 20  # bad images named in an error message (all of them are in _bad_images.json)
HISTOGRAM_KIND = {
    "classification": "top-1 predictions per class",
    "detection": "boxes per label",
    "segmentation": "mean share of the image per class",
}


class PredictError(RuntimeError):
    """Batch inference cannot run or finish: bad input, too many undecodable images."""


@dataclass
class PredictResult:
    model_name: str
    model_version: int  # the version this run used: resolved once, when it started
    variant: str  # fp32 or int8
    task: str
    input: str
    output: str  # where the shards are: part-00000.parquet, ... (and _plan.json, _bad_images.json)
    images: int  # image files in the plan
    predicted: int  # rows written: the images that could be decoded
    shards: int
    shards_skipped: int  # finished by an earlier attempt of this run, not redone
    bad_images: list[dict[str, str]] = field(default_factory=list)  # {key, reason}
    bad_images_uri: str = ""
    histogram_kind: str = ""
    histogram: dict[str, float] = field(default_factory=dict)
    histogram_png: str = ""
    images_per_s: float = 0.0  # this attempt's: images it read per second (0: nothing left)
    seconds: float = 0.0  # this attempt's time on shards
    mlflow_run_id: str = ""


def check_config(cfg) -> None:
    """The values of `predict.*` that make sense, checked before any work (ConfigError)."""
    p = cfg.predict
    for key in ("shard_size", "batch_size", "top_k"):
        if int(p[key]) < 1:
            raise ConfigError(f"predict.{key}={p[key]}: it must be at least 1")
    if not 0.0 <= float(p.max_bad_fraction) <= 1.0:
        raise ConfigError(
            f"predict.max_bad_fraction={p.max_bad_fraction}: a share of the images, 0 to 1"
        )
    if p.variant not in VARIANTS:
        raise ConfigError(f"predict.variant={p.variant!r}: one of {', '.join(VARIANTS)}")
    if p.model:
        from visionflow.serving.model import ModelRef

        try:
            ModelRef.parse(p.model)
        except ValueError as err:
            raise ConfigError(f"predict.model: {err}") from None


# -- where images come from and predictions go ----------------------------------------------


@dataclass
class Input:
    """The images: a local directory or an S3 prefix, as a store and a key prefix."""

    uri: str
    store: ArtifactStore
    prefix: str  # "" or "<dir>/"

    @classmethod
    def open(cls, uri: str, endpoint: str | None) -> Input:
        from visionflow.storage import open_store

        if uri.startswith("s3://"):
            parsed = urlparse(uri)
            prefix = parsed.path.strip("/")
            return cls(uri, open_store(f"s3://{parsed.netloc}", endpoint), prefix and prefix + "/")
        if "://" in uri:
            raise PredictError(
                f"predict.input={uri}: expected a local directory or s3://bucket/prefix"
            )
        path = Path(uri).expanduser()
        if not path.is_dir():
            what = "is not a directory" if path.exists() else "does not exist"
            raise PredictError(f"predict.input={uri}: {what}")
        return cls(uri, LocalStore(path), "")

    def list(self) -> list[str]:
        """The image files' keys relative to the input, sorted; fails when there are none."""
        found = self.store.list(self.prefix)
        keys = [k[len(self.prefix) :] for k in found if k.lower().endswith(IMAGE_EXTS)]
        if not found:
            where = "no objects under that prefix" if self.prefix or "://" in self.uri else "empty"
            raise PredictError(f"predict.input={self.uri}: no images there ({where})")
        if not keys:
            raise PredictError(
                f"predict.input={self.uri}: none of its {len(found)} files is an image "
                f"(by extension: {', '.join(IMAGE_EXTS)})"
            )
        if skipped := len(found) - len(keys):
            log.info(
                "%s: %d files that are not images by their extension left out", self.uri, skipped
            )
        return sorted(keys)

    def read(self, key: str) -> bytes:
        return self.store.get_bytes(self.prefix + key)


def output_location(cfg) -> tuple[ArtifactStore, str]:
    """(store, key prefix) for this run's shards: predict.output, or predictions/<run_id>/ in
    the artifact store. predict.output is s3://bucket/prefix or a local directory."""
    from visionflow.storage import open_store

    out = cfg.predict.output
    if not out:
        return open_store(cfg.storage.root, cfg.storage.endpoint), f"predictions/{cfg.run_id}"
    if out.startswith("s3://"):
        parsed = urlparse(out)
        return open_store(f"s3://{parsed.netloc}", cfg.storage.endpoint), parsed.path.strip("/")
    if "://" in out:
        raise ConfigError(f"predict.output={out}: expected a local directory or s3://bucket/prefix")
    return LocalStore(Path(out).expanduser()), ""


def _join(prefix: str, name: str) -> str:
    return f"{prefix}/{name}" if prefix else name


def shard_name(index: int) -> str:
    return f"part-{index:05d}.parquet"


# -- the plan -------------------------------------------------------------------------------


def make_plan(cfg, keys: list[str], ref, version: int, variant: str, task: str) -> dict[str, Any]:
    size = int(cfg.predict.shard_size)
    return {
        "run_id": cfg.run_id,
        "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "input": cfg.predict.input,
        "model": str(ref),
        "model_name": ref.name,
        "model_version": int(version),
        "variant": variant,
        "task": task,
        "shard_size": size,
        "top_k": int(cfg.predict.top_k),
        "images": len(keys),
        "shards": -(-len(keys) // size),
        "keys": keys,
    }


def shards_of(plan: dict[str, Any]) -> list[list[str]]:
    size, keys = plan["shard_size"], plan["keys"]
    return [keys[i : i + size] for i in range(0, len(keys), size)]


def _check_resumable(cfg, plan: dict[str, Any], where: str) -> None:
    """A rerun follows its plan; one that asks for other input or another model is refused."""
    p = cfg.predict
    if plan["run_id"] != cfg.run_id:
        raise PredictError(
            f"{where} holds the predictions of run {plan['run_id']}: rerun with "
            f"run_id={plan['run_id']} to resume it, or choose another predict.output"
        )
    if p.input and p.input != plan["input"]:
        raise PredictError(
            f"run {cfg.run_id} was started on predict.input={plan['input']}, not {p.input}: "
            "rerun it with that input (or none), or start a new run for this one"
        )
    if p.model:
        from visionflow.serving.model import ModelRef

        if ModelRef.parse(p.model).name != plan["model_name"]:
            raise PredictError(
                f"run {cfg.run_id} was started with predict.model={plan['model']}, not "
                f"{p.model}: rerun it with that model (or none), or start a new run"
            )
    for key in ("shard_size", "top_k"):
        if int(p[key]) != plan[key]:
            log.info("run %s keeps the %s of its plan, %s (not predict.%s=%s): the same "
                     "shards as before", cfg.run_id, key, plan[key], key, p[key])  # fmt: skip


# -- one shard ------------------------------------------------------------------------------


def _schema(task: str):
    import pyarrow as pa

    scored = pa.struct([("label", pa.string()), ("score", pa.float64())])
    outputs = {
        "classification": [("label", pa.string()), ("score", pa.float64()),
                           ("top_k", pa.list_(scored))],
        "detection": [("boxes", pa.list_(pa.struct([("box", pa.list_(pa.float64())),
                                                    ("label", pa.string()),
                                                    ("score", pa.float64())])))],
        "segmentation": [("mask_png", pa.binary()),
                         ("class_share", pa.map_(pa.string(), pa.float64()))],
    }[task]  # fmt: skip
    common = [("key", pa.string()), ("model_name", pa.string()), ("model_version", pa.int64()),
              ("variant", pa.string()), ("width", pa.int32()), ("height", pa.int32())]  # fmt: skip
    return pa.schema(common + outputs)


def _task_columns(task: str, described: dict[str, Any]) -> dict[str, Any]:
    if task == "classification":
        labels = described["labels"]
        return {"label": labels[0]["label"], "score": labels[0]["score"], "top_k": labels}
    if task == "detection":
        return {"boxes": described["boxes"]}
    return {
        "mask_png": base64.b64decode(described["mask_png"]),
        "class_share": list(described["class_share"].items()),
    }


def _count(task: str, described: dict[str, Any], histogram: Counter) -> None:
    """Classification: the top-1 label; detection: each box's label; segmentation: the sum of
    each class's share (divided by the image count for the mean)."""
    if task == "classification":
        histogram[described["labels"][0]["label"]] += 1
    elif task == "detection":
        histogram.update(b["label"] for b in described["boxes"])
    else:
        for name, share in described["class_share"].items():
            histogram[name] += share


def _prefetched(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, ahead: int) -> Iterator:
    """fn(item) for each item, in order, at most `ahead` of them running or done ahead."""
    pending: deque[Future] = deque()
    it = iter(items)
    for item in it:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            break
    while pending:
        result = pending.popleft().result()
        for item in it:
            pending.append(pool.submit(fn, item))
            break
        yield result


def _batched(items: Iterable, n: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == n:
            yield batch
            batch = []
    if batch:
        yield batch


def run_shard(loaded, source: Input, keys: list[str], plan: dict[str, Any], batch_size: int,
              pool: ThreadPoolExecutor, max_pixels: int | None):  # fmt: skip
    """Predict one shard: (pyarrow table, its bad images, its class histogram)."""
    import numpy as np
    import pyarrow as pa

    from visionflow.vision.images import ImageError, ImageTooLarge, decode_image

    def load(key: str):
        try:
            image = decode_image(source.read(key), max_pixels)
        except StorageUnreachable:
            raise  # the store, not the image: the step retries
        except (ImageError, ImageTooLarge, StorageError) as err:
            return key, None, f"{type(err).__name__}: {err}"
        return key, loaded.preprocess(image), image.size

    task, top_k = plan["task"], plan["top_k"]
    rows, bad, histogram = [], [], Counter()
    loads = _prefetched(pool, load, keys, ahead=2 * batch_size)
    for batch in _batched(loads, batch_size):
        good = []
        for key, array, info in batch:
            if array is None:
                bad.append({"key": key, "reason": info})
            else:
                good.append((key, array, info))
        if not good:
            continue
        outputs = loaded.infer(np.stack([array for _, array, _ in good]))
        for (key, _, (width, height)), output in zip(good, outputs, strict=True):
            described = loaded.describe(output, (width, height), top_k)
            _count(task, described, histogram)
            rows.append({"key": key, "model_name": plan["model_name"],
                         "model_version": plan["model_version"], "variant": plan["variant"],
                         "width": width, "height": height, **_task_columns(task, described)})  # fmt: skip
    table = pa.Table.from_pylist(rows, schema=_schema(task))
    return table, bad, dict(histogram)


def _write_shard(store: ArtifactStore, key: str, table, meta: dict[str, Any]) -> str:
    """Write the shard's file whole, then put it in the store in one step."""
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata({SHARD_META: json.dumps(meta).encode()})
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(tmp) / Path(key).name
        pq.write_table(table, local)
        return store.put_file(local, key)


def _read_shard_meta(store: ArtifactStore, key: str, where: str) -> dict[str, Any]:
    """A finished shard's footer record (its bad images and histogram), without its rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(pa.BufferReader(store.get_bytes(key)))
        return json.loads(schema.metadata[SHARD_META])
    except (pa.ArrowInvalid, KeyError, TypeError, ValueError) as err:
        raise PredictError(
            f"{where} is not a shard this step wrote ({type(err).__name__}: {err}); delete it to "
            "have the shard predicted again"
        ) from None


# -- the step -------------------------------------------------------------------------------


def predict(cfg) -> PredictResult:
    """Predict every image of predict.input with predict.model; resumes a killed run."""
    import mlflow

    from visionflow import tracking
    from visionflow.serving.model import ModelRef, load_version, resolve

    check_config(cfg)
    p = cfg.predict
    out_store, out_prefix = output_location(cfg)
    plan_key = _join(out_prefix, PLAN)
    where = out_store.uri(out_prefix) if out_prefix else out_store.root
    tracking.setup(cfg)  # the registry is the tracking server's
    with tempfile.TemporaryDirectory(prefix="visionflow-predict-") as tmp:
        if out_store.exists(plan_key):
            plan = json.loads(out_store.get_bytes(plan_key))
            _check_resumable(cfg, plan, where)
            source = Input.open(plan["input"], cfg.storage.endpoint)
            loaded = load_version(plan["model_name"], plan["model_version"], plan["variant"],
                                  batch_size=int(p.batch_size), workdir=Path(tmp))  # fmt: skip
            log.info(
                "run %s resumes its plan of %s: %s v%d (%s), %d images in %d shards",
                cfg.run_id, plan["created_at"], plan["model_name"], plan["model_version"],
                plan["variant"], plan["images"], plan["shards"],
            )  # fmt: skip
        else:
            if not p.model:
                raise ConfigError(
                    "predict.model is not set: name a registered model, e.g. "
                    "predict.model=visionflow-shapes@champion (or name/3, or name for the latest)"
                )
            if not p.input:
                raise ConfigError(
                    "predict.input is not set: a directory of images or s3://bucket/prefix"
                )
            source = Input.open(p.input, cfg.storage.endpoint)
            keys = source.list()
            ref = ModelRef.parse(p.model)
            version = resolve(mlflow.MlflowClient(), ref)
            loaded = load_version(ref.name, version, p.variant, batch_size=int(p.batch_size),
                                  workdir=Path(tmp))  # fmt: skip
            plan = make_plan(cfg, keys, ref, version, loaded.variant, loaded.spec.task)
            out_store.put_bytes(json.dumps(plan).encode(), plan_key)  # nothing before this
            log.info(
                "run %s: %s is %s v%d (%s); %d images in %d shards of %d, into %s",
                cfg.run_id, p.model, ref.name, version, loaded.variant, plan["images"],
                plan["shards"], plan["shard_size"], where,
            )  # fmt: skip
        return _run(cfg, plan, source, loaded, out_store, out_prefix, where, Path(tmp))


def _run(cfg, plan, source, loaded, out_store, out_prefix, where, tmp: Path) -> PredictResult:
    p = cfg.predict
    shards = shards_of(plan)
    histogram: Counter = Counter()
    bad: list[dict[str, str]] = []
    skipped = read = done = 0
    limit = float(p.max_bad_fraction) * plan["images"]
    started = time.perf_counter()
    threads = min(16, 2 * usable_cpus())  # decoding threads: a pod's CPU limit, not the node's
    with ThreadPoolExecutor(threads, thread_name_prefix="predict-load") as pool:
        for index, keys in enumerate(shards):
            key = _join(out_prefix, shard_name(index))
            done += len(keys)
            label = f"shard {index + 1}/{len(shards)} ({shard_name(index)})"
            if out_store.exists(key):
                meta = _read_shard_meta(out_store, key, out_store.uri(key))
                skipped += 1
                log.info("%s: finished by an earlier attempt, skipped", label)
            else:
                t0 = time.perf_counter()
                table, shard_bad, counts = run_shard(loaded, source, keys, plan,
                                                     int(p.batch_size), pool,
                                                     cfg.serve.max_pixels)  # fmt: skip
                meta = {"index": index, "images": len(keys), "rows": table.num_rows,
                        "bad": shard_bad, "histogram": counts}  # fmt: skip
                _write_shard(out_store, key, table, meta)
                read += len(keys)
                seconds = time.perf_counter() - t0
                log.info(
                    "%s: %d images (%d undecodable) in %.2f s, %.1f images/s; %d of %d done",
                    label, len(keys), len(shard_bad), seconds, len(keys) / max(seconds, 1e-9),
                    done, plan["images"],
                )  # fmt: skip
            bad += meta["bad"]
            histogram.update(meta["histogram"])
            if len(bad) > limit:
                bad_uri = _put_json(out_store, _join(out_prefix, BAD_IMAGES), bad)
                raise PredictError(_too_many_bad(cfg, plan, bad, bad_uri, index + 1))
    seconds = time.perf_counter() - started
    result = PredictResult(
        model_name=plan["model_name"],
        model_version=plan["model_version"],
        variant=plan["variant"],
        task=plan["task"],
        input=plan["input"],
        output=out_store.uri(out_prefix) if out_prefix else out_store.root,
        images=plan["images"],
        predicted=plan["images"] - len(bad),
        shards=len(shards),
        shards_skipped=skipped,
        bad_images=bad,
        histogram_kind=HISTOGRAM_KIND[plan["task"]],
        histogram=_histogram(plan, loaded.spec.classes, histogram, plan["images"] - len(bad)),
        images_per_s=read / seconds if read else 0.0,
        seconds=seconds,
    )
    result.bad_images_uri = _put_json(out_store, _join(out_prefix, BAD_IMAGES), bad)
    png = _plot(result, tmp / HISTOGRAM_PNG)
    result.histogram_png = out_store.put_file(png, _join(out_prefix, HISTOGRAM_PNG))
    result.mlflow_run_id = _log_to_mlflow(cfg, result, png)
    _save(cfg, result)
    log.info(
        "%s v%d: %d images, %d predicted, %d undecodable; %d shards (%d skipped, done before); "
        "%.1f images/s; %s: %s", result.model_name, result.model_version, result.images,
        result.predicted, len(bad), result.shards, skipped, result.images_per_s,
        result.histogram_kind, ", ".join(f"{k} {v:g}" for k, v in result.histogram.items()),
    )  # fmt: skip
    return result


def _histogram(plan, classes: list[str], totals: Counter, predicted: int) -> dict[str, float]:
    """Every class, in the model's order; segmentation's sums become means."""
    names = ["background", *classes] if plan["task"] == "segmentation" else list(classes)
    names += sorted(set(totals) - set(names))  # ("?" for a detection label out of range)
    if plan["task"] == "segmentation":
        return {n: round(totals.get(n, 0.0) / max(predicted, 1), 6) for n in names}
    return {n: float(totals.get(n, 0)) for n in names}


def _too_many_bad(cfg, plan, bad, bad_uri: str, shards_done: int) -> str:
    named = "; ".join(f"{b['key']} ({b['reason']})" for b in bad[:MAX_NAMED])
    more = f"; and {len(bad) - MAX_NAMED} more" if len(bad) > MAX_NAMED else ""
    return (
        f"{len(bad)} of the {plan['images']} images of {plan['input']} cannot be decoded, more "
        f"than predict.max_bad_fraction={cfg.predict.max_bad_fraction} allows: {named}{more}. "
        f"All are listed in {bad_uri}. The {shards_done} finished shards are kept: to finish "
        f"anyway, rerun with run_id={cfg.run_id} and a higher predict.max_bad_fraction"
    )


def _put_json(store: ArtifactStore, key: str, value: Any) -> str:
    return store.put_bytes(json.dumps(value, indent=2).encode(), key)


def _plot(result: PredictResult, path: Path) -> Path:
    from visionflow.vision.tasks.base import pyplot, save_figure

    plt = pyplot()
    names, values = list(result.histogram), list(result.histogram.values())
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(names) + 2), 3.5))
    ax.bar(range(len(names)), values, color="#3b7dd8")
    ax.set_xticks(range(len(names)), names, rotation=45 if len(names) > 6 else 0, ha="right")
    ax.set_ylabel("mean share" if result.task == "segmentation" else "count")
    ax.set_title(
        f"{result.model_name} v{result.model_version}: {result.histogram_kind}\n"
        f"({result.predicted} images)",
        fontsize=10,
    )
    return save_figure(fig, path)


def _log_to_mlflow(cfg, result: PredictResult, png: Path) -> str:
    """Figures, the histogram and its picture under the MLflow run of this run_id."""
    import mlflow
    from mlflow.entities import Metric, RunTag

    from visionflow import tracking

    run_id = tracking.run_for(cfg)
    now = int(time.time() * 1000)
    figures = {
        "predict/images": result.images,
        "predict/predicted": result.predicted,
        "predict/bad_images": len(result.bad_images),
        "predict/bad_fraction": len(result.bad_images) / max(result.images, 1),
        "predict/shards": result.shards,
        "predict/shards_skipped": result.shards_skipped,
    }
    if result.images_per_s:
        figures["predict/images_per_s"] = result.images_per_s
    for name, value in result.histogram.items():
        figures["predict/class/" + re.sub(r"[^\w\-. /]", "_", name)] = value
    tags = {"predict.model": f"{result.model_name}/{result.model_version}",
            "predict.variant": result.variant, "predict.input": result.input,
            "predict.output": result.output}  # fmt: skip
    client = mlflow.MlflowClient()
    client.log_batch(
        run_id,
        metrics=[Metric(k, float(v), now, 0) for k, v in figures.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
    )
    client.log_artifact(run_id, str(png), "predict")
    client.log_dict(run_id, result.bad_images, "predict/bad_images.json")
    return run_id


def _save(cfg, result: PredictResult) -> None:
    """The run's record (runs/<run_id>/predict.json in the artifact store), as other steps'."""
    from visionflow.runs import save_step
    from visionflow.storage import open_store

    save_step(open_store(cfg.storage.root, cfg.storage.endpoint), cfg.run_id, "predict", result)
