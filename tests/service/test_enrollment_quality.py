"""Enrollment quality and per-scene decisions: outliers refused by name, force, calibration in the manifest,
per-scene thresholds that follow the clips, hand-set and per-request thresholds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from sceneprint.manifest import read_manifest_json
from sceneprint.prototypes import (
    EnrollmentCalibration,
    Match,
    decide,
    enrollment_quality,
    leave_one_out,
    per_scene_threshold,
)
from tests import audio_factory as af
from tests.conftest import ClientFactory, clip_files

# Loud white noise: unlike the hum clips even to the randomly initialised test encoder.
INTRUDER = ("files", ("noise-intruder.wav", af.wav(af.noise(2.0, amp=0.3)), "audio/wav"))


def with_intruder() -> list:  # type: ignore[type-arg]
    return [*clip_files("hum", n=4), INTRUDER]


def test_leave_one_out_is_the_cosine_to_the_other_clips_prototype() -> None:
    e = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    sims = leave_one_out(e)
    # Clip 2 against the mean of clips 0 and 1 (= [1, 0]): orthogonal; clip 0 against normalised [1, 1].
    assert sims == pytest.approx([np.sqrt(0.5), np.sqrt(0.5), 0.0], abs=1e-6)
    q = enrollment_quality(e)
    assert q.cohesion == pytest.approx(np.mean(sims), abs=1e-4) and q.outliers(0.5) == [2]
    assert enrollment_quality(e[:1]).cohesion is None  # one clip: nothing to compare with


def test_per_scene_threshold_moves_with_cohesion_and_stays_in_range() -> None:
    assert per_scene_threshold(0.8, 0.6, slope=0.5, reference_cohesion=0.8) == pytest.approx(0.6)
    assert per_scene_threshold(0.6, 0.6, slope=0.5, reference_cohesion=0.8) == pytest.approx(0.5)
    assert per_scene_threshold(-5.0, 0.6, slope=1.0, reference_cohesion=0.8) == 0.0


def test_decide_uses_the_request_then_the_scene_then_the_global_threshold() -> None:
    ranked = [Match("kitchen", 0.55, threshold=0.5, threshold_source="scene"), Match("street", 0.2)]
    assert decide(ranked, 0.7).scene == "kitchen" and decide(ranked, 0.7).threshold_source == "scene"
    d = decide(ranked, 0.7, override=0.6)
    assert d.unknown and d.threshold == 0.6 and d.threshold_source == "request"
    d = decide([Match("kitchen", 0.55)], 0.7)
    assert d.unknown and d.threshold_source == "global"


def test_the_manifest_calibration_round_trips(tmp_path: Path, tiny_bundle: Path) -> None:
    from sceneprint.bundle import read_manifest

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    cal = EnrollmentCalibration(min_clip_similarity=0.46, min_cohesion=0.66, rule="per_scene", slope=0.5,
                                reference_cohesion=0.87, false_refusal=0.01, source="test")
    data = read_manifest_json(bundle)
    from sceneprint.config import to_dict

    (bundle / "manifest.json").write_text(json.dumps({**data, "calibration": to_dict(cal)}))
    assert read_manifest(bundle).calibration == cal
    assert read_manifest(tiny_bundle).calibration is None  # a bundle without one still loads
    assert "calibration" not in json.loads((tiny_bundle / "manifest.json").read_text())


def quality_of(client: TestClient, name: str) -> dict:  # type: ignore[type-arg]
    r = client.get(f"/scenes/{name}")
    assert r.status_code == 200, r.text
    return r.json()


def test_an_outlier_is_refused_by_name_and_nothing_is_stored(client_factory: ClientFactory, tmp_path: Path) -> None:
    with client_factory(enrollment_min_clip_similarity=0.9, enrollment_min_cohesion=0.0) as client:
        coherent = client.post("/scenes/kitchen/enroll", files=clip_files("hum"))
        assert coherent.status_code == 201, coherent.text
        sims = [c["similarity"] for c in coherent.json()["quality"]["clips"]]
        assert min(sims) >= 0.9  # five clips of one synthetic scene agree (the premise of the test)
        r = client.post("/scenes/mixed/enroll", files=with_intruder())
        assert r.status_code == 422, r.text
        problem = r.json()
        assert problem["code"] == "incoherent_clips" and problem["outliers"] == ["noise-intruder.wav"]
        assert "noise-intruder.wav" in problem["detail"]
        by_file = {c["file"]: c["similarity"] for c in problem["clips"]}
        assert by_file["noise-intruder.wav"] < 0.9 <= min(v for k, v in by_file.items() if k != "noise-intruder.wav")
        assert client.get("/scenes/mixed").status_code == 404
        stored = [p for p in (tmp_path / "data" / "clips").glob("??/*") if not p.name.startswith(".")]
        assert len(stored) == 5  # the coherent scene's clips only


def test_force_stores_an_incoherent_enrollment_and_says_so(client_factory: ClientFactory) -> None:
    with client_factory(enrollment_min_clip_similarity=0.9, enrollment_min_cohesion=0.0) as client:
        r = client.post("/scenes/mixed/enroll?force=true", files=with_intruder())
        assert r.status_code == 201, r.text
        q = quality_of(client, "mixed")["quality"]
        assert q["forced"] is True and len(q["clips"]) == 5 and q["min_clip_similarity"] == 0.9
        clean = client.post("/scenes/kitchen/enroll?force=true", files=clip_files("hum", seed=10))
        assert quality_of(client, "kitchen")["quality"]["forced"] is False  # force that was not needed is not recorded
        assert clean.status_code == 201


def test_an_outlier_among_added_clips_is_refused(client_factory: ClientFactory) -> None:
    with client_factory(enrollment_min_clip_similarity=0.9, enrollment_min_cohesion=0.0) as client:
        assert client.post("/scenes/kitchen/enroll", files=clip_files("hum")).status_code == 201
        r = client.post("/scenes/kitchen/clips", files=[INTRUDER])
        assert r.status_code == 422 and r.json()["outliers"] == ["noise-intruder.wav"]
        assert quality_of(client, "kitchen")["clips"] == 5
        assert client.post("/scenes/kitchen/clips?force=true", files=[INTRUDER]).status_code == 200
        assert quality_of(client, "kitchen")["quality"]["forced"] is True


def test_without_bounds_enrollments_are_measured_not_refused(client: TestClient) -> None:
    r = client.post("/scenes/mixed/enroll", files=with_intruder())  # the tiny bundle carries no calibration
    assert r.status_code == 201, r.text
    q = r.json()["quality"]
    assert q["min_clip_similarity"] is None and len(q["clips"]) == 5 and q["cohesion"] is not None


def calibrated(tiny_bundle: Path, tmp_path: Path, **changes: object) -> Path:
    from sceneprint.config import to_dict

    bundle = tmp_path / "calibrated"
    shutil.copytree(tiny_bundle, bundle)
    cal = EnrollmentCalibration(min_clip_similarity=-1.0, min_cohesion=-1.0, rule="per_scene", slope=1.0,
                                reference_cohesion=0.95)
    data = read_manifest_json(bundle)
    (bundle / "manifest.json").write_text(json.dumps({**data, "unknown_threshold": 0.5,
                                                      "calibration": {**to_dict(cal), **changes}}))
    return bundle


def test_per_scene_thresholds_follow_the_clips(client_factory: ClientFactory, tiny_bundle: Path,
                                               tmp_path: Path) -> None:
    with client_factory(model_path=calibrated(tiny_bundle, tmp_path)) as client:
        first = client.post("/scenes/kitchen/enroll", files=clip_files("hum")).json()
        assert first["threshold_source"] == "per_scene"
        expected = per_scene_threshold(first["quality"]["cohesion"], 0.5, slope=1.0, reference_cohesion=0.95)
        assert first["threshold"] == pytest.approx(expected, abs=1e-4)
        after = client.post("/scenes/kitchen/clips?force=true", files=[INTRUDER]).json()
        assert after["quality"]["cohesion"] < first["quality"]["cohesion"]
        assert after["threshold"] < first["threshold"]  # a looser scene, a lower threshold (slope > 0)
        r = client.post("/classify", files={"file": ("q.wav", af.wav(af.scene_clip("hum", 50, 2.0)), "audio/wav")})
        body = r.json()
        assert body["threshold_source"] == "per_scene" and body["threshold"] == after["threshold"]
    with client_factory(model_path=calibrated(tiny_bundle, tmp_path / "g"), decision_rule="global") as client:
        assert client.get("/scenes/kitchen").json()["threshold_source"] == "global"  # a setting overrides the rule


def test_a_hand_set_threshold_is_used_and_survives_a_restart(client_factory: ClientFactory) -> None:
    query = {"file": ("q.wav", af.wav(af.scene_clip("hum", 50, 2.0)), "audio/wav")}
    with client_factory() as client:
        assert client.post("/scenes/kitchen/enroll", files=clip_files("hum")).status_code == 201
        score = client.post("/classify", files=query).json()["score"]
        r = client.patch("/scenes/kitchen", json={"threshold": min(1.0, score + 0.001)})
        assert r.status_code == 200 and r.json()["threshold_source"] == "scene"
        body = client.post("/classify", files=query).json()
        assert body["unknown"] and body["threshold_source"] == "scene"
    with client_factory() as client:  # a new process on the same data
        body = client.post("/classify", files=query).json()
        assert body["unknown"] and body["threshold_source"] == "scene"
        assert client.patch("/scenes/kitchen", json={"threshold": None}).json()["threshold_source"] == "global"
        body = client.post("/classify", files=query).json()
        assert body["threshold_source"] == "global" and body["threshold"] == 0.5


def test_thresholds_are_validated(client: TestClient) -> None:
    assert client.post("/scenes/kitchen/enroll", files=clip_files("hum")).status_code == 201
    for bad in (1.5, -0.1, "high"):
        assert client.patch("/scenes/kitchen", json={"threshold": bad}).status_code == 422
    assert client.patch("/scenes/kitchen", json={"threshold": 0.5, "other": 1}).status_code == 422
    assert client.patch("/scenes/nowhere", json={"threshold": 0.5}).status_code == 404
    query = {"file": ("q.wav", af.wav(af.scene_clip("hum", 50, 2.0)), "audio/wav")}
    assert client.post("/classify?threshold=1.01", files=query).status_code == 422
    body = client.post("/classify?threshold=0.0", files=query).json()
    assert body["threshold_source"] == "request" and not body["unknown"]
