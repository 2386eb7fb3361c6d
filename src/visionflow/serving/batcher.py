"""Dynamic batching: concurrent requests for one version become one model call.

Requests queue their images; a worker takes the oldest request and waits up to `max_delay_s`
from its arrival for others to fill the batch to `max_batch_size` images, then runs the model
once on a thread of its own, so the event loop keeps accepting requests meanwhile (and the next
batch gathers while this one runs). A request is never split: one larger than `max_batch_size`
runs alone. The queue holds at most `queue_size` images; past that `submit` raises `QueueFull`
at once rather than letting latency grow without bound. A request whose caller gave up (a
timeout) leaves the queue, and its images are not computed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

log = logging.getLogger("visionflow.serve")


class QueueFull(RuntimeError):
    """The version's queue has no room for the request's images now."""


class Closed(RuntimeError):
    """The batcher was closed (its version is no longer served)."""


@dataclass
class Result:
    outputs: list[Any]  # one per image of the request
    queue_s: float  # from submit to the start of the model call
    model_s: float  # the model call (the whole batch)
    batch_size: int  # images in that call


@dataclass
class _Item:
    images: np.ndarray
    future: asyncio.Future
    arrived: float = field(default_factory=time.perf_counter)
    taken: bool = False

    @property
    def n(self) -> int:
        return len(self.images)


# (batch size, model seconds, queue seconds of each request in it)
BatchObserver = Callable[[int, float, list[float]], None]


class Batcher:
    def __init__(
        self,
        infer: Callable[[np.ndarray], list[Any]],
        max_batch_size: int,
        max_delay_s: float,
        queue_size: int,
        name: str = "model",
        on_batch: BatchObserver | None = None,
        on_queue: Callable[[int], None] | None = None,
    ) -> None:
        if max_batch_size < 1 or queue_size < 1 or max_delay_s < 0:
            raise ValueError(
                "serve.max_batch_size and serve.queue_size must be at least 1, "
                "serve.max_delay_ms at least 0"
            )
        self.infer, self.name = infer, name
        self.max_batch_size, self.queue_size = max_batch_size, queue_size
        self.max_delay_s = max_delay_s
        self.on_batch, self.on_queue = on_batch, on_queue
        self.waiting = 0  # images queued and not yet taken into a batch
        self._queue: deque[_Item] = deque()
        self._arrived = asyncio.Event()
        self._closed = False
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{name}")
        self._worker = asyncio.get_running_loop().create_task(self._run(), name=f"batch-{name}")

    async def submit(self, images: np.ndarray) -> Result:
        """The outputs for `images` (N, ...), computed in some batch. Raises QueueFull, Closed."""
        if self._closed:
            raise Closed(f"{self.name} is no longer served")
        if self.waiting + len(images) > self.queue_size:
            raise QueueFull(
                f"{self.name}: the queue holds {self.waiting} of serve.queue_size="
                f"{self.queue_size} images; this request has {len(images)}"
            )
        item = _Item(images, asyncio.get_running_loop().create_future())
        item.future.add_done_callback(lambda _: self._left(item))
        self._queue.append(item)
        self._count(len(images))
        self._arrived.set()
        return await item.future

    def close(self) -> None:
        """Take no more requests; those queued are still answered, then the thread ends."""
        self._closed = True
        self._arrived.set()

    async def aclose(self) -> None:
        self.close()
        await asyncio.gather(self._worker, return_exceptions=True)

    def _left(self, item: _Item) -> None:
        if not item.taken:  # cancelled while queued (its caller timed out): free its room
            item.taken = True
            self._count(-item.n)

    def _count(self, delta: int) -> None:
        self.waiting += delta
        if self.on_queue:
            self.on_queue(self.waiting)

    def _drop_abandoned(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queue.popleft()

    async def _run(self) -> None:
        try:
            while True:
                self._drop_abandoned()
                if not self._queue:
                    if self._closed:
                        return
                    self._arrived.clear()
                    await self._arrived.wait()
                    continue
                await self._gather()
                batch = self._take()
                if batch:
                    await self._call(batch)
        finally:
            self._executor.shutdown(wait=False)

    async def _gather(self) -> None:
        """Wait until the batch is full or the oldest request has waited max_delay_s."""
        deadline = self._queue[0].arrived + self.max_delay_s
        while self.waiting < self.max_batch_size and not self._closed:
            left = deadline - time.perf_counter()
            if left <= 0:
                return
            self._arrived.clear()
            try:
                await asyncio.wait_for(self._arrived.wait(), left)
            except TimeoutError:
                return

    def _take(self) -> list[_Item]:
        batch: list[_Item] = []
        size = 0
        while self._queue:
            item = self._queue[0]
            if item.future.done():  # abandoned
                self._queue.popleft()
                continue
            if batch and size + item.n > self.max_batch_size:
                break
            self._queue.popleft()
            item.taken = True
            self._count(-item.n)
            batch.append(item)
            size += item.n
        return batch

    async def _call(self, batch: list[_Item]) -> None:
        started = time.perf_counter()
        images = np.concatenate([item.images for item in batch])
        loop = asyncio.get_running_loop()
        try:
            outputs = await loop.run_in_executor(self._executor, self.infer, images)
        except Exception as err:
            log.exception("%s: model call on %d images failed", self.name, len(images))
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(
                        RuntimeError(f"model call failed ({type(err).__name__}: {err})")
                    )
            return
        model_s = time.perf_counter() - started
        queue_s = [started - item.arrived for item in batch]
        at = 0
        for item, waited in zip(batch, queue_s, strict=True):
            if not item.future.done():
                item.future.set_result(
                    Result(outputs[at : at + item.n], waited, model_s, len(images))
                )
            at += item.n
        if self.on_batch:
            self.on_batch(len(images), model_s, queue_s)
