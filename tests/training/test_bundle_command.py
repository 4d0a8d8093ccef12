"""``sceneprint bundle add-onnx DIR``: an existing bundle gains the graph the service runs."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from sceneprint.bundle import read_manifest
from sceneprint.cli import app
from sceneprint.runtime import load_onnx_encoder
from tests.conftest import make_bundle


def test_add_onnx_gives_a_bundle_without_graph_one_the_service_loads(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", graph=False)
    result = CliRunner().invoke(app, ["bundle", "add-onnx", str(bundle)])
    assert result.exit_code == 0, result.output
    graph = read_manifest(bundle).graph
    assert graph is not None and graph.file in result.output
    assert load_onnx_encoder(bundle).manifest.graph == graph
