"""The unknown threshold: a setting, else the bundle's typed, calibrated field (format-1 bundles: their report)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

from sceneprint.bundle import default_bundle_path, read_manifest
from sceneprint.service.app import DEFAULT_UNKNOWN_THRESHOLD, unknown_threshold
from sceneprint.service.settings import Settings
from tests.conftest import ClientFactory, make_bundle


def edit_manifest(bundle: Path, **changes: object) -> None:
    path = bundle / "manifest.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_a_bundle_written_with_a_calibrated_threshold_carries_it_as_a_typed_field(tmp_path: Path) -> None:
    from sceneprint.bundle import load_bundle, save_bundle

    encoder, _ = load_bundle(make_bundle(tmp_path / "a"))
    save_bundle(tmp_path / "b", encoder, model_version="calibrated", training={}, evaluation={},
                unknown_threshold=0.61)
    assert read_manifest(tmp_path / "b").unknown_threshold == 0.61
    assert json.loads((tmp_path / "b" / "manifest.json").read_text())["unknown_threshold"] == 0.61
    assert read_manifest(tmp_path / "a").unknown_threshold is None  # manifests without it still load


def test_the_service_uses_the_bundles_typed_threshold(client_factory: ClientFactory, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "typed")
    edit_manifest(bundle, unknown_threshold=0.42)
    with client_factory(model_path=bundle) as client:
        assert client.get("/readyz").json()["unknown_threshold"] == 0.42


def test_a_format_2_bundle_without_the_field_gets_the_default_not_a_report_key(tmp_path: Path) -> None:
    manifest = replace(read_manifest(make_bundle(tmp_path / "untyped")),
                       evaluation={"heldout_open_set_5way_5shot": {"threshold": 0.7}})
    assert manifest.format_version == 2
    assert unknown_threshold(Settings(), manifest) == DEFAULT_UNKNOWN_THRESHOLD


def test_a_format_1_bundle_keeps_the_calibration_of_its_report(tmp_path: Path) -> None:
    # A format-1 bundle, as the previous default model was: no architecture, no typed threshold.
    bundle = make_bundle(tmp_path / "v1", output_norm="head")
    data = json.loads((bundle / "manifest.json").read_text())
    del data["architecture"], data["network"]["output_norm"]
    data.pop("unknown_threshold", None)
    data.update(format_version=1, evaluation={"heldout_open_set_5way_5shot": {"threshold": 0.604}})
    (bundle / "manifest.json").write_text(json.dumps(data))
    manifest = read_manifest(bundle)
    assert manifest.format_version == 1 and manifest.unknown_threshold is None
    assert unknown_threshold(Settings(), manifest) == 0.604 != DEFAULT_UNKNOWN_THRESHOLD


def test_the_bundled_model_carries_its_calibrated_threshold_as_a_typed_field() -> None:
    manifest = read_manifest(default_bundle_path())
    calibrated = manifest.evaluation["heldout_open_set_5way_5shot"]["threshold"]
    assert manifest.unknown_threshold == calibrated
    assert unknown_threshold(Settings(), manifest) == calibrated


def test_a_setting_overrides_the_bundle(client_factory: ClientFactory, tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "typed")
    edit_manifest(bundle, unknown_threshold=0.42)
    with client_factory(model_path=bundle, unknown_threshold=0.9) as client:
        assert client.get("/readyz").json()["unknown_threshold"] == 0.9


def test_training_writes_the_threshold_it_calibrated() -> None:
    from sceneprint.training.evaluate import calibrated_threshold

    assert calibrated_threshold({"heldout_open_set_5way_5shot": {"threshold": 0.6, "auroc": 0.9}}) == 0.6
    assert calibrated_threshold({"heldout_fewshot": {}}) is None
