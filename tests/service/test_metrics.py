"""Prometheus metrics: per route template and status, classify outcomes, what the service holds, per app."""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from typer.testing import CliRunner

from sceneprint.cli import app as cli
from sceneprint.service.app import create_app
from sceneprint.service.body_limits import route_body_limit
from sceneprint.service.settings import Settings
from tests import audio_factory as af
from tests.conftest import ClientFactory, clip_files, make_bundle


def scrape(client: TestClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """Every sample of ``/metrics``, keyed by (name, labels)."""
    r = client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def classify(client: TestClient, kind: str, seed: int) -> dict:
    r = client.post("/classify", files={"file": (f"{kind}.wav", af.wav(af.scene_clip(kind, seed)), "audio/wav")})
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_metrics_need_no_key_and_show_the_model_and_the_scenes(client_factory: ClientFactory, tmp_path: Path) -> None:
    made = CliRunner().invoke(cli, ["keys", "create", "--data-dir", str(tmp_path / "data"), "--name", "ops",
                                    "--scope", "admin"])
    assert made.exit_code == 0, made.output
    key = made.output.strip().splitlines()[-1]
    with client_factory(allow_open=False) as client:
        assert client.get("/scenes").status_code == 401  # keys exist: the API needs one
        before = scrape(client)  # ... the scrape endpoint does not, like /healthz and /readyz
        assert value(before, "sceneprint_model_info", model_version="test-tiny-v1") == 1
        assert value(before, "sceneprint_scenes") == 0 and value(before, "sceneprint_index_scenes") == 0
        assert value(before, "sceneprint_inference_queue_depth") == 0
        r = client.post("/scenes/hum/enroll", files=clip_files("hum"), headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 201, r.text
        after = scrape(client)
        assert value(after, "sceneprint_scenes") == 1 and value(after, "sceneprint_index_scenes") == 1
        assert "/metrics" not in client.get("/openapi.json").json()["paths"]  # not part of the clients' API


def test_classify_outcomes_and_request_counts_change_with_each_classify(client_factory: ClientFactory) -> None:
    with client_factory(unknown_threshold=-1.0) as client:  # every score passes: any enrolled scene is named
        start = scrape(client)
        assert value(start, "sceneprint_classifications_total", outcome="named") == 0
        assert value(start, "sceneprint_classifications_total", outcome="unknown") == 0
        assert classify(client, "hum", 10)["unknown"] is True  # nothing enrolled yet
        client.post("/scenes/hum/enroll", files=clip_files("hum"))
        assert classify(client, "hum", 11)["scene"] == "hum"
        assert classify(client, "birds", 12)["scene"] == "hum"
        after = scrape(client)
    assert value(after, "sceneprint_classifications_total", outcome="unknown") == 1
    assert value(after, "sceneprint_classifications_total", outcome="named") == 2
    labels = {"method": "POST", "route": "/classify", "status": "200"}
    assert value(after, "sceneprint_http_requests_total", **labels) == 3
    assert value(after, "sceneprint_http_request_duration_seconds_count", **labels) == 3
    assert value(after, "sceneprint_http_requests_total", method="POST", route="/scenes/{name}/enroll",
                 status="201") == 1


def test_requests_are_labelled_by_route_template_not_by_path(client_factory: ClientFactory, tmp_path: Path,
                                                             tiny_bundle: Path) -> None:
    settings = Settings(data_dir=tmp_path, model_path=tiny_bundle)
    too_large = route_body_limit(settings)("POST", "/classify") + 1
    with client_factory() as client:
        for name in ("kitchen", "street", "park"):
            assert client.get(f"/scenes/{name}").status_code == 404
        assert client.get("/no/such/path/42").status_code == 404
        huge = client.post("/classify", content=b"\0" * too_large, headers={"content-type": "multipart/form-data"})
        assert huge.status_code == 413  # refused by the body limit, before any route ran
        samples = scrape(client)
    routes = {dict(labels)["route"] for name, labels in samples if name == "sceneprint_http_requests_total"}
    assert routes == {"/scenes/{name}", "<unmatched>", "/classify"}
    assert value(samples, "sceneprint_http_requests_total", method="GET", route="/scenes/{name}", status="404") == 3
    assert value(samples, "sceneprint_http_requests_total", method="POST", route="/classify", status="413") == 1


def test_the_inference_queue_depth_is_read_from_the_pool(client_factory: ClientFactory) -> None:
    with client_factory(inference_slots=1) as client:
        pool = client.app.state.scenes._inference  # type: ignore[attr-defined]
        release = threading.Event()
        jobs = [pool.submit(release.wait, 30) for _ in range(3)]  # one runs, two wait for the slot
        try:
            samples = scrape(client)
        finally:
            release.set()
        for job in jobs:
            job.result(timeout=30)
    assert value(samples, "sceneprint_inference_queue_depth") == 2
    assert value(samples, "sceneprint_inference_slots") == 1


def test_reembedding_after_a_model_change_is_timed(client_factory: ClientFactory, tmp_path: Path) -> None:
    with client_factory() as client:
        assert client.post("/scenes/hum/enroll", files=clip_files("hum")).status_code == 201
        assert value(scrape(client), "sceneprint_reembed_duration_seconds_count") == 0
    other = make_bundle(tmp_path / "other", model_version="test-tiny-v2", seed=1)
    with client_factory(model_path=other) as client:  # start-up re-embeds the scene for the new model
        samples = scrape(client)
    assert value(samples, "sceneprint_reembed_duration_seconds_count") == 1
    assert value(samples, "sceneprint_model_info", model_version="test-tiny-v2") == 1


def test_each_app_counts_in_a_registry_of_its_own(tmp_path: Path, tiny_bundle: Path) -> None:
    # Without the lifespan (no model loaded): the request counters exist all the same.
    apps = [create_app(Settings(data_dir=tmp_path / str(i), model_path=tiny_bundle)) for i in range(2)]
    first, second = (TestClient(app) for app in apps)
    first.get("/healthz")
    first.get("/healthz")
    second.get("/healthz")
    labels = {"method": "GET", "route": "/healthz", "status": "200"}
    assert value(scrape(first), "sceneprint_http_requests_total", **labels) == 2
    assert value(scrape(second), "sceneprint_http_requests_total", **labels) == 1
    assert value(scrape(first), "sceneprint_model_info", model_version="test-tiny-v1") is None  # not loaded
