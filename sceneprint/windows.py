"""How a clip longer than the encoder's window is cut into windows and its window embeddings aggregated.

Numpy only: the torch encoder (``ClipEncoder.embed_clip``, training and evaluation) and the ONNX
Runtime encoder the service runs (``sceneprint.runtime``) both call these two functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sceneprint.audio import NonFinite
from sceneprint.prototypes import mean_direction


@dataclass(frozen=True)
class WindowConfig:
    """Audio longer than ``window_seconds`` is embedded over windows ``hop_seconds`` apart."""

    window_seconds: float = 5.0
    hop_seconds: float = 2.5


def cut_windows(waveform: np.ndarray, sample_rate: int, window: WindowConfig) -> np.ndarray:
    """Cut a mono waveform (N,) into windows (W, L); the last window ends at the clip's end.

    A clip no longer than one window is one window of its own length (embedded whole).
    """
    x = np.ascontiguousarray(waveform, dtype=np.float32)
    size = round(window.window_seconds * sample_rate)
    hop = round(window.hop_seconds * sample_rate)
    if len(x) <= size:
        return x[None]  # (1, N)
    starts = list(range(0, len(x) - size + 1, hop))
    if starts[-1] + size < len(x):
        starts.append(len(x) - size)
    return np.stack([x[s:s + size] for s in starts])  # (W, L)


def aggregate_windows(window_features: np.ndarray) -> np.ndarray:
    """A clip's embedding from its windows' embeddings (W, D) -> (D,): the re-normalised mean of unit vectors.

    Raises:
        NonFinite: A window's embedding is not finite or has no direction (zero length), or the mean has
            none: every encoder's clip embedding passes here, so nothing non-finite leaves an encoder.
    """
    x = np.asarray(window_features)
    norms = np.linalg.norm(x, axis=-1) if x.size else np.zeros(0)
    if not (np.isfinite(x).all() and np.isfinite(norms).all() and (norms > 0).all() and len(norms)):
        raise NonFinite("the clip's embedding is not finite")
    out = mean_direction(x)
    if not (np.isfinite(out).all() and np.linalg.norm(out) > 0.5):
        raise NonFinite("the clip's embedding is not finite")
    return out
