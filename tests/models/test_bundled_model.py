"""The bundled default model: it loads, says what it was trained on, and its report is its manifest's."""

from __future__ import annotations

from sceneprint.bundle import load_bundle
from sceneprint.service.settings import default_bundle_path
from sceneprint.training.report import render


def test_the_bundled_model_loads_and_documents_its_data_and_licence() -> None:
    _, manifest = load_bundle(default_bundle_path())
    assert manifest.parameter_count <= 128_000
    assert "non-commercial" in manifest.training["licenses"]["note"]
    held_out = set(manifest.training["data"]["heldout_classes_never_seen"])
    assert held_out and held_out.isdisjoint(manifest.training["data"]["classes"])
    assert manifest.evaluation["heldout_fewshot"]["5way_5shot"]["episodes"] >= 1000
    assert 0 < manifest.evaluation["heldout_open_set_5way_5shot"]["threshold"] < 1


def test_the_committed_report_is_generated_from_the_manifest() -> None:
    bundle = default_bundle_path()
    assert (bundle / "REPORT.md").read_text(encoding="utf-8") == render(bundle)


def test_the_bundled_model_carries_the_graph_the_service_runs() -> None:
    from sceneprint.runtime import load_onnx_encoder

    encoder = load_onnx_encoder(default_bundle_path())  # hash-checked and probed
    assert encoder.manifest.graph is not None and encoder.manifest.graph.input == "logmel"


def test_the_training_config_of_the_readme_is_the_bundled_models() -> None:
    """``sceneprint train student training/configs/student-default.json`` runs the config the bundle records."""
    from pathlib import Path

    from sceneprint.config import to_dict
    from sceneprint.training.commands import _load_config
    from sceneprint.training.student import StudentConfig

    _, manifest = load_bundle(default_bundle_path())
    config = Path(__file__).parents[2] / "training" / "configs" / "student-default.json"
    assert to_dict(_load_config(StudentConfig, config, None)) == manifest.training["config"]
