"""The complexity card of an encoder: parameters, MACs per second of audio (front-end and network), CPU
latency of one 5 s clip at batch 1, and the compute floor at this machine's matmul rate.

Used by ``bench/complexity.py`` (the table of docs/results.md) and by training exports (each bundle's
manifest carries its card).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from sceneprint.cpmobile import parameter_count
from sceneprint.encoder import ClipEncoder, Encoder
from sceneprint.frontend import LogMelConfig
from sceneprint.yamnet import YAMNetEncoder, YAMNetFrontendConfig

CLIP_SECONDS = 5.0  # the service's window: one 5 s clip is one forward pass
WARMUP = 3
MATMUL_SIZE = 1024
MATMUL_REPEATS = 10


# --- MACs -----------------------------------------------------------------------------------------


def fft_macs(n_fft: int) -> float:
    """Real MACs of one real FFT of ``n_fft`` points: 2·n_fft·log2(n_fft).

    Convention: a real FFT of n_fft points is a complex FFT of n_fft/2 points, about (n_fft/2)·log2(n_fft/2)
    complex multiply-adds, each counted as 4 real MACs: 2·n_fft·log2(n_fft/2). Rounding log2(n_fft/2) up to
    log2(n_fft) adds 2·n_fft, about the cost of the twiddle pass that turns the half-size complex FFT into
    the real spectrum (n_fft/2 complex multiplies).
    """
    return 2.0 * n_fft * math.log2(n_fft)


def stft_logmel_macs_per_frame(*, n_fft: int, window: int, n_mels: int) -> float:
    """Real MACs of one log-mel frame: window multiply + FFT + power spectrum + mel matrix.

    Args:
        n_fft: FFT size (the frame is zero-padded to it).
        window: Window length in samples: only its non-zero taps are counted (torch.stft multiplies a
            window zero-padded to n_fft, a few hundred idle multiplies per frame that do not change the card).
        n_mels: Mel bands.

    Returns:
        window + 2·n_fft·log2(n_fft) + 2·bins + bins·n_mels, with bins = n_fft/2 + 1: |X|² is re² + im²
        (2 MACs per bin; YAMNet's square root is not a MAC), and the mel matrix is applied densely, as
        both front-ends do. The log and the affine normalisation (one op per mel value) are not counted.
    """
    bins = n_fft // 2 + 1
    return window + fft_macs(n_fft) + 2 * bins + bins * n_mels


def frontend_macs_per_second(config: LogMelConfig | YAMNetFrontendConfig) -> int:
    """Front-end MACs for one second of audio: MACs per frame × sample_rate / hop (frames per second).

    Raises:
        TypeError: For a front-end without an STFT + mel formula here (BEATs' fbank runs inside its network).
    """
    if isinstance(config, LogMelConfig):
        window, hop = config.win_length, config.hop_length
    elif isinstance(config, YAMNetFrontendConfig):
        window, hop = config.window_samples, config.hop_samples
    else:
        raise TypeError(f"no front-end MAC formula for {type(config).__name__}; "
                        "valid: LogMelConfig (cpmobile), YAMNetFrontendConfig (yamnet)")
    per_frame = stft_logmel_macs_per_frame(n_fft=config.n_fft, window=window, n_mels=config.n_mels)
    return round(per_frame * config.sample_rate / hop)


# --- timing ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Timing:
    n: int
    median_ms: float
    p90_ms: float


def timing(fn: Callable[[], object], repeats: int, warmup: int = WARMUP) -> Timing:
    """Median and p90 wall time of ``fn()`` over ``repeats`` calls after ``warmup`` untimed ones."""
    for _ in range(warmup):
        fn()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    p50, p90 = (float(v) for v in np.percentile(np.asarray(seconds) * 1000.0, [50, 90]))
    return Timing(n=repeats, median_ms=p50, p90_ms=p90)


@contextlib.contextmanager
def thread_count(threads: int) -> Iterator[None]:
    """Run the block with ``threads`` intra-op threads, then restore the caller's setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_matmul_gflops(threads: int, *, size: int = MATMUL_SIZE, repeats: int = MATMUL_REPEATS) -> float:
    """This machine's fp32 matmul rate with ``threads`` threads, in GFLOP/s (2 FLOPs per MAC), from the median."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
    with thread_count(threads), torch.inference_mode():
        t = timing(lambda: torch.matmul(a, b), repeats)
    return 2.0 * size**3 / (t.median_ms / 1000.0) / 1e9


def stages(encoder: ClipEncoder) -> tuple[Callable[[torch.Tensor], torch.Tensor], Callable[[torch.Tensor], object]]:
    """The front-end and the network of ``encoder.features`` as two calls: windows (W, N) -> features -> output.

    The split mirrors each architecture's ``features``; YAMNet's network runs on the patches as its
    ``patch_outputs`` does (embedding and logits both).
    """
    if isinstance(encoder, Encoder):
        return encoder.frontend, encoder.network.forward_features
    if isinstance(encoder, YAMNetEncoder):
        yamnet = encoder
        return yamnet.frontend.patches, lambda patches: yamnet.network(patches.flatten(0, 1))
    raise TypeError(f"no front-end/network split for {encoder.architecture!r}; valid: cpmobile, yamnet")


# --- the card -------------------------------------------------------------------------------------


def complexity_card(encoder: ClipEncoder, *, repeats: int = 30, threads: Sequence[int] = (1, 2),
                    matmul_gflops: Mapping[int, float] | None = None) -> dict[str, Any]:
    """Parameters, MACs per second of audio and CPU latency of one 5 s clip at batch 1 for ``encoder``.

    Args:
        encoder: A CP-Mobile or YAMNet clip encoder; its train/eval mode and torch's thread count are restored.
        repeats: Timed calls per figure, after a few untimed warm-up calls.
        threads: Intra-op thread counts to time with (``torch.set_num_threads``), one entry of ``cpu`` each.
        matmul_gflops: The machine's fp32 matmul rate per thread count, measured where missing; pass the
            same rates to every card of a run so that their floors are comparable.

    Returns:
        A JSON-ready dict: ``parameters`` (network only), ``frontend_macs_per_second`` (analytic, see
        ``stft_logmel_macs_per_frame``), ``network_macs_per_second`` (``encoder.macs_per_second()``),
        ``total_macs_per_second``, ``macs_per_clip`` (total × 5 s), and ``cpu``: per thread count the
        median/p90 ms of ``embed_clip`` (the service's path), of the front-end alone and of the network alone
        (on a precomputed front-end output), the matmul rate, ``floor_ms`` (2·macs_per_clip / rate) and
        ``latency_over_floor`` (``embed_clip`` median / floor).
    """
    frontend, network = stages(encoder)
    frontend_macs = frontend_macs_per_second(encoder.frontend_config)
    network_macs = encoder.macs_per_second()
    macs_per_clip = (frontend_macs + network_macs) * CLIP_SECONDS
    rate = encoder.sample_rate
    waveform = (0.1 * np.random.default_rng(0).standard_normal(round(CLIP_SECONDS * rate))).astype(np.float32)
    rates = dict(matmul_gflops or {})
    cpu: list[dict[str, Any]] = []
    was_training = encoder.training
    encoder.eval()  # the front-end and network calls below bypass embed_clip, which sets eval itself
    try:
        with torch.inference_mode():
            windows = encoder.windows(waveform)  # (1, N): a 5 s clip is one window
            features = frontend(windows)
        for n_threads in threads:
            gflops = rates[n_threads] if n_threads in rates else measure_matmul_gflops(n_threads)
            with thread_count(n_threads), torch.inference_mode():
                clip = timing(lambda: encoder.embed_clip(waveform), repeats)
                front = timing(lambda: frontend(windows), repeats)
                net = timing(lambda: network(features), repeats)
            floor_ms = 2.0 * macs_per_clip / (gflops * 1e9) * 1000.0
            cpu.append({"threads": n_threads, "embed_clip": asdict(clip), "frontend": asdict(front),
                        "network": asdict(net), "matmul_gflops": gflops, "floor_ms": floor_ms,
                        "latency_over_floor": clip.median_ms / floor_ms})
    finally:
        encoder.train(was_training)
    return {
        "architecture": encoder.architecture,
        "sample_rate": rate,
        "embedding_dim": encoder.embedding_dim,
        "parameters": parameter_count(encoder.network),
        "frontend_macs_per_second": frontend_macs,
        "network_macs_per_second": network_macs,
        "total_macs_per_second": frontend_macs + network_macs,
        "clip_seconds": CLIP_SECONDS,
        "macs_per_clip": macs_per_clip,
        "repeats": repeats,
        "cpu": cpu,
    }
