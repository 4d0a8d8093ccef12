"""Prototype math, in one place: normalisation, prototypes, scores and the unknown decision.

A scene's prototype is the re-normalised mean of its clips' normalised embeddings; a query is scored
by cosine similarity (an inner product of unit vectors); below the threshold it is unknown.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

_EPS = 1e-12
# Where a decision's threshold came from: a request's, a scene's hand-set one, a scene's own from its
# enrollment (the per-scene rule), or the global one.
ThresholdSource = Literal["request", "scene", "per_scene", "global"]
SceneThresholdSource = Literal["scene", "per_scene"]


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
    """A scene's prototype from its clips' embeddings (N, D) -> (D,).

    Raises:
        ValueError: An embedding or the prototype is not finite: nothing non-finite is ever stored.
    """
    proto = mean_direction(clip_embeddings)
    if not (np.isfinite(clip_embeddings).all() and np.isfinite(proto).all()):
        raise ValueError("a prototype of non-finite embeddings")
    return proto


def cosine_scores(query: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Cosine similarity of one query (D,) to each of M prototypes (M, D) -> (M,)."""
    return l2_normalize(prototypes) @ l2_normalize(query)


@dataclass(frozen=True)
class Match:
    scene: str
    score: float
    threshold: float | None = None  # the scene's own acceptance threshold, where it has one
    threshold_source: SceneThresholdSource | None = None  # "scene" (set by hand) or "per_scene" (its enrollment's)


@dataclass(frozen=True)
class Decision:
    """The outcome of classifying one clip."""

    scene: str | None  # None when unknown
    score: float  # best score, or 0.0 with no scenes at all
    unknown: bool
    top_k: list[Match]
    threshold: float  # the threshold the best score was held against
    threshold_source: ThresholdSource


def decide(ranked: Sequence[Match], threshold: float, *, override: float | None = None) -> Decision:
    """Turn matches ranked by descending score into a decision.

    Args:
        ranked: Matches, best first (may be empty when no scene is enrolled).
        threshold: The global threshold: cosine score below which the best match is unknown.
        override: A threshold for this decision only (a request's); else the best match's own threshold
            (``Match.threshold``) where it has one; else ``threshold``.

    Returns:
        The decision; ``scene`` is None when unknown.
    """
    used = threshold
    source: ThresholdSource = "global"
    if override is not None:
        used, source = override, "request"
    elif ranked and ranked[0].threshold is not None:
        used, source = float(ranked[0].threshold), ranked[0].threshold_source or "scene"
    if not ranked:
        return Decision(scene=None, score=0.0, unknown=True, top_k=[], threshold=used, threshold_source=source)
    best = ranked[0]
    unknown = best.score < used
    return Decision(scene=None if unknown else best.scene, score=best.score, unknown=unknown,
                    top_k=list(ranked), threshold=used, threshold_source=source)


# --- enrollment quality and per-scene thresholds ---------------------------------------------------

DecisionRule = Literal["global", "per_scene"]
DECISION_RULES: tuple[str, ...] = ("global", "per_scene")


@dataclass(frozen=True)
class EnrollmentCalibration:
    """What a bundle knows about enrollments of its own embeddings, calibrated on its training classes.

    ``min_clip_similarity``: a clip whose leave-one-out similarity (cosine to the prototype of the scene's
    other clips) is below this is an outlier. ``min_cohesion``: a scene whose clips' mean leave-one-out
    similarity is below this is incoherent. Both are ``false_refusal`` quantiles over genuine enrollments
    (clips of one class from different recordings) of their lowest clip similarity and of their cohesion.
    ``rule``: how a scene's acceptance threshold follows from its enrollment: ``global`` (the unknown
    threshold for every scene) or ``per_scene`` (``unknown_threshold + slope * (cohesion - reference_cohesion)``).
    """

    min_clip_similarity: float
    min_cohesion: float
    rule: DecisionRule = "global"
    slope: float = 0.0
    reference_cohesion: float = 0.0
    false_refusal: float = 0.005
    source: str = ""


@dataclass(frozen=True)
class EnrollmentQuality:
    """How well a scene's clips agree: per clip, its leave-one-out similarity; their mean and spread."""

    similarities: tuple[float, ...]  # per clip, in the clips' order; empty for a single clip
    cohesion: float | None  # mean of ``similarities`` (None for a single clip)
    spread: float | None  # their standard deviation

    def outliers(self, min_similarity: float) -> list[int]:
        """Indices of the clips below ``min_similarity``."""
        return [i for i, s in enumerate(self.similarities) if s < min_similarity]


def leave_one_out(clip_embeddings: np.ndarray) -> np.ndarray:
    """(N,) cosine of each clip to the prototype of the other N - 1 clips (N >= 2)."""
    emb = l2_normalize(np.asarray(clip_embeddings, dtype=np.float32))
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"leave-one-out needs at least two clips, got shape {emb.shape}")
    total = emb.sum(axis=0)
    others = l2_normalize(total[None, :] - emb)  # (N, D): the prototype of all clips but one
    return np.einsum("nd,nd->n", emb, others).astype(np.float32)


def enrollment_quality(clip_embeddings: np.ndarray) -> EnrollmentQuality:
    """The leave-one-out similarities of a scene's clips, their mean (cohesion) and spread."""
    if len(clip_embeddings) < 2:
        return EnrollmentQuality(similarities=(), cohesion=None, spread=None)
    sims = leave_one_out(clip_embeddings)
    return EnrollmentQuality(similarities=tuple(round(float(s), 4) for s in sims),
                             cohesion=round(float(sims.mean()), 4), spread=round(float(sims.std()), 4))


def per_scene_threshold(cohesion: float, unknown_threshold: float, *, slope: float, reference_cohesion: float
                        ) -> float:
    """The ``per_scene`` rule: the global threshold moved by ``slope`` times the scene's cohesion's distance
    from the reference (the median genuine enrollment's), clipped to 0..1."""
    return float(min(1.0, max(0.0, unknown_threshold + slope * (cohesion - reference_cohesion))))
