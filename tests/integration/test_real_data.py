"""A short run on real photographs: a CIFAR-10 subset from ../shared/data/cifar10-jpeg.

The data lives outside the repository (never committed). The test looks for it at
$VISIONFLOW_CIFAR10_JPEG, beside the checkout, or at /work/shared, and is skipped (saying
where it looked) when it is in none of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.conftest import REPO

CANDIDATES = [
    Path(p)
    for p in (
        os.environ.get("VISIONFLOW_CIFAR10_JPEG", ""),
        REPO.parent / "shared" / "data" / "cifar10-jpeg" / "train",
        "/work/shared/data/cifar10-jpeg/train",
    )
    if str(p)
]
ROOT = next((p for p in CANDIDATES if (p / "airplane").is_dir()), None)


@pytest.mark.slow
@pytest.mark.skipif(ROOT is None, reason=f"CIFAR-10 JPEGs not found in {CANDIDATES}")
def test_a_cifar10_subset_learns_well_beyond_chance(tmp_path):
    from visionflow.core.config import load_config
    from visionflow.steps.evaluate import evaluate
    from visionflow.steps.prepare import prepare
    from visionflow.steps.train import train

    cfg = load_config(
        [f"workdir={tmp_path}", "data=imagefolder", f"data.root={ROOT}",
         "data.max_per_class=150", "data.batch_size=64", "model.width=16",
         "trainer.max_epochs=5", "run_id=cifar-subset", "evaluate.min_score=0.3"]
    )  # fmt: skip
    prepared = prepare(cfg)
    assert prepared.manifest["classes"][:2] == ["airplane", "automobile"]
    assert prepared.manifest["splits"]["test"]["count"] == 150  # 15 of each class, held out
    trained = train(cfg, prepared.dataset_id)
    result = evaluate(cfg, prepared.dataset_id, trained.checkpoint_uri)
    # Chance is 0.10; five epochs on 1,200 real photographs reach about 0.4.
    assert result.score >= 0.3 and result.gate_passed


@pytest.mark.slow
@pytest.mark.skipif(ROOT is None, reason=f"CIFAR-10 JPEGs not found in {CANDIDATES}")
def test_the_cifar10_fast_recipe_learns_at_cpu_size(tmp_path):
    """cifar10_fast's own pieces (memory cache with batched augmentation, whitened stem,
    BatchNorm shifts at 64x the rate, one-cycle) through the train step, on 1,400 photographs."""
    from visionflow.core.config import load_config
    from visionflow.steps.evaluate import evaluate
    from visionflow.steps.prepare import prepare
    from visionflow.steps.train import train

    cfg = load_config(
        [f"workdir={tmp_path}", "experiment=cifar10_fast_smoke", f"data.root={ROOT}",
         "data.max_per_class=200", "trainer.max_epochs=8", "run_id=cifar-fast",
         "evaluate.min_score=0.3"]
    )  # fmt: skip
    assert cfg.optim.norm_lr_scale == 64 and cfg.data.cache == "memory"
    dataset_id = prepare(cfg).dataset_id
    result = evaluate(cfg, dataset_id, train(cfg, dataset_id).checkpoint_uri)
    # Chance is 0.10; eight epochs reach about 0.39.
    assert result.score >= 0.3 and result.gate_passed
