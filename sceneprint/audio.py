"""Audio decoding: bytes in, a mono float32 waveform at the encoder's sample rate out.

Every door into Sceneprint (the service, training, the benchmarks) decodes through ``decode_clip``,
so a clip is read, downmixed and resampled the same way everywhere.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import soxr

# Sample rates outside this range are not audio a microphone produced; a header claiming them is
# either corrupt or hostile.
MIN_SAMPLE_RATE = 4_000
MAX_SAMPLE_RATE = 384_000
# Mono to 7.1; anything wider is not a recording of a scene.
MAX_CHANNELS = 8
# What libsndfile decodes, as told to clients whose file it could not read.
ACCEPTED_FORMATS = "WAV (PCM or float), FLAC, OGG (Vorbis or Opus), MP3"
# Standard deviation below which a clip carries no signal (about -100 dBFS): digital silence or DC.
SILENCE_STD = 1e-5
# Float audio is nominally within [-1, 1]; a peak this far above full scale (+80 dB) is not a recording.
# Refused here, before a power spectrum could overflow float32 (amplitudes of ~1e17 do).
MAX_PEAK = 1e4
# Frames decoded at a time: the input is held one block at a time (at most 8 channels x 64 Ki frames of
# float32, 2 MiB), so a request's memory is bounded by its output at the encoder's rate, not by the
# input's rate times its channels.
DECODE_BLOCK_FRAMES = 65_536


class AudioError(ValueError):
    """A clip that cannot be used, with a stable machine-readable ``code``."""

    code = "invalid_audio"

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class EmptyFile(AudioError):
    code = "empty_file"


class UndecodableAudio(AudioError):
    code = "undecodable_audio"


class UnsupportedAudio(AudioError):
    code = "unsupported_audio"


class TooShort(AudioError):
    code = "too_short"


class TooLong(AudioError):
    code = "too_long"


class Silent(AudioError):
    code = "silent"


class NonFinite(AudioError):
    """NaN or infinite samples, features or embeddings."""

    code = "non_finite"


class OutOfRange(AudioError):
    """Samples far outside full scale (float audio with absurd amplitudes)."""

    code = "out_of_range"


@dataclass(frozen=True)
class ClipLimits:
    """Durations a clip must fall between, in seconds."""

    min_seconds: float = 1.0
    max_seconds: float = 60.0


@dataclass(frozen=True)
class DecodedClip:
    """A decoded clip: mono float32 samples at ``sample_rate``, and what the file said about itself."""

    waveform: np.ndarray  # (N,) float32
    sample_rate: int
    source_sample_rate: int
    source_channels: int
    source_format: str

    @property
    def duration_s(self) -> float:
        return len(self.waveform) / self.sample_rate


def decode_clip(data: bytes, *, sample_rate: int, limits: ClipLimits) -> DecodedClip:
    """Decode audio bytes to a mono waveform at ``sample_rate``.

    The format is decided by content (libsndfile sniffs the header), never by file name. Duration
    limits are checked against the header before any sample is decoded, so a compressed file that
    expands to hours of audio is refused without expanding it.

    Args:
        data: The file's bytes.
        sample_rate: The rate to resample to (the encoder's rate).
        limits: The accepted duration range.

    Returns:
        The decoded clip.

    Raises:
        AudioError: One of its subclasses, naming the reason.
    """
    if len(data) == 0:
        raise EmptyFile("the file is empty (0 bytes)")
    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            rate, channels, frames, fmt = f.samplerate, f.channels, f.frames, f.format
            _check_header(rate, channels, frames, limits)
            # Read at most one frame past the limit: a header that under-reports cannot make us
            # decode more than that.
            max_frames = min(frames, int(limits.max_seconds * rate) + 1)
            mono, n_frames, std = _decode_mono(f, max_frames, rate, sample_rate)
    except AudioError:
        raise
    except (sf.LibsndfileError, RuntimeError, TypeError, ValueError, OverflowError) as exc:
        # libsndfile refuses some absurd headers outright (a WAV with a sample rate of 0); they are
        # unsupported audio, not undecodable bytes.
        rate = _wav_header_rate(data)
        if rate is not None and not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
            raise UnsupportedAudio(f"sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz") from exc
        raise UndecodableAudio(f"not a decodable audio file ({_reason(exc)}); accepted formats: {ACCEPTED_FORMATS}"
                               ) from exc

    if n_frames == 0:
        raise TooShort("the file holds no audio frames")
    duration = n_frames / rate
    if duration < limits.min_seconds:
        raise TooShort(f"{duration:.3f} s of audio; at least {limits.min_seconds:g} s is needed")
    if duration > limits.max_seconds:
        raise TooLong(f"{duration:.1f} s of audio; at most {limits.max_seconds:g} s is accepted")
    if std < SILENCE_STD:
        raise Silent("the audio is silent (digital silence or a constant value)")
    return DecodedClip(
        waveform=mono,
        sample_rate=sample_rate,
        source_sample_rate=rate,
        source_channels=channels,
        source_format=fmt,
    )


def _decode_mono(f: sf.SoundFile, max_frames: int, rate: int, sample_rate: int) -> tuple[np.ndarray, int, float]:
    """Decode, check, downmix and resample ``f`` one block at a time.

    Returns:
        The mono waveform at ``sample_rate``, the number of source frames, and the standard deviation of
        the mono signal at the source rate (merged per block in float64, Chan et al.'s pairwise update, so
        a DC offset does not cancel it away).
    """
    stream = None if rate == sample_rate else soxr.ResampleStream(rate, sample_rate, 1, dtype="float32",
                                                                     quality="HQ")
    pieces: list[np.ndarray] = []
    count, mean, m2 = 0, 0.0, 0.0
    for block in f.blocks(blocksize=DECODE_BLOCK_FRAMES, frames=max_frames, dtype="float32", always_2d=True):
        if not np.isfinite(block).all():
            raise NonFinite("the audio contains NaN or infinite samples (or values beyond float32's range)")
        peak = float(np.abs(block).max(initial=0.0))
        if peak > MAX_PEAK:
            raise OutOfRange(f"sample values reach {peak:.3g}; float audio must lie within +-{MAX_PEAK:g} "
                             "(nominally +-1)")
        mono = block.mean(axis=1, dtype=np.float32)  # (n,)
        n = len(mono)
        if n == 0:
            continue
        block_mean = float(mono.mean(dtype=np.float64))
        block_m2 = float(np.square(mono - block_mean, dtype=np.float64).sum())
        delta = block_mean - mean
        total = count + n
        mean += delta * n / total
        m2 += block_m2 + delta * delta * count * n / total
        count = total
        pieces.append(mono if stream is None else stream.resample_chunk(mono))
    if stream is not None:
        pieces.append(stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True))
    waveform = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.float32)
    std = (m2 / count) ** 0.5 if count else 0.0
    return np.ascontiguousarray(waveform, dtype=np.float32), count, std


def resample(waveform: np.ndarray, orig_rate: int, new_rate: int) -> np.ndarray:
    """Resample a mono float32 waveform (libsoxr, high quality: band-limited, linear phase).

    soxr rather than torchaudio, so that decoding needs no torch: the service runs without it, and
    training decodes through this same function.
    """
    if orig_rate == new_rate:
        return np.ascontiguousarray(waveform, dtype=np.float32)
    out = soxr.resample(np.ascontiguousarray(waveform, dtype=np.float32), orig_rate, new_rate, quality="HQ")
    return np.ascontiguousarray(out, dtype=np.float32)


def _check_header(rate: int, channels: int, frames: int, limits: ClipLimits) -> None:
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise UnsupportedAudio(
            f"sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz"
        )
    if not 1 <= channels <= MAX_CHANNELS:
        raise UnsupportedAudio(f"{channels} channels; at most {MAX_CHANNELS} are accepted")
    if frames / rate > limits.max_seconds:
        raise TooLong(f"{frames / rate:.1f} s of audio; at most {limits.max_seconds:g} s is accepted")


def _wav_header_rate(data: bytes) -> int | None:
    """The sample rate a RIFF/WAVE header claims (its first ``fmt `` chunk), or None if it is not one."""
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= len(data):
        chunk, size = data[offset:offset + 4], int.from_bytes(data[offset + 4:offset + 8], "little")
        if chunk == b"fmt ":
            return int.from_bytes(data[offset + 12:offset + 16], "little") if offset + 16 <= len(data) else None
        offset += 8 + size + (size & 1)
    return None


def _reason(exc: BaseException) -> str:
    """The decoder's reason, without the Python object reprs its message may carry."""
    text = getattr(exc, "error_string", None) or str(exc)
    text = re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the file", text).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]
