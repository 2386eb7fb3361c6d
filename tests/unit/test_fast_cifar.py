"""cifar10_fast: the cached/on-device data path, the fast net's layout switches, the config."""

import pytest
import torch

from visionflow.compose.data import batch_augment
from visionflow.compose.models import build_model
from visionflow.core.config import ConfigError, load_config
from visionflow.vision.data.cached import BatchAugment, DeviceBatches, batch_augment_from
from visionflow.vision.modules import ClassificationModule


def _data(n=50):
    labels = torch.arange(n) % 5
    images = (labels * 50).to(torch.uint8)[:, None, None, None].expand(n, 3, 8, 8).contiguous()
    return images, labels


def test_device_batches_cover_every_sample_once_per_epoch():
    images, labels = _data()
    loader = DeviceBatches(images, labels, batch_size=16, shuffle=True, seed=1)
    assert len(loader) == 4
    epochs = []
    for _ in range(2):
        seen = []
        for x, y in loader:
            assert x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8)
            assert torch.equal((x[:, 0, 0, 0] * 255).round().long() // 50, y)  # labels match
            seen.append(y)
        epochs.append(torch.cat(seen))
        assert len(epochs[-1]) == 50 and torch.equal(epochs[-1].sort().values, labels.sort().values)
    assert not torch.equal(epochs[0], epochs[1])  # reshuffled


def test_device_batches_shard_by_rank_and_drop_last():
    images, labels = _data(10)
    parts = [
        DeviceBatches(images, labels, 2, shuffle=True, seed=3, rank=r, world_size=3)
        for r in range(3)
    ]
    counts = [sum(len(y) for _, y in p) for p in parts]
    assert counts == [4, 4, 4]  # ceil(10/3) each, padded with repeats
    assert len(DeviceBatches(images, labels, 3, shuffle=True, drop_last=True)) == 3


def test_batch_augment_translates_and_flips():
    x = torch.arange(2 * 3 * 6 * 6, dtype=torch.uint8).view(2, 3, 6, 6)
    g = torch.Generator().manual_seed(0)
    out = BatchAugment(translate=2, flip_p=0.5)(x.repeat(16, 1, 1, 1), g)
    assert out.shape == (32, 3, 6, 6) and out.dtype == torch.uint8
    assert any(not torch.equal(o, x[i % 2]) for i, o in enumerate(out))
    assert torch.equal(BatchAugment()(x, g), x)
    with pytest.raises(ConfigError, match="no batched version"):
        batch_augment_from([{"name": "color_jitter"}], "transforms.train")


def test_fast_net_channels_last_forward():
    net = build_model({"name": "fast_cifar", "width": 8, "wide_width": 16}, num_classes=10)
    module = ClassificationModule(net, {}, {}, channels_last=True)
    assert net.net.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = module(torch.rand(4, 3, 32, 32))
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    assert "net.net.stem.0.weight" in module.state_dict()


def test_compile_switch_keeps_parameter_names(monkeypatch):
    compiled = []
    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compiled.append(a) or real(*a, **k))
    net = build_model({"name": "fast_cifar", "width": 8, "wide_width": 16}, num_classes=3)
    module = ClassificationModule(net, {}, {}, compile=True)
    assert len(compiled) == 1  # the network, in place
    assert all("_orig_mod" not in k for k in module.state_dict())


def test_experiment_configs_compose(tmp_path):
    cfg = load_config(["experiment=cifar10_fast", "data.root=/x", f"workdir={tmp_path}"])
    assert cfg.data.cache == "gpu" and cfg.train.compile and cfg.train.channels_last
    assert cfg.model.name == "fast_cifar" and cfg.trainer.precision == "bf16-mixed"
    assert batch_augment(cfg) == BatchAugment(translate=2, flip_p=0.5)
    smoke = load_config(["experiment=cifar10_fast_smoke", "data.root=/x", f"workdir={tmp_path}"])
    assert smoke.data.cache == "memory" and not smoke.train.compile
    with pytest.raises(ConfigError, match="data.cache"):
        batch_augment(load_config(["data.cache=disk", f"workdir={tmp_path}"]))


@pytest.mark.slow  # a training
def test_training_from_the_memory_cache_learns(tmp_path):
    """The train step end to end on the cached path learns: beyond chance (0.2) on shapes."""
    from tests.conftest import tiny_overrides
    from visionflow.core.config import load_config
    from visionflow.steps.prepare import prepare
    from visionflow.steps.train import train

    cfg = load_config(
        tiny_overrides(
            tmp_path,
            "data.cache=memory",
            "model.width=16",
            "trainer.max_epochs=10",
            "run_id=cached",
        )
    )
    result = train(cfg, prepare(cfg).dataset_id)
    # 60 validation images, 5 classes: 21 right by chance has p < 0.001 (12 expected).
    assert result.monitor == "val/acc" and result.best_score >= 0.35


def test_whitened_stem_decorrelates_the_patches_it_was_fitted_to():
    gen = torch.Generator().manual_seed(0)
    gray = torch.randn(64, 1, 16, 16, generator=gen)  # channels strongly correlated
    images = gray.expand(64, 3, 16, 16) + 0.3 * torch.randn(64, 3, 16, 16, generator=gen)
    net = build_model({"name": "fast_cifar", "width": 8, "wide_width": 16}, num_classes=3).net
    net.whiten_stem(images)
    conv = net.stem[0]
    responses = torch.nn.functional.conv2d(images, conv.weight[:12])  # one of each +/- pair
    flat = responses.permute(1, 0, 2, 3).reshape(12, -1)
    cov = torch.cov(flat)
    torch.testing.assert_close(cov, torch.eye(12), atol=0.02, rtol=0)
    torch.testing.assert_close(conv.weight[12:], -conv.weight[:12])
    assert not conv.weight.requires_grad


def test_fit_whitens_the_stem_from_the_first_training_images(tmp_path, monkeypatch):
    """The training module hands fast_cifar its first training images (all of them, here:
    fewer than 5,000) before the first step, as [0, 1] floats."""
    from tests.conftest import tiny_overrides
    from visionflow.compose.data import build_datamodule
    from visionflow.compose.training import build_trainer
    from visionflow.core.config import to_container
    from visionflow.steps.prepare import prepare
    from visionflow.storage import open_store
    from visionflow.vision.models.fast import FastCIFAR

    cfg = load_config(
        tiny_overrides(
            tmp_path, "model=fast_cifar", "model.width=8", "model.wide_width=16",
            "data.cache=memory", "trainer.limit_train_batches=1", "trainer.limit_val_batches=1",
        )
    )  # fmt: skip
    prepared = prepare(cfg)
    dm = build_datamodule(cfg, open_store(cfg.storage.root), prepared.dataset_id, "classification")
    net = build_model(cfg.model, num_classes=len(dm.classes))
    before = net.net.stem[0].weight.clone()
    seen = []
    original = FastCIFAR.init_from_data

    def spy(self, images):
        seen.append(images)
        original(self, images)

    monkeypatch.setattr(FastCIFAR, "init_from_data", spy)
    module = ClassificationModule(net, {}, to_container(cfg.optim))
    build_trainer(cfg, []).fit(module, datamodule=dm)
    train_count = prepared.manifest["splits"]["train"]["count"]
    assert len(seen) == 1 and len(seen[0]) == train_count < 5000
    assert seen[0].dtype == torch.float32 and 0 <= seen[0].min() < seen[0].max() <= 1
    assert not torch.allclose(net.net.stem[0].weight, before)
