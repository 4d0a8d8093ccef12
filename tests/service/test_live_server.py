"""Behaviour that only a real server on a socket shows: streaming limits, slow clients, raw paths."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sceneprint.service.settings import Settings
from tests import audio_factory as af
from tests.service.live import LiveServer, multipart, post_head, read_response


@pytest.fixture
def server(tmp_path: Path, tiny_bundle: Path) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path / "data", model_path=tiny_bundle, max_upload_bytes=100_000,
                        upload_read_timeout_s=3.0, min_clip_seconds=0.5)
    with LiveServer(settings) as s:
        yield s


def test_a_chunked_body_over_the_limit_is_refused_while_streaming(server: LiveServer) -> None:
    head = multipart("file", "huge.wav", b"")[: -len("\r\n--sceneprintboundary--\r\n")]
    chunk = b"\0" * 65536
    sent = 0
    with server.connect() as sock:
        sock.sendall(post_head("/classify", None))
        sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")  # a valid part header, then endless data
        try:
            for _ in range(2_000):  # up to 128 MB if the server never stopped us
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, body, headers = read_response(sock)
    assert status == 413 and body["code"] == "too_large", body
    assert headers["connection"] == "close"  # the rest of the body is not drained
    assert sent < 2_000 * len(chunk)  # the server hung up long before the client finished


def test_a_slow_client_is_timed_out_and_others_are_served(server: LiveServer) -> None:
    body = multipart("file", "q.wav", af.wav(af.scene_clip("hum", 1, seconds=1.0)))
    with server.connect() as slow, server.connect() as fast:
        slow.sendall(post_head("/classify", len(body)) + body[:1000])  # then it stalls
        fast.sendall(post_head("/classify", len(body)) + body)
        status, answer, _ = read_response(fast)
        assert status == 200 and answer["unknown"] is True
        # The fast client was answered while the slow one is still waiting for its verdict.
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):
            slow.recv(1)
        slow.setblocking(True)
        status, problem, _ = read_response(slow)
        assert status == 408 and problem["code"] == "request_timeout"


@pytest.mark.parametrize("raw_name", ["..", "%2e%2e", "a%2Fb", "%00"])
def test_raw_dot_dot_and_encoded_paths_are_invalid_scene_names(server: LiveServer, raw_name: str) -> None:
    with server.connect() as sock:
        sock.sendall(f"GET /scenes/{raw_name} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        status, body, _ = read_response(sock)
    assert status == 422 and body["code"] == "invalid_scene_name"
