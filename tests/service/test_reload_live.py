"""Reloads of a real server: classify clients running throughout see no failed request; a ``kill -9`` during
re-embedding leaves database, index and current version agreeing, and the reload resumes after a restart."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

import httpx2
import pytest
from sqlalchemy import create_engine, func, select
from sqlalchemy.orm import Session

from sceneprint.registry import Registry
from sceneprint.service.settings import Settings
from sceneprint.service.tables import Clip, ClipEmbedding, Prototype, Scene
from tests import audio_factory as af
from tests.conftest import clip_files, make_bundle
from tests.service.live import LiveServer, serve_process
from tests.service.test_kill9 import free_port

KINDS = ("hum", "birds", "clicks")


@pytest.fixture(scope="module")
def v2_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("live-reload") / "v2", model_version="test-tiny-v2", seed=1)


def kind_of(scene: str | None) -> str | None:
    """The kind of audio a scene of the live test was enrolled from (``extra-<i>``: the i-th kind, cycling)."""
    if scene is None or scene in KINDS:
        return scene
    return KINDS[int(scene.split("-")[1]) % len(KINDS)]


def wait_for(url: str, predicate: Any, timeout: float = 120) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        body: dict[str, Any] = httpx2.get(url, timeout=10).json()
        if predicate(body):
            return body
        time.sleep(0.02)
    raise AssertionError(f"timed out; last: {body}")


def test_classify_clients_see_no_failed_request_across_a_reload(tmp_path: Path, tiny_bundle: Path,
                                                                v2_bundle: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(tiny_bundle)
    settings = Settings(data_dir=tmp_path / "data", registry=registry.root, registry_poll_s=0.1,
                        min_clip_seconds=0.5)
    queries = {kind: af.wav(af.scene_clip(kind, 50)) for kind in KINDS}
    with LiveServer(settings) as server:
        for i, kind in enumerate(KINDS):  # 3 scenes of 5 clips, and 9 more of 5 for re-embedding to do
            assert httpx2.post(f"{server.url}/scenes/{kind}/enroll", files=clip_files(kind, seed=10 * i),
                               timeout=30).status_code == 201
        for i in range(9):
            assert httpx2.post(f"{server.url}/scenes/extra-{i}/enroll", timeout=30,
                               files=clip_files(KINDS[i % 3], seed=100 + 10 * i, seconds=4.0)).status_code == 201
        answers: list[tuple[float, str, int, str | None, str | None]] = []  # (time, kind, status, version, scene)
        stop = threading.Event()

        def client(n: int) -> None:
            with httpx2.Client(timeout=30) as http:
                while not stop.is_set():
                    kind = KINDS[n % 3]
                    try:
                        r = http.post(f"{server.url}/classify", files={"file": ("q.wav", queries[kind], "audio/wav")})
                        body = r.json()
                        answers.append((time.monotonic(), kind, r.status_code, body.get("model_version"),
                                        body.get("scene")))
                    except httpx2.HTTPError as exc:
                        answers.append((time.monotonic(), kind, 0, type(exc).__name__, None))
                    n += 1

        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        registry.publish(v2_bundle)  # the server sees its pointer move
        status = wait_for(f"{server.url}/admin/reload", lambda s: s["state"] in ("done", "failed"))
        switched = time.monotonic()
        time.sleep(0.5)
        stop.set()
        for t in threads:
            t.join()
    assert status["state"] == "done" and status["clips_total"] == 60, status
    assert [a for a in answers if a[2] != 200] == []  # not one failed request
    versions = [a[3] for a in answers]
    assert "test-tiny-v1" in versions and "test-tiny-v2" in versions
    assert all(a[3] == "test-tiny-v2" for a in answers if a[0] > switched + 0.1)
    # Before, during and after the switch, each query is named a scene of its own kind.
    assert all(kind_of(a[4]) == a[1] for a in answers)


def serve(data_dir: Path, registry: Path, port: int, **env: str) -> subprocess.Popen[bytes]:
    return serve_process(data_dir, port, "--registry", str(registry), **env)


def test_kill_9_during_reembedding_then_restart_resumes_and_everything_agrees(tmp_path: Path, tiny_bundle: Path,
                                                                              v2_bundle: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(tiny_bundle)
    data_dir, port = tmp_path / "data", free_port()
    url = f"http://127.0.0.1:{port}"
    # One slot, one clip a job, no pointer polling: the reload starts on SIGHUP and takes a while.
    env = {"SCENEPRINT_INFERENCE_SLOTS": "1", "SCENEPRINT_RELOAD_BATCH_CLIPS": "1",
           "SCENEPRINT_REGISTRY_POLL_S": "3600"}
    proc = serve(data_dir, registry.root, port, **env)
    try:
        for i in range(10):
            assert httpx2.post(f"{url}/scenes/scene-{i}/enroll", files=clip_files(KINDS[i % 3], seed=10 * i,
                                                                                    seconds=12.0),
                               timeout=60).status_code == 201
        registry.publish(v2_bundle)
        os.kill(proc.pid, signal.SIGHUP)
        at_kill = wait_for(f"{url}/admin/reload", lambda s: s["state"] == "reembedding" and s["clips_stored"] >= 1)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert at_kill["reason"] == "SIGHUP" and at_kill["clips_stored"] < 50

    proc = serve(data_dir, registry.root, port, **env)
    try:
        ready = httpx2.get(f"{url}/readyz", timeout=10).json()
        assert ready["scenes_indexed"] == 10  # the index holds every scene, whichever model serves
        status = wait_for(f"{url}/admin/reload", lambda s: s["state"] in ("done", "failed"))
        assert status["state"] == "done" and status["reason"] == "start", status  # resumed at start ...
        assert 0 < status["clips_total"] <= 50 - at_kill["clips_stored"]  # ... keeping what the killed one stored
        pointer = registry.pointer()
        assert pointer is not None and status["serving_key"] == pointer.key
        assert httpx2.get(f"{url}/readyz", timeout=10).json()["scenes_indexed"] == 10
        engine = create_engine(f"sqlite:///{data_dir / 'sceneprint.db'}")
        with Session(engine) as session:
            assert session.scalar(select(func.count(Scene.id))) == 10
            assert session.scalar(select(func.count()).select_from(Prototype)
                                  .where(Prototype.model_version == pointer.key, Prototype.n_clips == 5)) == 10
            assert session.scalar(select(func.count()).select_from(ClipEmbedding)
                                  .where(ClipEmbedding.model_version == pointer.key)) == \
                session.scalar(select(func.count(Clip.id))) == 50
        engine.dispose()
        for i in range(3):
            r = httpx2.post(f"{url}/classify", files={"file": ("q.wav", af.wav(af.scene_clip(KINDS[i], 50)))},
                            timeout=30)
            assert r.status_code == 200 and r.json()["model_version"] == "test-tiny-v2"
    finally:
        proc.terminate()
        proc.wait(timeout=30)
