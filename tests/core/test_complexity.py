"""The complexity card: the front-end MAC formula by hand, and the card's shape (no timing is asserted)."""

from __future__ import annotations

import importlib
from types import ModuleType

import pytest
import torch

from sceneprint.beats import BEATsFrontendConfig
from sceneprint.cpmobile import parameter_count, preset
from sceneprint.encoder import Encoder, WindowConfig
from sceneprint.frontend import LogMelConfig
from sceneprint.yamnet import YAMNetFrontendConfig


@pytest.fixture
def complexity() -> ModuleType:
    return importlib.import_module("sceneprint.complexity")


def test_frontend_macs_of_a_tiny_logmel_config_match_the_hand_count(complexity: ModuleType) -> None:
    config = LogMelConfig(sample_rate=1000, n_fft=16, win_length=8, hop_length=10, n_mels=4, f_max=500.0)
    # Per frame: window 8 + FFT 2·16·log2(16) = 128 + |X|² 2·9 = 18 + mel 9·4 = 36 -> 190; 100 frames/s.
    assert complexity.frontend_macs_per_second(config) == 19_000


def test_frontend_macs_of_a_tiny_yamnet_config_match_the_hand_count(complexity: ModuleType) -> None:
    config = YAMNetFrontendConfig(sample_rate=800, window_samples=6, hop_samples=4, n_fft=8, n_mels=2,
                                  f_min=0.0, f_max=400.0)
    # Per frame: window 6 + FFT 2·8·3 = 48 + |X|² 2·5 = 10 + mel 5·2 = 10 -> 74; 200 frames/s.
    assert complexity.frontend_macs_per_second(config) == 14_800


def test_frontend_macs_refuse_a_front_end_without_a_formula(complexity: ModuleType) -> None:
    with pytest.raises(TypeError, match="LogMelConfig"):
        complexity.frontend_macs_per_second(BEATsFrontendConfig())


def test_matmul_rate_is_positive(complexity: ModuleType) -> None:
    assert complexity.measure_matmul_gflops(1, size=32, repeats=2) > 0


def test_card_of_cpmobile_6k_has_every_figure(complexity: ModuleType) -> None:
    torch.manual_seed(0)
    encoder = Encoder(LogMelConfig(), preset("cpmobile_6k"), WindowConfig())
    threads_before = torch.get_num_threads()
    card = complexity.complexity_card(encoder, repeats=2, threads=(1,), matmul_gflops={1: 10.0})

    assert card["parameters"] == parameter_count(encoder.network)
    assert card["network_macs_per_second"] == encoder.macs_per_second()
    assert card["frontend_macs_per_second"] == complexity.frontend_macs_per_second(LogMelConfig())
    assert card["total_macs_per_second"] == card["frontend_macs_per_second"] + card["network_macs_per_second"]
    assert card["macs_per_clip"] == card["total_macs_per_second"] * 5.0
    [cpu] = card["cpu"]
    assert cpu["threads"] == 1
    assert cpu["matmul_gflops"] == 10.0
    assert cpu["floor_ms"] == pytest.approx(2 * card["macs_per_clip"] / 10e9 * 1000)
    for stage in ("embed_clip", "frontend", "network"):
        assert cpu[stage]["n"] == 2
        assert 0 < cpu[stage]["median_ms"] <= cpu[stage]["p90_ms"]
    assert cpu["latency_over_floor"] > 0
    assert card["parameters"] > 0 and card["frontend_macs_per_second"] > 0 and card["network_macs_per_second"] > 0
    # The card borrows the encoder and the process: both are handed back as they were.
    assert encoder.training
    assert torch.get_num_threads() == threads_before
