"""Model reloads in a running app: the registry's new version is re-embedded from the kept audio and swapped in,
writes made meanwhile land in the new index, a bad bundle is refused while the old one serves, rollback."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from sceneprint.manifest import MANIFEST, write_json_atomic
from sceneprint.registry import Registry
from sceneprint.service.scenes import SceneService
from sceneprint.service.tables import Clip, ClipEmbedding, Prototype
from tests import audio_factory as af
from tests.conftest import ClientFactory, clip_files, make_bundle
from tests.service.test_access import create_key
from tests.service.test_metrics import scrape, value

KINDS = ("hum", "birds", "clicks")


@pytest.fixture(scope="module")
def other_bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("reload-bundles")
    return {"v2": make_bundle(root / "v2", model_version="test-tiny-v2", seed=1),
            # The tiny bundle's version string, other weights: its embeddings must never be shared with it.
            "same-name": make_bundle(root / "same-name", model_version="test-tiny-v1", seed=3)}


@pytest.fixture
def registry(tmp_path: Path, tiny_bundle: Path) -> Registry:
    """A registry whose current version (v1) is the tiny bundle."""
    reg = Registry(tmp_path / "registry")
    reg.publish(tiny_bundle)
    return reg


@pytest.fixture
def served(client_factory: ClientFactory, registry: Registry) -> Iterator[TestClient]:
    """An app serving the registry; reloads only when asked (POST /admin/reload), not when the pointer moves."""
    with client_factory(model_path=None, registry=registry.root, registry_poll_s=3600) as client:
        yield client


def classify(client: TestClient, kind: str, seed: int = 50) -> Any:
    r = client.post("/classify", files={"file": ("q.wav", af.wav(af.scene_clip(kind, seed)), "audio/wav")})
    assert r.status_code == 200, r.text
    return r


def wait_reload(client: TestClient, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status: dict[str, Any] = client.get("/admin/reload").json()
        if status["state"] in ("done", "failed", "idle"):
            return status
        time.sleep(0.02)
    raise AssertionError(f"reload still running: {status}")


def reload(client: TestClient) -> dict[str, Any]:
    r = client.post("/admin/reload")
    assert r.status_code == 202, r.text
    return wait_reload(client)


def enroll_kinds(client: TestClient) -> None:
    for i, kind in enumerate(KINDS):
        assert client.post(f"/scenes/{kind}/enroll", files=clip_files(kind, seed=10 * i)).status_code == 201


def service_of(client: TestClient) -> SceneService:
    service: SceneService = client.app.state.scenes  # type: ignore[attr-defined]
    return service


def test_a_new_version_is_reembedded_and_swapped_in_and_the_same_scenes_are_recognised(
        served: TestClient, registry: Registry, other_bundles: dict[str, Path]) -> None:
    enroll_kinds(served)
    before = {kind: classify(served, kind).json()["scene"] for kind in KINDS}
    registry.publish(other_bundles["v2"])
    status = reload(served)
    assert status["state"] == "done" and status["error"] is None, status
    assert status["serving_version"] == "test-tiny-v2" and status["serving_registry_version"] == "v2"
    assert status["clips_total"] == status["clips_done"] == 15
    for kind in KINDS:
        r = classify(served, kind)
        assert r.json()["scene"] == before[kind] == kind
        assert r.json()["model_version"] == r.headers["x-model-version"] == "test-tiny-v2"
        assert r.headers["x-model-key"] == status["serving_key"] == registry.pointer().key  # type: ignore[union-attr]
    assert {s["model_version"] for s in served.get("/scenes").json()["scenes"]} == {"test-tiny-v2"}
    assert served.get("/readyz").json()["model_key"] == status["serving_key"]
    samples = scrape(served)
    assert value(samples, "sceneprint_reloads_total", outcome="done") == 1
    assert value(samples, "sceneprint_reload_reembedded_clips_total") == 15
    assert value(samples, "sceneprint_reload_duration_seconds_count") == 1


def test_rollback_to_a_recent_version_needs_no_reembedding(served: TestClient, registry: Registry,
                                                          other_bundles: dict[str, Path]) -> None:
    enroll_kinds(served)
    registry.publish(other_bundles["v2"])
    assert reload(served)["clips_total"] == 15
    registry.rollback()
    status = reload(served)
    assert status["state"] == "done" and status["serving_version"] == "test-tiny-v1"
    assert status["clips_total"] == 0  # its embeddings were kept: the switch is immediate
    assert all(classify(served, kind).json()["scene"] == kind for kind in KINDS)


def test_embeddings_of_models_past_the_kept_count_are_pruned(client_factory: ClientFactory, registry: Registry,
                                                             other_bundles: dict[str, Path]) -> None:
    with client_factory(model_path=None, registry=registry.root, registry_poll_s=3600, kept_models=1) as client:
        enroll_kinds(client)
        registry.publish(other_bundles["v2"])
        assert reload(client)["state"] == "done"
        with service_of(client).sessions() as session:
            keys = set(session.scalars(select(ClipEmbedding.model_version).distinct()).all())
            assert keys == set(session.scalars(select(Prototype.model_version).distinct()).all())
        assert keys == {service_of(client).model.key}
        registry.rollback()
        assert reload(client)["clips_total"] == 15  # pruned, so re-embedded


def test_enrollments_added_clips_and_deletions_during_reembedding_are_in_the_new_index(
        served: TestClient, registry: Registry, other_bundles: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    enroll_kinds(served)
    assert served.post("/scenes/hum-2/enroll", files=clip_files("hum", seed=70)).status_code == 201
    embed = SceneService._embed_stored

    def slow(self: SceneService, *args: Any) -> Any:
        time.sleep(0.15)  # re-embedding long enough to write during it
        return embed(self, *args)

    monkeypatch.setattr(SceneService, "_embed_stored", slow)
    registry.publish(other_bundles["v2"])
    assert served.post("/admin/reload").status_code == 202
    status = served.get("/admin/reload").json()
    while status["state"] != "reembedding":
        time.sleep(0.01)
        status = served.get("/admin/reload").json()
    assert served.post("/scenes/late/enroll", files=clip_files("birds", seed=90)).status_code == 201
    assert served.post("/scenes/clicks/clips", files=clip_files("clicks", n=2, seed=200)).status_code == 200
    assert served.delete("/scenes/hum-2").status_code == 204
    assert served.get("/admin/reload").json()["state"] in ("reembedding", "catching_up")  # all while it ran
    status = wait_reload(served)
    assert status["state"] == "done", status
    service = service_of(served)
    assert service.model.version == "test-tiny-v2"
    assert set(service.index._names.values()) == {"hum", "birds", "clicks", "late"}
    with service.sessions() as session:
        key = service.model.key
        counts = {sid: n for sid, n in session.execute(select(Prototype.scene_id, Prototype.n_clips)
                                                       .where(Prototype.model_version == key)).all()}
        clips = {sid: n for sid, n in session.execute(select(Clip.scene_id, func.count(Clip.id))
                                                      .group_by(Clip.scene_id)).all()}
        assert counts == clips  # every scene's prototype under the new model is made from all its clips
        embedded = session.scalar(select(func.count()).select_from(ClipEmbedding)
                                  .where(ClipEmbedding.model_version == key))
        assert embedded == sum(clips.values()) == 5 * 4 + 2
    assert served.get("/scenes/clicks").json()["clips"] == 7
    assert classify(served, "birds", seed=91).json()["top_k"][0]["scene"] in ("late", "birds")


@pytest.mark.parametrize("fault", ["tampered graph", "wrong size"])
def test_a_bad_bundle_is_refused_and_the_old_model_keeps_serving(served: TestClient, registry: Registry,
                                                                 other_bundles: dict[str, Path], fault: str) -> None:
    enroll_kinds(served)
    published = registry.publish(other_bundles["v2"])
    if fault == "tampered graph":  # changed after it was published and verified
        graph = published.path / "encoder.onnx"
        graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    else:
        data = json.loads((published.path / MANIFEST).read_text())
        data["embedding_dim"] = 64  # the graph gives 48
        write_json_atomic(published.path / MANIFEST, data)
    status = reload(served)
    assert status["state"] == "failed" and status["target_version"] == "v2"
    assert ("sha256" if fault == "tampered graph" else "shape") in status["error"]
    assert status["serving_version"] == "test-tiny-v1" and status["serving_registry_version"] == "v1"
    assert all(classify(served, kind).json()["scene"] == kind for kind in KINDS)
    assert value(scrape(served), "sceneprint_reloads_total", outcome="failed") == 1


def test_two_bundles_of_one_version_string_never_share_embeddings(served: TestClient, registry: Registry,
                                                                  other_bundles: dict[str, Path]) -> None:
    enroll_kinds(served)
    first = service_of(served).model.key
    registry.publish(other_bundles["same-name"])
    status = reload(served)
    assert status["state"] == "done" and status["serving_version"] == "test-tiny-v1"
    assert status["serving_key"] != first and status["clips_total"] == 15  # all re-embedded, none reused
    with service_of(served).sessions() as session:
        keys = set(session.scalars(select(ClipEmbedding.model_version).distinct()).all())
    assert keys == {first, status["serving_key"]}
    assert all(classify(served, kind).json()["scene"] == kind for kind in KINDS)


def test_reload_needs_the_admin_scope_and_a_registry(client_factory: ClientFactory, registry: Registry,
                                                     tmp_path: Path) -> None:
    enroll = create_key(tmp_path / "data", "writer", "enroll")
    admin = create_key(tmp_path / "data", "ops", "admin")
    with client_factory(model_path=None, registry=registry.root, registry_poll_s=3600, allow_open=False) as client:
        assert client.post("/admin/reload").status_code == 401
        assert client.post("/admin/reload", headers={"Authorization": f"Bearer {enroll}"}).status_code == 403
        r = client.post("/admin/reload", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 202 and r.json()["serving_registry_version"] == "v1"
    with client_factory(allow_open=False) as client:  # one bundle by path: nothing to reload from
        r = client.post("/admin/reload", headers={"Authorization": f"Bearer {admin}"})
        assert r.status_code == 409 and r.json()["code"] == "no_registry"
        assert client.get("/admin/reload", headers={"Authorization": f"Bearer {admin}"}).json()["registry"] is None


def test_a_database_from_before_model_keys_is_reembedded_under_the_key_at_start(
        client_factory: ClientFactory, tiny_bundle: Path) -> None:
    with client_factory() as client:
        enroll_kinds(client)
        service = service_of(client)
        key = service.model.key
        with service.sessions() as session:  # as version 0003 wrote them: under the bare version string
            for table in (ClipEmbedding, Prototype):
                session.execute(table.__table__.update().values(model_version="test-tiny-v1"))
            session.commit()
    with client_factory() as client:
        assert client.get("/readyz").json()["scenes_indexed"] == 3
        assert all(classify(client, kind).json()["scene"] == kind for kind in KINDS)
        with service_of(client).sessions() as session:
            assert session.scalar(select(func.count()).select_from(Prototype)
                                  .where(Prototype.model_version == key)) == 3


def test_the_first_start_seeds_an_empty_registry_with_the_bundled_model(client_factory: ClientFactory,
                                                                        tmp_path: Path, tiny_bundle: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from sceneprint.service.settings import Settings

    monkeypatch.setattr(Settings, "seed_bundle", property(lambda self: tiny_bundle))  # fast: the tiny one
    with client_factory(model_path=None, registry_poll_s=3600) as client:
        status = client.get("/admin/reload").json()
        assert status["registry"] == str(tmp_path / "data" / "models")
        assert status["serving_registry_version"] == "v1" and status["serving_version"] == "test-tiny-v1"
    assert Registry(tmp_path / "data" / "models").pointer() is not None


def test_a_republished_bundle_reloads_without_reembedding(served: TestClient, registry: Registry,
                                                          tiny_bundle: Path, tmp_path: Path) -> None:
    enroll_kinds(served)
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    registry.publish(copy)  # same identity, a new version (e.g. new figures): a new decision policy, same vectors
    status = reload(served)
    assert status["state"] == "done" and status["clips_total"] == 0 and status["serving_registry_version"] == "v2"
