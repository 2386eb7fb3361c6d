"""Build the objects of a run from its config: the layer above `vision` and `callbacks`.

- `models`: the network (and a trained one from its checkpoint) and the run's task.
- `data`: transforms and the DataModule over a prepared dataset.
- `training`: callbacks and the Lightning Trainer; only the train step needs them.
- `validation`: every part a config names, checked before any work.

Evaluate, export, quantize and register import `models` and `data` only, never `training`
(a contract in pyproject.toml says so).
Hydra's `_target_` is used only for library classes (optimizers, schedulers, Lightning
callbacks); visionflow's own parts come from the registries by name.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig, OmegaConf


def plain(node: Any) -> Any:
    """A config node as plain Python (dicts, lists), resolved; anything else as it is."""
    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
