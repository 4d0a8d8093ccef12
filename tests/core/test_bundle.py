"""The encoder bundle: round trip, and refusal of anything that does not match its manifest."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sceneprint.bundle import MANIFEST, WEIGHTS, BundleError, load_bundle, read_manifest, save_bundle, sha256_file
from sceneprint.cpmobile import parameter_count
from tests import audio_factory as af
from tests.conftest import make_bundle


@pytest.fixture
def bundle(tmp_path: Path) -> Path:
    return make_bundle(tmp_path / "bundle")


def copy(bundle: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(bundle, tmp_path / "copy"))


def rewrite_manifest(bundle: Path, **changes: object) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    data.update(changes)
    (bundle / MANIFEST).write_text(json.dumps(data))


def test_round_trip_rebuilds_the_same_encoder(bundle: Path) -> None:
    encoder, manifest = load_bundle(bundle)
    again, _ = load_bundle(bundle)
    x = af.chirp(seconds=2.0)
    np.testing.assert_array_equal(encoder.embed_clip(x), again.embed_clip(x))
    assert manifest.parameter_count == parameter_count(encoder.network)
    assert manifest.embedding_dim == 48 and manifest.sample_rate == 32_000
    assert manifest.macs_per_second > 0 and manifest.created_at
    assert manifest.weights_sha256 == sha256_file(bundle / WEIGHTS)


def test_manifest_describes_everything_needed_to_rebuild(bundle: Path) -> None:
    data = json.loads((bundle / MANIFEST).read_text())
    for key in ["format_version", "model_version", "created_at", "sample_rate", "embedding_dim", "parameter_count",
                "macs_per_second", "frontend", "network", "window", "weights_sha256", "training", "evaluation"]:
        assert key in data
    assert data["frontend"]["hop_length"] and data["network"]["norm"] == "batch"
    assert data["network"]["output_norm"] == "layer"


def test_tampered_weights_are_refused(bundle: Path, tmp_path: Path) -> None:
    tampered = copy(bundle, tmp_path)
    with (tampered / WEIGHTS).open("r+b") as f:
        f.seek(-10, 2)
        f.write(b"0123456789")
    with pytest.raises(BundleError, match="sha256"):
        load_bundle(tampered)


def test_weights_that_would_run_code_are_refused_even_with_a_matching_hash(bundle: Path, tmp_path: Path) -> None:
    evil = copy(bundle, tmp_path)

    class Payload:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (print, ("pwned",))

    torch.save({"x": Payload()}, evil / WEIGHTS)
    rewrite_manifest(evil, weights_sha256=sha256_file(evil / WEIGHTS))
    with pytest.raises(BundleError, match="weights_only"):
        load_bundle(evil)


def test_unexpected_and_missing_keys_are_listed(bundle: Path, tmp_path: Path) -> None:
    other = copy(bundle, tmp_path)
    state = torch.load(other / WEIGHTS, weights_only=True)
    state["network.extra.weight"] = torch.zeros(1)
    del state["network.head.weight"]
    torch.save(state, other / WEIGHTS)
    rewrite_manifest(other, weights_sha256=sha256_file(other / WEIGHTS))
    with pytest.raises(BundleError, match=r"missing keys \['network.head.weight'\].*network.extra.weight"):
        load_bundle(other)


def test_a_wrong_embedding_size_is_refused(bundle: Path, tmp_path: Path) -> None:
    other = copy(bundle, tmp_path)
    rewrite_manifest(other, embedding_dim=128)
    with pytest.raises(BundleError, match="embedding_dim"):
        load_bundle(other)


def test_non_finite_output_is_refused(tmp_path: Path) -> None:
    from sceneprint.cpmobile import preset
    from sceneprint.encoder import Encoder, WindowConfig
    from sceneprint.frontend import LogMelConfig

    encoder = Encoder(LogMelConfig(), preset("cpmobile_6k"), WindowConfig())
    with torch.no_grad():
        encoder.network.head.weight.fill_(float("nan"))
    save_bundle(tmp_path / "nan", encoder, model_version="nan", training={}, evaluation={})
    with pytest.raises(BundleError, match="non-finite"):
        load_bundle(tmp_path / "nan")


def test_unknown_manifest_keys_and_versions_are_refused(bundle: Path, tmp_path: Path) -> None:
    other = copy(bundle, tmp_path)
    rewrite_manifest(other, surprise=1)
    with pytest.raises(BundleError, match="surprise"):
        read_manifest(other)
    rewrite_manifest(other, format_version=99)
    with pytest.raises(BundleError, match="format_version"):
        read_manifest(other)


def test_a_missing_bundle_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(BundleError, match="not a Sceneprint bundle"):
        load_bundle(tmp_path / "nothing")


def test_manifest_names_its_architecture_and_an_unknown_one_is_refused(bundle: Path) -> None:
    assert read_manifest(bundle).architecture == "cpmobile"
    rewrite_manifest(bundle, architecture="wav2vec")
    with pytest.raises(BundleError, match="architecture 'wav2vec' is not one of"):
        read_manifest(bundle)


def test_format_1_bundles_still_load_with_their_head_layout(tmp_path: Path) -> None:
    # A format-1 bundle: CP-Mobile, no architecture field, normalisation inside the head convolution.
    b = make_bundle(tmp_path / "v1", output_norm="head")
    data = json.loads((b / MANIFEST).read_text())
    del data["architecture"], data["network"]["output_norm"]
    data["format_version"] = 1
    (b / MANIFEST).write_text(json.dumps(data))
    encoder, manifest = load_bundle(b)
    assert manifest.format_version == 1 and manifest.architecture == "cpmobile"
    assert manifest.network.output_norm == "head"
    assert encoder.embed_clip(af.noise(2.0)).shape == (48,)


def test_a_beats_encoder_is_a_bundle_too(tmp_path: Path) -> None:
    from sceneprint.beats import BEATsEncoder, BEATsFrontendConfig, beats_tiny
    from sceneprint.encoder import WindowConfig

    encoder = BEATsEncoder(BEATsFrontendConfig(), beats_tiny(), WindowConfig()).eval()
    save_bundle(tmp_path / "beats", encoder, model_version="beats-tiny", training={}, evaluation={})
    loaded, manifest = load_bundle(tmp_path / "beats")
    assert manifest.architecture == "beats" and manifest.sample_rate == 16_000
    clip = af.noise(3.0, rate=16_000)
    np.testing.assert_allclose(loaded.embed_clip(clip), encoder.embed_clip(clip), atol=1e-6)
