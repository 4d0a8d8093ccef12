"""What a request still running when the SIGTERM grace period ends gets (issue 22): a 503 ``shutting_down``
problem document with ``Retry-After``, or a closed connection; never uvicorn's bare text/plain 500."""

from __future__ import annotations

import signal
import socket
import threading
import time
from pathlib import Path

from tests.conftest import clip_files
from tests.service.live import multipart, post_head, read_response, serve_process, start_trickle


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_request_cut_short_by_the_grace_period_gets_503_shutting_down_not_a_text_500(tmp_path: Path,
                                                                                          tiny_bundle: Path) -> None:
    port = free_port()
    proc = serve_process(tmp_path / "data", port, "--model", str(tiny_bundle), SCENEPRINT_SHUTDOWN_GRACE_S="1",
                         SCENEPRINT_BODY_TIMEOUT_S="600", SCENEPRINT_UPLOAD_READ_TIMEOUT_S="600")
    stop = threading.Event()
    try:
        body = b"".join(multipart("files", name, data)[: -len(b"\r\n--sceneprintboundary--\r\n")] + b"\r\n"
                        for name, data, _ in (f[1] for f in clip_files()))
        with socket.create_connection(("127.0.0.1", port), timeout=20) as client:
            client.sendall(post_head("/scenes/kitchen/enroll", len(body) + 100) + body[:1000])

            start_trickle(client, body[1000:1100], stop)  # keeps the route reading its body past the grace
            time.sleep(0.5)
            proc.send_signal(signal.SIGTERM)
            try:
                status, problem, headers = read_response(client)
            except (ConnectionError, TimeoutError):
                status = 0  # closed without an answer: allowed
            if status:
                assert status == 503, (status, headers)
                assert headers["content-type"] == "application/problem+json"
                assert problem["code"] == "shutting_down" and problem["status"] == 503
                assert int(headers["retry-after"]) >= 1
        assert proc.wait(timeout=60) is not None
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
