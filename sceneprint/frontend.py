"""The log-mel front-end as a torch module, for training: a waveform batch in, normalised log-mels out.

The front-end is part of the encoder (and of its bundle), never a separate setting of the service:
a model run with another hop or mel count would silently see different features. Its one definition
is ``sceneprint.logmel.logmel`` (numpy), which the service runs before the ONNX graph; this
module calls it, so training and serving cannot compute features two ways.
"""

from __future__ import annotations

import torch
from torch import nn

from sceneprint.logmel import LogMelConfig, analysis_window, logmel, mel_filterbank

__all__ = ["LogMel", "LogMelConfig"]


class _Buffers(nn.Module):
    """Holds one named constant buffer."""

    def __init__(self, name: str, value: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer(name, value)


class _MelLayout(nn.Module):
    """The constants under the state-dict names of ``torchaudio.transforms.MelSpectrogram``.

    Bundles and training checkpoints written before the front-end moved to numpy hold
    ``mel.spectrogram.window`` and ``mel.mel_scale.fb``; keeping the names keeps them loading strictly.
    The values are recomputed from the config; nothing reads them back.
    """

    def __init__(self, config: LogMelConfig) -> None:
        super().__init__()
        left = (config.n_fft - config.win_length) // 2
        window = analysis_window(config)[left:left + config.win_length]
        self.spectrogram = _Buffers("window", torch.from_numpy(window.copy()))
        self.mel_scale = _Buffers("fb", torch.from_numpy(mel_filterbank(config).copy()))


class LogMel(nn.Module):
    """Waveform (B, N) -> normalised log-mel (B, 1, n_mels, T), computed by ``sceneprint.logmel.logmel``."""

    def __init__(self, config: LogMelConfig) -> None:
        super().__init__()
        self.config = config
        self.mel = _MelLayout(config)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        # The front-end has no parameters and the waveform needs no gradient: it is a constant input.
        features = logmel(waveform.detach().cpu().float().numpy(), self.config)  # (B, 1, n_mels, T)
        return torch.from_numpy(features).to(waveform.device)
