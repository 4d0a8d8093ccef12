"""Slow and abusive clients, at the connection level, on a real server (raw sockets on loopback).

Timeouts here are set to a second or two; each wait is bounded by a socket timeout well above them,
so a server that never closes a connection fails the test instead of hanging it, and nothing asserts
on how long anything took.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest

from sceneprint.service.connections import RateLimitedLog, accept_error_handler
from sceneprint.service.settings import Settings
from tests.conftest import clip_files
from tests.service.live import LiveServer, closed_by_server, get, multipart, post_head, read_response, start_trickle

BODY = multipart("file", "q.wav", b"\0" * 5000)


def settings(tmp_path: Path, bundle: Path, **overrides: object) -> Settings:
    values: dict[str, object] = {"data_dir": tmp_path / "data", "model_path": bundle, "header_timeout_s": 1.0,
                                 "body_timeout_s": 2.0, "keep_alive_timeout_s": 1, "upload_read_timeout_s": 60.0}
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture
def server(tmp_path: Path, tiny_bundle: Path) -> Iterator[LiveServer]:
    with LiveServer(settings(tmp_path, tiny_bundle)) as s:
        yield s


def trickle_until_closed(sock: socket.socket, data: bytes, every_s: float = 0.2, at_most: int = 60) -> bytes | None:
    """Send ``data`` a byte at a time (``at_most`` bytes: 12 s); what the server answered once it closed, or None
    if it never did."""
    sock.settimeout(every_s)
    answer = b""
    for byte in data[:at_most]:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return answer
        try:
            chunk = sock.recv(65536)
        except TimeoutError:
            continue
        except ConnectionResetError:
            return answer
        if not chunk:
            return answer
        answer += chunk
    return None


def test_sockets_that_never_finish_their_headers_are_closed_and_healthz_keeps_answering(server: LiveServer) -> None:
    silent = [server.connect() for _ in range(20)]
    partial = [server.connect() for _ in range(20)]
    for sock in partial:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: loc")
    try:
        with server.connect() as client:
            assert get(client, "/healthz")[0] == 200
        status, body, _ = read_response(partial[0])  # within the socket's 10 s timeout; the header timeout is 1 s
        assert status == 408 and body["code"] == "request_timeout"
        for sock in silent + partial:
            assert closed_by_server(sock)
    finally:
        for sock in silent + partial:
            sock.close()


def test_headers_trickled_a_byte_at_a_time_are_cut_off(server: LiveServer) -> None:
    request = b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    with server.connect() as sock:
        answer = trickle_until_closed(sock, request)
    assert answer is not None, "the server never closed a connection trickling its headers"
    assert answer.startswith(b"HTTP/1.1 408")


def test_a_body_trickled_a_byte_at_a_time_is_cut_off_with_408(server: LiveServer) -> None:
    with server.connect() as sock:
        sock.sendall(post_head("/classify", len(BODY)))
        answer = trickle_until_closed(sock, BODY)  # 5 bytes/s; the deadline for the whole body is 2 s
    assert answer is not None, "the server never cut off a body trickled slower than its deadline"
    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer


def test_a_body_no_route_reads_is_still_bounded_in_time(server: LiveServer) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5000\r\n\r\n")
        answer = trickle_until_closed(sock, b"x" * 5000)
    assert answer is not None and answer.startswith(b"HTTP/1.1 200")  # answered, then closed at the deadline


def test_an_idle_kept_alive_connection_is_closed(server: LiveServer) -> None:
    with server.connect() as sock:
        assert get(sock, "/healthz")[0] == 200
        assert closed_by_server(sock)


def test_past_the_connection_bound_idle_sockets_make_room_for_requests(tmp_path: Path, tiny_bundle: Path) -> None:
    with LiveServer(settings(tmp_path, tiny_bundle, max_connections=8, header_timeout_s=60.0)) as server:
        idle = [server.connect() for _ in range(30)]
        try:
            with server.connect() as client:
                assert get(client, "/healthz")[0] == 200
            assert closed_by_server(idle[0])  # the oldest idle sockets were closed to make room
        finally:
            for sock in idle:
                sock.close()


def test_past_the_connection_bound_with_none_idle_new_connections_get_503_at_once(tmp_path: Path,
                                                                                  tiny_bundle: Path) -> None:
    with LiveServer(settings(tmp_path, tiny_bundle, max_connections=4, body_timeout_s=60.0)) as server:
        busy = [server.connect() for _ in range(4)]
        try:
            for sock in busy:  # each is in the middle of sending a body: none can be closed to make room
                sock.sendall(post_head("/classify", len(BODY)) + BODY[:100])
            time.sleep(0.2)  # let the server read their headers (not a timing assertion)
            with server.connect() as extra:
                status, body, headers = read_response(extra)
            assert status == 503 and body["code"] == "too_many_connections" and headers["connection"] == "close"
        finally:
            for sock in busy:
                sock.close()


def test_accept_errors_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    handler = accept_error_handler(RateLimitedLog(logging.getLogger("test.accept"), every_s=10.0,
                                                  clock=lambda: now[0]))
    loop = asyncio.new_event_loop()
    try:
        error = {"message": "socket.accept() out of system resource", "exception": OSError(24, "Too many open files")}
        with caplog.at_level(logging.WARNING, logger="test.accept"):
            for _ in range(10_000):
                handler(loop, error)
                now[0] += 0.001  # 10,000 failures in 10 s
            now[0] += 1.0
            handler(loop, error)
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records if r.name == "test.accept"]
    assert len(lines) == 2 and "Too many open files" in lines[0]
    assert "9999 more like this" in lines[1]


def test_sigterm_stops_the_server_within_its_grace_period_whatever_a_client_does(tmp_path: Path,
                                                                                 tiny_bundle: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SCENEPRINT_MIN_CLIP_SECONDS": "0.5", "SCENEPRINT_SHUTDOWN_GRACE_S": "1",
           "SCENEPRINT_BODY_TIMEOUT_S": "600", "SCENEPRINT_UPLOAD_READ_TIMEOUT_S": "600"}
    proc = subprocess.Popen([sys.executable, "-m", "sceneprint.cli", "serve", "--port", str(port), "--data-dir",
                             str(tmp_path / "data"), "--model", str(tiny_bundle), "--log-level", "warning"], env=env)
    stop = threading.Event()
    sock: socket.socket | None = None
    try:
        for _ in range(600):  # start-up: bounded, like every wait here
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                    break
            except httpx2.HTTPError:
                time.sleep(0.2)
        body = b"".join(
            multipart("files", name, data)[: -len(b"\r\n--sceneprintboundary--\r\n")] + b"\r\n"
            for name, data, _ in (f[1] for f in clip_files()))
        sock = client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(post_head("/scenes/kitchen/enroll", len(body) + 100) + body[:1000])

        start_trickle(client, body[1000:1600], stop)  # one byte every 0.2 s: two minutes at most
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) is not None  # without a grace period it would wait for the trickle forever
    finally:
        stop.set()
        if sock is not None:
            sock.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
