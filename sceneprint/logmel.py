"""The log-mel front-end, in numpy: the one definition that training and serving share.

Serving runs the network as an ONNX graph and this front-end outside it: on a 5 s clip, one thread,
ONNX Runtime's STFT op takes 11.2 ms where this costs a few ms, and the network alone runs 2.1 ms in
ONNX Runtime (docs/benchmarks.md). Training's ``sceneprint.frontend.LogMel`` calls this same function,
so features cannot differ between the two.

The FFT is numpy's in float64: numpy's float32 transform is 3x slower than its float64 one here, and
scipy's (about 1 ms faster per 5 s clip) would add 143 MB to the serve install (docs/benchmarks.md).

It reproduces ``torchaudio.transforms.MelSpectrogram`` as the first bundles were trained with it
(centred, reflect-padded power STFT of a periodic Hann window of ``win_length`` centred in ``n_fft``,
Slaney mel scale and area normalisation), to float32 rounding.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from sceneprint.audio import NonFinite


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


def _hz_to_mel(freq: np.ndarray) -> np.ndarray:
    """Slaney's mel scale: linear below 1 kHz, logarithmic above."""
    freq = np.asarray(freq, dtype=np.float64)
    mels = 3.0 * freq / 200.0
    log_region = freq >= 1000.0
    return np.where(log_region, 15.0 + np.log(np.maximum(freq, 1e-10) / 1000.0) / (np.log(6.4) / 27.0), mels)


def _mel_to_hz(mels: np.ndarray) -> np.ndarray:
    mels = np.asarray(mels, dtype=np.float64)
    freq = 200.0 * mels / 3.0
    return np.where(mels >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (mels - 15.0)), freq)


@lru_cache(maxsize=8)
def mel_filterbank(config: LogMelConfig) -> np.ndarray:
    """Slaney-normalised triangular filters on the Slaney mel scale.

    Returns:
        (n_fft // 2 + 1, n_mels) float32 weights.
    """
    bins = np.linspace(0.0, config.sample_rate / 2, config.n_fft // 2 + 1)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(np.asarray(config.f_min)), _hz_to_mel(np.asarray(config.f_max)),
                                  config.n_mels + 2))
    slopes = edges[None, :] - bins[:, None]  # (bins, n_mels + 2)
    widths = np.diff(edges)  # (n_mels + 1,)
    down = -slopes[:, :-2] / widths[:-1]
    up = slopes[:, 2:] / widths[1:]
    weights = np.maximum(0.0, np.minimum(down, up))  # (bins, n_mels)
    weights *= 2.0 / (edges[2:] - edges[:-2])  # equal area per filter
    weights.flags.writeable = False
    return weights.astype(np.float32)


@lru_cache(maxsize=8)
def analysis_window(config: LogMelConfig) -> np.ndarray:
    """A periodic Hann window of ``win_length`` samples, zero-padded to ``n_fft`` around the centre."""
    n = np.arange(config.win_length)
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * n / config.win_length)
    left = (config.n_fft - config.win_length) // 2
    window = np.zeros(config.n_fft, dtype=np.float32)
    window[left:left + config.win_length] = hann
    window.flags.writeable = False
    return window


@lru_cache(maxsize=8)
def _analysis_window64(config: LogMelConfig) -> np.ndarray:
    window = analysis_window(config).astype(np.float64)
    window.flags.writeable = False
    return window


def logmel(waveform: np.ndarray, config: LogMelConfig) -> np.ndarray:
    """Waveforms (B, N) float32 -> normalised log-mel spectrograms (B, 1, n_mels, T).

    Args:
        waveform: A batch of equally long mono waveforms at ``config.sample_rate``.
        config: The front-end settings (the bundle's).

    Returns:
        float32 features, T = ``config.frames(N)``.
    """
    x = np.asarray(waveform, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected waveforms (B, N), got shape {x.shape}")
    pad = config.n_fft // 2
    padded = np.pad(x, ((0, 0), (pad, pad)), mode="reflect")  # (B, N + n_fft)
    n_frames = config.frames(x.shape[1])
    frames = np.lib.stride_tricks.sliding_window_view(padded, config.n_fft, axis=1)[:, ::config.hop_length]
    frames = frames[:, :n_frames] * _analysis_window64(config)  # (B, T, n_fft) float64
    spectrum = np.fft.rfft(frames, axis=-1).astype(np.complex64)  # (B, T, n_fft // 2 + 1)
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked for below, as a typed error
        power = spectrum.real**2 + spectrum.imag**2
        mel = power @ mel_filterbank(config)  # (B, T, n_mels)
        out = (np.log(mel + np.float32(config.log_offset)) - np.float32(config.norm_mean)) / np.float32(config.norm_std)
    if not np.isfinite(out).all():
        # Decoding bounds amplitudes, so this is a waveform from elsewhere: refused, never passed on.
        raise NonFinite("the log-mel features are not finite (the waveform's power overflows float32)")
    return np.ascontiguousarray(out.transpose(0, 2, 1)[:, None], dtype=np.float32)  # (B, 1, n_mels, T)
