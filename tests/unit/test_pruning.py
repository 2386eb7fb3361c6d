"""Channel pruning to a share of the MACs, and pruned checkpoints that load without pickles."""

import pytest
import torch

from visionflow.compose.models import build_model, load_network
from visionflow.compose.validation import check_optimize
from visionflow.core.config import ConfigError, load_config
from visionflow.vision.pruning import macs_and_params, output_layers, prune_to_macs

MODEL = {"name": "simple_cnn", "width": 8}
SIZE, CLASSES = 32, 5


@pytest.fixture(scope="module")
def pruned():
    """simple_cnn pruned to half its MACs: (net, the shapes it records, MACs before)."""
    torch.manual_seed(0)
    net = build_model(MODEL, num_classes=CLASSES).eval()
    before = macs_and_params(net, SIZE)[0]
    shapes = prune_to_macs(net, SIZE, 0.5, keep=output_layers(net, CLASSES))
    return net, shapes, before


def _checkpoint(path, net, spec):
    """A checkpoint as Lightning writes the train step's: the module's `net.` state and a spec."""
    state = {f"net.{k}": v for k, v in net.state_dict().items()}
    torch.save({"state_dict": state, "visionflow": spec}, path)
    return str(path)


def _spec(**more):
    return {"task": "classification", "model": MODEL, "classes": list("abcde"),
            "image_size": SIZE, **more}  # fmt: skip


def test_pruning_reaches_the_mac_budget_and_keeps_the_classes(pruned):
    net, shapes, before = pruned
    after = macs_and_params(net, SIZE)[0]
    assert 0.25 * before < after <= 0.5 * before
    assert net(torch.rand(2, 3, SIZE, SIZE)).shape == (2, CLASSES)
    assert shapes and all("out_features" not in s or s["out_features"] == CLASSES
                          for s in shapes.values())  # fmt: skip


def test_a_pruned_checkpoint_loads_with_its_weights(pruned, tmp_path):
    net, shapes, _ = pruned
    uri = _checkpoint(tmp_path / "pruned.ckpt", net, _spec(pruned=shapes))
    loaded, spec = load_network(uri)
    x = torch.rand(4, 3, SIZE, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), net(x), rtol=0, atol=0)
    assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in net.parameters())


def test_other_shapes_without_a_pruned_record_still_fail_to_load(pruned, tmp_path):
    net, shapes, _ = pruned
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_network(_checkpoint(tmp_path / "a.ckpt", net, _spec()))
    first = next(iter(shapes))  # recorded for one layer only: the others still mismatch
    with pytest.raises(RuntimeError, match="size mismatch"):
        load_network(_checkpoint(tmp_path / "b.ckpt", net, _spec(pruned={first: shapes[first]})))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("optimize.method=prunee", "optimize.method='prunee'"),
        ("optimize.target_macs=1.5", "optimize.target_macs=1.5"),
        ("optimize.epochs=0", "optimize.epochs=0"),
        ("model=fasterrcnn_mobilenet_v3", "prunes classifiers"),
    ],
)
def test_optimize_values_that_cannot_work_are_named(override, named):
    cfg = load_config(["optimize=prune", override])
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("(", r"\(")):
        check_optimize(cfg)


def test_a_misspelt_optimize_key_fails_when_the_config_loads():
    with pytest.raises(ConfigError, match="optimize.target_mac"):
        load_config(["optimize=prune", "optimize.target_mac=0.5"])
