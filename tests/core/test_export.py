"""``add_onnx``: a bundle gains its ONNX graph, hashed in the manifest; the service's loader checks it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sceneprint.bundle import ARCHITECTURES, BundleError, load_bundle, read_manifest, save_bundle
from sceneprint.encoder import WindowConfig
from sceneprint.export import GRAPH_FP32, GRAPH_INT8, add_onnx
from sceneprint.runtime import SERVING_CONFIGS, load_onnx_encoder
from sceneprint.yamnet import YAMNetConfig, YAMNetEncoder, YAMNetFrontendConfig
from tests import audio_factory as af
from tests.conftest import make_bundle


def test_graph_and_its_hash_are_named_in_the_manifest(tiny_bundle: Path) -> None:
    manifest = read_manifest(tiny_bundle)
    assert manifest.graph is not None
    assert manifest.graph.file == GRAPH_FP32 and manifest.graph.input == "logmel"
    assert manifest.graph.precision == "float32"
    assert load_onnx_encoder(tiny_bundle).manifest.graph == manifest.graph
    load_bundle(tiny_bundle)  # the torch path still loads it


def test_every_architecture_the_bundle_knows_can_be_served() -> None:
    assert set(SERVING_CONFIGS) == set(ARCHITECTURES)


def test_bundle_without_graph_is_refused_with_the_command_that_adds_one(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", graph=False)
    assert read_manifest(bundle).graph is None
    assert "graph" not in json.loads((bundle / "manifest.json").read_text())  # reads as before the field
    load_bundle(bundle)  # training's torch path needs no graph
    with pytest.raises(BundleError, match=r"sceneprint bundle add-onnx"):
        load_onnx_encoder(bundle)


def test_modified_graph_is_refused(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    with (bundle / GRAPH_FP32).open("ab") as f:
        f.write(b"\0")
    with pytest.raises(BundleError, match="sha256"):
        load_onnx_encoder(bundle)


def test_saving_new_weights_drops_the_old_graph(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    encoder, _ = load_bundle(bundle)
    save_bundle(bundle, encoder, model_version="v2", training={}, evaluation={})
    assert read_manifest(bundle).graph is None
    assert not (bundle / GRAPH_FP32).exists()


def test_format_1_bundle_gains_a_graph_and_keeps_its_manifest(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "v1", graph=False, output_norm="head")
    data = json.loads((bundle / "manifest.json").read_text())
    data = {k: v for k, v in data.items() if k != "architecture"}
    data["format_version"] = 1
    data["network"] = {k: v for k, v in data["network"].items() if k != "output_norm"}
    (bundle / "manifest.json").write_text(json.dumps(data))
    add_onnx(bundle)
    after = json.loads((bundle / "manifest.json").read_text())
    assert {k: v for k, v in after.items() if k != "graph"} == data
    assert load_onnx_encoder(bundle).manifest.format_version == 1


def test_int8_graph_is_served(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b", graph=False)
    calibration = [af.scene_clip(kind, i, 3.0) for i, kind in enumerate(["hum", "birds", "clicks", "hum"])]
    manifest = add_onnx(bundle, int8="static", calibration=calibration)
    assert manifest.graph is not None and manifest.graph.precision == "int8"
    assert (bundle / GRAPH_FP32).is_file() and (bundle / GRAPH_INT8).is_file()
    onnx_encoder = load_onnx_encoder(bundle)
    torch_encoder, _ = load_bundle(bundle)
    wav = af.scene_clip("clicks", 9, 4.0)
    assert float(onnx_encoder.embed_clip(wav) @ torch_encoder.embed_clip(wav)) > 0.9


def test_yamnet_bundle_exports_with_its_front_end_inside_the_graph(tmp_path: Path) -> None:
    torch.manual_seed(0)
    encoder = YAMNetEncoder(YAMNetFrontendConfig(), YAMNetConfig(), WindowConfig()).eval()
    bundle = tmp_path / "yamnet"
    save_bundle(bundle, encoder, model_version="yamnet-random", training={}, evaluation={})
    manifest = add_onnx(bundle)
    assert manifest.graph is not None and manifest.graph.input == "waveform"
    onnx_encoder = load_onnx_encoder(bundle)
    for seconds in (1.2, 7.0):
        wav = af.scene_clip("birds", 1, seconds, rate=16_000)
        assert float(onnx_encoder.embed_clip(wav) @ encoder.embed_clip(wav)) > 0.9999


def test_beats_bundle_exports_with_its_fbank_inside_the_graph(tmp_path: Path) -> None:
    from sceneprint.beats import BEATsEncoder, BEATsFrontendConfig, beats_tiny

    torch.manual_seed(0)
    encoder = BEATsEncoder(BEATsFrontendConfig(), beats_tiny(), WindowConfig()).eval()
    bundle = tmp_path / "beats"
    save_bundle(bundle, encoder, model_version="beats-tiny-random", training={}, evaluation={})
    manifest = add_onnx(bundle)  # checked against torch on its probe clip, too
    assert manifest.graph is not None and manifest.graph.input == "waveform"
    onnx_encoder = load_onnx_encoder(bundle)
    for seconds in (1.2, 7.0):  # one window of its own length; two 5 s windows
        wav = af.scene_clip("hum", 2, seconds, rate=16_000)
        assert float(onnx_encoder.embed_clip(wav) @ encoder.embed_clip(wav)) > 0.9999


def test_export_leaves_no_staging_files(tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b")
    copy = tmp_path / "copy"
    shutil.copytree(bundle, copy)
    add_onnx(copy)
    assert sorted(p.name for p in copy.iterdir()) == sorted(["manifest.json", "weights.pt", GRAPH_FP32])
    assert np.isfinite(load_onnx_encoder(copy).embed_clip(af.scene_clip("hum", 0, 2.0))).all()
