"""docker/nginx.conf: nginx accepts it, and in front of a live service it passes, refuses and hides what it should.

The shipped file is tested as it is, inside a minimal main configuration; only the two addresses that
exist inside Compose's network (the upstream ``replica:8000`` and ``listen 8080``) are replaced by
loopback ones in the test's copy.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx2
import pytest

from sceneprint.service.body_limits import route_body_limit
from sceneprint.service.settings import Settings
from tests.deploy.tools import NGINX_CONF, nginx
from tests.service.live import LiveServer, read_response

UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def nginx_prefix(tmp_path: Path, *, upstream_port: int, listen_port: int) -> Path:
    """A prefix directory holding a main configuration that includes a copy of the shipped file."""
    site = NGINX_CONF.read_text()
    site = site.replace("server replica:8000 ", f"server 127.0.0.1:{upstream_port} ")
    site = site.replace("listen 8080;", f"listen 127.0.0.1:{listen_port};")
    (tmp_path / "sceneprint.conf").write_text(site)
    # Temporary files in the prefix, for each module that has them (nginx -V names them), not in /var/lib/nginx.
    built_with = subprocess.run([str(nginx()), "-V"], capture_output=True, text=True, timeout=30).stderr
    temp_paths = "\n".join(f"    {kind.replace('-', '_')}_temp_path {tmp_path / kind};"
                           for kind in re.findall(r"--http-([a-z-]+)-temp-path=", built_with))
    user = "user root;\n" if os.geteuid() == 0 else ""  # workers must reach the test's private tmp directory
    (tmp_path / "nginx.conf").write_text(
        f"{user}pid {tmp_path / 'nginx.pid'};\nerror_log {tmp_path / 'error.log'};\n"
        f"events {{ worker_connections 256; }}\n"
        f"http {{\n{temp_paths}\n    include {tmp_path / 'sceneprint.conf'};\n}}\n")
    return tmp_path


def test_nginx_accepts_the_configuration(tmp_path: Path) -> None:
    prefix = nginx_prefix(tmp_path, upstream_port=free_port(), listen_port=free_port())
    result = subprocess.run([str(nginx()), "-t", "-p", str(prefix), "-c", str(prefix / "nginx.conf")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_the_proxy_takes_every_body_the_service_takes() -> None:
    (size,) = re.findall(r"client_max_body_size (\d+)([kmg]?);", NGINX_CONF.read_text())
    largest = max(route_body_limit(Settings())("POST", path) for path in ("/scenes/x/enroll", "/classify"))
    assert largest <= int(size[0]) * UNITS[size[1]] < largest + 2 * 1024**2  # and not much more


@contextmanager
def running_nginx(prefix: Path, listen_port: int) -> Iterator[str]:
    """nginx in the foreground on ``prefix``'s configuration, until the block ends; yields its URL."""
    process = subprocess.Popen([str(nginx()), "-p", str(prefix), "-c", str(prefix / "nginx.conf"),
                                "-g", "daemon off;"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", listen_port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"nginx did not start: {(prefix / 'error.log').read_text()}") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{listen_port}"
    finally:
        process.terminate()
        process.wait(timeout=20)


@pytest.fixture
def proxy(tmp_path: Path, tiny_bundle: Path) -> Iterator[tuple[str, LiveServer]]:
    """nginx with the shipped configuration, in front of one live service."""
    with LiveServer(Settings(data_dir=tmp_path / "data", model_path=tiny_bundle)) as server:
        listen = free_port()
        (tmp_path / "nginx").mkdir()
        with running_nginx(nginx_prefix(tmp_path / "nginx", upstream_port=server.port, listen_port=listen),
                           listen) as url:
            yield url, server


def test_requests_pass_with_their_request_id_and_metrics_do_not(proxy: tuple[str, LiveServer]) -> None:
    url, server = proxy
    ready = httpx2.get(f"{url}/readyz", headers={"X-Request-ID": "via-proxy-1"}, timeout=10)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"
    assert ready.headers["x-request-id"] == "via-proxy-1"  # passed to the service, which returned it
    generated = httpx2.get(f"{url}/healthz", timeout=10).headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", generated)  # nginx's own id, when the client sent none
    assert httpx2.get(f"{url}/metrics", timeout=10).status_code == 404
    assert httpx2.get(f"{server.url}/metrics", timeout=10).status_code == 200  # scraped on the replica itself


def test_the_proxy_refuses_a_body_over_its_limit_as_a_problem(proxy: tuple[str, LiveServer]) -> None:
    url, _ = proxy
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"POST /scenes/x/enroll HTTP/1.1\r\nHost: localhost\r\nContent-Type: multipart/form-data; "
                     b"boundary=b\r\nContent-Length: 100000000\r\n\r\n")  # refused from its headers alone
        status, body, headers = read_response(sock)
    assert status == 413 and headers["content-type"] == "application/problem+json"
    assert body["code"] == "too_large"


def test_an_unreachable_service_is_a_503_problem(tmp_path: Path) -> None:
    listen = free_port()
    prefix = nginx_prefix(tmp_path, upstream_port=free_port(), listen_port=listen)  # nothing listens upstream
    with running_nginx(prefix, listen) as url:
        r = httpx2.get(f"{url}/scenes", timeout=10)
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["code"] == "unavailable" and r.headers["retry-after"] == "5"
