"""Replicas: two ``sceneprint serve`` processes on one database and one clip store, as the compose ``scale``
profile runs them. What one replica writes reaches the other's classifications; a race for one name gives one 201
and one 409; a new model reaches both and its re-embedding is done once."""

from __future__ import annotations

import re
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx2
import pytest

from sceneprint.registry import Registry
from tests import audio_factory as af
from tests.conftest import clip_files, make_bundle
from tests.service.live import serve_process
from tests.service.test_kill9 import free_port
from tests.service.test_postgres import race

VISIBLE_WITHIN_S = 10.0  # far above the bound (NOTIFY: tens of ms; polling: sync_poll_s), for a loaded CI machine


@contextmanager
def replicas(data_dir: Path, *args: str, n: int = 2, **env: str) -> Iterator[list[str]]:
    """``n`` serve processes sharing ``data_dir`` (clip store) and the database in ``env``; their base URLs."""
    procs: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for _ in range(n):
            port = free_port()
            procs.append(serve_process(data_dir, port, *args, **env))
            urls.append(f"http://127.0.0.1:{port}")
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()


def query(kind: str, seed: int = 50) -> dict[str, tuple[str, bytes, str]]:
    return {"file": ("q.wav", af.wav(af.scene_clip(kind, seed, 2.0)), "audio/wav")}


def until(predicate: Callable[[], Any], timeout: float = VISIBLE_WITHIN_S) -> float:
    """Seconds until ``predicate()`` holds (AssertionError after ``timeout``)."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.02)
    return time.monotonic() - t0


def best(url: str, kind: str) -> dict[str, Any]:
    body: dict[str, Any] = httpx2.post(f"{url}/classify", files=query(kind), params={"top_k": 10},
                                       timeout=30).json()
    return body


def in_index(url: str, scene: str, kind: str) -> bool:
    return any(m["scene"] == scene for m in best(url, kind)["top_k"])


@pytest.fixture(params=["postgres", "sqlite"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """The replicas' shared database: PostgreSQL (woken by NOTIFY) or one SQLite file (polling)."""
    if request.param == "postgres":
        return {"SCENEPRINT_DATABASE_URL": request.getfixturevalue("postgres_url")}
    return {"SCENEPRINT_DATABASE_URL": f"sqlite:///{tmp_path / 'shared.db'}", "SCENEPRINT_SYNC_POLL_S": "0.2"}


def test_what_one_replica_writes_reaches_the_others_classifications(tmp_path: Path, tiny_bundle: Path,
                                                                     database: dict[str, str]) -> None:
    with replicas(tmp_path / "data", "--model", str(tiny_bundle), **database) as (a, b):
        assert httpx2.post(f"{a}/scenes/kitchen/enroll", files=clip_files("hum"), timeout=60).status_code == 201
        until(lambda: in_index(b, "kitchen", "hum"))
        assert httpx2.post(f"{b}/scenes/street/enroll", files=clip_files("clicks"), timeout=60).status_code == 201
        until(lambda: in_index(a, "street", "clicks"))
        # a threshold set through one replica is the one the other applies
        assert httpx2.patch(f"{b}/scenes/kitchen", json={"threshold": 0.99}, timeout=30).status_code == 200
        until(lambda: httpx2.post(f"{a}/classify", files=query("hum"), timeout=30).json()["threshold_source"]
              == "scene")
        # clips added through one replica move the prototype the other searches
        before = next(m["score"] for m in best(b, "hum")["top_k"] if m["scene"] == "kitchen")
        assert httpx2.post(f"{a}/scenes/kitchen/clips", files=[("files", ("q.wav", query("hum")["file"][1],
                                                                            "audio/wav"))],
                           timeout=60).status_code == 200
        until(lambda: next(m["score"] for m in best(b, "hum")["top_k"] if m["scene"] == "kitchen") > before)
        # a deletion through one replica leaves the other's index
        assert httpx2.delete(f"{b}/scenes/kitchen", timeout=30).status_code == 204
        until(lambda: not in_index(a, "kitchen", "hum"))
        assert [s["name"] for s in httpx2.get(f"{a}/scenes", timeout=30).json()["scenes"]] == ["street"]
        # At least the other's three writes (street, the threshold, the deletion): each was waited for on this
        # replica before the next was made, so each took a poll of its own; this replica's own changes may share
        # a poll with them (a scene counts once per poll), so more is not guaranteed on a busy machine.
        assert metric(a, "sceneprint_replica_synced_scenes_total") >= 3
        assert metric(a, "sceneprint_index_scenes") == metric(b, "sceneprint_index_scenes") == 1


def test_two_replica_processes_racing_for_one_name_give_one_201_and_one_409(tmp_path: Path, tiny_bundle: Path,
                                                                             postgres_url: str) -> None:
    env = {"SCENEPRINT_DATABASE_URL": postgres_url}
    with replicas(tmp_path / "data", "--model", str(tiny_bundle), **env) as urls:
        for attempt in range(5):
            name = f"race-{attempt}"
            clients = [httpx2.Client(base_url=u, timeout=60) for u in urls]
            statuses = race(clients, name, [clip_files("hum", seed=100 * attempt + 10 * i) for i in range(len(urls))])
            for c in clients:
                c.close()
            assert sorted(statuses) == [201, 409], statuses
            for url in urls:
                assert httpx2.get(f"{url}/scenes/{name}", timeout=30).json()["clips"] == 5


def metric(url: str, name: str) -> float:
    text = httpx2.get(f"{url}/metrics", timeout=30).text
    found = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.MULTILINE)
    assert found, name
    return float(found.group(1))


def test_a_published_model_reaches_every_replica_and_is_embedded_once(tmp_path: Path, tiny_bundle: Path,
                                                                       postgres_url: str) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(tiny_bundle)
    env = {"SCENEPRINT_DATABASE_URL": postgres_url, "SCENEPRINT_REGISTRY_POLL_S": "0.2"}
    with replicas(tmp_path / "data", "--registry", str(registry.root), **env) as (a, b):
        for i, kind in enumerate(("hum", "birds", "clicks")):
            url = (a, b)[i % 2]
            assert httpx2.post(f"{url}/scenes/{kind}/enroll", files=clip_files(kind), timeout=60).status_code == 201
        published = registry.publish(make_bundle(tmp_path / "v2", model_version="test-tiny-v2", seed=1))
        for url in (a, b):
            until(lambda u=url: httpx2.get(f"{u}/admin/reload", timeout=30).json()["serving_registry_version"]  # type: ignore[misc]
                  == published.version, timeout=120)
            response = httpx2.post(f"{url}/classify", files=query("birds"), timeout=30)
            assert response.headers["x-model-version"] == "test-tiny-v2" and response.json()["scene"] == "birds"
        # 15 stored clips, re-embedded for the new model once between the two replicas, not once by each
        embedded = [metric(u, "sceneprint_reload_reembedded_clips_total") for u in (a, b)]
        assert sum(embedded) == 15 and sorted(embedded) == [0, 15], embedded


def test_replicas_starting_together_on_a_new_model_embed_the_stored_scenes_once(tmp_path: Path, tiny_bundle: Path,
                                                                                postgres_url: str) -> None:
    env = {"SCENEPRINT_DATABASE_URL": postgres_url}
    with replicas(tmp_path / "data", "--model", str(tiny_bundle), n=1, **env) as (a,):
        for kind in ("hum", "birds", "clicks"):
            assert httpx2.post(f"{a}/scenes/{kind}/enroll", files=clip_files(kind), timeout=60).status_code == 201
    v2 = make_bundle(tmp_path / "v2", model_version="test-tiny-v2", seed=1)
    ports = [free_port(), free_port()]
    procs: list[subprocess.Popen[bytes]] = []
    starting = [threading.Thread(target=lambda p=p: procs.append(serve_process(tmp_path / "data", p, "--model",
                                                                               str(v2), **env)))
                for p in ports]
    try:
        for t in starting:
            t.start()
        for t in starting:
            t.join()
        assert len(procs) == 2  # both started (neither failed on the other's rows)
        urls = [f"http://127.0.0.1:{p}" for p in ports]
        counts = [metric(u, "sceneprint_reembed_duration_seconds_count") for u in urls]
        assert sorted(counts) == [0, 3], counts  # three scenes, re-embedded by one replica
        for url in urls:
            assert best(url, "birds")["scene"] == "birds"
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=30)
