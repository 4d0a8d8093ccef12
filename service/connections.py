"""The HTTP server: uvicorn, with the connection-level limits it lacks added to its h11 protocol.

uvicorn closes idle kept-alive connections (``timeout_keep_alive``) and bounds the SIGTERM grace
period (``timeout_graceful_shutdown``), and both are used as they are. It has no timeout for a
request's headers and none for a whole body, and its concurrency limit answers 503 only once it has
read a request's headers, so a socket that never sends them is held forever; it also logs every
failed ``accept()``. Rather than change servers (hypercorn and granian each lack a different one of
these), ``GuardedH11Protocol`` adds them to uvicorn's own h11 protocol:

- **Header timeout**: a request's headers must arrive within ``header_timeout_s`` of the connection
  opening (or of the request's first byte on a kept-alive connection); else 408 and close.
- **Body deadline**: the whole body must arrive within ``body_timeout_s`` of the headers, however
  slowly it trickles, whether or not a route reads it; else 408 (or a close, once a response began).
- **Connection bound**: past ``max_connections`` open connections, the oldest connection that is only
  waiting (for a request's headers, or idle between requests) is closed to make room; when none is,
  the new connection is answered 503 at once and closed. Idle sockets therefore cannot lock out
  clients that send requests, and nothing is left hanging.
- **Shutdown**: a request still running when the SIGTERM grace period ends is answered 503
  ``shutting_down`` (a problem document, with ``Retry-After``) where uvicorn would send its own
  text/plain 500; any other last-resort answer of uvicorn's is a 500 problem document.
- **Log floods**: refusals, timeouts and ``accept()`` failures (out of file descriptors) are logged at
  most once per ``LOG_EVERY_S`` each, with a count of what was left out.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol, RequestResponseCycle

from sceneprint.service.errors import PROBLEM_JSON, ShuttingDown, problem
from sceneprint.service.settings import Settings

log = logging.getLogger("sceneprint.service.connections")
LOG_EVERY_S = 10.0
SPARE_FILE_DESCRIPTORS = 256  # for the database, the clip store, the model and the listening socket


class RateLimitedLog:
    """Logs a kind of message at most once per ``every_s``; the ones in between are counted, then reported."""

    def __init__(self, logger: logging.Logger, *, every_s: float = LOG_EVERY_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.logger, self.every_s, self.clock = logger, every_s, clock
        self._last: dict[str, float] = {}
        self._skipped: dict[str, int] = {}

    def warning(self, kind: str, message: str, *args: Any) -> None:
        now = self.clock()
        last = self._last.get(kind)
        if last is not None and now - last < self.every_s:
            self._skipped[kind] = self._skipped.get(kind, 0) + 1
            return
        skipped = self._skipped.pop(kind, 0)
        self._last[kind] = now
        suffix = f" ({skipped} more like this in the last {now - last:.0f} s)" if skipped and last is not None else ""
        self.logger.warning(message + suffix, *args)


def accept_error_handler(limited: RateLimitedLog) -> Callable[[asyncio.AbstractEventLoop, dict[str, Any]], None]:
    """An event-loop exception handler that rate-limits asyncio's "accept() out of system resource" reports."""

    def handle(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if str(context.get("message", "")).startswith("socket.accept() out of system resource"):
            limited.warning("accept", "cannot accept connections: %s; open connections are bounded by "
                                      "SCENEPRINT_MAX_CONNECTIONS, the process's file limit is `ulimit -n`",
                            context.get("exception"))
            return
        loop.default_exception_handler(context)

    return handle


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float
    body_timeout_s: float
    max_connections: int


@dataclass
class _Connections:
    """What the protocol instances of one server share."""

    limits: ConnectionLimits
    log: RateLimitedLog
    open: int = 0
    waiting: dict[GuardedH11Protocol, None] = field(default_factory=dict)  # oldest first: they can be closed


def _raw_problem(status: int, reason: str, code: str, detail: str) -> bytes:
    body = json.dumps(problem(status, code, reason, detail)).encode()
    head = (f"HTTP/1.1 {status} {reason}\r\ncontent-type: {PROBLEM_JSON}\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


class _GuardedCycle(RequestResponseCycle):
    """uvicorn's request cycle, whose last-resort answer (the application failed, or was cancelled, before it began
    one) is a problem document, not uvicorn's text/plain 500: 503 ``shutting_down`` once the server is shutting
    down (the grace period ended with the request still running), else 500 ``internal_error``."""

    shutting_down = False  # set by the protocol when the server begins to shut down

    async def send_500_response(self) -> None:
        if self.shutting_down:
            error = ShuttingDown("the server stopped before this request was answered; retry, on another replica or "
                                 "once it is back")
            status, body = error.status, problem(error.status, error.code, error.title, error.detail)
            headers = [(name.lower().encode(), value.encode()) for name, value in error.headers
                       if name.lower() != "connection"]
        else:
            status, headers = 500, []
            body = problem(500, "internal_error", "Internal error", "the service failed unexpectedly")
        content = json.dumps(body).encode()
        await self.send({"type": "http.response.start", "status": status,
                         "headers": [(b"content-type", PROBLEM_JSON.encode()),
                                     (b"content-length", str(len(content)).encode()),
                                     (b"connection", b"close"), *headers]})
        await self.send({"type": "http.response.body", "body": content, "more_body": False})


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a header timeout, a body deadline and a connection bound."""

    shared: _Connections  # set on the subclass that ``guarded_protocol`` makes for each server

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_kind = ""
        self._counted = False
        self._shutting_down = False
        shared = self.shared
        if shared.open >= shared.limits.max_connections:
            oldest = next(iter(shared.waiting), None)
            if oldest is None:
                shared.log.warning("full", "%d connections open, none idle: answering new ones 503",
                                   shared.open)
                self.transport.write(_raw_problem(503, "Service Unavailable", "too_many_connections",
                                                  "the server has too many open connections; retry shortly"))
                self.transport.close()
                return
            shared.log.warning("evict", "%d connections open: closing the longest-waiting idle one", shared.open)
            oldest._close_waiting()
        shared.open += 1
        self._counted = True
        self._wait_for_headers()

    def connection_lost(self, exc: Exception | None) -> None:
        self._release()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused, timed out or closed to make room: nothing it sends is served
        if self._counted and self.conn.their_state is h11.IDLE and self._timer is None:
            self._wait_for_headers()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        self._follow_request()

    def handle_events(self) -> None:
        super().handle_events()
        cycle = self.cycle
        if cycle is not None and type(cycle) is RequestResponseCycle:
            # The cycle uvicorn just made (its task has not run yet): its last-resort answer becomes ours.
            cycle.__class__ = _GuardedCycle
            assert isinstance(cycle, _GuardedCycle)
            cycle.shutting_down = self._shutting_down

    def shutdown(self) -> None:
        self._shutting_down = True
        if isinstance(self.cycle, _GuardedCycle):
            self.cycle.shutting_down = True
        super().shutdown()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._counted and not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            # Idle between requests: uvicorn's keep-alive timeout closes it; until then it may make room.
            self._cancel_timer()
            self.shared.waiting[self] = None
        self._follow_request()

    # --- the deadlines --------------------------------------------------------------------------

    def _wait_for_headers(self) -> None:
        self.shared.waiting[self] = None
        self._arm("headers", self.shared.limits.header_timeout_s, self._headers_timed_out)

    def _arm(self, kind: str, seconds: float, callback: Callable[[], None]) -> None:
        self._cancel_timer()
        self._timer, self._timer_kind = self.loop.call_later(seconds, callback), kind

    def _follow_request(self) -> None:
        """Move from the header deadline to the body deadline, or drop both, as the request advances."""
        if not self._counted or self.conn.their_state is h11.IDLE:
            return
        self.shared.waiting.pop(self, None)
        if self.conn.their_state is h11.SEND_BODY:
            if self._timer is None or self._timer_kind != "body":
                self._arm("body", self.shared.limits.body_timeout_s, self._body_timed_out)
        else:
            self._cancel_timer()

    def _headers_timed_out(self) -> None:
        self._timer = None
        if self.conn.their_state is not h11.IDLE or self.transport.is_closing():
            return
        self.shared.log.warning("headers", "closed a connection that sent no complete request headers in %g s",
                                self.shared.limits.header_timeout_s)
        self.transport.write(_raw_problem(408, "Request Timeout", "request_timeout",
                                          f"the request headers did not arrive within "
                                          f"{self.shared.limits.header_timeout_s:g} s"))
        self._abort()

    def _body_timed_out(self) -> None:
        self._timer = None
        if self.conn.their_state is not h11.SEND_BODY or self.transport.is_closing():
            return
        self.shared.log.warning("body", "closed a connection whose request body did not arrive whole in %g s",
                                self.shared.limits.body_timeout_s)
        if self.cycle is not None and not self.cycle.response_started:
            self.transport.write(_raw_problem(408, "Request Timeout", "request_timeout",
                                              f"the request body did not arrive whole within "
                                              f"{self.shared.limits.body_timeout_s:g} s"))
        self._abort()

    def _close_waiting(self) -> None:
        """Close a connection that is only waiting, to make room for a new one."""
        self._abort()

    def _abort(self) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            # The application, if still running, sees a disconnect and its answer goes nowhere.
            self.cycle.disconnected = True
            self.cycle.keep_alive = False
            self.cycle.message_event.set()
        self._release()
        self.transport.close()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _release(self) -> None:
        self._cancel_timer()
        self.shared.waiting.pop(self, None)
        if self._counted:
            self._counted = False
            self.shared.open -= 1


def guarded_protocol(limits: ConnectionLimits) -> type[GuardedH11Protocol]:
    """A protocol class for one server: its instances share the connection count."""
    shared = _Connections(limits=limits, log=RateLimitedLog(log))
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"shared": shared})


class SceneprintServer(uvicorn.Server):
    """uvicorn's server with accept() failures logged at a bounded rate."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        asyncio.get_running_loop().set_exception_handler(accept_error_handler(RateLimitedLog(log)))
        await super().startup(sockets)


def make_server(app: Any, settings: Settings, *, host: str, port: int, log_level: str = "info") -> SceneprintServer:
    """The server ``sceneprint serve`` runs, with every connection-level limit from ``settings``."""
    limits = ConnectionLimits(header_timeout_s=settings.header_timeout_s, body_timeout_s=settings.body_timeout_s,
                              max_connections=settings.max_connections)
    # uvicorn's records go to the root logger's handler (``logs.configure_logging``), and its access log is
    # off: the service logs each request once, with its id and route template (``telemetry``).
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, http=guarded_protocol(limits), ws="none",
                            lifespan="on", timeout_keep_alive=settings.keep_alive_timeout_s,
                            timeout_graceful_shutdown=settings.shutdown_grace_s, log_config=None, access_log=False)
    return SceneprintServer(config)


def raise_open_file_limit(max_connections: int) -> None:
    """Lift the soft file-descriptor limit so that ``max_connections`` sockets fit, as far as the hard one allows."""
    needed = max_connections + SPARE_FILE_DESCRIPTORS
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        if target < needed:
            log.warning("the file limit (%d) is below SCENEPRINT_MAX_CONNECTIONS + %d: accept() will fail before "
                        "the connection bound is reached", target, SPARE_FILE_DESCRIPTORS)
