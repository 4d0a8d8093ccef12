"""Audio made by code for the tests: tones, noise, chirps, silence, and broken files.

No recording is copied into the repository; every fixture is generated here, deterministically.
"""

from __future__ import annotations

import io
import struct

import numpy as np
import soundfile as sf

RATE = 32_000


def rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def tone(freq: float = 440.0, seconds: float = 2.0, rate: int = RATE, amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amp * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def noise(seconds: float = 2.0, rate: int = RATE, amp: float = 0.1, seed: int = 0) -> np.ndarray:
    return (amp * rng(seed).standard_normal(int(seconds * rate))).astype(np.float32)


def chirp(f0: float = 200.0, f1: float = 8000.0, seconds: float = 2.0, rate: int = RATE,
          amp: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    phase = 2 * np.pi * (f0 * t + (f1 - f0) * t**2 / (2 * seconds))
    return (amp * np.sin(phase)).astype(np.float32)


def scene_clip(kind: str, seed: int, seconds: float = 3.0, rate: int = RATE) -> np.ndarray:
    """Distinct synthetic 'scenes' with clip-to-clip variation.

    ``hum``: low harmonic hum in brown noise; ``birds``: random high chirps over faint noise;
    ``clicks``: sparse broadband clicks (like typing).
    """
    g = rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    if kind == "hum":
        f0 = g.uniform(50, 70)
        x = sum(0.2 / k * np.sin(2 * np.pi * k * f0 * t + g.uniform(0, 6)) for k in range(1, 6))
        brown = np.cumsum(g.standard_normal(n))
        x = x + 0.02 * brown / (np.abs(brown).max() + 1e-9)
    elif kind == "birds":
        x = 0.005 * g.standard_normal(n)
        for _ in range(int(seconds * 4)):
            start = g.integers(0, n - rate // 8)
            seg = np.arange(rate // 8) / rate
            f = g.uniform(3000, 6000)
            x[start : start + len(seg)] += 0.3 * np.sin(2 * np.pi * (f * seg + 8000 * seg**2)) * np.hanning(len(seg))
    elif kind == "clicks":
        x = 0.002 * g.standard_normal(n)
        for start in g.integers(0, n - 200, size=int(seconds * 8)):
            x[start : start + 200] += 0.5 * g.standard_normal(200) * np.exp(-np.arange(200) / 30)
    else:
        raise ValueError(kind)
    return np.clip(x, -1, 1).astype(np.float32)


def encode(samples: np.ndarray, rate: int = RATE, fmt: str = "WAV", subtype: str | None = None) -> bytes:
    """Encode samples (N,) or (N, C) with soundfile into file bytes."""
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format=fmt, subtype=subtype)
    return buf.getvalue()


def wav(samples: np.ndarray, rate: int = RATE, subtype: str = "PCM_16") -> bytes:
    return encode(samples, rate, "WAV", subtype)


def raw_wav_header(rate: int, channels: int, n_frames: int, bits: int = 16, data: bytes = b"") -> bytes:
    """A hand-made PCM WAV whose header may lie (absurd rate, channel count or frame count)."""
    block = channels * bits // 8
    data_size = n_frames * block
    fmt = struct.pack("<HHIIHH", 1, channels, rate, rate * block, block, bits)
    return (b"RIFF" + struct.pack("<I", 36 + data_size) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", data_size) + data)


def long_silent_flac(seconds: float, rate: int = 8000) -> bytes:
    """A small FLAC file that decodes to ``seconds`` of audio (a decompression bomb for the duration check)."""
    buf = io.BytesIO()
    block = np.zeros(rate * 60, dtype=np.int16)  # silence compresses to almost nothing
    with sf.SoundFile(buf, "w", samplerate=rate, channels=1, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds // 60)):
            f.write(block)
    return buf.getvalue()
