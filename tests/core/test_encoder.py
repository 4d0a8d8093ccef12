"""The encoder: sliding windows over long audio, aggregation, complexity counting."""

from __future__ import annotations

import numpy as np
import pytest

from sceneprint.cpmobile import preset
from sceneprint.encoder import Encoder, WindowConfig, count_macs, network_macs_per_second
from sceneprint.frontend import LogMelConfig
from tests import audio_factory as af


@pytest.fixture(scope="module")
def encoder() -> Encoder:
    return Encoder(LogMelConfig(), preset("cpmobile_6k"), WindowConfig(window_seconds=2.0, hop_seconds=1.0)).eval()


def test_short_clips_are_one_window(encoder: Encoder) -> None:
    assert encoder.windows(af.noise(1.5)).shape == (1, 48_000)


def test_long_clips_are_cut_into_windows_that_cover_the_end(encoder: Encoder) -> None:
    w = encoder.windows(np.arange(5.5 * 32_000, dtype=np.float32))
    assert w.shape == (5, 64_000)  # starts 0, 1, 2, 3 s and a last one ending at 5.5 s
    assert w[-1, -1] == 5.5 * 32_000 - 1


def test_embed_clip_is_the_renormalised_mean_of_window_embeddings(encoder: Encoder) -> None:
    x = af.chirp(seconds=4.0)
    windows = encoder(encoder.windows(x)).detach().numpy()
    expected = windows.mean(0) / np.linalg.norm(windows.mean(0))
    np.testing.assert_allclose(encoder.embed_clip(x), expected, atol=1e-5)


def test_macs_count_a_known_convolution() -> None:
    import torch
    from torch import nn

    conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
    assert count_macs(conv, torch.zeros(1, 2, 5, 5)) == 4 * 5 * 5 * 2 * 9


def test_macs_per_second_is_positive_and_scales_with_size() -> None:
    small = Encoder(LogMelConfig(), preset("cpmobile_6k"), WindowConfig())
    large = Encoder(LogMelConfig(), preset("cpmobile_60k"), WindowConfig())
    assert 0 < network_macs_per_second(small) < network_macs_per_second(large)
