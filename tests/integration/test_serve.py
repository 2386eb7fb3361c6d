"""`visionflow serve` as a user runs it: real uvicorn servers on 127.0.0.1, started with the
console script, over a registry of our own (versions 1 and 2 of the tiny run's model; aliases
champion → 1 and challenger → 2).

Three servers start together: `main` (MODEL@champion, fp32, aliases refreshed every 0.3 s), `ab`
(a 70/30 champion/challenger split with the challenger in shadow), and `limits` (version 1 by
number, tiny caps, and batches that wait 6 s for company against a 2 s timeout, so timeouts
and a full queue happen deterministically). The alias-move test comes last: it moves champion.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import mlflow
import numpy as np
import pytest
import requests
from omegaconf import OmegaConf
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster_sim.servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_run")]

NAME = "visionflow-shapes"
VERSION = "X-Visionflow-Model-Version"
ALIAS = "X-Visionflow-Alias"
JSON = {"Content-Type": "application/json"}
SPLIT = {"champion": 0.7, "challenger": 0.3}
SERVERS = {
    "main": (
        f"{NAME}@champion",
        "serve.variant=fp32",
        "serve.refresh_s=0.3",
        "serve.max_delay_ms=50",
        "serve.max_batch_size=16",
    ),
    "ab": (
        f"{NAME}@champion",
        "serve.variant=fp32",
        "serve.shadow=challenger",
        "serve.split={" + ", ".join(f"{a}: {w}" for a, w in SPLIT.items()) + "}",
    ),
    "limits": (
        f"{NAME}/1",
        "serve.max_body_mb=1",
        "serve.max_images=3",
        "serve.timeout_s=2",
        "serve.max_delay_ms=6000",
        "serve.max_batch_size=8",
        "serve.queue_size=2",
    ),
}


@dataclass
class Server:
    name: str
    port: int
    proc: subprocess.Popen
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=60, **kw)

    def post(self, path: str, **kw) -> requests.Response:
        return requests.post(self.url + path, timeout=60, **kw)

    def infer(self, body: dict, path: str = f"/v2/models/{NAME}/infer", **kw):
        return self.post(
            path, data=json.dumps(body), headers={**JSON, **kw.pop("headers", {})}, **kw
        )

    def predict(
        self, files: list[tuple[str, bytes]], path: str = f"/v1/models/{NAME}:predict", **kw
    ):
        return self.post(path, files=[("files", (n, data)) for n, data in files], **kw)

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]


@pytest.fixture(scope="module")
def registry(tiny_run, tmp_path_factory):
    """Versions 1 and 2 of the tiny run's model in a registry of our own: champion → 1 (register
    moves it only to a better version), challenger → 2."""
    from visionflow.steps.register import register

    cfg, results = tiny_run
    root = tmp_path_factory.mktemp("serve")
    own = OmegaConf.create(OmegaConf.to_container(cfg))
    own.run_id, own.workdir = "serve-1", str(root)
    own.tracking.uri = f"sqlite:///{root}/mlflow.db"
    assert results["evaluate"].gate == "disabled"  # shapes_tiny's: the model may be champion
    inputs = [results[s] for s in ("evaluate", "export", "quantize")]
    inputs.insert(0, results["prepare"].dataset_id)
    assert register(own, *inputs).champion
    assert not register(own, *inputs).champion
    client = mlflow.MlflowClient(tracking_uri=own.tracking.uri)
    client.set_registered_model_alias(NAME, "challenger", "2")
    return SimpleNamespace(
        uri=own.tracking.uri, root=root, client=client, classes=list(results["evaluate"].classes)
    )


@pytest.fixture(scope="module")
def servers(registry):
    """The three servers, started at once (their start-up is mostly imports), ready."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    started: dict[str, Server] = {}
    try:
        for name, (model, *settings) in SERVERS.items():
            port, log = free_port(), registry.root / f"{name}.log"
            cmd = [
                str(Path(sys.executable).with_name("visionflow")),
                "serve",
                model,
                f"tracking.uri={registry.uri}",
                f"workdir={registry.root}",
                f"serve.port={port}",
                "serve.threads=1",
                *settings,
            ]
            with open(log, "wb") as out:
                proc = subprocess.Popen(
                    cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=registry.root
                )
            started[name] = Server(name, port, proc, log)
        deadline = time.monotonic() + 300
        for server in started.values():
            while True:
                if server.proc.poll() is not None:
                    pytest.fail(
                        f"{server.name} exited ({server.proc.returncode}):\n{server.tail()}"
                    )
                if _status(server.url + "/v2/health/ready") == 200:
                    break
                if time.monotonic() > deadline:
                    pytest.fail(f"{server.name} not ready in 300 s:\n{server.tail()}")
                time.sleep(0.2)
        yield started
    finally:
        for server in started.values():
            server.proc.terminate()
        for server in started.values():
            try:
                server.proc.wait(30)
            except subprocess.TimeoutExpired:
                server.proc.kill()


def _status(url: str) -> int | None:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return None


# -- helpers


def scrape(server: Server) -> dict[tuple[str, frozenset], float]:
    """/metrics as {(sample name, labels): value}."""
    text = server.get("/metrics").text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def metric(samples: dict, name: str, **labels) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, lb), v in samples.items() if n == name and want <= lb)


def delta(before: dict, after: dict, name: str, **labels) -> float:
    return metric(after, name, **labels) - metric(before, name, **labels)


def wait_for(condition, what: str, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def timing(response: requests.Response) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in re.findall(r"(\w+);dur=([0-9.]+)", response.headers["Server-Timing"])
    }


def encoded(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def softmax(logits: np.ndarray) -> np.ndarray:
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def tensor_body(x: np.ndarray, nested: bool = False, **more) -> dict:
    data = x.tolist() if nested else [float(v) for v in x.ravel()]
    inp = {"name": "images", "datatype": "FP32", "shape": list(x.shape), "data": data}
    return {"inputs": [{**inp, **more}]}


def arm(key: str) -> str:
    """The A/B arm a key goes to, computed here as the service documents it."""
    point = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    return "champion" if point < SPLIT["champion"] else "challenger"


def is_json_error(response: requests.Response, status: int, *words: str) -> str:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) >= {"error"} and "Traceback" not in response.text
    for word in words:
        assert word in body["error"], (word, body["error"])
    return body["error"]


@pytest.fixture(scope="module")
def evaluation_images(tiny_run):
    """The test split as evaluate sees it: (its dataset with the eval transform, each image's
    file bytes from the shards)."""
    from visionflow.compose.data import build_datamodule
    from visionflow.storage import open_store

    cfg, results = tiny_run
    dm = build_datamodule(
        cfg, open_store(cfg.storage.root), results["prepare"].dataset_id, "classification"
    )
    ds = dm.dataset("test")
    raw = [ds._read(e.shard, (e.offset, e.size)) for e in ds.entries]  # the stored PNG files
    return ds, raw


@pytest.fixture(scope="module")
def pictures(evaluation_images) -> list[tuple[str, bytes]]:
    """Three test images as PNG, JPEG and WebP files."""
    ds, raw = evaluation_images
    image = [Image.open(io.BytesIO(raw[i])).convert("RGB") for i in range(3)]
    return [
        ("a.png", raw[0]),
        ("b.jpg", encoded(image[1], "JPEG")),
        ("c.webp", encoded(image[2], "WEBP")),
    ]


# -- main: routes


def test_health_metadata_and_readiness(servers, registry):
    s = servers["main"]
    assert s.get("/v2/health/live").json() == {"live": True}
    assert s.get("/v2/health/ready").json()["ready"] is True
    assert s.get("/v2").json()["name"] == "visionflow"
    meta = s.get(f"/v2/models/{NAME}").json()
    assert meta["name"] == NAME and meta["versions"] == ["1", "2"]
    assert meta["platform"] == "onnxruntime"
    assert meta["inputs"] == [{"name": "images", "datatype": "FP32", "shape": [-1, 3, 32, 32]}]
    assert meta["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 5]}]
    params = meta["parameters"]
    assert params["task"] == "classification" and params["classes"] == registry.classes
    assert params["variant"] == "fp32" and params["version"] == "1"
    v1 = s.get(f"/v2/models/{NAME}/versions/1").json()
    assert v1["versions"] == ["1"] and v1["inputs"] == meta["inputs"]
    assert s.get(f"/v2/models/{NAME}/ready").json()["ready"] is True
    assert s.get(f"/v2/models/{NAME}/versions/1/ready").json()["ready"] is True
    # what it serves and why, said at start
    assert "serving visionflow-shapes@champion: v1, fp32 (serve.variant=fp32)" in s.tail()

    is_json_error(s.get("/v2/models/nope"), 404, "'nope' is not served here")
    is_json_error(s.get("/v2/models/nope/ready"), 404, "not served here")
    is_json_error(s.get(f"/v2/models/{NAME}/versions/9"), 404, "not in the registry")
    is_json_error(s.get(f"/v2/models/{NAME}/versions/9/ready"), 404, "not in the registry")
    is_json_error(s.get(f"/v2/models/{NAME}/versions/x"), 404, "versions are numbers")
    x = np.zeros((1, 3, 32, 32), np.float32)
    is_json_error(s.infer(tensor_body(x), f"/v2/models/{NAME}/versions/9/infer"), 404, "/9")
    is_json_error(s.infer(tensor_body(x), "/v2/models/nope/infer"), 404, "nope")
    is_json_error(s.predict([("a.png", b"x")], "/v1/models/nope:predict"), 404, "nope")


def test_v2_infer_with_a_tensor_matches_the_onnx_file(servers, tiny_run, tmp_path):
    from visionflow.sessions import ort_session
    from visionflow.storage import split_uri

    _, results = tiny_run
    s = servers["main"]
    x = np.random.default_rng(0).random((3, 3, 32, 32), dtype=np.float32)
    flat = s.infer({"id": "req-7", **tensor_body(x)})
    nested = s.infer(tensor_body(x, nested=True))
    assert flat.status_code == nested.status_code == 200, flat.text
    out = flat.json()
    assert out["model_name"] == NAME and out["model_version"] == "1" and out["id"] == "req-7"
    (logits,) = out["outputs"]
    assert logits["name"] == "logits" and logits["datatype"] == "FP32"
    assert logits["shape"] == [3, 5]
    assert nested.json()["outputs"][0]["data"] == logits["data"]
    store, key = split_uri(results["export"].onnx_uri)
    onnx = store.get_file(key, tmp_path / "model.onnx")
    session = ort_session(onnx, 1)
    want = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(np.reshape(logits["data"], (3, 5)), want, atol=1e-5)
    assert flat.headers[VERSION] == "1" and flat.headers[ALIAS] == "champion"
    t = timing(flat)
    assert set(t) == {"queue", "model"} and t["model"] > 0 and t["queue"] >= 0


def test_v1_predict_answers_each_file_in_order(servers, registry, pictures):
    s = servers["main"]
    r = s.predict(pictures, params={"top_k": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == NAME and body["version"] == 1
    assert [p["file"] for p in body["predictions"]] == ["a.png", "b.jpg", "c.webp"]
    for p in body["predictions"]:
        scores = [label["score"] for label in p["labels"]]
        assert len(scores) == 2 and scores == sorted(scores, reverse=True)
    every = s.predict(pictures).json()["predictions"]  # serve.top_k=5: all five classes
    assert all(len(p["labels"]) == 5 for p in every)
    assert all(abs(sum(lb["score"] for lb in p["labels"]) - 1) < 1e-6 for p in every)
    assert r.headers[VERSION] == "1" and set(timing(r)) == {"queue", "model"}

    # The same files as BYTES through v2, as base64 strings or {"b64": ...}: the same scores.
    data = [base64.b64encode(b).decode() for _, b in pictures]
    data[1] = {"b64": data[1]}
    v2 = s.infer({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [3], "data": data}]})
    assert v2.status_code == 200, v2.text
    probs = softmax(np.reshape(v2.json()["outputs"][0]["data"], (3, 5)))
    for p, row in zip(every, probs, strict=True):
        for label in p["labels"]:
            assert label["score"] == pytest.approx(
                row[registry.classes.index(label["label"])], abs=1e-6
            )


def test_served_predictions_equal_evaluates(servers, tiny_run, evaluation_images):
    """The test split's files, uploaded to /v1 (as stored, and as JPEG and WebP): the served
    top-1 and probabilities are evaluate's (its dataset, transform and PyTorch network) for the
    same files, and the served accuracy on the stored files is evaluate's accuracy."""
    from visionflow.compose.models import load_network
    from visionflow.vision.images import decode_image
    from visionflow.vision.tasks import get_task

    cfg, results = tiny_run
    ds, raw = evaluation_images
    net, spec = load_network(results["train"].checkpoint_uri)
    predict = get_task("classification").torch_predictor(net)
    classes = spec["classes"]
    files = [(f"test-{i}.png", data) for i, data in enumerate(raw)]
    inputs = [ds[i][0].numpy() for i in range(len(raw))]  # exactly evaluate's input
    for i in range(0, 20, 2):  # re-encoded files: evaluate's decoding and transform of them
        image = Image.open(io.BytesIO(raw[i])).convert("RGB")
        for fmt in ("JPEG", "WEBP"):
            data = encoded(image, fmt)
            files.append((f"test-{i}.{fmt.lower()}", data))
            inputs.append(ds.transform(decode_image(data)).numpy())
    want = softmax(predict(np.stack(inputs)).astype(np.float64))

    served = []
    for start in range(0, len(files), 40):  # serve.max_images=64
        r = servers["main"].predict(files[start : start + 40])
        assert r.status_code == 200, r.text
        served += r.json()["predictions"]
    assert [p["file"] for p in served] == [name for name, _ in files]
    for p, probs in zip(served, want, strict=True):
        got = {label["label"]: label["score"] for label in p["labels"]}
        np.testing.assert_allclose([got[c] for c in classes], probs, atol=1e-4)
        top = np.sort(probs)[-2:]
        if top[1] - top[0] > 1e-4:  # a near tie may fall either way within the tolerance
            assert p["labels"][0]["label"] == classes[int(np.argmax(probs))], p["file"]
    stored = served[: len(raw)]
    accuracy = np.mean(
        [
            p["labels"][0]["label"] == classes[e.label]
            for p, e in zip(stored, ds.entries, strict=True)
        ]
    )
    assert accuracy == pytest.approx(results["evaluate"].score, abs=1e-6)  # torchmetrics: float32


def test_metrics_count_requests_batches_and_classes(servers, pictures):
    s = servers["main"]
    before = scrape(s)
    for _ in range(3):
        assert s.predict(pictures).status_code == 200
    assert s.predict([("broken.png", b"not an image")]).status_code == 400
    after = scrape(s)
    grew = lambda name, **labels: delta(before, after, name, **labels)  # noqa: E731

    route = {"route": "v1_predict", "model": NAME, "version": "1", "variant": "fp32"}
    assert grew("visionflow_requests_total", **route, code="200") == 3
    assert grew("visionflow_requests_total", **route, code="400") == 1
    assert grew("visionflow_request_seconds_count", **route) == 4
    version = {"model": NAME, "version": "1", "variant": "fp32"}
    assert grew("visionflow_batch_size_sum", **version) == 9  # the images computed
    assert grew("visionflow_batch_size_count", **version) == 3  # one after the other: alone
    assert grew("visionflow_queue_seconds_count", **version) == 3  # one per request
    assert grew("visionflow_model_seconds_count", **version) == 3
    assert grew("visionflow_predicted_class_total", model=NAME, version="1") == 9
    assert grew("visionflow_arm_requests_total", model=NAME, alias="champion", version="1") == 3
    assert metric(after, "visionflow_loaded_version", version="1", aliases="champion") == 1


def test_concurrent_requests_are_batched(servers):
    s = servers["main"]
    body = json.dumps(tensor_body(np.zeros((1, 3, 32, 32), np.float32)))
    before = scrape(s)
    gate = threading.Barrier(16)

    def one(_):
        gate.wait()
        return requests.post(f"{s.url}/v2/models/{NAME}/infer", data=body, headers=JSON, timeout=60)

    with ThreadPoolExecutor(16) as pool:
        codes = [r.status_code for r in pool.map(one, range(16))]
    after = scrape(s)
    assert codes == [200] * 16
    labels = {"model": NAME, "version": "1"}
    assert delta(before, after, "visionflow_batch_size_sum", **labels) == 16  # images
    calls = delta(before, after, "visionflow_batch_size_count", **labels)
    alone = delta(before, after, "visionflow_batch_size_bucket", **labels, le="1.0")
    assert alone < calls < 16  # some model calls took several requests' images


def test_docs_and_openapi(servers):
    s = servers["main"]
    docs = s.get("/docs")
    assert docs.status_code == 200 and "swagger-ui" in docs.text.lower()
    paths = s.get("/openapi.json").json()["paths"]
    assert {
        "/v1/models/{name}:predict",
        "/v2/models/{name}/infer",
        "/metrics",
        "/v2/models/{name}/versions/{version}/infer",
        "/v2/health/ready",
    } <= set(paths)


def test_bad_requests_get_json_errors_and_the_server_goes_on(servers):
    s = servers["main"]
    v1, infer = f"/v1/models/{NAME}:predict", f"/v2/models/{NAME}/infer"
    x = np.zeros((1, 3, 32, 32), np.float32)
    is_json_error(s.get("/nope"), 404, "no route GET /nope")
    is_json_error(s.get(infer), 405)
    is_json_error(s.post(v1), 422, "files")
    is_json_error(s.predict([("a.png", b"x")], params={"top_k": 0}), 422, "top_k")
    is_json_error(s.post(infer, data=b"{not json", headers=JSON), 422)
    is_json_error(s.infer({"inputs": "images"}), 422, "inputs")
    is_json_error(
        s.infer(tensor_body(np.zeros((1, 3, 16, 16), np.float32))),
        400,
        "shape [1, 3, 16, 16]",
        "[N, 3, 32, 32]",
    )
    is_json_error(s.infer(tensor_body(x, data=[0.0] * 10)), 400, "10 values", "needs 3072")
    is_json_error(s.infer(tensor_body(x, datatype="INT32")), 400, "datatype INT32", "FP32")
    is_json_error(s.infer(tensor_body(x, data=["a"] * 3072)), 400, "numbers")
    is_json_error(s.infer(tensor_body(x, name="input")), 400, "'images'")
    for bad in (math.nan, math.inf):
        poisoned = x.copy()
        poisoned[0, 1, 2, 3] = bad
        is_json_error(s.infer(tensor_body(poisoned)), 400, "1 NaN or infinite")
    bytes_in = {"name": "images", "datatype": "BYTES", "shape": [1]}
    is_json_error(s.infer({"inputs": [{**bytes_in, "data": ["%%%"]}]}), 400, "image 0", "base64")
    junk = base64.b64encode(b"not an image").decode()
    is_json_error(
        s.infer({"inputs": [{**bytes_in, "data": [junk]}]}), 400, "image 0", "not a decodable image"
    )
    is_json_error(
        s.infer({"inputs": [{**bytes_in, "shape": [2], "data": [junk]}]}), 400, "shape [2]"
    )
    is_json_error(
        s.predict([("fine.png", b"\x89PNG...broken")]), 400, "'fine.png'", "not a decodable image"
    )
    assert s.get("/v2/health/live").status_code == 200
    assert s.infer(tensor_body(x)).status_code == 200


# -- ab: split and shadow


def test_split_is_sticky_per_key_and_weighted(servers):
    s = servers["ab"]
    body = tensor_body(np.zeros((1, 3, 32, 32), np.float32))
    keys = [f"user-{i}" for i in range(120)]
    answered = {}
    for key in keys:
        r = s.infer(body, headers={"X-Visionflow-Key": key})
        assert r.status_code == 200, r.text
        answered[key] = (r.headers[ALIAS], r.headers[VERSION], r.json()["model_version"])
    for key in keys[:10]:  # again: the same arm
        r = s.infer(body, headers={"X-Visionflow-Key": key})
        assert (r.headers[ALIAS], r.headers[VERSION]) == answered[key][:2]
    assert all(a == arm(k) for k, (a, _, _) in answered.items())  # sha256 of the key, by weight
    assert all(
        (a, v, mv) in {("champion", "1", "1"), ("challenger", "2", "2")}
        for a, v, mv in answered.values()
    )
    share = sum(a == "challenger" for a, _, _ in answered.values()) / len(keys)
    assert 0.15 < share < 0.45  # 0.3 asked
    # the model's metadata is MODEL's version, whatever the split
    assert {s.get(f"/v2/models/{NAME}").json()["parameters"]["version"] for _ in range(10)} == {"1"}
    unkeyed = {s.infer(body).headers[VERSION] for _ in range(40)}
    assert unkeyed == {"1", "2"}  # at random, both arms (all 40 on one: p < 1e-6)
    samples = scrape(s)
    champion = metric(samples, "visionflow_arm_requests_total", alias="champion", version="1")
    challenger = metric(samples, "visionflow_arm_requests_total", alias="challenger", version="2")
    assert champion + challenger >= 170 and challenger > 0 and champion > challenger


def test_shadow_copies_the_champions_requests_and_measures_agreement(servers, pictures):
    s = servers["ab"]
    champion_key = next(f"k{i}" for i in range(100) if arm(f"k{i}") == "champion")
    challenger_key = next(f"k{i}" for i in range(100) if arm(f"k{i}") == "challenger")
    labels = {"model": NAME, "champion": "1", "challenger": "2"}

    def settled() -> tuple[float] | None:  # every request the champion answered got a copy
        samples = scrape(s)
        n = metric(samples, "visionflow_shadow_images_total", **labels)
        champion = metric(samples, "visionflow_arm_requests_total", alias="champion")
        return (n,) if n == champion else None  # (the split test's requests: one image each)

    (seen,) = wait_for(settled, "a copy of each of the champion's requests")
    r = s.predict(pictures, headers={"X-Visionflow-Key": challenger_key})
    assert r.headers[VERSION] == "2"  # answered by the challenger: no copy to itself
    for _ in range(4):
        r = s.predict(pictures, headers={"X-Visionflow-Key": champion_key})
        assert r.status_code == 200 and r.headers[VERSION] == "1" and r.json()["version"] == 1
    wait_for(
        lambda: metric(scrape(s), "visionflow_shadow_images_total", **labels) >= seen + 12,
        "the shadow comparisons",
    )
    samples = scrape(s)
    assert metric(samples, "visionflow_shadow_images_total", **labels) == seen + 12
    # Versions 1 and 2 are the same files: the challenger agrees on every image.
    assert metric(samples, "visionflow_shadow_agreement_rate", **labels) == 1.0
    assert metric(samples, "visionflow_shadow_agreement_total", **labels) == seen + 12
    assert metric(samples, "visionflow_batch_size_sum", model=NAME, version="2") >= 12


# -- limits


def _raw(port: int, head: bytes, chunks=()) -> tuple[int, dict]:
    """Send a request by hand; returns the status and JSON body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        for chunk in chunks:
            sock.sendall(chunk)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536) or pytest.fail(f"connection closed: {data!r}")
        head_part, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"content-length: (\d+)", head_part, re.I)[1])
        while len(body) < length:
            body += sock.recv(65536) or pytest.fail("connection closed mid-answer")
    return int(head_part.split()[1]), json.loads(body)


def test_a_body_over_the_cap_is_refused_from_its_length_unread(servers):
    s = servers["limits"]
    head = (
        f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {200 * 2**20}\r\n\r\n"
    ).encode()
    # No byte of the body is sent: an answer can only come from the header.
    status, body = _raw(s.port, head)
    assert status == 413
    assert "209,715,200 bytes" in body["error"] and "serve.max_body_mb" in body["error"]
    assert s.get("/v2/health/live").status_code == 200


def test_a_chunked_body_is_cut_off_once_past_the_cap(servers):
    s = servers["limits"]
    head = (
        f"POST /v2/models/{NAME}/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        "Transfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b" " * 2**16
    chunks = [b"%x\r\n%s\r\n" % (len(piece), piece)] * 17  # 1.06 MiB, no end: the cap must act
    status, body = _raw(s.port, head, chunks)
    assert status == 413 and "so far" in body["error"] and "serve.max_body_mb" in body["error"]
    assert s.get("/v2/health/live").status_code == 200


def _bomb(side: int) -> bytes:
    """A PNG of side x side 1-bit pixels, all black: KBs of file, side² x 3 bytes as RGB."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")
        )

    header = side.to_bytes(4, "big") * 2 + bytes([1, 0, 0, 0, 0])
    rows = zlib.compress(b"\0" * ((side // 8 + 1) * side), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")
    )


def test_a_decompression_bomb_is_refused_before_decoding(servers):
    s = servers["limits"]
    # 64 M pixels: past serve.max_pixels (40 M), short of PIL's own bomb warning (89 M)
    bomb = _bomb(8000)
    assert len(bomb) < 2**20  # under the body cap: the pixel cap must catch it
    is_json_error(
        s.predict([("bomb.png", bomb)]),
        413,
        "'bomb.png'",
        "8000x8000",
        "40,000,000",
        "serve.max_pixels",
    )
    data = [base64.b64encode(bomb).decode()]
    r = s.infer({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": data}]})
    is_json_error(r, 413, "image 0", "8000x8000")
    # 400 M pixels: PIL's check says it first, also from the header alone
    is_json_error(s.predict([("huge.png", _bomb(20000))]), 413, "'huge.png'", "400000000 pixels")
    assert s.get("/v2/health/live").status_code == 200


def test_too_many_images_in_one_request(servers, pictures):
    s = servers["limits"]
    is_json_error(s.predict([*pictures, pictures[0]]), 413, "4 images", "serve.max_images allows 3")
    body = tensor_body(np.zeros((4, 3, 32, 32), np.float32))
    is_json_error(s.infer(body), 413, "4 images", "serve.max_images")


def test_a_request_past_the_timeout_gets_504(servers, pictures):
    # Batches wait 6 s for 8 images; one image alone is still waiting at the 2 s timeout.
    s = servers["limits"]
    before = scrape(s)
    is_json_error(s.predict(pictures[:1]), 504, "serve.timeout_s=2.0")
    after = scrape(s)
    labels = {"route": "v1_predict", "version": "1", "code": "504"}
    assert delta(before, after, "visionflow_requests_total", **labels) == 1


def test_a_full_queue_answers_503_with_retry_after(servers):
    s = servers["limits"]
    two = tensor_body(np.zeros((2, 3, 32, 32), np.float32))
    queued = {"model": NAME, "version": "1"}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(s.infer, two)  # fills serve.queue_size=2 for its 2 s
        wait_for(lambda: metric(scrape(s), "visionflow_queue_images", **queued) == 2, "the queue")
        refused = s.infer(tensor_body(np.zeros((1, 3, 32, 32), np.float32)))
        is_json_error(refused, 503, "serve.queue_size=2")
        assert refused.headers["Retry-After"] == "1"
        is_json_error(first.result(), 504)  # it gave up at the timeout...
    assert metric(scrape(s), "visionflow_queue_images", **queued) == 0  # ...and left the queue


def test_versions_by_number_load_on_demand(servers):
    s = servers["limits"]  # serves version 1 by number; 2 is registered, not loaded
    not_yet = s.get(f"/v2/models/{NAME}/versions/2/ready")
    assert not_yet.status_code == 503 and not_yet.json()["ready"] is False
    meta = s.get(f"/v2/models/{NAME}/versions/2")
    assert meta.status_code == 200 and meta.json()["parameters"]["version"] == "2"
    assert s.get(f"/v2/models/{NAME}/versions/2/ready").json()["ready"] is True
    assert metric(scrape(s), "visionflow_loaded_version", version="2") == 1
    is_json_error(s.get(f"/v2/models/{NAME}/versions/3/ready"), 404, "not in the registry")
    # serve.variant=auto (the default): the variant timed on this host, and why, at start
    params = s.get(f"/v2/models/{NAME}").json()["parameters"]
    assert params["variant"] in ("fp32", "int8") and "on this host" in params["variant_reason"]
    assert f"serving {NAME}/1: v1, {params['variant']} (" in s.tail()


# -- main again, last: champion moves


def test_an_alias_move_under_load_fails_no_request(servers, registry, pictures):
    """Requests from 16 threads without pause; champion moves from v1 to v2 after 50 of them.
    None fails; each thread's answers switch from v1 to v2 once and for all."""
    s = servers["main"]
    answers: list[tuple[int, int, str]] = []
    stop = threading.Event()
    file = [pictures[0]]

    def client(thread: int) -> None:
        with requests.Session() as session:
            while not stop.is_set():
                r = session.post(
                    f"{s.url}/v1/models/{NAME}:predict", files=[("files", file[0])], timeout=60
                )
                answers.append((thread, r.status_code, r.headers.get(VERSION, r.text)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(answers) >= 50, "50 answers")
        registry.client.set_registered_model_alias(NAME, "champion", "2")
        wait_for(lambda: any(a[2] == "2" for a in answers), "an answer from v2", 120)

        def done() -> bool:  # 200 in all, 50 from v2, and every thread answered by v2
            by_v2 = [t for t, _, v in answers if v == "2"]
            return len(answers) >= 200 and len(by_v2) >= 50 and len(set(by_v2)) == 16

        wait_for(done, "answers from v2 to every thread")
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert [a for a in answers if a[1] != 200] == []
    by_thread: dict[int, list[str]] = {}
    for thread, _, version in answers:
        by_thread.setdefault(thread, []).append(version)
    for versions in by_thread.values():
        switch = versions.index("2") if "2" in versions else len(versions)
        assert set(versions[:switch]) <= {"1"} and set(versions[switch:]) == {"2"}
    assert sum(v == "1" for _, _, v in answers) >= 50  # before the move, all from v1
    log = s.tail()
    assert f"{NAME} v2 runs fp32" in log  # v2 was loaded (it was not before)...
    assert log.index(f"{NAME} v2 runs fp32") < log.index(
        f"{NAME}@champion moved from v1 to v2 (loaded and warmed"
    )
