"""decode_clip: formats, rates and channel layouts it accepts, and every bad input it refuses."""

from __future__ import annotations

import numpy as np
import pytest

from sceneprint import audio
from sceneprint.audio import (
    ClipLimits,
    EmptyFile,
    NonFinite,
    Silent,
    TooLong,
    TooShort,
    UndecodableAudio,
    UnsupportedAudio,
    decode_clip,
)
from tests import audio_factory as af

LIMITS = ClipLimits(min_seconds=0.5, max_seconds=30.0)


def decode(data: bytes, rate: int = 32_000):  # type: ignore[no-untyped-def]
    return decode_clip(data, sample_rate=rate, limits=LIMITS)


@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32", "FLOAT", "DOUBLE"])
def test_decode_accepts_every_wav_sample_format(subtype: str) -> None:
    x = af.tone(440, 1.0)
    clip = decode(af.wav(x, subtype=subtype))
    assert clip.waveform.dtype == np.float32
    assert len(clip.waveform) == len(x)
    # 8-bit keeps ~-48 dB of noise; everything else is near exact.
    tolerance = 2e-2 if subtype == "PCM_U8" else 1e-3
    assert np.abs(clip.waveform - x).max() < tolerance


@pytest.mark.parametrize("rate", [8000, 11025, 44100, 48000, 96000, 192000])
def test_decode_resamples_to_the_encoder_rate(rate: int) -> None:
    clip = decode(af.wav(af.tone(1000, 1.0, rate=rate), rate=rate))
    assert clip.sample_rate == 32_000
    assert clip.source_sample_rate == rate
    assert abs(len(clip.waveform) - 32_000) <= 1
    # The 1 kHz tone survives resampling: its spectrum peaks at 1 kHz.
    spectrum = np.abs(np.fft.rfft(clip.waveform[:32_000]))
    assert abs(np.argmax(spectrum) - 1000) <= 2


@pytest.mark.parametrize("fmt, subtype", [("FLAC", None), ("OGG", "VORBIS"), ("OGG", "OPUS"), ("MP3", None)])
def test_decode_reads_compressed_formats_by_content(fmt: str, subtype: str | None) -> None:
    rate = 48_000 if subtype == "OPUS" else 32_000  # Opus only runs at 8/12/16/24/48 kHz
    data = af.encode(af.noise(1.0, rate=rate), rate=rate, fmt=fmt, subtype=subtype)
    clip = decode(data)
    # MP3 and Opus encoders add a little padding at the ends.
    assert clip.duration_s == pytest.approx(1.0, abs=0.08)
    assert clip.sample_rate == 32_000


@pytest.mark.parametrize("channels", [2, 6])
def test_decode_downmixes_stereo_and_surround(channels: int) -> None:
    x = af.tone(440, 1.0)
    multi = np.stack([x] * channels, axis=1)
    clip = decode(af.wav(multi, subtype="FLOAT"))
    assert clip.source_channels == channels
    np.testing.assert_allclose(clip.waveform, x, atol=1e-6)


def test_decode_refuses_an_absurd_channel_count() -> None:
    data = af.raw_wav_header(32_000, 64, 32_000, data=b"\x01\x00" * 64 * 32_000)
    with pytest.raises(UnsupportedAudio, match="64 channels"):
        decode(data)


@pytest.mark.parametrize("rate", [1, 100, 500_000])
def test_decode_refuses_absurd_sample_rates(rate: int) -> None:
    data = af.raw_wav_header(rate, 1, 1000, data=b"\x01\x00" * 1000)
    with pytest.raises((UnsupportedAudio, UndecodableAudio)):
        decode(data)


def test_decode_refuses_empty_file() -> None:
    with pytest.raises(EmptyFile):
        decode(b"")


@pytest.mark.parametrize("data", [
    b"hello, this is plain text and not audio at all" * 20,
    b"\x89PNG\r\n\x1a\n" + bytes(200),
    b"%PDF-1.4\n" + bytes(200),
    b"PK\x03\x04" + bytes(200),
])
def test_decode_refuses_non_audio_bytes(data: bytes) -> None:
    with pytest.raises(UndecodableAudio):
        decode(data)


def test_decode_handles_a_truncated_header() -> None:
    with pytest.raises(UndecodableAudio):
        decode(af.wav(af.tone(440, 1.0))[:30])


def test_decode_reads_a_wav_that_claims_more_frames_than_it_holds_up_to_its_real_end() -> None:
    real = af.tone(440, 1.0)
    pcm = (real * 32767).astype("<i2").tobytes()
    data = af.raw_wav_header(32_000, 1, 32_000 * 20, data=pcm)  # claims 20 s, holds 1 s
    clip = decode(data)
    assert clip.duration_s == pytest.approx(1.0, abs=0.01)


def test_decode_refuses_a_decompression_bomb_from_its_header() -> None:
    bomb = af.long_silent_flac(seconds=3600)  # one hour in a few hundred kB
    assert len(bomb) < 2_000_000
    with pytest.raises(TooLong, match="3600"):
        decode(bomb)


@pytest.mark.parametrize("seconds", [1 / 32_000, 0.2])
def test_decode_refuses_too_short(seconds: float) -> None:
    with pytest.raises(TooShort):
        decode(af.wav(af.noise(seconds)))


def test_decode_refuses_too_long() -> None:
    with pytest.raises(TooLong):
        decode(af.wav(af.noise(31.0, rate=8000), rate=8000))


@pytest.mark.parametrize("value", [0.0, 0.25])
def test_decode_refuses_silence_and_dc(value: float) -> None:
    with pytest.raises(Silent):
        decode(af.wav(np.full(32_000, value, dtype=np.float32), subtype="FLOAT"))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_decode_refuses_non_finite_samples(bad: float) -> None:
    x = af.noise(1.0)
    x[100] = bad
    with pytest.raises(NonFinite):
        decode(af.wav(x, subtype="FLOAT"))


@pytest.mark.parametrize("signal", ["square", "noise"])
def test_decode_accepts_clipped_square_and_white_noise(signal: str) -> None:
    x = np.sign(af.tone(100, 1.0)).astype(np.float32) if signal == "square" else af.noise(1.0, amp=0.5)
    assert decode(af.wav(x)).duration_s == pytest.approx(1.0)


@pytest.mark.parametrize("subtype", ["FLOAT", "DOUBLE"])
@pytest.mark.parametrize("peak", [1e5, 3e17, 1e30])
def test_decode_refuses_float_audio_with_absurd_amplitudes(peak: float, subtype: str) -> None:
    """RELIABILITY "float WAV with absurd amplitudes": valid floats far past full scale are refused with a
    typed error, before a power spectrum could overflow (3e17 made a NaN prototype)."""
    x = af.noise(2.0, amp=1.0).astype(np.float64)
    with pytest.raises(audio.OutOfRange, match="within"):
        decode_clip(af.wav(x / np.abs(x).max() * peak, subtype=subtype), sample_rate=af.RATE, limits=LIMITS)


def test_decode_accepts_float_audio_somewhat_past_full_scale() -> None:
    x = af.noise(2.0, amp=1.0)
    clip = decode_clip(af.wav(x / np.abs(x).max() * 50.0, subtype="FLOAT"), sample_rate=af.RATE, limits=LIMITS)
    assert np.isfinite(clip.waveform).all()


def test_logmel_refuses_a_waveform_whose_power_overflows() -> None:
    """The core decides on features too, not only on samples: a waveform that did not come through
    ``decode_clip`` cannot give non-finite features either."""
    from sceneprint.logmel import LogMelConfig, logmel

    x = (af.noise(1.0, amp=1.0) * 3e18).astype(np.float32)[None]
    with pytest.raises(audio.NonFinite):
        logmel(x, LogMelConfig())


@pytest.mark.parametrize("bad", [np.nan, np.inf, 0.0])
def test_aggregate_windows_refuses_non_finite_or_zero_embeddings(bad: float) -> None:
    from sceneprint.windows import aggregate_windows

    windows = np.ones((3, 8), dtype=np.float32)
    windows[1] = bad
    with pytest.raises(audio.NonFinite):
        aggregate_windows(windows)


def test_decoding_many_channels_at_a_high_rate_holds_one_block_not_the_whole_input() -> None:
    """RELIABILITY "small compressed file that decodes to many channels at a high rate": decoded and downmixed
    in blocks, so the peak allocation is bounded by the output at the encoder's rate (20 s at 32 kHz: 2.6 MB),
    not by the input (20 s x 384 kHz x 8 channels of float32: 246 MB)."""
    import tracemalloc

    data = af.wide_quiet_flac(20.0)
    tracemalloc.start()
    try:
        clip = decode_clip(data, sample_rate=af.RATE, limits=audio.ClipLimits(max_seconds=60.0))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert clip.duration_s == pytest.approx(20.0, abs=1e-3)
    assert peak < 32 * 2**20, f"peak {peak / 2**20:.1f} MiB"
