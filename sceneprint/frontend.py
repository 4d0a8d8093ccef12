"""The log-mel front-end: a waveform batch in, normalised log-mel spectrograms out.

The front-end is part of the encoder (and of its bundle), never a separate setting of the service:
a model run with another hop or mel count would silently see different features.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torchaudio
from torch import nn


@dataclass(frozen=True)
class LogMelConfig:
    """Log-mel front-end settings. 32 kHz input, 10 ms hop, 128 mel bands up to 16 kHz."""

    sample_rate: int = 32_000
    n_fft: int = 1024
    win_length: int = 800  # 25 ms
    hop_length: int = 320  # 10 ms: 100 frames per second
    n_mels: int = 128
    f_min: float = 0.0
    f_max: float = 16_000.0
    log_offset: float = 1e-5
    # Fixed affine normalisation of log-mel values (sceneprint-dev log-mels have mean -7.5, std 4.0);
    # constants, not fitted statistics, so the bundle alone defines the features.
    norm_mean: float = -7.5
    norm_std: float = 4.0

    def frames(self, n_samples: int) -> int:
        """Number of frames produced for ``n_samples`` input samples (centred STFT)."""
        return 1 + n_samples // self.hop_length


class LogMel(nn.Module):
    """Waveform (B, N) -> normalised log-mel (B, 1, n_mels, T)."""

    def __init__(self, config: LogMelConfig) -> None:
        super().__init__()
        self.config = config
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=config.sample_rate,
            n_fft=config.n_fft,
            win_length=config.win_length,
            hop_length=config.hop_length,
            f_min=config.f_min,
            f_max=config.f_max,
            n_mels=config.n_mels,
            power=2.0,
            center=True,
            pad_mode="reflect",
            norm="slaney",
            mel_scale="slaney",
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        c = self.config
        mel = self.mel(waveform)  # (B, n_mels, T)
        logmel = (torch.log(mel + c.log_offset) - c.norm_mean) / c.norm_std
        return logmel.unsqueeze(1)  # (B, 1, n_mels, T)
