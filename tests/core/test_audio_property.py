"""The property-based harness of the core audio path (issue 22; ../shared/RELIABILITY.md, "float WAV with
absurd amplitudes" and every other malformed-audio row).

Arbitrary sample formats, rates, channel counts, amplitudes (huge, tiny, denormal), lengths and DC offsets
go through ``decode_clip`` and both encoders (the torch ``Encoder`` of training and the ONNX Runtime encoder
the service runs). The property: a finite unit embedding, or a typed ``AudioError``; never an exception of
another kind, never a NaN.

Seeded and bounded for CI (``ci`` profile: derandomised, 40 examples, well under a minute); the ``nightly``
profile explores 2,000 examples: ``SCENEPRINT_HYPOTHESIS_PROFILE=nightly pytest tests/core/test_audio_property.py``.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sceneprint.audio import AudioError, ClipLimits, decode_clip
from sceneprint.bundle import load_bundle
from sceneprint.encoder import ClipEncoder
from sceneprint.runtime import OnnxEncoder, load_onnx_encoder

settings.register_profile("ci", max_examples=40, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("nightly", max_examples=2000, deadline=None, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
PROFILE = os.environ.get("SCENEPRINT_HYPOTHESIS_PROFILE", "ci")

LIMITS = ClipLimits(min_seconds=0.2, max_seconds=4.0)
RATES = [4_000, 8_000, 11_025, 16_000, 22_050, 32_000, 44_100, 48_000, 96_000, 192_000, 384_000]
FORMATS = [("WAV", "PCM_U8"), ("WAV", "PCM_16"), ("WAV", "PCM_24"), ("WAV", "PCM_32"), ("WAV", "FLOAT"),
           ("WAV", "DOUBLE"), ("FLAC", "PCM_16"), ("FLAC", "PCM_24"), ("OGG", "VORBIS")]
SIGNALS = ["noise", "tone", "zeros", "impulse", "square"]


@st.composite
def audio_files(draw: st.DrawFn) -> bytes:
    rate = draw(st.sampled_from(RATES))
    fmt, subtype = draw(st.sampled_from(FORMATS))
    if fmt == "OGG" and rate > 192_000:
        rate = 48_000  # Vorbis refuses such rates at write time: not an input a client could send
    channels = draw(st.integers(1, 8 if fmt != "OGG" else 2))
    seconds = draw(st.floats(0.0, 3.0))
    frames = min(int(seconds * rate), 3 * rate)
    # 10^-320 (denormal) up to 10^300 (beyond float32), and 0
    amplitude = draw(st.one_of(st.just(0.0), st.floats(-320, 300).map(lambda e: 10.0 ** e)))
    dc = draw(st.sampled_from([0.0, 0.0, 1e-3, -0.5, 1.0, 3.0]))
    kind = draw(st.sampled_from(SIGNALS))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    t = np.arange(frames) / rate
    if kind == "noise":
        x = rng.standard_normal((frames, channels))
    elif kind == "tone":
        x = np.sin(2 * np.pi * 440.0 * t)[:, None].repeat(channels, axis=1)
    elif kind == "zeros":
        x = np.zeros((frames, channels))
    elif kind == "impulse":
        x = np.zeros((frames, channels))
        x[frames // 2:frames // 2 + 1] = 1.0
    else:
        x = np.sign(np.sin(2 * np.pi * 50.0 * t))[:, None].repeat(channels, axis=1)
    with np.errstate(over="ignore", invalid="ignore"):
        x = x * amplitude + dc
    if subtype not in ("FLOAT", "DOUBLE"):
        x = np.clip(np.nan_to_num(x), -1.0, 1.0)  # integer formats hold full scale at most
    buffer = io.BytesIO()
    try:
        sf.write(buffer, x, rate, format=fmt, subtype=subtype)
    except (sf.LibsndfileError, RuntimeError, ValueError):
        return b"not audio: the writer refused these parameters"
    return buffer.getvalue()


@pytest.fixture(scope="module")
def encoders(tiny_bundle: Path) -> tuple[ClipEncoder, OnnxEncoder]:
    torch_encoder, _ = load_bundle(tiny_bundle)
    return torch_encoder, load_onnx_encoder(tiny_bundle)


def check_embedding(vector: np.ndarray) -> None:
    assert vector.dtype == np.float32 and vector.ndim == 1
    assert np.isfinite(vector).all()
    assert abs(float(np.linalg.norm(vector)) - 1.0) < 1e-3


@settings(settings.get_profile(PROFILE))
@given(data=audio_files())
def test_any_audio_gives_a_finite_unit_embedding_or_a_typed_error(
        data: bytes, encoders: tuple[ClipEncoder, OnnxEncoder]) -> None:
    try:
        clip = decode_clip(data, sample_rate=32_000, limits=LIMITS)
    except AudioError:
        return
    assert np.isfinite(clip.waveform).all() and clip.waveform.dtype == np.float32
    for encoder in encoders:
        try:
            vector = encoder.embed_clip(clip.waveform)
        except AudioError:
            continue
        check_embedding(vector)
