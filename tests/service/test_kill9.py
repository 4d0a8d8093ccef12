"""A real ``kill -9`` of the server during enrollments; after a restart everything agrees."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx2

from tests.conftest import clip_files
from tests.service.live import serve_process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(data_dir: Path, bundle: Path, port: int) -> subprocess.Popen[bytes]:
    return serve_process(data_dir, port, "--model", str(bundle))


def test_kill_9_during_enrollments_leaves_whole_scenes_only(tmp_path: Path, tiny_bundle: Path) -> None:
    data_dir, port = tmp_path / "data", free_port()
    proc = start(data_dir, tiny_bundle, port)
    statuses: dict[str, int | str] = {}

    def enroll(i: int) -> None:
        try:
            r = httpx2.post(f"http://127.0.0.1:{port}/scenes/scene-{i}/enroll", files=clip_files(seed=10 * i),
                            timeout=30)
            statuses[f"scene-{i}"] = r.status_code
        except httpx2.HTTPError as exc:
            statuses[f"scene-{i}"] = type(exc).__name__

    try:
        threads = [threading.Thread(target=enroll, args=(i,)) for i in range(8)]
        for t in threads:
            t.start()
            time.sleep(0.05)
        while not statuses:  # kill once the first enrollment has been answered, with others in flight
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        for t in threads:
            t.join()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()

    proc = start(data_dir, tiny_bundle, port)
    try:
        scenes = httpx2.get(f"http://127.0.0.1:{port}/scenes").json()["scenes"]
        names = {s["name"] for s in scenes}
        assert all(s["clips"] == 5 for s in scenes)  # whole or not at all
        assert {n for n, st in statuses.items() if st == 201} <= names  # nothing acknowledged was lost
        assert httpx2.get(f"http://127.0.0.1:{port}/readyz").json()["scenes_indexed"] == len(names)
        stored = {p.name for p in (data_dir / "clips").glob("??/*") if not p.name.startswith(".")}
        assert len(stored) == 5 * len(names)  # orphans from killed enrollments were swept
    finally:
        proc.terminate()
        proc.wait(timeout=30)
