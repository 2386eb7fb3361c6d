"""The versions one service serves: by alias (with A/B weights and a shadow) and by number.

Labels name what traffic is routed by: MODEL's alias (or `latest`, or the version it pins) and
the aliases of `serve.split` and `serve.shadow`. They resolve at start and every
`serve.refresh_s`; a label that moves gets its new version loaded and warmed (one inference)
before the switch, so no request waits on a load or fails, and requests already holding the
old version finish on it. Versions asked for by number load on demand; at most
`serve.max_versions` of those stay, the least recently used going first, and a version some
label routes to is never evicted. A version that goes is closed only after its last request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionflow.serving.batcher import Batcher
from visionflow.serving.metrics import Metrics
from visionflow.serving.model import LoadedVersion, ModelRef, load_version, resolve

log = logging.getLogger("visionflow.serve")

_ALIAS_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


class NotReady(RuntimeError):
    """The versions the service routes to are not all loaded yet."""


@dataclass
class Served:
    """A loaded version with its batcher, and the requests holding it now."""

    loaded: LoadedVersion
    batcher: Batcher
    inflight: int = 0
    retired: bool = False

    @property
    def version(self) -> int:
        return self.loaded.version

    @property
    def variant(self) -> str:
        return self.loaded.variant


def check_split(split: dict[str, float] | None) -> dict[str, float]:
    """serve.split's weights, normalised to sum to 1; raises ValueError naming the problem."""
    if not split:
        return {}
    if not isinstance(split, Mapping):
        raise ValueError(
            f"serve.split={split!r}: a map of alias to weight, e.g. "
            "'serve.split={champion: 0.9, challenger: 0.1}'"
        )
    weights = {}
    for alias, weight in split.items():
        if not alias or set(str(alias)) - _ALIAS_CHARS:
            raise ValueError(f"serve.split: {alias!r} is not an alias name")
        if not isinstance(weight, int | float) or weight < 0:
            raise ValueError(f"serve.split.{alias}={weight!r}: weights are numbers >= 0")
        weights[str(alias)] = float(weight)
    total = sum(weights.values())
    if total <= 0:
        raise ValueError("serve.split: the weights sum to 0; give some alias a weight above 0")
    return {alias: w / total for alias, w in weights.items()}


def choose(weights: dict[str, float], key: str | None, rng: random.Random | None = None) -> str:
    """The arm for a request: a point in [0, 1) from the key's sha256 (sticky), else random."""
    if key is not None:
        digest = hashlib.sha256(key.encode()).digest()
        point = int.from_bytes(digest[:8], "big") / 2**64
    else:
        point = (rng or random).random()
    total = 0.0
    for alias, weight in weights.items():
        total += weight
        if point < total:
            return alias
    return next(a for a, w in reversed(weights.items()) if w > 0)  # rounding at the top end


class Pool:
    def __init__(
        self,
        ref: ModelRef,
        serve_cfg: Any,
        metrics: Metrics,
        loader: Callable[..., LoadedVersion] = load_version,
        resolver: Callable[[ModelRef], int] | None = None,
    ) -> None:
        self.name = ref.name
        self.cfg, self.metrics, self.loader = serve_cfg, metrics, loader
        self.resolve = resolver or (lambda target: resolve(self.client, target))
        if ref.alias:
            self.primary = ref.alias
        else:
            self.primary = f"v{ref.version}" if ref.version is not None else "latest"
        self.split = check_split(serve_cfg.split)
        self.shadow: str | None = serve_cfg.shadow or None
        self.targets = {self.primary: ref}  # label -> what it names in the registry
        for alias in [*self.split, *([self.shadow] if self.shadow else [])]:
            self.targets.setdefault(alias, ModelRef(ref.name, alias=alias))
        self.aliases = {label for label, target in self.targets.items() if target.alias}
        self.routes: dict[str, int] = {}  # label -> the version serving it now
        self.versions: dict[int, Served] = {}
        self.numbered: OrderedDict[int, None] = OrderedDict()  # loaded for no label: LRU order
        self.ready = False
        self.failed: str | None = None  # why the first load failed: the service stops
        self._loading: dict[int, asyncio.Task] = {}
        self._workdir = tempfile.TemporaryDirectory(prefix="visionflow-serve-")

    @property
    def client(self):
        import mlflow

        return mlflow.MlflowClient()

    # -- start and refresh

    def resolve_all(self) -> dict[str, int]:
        """Each label's version in the registry now (blocking: MLflow calls)."""
        return {label: self.resolve(target) for label, target in self.targets.items()}

    async def start(self, routes: dict[str, int] | None = None) -> None:
        """Load and warm every labelled version, then take traffic."""
        routes = routes or await asyncio.to_thread(self.resolve_all)
        for version in dict.fromkeys(routes.values()):
            await self._ensure(version, labelled=True)
        self.routes = dict(routes)
        self.ready = True
        self._publish()
        for label, target in self.targets.items():
            loaded = self.versions[self.routes[label]].loaded
            said = f"{target} (the latest)" if label == "latest" else str(target)
            log.info(
                "serving %s: v%d, %s (%s)", said, loaded.version, loaded.variant, loaded.reason
            )
        if self.split:
            said = ", ".join(f"{a} {w:.0%}" for a, w in self.split.items())
            log.info("traffic split by X-Visionflow-Key (else at random): %s", said)
        if self.shadow:
            log.info(
                "shadow: %s gets a copy of each request; answers stay %s's",
                self.shadow,
                self.primary,
            )

    async def refresh_forever(self, every_s: float) -> None:
        while True:
            await asyncio.sleep(every_s)
            try:
                await self.refresh()
            except Exception as err:  # the registry may be back next time; serve as before
                log.warning("alias refresh failed, serving as before: %s", err)

    async def refresh(self) -> None:
        """Resolve the labels again; move those that changed, each only once its new version
        is loaded and warmed."""
        now = await asyncio.to_thread(self.resolve_all)
        moved = False
        try:
            for label, version in now.items():
                old = self.routes.get(label)
                if version == old:
                    continue
                await self._ensure(version, labelled=True)
                self.routes[label] = version
                self.numbered.pop(version, None)
                if old is not None and old not in self.routes.values():
                    self.numbered[old] = None  # requests may hold it: it leaves by LRU, if ever
                moved = True
                log.info(
                    "%s moved from v%s to v%d (loaded and warmed before the switch)",
                    self.targets[label],
                    old,
                    version,
                )
        finally:
            if moved:
                self._evict()
                self._publish()

    # -- routing

    def route(self, key: str | None) -> tuple[Served, str]:
        """The version answering an unversioned request, and the label it came by."""
        if not self.ready:
            raise NotReady(f"{self.name}: still loading its versions")
        label = choose(self.split, key) if self.split else self.primary
        return self.versions[self.routes[label]], label

    def primary_version(self) -> Served:
        """The version MODEL names now (what the model's metadata describes)."""
        if not self.ready:
            raise NotReady(f"{self.name}: still loading its versions")
        return self.versions[self.routes[self.primary]]

    def shadow_of(self, answering: Served) -> Served | None:
        if not self.shadow or not self.ready:
            return None
        served = self.versions[self.routes[self.shadow]]
        return None if served is answering else served

    async def get(self, version: int) -> Served:
        """A version by number, loaded on demand (ModelNotFound if it is not registered)."""
        if (served := self.versions.get(version)) is not None:
            if version in self.numbered:
                self.numbered.move_to_end(version)
            return served
        await asyncio.to_thread(self.resolve, ModelRef(self.name, version=version))
        return await self._ensure(version, labelled=False)

    @contextlib.contextmanager
    def lease(self, served: Served) -> Iterator[Served]:
        """Hold `served` for one request: it is not closed before the request ends."""
        served.inflight += 1
        try:
            yield served
        finally:
            served.inflight -= 1
            if served.retired and served.inflight == 0:
                served.batcher.close()

    def registered_versions(self) -> list[int]:
        found = self.client.search_model_versions(f"name = '{self.name}'")
        return sorted(int(v.version) for v in found)

    # -- loading and eviction

    async def _ensure(self, version: int, labelled: bool) -> Served:
        if (served := self.versions.get(version)) is not None:
            return served
        task = self._loading.get(version)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._load(version, labelled))
            self._loading[version] = task
            task.add_done_callback(lambda _: self._loading.pop(version, None))
        # Shielded: a request that times out must not cancel a load others wait for.
        return await asyncio.shield(task)

    async def _load(self, version: int, labelled: bool) -> Served:
        cfg = self.cfg
        loaded = await asyncio.to_thread(
            self.loader,
            self.name,
            version,
            cfg.variant,
            cfg.threads,
            cfg.max_batch_size,
            Path(self._workdir.name),
        )
        size = loaded.spec.image_size
        await asyncio.to_thread(loaded.infer, np.zeros((1, 3, size, size), np.float32))  # warm
        labels = (self.name, str(version), loaded.variant)
        batch_hist = self.metrics.batch_size.labels(*labels)
        model_hist = self.metrics.model.labels(*labels)
        queue_hist = self.metrics.queue.labels(*labels)

        def on_batch(size: int, model_s: float, queue_s: list[float]) -> None:
            batch_hist.observe(size)
            model_hist.observe(model_s)
            for waited in queue_s:
                queue_hist.observe(waited)

        batcher = Batcher(
            loaded.infer,
            cfg.max_batch_size,
            cfg.max_delay_ms / 1000,
            cfg.queue_size,
            name=f"{self.name}/{version}",
            on_batch=on_batch,
            on_queue=self.metrics.queued.labels(*labels).set,
        )
        served = self.versions[version] = Served(loaded, batcher)
        if not labelled and version not in self.routes.values():
            self.numbered[version] = None
            self._evict()
        self._publish()
        return served

    def _evict(self) -> None:
        while len(self.numbered) > self.cfg.max_versions:
            version, _ = self.numbered.popitem(last=False)
            served = self.versions.pop(version)
            served.retired = True
            if served.inflight == 0:
                served.batcher.close()
            self._remove_files(served.loaded)  # its sessions hold what they need
            with contextlib.suppress(KeyError):
                self.metrics.queued.remove(self.name, str(version), served.variant)
            log.info("v%d unloaded (least recently used of serve.max_versions)", version)

    def _remove_files(self, loaded: LoadedVersion) -> None:
        root = Path(self._workdir.name)
        for path in loaded.files.values():
            if root in path.parents:  # the version's own download directory
                shutil.rmtree(root / path.relative_to(root).parts[0], ignore_errors=True)

    def _publish(self) -> None:
        """The loaded-versions gauge, with each version's labels."""
        self.metrics.loaded.clear()
        for version, served in self.versions.items():
            labels = sorted(label for label, v in self.routes.items() if v == version)
            self.metrics.loaded.labels(
                self.name, str(version), served.variant, ",".join(labels)
            ).set(1)

    async def aclose(self) -> None:
        for task in list(self._loading.values()):
            task.cancel()
        await asyncio.gather(*(s.batcher.aclose() for s in self.versions.values()))
        self._workdir.cleanup()
