"""Liveness, readiness, the model manifest and the OpenAPI document."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests import audio_factory as af
from tests.conftest import clip_files


def test_healthz_and_readyz(client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz").json()
    assert ready["status"] == "ready" and ready["model_version"] == "test-tiny-v1"
    assert ready["scenes_indexed"] == 0 and ready["unknown_threshold"] == 0.5  # the tiny bundle has no calibration


def test_model_returns_the_bundle_manifest(client: TestClient) -> None:
    manifest = client.get("/model").json()
    assert manifest["model_version"] == "test-tiny-v1"
    assert manifest["sample_rate"] == 32_000 and manifest["embedding_dim"] == 48
    assert manifest["frontend"]["n_mels"] == 128 and len(manifest["weights_sha256"]) == 64


def test_openapi_documents_every_endpoint(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/scenes/{name}/enroll", "/scenes/{name}/clips", "/scenes", "/scenes/{name}", "/classify", "/healthz",
            "/readyz", "/model"} <= set(paths)
    assert client.get("/docs").status_code == 200


def test_long_audio_is_classified_over_sliding_windows(client: TestClient) -> None:
    client.post("/scenes/hum/enroll", files=clip_files("hum"))
    r = client.post("/classify", files={"file": ("long.wav", af.wav(af.scene_clip("hum", 40, seconds=12.0)))})
    assert r.status_code == 200
    assert r.json()["duration_s"] == 12.0 and r.json()["top_k"][0]["scene"] == "hum"


def test_an_explicit_unknown_threshold_overrides_the_bundle(client_factory) -> None:  # type: ignore[no-untyped-def]
    with client_factory(unknown_threshold=0.99) as c:
        c.post("/scenes/hum/enroll", files=clip_files("hum"))
        body = c.post("/classify", files={"file": ("q.wav", af.wav(af.scene_clip("birds", 3)))}).json()
        assert c.get("/readyz").json()["unknown_threshold"] == 0.99
        assert body["unknown"] is True and body["scene"] is None and body["top_k"][0]["scene"] == "hum"
