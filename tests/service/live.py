"""A real server on a loopback socket, as ``sceneprint serve`` runs it, and raw-socket helpers."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

from sceneprint.service.app import create_app
from sceneprint.service.connections import make_server
from sceneprint.service.settings import Settings


class LiveServer:
    def __init__(self, settings: Settings) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.server = make_server(create_app(settings), settings, host="127.0.0.1", port=self.port,
                                  log_level="warning")
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
        self.thread.join(timeout=30)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def connect(self, timeout: float = 10) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)


def read_response(sock: socket.socket) -> tuple[int, dict, dict[str, str]]:
    """(status, JSON body or {}, lower-cased headers) of one response."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head:
        raise ConnectionError("the server closed the connection without a response")
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ")[1])
    pairs = (line.partition(b":") for line in lines[1:])
    headers = {k.strip().lower().decode(): v.strip().decode() for k, _, v in pairs}
    length = int(headers["content-length"]) if "content-length" in headers else None
    while length is not None and len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, json.loads(body) if body else {}, headers


def closed_by_server(sock: socket.socket) -> bool:
    """Read until the server closes the connection (True), or the socket's timeout passes (False)."""
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        return True
    return True


def multipart(field: str, filename: str, data: bytes, boundary: str = "sceneprintboundary") -> bytes:
    return (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{field}\"; filename=\"{filename}\"\r\n"
            f"Content-Type: audio/wav\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()


def post_head(path: str, body_len: int | None, boundary: str = "sceneprintboundary", extra: str = "") -> bytes:
    length = f"Content-Length: {body_len}\r\n" if body_len is not None else "Transfer-Encoding: chunked\r\n"
    return (f"POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; boundary={boundary}\r\n"
            f"{extra}{length}\r\n").encode()


def get(sock: socket.socket, path: str, extra: str = "") -> tuple[int, dict, dict[str, str]]:
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: localhost\r\n{extra}\r\n".encode())
    return read_response(sock)


def serve_process(data_dir: object, port: int, *args: str, **env: str) -> subprocess.Popen[bytes]:
    """``sceneprint serve`` in a child process on ``port`` with ``args`` (e.g. ``--model B``), once ready."""
    import httpx2

    environment = {**os.environ, "SCENEPRINT_MIN_CLIP_SECONDS": "0.5", **env}
    proc = subprocess.Popen([sys.executable, "-m", "sceneprint.cli", "serve", "--port", str(port), "--data-dir",
                             str(data_dir), *args, "--log-level", "warning"], env=environment)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx2.get(f"http://127.0.0.1:{port}/readyz", timeout=1).status_code == 200:
                return proc
        except httpx2.HTTPError:
            pass
        if proc.poll() is not None:
            raise RuntimeError("server exited during start-up")
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("server did not become ready")


def start_trickle(sock: socket.socket, data: bytes, stop: threading.Event, interval_s: float = 0.2) -> None:
    """Send ``data`` one byte every ``interval_s`` from a daemon thread, until done, ``stop`` or a closed socket."""

    def trickle() -> None:
        for byte in data:
            if stop.is_set():
                return
            try:
                sock.sendall(bytes([byte]))
            except OSError:
                return
            time.sleep(interval_s)

    threading.Thread(target=trickle, daemon=True).start()
