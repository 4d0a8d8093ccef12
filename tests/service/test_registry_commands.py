"""``sceneprint publish``, ``rollback``, ``models`` and ``scenes export``: the registry and the enrolled audio from
the command line, without torch."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import soundfile as sf
from typer.testing import CliRunner

from sceneprint.cli import app as cli
from sceneprint.manifest import MANIFEST, write_json_atomic
from sceneprint.registry import Registry
from tests.conftest import ClientFactory, clip_files, make_bundle


def run(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.output


def test_publish_models_and_rollback(tmp_path: Path, tiny_bundle: Path) -> None:
    registry = str(tmp_path / "registry")
    other = make_bundle(tmp_path / "other", model_version="test-tiny-v2", seed=1)
    code, out = run("publish", str(tiny_bundle), "--registry", registry)
    assert code == 0 and "as version v1" in out and "now the current version" in out, out
    code, out = run("publish", str(other), "--registry", registry, "--version", "candidate", "--no-activate")
    assert code == 0 and "stored (not current)" in out, out
    code, out = run("models", "--registry", registry)
    lines = out.strip().splitlines()
    assert code == 0 and lines[0].startswith("* v1\ttest-tiny-v1@") and lines[1].startswith("  candidate\t"), out
    code, out = run("rollback", "--registry", registry, "--to", "candidate")
    assert code == 0 and "candidate" in out
    listed = json.loads(run("models", "--registry", registry, "--json")[1])
    assert [v["version"] for v in listed if v["current"]] == ["candidate"]
    code, out = run("rollback", "--registry", registry)
    assert code == 0 and "version v1" in out


def test_publish_refuses_a_bundle_below_the_floor_or_tampered(tmp_path: Path, tiny_bundle: Path) -> None:
    registry = str(tmp_path / "registry")
    figured = tmp_path / "figured"
    shutil.copytree(tiny_bundle, figured)
    data = json.loads((figured / MANIFEST).read_text())
    data["evaluation"] = {"heldout_fewshot": {"5way_5shot": {"accuracy": 0.41}}}
    write_json_atomic(figured / MANIFEST, data)
    code, out = run("publish", str(figured), "--registry", registry, "--min-accuracy", "0.5")
    assert code == 1 and "below the floor" in out, out
    (figured / "weights.pt").write_bytes(b"not the weights")
    code, out = run("publish", str(figured), "--registry", registry)
    assert code == 1 and "weights" in out, out
    assert Registry(tmp_path / "registry").versions() == []


def test_scenes_export_writes_a_labelled_data_set_from_the_kept_audio(client_factory: ClientFactory,
                                                                      tmp_path: Path) -> None:
    with client_factory() as client:
        assert client.post("/scenes/kitchen/enroll", files=clip_files("hum", seconds=8.0)).status_code == 201
        assert client.post("/scenes/street/enroll", files=clip_files("clicks", seconds=2.0)).status_code == 201
    out = tmp_path / "enrolled"
    code, output = run("scenes", "export", "--data-dir", str(tmp_path / "data"), "--out", str(out))
    assert code == 0, output
    with (out / "meta.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    # 8 s clips: one whole 5 s segment and the last 5 s (3 s left over is at least half a segment); 2 s: repeated.
    assert sorted({r["scene_label"] for r in rows}) == ["kitchen", "street"] and len(rows) == 5 * 2 + 5
    assert len({r["source_id"] for r in rows}) == 10  # one source per stored clip
    for r in rows:
        info = sf.info(out / r["filename"])
        assert (info.samplerate, info.frames, info.channels) == (32_000, 160_000, 1)
