"""The service layer's seams: one thread hand-off per request, each upload hashed once, constraint
violations mapped to domain errors in the repository."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.exc import IntegrityError

from sceneprint.service import clipstore, repository, scenes
from sceneprint.service.db import make_engine, make_session_factory
from sceneprint.service.errors import DuplicateClips, SceneExists
from sceneprint.service.migrate import upgrade
from tests import audio_factory as af
from tests.conftest import clip_files


def test_each_upload_is_hashed_once(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = clipstore.content_hash

    def counting(data: bytes) -> str:
        calls.append(len(data))
        return real(data)

    monkeypatch.setattr(scenes, "content_hash", counting)
    monkeypatch.setattr(clipstore, "content_hash", counting)
    assert client.post("/scenes/kitchen/enroll", files=clip_files()).status_code == 201
    assert len(calls) == 5
    calls.clear()
    assert client.post("/scenes/kitchen/clips", files=clip_files(n=2, seed=40)).status_code == 200
    assert len(calls) == 2


def test_classify_hands_its_work_to_one_thread_and_no_thread_waits_on_another(
        client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real_decode = scenes.decode_clip

    def decode(*args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real_decode(*args, **kwargs)  # type: ignore[arg-type]

    handoffs: list[object] = []
    real_run = scenes.run_in_threadpool

    async def run_in_threadpool(func, *args, **kwargs):  # type: ignore[no-untyped-def]
        handoffs.append(func)
        return await real_run(func, *args, **kwargs)

    monkeypatch.setattr(scenes, "decode_clip", decode)
    monkeypatch.setattr(scenes, "run_in_threadpool", run_in_threadpool)
    r = client.post("/classify", files={"file": ("q.wav", af.wav(af.scene_clip("hum", 1)))})
    assert r.status_code == 200
    assert len(threads) == 1 and threads[0].startswith("inference")  # decoded on the inference pool ...
    assert handoffs == []  # ... reached without a worker thread in between


def test_the_repository_maps_constraint_violations_to_domain_errors(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'db.sqlite'}"
    upgrade(url)
    sessions = make_session_factory(make_engine(url))
    with sessions() as session:
        scene = repository.create_scene(session, name="kitchen")
        repository.add_clip(session, scene=scene, sha256="a" * 64, filename="a.wav", byte_size=1, duration_s=1.0)
        session.commit()
    with sessions() as session, pytest.raises(SceneExists):
        repository.create_scene(session, name="kitchen")
    with sessions() as session:
        scene = repository.get_scene(session, name="kitchen")
        assert scene is not None
        with pytest.raises(DuplicateClips):
            repository.add_clip(session, scene=scene, sha256="a" * 64, filename="b.wav", byte_size=1,
                                duration_s=1.0)
    assert not issubclass(SceneExists, IntegrityError)
