"""Crash points during enrollment: after a restart the scene exists whole or not at all, and the
database, the clip store and the index agree.

A process killed at a given point is modelled by an exception raised there: nothing after it runs,
the open transaction is lost as in a kill, and the app restarts on the same data directory. A real
``kill -9`` of a server process is in test_kill9.py.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from sceneprint.service import repository
from sceneprint.service.clipstore import ClipStore
from sceneprint.service.scenes import SceneService
from tests import audio_factory as af
from tests.conftest import ClientFactory, clip_files


class Crash(RuntimeError):
    """Raised at the crash point; no handler in the app expects it."""


def blobs(data_dir: Path) -> set[str]:
    return {p.name for p in (data_dir / "clips").glob("??/*") if not p.name.startswith(".")}


def assert_consistent(client, data_dir: Path, expected_scenes: list[str]) -> None:  # type: ignore[no-untyped-def]
    scenes = client.get("/scenes").json()["scenes"]
    assert [s["name"] for s in scenes] == expected_scenes
    assert all(s["clips"] == 5 for s in scenes)
    assert len(blobs(data_dir)) == 5 * len(expected_scenes)
    assert client.get("/readyz").json()["scenes_indexed"] == len(expected_scenes)
    top = client.post("/classify?top_k=10", files={"file": ("q.wav", af.wav(af.scene_clip("hum", 99)))}).json()
    assert sorted(m["scene"] for m in top["top_k"]) == sorted(expected_scenes)


def test_crash_after_audio_is_written_but_before_commit(client_factory: ClientFactory, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with client_factory() as client:
        client.post("/scenes/first/enroll", files=clip_files(seed=100))
        with monkeypatch.context() as m:
            def crash(*_a: object, **_k: object) -> None:
                raise Crash

            m.setattr(repository, "put_prototype", crash)
            # A killed process runs no clean-up: keep the request's own removal of its audio from running.
            m.setattr(ClipStore, "discard", lambda self, hashes, references: 0)
            assert client.post("/scenes/second/enroll", files=clip_files()).status_code == 500
        assert len(blobs(tmp_path / "data")) == 10  # the orphaned audio is on disk ...
    with client_factory() as client:
        assert_consistent(client, tmp_path / "data", ["first"])  # ... and swept at restart


def test_crash_after_commit_but_before_the_index_update(client_factory: ClientFactory, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with client_factory() as client, monkeypatch.context() as m:
        def crash(*_a: object, **_k: object) -> None:
            raise Crash

        m.setattr(SceneService, "_index_if_current", crash)
        assert client.post("/scenes/second/enroll", files=clip_files()).status_code == 500
    with client_factory() as client:
        assert_consistent(client, tmp_path / "data", ["second"])


def test_a_scene_without_a_prototype_for_the_running_model_is_re_embedded_from_its_audio(
        client_factory: ClientFactory, tmp_path: Path) -> None:
    from tests.conftest import make_bundle

    with client_factory() as client:
        client.post("/scenes/kitchen/enroll", files=clip_files())
    newer = make_bundle(tmp_path / "newer", model_version="test-tiny-v2", seed=1)
    with client_factory(model_path=newer) as client:
        scene = client.get("/scenes/kitchen").json()
        assert scene["model_version"] == "test-tiny-v2" and scene["clips"] == 5
        assert client.post("/classify", files={"file": ("q.wav", af.wav(af.scene_clip("hum", 9)))}).json()[
            "top_k"][0]["scene"] == "kitchen"
