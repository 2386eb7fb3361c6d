"""A model whose outputs are NaN or infinite fails evaluation and export parity, and nothing of
it is stored: comparisons with NaN are false, so it would pass any tolerance otherwise."""

import pytest
import torch

from visionflow.steps.evaluate import EvaluateError, evaluate
from visionflow.steps.export import ExportError, export
from visionflow.storage import open_store, split_uri

# The tiny run is a whole pipeline: slow, on the worker that computes it for every module.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("tiny_run")]


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_model_fails_evaluation_and_export(tiny_run, tmp_path, value):
    cfg, r = tiny_run
    source, key = split_uri(r["train"].checkpoint_uri)
    ckpt = torch.load(source.get_file(key, tmp_path / "best.ckpt"), weights_only=True)
    head = next(k for k in reversed(ckpt["state_dict"]) if k.endswith("weight"))
    ckpt["state_dict"][head].fill_(value)  # the classifier's last layer
    torch.save(ckpt, tmp_path / "broken.ckpt")
    store = open_store(cfg.storage.root)
    broken = store.put_file(tmp_path / "broken.ckpt", f"broken/{value}.ckpt")
    before = (
        store.get_bytes("runs/tiny-1/evaluate.json"),
        store.get_bytes("runs/tiny-1/export.json"),
    )

    with pytest.raises(EvaluateError, match="NaN or infinite values"):
        evaluate(cfg, r["prepare"].dataset_id, broken)
    with pytest.raises(ExportError, match="NaN or infinite values.*nothing was stored"):
        export(cfg, r["prepare"].dataset_id, broken)
    after = store.get_bytes("runs/tiny-1/evaluate.json"), store.get_bytes("runs/tiny-1/export.json")
    assert after == before  # the run's records are the good model's still
