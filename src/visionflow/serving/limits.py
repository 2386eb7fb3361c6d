"""The request-body cap of `visionflow serve`, as pure ASGI middleware.

A body announced (Content-Length) larger than the cap is refused with 413 before a byte of it
is read, and before any route runs. A body without a length (chunked) is counted as it
arrives; once past the cap the client gets 413 at once, the app sees the client as gone, and
whatever the app then tries to answer is dropped.
"""

from __future__ import annotations

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send


async def send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    # The unread rest of the body makes the connection unusable for a next request.
    headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, setting: str = "serve.max_body_mb") -> None:
        self.app, self.max_bytes, self.setting = app, max_bytes, setting

    def _too_large(self, size: str) -> dict:
        return {
            "error": f"request body {size} is over the {self.max_bytes:,} bytes {self.setting} allows"
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                announced = int(length)
            except ValueError:
                await send_json(send, 400, {"error": f"Content-Length {length!r} is not a number"})
                return
            if announced > self.max_bytes:
                await send_json(send, 413, self._too_large(f"of {announced:,} bytes"))
                return

        received, refused, started = 0, False, False

        async def counted_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    refused = True
                    if not started:
                        await send_json(send, 413, self._too_large(f"(so far {received:,} bytes)"))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return  # the 413 went out already
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not refused:  # the app's reaction to the refusal (client gone) is no failure
                raise
