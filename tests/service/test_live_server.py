"""Behaviour that only a real server on a socket shows: streaming limits, slow clients, raw paths."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvicorn

from sceneprint.service.app import create_app
from sceneprint.service.settings import Settings
from tests import audio_factory as af


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        config = uvicorn.Config(create_app(settings), host="127.0.0.1", port=self.port, log_level="warning",
                                lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=10)


@pytest.fixture
def server(tmp_path: Path, tiny_bundle: Path) -> Iterator[LiveServer]:
    settings = Settings(data_dir=tmp_path / "data", model_path=tiny_bundle, max_upload_bytes=100_000,
                        upload_read_timeout_s=3.0, min_clip_seconds=0.5)
    with LiveServer(settings) as s:
        yield s


def read_response(sock: socket.socket) -> tuple[int, dict]:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ")[1])
    lengths = [int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")]
    length = lengths[0] if lengths else None
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, json.loads(body) if body else {}


def multipart(field: str, filename: str, data: bytes, boundary: str = "sceneprintboundary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


def classify_request(body_len: int | None, boundary: str = "sceneprintboundary") -> bytes:
    length = f"Content-Length: {body_len}\r\n" if body_len is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST /classify HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"{length}\r\n").encode()


def test_a_chunked_body_over_the_limit_is_refused_while_streaming(server: LiveServer) -> None:
    head = multipart("file", "huge.wav", b"")[: -len("\r\n--sceneprintboundary--\r\n")]
    chunk = b"\0" * 65536
    sent = 0
    with server.connect() as sock:
        sock.sendall(classify_request(None))
        sock.sendall(f"{len(head):x}\r\n".encode() + head + b"\r\n")  # a valid part header, then endless data
        try:
            for _ in range(2_000):  # up to 128 MB if the server never stopped us
                sock.sendall(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        status, body = read_response(sock)
    assert status == 413 and body["code"] == "too_large"
    assert sent < 2_000 * len(chunk)  # the server hung up long before the client finished


def test_a_slow_client_is_timed_out_and_others_are_served(server: LiveServer) -> None:
    body = multipart("file", "q.wav", af.wav(af.scene_clip("hum", 1, seconds=1.0)))
    with server.connect() as slow, server.connect() as fast:
        slow.sendall(classify_request(len(body)) + body[:1000])  # then it stalls
        fast.sendall(classify_request(len(body)) + body)
        status, answer = read_response(fast)
        assert status == 200 and answer["unknown"] is True
        # The fast client was answered while the slow one is still waiting for its verdict.
        slow.setblocking(False)
        with pytest.raises(BlockingIOError):
            slow.recv(1)
        slow.setblocking(True)
        status, problem = read_response(slow)
        assert status == 408 and problem["code"] == "request_timeout"


@pytest.mark.parametrize("raw_name", ["..", "%2e%2e", "a%2Fb", "%00"])
def test_raw_dot_dot_and_encoded_paths_are_invalid_scene_names(server: LiveServer, raw_name: str) -> None:
    with server.connect() as sock:
        sock.sendall(f"GET /scenes/{raw_name} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        status, body = read_response(sock)
    assert status == 422 and body["code"] == "invalid_scene_name"
