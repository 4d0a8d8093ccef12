"""Quotas: scenes, clips per scene and stored audio bytes; refused with ``quota_exceeded`` and nothing stored."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from tests.conftest import ClientFactory, clip_files


def quota_problem(r, quota: str, limit: int) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == 409, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == "quota_exceeded" and body["quota"] == quota and body["limit"] == limit
    assert quota in body["detail"] or str(limit) in body["detail"]
    return body


def blobs(data_dir: Path) -> int:
    return len([p for p in (data_dir / "clips").glob("??/*") if not p.name.startswith(".")])


def test_the_scene_quota_refuses_one_scene_more(client_factory: ClientFactory, tmp_path: Path) -> None:
    with client_factory(max_scenes=2) as client:
        for i, name in enumerate(["one", "two"]):
            assert client.post(f"/scenes/{name}/enroll", files=clip_files(seed=10 * i)).status_code == 201
        quota_problem(client.post("/scenes/three/enroll", files=clip_files(seed=50)), "max_scenes", 2)
        assert [s["name"] for s in client.get("/scenes").json()["scenes"]] == ["one", "two"]
        assert blobs(tmp_path / "data") == 10
        assert client.delete("/scenes/one").status_code == 204
        assert client.post("/scenes/three/enroll", files=clip_files(seed=50)).status_code == 201


def test_the_clips_per_scene_quota_refuses_added_clips(client_factory: ClientFactory, tmp_path: Path) -> None:
    with client_factory(max_clips_per_scene=6) as client:
        client.post("/scenes/kitchen/enroll", files=clip_files())
        quota_problem(client.post("/scenes/kitchen/clips", files=clip_files(n=2, seed=20)), "max_clips_per_scene", 6)
        assert client.get("/scenes/kitchen").json()["clips"] == 5 and blobs(tmp_path / "data") == 5
        assert client.post("/scenes/kitchen/clips", files=clip_files(n=1, seed=20)).json()["clips"] == 6


def test_the_stored_bytes_quota_counts_each_stored_clip_once(client_factory: ClientFactory, tmp_path: Path) -> None:
    files = clip_files()
    size = sum(len(f[1][1]) for f in files)
    with client_factory(max_stored_bytes=size + 1000) as client:
        assert client.post("/scenes/one/enroll", files=files).status_code == 201
        quota_problem(client.post("/scenes/two/enroll", files=clip_files(seed=30)), "max_stored_bytes", size + 1000)
        assert blobs(tmp_path / "data") == 5
        # The same audio again is stored once: it costs no bytes.
        assert client.post("/scenes/copy/enroll", files=files).status_code == 201


def test_default_quotas_are_far_from_a_small_team(client: TestClient) -> None:
    from sceneprint.service.settings import Settings

    defaults = Settings()
    assert defaults.max_scenes >= 1_000 and defaults.max_clips_per_scene >= 100
    assert defaults.max_stored_bytes >= 10 * 1024**3
