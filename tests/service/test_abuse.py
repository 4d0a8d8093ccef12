"""Hand-written hostile multipart against a live server with an admin key (issue 22).

The property: no 5xx other than a 503 problem document, whatever the body, and afterwards the database,
the clip store and the index agree. A client that hangs up mid-upload is counted and logged as 499 (client
closed request), not as a server error.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from typer.testing import CliRunner

from sceneprint.cli import app as cli
from sceneprint.service.settings import Settings
from tests import audio_factory as af
from tests.conftest import clip_files
from tests.service.live import LiveServer, multipart, read_response

PROBLEM_JSON = "application/problem+json"


@pytest.fixture
def admin_server(tmp_path: Path, tiny_bundle: Path) -> Iterator[tuple[LiveServer, str, Path]]:
    data_dir = tmp_path / "data"
    made = CliRunner().invoke(cli, ["keys", "create", "--data-dir", str(data_dir), "--name", "abuser", "--scope",
                                    "admin"])
    assert made.exit_code == 0, made.output
    settings = Settings(data_dir=data_dir, model_path=tiny_bundle, min_clip_seconds=0.5, max_clip_seconds=30.0)
    with LiveServer(settings) as server:
        yield server, made.output.strip().splitlines()[-1], data_dir


def raw_post(server: LiveServer, key: str, path: str, content_type: str, body: bytes
             ) -> tuple[int, dict, dict[str, str]]:
    with server.connect() as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n"
                      f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body)
        return read_response(sock)


def hostile_bodies() -> Iterator[tuple[str, str, bytes]]:
    """(what, content type, body): long and malformed boundaries, nameless parts, many empty parts, bad framing."""
    wav = af.wav(af.scene_clip("hum", 7, 1.0))
    for length in (257, 5000):
        b = "b" * length
        yield f"boundary of {length}", f"multipart/form-data; boundary={b}", multipart("files", "a.wav", wav, b)
    for header in ("multipart/form-data", "multipart/form-data; boundary=", 'multipart/form-data; boundary=""',
                   'multipart/form-data; boundary="unterminated', "multipart/form-data; boundary=;;;",
                   "multipart/form-data; boundary=other"):
        yield f"content type {header!r}", header, multipart("files", "a.wav", wav, "bb")
    mp = "multipart/form-data; boundary=bb"
    yield "nameless parts", mp, (b"--bb\r\nContent-Disposition: form-data\r\n\r\n" + wav + b"\r\n--bb\r\n\r\n" + wav
                                 + b"\r\n--bb\r\nContent-Disposition: form-data; filename=x.wav\r\n\r\n" + wav
                                 + b"\r\n--bb--\r\n")
    yield "10,000 empty parts", mp, b"".join(b"--bb\r\n\r\n\r\n" for _ in range(10_000)) + b"--bb--\r\n"
    yield "10,000 empty named parts", mp, b"".join(
        b'--bb\r\nContent-Disposition: form-data; name="files"\r\n\r\n\r\n' for _ in range(10_000)) + b"--bb--\r\n"
    yield "no closing boundary", mp, multipart("files", "a.wav", wav, "bb")[:-8]
    yield "garbage", mp, b"\x00\xff" * 500
    yield "header without a colon", mp, b"--bb\r\nnot a header\r\n\r\nx\r\n--bb--\r\n"
    yield "17 part headers", mp, b"--bb\r\n" + b"X-A: 1\r\n" * 17 + b"\r\nx\r\n--bb--\r\n"


def metric(server: LiveServer, route: str, status: int) -> float:
    text = httpx2.get(f"{server.url}/metrics").text
    pattern = (r'sceneprint_http_requests_total\{method="POST",route="' + re.escape(route) + r'",status="'
               + str(status) + r'"\} ([0-9.e+]+)')
    found = re.search(pattern, text)
    return float(found.group(1)) if found else 0.0


def hang_up_mid_part(server: LiveServer, key: str, path: str) -> None:
    body = b"".join(multipart("files", f[1][0], f[1][1], "bb")[:-8] for f in clip_files(seed=40)) + b"--bb--\r\n"
    with server.connect() as sock:
        sock.sendall((f"POST {path} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Bearer {key}\r\n"
                      f"Content-Type: multipart/form-data; boundary=bb\r\nContent-Length: {len(body)}\r\n\r\n"
                      ).encode() + body[: len(body) // 2])
        time.sleep(0.2)  # the route is reading the body, inside a part


def test_hostile_multipart_gets_no_5xx_and_leaves_storage_consistent(admin_server: tuple[LiveServer, str, Path]
                                                                     ) -> None:
    server, key, data_dir = admin_server
    auth = {"Authorization": f"Bearer {key}"}
    made = httpx2.post(f"{server.url}/scenes/base/enroll", files=clip_files(), headers=auth, timeout=60)
    assert made.status_code == 201, made.text
    for path in ("/classify", "/scenes/intruder/enroll", "/scenes/base/clips"):
        for what, content_type, body in hostile_bodies():
            status, problem, headers = raw_post(server, key, path, content_type, body)
            assert status < 500 or (status == 503 and headers["content-type"] == PROBLEM_JSON), (path, what, problem)
            if status >= 400:
                assert headers["content-type"] == PROBLEM_JSON and problem["status"] == status, (path, what)
        hang_up_mid_part(server, key, path)

    deadline = time.monotonic() + 10  # the hang-ups are counted once the server has seen them
    while metric(server, "/scenes/{name}/enroll", 499) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    for route in ("/classify", "/scenes/{name}/enroll", "/scenes/{name}/clips"):
        assert metric(server, route, 500) == 0, route

    scenes = httpx2.get(f"{server.url}/scenes", headers=auth).json()["scenes"]
    assert [(s["name"], s["clips"]) for s in scenes] == [("base", 5)]
    blobs = {p.name for p in (data_dir / "clips").glob("??/*") if not p.name.startswith(".")}
    assert len(blobs) == 5
    assert httpx2.get(f"{server.url}/readyz").json()["scenes_indexed"] == 1
    query = {"file": ("q.wav", af.wav(af.scene_clip("hum", 99)))}
    top = httpx2.post(f"{server.url}/classify?top_k=10", files=query, headers=auth, timeout=60).json()
    assert [m["scene"] for m in top["top_k"]] == ["base"]


def test_client_that_disconnects_mid_upload_is_counted_and_logged_as_499(
        admin_server: tuple[LiveServer, str, Path], caplog: pytest.LogCaptureFixture) -> None:
    server, key, _ = admin_server
    caplog.set_level(logging.INFO)
    hang_up_mid_part(server, key, "/scenes/gone/enroll")
    deadline = time.monotonic() + 10
    while metric(server, "/scenes/{name}/enroll", 499) < 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert metric(server, "/scenes/{name}/enroll", 499) == 1
    assert metric(server, "/scenes/{name}/enroll", 500) == 0
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text
    access = [r for r in caplog.records if r.name == "sceneprint.access" and getattr(r, "status", None) == 499]
    assert len(access) == 1 and access[0].levelno in (logging.INFO, logging.WARNING)
