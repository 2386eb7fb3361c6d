"""Which version answers: sticky A/B weights, aliases that move only once the new version is
warm, versions by number kept by LRU (never an aliased one), and a version closed only after
its last request. With a stand-in registry and model files; the real ones are in
tests/integration/test_serve.py."""

from __future__ import annotations

import asyncio
import base64
import random
import threading
from types import SimpleNamespace

import numpy as np
import pytest

from visionflow.serving.batcher import Closed
from visionflow.serving.metrics import Metrics, agreement, predicted_classes
from visionflow.serving.model import LoadedVersion, ModelNotFound, ModelRef, Spec
from visionflow.serving.pool import NotReady, Pool, check_split, choose

SPEC = Spec("classification", ["a", "b", "c"], 8, None, "fp32")


class Version(LoadedVersion):
    """A version whose model answers its own number; it notes the routes at each call."""

    def infer(self, batch):
        self.calls.append((batch.shape, dict(self.pool.routes)))
        return [np.full(3, float(self.version)) for _ in batch]


class Registry:
    """Aliases and versions as the registry would resolve them; loads can be held back."""

    def __init__(self, aliases: dict[str, int], versions: set[int]) -> None:
        self.aliases, self.versions = aliases, versions
        self.loaded: list[int] = []
        self.hold: dict[int, threading.Event] = {}
        self.pool: Pool | None = None

    def resolve(self, ref: ModelRef) -> int:
        if ref.alias:
            if ref.alias not in self.aliases:
                raise ModelNotFound(f"no alias {ref.alias}")
            return self.aliases[ref.alias]
        if ref.version is not None and ref.version not in self.versions:
            raise ModelNotFound(f"model {ref}: not in the registry")
        return ref.version if ref.version is not None else max(self.versions)

    def load(self, name, version, variant, threads, batch_size, workdir):
        if version in self.hold:
            self.hold[version].wait(60)
        self.loaded.append(version)
        v = Version(name, version, SPEC, "fp32", "test", {}, {})
        v.calls, v.pool = [], self.pool
        return v


def settings(**more):
    base = dict(
        split=None,
        shadow=None,
        variant="fp32",
        threads=1,
        max_batch_size=4,
        max_delay_ms=0.0,
        queue_size=16,
        max_versions=4,
    )
    return SimpleNamespace(**{**base, **more})


def make_pool(registry: Registry, model: str = "m@champion", **more) -> Pool:
    pool = Pool(ModelRef.parse(model), settings(**more), Metrics(), registry.load, registry.resolve)
    registry.pool = pool
    return pool


def test_split_is_sticky_per_key_and_honours_the_weights():
    weights = check_split({"champion": 9, "challenger": 1})
    assert weights == {"champion": 0.9, "challenger": 0.1}
    keys = [f"user-{i}" for i in range(20000)]
    arms = [choose(weights, k) for k in keys]
    assert arms == [choose(weights, k) for k in keys]  # the same key, the same arm
    assert 0.08 < arms.count("challenger") / len(keys) < 0.12
    rng = random.Random(0)  # without a key: at random, by the same weights
    unkeyed = [choose(weights, None, rng) for _ in range(20000)]
    assert 0.08 < unkeyed.count("challenger") / len(unkeyed) < 0.12
    assert {choose({"a": 0.0, "b": 1.0}, k) for k in keys[:500]} == {"b"}


@pytest.mark.parametrize(
    ("split", "message"),
    [
        ({"champion": -1}, "weights are numbers >= 0"),
        ({"a": 0, "b": 0}, "sum to 0"),
        ({"bad alias!": 1}, "not an alias name"),
    ],
)
def test_a_split_that_cannot_work_is_refused(split, message):
    with pytest.raises(ValueError, match=message):
        check_split(split)


def test_the_pool_takes_traffic_only_once_every_labelled_version_is_warm():
    async def main():
        reg = Registry({"champion": 1, "challenger": 2}, {1, 2})
        pool = make_pool(reg, split={"champion": 0.5, "challenger": 0.5}, shadow="challenger")
        with pytest.raises(NotReady):
            pool.route("k")
        await pool.start()
        routed = [pool.route(f"k{i}") for i in range(50)]
        arms = {label for _, label in routed}
        champion = next(served for served, label in routed if label == "champion")
        shadow = pool.shadow_of(champion)
        same = pool.shadow_of(shadow)
        await pool.aclose()
        return reg, pool, arms, shadow, same

    reg, pool, arms, shadow, same = asyncio.run(main())
    assert sorted(reg.loaded) == [1, 2] and pool.ready and arms == {"champion", "challenger"}
    for v in pool.versions.values():  # warmed with one image before any traffic
        assert v.loaded.calls[0][0] == (1, 3, 8, 8)
    assert shadow.version == 2 and same is None  # no copy to the version that answered


def test_an_alias_moves_only_once_its_new_version_is_warm_and_the_old_one_finishes_its_requests():
    async def main():
        reg = Registry({"champion": 1}, {1, 2})
        pool = make_pool(reg, max_versions=1)
        await pool.start()
        old, _ = pool.route(None)
        reg.aliases["champion"] = 2
        reg.hold[2] = threading.Event()
        refreshing = asyncio.ensure_future(pool.refresh())
        while 2 not in pool._loading:
            await asyncio.sleep(0.001)
        during = pool.route(None)[0].version  # v2 is loading: traffic stays on v1
        reg.hold[2].set()
        with pool.lease(old):  # a request that got v1 before the switch
            await refreshing
            after = pool.route(None)[0].version
            late = await old.batcher.submit(np.zeros((1, 3, 8, 8), np.float32))
            # v1 leaves by LRU when a version asked for by number comes...
            await pool.get(1)
            reg.versions.add(3)
            await pool.get(3)
            evicted = 1 not in pool.versions
            still = await old.batcher.submit(np.zeros((1, 3, 8, 8), np.float32))
        with pytest.raises(Closed):  # ...and closes after its last request
            await old.batcher.submit(np.zeros((1, 3, 8, 8), np.float32))
        await pool.aclose()
        return pool, during, after, late, evicted, still

    pool, during, after, late, evicted, still = asyncio.run(main())
    assert during == 1 and after == 2
    warm_shape, routes_then = pool.versions[2].loaded.calls[0]
    assert warm_shape == (1, 3, 8, 8) and routes_then == {"champion": 1}  # warmed before
    assert late.outputs[0][0] == 1.0 and still.outputs[0][0] == 1.0  # answered by v1
    assert evicted and 2 in pool.versions  # the aliased one stays


def test_versions_by_number_load_on_demand_and_the_least_recently_used_goes():
    async def main():
        reg = Registry({"champion": 1}, {1, 2, 3, 4})
        pool = make_pool(reg, max_versions=2)
        await pool.start()
        for v in (2, 3):
            await pool.get(v)
        await pool.get(2)  # used again: now 3 is the least recent
        await pool.get(4)
        loaded = sorted(pool.versions)
        with pytest.raises(ModelNotFound, match="not in the registry"):
            await pool.get(9)
        await pool.aclose()
        return reg, loaded

    reg, loaded = asyncio.run(main())
    assert loaded == [1, 2, 4]  # v1 is aliased: never counted, never evicted
    assert reg.loaded == [1, 2, 3, 4]  # each loaded once


def test_a_refresh_that_cannot_resolve_keeps_serving():
    async def main():
        reg = Registry({"champion": 1}, {1})
        pool = make_pool(reg)
        await pool.start()
        del reg.aliases["champion"]
        task = asyncio.ensure_future(pool.refresh_forever(0.001))
        await asyncio.sleep(0.05)
        task.cancel()
        version = pool.route(None)[0].version
        await pool.aclose()
        return version

    assert asyncio.run(main()) == 1


def test_agreement_and_predicted_classes_for_each_task():
    assert agreement("classification", [0.1, 2.0, 0.3], [0.0, 1.0, 0.9]) == 1.0
    assert agreement("classification", [0.1, 2.0, 0.3], [3.0, 1.0, 0.9]) == 0.0
    a = np.zeros((4, 2, 2))
    a[1, 0, :] = 1  # top row class 1, bottom row background
    b = np.zeros((4, 2, 2))
    b[1] = 1  # everything class 1
    assert agreement("segmentation", a, b) == 0.5
    det = {"boxes": np.zeros((2, 4)), "labels": np.array([1, 3]), "scores": np.array([0.9, 0.2])}
    same = {"boxes": np.ones((1, 4)), "labels": np.array([1]), "scores": np.array([0.6])}
    other = {"boxes": np.ones((1, 4)), "labels": np.array([2]), "scores": np.array([0.6])}
    assert agreement("detection", det, same) == 1.0 and agreement("detection", det, other) == 0.0

    classes = ["a", "b", "c"]
    assert predicted_classes(Spec("classification", classes, 8, None, "fp32"), [0, 5, 1]) == ["b"]
    assert predicted_classes(Spec("detection", classes, 8, None, "fp32"), det) == ["a"]
    seg = Spec("segmentation", classes, 8, None, "fp32")
    assert predicted_classes(seg, a) == ["a"] and predicted_classes(seg, np.zeros((4, 2, 2))) == [
        "background"
    ]


# -- Open Inference Protocol v2 inputs and outputs (app.py), for each task


def _loaded(task: str) -> LoadedVersion:
    return LoadedVersion("m", 3, Spec(task, ["a", "b"], 4, None, "fp32"), "fp32", "", {}, {})


def _input(**kw):
    from visionflow.serving.app import InferInput

    return InferInput(**{"name": "images", "datatype": "FP32", "shape": [1, 3, 4, 4], **kw})


def test_v2_tensors_flat_or_nested_and_what_is_refused():
    from visionflow.serving.app import ServeError, v2_batch, v2_input

    x = np.arange(96, dtype=np.float32).reshape(2, 3, 4, 4)
    flat = v2_batch(
        _input(shape=[2, 3, 4, 4], data=x.ravel().tolist()), _loaded("classification"), 10
    )
    nested = v2_batch(_input(shape=[2, 3, 4, 4], data=x.tolist()), _loaded("classification"), 10)
    assert np.array_equal(flat, x) and np.array_equal(nested, x)
    refused = {
        "takes \\[N, 3, 4, 4\\]": _input(shape=[1, 3, 5, 4], data=[0.0] * 60),
        "needs 48": _input(data=[0.0] * 47),
        "must be numbers": _input(data=[None] * 48),
        "1 NaN or infinite": _input(data=[float("inf")] + [0.0] * 47),
    }
    for message, inp in refused.items():
        with pytest.raises(ServeError, match=message) as err:
            v2_batch(inp, _loaded("classification"), 10)
        assert err.value.status == 400
    with pytest.raises(ServeError, match="datatype INT64"):
        v2_input(SimpleNamespace(inputs=[_input(datatype="INT64", data=[])]))
    with pytest.raises(ServeError, match=r"inputs \['x', 'images'\]"):
        v2_input(SimpleNamespace(inputs=[_input(name="x", data=[]), _input(data=[])]))


def test_v2_detection_takes_one_image_and_answers_boxes_labels_scores():
    from visionflow.serving.app import ServeError, v2_batch, v2_outputs

    det = _loaded("detection")
    one = v2_batch(_input(shape=[3, 4, 4], data=[0.5] * 48), det, 10)  # its graph's own shape
    assert one.shape == (1, 3, 4, 4)
    with pytest.raises(ServeError, match="detection takes one image per request, got 2"):
        v2_batch(_input(shape=[2, 3, 4, 4], data=[0.0] * 96), det, 10)
    out = {
        "boxes": np.ones((2, 4), np.float32),
        "labels": np.array([1, 2]),
        "scores": np.array([0.9, 0.4], np.float32),
    }
    tensors = {t["name"]: t for t in v2_outputs(det, [out])}
    assert tensors["boxes"]["shape"] == [2, 4] and tensors["boxes"]["datatype"] == "FP32"
    assert tensors["labels"] == {
        "name": "labels",
        "datatype": "INT64",
        "shape": [2],
        "data": [1, 2],
    }
    assert tensors["scores"]["data"] == pytest.approx([0.9, 0.4])
    seg = v2_outputs(_loaded("segmentation"), [np.zeros((3, 4, 4)), np.zeros((3, 4, 4))])
    assert seg[0]["name"] == "logits" and seg[0]["shape"] == [2, 3, 4, 4]


def test_v2_bytes_inputs_are_base64_files():
    from visionflow.serving.app import ServeError, bytes_input

    png = b"\x89PNG-not-really"
    text = base64.b64encode(png).decode()
    inp = _input(datatype="BYTES", shape=[2], data=[text, {"b64": text}])
    assert bytes_input(inp) == [("image 0", png), ("image 1", png)]
    with pytest.raises(ServeError, match="image 1 of input 'images': not valid base64"):
        bytes_input(_input(datatype="BYTES", shape=[2], data=[text, "@@"]))
    with pytest.raises(ServeError, match="shape \\[3\\] and 2 elements"):
        bytes_input(_input(datatype="BYTES", shape=[3], data=[text, text]))
    with pytest.raises(ServeError, match="shape \\[0\\] and 0 elements"):
        bytes_input(_input(datatype="BYTES", shape=[0], data=[]))
    with pytest.raises(ServeError, match="expected a base64 string"):
        bytes_input(_input(datatype="BYTES", shape=[1], data=[5]))


def test_serve_settings_that_cannot_work_fail_before_anything_loads():
    from omegaconf import OmegaConf

    from visionflow.core.config import Config, ConfigError
    from visionflow.serving.app import check_config

    cfg = OmegaConf.structured(Config)
    check_config(cfg)  # the defaults work
    cfg.serve.variant, cfg.serve.queue_size, cfg.serve.timeout_s = "fp16", 0, 0.0
    cfg.serve.split = {"champion": 0.0}
    with pytest.raises(ConfigError) as err:
        check_config(cfg)
    for said in ("serve.variant='fp16'", "serve.queue_size=0", "serve.timeout_s=0.0", "sum to 0"):
        assert said in str(err.value)
