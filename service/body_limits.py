"""ASGI middleware that bounds request bodies in size (per route) and in stall time, while they stream in.

Each route has its own limit: ``/classify`` takes one file, enrollment and added clips take at most
``clips_per_enrollment`` files, everything else a small JSON body at most. A body larger than its
route's limit is answered 413 ``too_large`` as soon as the limit is crossed (or at once, from
Content-Length), without buffering the rest, and the connection is closed; a body that stalls longer
than the read timeout is answered 408 ``request_timeout``. (The whole body's deadline is kept at the
connection level, see ``connections.py``, so that it holds even where no route reads the body.)
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sceneprint.service.errors import PROBLEM_JSON, problem
from sceneprint.service.routes.uploads import PART_OVERHEAD_BYTES, REQUEST_OVERHEAD_BYTES
from sceneprint.service.settings import Settings

SMALL_BODY_BYTES = 64 * 1024  # JSON bodies (key management), and any body a route does not read


def route_body_limit(settings: Settings) -> Callable[[str, str], int]:
    """The body limit of a request, from its method and path."""
    one_file = settings.max_upload_bytes + PART_OVERHEAD_BYTES
    classify = one_file + REQUEST_OVERHEAD_BYTES
    clips = settings.clips_per_enrollment * one_file + REQUEST_OVERHEAD_BYTES

    def limit(method: str, path: str) -> int:
        if method == "POST" and path == "/classify":
            return classify
        if method == "POST" and path.startswith("/scenes/") and path.endswith(("/enroll", "/clips")):
            return clips
        return SMALL_BODY_BYTES

    return limit


class _Rejected(Exception):
    def __init__(self, status: int, code: str, title: str, detail: str) -> None:
        super().__init__(detail)
        self.body = problem(status, code, title, detail)
        self.status = status


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, *, limit: Callable[[str, str], int], read_timeout_s: float) -> None:
        self.app = app
        self.limit = limit
        self.read_timeout_s = read_timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        max_bytes = self.limit(scope["method"], scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > max_bytes:
            await _send_problem(send, _too_large(max_bytes, declared))
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
                if received > max_bytes:
                    rejection = _too_large(max_bytes, received)
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


def _too_large(max_bytes: int, size: int) -> _Rejected:
    return _Rejected(413, "too_large", "Upload too large",
                     f"the request body is over this route's limit of {max_bytes} bytes (at least {size} received "
                     "or declared)")


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
