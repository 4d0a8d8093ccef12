"""ASGI middleware that bounds request bodies in size and in time, while they stream in.

A body larger than the limit is answered 413 ``too_large`` as soon as the limit is crossed (or at
once, from Content-Length), without buffering the rest; a body that stalls longer than the read
timeout is answered 408 ``request_timeout``. Other requests are unaffected: each connection only
ever waits on its own socket.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sceneprint.service.errors import PROBLEM_JSON, problem


class _Rejected(Exception):
    def __init__(self, status: int, code: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.body = problem(status, code, title, detail)
        self.status = status


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, max_body_bytes: int, read_timeout_s: float) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        declared = _content_length(scope)
        if declared is not None and declared > self.max_body_bytes:
            await _send_problem(send, self._too_large(declared))
            return

        received = 0
        rejection: _Rejected | None = None
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received, rejection
            try:
                message = await asyncio.wait_for(receive(), timeout=self.read_timeout_s)
            except TimeoutError:
                rejection = _Rejected(408, "request_timeout", "Request timeout",
                                      f"the request body stalled for more than {self.read_timeout_s:g} s")
                raise rejection from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body_bytes:
                    rejection = self._too_large(received)
                    raise rejection
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            # Once the body was refused, whatever the app answers (a parse error) is replaced.
            if rejection is not None:
                return
            response_started = response_started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _Rejected:
            pass
        except Exception:
            if rejection is None:
                raise
        if rejection is not None and not response_started:
            await _send_problem(send, rejection)

    def _too_large(self, size: int) -> _Rejected:
        return _Rejected(413, "too_large", "Upload too large",
                         f"the request body is over {self.max_body_bytes} bytes (at least {size} received or declared)")


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", []):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


async def _send_problem(send: Send, rejection: _Rejected) -> None:
    body = json.dumps(rejection.body).encode()
    headers: list[Any] = [(b"content-type", PROBLEM_JSON.encode()), (b"content-length", str(len(body)).encode()),
                          (b"connection", b"close")]
    await send({"type": "http.response.start", "status": rejection.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
