"""Prototype math, in one place: normalisation, prototypes, scores and the unknown decision.

A scene's prototype is the re-normalised mean of its clips' normalised embeddings; a query is scored
by cosine similarity (an inner product of unit vectors); below the threshold it is unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

_EPS = 1e-12


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Scale vectors to unit length along ``axis`` (float32)."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=axis, keepdims=True)
    return (x / np.maximum(norm, _EPS)).astype(np.float32)


def mean_direction(embeddings: np.ndarray) -> np.ndarray:
    """The re-normalised mean of normalised vectors.

    Args:
        embeddings: (N, D) vectors; each is normalised first, so none dominates by its length.

    Returns:
        (D,) unit vector.
    """
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2 or embeddings.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, D) array, got shape {embeddings.shape}")
    return l2_normalize(l2_normalize(embeddings).mean(axis=0))


def prototype(clip_embeddings: np.ndarray) -> np.ndarray:
    """A scene's prototype from its clips' embeddings (N, D) -> (D,)."""
    return mean_direction(clip_embeddings)


def cosine_scores(query: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Cosine similarity of one query (D,) to each of M prototypes (M, D) -> (M,)."""
    return l2_normalize(prototypes) @ l2_normalize(query)


@dataclass(frozen=True)
class Match:
    scene: str
    score: float


@dataclass(frozen=True)
class Decision:
    """The outcome of classifying one clip."""

    scene: str | None  # None when unknown
    score: float  # best score, or 0.0 with no scenes at all
    unknown: bool
    top_k: list[Match]


def decide(ranked: Sequence[Match], threshold: float) -> Decision:
    """Turn matches ranked by descending score into a decision.

    Args:
        ranked: Matches, best first (may be empty when no scene is enrolled).
        threshold: Cosine score below which the best match is reported as unknown.

    Returns:
        The decision; ``scene`` is None when unknown.
    """
    if not ranked:
        return Decision(scene=None, score=0.0, unknown=True, top_k=[])
    best = ranked[0]
    unknown = best.score < threshold
    return Decision(scene=None if unknown else best.scene, score=best.score, unknown=unknown,
                    top_k=list(ranked))
