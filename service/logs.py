"""Structured logs: one JSON object a line where a machine reads them, plain text in a terminal.

Every record logged while a request is handled carries that request's id (``request_id``), so the
access event and whatever the request logged on its way can be joined; the id is the client's
``X-Request-ID`` when it is well-formed, and is returned in the response's ``X-Request-ID`` header.
Log records carry only what the code puts in them: never audio, API keys or ``Authorization``
headers (the access event is built from the method, route template, status and timings alone).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import IO, Any, Literal

LogFormat = Literal["auto", "json", "text"]
REQUEST_ID: ContextVar[str | None] = ContextVar("sceneprint_request_id", default=None)
# A client's id is echoed in headers and logs: letters, digits and a few separators, of a sane length.
WELL_FORMED_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@+=/-]{1,128}")
TEXT_FORMAT = "%(levelname)s:     %(name)s: %(message)s"
# The attributes every LogRecord has; anything else on a record was passed as ``extra`` and is logged as a field
# (but uvicorn's ``color_message``: its message again, with terminal colour codes).
_RECORD_ATTRIBUTES = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "request_id", "color_message"}


def request_id_from(header: str | None) -> str:
    """The client's request id if it is well-formed, else a new one (32 hex digits)."""
    if header is not None and WELL_FORMED_REQUEST_ID.fullmatch(header):
        return header
    return uuid.uuid4().hex


class RequestIdFilter(logging.Filter):
    """Stamps each record with the id of the request being handled (None outside a request)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):
            record.request_id = REQUEST_ID.get()
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (UTC, ISO 8601), level, logger, message, request id and the record's extras."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        entry.update({k: v for k, v in vars(record).items() if k not in _RECORD_ATTRIBUTES and not k.startswith("_")})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


def writes_json(log_format: LogFormat, stream: IO[str]) -> bool:
    """JSON when told so, text when told so; else JSON unless the stream is a terminal."""
    if log_format != "auto":
        return log_format == "json"
    isatty = getattr(stream, "isatty", None)
    return not (isatty is not None and isatty())


def configure_logging(log_format: LogFormat, level: str = "info", stream: IO[str] | None = None, *,
                      force: bool = False) -> None:
    """Send every log record (the service's, uvicorn's, the libraries') to ``stream`` (stderr) in one format.

    uvicorn is run without its own logging configuration and without its access log
    (``connections.make_server``), so its records arrive here too, and each request is logged once, by
    the service's access event. Like ``logging.basicConfig``, this leaves a root logger that already
    has handlers (a host program's, a test runner's) as it is, unless ``force``.

    Args:
        log_format: ``json``, ``text``, or ``auto`` (text in a terminal, else JSON).
        level: The root logger's level.
        stream: Where to write; default stderr.
        force: Replace the root logger's handlers even if it has some.
    """
    root = logging.getLogger()
    if root.handlers and not force:
        return
    stream = stream if stream is not None else sys.stderr
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if writes_json(log_format, stream) else logging.Formatter(TEXT_FORMAT))
    handler.addFilter(RequestIdFilter())
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
