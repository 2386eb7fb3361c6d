"""Following the Master's log while a PyTorchJob or TrainJob runs (for `launcher`).

The Master's training container log is followed (`follow=True`) in a daemon thread, one stream
per container instance, and handed to the calling thread through a queue: lines arrive as they
are written, none twice (a stream that breaks is reopened and the lines already seen are
skipped), and `log` is only ever called from the calling thread.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from visionflow.cluster.kubeapi import CONNECT_TIMEOUT_S, READ_TIMEOUT_S, error_status

TAIL_LINES = 30  # of the Master's log, in a failure's message
LOG_GRACE_S = 10.0  # how long a finished job's log stream may take to deliver its last lines


class MasterLog:
    """The Master pod's training-container log: followed while the job runs, its last lines
    kept for a failure's message. The launch sets `pod` each time it lists the pods.
    `container`: the training container's name (a PyTorchJob's `pytorch`, a TrainJob's `node`).
    """

    def __init__(
        self,
        core,
        namespace: str,
        log: Callable[[str], None],
        note: Callable[[str], None],
        container: str = "pytorch",
    ) -> None:
        self.core, self.ns, self.log, self.note = core, namespace, log, note
        self.container = container
        self.pod: dict[str, Any] | None = None  # the Master pod, as last listed
        self.lines: queue.Queue = queue.Queue()
        self.tail: collections.deque[str] = collections.deque(maxlen=TAIL_LINES)
        self.seen: dict[tuple, int] = collections.defaultdict(int)  # lines per container instance
        self.done_keys: set[tuple] = set()  # instances streamed to their end
        self.follower: _Follower | None = None

    def instance(self) -> tuple[str, tuple, dict[str, Any]] | None:
        """(pod name, instance key, container state) of the Master's training container."""
        if self.pod is None:
            return None
        meta, status = self.pod.get("metadata") or {}, self.pod.get("status") or {}
        for cs in status.get("containerStatuses") or []:
            if cs.get("name") == self.container:
                key = (meta.get("uid") or meta.get("name"), int(cs.get("restartCount") or 0))
                return meta.get("name"), key, cs.get("state") or {}
        return None

    def follow(self) -> None:
        if self.follower is not None and self.follower.is_alive():
            return
        instance = self.instance()
        if instance is None:
            return
        pod, key, state = instance
        if key in self.done_keys or not (state.get("running") or state.get("terminated")):
            return
        self.drain(time.monotonic())  # count every line of a previous stream before skipping them
        self.follower = _Follower(
            self.core, self.ns, pod, self.container, key, self.seen[key], self.lines
        )
        self.follower.start()

    def drain(self, until: float) -> None:
        """Hand queued log lines to `log` until `until` (at least those already queued)."""
        while True:
            remaining = until - time.monotonic()
            try:
                key, line = (
                    self.lines.get(timeout=remaining) if remaining > 0 else self.lines.get_nowait()
                )
            except queue.Empty:
                return
            if line is None:
                self._stream_ended(key)
                continue
            self.seen[key] += 1
            self.tail.append(line)
            self.log(line)

    def _stream_ended(self, key: tuple) -> None:
        """A log stream ended: done if its container had exited, else it is reopened next poll."""
        follower = self.follower
        if follower is None or follower.key != key:
            return
        if follower.error is not None:
            self.note(f"following the Master's log failed ({follower.error}); retrying")
            return
        instance = self.instance()
        if instance is not None and instance[1] == key and instance[2].get("terminated"):
            self.done_keys.add(key)

    def finish(self) -> bool:
        """After the job ended: deliver the Master's last lines. True when the log is complete."""
        self.follow()
        follower = self.follower
        if follower is not None:
            follower.join(LOG_GRACE_S)
        self.drain(time.monotonic())
        return follower is not None and not follower.is_alive() and follower.complete

    def tail_text(self, complete: bool = True) -> str:
        lines = list(self.tail)
        if not complete or not lines:
            fetched = self._fetch_tail()
            if isinstance(fetched, list):
                lines = fetched
            elif not lines:
                return f"\n(no log from the Master: {fetched})"
        text = "\n".join(f"  | {line}" for line in lines[-TAIL_LINES:])
        return f"\nlast {min(len(lines), TAIL_LINES)} lines of the Master's log:\n{text}"

    def _fetch_tail(self) -> list[str] | str:
        instance = self.instance()
        if instance is None:
            return "its pod was not found"
        try:
            text = self.core.read_namespaced_pod_log(
                instance[0], self.ns, container=self.container, tail_lines=TAIL_LINES,
                _request_timeout=(CONNECT_TIMEOUT_S, READ_TIMEOUT_S),
            )  # fmt: skip
        except Exception as exc:  # noqa: BLE001 - the failure is reported, not this
            return f"reading it failed: {error_status(exc)[0] if hasattr(exc, 'body') else exc}"
        return text.splitlines()


class _Follower(threading.Thread):
    """Follows one container instance's log; hands (key, line) to the queue, then (key, None)."""

    def __init__(
        self,
        core,
        namespace: str,
        pod: str,
        container: str,
        key: tuple,
        skip: int,
        out: queue.Queue,
    ):
        super().__init__(name=f"log-{pod}", daemon=True)
        self.core, self.namespace, self.pod, self.key = core, namespace, pod, key
        self.container = container
        self.skip, self.out = skip, out
        self.complete = False  # the stream ended normally (the container exited)
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            resp = self.core.read_namespaced_pod_log(
                self.pod, self.namespace, container=self.container, follow=True,
                _preload_content=False, _request_timeout=(CONNECT_TIMEOUT_S, None),
            )  # fmt: skip
            try:
                for n, line in enumerate(_lines(resp), 1):
                    if n > self.skip:
                        self.out.put((self.key, line))
            finally:
                resp.close()
            self.complete = True
        except BaseException as exc:  # noqa: BLE001 - reported by the launch loop
            self.error = exc
        finally:
            self.out.put((self.key, None))


def _lines(resp) -> Iterator[str]:
    """Lines of a streamed (chunked) response as they arrive, the last one even without '\\n'."""
    buffer = bytearray()
    chunks = (
        resp.stream(amt=None, decode_content=False)
        if resp.chunked
        else iter(lambda: resp.read1(65536), b"")
    )
    for chunk in chunks:
        buffer.extend(chunk if isinstance(chunk, bytes) else chunk.encode())
        while (nl := buffer.find(b"\n")) != -1:
            yield buffer[:nl].decode("utf-8", "replace").rstrip("\r")
            del buffer[: nl + 1]
    if buffer:
        yield buffer.decode("utf-8", "replace").rstrip("\r")
