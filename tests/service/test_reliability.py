"""The bad inputs and faults of ../shared/RELIABILITY.md that apply to enrollment and classification.

Every refusal is problem+json with a stable code, names the file where one is at fault, and leaves
nothing stored.
"""

from __future__ import annotations

import errno
import sqlite3
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from sceneprint.service.clipstore import ClipStore
from tests import audio_factory as af
from tests.conftest import ClientFactory, clip_files

GOOD = af.wav(af.scene_clip("hum", 1))


def assert_nothing_stored(client: TestClient, data_dir: Path) -> None:
    assert client.get("/scenes").json()["scenes"] == []
    assert [p for p in (data_dir / "clips").glob("??/*")] == []


def problem_of(r, status: int, code: str) -> dict:  # type: ignore[no-untyped-def]
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["code"] == code and body["status"] == status and body["detail"]
    return body


def float_wav_with(value: float) -> bytes:
    x = af.noise(1.0)
    x[1000] = value
    return af.wav(x, subtype="FLOAT")


def loud_float_wav(peak: float, subtype: str = "FLOAT") -> bytes:
    """White noise scaled to ``peak``: valid floats, far outside full scale (the NaN prototype of issue 22)."""
    x = af.noise(2.0, amp=1.0, seed=7).astype(np.float64)
    return af.wav(x / np.abs(x).max() * peak, subtype=subtype)


BAD_CLIPS = {
    "empty_file": b"",
    "undecodable_audio:text": b"just some text, not audio\n" * 50,
    "undecodable_audio:png": b"\x89PNG\r\n\x1a\n" + bytes(500),
    "undecodable_audio:pdf": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n" + bytes(500),
    "undecodable_audio:zip": b"PK\x03\x04\x14\x00" + bytes(500),
    "undecodable_audio:truncated": af.wav(af.noise(1.0))[:20],
    "too_short:one_sample": af.wav(af.noise(1 / 32_000)),
    "too_short:200ms": af.wav(af.noise(0.2)),
    "too_long": af.wav(af.noise(31.0, rate=8000), rate=8000),
    "too_long:bomb": af.long_silent_flac(3 * 3600),
    "silent:zeros": af.wav(np.zeros(32_000, dtype=np.float32)),
    "silent:dc": af.wav(np.full(32_000, 0.3, dtype=np.float32), subtype="FLOAT"),
    "non_finite:nan": float_wav_with(np.nan),
    "non_finite:inf": float_wav_with(np.inf),
    "out_of_range:float32_3e17": loud_float_wav(3e17),
    "non_finite:float64_1e300": loud_float_wav(1e300, "DOUBLE"),
    "out_of_range:float32_1e5": loud_float_wav(1e5),
    "unsupported_audio:rate_0hz": af.raw_wav_header(0, 1, 100, data=b"\x01\x00" * 100),
    "unsupported_audio:rate_1hz": af.raw_wav_header(1, 1, 100, data=b"\x01\x00" * 100),
    "unsupported_audio:64_channels": af.raw_wav_header(32_000, 64, 8000, data=b"\x01\x00" * 64 * 8000),
}


@pytest.mark.parametrize("case", sorted(BAD_CLIPS))
def test_one_bad_clip_among_five_is_named_and_nothing_is_stored(case: str, client: TestClient, tmp_path: Path) -> None:
    code = case.split(":")[0]
    files = [*clip_files(n=4), ("files", ("broken.wav", BAD_CLIPS[case], "audio/wav"))]
    body = problem_of(client.post("/scenes/kitchen/enroll", files=files), 422, code)
    assert body["file"] == "broken.wav" and "broken.wav" in body["detail"]
    assert_nothing_stored(client, tmp_path / "data")


@pytest.mark.parametrize("case", sorted(BAD_CLIPS))
def test_classify_refuses_every_bad_clip(case: str, client: TestClient) -> None:
    problem_of(client.post("/classify", files={"file": ("q.wav", BAD_CLIPS[case], "audio/wav")}), 422,
               case.split(":")[0])


def test_float_wav_with_absurd_amplitudes_never_stores_a_non_finite_prototype(client: TestClient) -> None:
    """RELIABILITY "float WAV with absurd amplitudes": one such clip added to a healthy scene is refused
    (422 out_of_range, nothing stored), and the scene still matches afterwards."""
    assert client.post("/scenes/kitchen/enroll", files=clip_files()).status_code == 201
    files = [("files", ("loud.wav", loud_float_wav(3e17), "audio/wav"))]
    body = problem_of(client.post("/scenes/kitchen/clips", files=files), 422, "out_of_range")
    assert body["file"] == "loud.wav"
    scene = client.get("/scenes/kitchen").json()
    assert len(scene["quality"]["clips"]) == 5 and scene["quality"]["cohesion"] is not None
    r = client.post("/classify", files={"file": ("q.wav", af.wav(af.scene_clip("hum", 0)), "audio/wav")})
    assert r.status_code == 200 and r.json()["top_k"], r.text
    assert all(np.isfinite(m["score"]) for m in r.json()["top_k"])


def test_content_type_and_file_name_do_not_decide_the_format(client: TestClient) -> None:
    flac = af.encode(af.scene_clip("birds", 3), fmt="FLAC")
    r = client.post("/classify", files={"file": ("not-audio.txt", flac, "text/plain")})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("n", [0, 4, 6])
def test_enroll_with_the_wrong_number_of_clips_is_refused(n: int, client: TestClient, tmp_path: Path) -> None:
    files = clip_files(n=n) if n else [("other", ("x", b"x"))]  # 0: no `files` part at all
    body = problem_of(client.post("/scenes/kitchen/enroll", files=files), 422, "wrong_clip_count")
    assert body["expected"] == 5 and body["received"] == n
    assert_nothing_stored(client, tmp_path / "data")


def test_enroll_with_the_same_clip_five_times_is_refused(client: TestClient, tmp_path: Path) -> None:
    files = [("files", (f"same-{i}.wav", GOOD, "audio/wav")) for i in range(5)]
    problem_of(client.post("/scenes/kitchen/enroll", files=files), 422, "duplicate_clips")
    assert_nothing_stored(client, tmp_path / "data")


@pytest.mark.parametrize("name", ["", "a" * 65, "Kitchen", "my kitchen", "%2e%2e", "küche", "a/b",
                                  "x';DROP TABLE scenes;--", "a.b", "%00"])
def test_invalid_scene_names_are_422(name: str, client: TestClient) -> None:
    problem_of(client.post(f"/scenes/{name}/enroll", files=clip_files()), 422, "invalid_scene_name")
    if name:
        for method in (client.get, client.delete):
            problem_of(method(f"/scenes/{name}"), 422, "invalid_scene_name")


def test_scene_names_at_the_limits_are_accepted(client: TestClient) -> None:
    for name in ["a", "z" * 64, "office-2_b"]:
        assert client.post(f"/scenes/{name}/enroll", files=clip_files(seed=len(name))).status_code == 201


def test_classify_with_no_scenes_is_unknown_not_an_error(client: TestClient) -> None:
    r = client.post("/classify", files={"file": ("q.wav", GOOD, "audio/wav")})
    assert r.status_code == 200
    body = r.json()
    assert body["unknown"] is True and body["scene"] is None and body["top_k"] == []
    assert body["model_version"] == "test-tiny-v1" and body["duration_s"] == pytest.approx(3.0)


@pytest.mark.parametrize("top_k", ["0", "-1", "1000000000", "abc"])
def test_bad_top_k_is_422(top_k: str, client: TestClient) -> None:
    problem_of(client.post(f"/classify?top_k={top_k}", files={"file": ("q.wav", GOOD)}), 422, "validation_error")


def test_top_k_is_capped_by_the_number_of_scenes(client: TestClient) -> None:
    client.post("/scenes/one/enroll", files=clip_files())
    r = client.post("/classify?top_k=50", files={"file": ("q.wav", GOOD)})
    assert [m["scene"] for m in r.json()["top_k"]] == ["one"]


def test_missing_field_malformed_body_and_wrong_content_type_are_4xx(client: TestClient) -> None:
    body = problem_of(client.post("/classify", files={"wrong": ("q.wav", GOOD)}), 422, "wrong_clip_count")
    assert body["expected"] == 1 and body["received"] == 0
    r = client.post("/classify", content=b"--xyz\r\nContent-Disposition: form-data; name=\"file\"\r\n\r\nabc",
                    headers={"content-type": "multipart/form-data; boundary=xyz"})
    problem_of(r, 400, "malformed_request")
    problem_of(client.post("/classify", json={"file": "abc"}), 415, "unsupported_media_type")
    problem_of(client.post("/scenes/kitchen/enroll", content=b"x"), 415, "unsupported_media_type")


def test_two_files_to_classify_are_refused_not_half_used(client: TestClient) -> None:
    files = [("file", ("a.wav", GOOD, "audio/wav")), ("file", ("b.wav", af.wav(af.scene_clip("birds", 2))))]
    body = problem_of(client.post("/classify", files=files), 422, "wrong_clip_count")
    assert body["expected"] == 1 and body["received"] == 2


def test_undecodable_audio_lists_the_formats_and_carries_no_python_repr(client: TestClient) -> None:
    body = problem_of(client.post("/classify", files={"file": ("q.wav", b"just text" * 100)}), 422,
                      "undecodable_audio")
    assert "WAV" in body["detail"] and "FLAC" in body["detail"] and "MP3" in body["detail"]
    assert " at 0x" not in body["detail"] and "<" not in body["detail"] and "_io." not in body["detail"]


@pytest.mark.parametrize("filename", ["../../etc/passwd", "a\x00b.wav", "x" * 1_000 + ".wav", "звук 🎵.wav"])
def test_client_file_names_are_never_paths(filename: str, client: TestClient, tmp_path: Path) -> None:
    files = [*clip_files(n=4), ("files", (filename, GOOD, "audio/wav"))]
    assert client.post("/scenes/kitchen/enroll", files=files).status_code == 201
    names = {p.name for p in (tmp_path / "data" / "clips").glob("??/*")}
    assert len(names) == 5 and all(len(n) == 64 for n in names)
    assert not (tmp_path / "etc").exists()


def test_a_10000_character_file_name_is_accepted_and_shortened_for_display(client: TestClient) -> None:
    long_name = "x" * 10_000 + ".wav"
    files = [*clip_files(n=4), ("files", (long_name, b"not audio at all" * 10, "audio/wav"))]
    body = problem_of(client.post("/scenes/kitchen/enroll", files=files), 422, "undecodable_audio")
    assert body["file"].startswith("xxx") and body["file"].endswith("x.wav") and len(body["file"]) <= 255
    files = [*clip_files(n=4), ("files", (long_name, GOOD, "audio/wav"))]
    assert client.post("/scenes/kitchen/enroll", files=files).status_code == 201


def test_a_part_header_past_the_parser_bound_is_a_clean_400(client: TestClient) -> None:
    files = [("file", ("x" * 100_000 + ".wav", GOOD, "audio/wav"))]
    problem_of(client.post("/classify", files=files), 400, "malformed_request")


def test_a_file_over_the_byte_limit_is_413_naming_it(client_factory: ClientFactory) -> None:
    with client_factory(max_upload_bytes=50_000) as client:
        big = af.wav(af.noise(2.0))  # 128 kB
        body = problem_of(client.post("/classify", files={"file": ("big.wav", big)}), 413, "too_large")
        assert "big.wav" in body["detail"]


def test_a_declared_content_length_over_the_limit_is_refused_before_reading(client_factory: ClientFactory) -> None:
    with client_factory(max_upload_bytes=100_000) as client:
        r = client.post("/classify", content=b"x" * 10, headers={"content-length": "999999999",
                                                                  "content-type": "multipart/form-data; boundary=x"})
        problem_of(r, 413, "too_large")


def test_a_full_disk_during_enrollment_is_503_and_nothing_is_half_written(
        client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client.post("/scenes/existing/enroll", files=clip_files(seed=30))
    calls = 0
    real_put = ClipStore.put

    def failing_put(self: ClipStore, data: bytes, sha256: str) -> None:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise OSError(errno.ENOSPC, "No space left on device", "/data/clips/ab/secret-path")
        real_put(self, data, sha256)

    monkeypatch.setattr(ClipStore, "put", failing_put)
    body = problem_of(client.post("/scenes/kitchen/enroll", files=clip_files()), 503, "storage_unavailable")
    assert "secret-path" not in body["detail"]  # no file-system path in a response
    assert [s["name"] for s in client.get("/scenes").json()["scenes"]] == ["existing"]
    assert len(list((tmp_path / "data" / "clips").glob("??/*"))) == 5  # only the existing scene's audio
    assert client.post("/classify", files={"file": ("q.wav", GOOD)}).status_code == 200


def test_a_locked_database_gives_503_database_busy(client_factory: ClientFactory, tmp_path: Path) -> None:
    with client_factory(db_busy_timeout_s=0.2) as client:
        locker = sqlite3.connect(tmp_path / "data" / "sceneprint.db", timeout=0.1)
        locker.execute("BEGIN EXCLUSIVE")
        try:
            problem_of(client.post("/scenes/kitchen/enroll", files=clip_files()), 503, "database_busy")
        finally:
            locker.rollback()
            locker.close()
        assert client.post("/scenes/kitchen/enroll", files=clip_files()).status_code == 201


def test_classify_reports_where_the_time_went(client: TestClient) -> None:
    r = client.post("/classify", files={"file": ("q.wav", GOOD)})
    parts = dict(p.strip().split(";dur=") for p in r.headers["server-timing"].split(","))
    assert set(parts) == {"queue", "decode", "embed", "search"} and all(float(v) >= 0 for v in parts.values())


def test_a_read_only_database_during_enrollment_is_503_and_reads_keep_working(
        client: TestClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sqlalchemy.exc import OperationalError

    from sceneprint.service import repository

    client.post("/scenes/existing/enroll", files=clip_files(seed=30))

    def read_only(*_a: object, **_k: object) -> None:
        raise OperationalError("INSERT INTO scenes", {}, Exception("attempt to write a readonly database"))

    monkeypatch.setattr(repository, "create_scene", read_only)
    problem_of(client.post("/scenes/kitchen/enroll", files=clip_files()), 503, "storage_unavailable")
    monkeypatch.undo()
    assert [s["name"] for s in client.get("/scenes").json()["scenes"]] == ["existing"]
    assert client.post("/classify", files={"file": ("q.wav", GOOD)}).status_code == 200
    assert len(list((tmp_path / "data" / "clips").glob("??/*"))) == 5  # the refused enrollment's audio is gone
