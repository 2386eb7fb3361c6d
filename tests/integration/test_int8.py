"""int8 keeps a trained model's decisions on the CPU that runs the tests, whatever it is.

The tiny runs elsewhere train for seconds and barely beat chance, so their int8 agreement says
nothing. This one trains `experiment=shapes_quick` to 99-100% (under a minute here), quantizes
it as the pipeline does, and checks what the issue asks (agreement with fp32 >= 99%) and what
makes it hold on every x86-64 CPU: this host's int8 kernels compute what the quantized graph
means. With the earlier 8-bit weights, on an AVX2 CPU, the kernels strayed from it by 3.6 on
this model (saturation; 16 on the default run's), while agreement still read 99.5%.
"""

import numpy as np
import pytest

from tests.conftest import run_steps
from visionflow.sessions import ort_graph_session, ort_session
from visionflow.storage import open_store

pytestmark = pytest.mark.slow


def test_int8_decides_as_fp32_does_on_this_host(tmp_path):
    from visionflow.compose.data import build_datamodule
    from visionflow.core.config import load_config

    cfg = load_config(["experiment=shapes_quick", f"workdir={tmp_path}", "run_id=int8"])
    r = run_steps(cfg, until="quantize")
    dataset_id, q = r["prepare"].dataset_id, r["quantize"]
    assert q.fp32_score >= 0.95  # a model worth quantizing
    assert q.status == "stored" and q.accuracy_drop <= 1.0
    assert q.parity.samples == 400 and q.parity.agreement >= 0.99

    # The kernels against the same graph run op by op in float (no int8 kernel involved): they
    # differ by rounding (about 0.1 here), not by saturation (several logits).
    store = open_store(cfg.storage.root)
    test = build_datamodule(cfg, store, dataset_id, "classification").test_dataloader()
    images = np.concatenate([x.numpy() for x, _ in test])
    int8 = store.get_file("models/int8/model.int8.onnx", tmp_path / "q.onnx")
    kernels = ort_session(int8).run(None, {"images": images})[0]
    graph = ort_graph_session(int8).run(None, {"images": images})[0]
    assert np.abs(kernels - graph).max() <= 0.5
