"""The clip store's removal protocol, which replicas sharing one store rely on: a blob that a committed clip
row references is never lost, whatever the interleaving of a remover and a writer in different processes."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import httpx2
import pytest

from sceneprint.service.clipstore import STALE_TEMP_S, ClipStore, content_hash
from tests import audio_factory as af
from tests.service.test_replicas import replicas

DATA = b"RIFF" + bytes(range(256)) * 40
SHA = content_hash(DATA)


def test_discard_removes_what_is_unreferenced_and_keeps_what_is(tmp_path: Path) -> None:
    store = ClipStore(tmp_path)
    other = DATA + b"x"
    store.put(DATA, SHA)
    store.put(other, content_hash(other))
    assert store.discard([SHA, content_hash(other)], lambda among: {SHA} & set(among)) == 1
    assert store.all_hashes() == {SHA} and store.read(SHA) == DATA
    assert not list(tmp_path.glob("??/.trash-*"))


def test_a_writer_committing_between_the_rename_and_the_second_read_gets_its_blob_back(tmp_path: Path) -> None:
    store = ClipStore(tmp_path)
    store.put(DATA, SHA)
    committed: set[str] = set()

    def references(among: list[str]) -> set[str]:
        # The remover has set the blob aside; a writer in another process (which found the blob present, so
        # wrote nothing) commits its clip row now, before the remover's second read.
        assert not store.exists(SHA)
        committed.add(SHA)
        return committed & set(among)

    assert store.discard([SHA], references) == 0
    assert store.read(SHA) == DATA  # put back
    assert store.ensure(DATA, SHA) is False  # the writer's check after its commit finds it


def test_a_writer_committing_after_the_second_read_writes_the_blob_again(tmp_path: Path) -> None:
    store = ClipStore(tmp_path)
    store.put(DATA, SHA)
    assert store.discard([SHA], lambda among: set()) == 1  # no reference yet: removed
    assert not store.exists(SHA)
    assert store.ensure(DATA, SHA) is True  # the writer, after its commit, finds it gone and writes it again
    assert store.read(SHA) == DATA


def test_a_read_that_misses_a_blob_put_back_meanwhile_reads_it_again(tmp_path: Path) -> None:
    # A reader's read fails while a remover has the blob aside; the remover puts it back before the reader looks
    # for the aside copy, so the look finds none. The blob is there: the read must not report it lost (a CI flake).
    store = ClipStore(tmp_path)
    store.put(DATA, SHA)
    trash = store.path(SHA).with_name(f".trash-{SHA}-race")
    os.rename(store.path(SHA), trash)
    looks = 0

    def aside_after_put_back(sha256: str) -> bool:
        nonlocal looks
        looks += 1
        os.replace(trash, store.path(sha256))  # the remover's second read saw the reference: put back
        return False

    store._aside = aside_after_put_back  # type: ignore[method-assign]
    assert store.read(SHA) == DATA and looks == 1


def test_a_read_of_a_blob_that_is_gone_fails(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        ClipStore(tmp_path).read(SHA, wait_s=5.0)


def test_a_failed_second_read_puts_every_blob_back(tmp_path: Path) -> None:
    store = ClipStore(tmp_path)
    store.put(DATA, SHA)

    def unreachable(among: list[str]) -> set[str]:
        raise ConnectionError("database gone")

    with pytest.raises(ConnectionError):
        store.discard([SHA], unreachable)
    assert store.read(SHA) == DATA and not list(tmp_path.glob("??/.trash-*"))


def test_the_sweep_leaves_temporary_files_that_may_be_another_replicas_write(tmp_path: Path) -> None:
    store = ClipStore(tmp_path)
    store.put(DATA, SHA)
    (tmp_path / SHA[:2] / ".incoming-live").write_bytes(b"half")
    old = tmp_path / SHA[:2] / ".incoming-crashed"
    old.write_bytes(b"half")
    past = time.time() - STALE_TEMP_S - 60
    os.utime(old, (past, past))
    assert store.sweep(set(), lambda among: set()) == 1
    assert [p.name for p in tmp_path.glob("??/.*")] == [".incoming-live"]


def test_replicas_enrolling_and_deleting_the_same_audio_at_once_never_lose_a_referenced_clip(
        tmp_path: Path, tiny_bundle: Path, postgres_url: str) -> None:
    # One replica enrolls and deletes a scene over and over; the other enrolls and deletes another scene from the
    # same five recordings at the same time. Whatever interleaving happens, every clip a scene holds has its audio.
    clips = [af.wav(af.scene_clip("hum", i, 2.0)) for i in range(5)]
    files = [("files", (f"c{i}.wav", c, "audio/wav")) for i, c in enumerate(clips)]
    env = {"SCENEPRINT_DATABASE_URL": postgres_url}
    store = ClipStore(tmp_path / "data" / "clips")
    with replicas(tmp_path / "data", "--model", str(tiny_bundle), **env) as urls:
        errors: list[str] = []

        def churn(url: str, name: str) -> None:
            for _ in range(6):
                enrolled = httpx2.post(f"{url}/scenes/{name}/enroll", files=files, timeout=60)
                if enrolled.status_code != 201:
                    errors.append(f"{name}: {enrolled.status_code} {enrolled.text}")
                    return
                # (a blob another replica's removal has set aside for a moment is waited for by read)
                if [store.read(content_hash(c)) for c in clips] != clips:
                    errors.append(f"{name}: a clip of an enrolled scene has lost its audio")
                if httpx2.delete(f"{url}/scenes/{name}", timeout=60).status_code != 204:
                    errors.append(f"{name}: delete failed")

        threads = [threading.Thread(target=churn, args=(u, n)) for u, n in zip(urls, ("one", "two"), strict=True)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert errors == []
        assert httpx2.post(f"{urls[0]}/scenes/last/enroll", files=files, timeout=60).status_code == 201
    assert store.all_hashes() == {content_hash(c) for c in clips}
    assert not list((tmp_path / "data" / "clips").glob("??/.trash-*"))
