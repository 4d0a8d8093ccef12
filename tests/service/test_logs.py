"""Structured logs: one access event per request, with its id; JSON off a terminal; never a key or audio."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from typer.testing import CliRunner

from sceneprint.cli import app as cli
from sceneprint.service.logs import JsonFormatter, configure_logging, request_id_from, writes_json
from sceneprint.service.settings import Settings
from tests import audio_factory as af
from tests.conftest import ClientFactory, clip_files
from tests.service.live import LiveServer


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def log_lines() -> Iterator[io.StringIO]:
    """The root logger writes JSON to the returned buffer for the test (as ``serve`` would, off a terminal)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    buffer = io.StringIO()
    configure_logging("auto", "info", stream=buffer, force=True)
    try:
        yield buffer
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)


def events(buffer: io.StringIO, logger: str | None = None) -> list[dict]:
    parsed = [json.loads(line) for line in buffer.getvalue().splitlines()]  # every line is one JSON object
    return [e for e in parsed if logger is None or e["logger"] == logger]


def test_each_request_logs_one_access_event_with_the_id_it_returns(client_factory: ClientFactory,
                                                                   log_lines: io.StringIO) -> None:
    with client_factory() as client:
        log_lines.truncate(0)
        log_lines.seek(0)
        given = client.get("/scenes/kitchen", headers={"X-Request-ID": "trace-42.a:b"})
        made = client.get("/scenes", headers={"X-Request-ID": "not well formed; has spaces"})
    assert given.headers["x-request-id"] == "trace-42.a:b"
    assert made.headers["x-request-id"] != "not well formed; has spaces" and len(made.headers["x-request-id"]) == 32
    access = events(log_lines, "sceneprint.access")
    assert [(e["request_id"], e["method"], e["route"], e["status"]) for e in access] == [
        ("trace-42.a:b", "GET", "/scenes/{name}", 404), (made.headers["x-request-id"], "GET", "/scenes", 200)]
    assert all(e["model_version"] == "test-tiny-v1" and e["duration_ms"] >= 0 and e["level"] == "INFO"
               for e in access)


def test_no_key_authorization_header_or_audio_reaches_the_log(client_factory: ClientFactory, tmp_path: Path,
                                                               log_lines: io.StringIO) -> None:
    made = CliRunner().invoke(cli, ["keys", "create", "--data-dir", str(tmp_path / "data"), "--name", "ops",
                                    "--scope", "admin"])
    key = made.output.strip().splitlines()[-1]
    with client_factory(allow_open=False) as client:
        assert client.post("/scenes/hum/enroll", files=clip_files("hum"),
                           headers={"Authorization": f"Bearer {key}"}).status_code == 201
        clip = af.wav(af.scene_clip("hum", 9))
        client.post("/classify", files={"file": ("q.wav", clip)}, headers={"Authorization": f"Bearer {key}x"})
        client.get("/keys", headers={"Authorization": "Bearer sp_0123456789abcdef_" + "s" * 43})
    text = log_lines.getvalue()
    assert len(events(log_lines, "sceneprint.access")) == 3
    assert key not in text and key[-20:] not in text and "s" * 43 not in text
    assert "Bearer" not in text and "authorization" not in text.lower()
    assert "RIFF" not in text and len(text) < 20_000  # no audio, in any encoding


def test_uvicorn_does_not_log_the_request_a_second_time(tmp_path: Path, tiny_bundle: Path,
                                                        log_lines: io.StringIO) -> None:
    settings = Settings(data_dir=tmp_path / "data", model_path=tiny_bundle)
    with LiveServer(settings) as server:
        r = httpx2.get(f"{server.url}/scenes", headers={"X-Request-ID": "live-1"}, timeout=10)
        assert r.status_code == 200 and r.headers["x-request-id"] == "live-1"
    server_side = [e for e in events(log_lines) if e["logger"].startswith(("sceneprint", "uvicorn"))]
    mentions = [e for e in server_side if e.get("request_id") == "live-1" or "/scenes" in e["message"]]
    assert [e["logger"] for e in mentions] == ["sceneprint.access"]


def test_json_off_a_terminal_text_in_one_unless_told() -> None:
    assert writes_json("auto", io.StringIO()) and not writes_json("auto", Terminal())
    assert writes_json("json", Terminal()) and not writes_json("text", io.StringIO())


def test_a_terminal_gets_plain_text(log_lines: io.StringIO) -> None:
    terminal = Terminal()
    configure_logging("auto", "info", stream=terminal, force=True)
    logging.getLogger("sceneprint.service").info("model %s loaded", "m-1")
    assert terminal.getvalue() == "INFO:     sceneprint.service: model m-1 loaded\n"


def test_the_json_formatter_keeps_extras_and_exceptions() -> None:
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.getLogger("x").makeRecord("x", logging.ERROR, __file__, 1, "failed %s", ("once",),
                                                   exc_info=sys.exc_info(),
                                                   extra={"route": "/classify", "status": 500,
                                                          "color_message": "\x1b[36mfailed\x1b[0m"})
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "failed once" and entry["level"] == "ERROR" and entry["logger"] == "x"
    assert entry["route"] == "/classify" and entry["status"] == 500 and "ValueError: boom" in entry["exception"]
    assert entry["time"].endswith("+00:00")
    assert "color_message" not in entry  # uvicorn's copy of the message for terminals


def test_a_malformed_request_id_is_replaced() -> None:
    assert request_id_from("abc-123") == "abc-123"
    for bad in (None, "", "x" * 129, "a b", "id\nforged: header", "é"):
        assert len(request_id_from(bad)) == 32


def test_a_host_programs_logging_is_left_alone_unless_forced(log_lines: io.StringIO) -> None:
    configure_logging("text", "debug", stream=Terminal())  # the root logger has a handler (the fixture's)
    logging.getLogger("sceneprint.service").warning("still JSON")
    assert events(log_lines)[-1]["message"] == "still JSON"


def test_an_unexpected_error_is_a_logged_problem_with_the_request_id(client_factory: ClientFactory,
                                                                    log_lines: io.StringIO,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    with client_factory() as client:
        def broken(*args: object, **kwargs: object) -> None:
            raise RuntimeError("a bug")

        monkeypatch.setattr(client.app.state.scenes, "list_scenes", broken)  # type: ignore[attr-defined]
        response = client.get("/scenes", headers={"X-Request-ID": "bug-1"})
    assert response.status_code == 500 and response.headers["content-type"] == "application/problem+json"
    assert response.json()["code"] == "internal_error" and "a bug" not in response.text  # no internals leak
    logged = [e for e in events(log_lines, "sceneprint.service") if e["level"] == "ERROR"]
    assert len(logged) == 1 and logged[0]["request_id"] == "bug-1"
    assert "RuntimeError: a bug" in logged[0]["exception"]
