"""The numpy log-mel front-end: the one definition training (``LogMel``) and serving share."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torchaudio

from sceneprint.frontend import LogMel
from sceneprint.logmel import LogMelConfig, logmel
from tests import audio_factory as af


def test_training_module_computes_exactly_the_numpy_front_end() -> None:
    cfg = LogMelConfig()
    x = np.stack([af.scene_clip("hum", 0, 1.5), af.scene_clip("clicks", 1, 1.5)]).astype(np.float32)
    assert np.array_equal(LogMel(cfg)(torch.from_numpy(x)).numpy(), logmel(x, cfg))


@pytest.mark.parametrize("samples", [32_000, 160_000, 32_123])
def test_front_end_reproduces_the_torchaudio_features_bundles_were_trained_on(samples: int) -> None:
    cfg = LogMelConfig()
    x = np.random.default_rng(0).standard_normal((2, samples)).astype(np.float32) * 0.1
    mel = torchaudio.transforms.MelSpectrogram(
        sample_rate=cfg.sample_rate, n_fft=cfg.n_fft, win_length=cfg.win_length, hop_length=cfg.hop_length,
        f_min=cfg.f_min, f_max=cfg.f_max, n_mels=cfg.n_mels, power=2.0, center=True, pad_mode="reflect",
        norm="slaney", mel_scale="slaney")(torch.from_numpy(x))
    reference = ((torch.log(mel + cfg.log_offset) - cfg.norm_mean) / cfg.norm_std).unsqueeze(1).numpy()
    out = logmel(x, cfg)
    assert out.shape == reference.shape == (2, 1, cfg.n_mels, cfg.frames(samples))
    assert np.abs(out - reference).max() < 1e-3  # float32 rounding of a log; values are O(1)


def test_front_end_refuses_a_waveform_that_is_not_a_batch() -> None:
    with pytest.raises(ValueError, match=r"\(B, N\)"):
        logmel(np.zeros(32_000, dtype=np.float32), LogMelConfig())
