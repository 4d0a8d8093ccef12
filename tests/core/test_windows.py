"""Windowing and aggregation: one numpy definition for the torch encoder and the ONNX Runtime one."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sceneprint.bundle import load_bundle
from sceneprint.runtime import load_onnx_encoder
from sceneprint.windows import WindowConfig, aggregate_windows, cut_windows
from tests import audio_factory as af


def test_short_clip_is_one_window_of_its_own_length() -> None:
    assert cut_windows(np.ones(3 * 100, dtype=np.float32), 100, WindowConfig()).shape == (1, 300)


def test_last_window_ends_at_the_clip_end() -> None:
    x = np.arange(1210, dtype=np.float32)
    w = cut_windows(x, 100, WindowConfig(window_seconds=5.0, hop_seconds=2.5))
    assert w.shape == (4, 500)
    assert w[0, 0] == 0 and w[1, 0] == 250 and w[2, 0] == 500 and w[3, -1] == 1209


def test_aggregate_is_the_renormalised_mean_of_unit_vectors() -> None:
    out = aggregate_windows(np.array([[3.0, 0.0], [0.0, 0.5]]))
    assert np.allclose(out, [2**-0.5, 2**-0.5])


@pytest.mark.parametrize("seconds", [1.5, 5.0, 12.3])
def test_onnx_encoder_embeds_a_clip_as_the_torch_encoder_does(tiny_bundle: Path, seconds: float) -> None:
    torch_encoder, _ = load_bundle(tiny_bundle)
    onnx_encoder = load_onnx_encoder(tiny_bundle)
    wav = af.scene_clip("birds", 3, seconds)
    assert onnx_encoder.window_features(wav).shape == torch_encoder.window_features(wav).shape
    assert float(onnx_encoder.embed_clip(wav) @ torch_encoder.embed_clip(wav)) > 0.9999
