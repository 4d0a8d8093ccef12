"""ASGI middleware that gives each request an id, counts it, times it and logs one access event for it.

It sits outside every other middleware, so the answers they give themselves (413 for a body over its
limit, 408 for a stalled one) are counted and logged like the routes' answers. Requests are labelled
by route template (``/scenes/{name}``), never by raw path, which would make a series per scene name.
Health probes and scrapes that succeed are logged at DEBUG: a load balancer polling every few seconds
would otherwise drown the log.
"""

from __future__ import annotations

import json
import logging
import re
import time
from functools import lru_cache
from typing import Any

from fastapi.routing import iter_route_contexts
from starlette.datastructures import MutableHeaders
from starlette.requests import ClientDisconnect
from starlette.routing import compile_path
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sceneprint.service.errors import PROBLEM_JSON, problem
from sceneprint.service.logs import REQUEST_ID, request_id_from
from sceneprint.service.metrics import UNMATCHED_ROUTE, Metrics
from sceneprint.service.scenes import MODEL_USED

access_log = logging.getLogger("sceneprint.access")
error_log = logging.getLogger("sceneprint.service")
REQUEST_ID_HEADER = "X-Request-ID"
# The model a response was computed with (its version, and its identity key): during a reload, requests
# started before the switch finish on the old model, and say so.
MODEL_VERSION_HEADER = "X-Model-Version"
MODEL_KEY_HEADER = "X-Model-Key"
QUIET_ROUTES = frozenset({"/healthz", "/readyz", "/metrics"})
# nginx's "client closed request": what a request is counted and logged as when its client went away before
# the answer (a disconnect mid-upload), which is no error of the server's.
CLIENT_CLOSED_REQUEST = 499
MAX_LOGGED_PATH = 256  # characters of the raw path kept in the access event
CONVERTER = re.compile(r"{([^}:]+):[^}]*}")  # "{name:path}" -> "{name}", as the OpenAPI document writes it


def route_template(scope: Scope) -> str:
    """The path template of the route that handled (or would have handled) the request, e.g. ``/scenes/{name}``."""
    route = scope.get("route")
    path = getattr(route, "path", None) if route is not None else _template_before_routing(scope)
    return CONVERTER.sub(r"{\1}", path) if isinstance(path, str) and path else UNMATCHED_ROUTE


def _template_before_routing(scope: Scope) -> str | None:
    """For a request answered before routing (a body refused by its size): the route the router would pick."""
    path, method = scope["path"], scope["method"]
    other_method = None
    for route in iter_route_contexts(getattr(scope.get("app"), "routes", [])):
        if route.path and _path_regex(route.path).fullmatch(path):
            if not route.methods or method in route.methods:
                return route.path
            other_method = other_method or route.path
    return other_method


@lru_cache(maxsize=256)
def _path_regex(template: str) -> re.Pattern[str]:
    return compile_path(template)[0]


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return str(value.decode("latin-1"))
    return None


def _model_version(scope: Scope) -> str | None:
    used = MODEL_USED.get()
    if used is not None:
        return used.version
    scenes = getattr(getattr(scope.get("app"), "state", None), "scenes", None)
    return scenes.model.version if scenes is not None else None


class TelemetryMiddleware:
    """Request id, request metrics and the access event, for every HTTP request."""

    def __init__(self, app: ASGIApp, *, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = request_id_from(_header(scope, b"x-request-id"))
        token = REQUEST_ID.set(request_id)
        model_token = MODEL_USED.set(None)  # the service sets it when the request takes a model
        started = time.perf_counter()
        status = 500  # what the client gets if the app fails before it answers

        started_response = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, started_response
            if message["type"] == "http.response.start":
                status, started_response = message["status"], True
                headers = MutableHeaders(scope=message)
                headers[REQUEST_ID_HEADER] = request_id
                used = MODEL_USED.get()
                if used is not None:
                    headers[MODEL_VERSION_HEADER] = used.version
                    headers[MODEL_KEY_HEADER] = used.key
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except ClientDisconnect:
            # Nobody is left to answer; the access event (INFO, no traceback) records the status as 499.
            if not started_response:
                status = CLIENT_CLOSED_REQUEST
        except Exception as exc:
            # A bug: logged here, with its traceback and the request id, which the client gets in its header with
            # a problem document that says nothing of the internals (unless the answer had already begun).
            error_log.error("unhandled error on %s %s", scope["method"], scope["path"][:MAX_LOGGED_PATH], exc_info=exc)
            if started_response:
                raise
            body = json.dumps(problem(500, "internal_error", "Internal error", "the service failed unexpectedly; "
                                      "the error is logged with this request's id",
                                      instance=scope["path"][:MAX_LOGGED_PATH])).encode()
            await send_with_id({"type": "http.response.start", "status": 500,
                                "headers": [(b"content-type", PROBLEM_JSON.encode()),
                                            (b"content-length", str(len(body)).encode())]})
            await send_with_id({"type": "http.response.body", "body": body})
        finally:
            seconds = time.perf_counter() - started
            route = route_template(scope)
            self.metrics.observe_request(method=scope["method"], route=route, status=status, seconds=seconds)
            self._log(scope, route, status, seconds)
            MODEL_USED.reset(model_token)
            REQUEST_ID.reset(token)

    @staticmethod
    def _log(scope: Scope, route: str, status: int, seconds: float) -> None:
        level = logging.DEBUG if route in QUIET_ROUTES and status < 400 else logging.INFO
        if not access_log.isEnabledFor(level):
            return
        event: dict[str, Any] = {"method": scope["method"], "route": route, "path": scope["path"][:MAX_LOGGED_PATH],
                                 "status": status, "duration_ms": round(seconds * 1e3, 2),
                                 "model_version": _model_version(scope)}
        client = scope.get("client")
        if client:
            event["client"] = client[0]
        access_log.log(level, "%s %s %d %.1f ms", scope["method"], route, status, seconds * 1e3, extra=event)
