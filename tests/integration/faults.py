"""A TCP proxy on 127.0.0.1 that stands for a server in an outage: it drops, resets or answers 503.

Put in front of moto's S3 server or the MLflow server, it passes traffic through until told
otherwise. Each change of mode closes the connections open at the time, as a server that goes
down (or comes back) does.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from collections.abc import Iterator
from enum import Enum

# What MinIO answers when it is overloaded; MLflow's client retries any 503 alike.
_503 = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
    b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
)
_SLOW_DOWN = (
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)


class Mode(Enum):
    PASS = "pass"  # forward both ways
    DROP = "drop"  # accept, then never answer
    RESET = "reset"  # accept, then reset the connection (RST)
    UNAVAILABLE = "503"  # answer every request 503 SlowDown


class FaultyProxy:
    """Forwards 127.0.0.1:`port` to 127.0.0.1:`target_port`, or fails as `mode` says."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.mode = Mode.PASS
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._watch: list[tuple[bytes, threading.Event, Mode | None]] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def set_mode(self, mode: Mode) -> None:
        with self._lock:
            self.mode, closing = mode, list(self._open)
            self._open.clear()
        for sock in closing:
            _reset(sock)

    def seen(self, request: bytes, then: Mode | None = None) -> threading.Event:
        """An event set once a client sends bytes that contain `request` through the proxy. With
        `then`, the proxy switches to that mode at once, before it forwards them: the request
        seen fails, however soon the client would have been done."""
        event = threading.Event()
        with self._lock:
            self._watch.append((request, event, then))
        return event

    def close(self) -> None:
        self._listener.close()
        self.set_mode(Mode.RESET)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:  # closed
                return
            with self._lock:
                mode = self.mode
                self._open.add(client)
            if mode is Mode.RESET:
                _reset(client)
            elif mode is Mode.PASS:
                threading.Thread(target=self._forward, args=(client,), daemon=True).start()
            elif mode is Mode.UNAVAILABLE:
                threading.Thread(target=self._unavailable, args=(client,), daemon=True).start()
            # DROP: hold it, unanswered, until the mode changes

    def _forward(self, client: socket.socket) -> None:
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            _reset(client)
            return
        with self._lock:
            self._open.add(server)
        back = threading.Thread(target=self._pipe, args=(server, client, False), daemon=True)
        back.start()
        self._pipe(client, server, True)

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        try:
            while data := src.recv(65536):
                if from_client:
                    self._note(data)
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def _note(self, data: bytes) -> None:
        switch = None
        with self._lock:
            for request, event, then in self._watch:
                if request in data and not event.is_set():
                    event.set()
                    switch = switch or then
        if switch is not None:
            self.set_mode(switch)

    def _unavailable(self, client: socket.socket) -> None:
        with contextlib.suppress(OSError):
            client.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head and (data := client.recv(65536)):
                head += data
            client.sendall(_503 % (len(_SLOW_DOWN), _SLOW_DOWN))
            client.close()


def _reset(sock: socket.socket) -> None:
    """Close with an RST, not a FIN: what a client sees from a server that went away.
    (`shutdown` first: `close` alone would neither wake a thread blocked reading the socket nor
    end the connection while it is blocked.)"""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    for end in (lambda: sock.shutdown(socket.SHUT_RDWR), sock.close):
        with contextlib.suppress(OSError):
            end()


@contextlib.contextmanager
def proxy_to(target_url: str) -> Iterator[FaultyProxy]:
    proxy = FaultyProxy(int(target_url.rsplit(":", 1)[1].rstrip("/")))
    try:
        yield proxy
    finally:
        proxy.close()


def outage(proxy: FaultyProxy, seconds: float) -> None:
    """Fail every connection for `seconds`: dropped, then reset, then answered 503 (a third of
    the time each), then pass traffic through again."""
    for mode in (Mode.DROP, Mode.RESET, Mode.UNAVAILABLE):
        proxy.set_mode(mode)
        time.sleep(seconds / 3)
    proxy.set_mode(Mode.PASS)
