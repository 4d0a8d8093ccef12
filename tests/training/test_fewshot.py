"""Few-shot episodes: supports and queries never share a recording; accuracy is computed right."""

from __future__ import annotations

import numpy as np
import pytest

from sceneprint.training.fewshot import evaluate, logmel_statistics, sample_episode


def toy_set(n_classes: int = 6, recordings: int = 8, clips_per_recording: int = 2) -> tuple[list[str], list[str]]:
    labels, sources = [], []
    for c in range(n_classes):
        for r in range(recordings):
            for _ in range(clips_per_recording):
                labels.append(f"class{c}")
                sources.append(f"rec{c}-{r}")
    return labels, sources


def test_supports_and_queries_come_from_different_recordings() -> None:
    labels, sources = toy_set()
    rng = np.random.default_rng(0)
    for _ in range(50):
        for label, support, query in sample_episode(labels, sources, rng, n_way=5, k_shot=5, queries_per_class=15):
            assert len(support) == 5 and query
            assert {sources[i] for i in support}.isdisjoint({sources[i] for i in query})
            assert {labels[i] for i in support + query} == {label}


def test_perfectly_separated_embeddings_score_one_and_random_ones_near_chance() -> None:
    labels, sources = toy_set()
    classes = sorted(set(labels))
    onehot = np.eye(len(classes))[[classes.index(label) for label in labels]]
    assert evaluate(onehot, labels, sources, episodes=50).accuracy == 1.0
    noise = np.random.default_rng(1).standard_normal((len(labels), 64))
    assert evaluate(noise, labels, sources, episodes=200).accuracy == pytest.approx(0.2, abs=0.05)


def test_a_class_with_too_few_recordings_is_an_error() -> None:
    labels, sources = toy_set(recordings=1, clips_per_recording=6)
    with pytest.raises(ValueError, match="too few recordings"):
        sample_episode(labels, sources, np.random.default_rng(0), n_way=5, k_shot=5, queries_per_class=5)


def test_logmel_statistics_is_mean_and_std_per_band() -> None:
    x = np.random.default_rng(0).standard_normal((4, 3, 10)).astype(np.float32)
    feats = logmel_statistics(x)
    assert feats.shape == (4, 6)
    np.testing.assert_allclose(feats.mean(axis=0), 0, atol=1e-5)
