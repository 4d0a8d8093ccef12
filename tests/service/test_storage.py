"""A disk that refuses writes (issue 22: 3, 6) and the data directory's permissions (issue 22: 9).

The tests run as root, for whom chmod does not stop writes; so a read-only or full disk is simulated at its exact
write points: SQLite connections put in ``PRAGMA query_only`` (every write then fails as on a read-only file:
"attempt to write a readonly database"), and the clip store's file-system calls patched to raise the OSError a
read-only or full disk raises.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import Engine, event

from sceneprint.service import app as app_module
from sceneprint.service import scenes as scenes_module
from sceneprint.service.clipstore import ClipStore
from tests import audio_factory as af
from tests.conftest import ClientFactory, clip_files

GOOD = af.wav(af.scene_clip("hum", 99, 2.0))


class ReadOnlyDatabase:
    """While ``on``, every SQLite connection the service checks out is ``query_only``: its writes fail."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.on = False
        real = app_module.make_engine

        def make_engine(url: str, **kwargs: Any) -> Engine:
            engine = real(url, **kwargs)

            @event.listens_for(engine, "checkout")
            def _query_only(dbapi_connection: Any, *_: Any) -> None:
                dbapi_connection.execute(f"PRAGMA query_only={'ON' if self.on else 'OFF'}")

            return engine

        monkeypatch.setattr(app_module, "make_engine", make_engine)


@pytest.fixture
def read_only_db(monkeypatch: pytest.MonkeyPatch) -> ReadOnlyDatabase:
    return ReadOnlyDatabase(monkeypatch)


def _metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in /metrics")


def _wait(predicate: Any, timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


# --- 3: a committed delete answers 204 whatever the disk says -------------------------------------


def test_delete_while_clip_store_unwritable_answers_204(
        client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """The scene's rows are committed gone: the answer is 204, the blob the disk refused to move is logged (one
    WARNING line, no traceback), counted, and removed by the next write once the disk takes writes again."""
    assert client.post("/scenes/kitchen/enroll", files=clip_files(seed=0)).status_code == 201
    blobs = tmp_path / "data" / "clips"
    assert len(list(blobs.glob("??/*"))) == 5
    real_rename = os.rename

    def refusing_rename(src: Any, dst: Any) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(src))

    monkeypatch.setattr(os, "rename", refusing_rename)
    with caplog.at_level(logging.WARNING):
        assert client.delete("/scenes/kitchen").status_code == 204
    assert client.get("/scenes/kitchen").status_code == 404
    warnings = [r for r in caplog.records if "could not remove" in r.getMessage()]
    assert warnings and all(r.levelno == logging.WARNING and r.exc_info is None for r in warnings)
    assert _metric(client, "sceneprint_clip_removal_failures_total") == 5
    assert _metric(client, "sceneprint_clip_removals_pending") == 5
    assert len(list(blobs.glob("??/*"))) == 5  # still there: the disk refused

    monkeypatch.setattr(os, "rename", real_rename)
    assert client.post("/scenes/office/enroll", files=clip_files("birds", seed=40)).status_code == 201
    assert _metric(client, "sceneprint_clip_removals_pending") == 0
    assert len(list(blobs.glob("??/*"))) == 5  # only the new scene's audio is left


def test_clip_removals_the_disk_refused_are_retried_periodically(
        client_factory: ClientFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scenes_module, "STORAGE_RETRY_S", 0.1)
    with client_factory() as client:
        assert client.post("/scenes/kitchen/enroll", files=clip_files(seed=0)).status_code == 201
        real_rename = os.rename
        monkeypatch.setattr(os, "rename", lambda src, dst: (_ for _ in ()).throw(
            PermissionError(errno.EROFS, "Read-only file system")))
        assert client.delete("/scenes/kitchen").status_code == 204
        monkeypatch.setattr(os, "rename", real_rename)
        assert _wait(lambda: not list((tmp_path / "data" / "clips").glob("??/*")))


# --- 6: a read-only or full disk at start-up, and during writes -----------------------------------


def test_service_starts_on_a_read_only_database_serves_reads_and_refuses_writes_503(
        client_factory: ClientFactory, read_only_db: ReadOnlyDatabase, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Start-up's write (the served model's row) fails: the service starts anyway, says so in the log and at
    /readyz (200: reads work, so it stays routable), serves reads, answers writes 503 storage_unavailable with
    Retry-After, and takes writes again once the database does (retried every few seconds)."""
    with client_factory() as client:  # a first start, to have a scene to read
        assert client.post("/scenes/kitchen/enroll", files=clip_files(seed=0)).status_code == 201
    monkeypatch.setattr(scenes_module, "STORAGE_RETRY_S", 0.1)
    read_only_db.on = True
    with caplog.at_level(logging.WARNING), client_factory() as client:
        assert any("storage unavailable" in r.getMessage() for r in caplog.records)
        ready = client.get("/readyz")
        assert ready.status_code == 200
        assert ready.json()["storage"] == "unavailable" and ready.json()["status"] == "ready"
        assert client.get("/scenes").json()["scenes"][0]["name"] == "kitchen"
        assert client.get("/scenes/kitchen").status_code == 200
        assert client.post("/classify", files={"file": ("q.wav", GOOD)}).status_code == 200
        for response in (client.post("/scenes/office/enroll", files=clip_files("birds", seed=40)),
                         client.delete("/scenes/kitchen"),
                         client.post("/scenes/kitchen/clips", files=clip_files("hum", n=1, seed=77))):
            assert response.status_code == 503, response.text
            assert response.headers["content-type"].startswith("application/problem+json")
            assert response.json()["code"] == "storage_unavailable"
            assert int(response.headers["retry-after"]) > 0
        assert _metric(client, "sceneprint_storage_writable") == 0

        read_only_db.on = False  # the disk is back: the periodic retry notices
        assert _wait(lambda: client.get("/readyz").json()["storage"] == "ok")
        assert client.post("/scenes/office/enroll", files=clip_files("birds", seed=40)).status_code == 201


def test_a_write_after_the_disk_recovers_succeeds_without_waiting_for_the_retry(
        client_factory: ClientFactory, read_only_db: ReadOnlyDatabase, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(scenes_module, "STORAGE_RETRY_S", 3600.0)
    read_only_db.on = True
    with client_factory() as client:
        assert client.post("/scenes/kitchen/enroll", files=clip_files(seed=0)).status_code == 503
        read_only_db.on = False
        assert client.post("/scenes/kitchen/enroll", files=clip_files(seed=0)).status_code == 201
        assert client.get("/readyz").json()["storage"] == "ok"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EROFS])
def test_a_disk_that_refuses_both_the_write_and_its_undo_answers_503_not_500(
        client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int) -> None:
    """An enrollment's third blob meets a full (or read-only) disk, and removing the two it wrote fails too (the
    clean-up's rename is refused): 503 storage_unavailable with Retry-After, never 500; nothing is enrolled, and the
    two blobs are removed once the disk takes writes again."""
    calls = 0
    real_put, real_rename = ClipStore.put, os.rename

    def failing_put(self: ClipStore, data: bytes, sha256: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(code, os.strerror(code))
        real_put(self, data, sha256)

    def refusing_rename(src: Any, dst: Any) -> None:
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(ClipStore, "put", failing_put)
    monkeypatch.setattr(os, "rename", refusing_rename)
    r = client.post("/scenes/kitchen/enroll", files=clip_files(seed=0))
    assert r.status_code == 503, r.text
    assert r.json()["code"] == "storage_unavailable" and "retry-after" in r.headers
    assert client.get("/scenes").json()["scenes"] == []
    monkeypatch.setattr(ClipStore, "put", real_put)
    monkeypatch.setattr(os, "rename", real_rename)
    assert client.post("/scenes/office/enroll", files=clip_files("birds", seed=40)).status_code == 201
    assert len(list((tmp_path / "data" / "clips").glob("??/*"))) == 5  # the refused enrollment's two are gone


def test_a_full_database_during_a_key_write_is_503_storage_unavailable(
        client_factory: ClientFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite's "database or disk is full", met by a route outside the scene service, maps to 503 too."""
    from sqlalchemy.exc import OperationalError

    from sceneprint.service import repository

    def full(*_a: object, **_k: object) -> None:
        raise OperationalError("INSERT INTO api_keys", {}, Exception("database or disk is full"))

    monkeypatch.setattr(repository, "add_key", full)
    with client_factory() as client:
        r = client.post("/keys", json={"name": "ops", "scope": "admin"})
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "storage_unavailable" and "retry-after" in r.headers


# --- 9: private permissions whatever the umask ------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def test_data_directory_is_private_under_umask_022(umask_022: None, client: TestClient, tmp_path: Path) -> None:
    """After an enrollment, every directory under the data directory (and it) is 0700, every file 0600: the
    database, its -wal and -shm files, and the clips."""
    del umask_022
    assert client.post("/scenes/kitchen/enroll", files=clip_files(seed=0)).status_code == 201
    data = tmp_path / "data"
    found = {p.name for p in data.iterdir()}
    assert {"sceneprint.db", "sceneprint.db-wal", "sceneprint.db-shm", "clips"} <= found
    for path in [data, *data.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        expected = 0o700 if path.is_dir() else 0o600
        assert mode == expected, f"{path.relative_to(tmp_path)}: {oct(mode)}"
