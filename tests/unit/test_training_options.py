"""Training options as config switches: weight averaging and early stopping callbacks, mixed
precision, gradient accumulation and clipping, SyncBatchNorm, optimizers, schedules, label
smoothing.

Callbacks that change what a checkpoint holds run the real train step on a tiny prepared
dataset; the other options fit a ClassificationModule built from the config with the Trainer
`build_trainer` makes, on random tensors (a fraction of a second each).
"""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import (
    EarlyStopping,
    LearningRateMonitor,
    StochasticWeightAveraging,
    WeightAveraging,
)
from torch.utils.data import DataLoader, TensorDataset

from tests.conftest import tiny_overrides
from visionflow.callbacks.stopping import TaskEarlyStopping
from visionflow.callbacks.telemetry import Telemetry
from visionflow.compose.models import build_model
from visionflow.compose.training import build_callbacks, build_trainer
from visionflow.core.config import ConfigError, load_config, to_container
from visionflow.vision.modules import ClassificationModule


def _config(workdir, *overrides):
    return load_config(tiny_overrides(workdir, "trainer.accelerator=cpu", *overrides))


# ---------------------------------------------------------------------------- callbacks


def test_callbacks_compose_with_the_defaults_and_with_each_other(tmp_path):
    cfg = _config(tmp_path, "callbacks=[ema,early_stopping,swa]")
    built = {type(cb): cb for cb in build_callbacks(cfg.callbacks)}
    assert set(built) == {
        LearningRateMonitor,  # from callbacks/default, which each of them extends
        Telemetry,  # likewise
        WeightAveraging,
        TaskEarlyStopping,
        StochasticWeightAveraging,
    }
    assert list(_config(tmp_path, "callbacks=ema").callbacks) == ["lr_monitor", "telemetry", "ema"]


@pytest.mark.parametrize(
    "module, overrides, expected",
    [
        ("ClassificationModule", [], ("val/acc", "max")),
        ("SegmentationModule", [], ("val/miou", "max")),
        ("DetectionModule", [], ("val/map", "max")),
        ("ClassificationModule", ["+callbacks.early_stopping.monitor=val/loss",
                                  "+callbacks.early_stopping.mode=min"], ("val/loss", "min")),
    ],
)  # fmt: skip
def test_early_stopping_watches_the_tasks_metric_unless_told(tmp_path, module, overrides, expected):
    import visionflow.vision.modules as modules

    cfg = _config(tmp_path, "callbacks=early_stopping", *overrides)
    (stop,) = [cb for cb in build_callbacks(cfg.callbacks) if isinstance(cb, EarlyStopping)]
    owner = getattr(modules, module)
    fake = type("M", (), {"monitor": owner.monitor, "mode": owner.mode})()
    stop.setup(build_trainer(cfg, []), fake, "fit")
    assert (stop.monitor, stop.mode) == expected
    improving = torch.tensor(-1.0 if expected[1] == "min" else 1.0)
    assert stop.monitor_op(improving, stop.best_score)  # the first value is an improvement


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One tiny prepared dataset (480 training images, batches of 32) for the runs below."""
    from visionflow.steps.prepare import prepare

    workdir = tmp_path_factory.mktemp("options")
    return workdir, prepare(load_config(tiny_overrides(workdir, "run_id=prep"))).dataset_id


def _train(monkeypatch, prepared, run_id, *overrides):
    """The train step; returns its result and the callbacks built from `callbacks`."""
    import visionflow.steps.train as train_step

    workdir, dataset_id = prepared
    built = []

    def recording(callbacks_cfg):
        built.extend(build_callbacks(callbacks_cfg))
        return built

    monkeypatch.setattr(train_step, "build_callbacks", recording)
    cfg = load_config(tiny_overrides(workdir, f"run_id={run_id}", *overrides))
    return train_step.train(cfg, dataset_id), {type(cb): cb for cb in built}


def _net_weights(state_dict):
    return {k.removeprefix("net."): v for k, v in state_dict.items() if k.startswith("net.")}


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), rtol=0, atol=0, msg=key)


def test_ema_weights_are_what_validation_checkpoints_and_evaluation_use(monkeypatch, prepared):
    from visionflow.compose.models import load_network
    from visionflow.storage import split_uri

    # With early stopping as well: its threshold is always met, so 1 of 3 epochs runs.
    result, built = _train(
        monkeypatch, prepared, "ema", "callbacks=[ema,early_stopping]",
        "trainer.max_epochs=3", "+callbacks.early_stopping.stopping_threshold=-1.0",
    )  # fmt: skip
    assert result.global_step == 15 and result.epochs == 1  # stopped early

    assert WeightAveraging in built
    store, key = split_uri(result.checkpoint_uri)
    ckpt = torch.load(store.get_file(key, prepared[0] / "ema.ckpt"), weights_only=True)
    # WeightAveraging saves the average as the state_dict and the trained weights beside it.
    ema = _net_weights(ckpt["state_dict"])
    assert int(ckpt["averaging_state"]["n_averaged"]) == 15  # one update per optimizer step
    raw = _net_weights(ckpt["current_model_state"])  # kept for resuming
    assert any(not torch.equal(raw[k], ema[k]) for k in ema if raw[k].is_floating_point())
    net, _ = load_network(result.checkpoint_uri)  # what evaluate and export rebuild
    _assert_same(net.state_dict(), ema)


@pytest.mark.slow  # trains, stops and resumes: half a minute and more
def test_ema_resumes_with_the_run(monkeypatch, prepared):
    from visionflow.storage import split_uri

    run = ("ema-resume", "callbacks=ema")
    _train(monkeypatch, prepared, *run)
    result, _ = _train(monkeypatch, prepared, *run, "trainer.max_epochs=2")
    assert result.resumed_from_step == 15 and result.global_step == 30
    store, key = split_uri(result.last_checkpoint_uri)
    ckpt = torch.load(store.get_file(key, prepared[0] / "resumed.ckpt"), weights_only=True)
    assert int(ckpt["averaging_state"]["n_averaged"]) == 30  # the average went on, not restarted


@pytest.mark.slow  # trains, stops and resumes: half a minute and more
def test_a_resumed_run_with_more_epochs_stretches_its_one_cycle_schedule(monkeypatch, prepared):
    lrs: list[float] = []

    class Lr(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    import visionflow.steps.train as train_step

    monkeypatch.setattr(train_step, "progress_callback", lambda: Lr())
    _train(monkeypatch, prepared, "stretch")  # one epoch, one cycle of 15 steps
    first = list(lrs)
    result, _ = _train(monkeypatch, prepared, "stretch", "trainer.max_epochs=3")
    assert result.resumed_from_step == 15 and result.global_step == 45
    resumed = lrs[len(first) :]
    assert len(resumed) == 30
    # The cycle now spans 45 steps: it goes on from step 15 of 45 (near its peak), not from the
    # end of the old one, and ends near zero again.
    assert resumed[0] > 10 * first[-1]
    assert resumed[-1] < resumed[0] / 100


@pytest.mark.slow  # trains, stops and resumes: half a minute and more
def test_swa_weights_end_in_the_last_checkpoint(monkeypatch, prepared):
    from visionflow.storage import split_uri

    # swa_epoch_start 0.5 of 2 epochs: average the weights at the start of epochs 1 and 2, then
    # one more pass (no optimizer steps) recomputes BatchNorm statistics for the average.
    result, built = _train(
        monkeypatch, prepared, "swa", "callbacks=swa", "trainer.max_epochs=2",
        "callbacks.swa.swa_epoch_start=0.5",
    )  # fmt: skip
    swa = built[StochasticWeightAveraging]
    assert int(swa.n_averaged) == 2
    store, key = split_uri(result.last_checkpoint_uri)
    ckpt = torch.load(store.get_file(key, prepared[0] / "swa.ckpt"), weights_only=True)
    assert ckpt["epoch"] == 2  # saved after the BatchNorm pass that follows the 2 epochs
    params = dict(swa._average_model.net.named_parameters())
    _assert_same({k: _net_weights(ckpt["state_dict"])[k] for k in params}, params)


# ---------------------------------------------------------------------- trainer options


class _Record(pl.Callback):
    """Learning rate before each step and gradients as the optimizer sees them (after clipping)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []
        self.group_lrs: list[list[float]] = []
        self.grad_norms: list[float] = []
        self.grad_max: list[float] = []
        self.logits_dtypes: set[torch.dtype] = set()

    def on_train_start(self, trainer, pl_module) -> None:
        # After the step: Lightning runs forward, backward and clipping inside optimizer.step.
        trainer.optimizers[0].register_step_post_hook(self._after_step)
        pl_module.net.register_forward_hook(lambda m, i, out: self.logits_dtypes.add(out.dtype))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])
        self.group_lrs.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    def _after_step(self, optimizer, args, kwargs) -> None:
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        self.grad_norms.append(
            float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))
        )
        self.grad_max.append(max(float(g.abs().max()) for g in grads))


def _fit(workdir, *overrides, batches: int = 8):
    """Fit on `batches` random batches of 4 images for the config's epochs; (trainer, record)."""
    cfg = _config(workdir, "trainer.devices=1", "trainer.limit_val_batches=1", *overrides)
    net = build_model(cfg.model, num_classes=5)
    module = ClassificationModule(net, {}, to_container(cfg.optim))
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(4 * batches, 3, 32, 32, generator=gen)
    loader = DataLoader(
        TensorDataset(images, torch.randint(0, 5, (4 * batches,), generator=gen)), 4
    )
    record = _Record()
    trainer = build_trainer(cfg, [record])
    trainer.fit(module, loader, loader)
    return trainer, record


def test_bf16_mixed_precision_runs_the_network_in_bfloat16_on_cpu(tmp_path):
    trainer, record = _fit(tmp_path, "trainer.precision=bf16-mixed", batches=2)
    assert trainer.precision == "bf16-mixed"
    assert record.logits_dtypes == {torch.bfloat16}
    assert trainer.global_step == 2


def test_fp16_mixed_precision_falls_back_to_bf16_on_cpu(tmp_path):
    # Lightning's own rule: CPU autocast has no float16, so 16-mixed becomes bf16-mixed there
    # (with a warning). On a GPU 16-mixed is float16 with a gradient scaler.
    trainer = build_trainer(_config(tmp_path, "trainer.precision=16-mixed"), [])
    assert trainer.precision == "bf16-mixed"


@pytest.mark.parametrize(("accumulate", "steps"), [(1, 8), (2, 4)])
def test_gradient_accumulation_takes_one_step_per_n_batches(tmp_path, accumulate, steps):
    trainer, record = _fit(tmp_path, f"trainer.accumulate_grad_batches={accumulate}")
    assert trainer.global_step == len(record.grad_norms) == steps


@pytest.mark.parametrize("algorithm", ["norm", "value", None])
def test_gradient_clipping_bounds_what_the_optimizer_sees(tmp_path, algorithm):
    clip = ["trainer.gradient_clip_val=0.01", f"trainer.gradient_clip_algorithm={algorithm}"]
    trainer, record = _fit(tmp_path, *(clip if algorithm else []))
    assert trainer.global_step == 8  # the run finishes
    if algorithm is None:  # the control: unclipped gradients are far larger than the bound
        assert trainer.gradient_clip_val is None and min(record.grad_norms) > 0.01
        return
    assert trainer.gradient_clip_val == 0.01 and trainer.gradient_clip_algorithm == algorithm
    bound = record.grad_norms if algorithm == "norm" else record.grad_max
    assert max(bound) <= 0.01 * (1 + 1e-4)


@pytest.mark.parametrize("sync", [True, False])
def test_sync_batchnorm_reaches_the_ddp_strategy(tmp_path, sync):
    from lightning.pytorch.strategies import DDPStrategy

    cfg = _config(tmp_path, "trainer=ddp", "trainer.devices=2", f"trainer.sync_batchnorm={sync}")
    trainer = build_trainer(cfg, [])  # builds the strategy; processes start only in fit
    assert isinstance(trainer.strategy, DDPStrategy) and trainer.num_devices == 2
    net = build_model(cfg.model, num_classes=5)
    if sync:  # what the strategy does to the model when it sets up
        net = trainer.strategy._layer_sync.apply(net)
    else:
        assert trainer.strategy._layer_sync is None
    kinds = {type(m) for m in net.modules()}
    assert (torch.nn.SyncBatchNorm in kinds) == sync and (torch.nn.BatchNorm2d in kinds) != sync


# ---------------------------------------------------------------- optimizers, schedules


def test_sgd_is_nesterov_and_adamw_the_default(tmp_path):
    sgd, _ = _fit(tmp_path, "optim=sgd", batches=1)
    opt = sgd.optimizers[0]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["nesterov"] and opt.defaults["momentum"] == 0.9
    assert isinstance(_fit(tmp_path, batches=1)[0].optimizers[0], torch.optim.AdamW)


def _rising_then_falling(lrs: list[float]) -> int:
    peak = max(range(len(lrs)), key=lrs.__getitem__)
    assert all(a < b for a, b in zip(lrs[:peak], lrs[1 : peak + 1], strict=True)), lrs
    assert all(a >= b for a, b in zip(lrs[peak:-1], lrs[peak + 1 :], strict=True)), lrs
    return peak


@pytest.mark.parametrize(
    "overrides",
    [
        ["optim/scheduler=cosine_warmup"],
        ["optim=sgd", "optim/scheduler=cosine"],
        [],
        ["optim.scheduler=null"],
    ],  # fmt: skip
    ids=["cosine_warmup", "cosine", "one_cycle", "none"],
)
def test_learning_rate_follows_the_schedule(tmp_path, overrides):
    trainer, record = _fit(tmp_path, *overrides, batches=50)
    lrs, lr = record.lrs, trainer.optimizers[0].defaults["lr"]
    assert len(lrs) == 50
    if "optim.scheduler=null" in overrides:
        assert not trainer.lr_scheduler_configs and lrs == [lr] * 50
        return
    assert max(lrs) == pytest.approx(lr, rel=1e-3)  # the optimizer's lr is the peak
    if "optim/scheduler=cosine" in overrides:  # no warm-up: from lr, a half cosine to ~0
        assert lrs[0] == pytest.approx(lr)
        assert lrs[25] == pytest.approx(lr * (1 + math.cos(math.pi * 25 / 50)) / 2)
        assert _rising_then_falling(lrs) == 0 and lrs[-1] < lr / 100
    elif "optim/scheduler=cosine_warmup" in overrides:  # 8% of 50 steps: warm-up of 4
        assert lrs[0] == pytest.approx(lr / 100)
        assert _rising_then_falling(lrs) == 3 and lrs[-1] < lr / 1000
        assert trainer.optimizers[0].param_groups[0]["betas"][0] == 0.9  # momentum left alone
    else:  # one-cycle: warm-up over 25% of the steps from max_lr / 25
        assert lrs[0] == pytest.approx(lr / 25)
        assert _rising_then_falling(lrs) == 12 and lrs[-1] < lr / 1000


@pytest.mark.parametrize(
    "overrides",
    [["optim=sgd"], ["optim/scheduler=cosine_warmup"]],
    ids=["sgd_one_cycle", "adamw_cosine_warmup"],
)
def test_norm_lr_scale_speeds_up_normalisation_parameters_only(tmp_path, overrides):
    trainer, record = _fit(tmp_path, *overrides, "optim.norm_lr_scale=64", batches=12)
    optimizer = trainer.optimizers[0]
    plain, norms = optimizer.param_groups
    bn = trainer.lightning_module.net.net.features[0][1]
    assert isinstance(bn, torch.nn.BatchNorm2d)
    assert {id(bn.weight), id(bn.bias)} <= {id(p) for p in norms["params"]}
    conv = trainer.lightning_module.net.net.features[0][0]
    assert id(conv.weight) in {id(p) for p in plain["params"]}
    assert {id(p) for p in plain["params"]} | {id(p) for p in norms["params"]} == {
        id(p) for p in trainer.lightning_module.parameters()
    }
    # At every step of the schedule, warm-up and decay alike: 64x the rate, the same decay.
    assert len(record.group_lrs) == 12 and len(set(lrs[0] for lrs in record.group_lrs)) > 2
    for lr, norm_lr in record.group_lrs:
        assert norm_lr == pytest.approx(64 * lr)
    assert norms["weight_decay"] * norms["lr"] == pytest.approx(plain["weight_decay"] * plain["lr"])
    assert plain["weight_decay"] == optimizer.defaults["weight_decay"] > 0


def test_norm_lr_scale_of_one_keeps_one_group_and_a_bad_scale_is_refused(tmp_path):
    trainer, _ = _fit(tmp_path, batches=2)
    assert len(trainer.optimizers[0].param_groups) == 1
    with pytest.raises(ConfigError, match="optim.norm_lr_scale must be > 0, got -1.0"):
        _fit(tmp_path, "optim.norm_lr_scale=-1", batches=2)


def test_label_smoothing_applies_to_the_training_loss_only(tmp_path):
    cfg = _config(tmp_path, "optim.label_smoothing=0.2")
    module = ClassificationModule(
        build_model(cfg.model, num_classes=5), {}, to_container(cfg.optim)
    )
    module.eval()  # the same logits on every call
    gen = torch.Generator().manual_seed(0)
    images, labels = torch.rand(8, 3, 32, 32, generator=gen), torch.arange(8) % 5
    with torch.no_grad():
        logits = module(images)
        train_loss = module._step((images, labels), "train")
        val_loss = module._step((images, labels), "val")
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.2)
    plain = F.cross_entropy(logits, labels)
    assert not torch.isclose(smoothed, plain)
    torch.testing.assert_close(train_loss, smoothed)
    torch.testing.assert_close(val_loss, plain)


# ------------------------------------------------- gradient checkpointing, resizing, mixing


@pytest.mark.parametrize("model", ["resnet18", "simple_cnn", "mobilenet_v3_small"])
def test_gradient_checkpointing_gives_the_same_gradients_and_parameter_names(tmp_path, model):
    from visionflow.vision.models.checkpointing import enable_gradient_checkpointing

    torch.manual_seed(0)
    plain = build_model({"name": model}, num_classes=5)
    checkpointed = build_model({"name": model}, num_classes=5)
    checkpointed.load_state_dict(plain.state_dict())
    keys = list(checkpointed.state_dict())
    assert enable_gradient_checkpointing(checkpointed) >= 4
    assert list(checkpointed.state_dict()) == keys  # checkpoints load either way
    x, y = torch.rand(4, 3, 32, 32), torch.arange(4)
    for net in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks for both
        F.cross_entropy(net(x), y).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)


def test_gradient_checkpointing_recomputes_blocks_in_the_backward_pass(tmp_path):
    from visionflow.vision.models.checkpointing import block_sequences

    cfg = _config(tmp_path, "train.gradient_checkpointing=true")
    module = ClassificationModule(
        build_model({"name": "resnet18"}, num_classes=5), {}, to_container(cfg.optim),
        gradient_checkpointing=cfg.train.gradient_checkpointing,
    )  # fmt: skip
    block = block_sequences(module.net.net)[0][0]
    calls = []
    block.conv1.register_forward_hook(lambda *a: calls.append(1))
    F.cross_entropy(module(torch.rand(2, 3, 32, 32)), torch.arange(2)).backward()
    assert len(calls) == 2  # once forward, once again in backward


def test_gradient_checkpointing_refuses_a_model_without_blocks():
    from torch import nn

    from visionflow.core.config import ConfigError
    from visionflow.vision.models.checkpointing import enable_gradient_checkpointing

    with pytest.raises(ConfigError, match="no sequence of blocks"):
        enable_gradient_checkpointing(nn.Linear(3, 3))


def test_progressive_resizing_trains_small_then_full_size(tmp_path):
    from visionflow.callbacks.resizing import ProgressiveResizing

    sizes: list[tuple[int, bool]] = []

    class Sizes(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            pl_module.net.register_forward_hook(
                lambda m, i, o: sizes.append((i[0].shape[-1], m.training))
            )

    cfg = _config(tmp_path, "callbacks=progressive_resizing", "trainer.max_epochs=3",
                  "callbacks.resize.sizes=[16,24]")  # fmt: skip
    resize = next(c for c in build_callbacks(cfg.callbacks) if isinstance(c, ProgressiveResizing))
    assert [resize.size_at(e) for e in range(4)] == [16, 24, None, None]
    _fit_with(cfg, [resize, Sizes()], batches=2)
    trained = [s for s, training in sizes if training]
    assert trained == [16, 16, 24, 24, 32, 32]
    assert {s for s, training in sizes if not training} == {32}  # validation at full size


def test_mixup_trains_on_mixed_images_and_soft_labels(tmp_path):
    from visionflow.compose.data import build_batch_transform

    cfg = _config(tmp_path, "transforms.batch=[{name: mixup, alpha: 0.4}]")
    mix = build_batch_transform(cfg, "classification", 5)
    module = ClassificationModule(
        build_model(cfg.model, num_classes=5), {}, to_container(cfg.optim), batch_transform=mix
    )
    seen = []
    module.net.register_forward_hook(lambda m, i, o: seen.append(i[0].clone()))
    images, labels = torch.rand(8, 3, 32, 32), torch.arange(8) % 5
    loss = module._step((images, labels), "train")
    assert torch.isfinite(loss)
    assert not torch.equal(seen[-1], images)  # training saw mixed images
    module._step((images, labels), "val")
    assert torch.equal(seen[-1], images)  # validation never mixes


def _fit_with(cfg, callbacks, batches: int):
    net = build_model(cfg.model, num_classes=5)
    module = ClassificationModule(net, {}, to_container(cfg.optim))
    gen = torch.Generator().manual_seed(0)
    loader = DataLoader(
        TensorDataset(torch.rand(4 * batches, 3, 32, 32, generator=gen),
                      torch.randint(0, 5, (4 * batches,), generator=gen)), 4,
    )  # fmt: skip
    trainer = build_trainer(cfg, callbacks)
    trainer.fit(module, loader, loader)
    return trainer
