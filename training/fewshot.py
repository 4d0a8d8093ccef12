"""Few-shot evaluation: N-way K-shot episodes with supports and queries from different recordings.

Each episode picks ``n_way`` classes; for each, ``k_shot`` support clips are drawn from a random set
of recordings, and queries only from that class's other recordings. A query is assigned to the
nearest prototype (``sceneprint.prototypes``), the same rule the service applies.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from sceneprint.prototypes import l2_normalize, prototype

Probe = Literal["prototype", "logreg"]
PROBES: tuple[str, ...] = ("prototype", "logreg")


@dataclass(frozen=True)
class FewShotResult:
    probe: str
    n_way: int
    k_shot: int
    episodes: int
    queries_per_class: int
    accuracy: float  # mean over episodes
    ci95: float  # half-width of the 95% confidence interval over episodes

    def as_dict(self) -> dict[str, float | int | str]:
        return {"probe": self.probe, "n_way": self.n_way, "k_shot": self.k_shot, "episodes": self.episodes,
                "queries_per_class": self.queries_per_class, "accuracy": round(self.accuracy, 4),
                "ci95": round(self.ci95, 4)}


def sample_episode(
    labels: Sequence[str], sources: Sequence[str], rng: np.random.Generator, *, n_way: int, k_shot: int,
    queries_per_class: int,
) -> list[tuple[str, list[int], list[int]]]:
    """One episode: for each of ``n_way`` classes, (class, support indices, query indices).

    Supports come from whole recordings drawn at random until ``k_shot`` clips are collected; queries
    are drawn from the class's clips of other recordings only.
    """
    by_class: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    for i, (label, source) in enumerate(zip(labels, sources, strict=True)):
        by_class[label][source].append(i)
    classes = sorted(by_class)
    if len(classes) < n_way:
        raise ValueError(f"{len(classes)} classes, fewer than n_way={n_way}")
    episode = []
    for label in rng.choice(classes, size=n_way, replace=False):
        recordings = list(by_class[label].items())
        order = rng.permutation(len(recordings))
        support: list[int] = []
        used = 0
        while len(support) < k_shot and used < len(order):
            support.extend(recordings[order[used]][1])
            used += 1
        support = [int(i) for i in rng.permutation(support)[:k_shot]]
        pool = [i for j in order[used:] for i in recordings[j][1]]
        if len(support) < k_shot or not pool:
            raise ValueError(f"class {label!r} has too few recordings for {k_shot}-shot episodes")
        query = [int(i) for i in rng.choice(pool, size=min(queries_per_class, len(pool)), replace=False)]
        episode.append((str(label), support, query))
    return episode


def evaluate(
    embeddings: np.ndarray, labels: Sequence[str], sources: Sequence[str], *, n_way: int = 5, k_shot: int = 5,
    queries_per_class: int = 15, episodes: int = 1000, seed: int = 0, probe: Probe = "prototype",
) -> FewShotResult:
    """Mean accuracy over random episodes, classified by ``probe``.

    ``prototype`` is the service's rule (cosine to the re-normalised mean of the supports' unit
    vectors); ``logreg`` is the paper's linear probe (logistic regression fitted on each episode's
    supports, standardised by their statistics). The same seed gives the same episodes for both.

    Args:
        embeddings: (N, D) clip embeddings: for ``prototype`` they are normalised here; for ``logreg``
            pass the embeddings before normalisation.
        labels: Class of each clip.
        sources: Recording id of each clip (supports and queries never share one).
        n_way: Classes per episode.
        k_shot: Support clips per class.
        queries_per_class: Queries per class per episode (fewer where a class has fewer clips left).
        episodes: Number of episodes.
        seed: Seed of the episode sampler, so different models meet the same episodes.
        probe: ``prototype`` or ``logreg``.

    Returns:
        Accuracy with a 95% confidence interval.
    """
    if probe not in PROBES:
        raise ValueError(f"probe must be one of {PROBES}, not {probe!r}")
    emb = l2_normalize(embeddings) if probe == "prototype" else np.asarray(embeddings, dtype=np.float64)
    rng = np.random.default_rng(seed)
    accs = []
    for _ in range(episodes):
        episode = sample_episode(labels, sources, rng, n_way=n_way, k_shot=k_shot,
                                 queries_per_class=queries_per_class)
        queries = np.concatenate([q for _, _, q in episode])
        truth = np.concatenate([np.full(len(q), c) for c, (_, _, q) in enumerate(episode)])
        if probe == "prototype":
            protos = np.stack([prototype(emb[s]) for _, s, _ in episode])  # (n_way, D)
            pred = (emb[queries] @ protos.T).argmax(axis=1)
        else:
            pred = logreg_predict(emb, episode, queries)
        accs.append(float((pred == truth).mean()))
    a = np.asarray(accs)
    ci95 = float(1.96 * a.std(ddof=1) / math.sqrt(len(a)))
    return FewShotResult(probe=probe, n_way=n_way, k_shot=k_shot, episodes=episodes,
                         queries_per_class=queries_per_class, accuracy=float(a.mean()), ci95=ci95)


def logreg_predict(emb: np.ndarray, episode: list[tuple[str, list[int], list[int]]], queries: np.ndarray) -> np.ndarray:
    """Class index per query from logistic regression fitted on the episode's supports."""
    from sklearn.linear_model import LogisticRegression

    support = np.concatenate([s for _, s, _ in episode])
    y = np.concatenate([np.full(len(s), c) for c, (_, s, _) in enumerate(episode)])
    mean, std = emb[support].mean(axis=0), emb[support].std(axis=0) + 1e-6
    model = LogisticRegression(max_iter=1000).fit((emb[support] - mean) / std, y)
    return np.asarray(model.predict((emb[queries] - mean) / std))


def logmel_statistics(logmels: np.ndarray) -> np.ndarray:
    """The baseline embedding: per-band mean and std of a clip's log-mel (N, F, T) -> (N, 2F), standardised."""
    x = logmels.astype(np.float32)
    feats = np.concatenate([x.mean(axis=2), x.std(axis=2)], axis=1)
    return (feats - feats.mean(axis=0)) / (feats.std(axis=0) + 1e-6)


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """The probability that a positive outscores a negative, ties counting half (Mann-Whitney U)."""
    from scipy.stats import rankdata

    ranks = rankdata(np.concatenate([positive, negative]))  # average ranks for ties
    n, m = len(positive), len(negative)
    return float((ranks[:n].sum() - n * (n + 1) / 2) / (n * m))


@dataclass(frozen=True)
class OpenSetResult:
    n_way: int
    k_shot: int
    episodes: int
    auroc: float  # known-vs-unknown separability of the best prototype score
    threshold: float  # the score threshold with the best balanced accuracy
    known_accepted: float  # share of enrolled-class queries at or above the threshold
    unknown_rejected: float  # share of other-class queries below the threshold

    def as_dict(self) -> dict[str, float | int]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in self.__dict__.items()}


def open_set(
    embeddings: np.ndarray, labels: Sequence[str], sources: Sequence[str], *, n_way: int = 5, k_shot: int = 5,
    queries_per_class: int = 15, episodes: int = 500, seed: int = 0,
) -> OpenSetResult:
    """How well the best prototype score tells enrolled scenes from scenes never enrolled.

    Each episode enrolls ``n_way`` classes; queries come from those classes (known) and from
    ``n_way`` other classes (unknown), never from a support recording. The threshold chosen is the one
    that maximises balanced accuracy over all episodes: the service's unknown threshold.
    """
    emb = l2_normalize(embeddings)
    rng = np.random.default_rng(seed)
    known: list[float] = []
    unknown: list[float] = []
    for _ in range(episodes):
        episode = sample_episode(labels, sources, rng, n_way=2 * n_way, k_shot=k_shot,
                                 queries_per_class=queries_per_class)
        enrolled, others = episode[:n_way], episode[n_way:]
        protos = np.stack([prototype(emb[s]) for _, s, _ in enrolled])  # (n_way, D)
        for group, out in ((enrolled, known), (others, unknown)):
            for _, _, query in group:
                out.extend((emb[query] @ protos.T).max(axis=1).tolist())
    k, u = np.asarray(known), np.asarray(unknown)
    candidates = np.unique(np.concatenate([k, u]))
    balanced = [((k >= t).mean() + (u < t).mean()) / 2 for t in candidates]
    best = float(candidates[int(np.argmax(balanced))])
    return OpenSetResult(n_way=n_way, k_shot=k_shot, episodes=episodes, auroc=auroc(k, u), threshold=best,
                         known_accepted=float((k >= best).mean()), unknown_rejected=float((u < best).mean()))
