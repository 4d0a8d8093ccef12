"""The log-mel front-end."""

from __future__ import annotations

import numpy as np
import torch

from sceneprint.frontend import LogMel, LogMelConfig
from tests import audio_factory as af


def test_logmel_shape_follows_the_config() -> None:
    cfg = LogMelConfig()
    out = LogMel(cfg)(torch.zeros(2, cfg.sample_rate) + 0.01)
    assert out.shape == (2, 1, cfg.n_mels, cfg.frames(cfg.sample_rate))


def test_logmel_puts_a_tone_in_the_right_band() -> None:
    cfg = LogMelConfig()
    low = LogMel(cfg)(torch.from_numpy(af.tone(300, 1.0))[None])[0, 0].mean(dim=1)
    high = LogMel(cfg)(torch.from_numpy(af.tone(6000, 1.0))[None])[0, 0].mean(dim=1)
    assert int(low.argmax()) < int(high.argmax())


def test_logmel_is_normalised_by_the_configured_constants() -> None:
    cfg = LogMelConfig(norm_mean=0.0, norm_std=1.0)
    shifted = LogMelConfig(norm_mean=1.0, norm_std=2.0)
    x = torch.from_numpy(af.noise(1.0))[None]
    a, b = LogMel(cfg)(x), LogMel(shifted)(x)
    torch.testing.assert_close(b, (a - 1.0) / 2.0)


def test_digital_silence_gives_finite_features() -> None:
    out = LogMel(LogMelConfig())(torch.zeros(1, 32_000))
    assert np.isfinite(out.numpy()).all()
