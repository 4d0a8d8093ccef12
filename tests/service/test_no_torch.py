"""The service runs without torch: its process never imports it, and a bundle without a graph is refused."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from typer.testing import CliRunner

from sceneprint.cli import app
from tests.conftest import make_bundle

SERVE_AND_CLASSIFY = textwrap.dedent("""
    import sys
    from fastapi.testclient import TestClient
    from sceneprint.service.app import create_app
    from sceneprint.service.settings import Settings
    from tests import audio_factory as af

    settings = Settings(data_dir=sys.argv[2], model_path=sys.argv[1], allow_open=True, min_clip_seconds=0.5)
    with TestClient(create_app(settings)) as client:
        files = [("files", (f"hum-{i}.wav", af.wav(af.scene_clip("hum", i, 2.0)), "audio/wav")) for i in range(5)]
        assert client.post("/scenes/kitchen/enroll", files=files).status_code == 201
        r = client.post("/classify", files={"file": ("q.wav", af.wav(af.scene_clip("hum", 9, 2.0)), "audio/wav")})
        assert r.status_code == 200, r.text
        assert r.json()["scene"] == "kitchen"
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "torchaudio"))
    print("torch modules:", loaded)
    sys.exit(1 if loaded else 0)
""")


def test_service_process_never_imports_torch(tiny_bundle: Path, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    run = subprocess.run([sys.executable, "-c", SERVE_AND_CLASSIFY, str(tiny_bundle), str(tmp_path / "data")],
                         cwd=root, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stdout + run.stderr


def test_serve_refuses_a_bundle_without_graph_naming_the_command(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "no-graph", graph=False)
    result = CliRunner().invoke(app, ["serve", "--model", str(bundle), "--data-dir", str(tmp_path / "data")])
    assert result.exit_code == 2
    assert f"sceneprint bundle add-onnx {bundle}" in result.output
