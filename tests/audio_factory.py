"""Audio made by code for the tests: tones, noise, chirps, silence, and broken files.

No recording is copied into the repository; every fixture is generated here, deterministically.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

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


def class_clip(class_index: int, seed: int, seconds: float = 2.0, rate: int = RATE) -> np.ndarray:
    """A clip of synthetic class ``class_index``: a band of noise and a tone whose frequencies the class sets."""
    g = rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f = 150.0 * 1.45**class_index
    spectrum = np.fft.rfft(g.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1 / rate)
    band = np.fft.irfft(spectrum * np.exp(-(((freqs - 2 * f) / (0.3 * f)) ** 2)), n)
    wobble = 1 + 0.3 * np.sin(2 * np.pi * (1 + class_index % 4) * t + g.uniform(0, 6))
    x = 0.1 * band / (np.abs(band).max() + 1e-9) + 0.2 * wobble * np.sin(2 * np.pi * f * g.uniform(0.97, 1.03) * t)
    return (x + 0.003 * g.standard_normal(n)).astype(np.float32)


def write_labelled_dataset(root: Path, *, n_classes: int = 10, recordings: int = 4, clips_per_recording: int = 3,
                           heldout: int = 5, seconds: float = 2.0, split: str = "fewshot-v1") -> Path:
    """A small data set in the sceneprint-dev layout (meta.csv, audio/, splits/SPLIT.json) of generated clips.

    The first ``n_classes - heldout`` classes are training classes (their first recording is the
    validation recording); the others are held out.
    """
    import csv
    import json

    (root / "audio").mkdir(parents=True, exist_ok=True)
    rows, val_sources = [], []
    for c in range(n_classes):
        for r in range(recordings):
            source = f"synth:{c}-{r}"
            if c < n_classes - heldout and r == 0:
                val_sources.append(source)
            for k in range(clips_per_recording):
                name = f"audio/class{c}-rec{r}-{k}.wav"
                (root / name).write_bytes(wav(class_clip(c, seed=1000 * c + 10 * r + k, seconds=seconds)))
                rows.append({"filename": name, "scene_label": f"class{c}", "source_id": source, "fold": 1,
                             "license": "CC0 (generated)"})
    with (root / "meta.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "splits").mkdir(exist_ok=True)
    names = [f"class{c}" for c in range(n_classes)]
    (root / "splits" / f"{split}.json").write_text(json.dumps({
        "name": split, "train_classes": names[: n_classes - heldout], "heldout_classes": names[n_classes - heldout:],
        "val_sources": val_sources}))
    return root


def wide_quiet_flac(seconds: float, rate: int = 384_000, channels: int = 8, seed: int = 0) -> bytes:
    """A small FLAC of near-silence (one LSB of dither) at a high rate and many channels: a few hundred KB that
    decode to ``seconds * rate * channels`` samples (the memory amplification of issue 22, item 5)."""
    buf = io.BytesIO()
    gen = np.random.default_rng(seed)
    with sf.SoundFile(buf, "w", samplerate=rate, channels=channels, format="FLAC", subtype="PCM_16") as f:
        for _ in range(int(seconds)):
            block = np.zeros((rate, channels), dtype=np.int16)
            block[gen.integers(0, rate, 64), :] = gen.integers(-3000, 3000, (64, channels), dtype=np.int16)
            f.write(block)
    return buf.getvalue()
