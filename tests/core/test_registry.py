"""The model registry: verified publishing, an atomic pointer, rollback, and identity keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sceneprint.manifest import MANIFEST, BundleError, model_fingerprint, model_key, write_json_atomic
from sceneprint.registry import POINTER, Registry, RegistryError, verify_bundle
from sceneprint.runtime import read_servable_manifest
from tests.conftest import make_bundle


@pytest.fixture(scope="module")
def bundles(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny bundles: two of one version string with different weights, and a second version."""
    root = tmp_path_factory.mktemp("registry-bundles")
    return {"a": make_bundle(root / "a", model_version="tiny", seed=0),
            "b": make_bundle(root / "b", model_version="tiny", seed=1),
            "v2": make_bundle(root / "v2", model_version="tiny-v2", seed=2)}


def with_accuracy(bundle: Path, accuracy: float, to: Path) -> Path:
    """A copy of ``bundle`` whose manifest carries a held-out accuracy (figures are not part of any hash)."""
    import shutil

    shutil.copytree(bundle, to)
    data = json.loads((to / MANIFEST).read_text())
    data["evaluation"] = {"heldout_fewshot": {"5way_5shot": {"accuracy": accuracy}}}
    write_json_atomic(to / MANIFEST, data)
    return to


def test_two_bundles_of_one_version_string_but_different_weights_have_different_keys(bundles: dict[str, Path]
                                                                                     ) -> None:
    a, b = read_servable_manifest(bundles["a"]), read_servable_manifest(bundles["b"])
    assert a.model_version == b.model_version == "tiny"
    assert model_key(a) != model_key(b) and model_key(a).startswith("tiny@") and len(model_key(a)) == 5 + 16
    assert model_fingerprint(a) == model_fingerprint(read_servable_manifest(bundles["a"]))  # stable


def test_figures_and_calibration_do_not_change_the_key(bundles: dict[str, Path], tmp_path: Path) -> None:
    figured = with_accuracy(bundles["a"], 0.9, tmp_path / "figured")
    assert model_key(read_servable_manifest(figured)) == model_key(read_servable_manifest(bundles["a"]))


def test_publish_copies_verifies_and_points_to_the_new_version(bundles: dict[str, Path], tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    first = registry.publish(bundles["a"])
    second = registry.publish(bundles["b"])
    assert (first.version, second.version) == ("v1", "v2")
    pointer = registry.pointer()
    assert pointer is not None and pointer.version == "v2" and pointer.key == second.key != first.key
    assert [v.version for v in registry.versions()] == ["v1", "v2"] and registry.versions()[1].current
    assert (tmp_path / "registry" / "v1" / "encoder.onnx").is_file()  # earlier versions stay, for rollback
    assert not list((tmp_path / "registry").glob(".staging-*")) and not list((tmp_path / "registry").glob(".*.tmp"))
    json.loads((tmp_path / "registry" / POINTER).read_text())  # a whole JSON document


def test_a_named_version_is_never_replaced(bundles: dict[str, Path], tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    registry.publish(bundles["a"], version="prod-1")
    with pytest.raises(RegistryError, match="exists"):
        registry.publish(bundles["b"], version="prod-1")
    with pytest.raises(RegistryError, match="version name"):
        registry.publish(bundles["b"], version="../evil")


def test_a_tampered_graph_is_refused_and_nothing_is_left(bundles: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(bundles["a"], bad)
    graph = bad / "encoder.onnx"
    graph.write_bytes(graph.read_bytes()[:-1] + b"\0")
    registry = Registry(tmp_path / "registry")
    with pytest.raises(BundleError, match="sha256"):
        registry.publish(bad)
    assert registry.versions() == [] and registry.pointer() is None
    assert not list((tmp_path / "registry").glob(".staging-*"))


def test_a_bundle_whose_graph_gives_the_wrong_size_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    import shutil

    wrong = tmp_path / "wrong"
    shutil.copytree(bundles["a"], wrong)
    data = json.loads((wrong / MANIFEST).read_text())
    data["embedding_dim"] = data["embedding_dim"] * 2  # the graph still gives the old size
    write_json_atomic(wrong / MANIFEST, data)
    with pytest.raises(BundleError, match="shape"):
        verify_bundle(wrong)


def test_a_bundle_below_the_accuracy_floor_is_refused(bundles: dict[str, Path], tmp_path: Path) -> None:
    figured = with_accuracy(bundles["a"], 0.5, tmp_path / "figured")
    registry = Registry(tmp_path / "registry")
    with pytest.raises(BundleError, match="below the floor"):
        registry.publish(figured, min_accuracy=0.6)
    assert registry.publish(figured, min_accuracy=0.5).accuracy == 0.5
    assert registry.publish(bundles["b"], min_accuracy=0.99).accuracy is None  # no figures: no floor to hold


def test_rollback_goes_to_the_version_published_before_or_the_one_named(bundles: dict[str, Path],
                                                                       tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    for name in ("a", "b", "v2"):
        registry.publish(bundles[name])
    assert registry.rollback().version == "v2"  # v3 -> v2
    assert registry.rollback().version == "v1"
    with pytest.raises(RegistryError, match="before"):
        registry.rollback()
    assert registry.rollback(to="v3").version == "v3"
    with pytest.raises(RegistryError, match="not in the registry"):
        registry.rollback(to="v9")


def test_seed_publishes_the_default_only_into_an_empty_registry(bundles: dict[str, Path], tmp_path: Path) -> None:
    registry = Registry(tmp_path / "registry")
    assert registry.seed(bundles["a"]).version == "v1"
    assert registry.seed(bundles["b"]).version == "v1"  # already seeded: unchanged
    assert len(registry.versions()) == 1
