"""Enrollment, clips, listing and deletion over HTTP."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient

from tests import audio_factory as af
from tests.conftest import ClientFactory, clip_files


def stored_blobs(data_dir: Path) -> list[Path]:
    return [p for p in (data_dir / "clips").glob("??/*") if not p.name.startswith(".")]


def test_enroll_creates_a_scene_from_five_clips(client: TestClient) -> None:
    r = client.post("/scenes/kitchen/enroll", files=clip_files())
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == "kitchen" and body["clips"] == 5
    assert body["model_version"] == "test-tiny-v1" and body["created_at"]
    listed = client.get("/scenes").json()["scenes"]
    assert [s["name"] for s in listed] == ["kitchen"]
    # The same instant, in UTC, whether it comes from the enrollment or back from the database.
    assert client.get("/scenes/kitchen").json() == body
    assert {k: body[k] for k in listed[0]} == listed[0]  # the list shows each scene without its quality


def test_enroll_keeps_the_original_audio_content_addressed(client: TestClient, tmp_path: Path) -> None:
    files = clip_files()
    client.post("/scenes/kitchen/enroll", files=files)
    blobs = stored_blobs(tmp_path / "data")
    assert sorted(p.read_bytes() for p in blobs) == sorted(f[1][1] for f in files)


def test_enroll_rejects_an_existing_name(client: TestClient) -> None:
    assert client.post("/scenes/kitchen/enroll", files=clip_files()).status_code == 201
    r = client.post("/scenes/kitchen/enroll", files=clip_files(seed=10))
    assert r.status_code == 409 and r.json()["code"] == "scene_exists"
    assert r.headers["content-type"] == "application/problem+json"


def test_two_clients_enrolling_the_same_new_name_get_one_201_and_one_409(client: TestClient) -> None:
    results: list[int] = []
    barrier = threading.Barrier(2)

    def enroll(seed: int) -> None:
        files = clip_files(seed=seed)
        barrier.wait()
        results.append(client.post("/scenes/race/enroll", files=files).status_code)

    threads = [threading.Thread(target=enroll, args=(s,)) for s in (0, 100)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == [201, 409]
    assert client.get("/scenes/race").json()["clips"] == 5


def test_add_clips_updates_the_scene(client: TestClient) -> None:
    client.post("/scenes/kitchen/enroll", files=clip_files())
    r = client.post("/scenes/kitchen/clips", files=clip_files(n=2, seed=50))
    assert r.status_code == 200, r.text
    assert r.json()["clips"] == 7


def test_add_clips_rejects_a_clip_already_in_the_scene(client: TestClient) -> None:
    files = clip_files()
    client.post("/scenes/kitchen/enroll", files=files)
    r = client.post("/scenes/kitchen/clips", files=files[:1])
    assert r.status_code == 422 and r.json()["code"] == "duplicate_clips"
    assert client.get("/scenes/kitchen").json()["clips"] == 5


def test_add_clips_to_a_missing_scene_is_404(client: TestClient) -> None:
    r = client.post("/scenes/nowhere/clips", files=clip_files(n=1))
    assert r.status_code == 404 and r.json()["code"] == "scene_not_found"


def test_delete_removes_the_scene_and_its_audio(client: TestClient, tmp_path: Path) -> None:
    client.post("/scenes/kitchen/enroll", files=clip_files())
    assert client.delete("/scenes/kitchen").status_code == 204
    assert client.get("/scenes/kitchen").status_code == 404
    assert stored_blobs(tmp_path / "data") == []
    assert client.post("/classify", files={"file": ("q.wav", af.wav(af.scene_clip("hum", 99)))}).json()["top_k"] == []


def test_delete_keeps_audio_another_scene_still_uses(client: TestClient, tmp_path: Path) -> None:
    shared = clip_files(n=1, seed=7)
    client.post("/scenes/one/enroll", files=shared + clip_files(n=4, seed=20))
    client.post("/scenes/two/enroll", files=shared + clip_files(n=4, seed=40))
    client.delete("/scenes/one")
    assert shared[0][1][1] in {p.read_bytes() for p in stored_blobs(tmp_path / "data")}


def test_get_and_delete_of_a_missing_scene_are_404(client: TestClient) -> None:
    for method in (client.get, client.delete):
        r = method("/scenes/ghost")
        assert r.status_code == 404 and r.json()["code"] == "scene_not_found"


def test_enrollment_survives_a_restart(client_factory: ClientFactory) -> None:
    with client_factory() as c:
        c.post("/scenes/kitchen/enroll", files=clip_files())
        before = c.post("/classify", files={"file": ("q.wav", af.wav(af.scene_clip("hum", 77)))}).json()
    with client_factory() as c:
        assert c.get("/scenes/kitchen").json()["clips"] == 5
        after = c.post("/classify", files={"file": ("q.wav", af.wav(af.scene_clip("hum", 77)))}).json()
    assert after == before
