"""Work the training loop hands off: checkpoint uploads and metric logging, in a worker thread.

So a slow or briefly unavailable MinIO or MLflow (each call retries through visionflow.retry)
does not stall training. The queue is bounded: when it is full the loop waits rather than
holding ever more in memory. Its first failure is raised in the loop at the next hand-off, or
at the flush that ends training, naming what could not be done.
"""

from __future__ import annotations

import itertools
import logging
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

log = logging.getLogger("visionflow.background")


class BackgroundError(RuntimeError):
    """A task handed to a BackgroundQueue failed."""


@dataclass(frozen=True)
class _Task:
    what: str  # for errors: "upload of last.ckpt to s3://..."
    run: Callable[[], None]
    discard: Callable[[], None] | None  # called instead of `run` when a newer task replaces it


class BackgroundQueue:
    """Runs tasks one at a time, in the order given, in a daemon thread.

    A task given with the `key` of a pending one replaces it in its place (a newer checkpoint
    of one name makes the upload of the older one moot). At most `maxsize` tasks wait; `submit`
    blocks until there is room. After a task fails, no other runs: `submit` and `flush` raise
    `BackgroundError` naming it.
    """

    def __init__(self, name: str, maxsize: int) -> None:
        if maxsize < 1:
            raise ValueError(f"maxsize must be at least 1, got {maxsize}")
        self.name, self.maxsize = name, maxsize
        self._pending: OrderedDict[Hashable, _Task] = OrderedDict()
        self._running = False
        self._error: BackgroundError | None = None
        self._changed = threading.Condition()
        self._keys = itertools.count()  # for tasks without a key of their own
        self._worker: threading.Thread | None = None

    def submit(
        self,
        what: str,
        run: Callable[[], None],
        key: Hashable | None = None,
        discard: Callable[[], None] | None = None,
    ) -> None:
        """Queue `run` (described by `what`), waiting while the queue is full."""
        task = _Task(what, run, discard)
        with self._changed:
            self._raise_error()
            if key is not None and key in self._pending:
                replaced, self._pending[key] = self._pending[key], task
                if replaced.discard is not None:
                    replaced.discard()
                return
            while len(self._pending) >= self.maxsize and self._error is None:
                self._changed.wait()
            self._raise_error()
            self._pending[key if key is not None else ("task", next(self._keys))] = task
            if self._worker is None:
                self._worker = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._worker.start()
            self._changed.notify_all()

    def flush(self) -> None:
        """Wait until every task has run; raise the first failure, if any.

        While an exception is already propagating (training failed), a failure here is logged
        instead, so that it does not hide the first one.
        """
        with self._changed:
            while (self._pending or self._running) and self._error is None:
                self._changed.wait()
            if self._error is not None and sys.exc_info()[1] is not None:
                log.error("%s", self._error)
                return
            self._raise_error()

    def _raise_error(self) -> None:
        if self._error is not None:
            raise self._error

    def _work(self) -> None:
        while True:
            with self._changed:
                while not self._pending:
                    self._changed.wait()
                _, task = self._pending.popitem(last=False)
                self._running = True
                self._changed.notify_all()  # room for a waiting submit
            try:
                task.run()
            except BaseException as err:  # noqa: BLE001 (raised in the submitting thread)
                failure = BackgroundError(f"{self.name}: {task.what} failed: {err}")
                failure.__cause__ = err
                with self._changed:
                    self._error, self._running = failure, False
                    for left in self._pending.values():
                        if left.discard is not None:
                            left.discard()
                    self._pending.clear()
                    self._changed.notify_all()
                return
            with self._changed:
                self._running = False
                self._changed.notify_all()
