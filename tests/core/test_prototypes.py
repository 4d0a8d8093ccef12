"""Prototype math against small hand-computed cases."""

from __future__ import annotations

import numpy as np
import pytest

from sceneprint.prototypes import Match, cosine_scores, decide, l2_normalize, prototype


def test_prototype_is_the_renormalised_mean_of_normalised_embeddings() -> None:
    # Lengths must not matter: (10, 0) and (0, 1) weigh the same.
    p = prototype(np.array([[10.0, 0.0], [0.0, 1.0]]))
    np.testing.assert_allclose(p, [np.sqrt(0.5), np.sqrt(0.5)], rtol=1e-6)
    assert np.linalg.norm(p) == pytest.approx(1.0)


def test_prototype_refuses_no_embeddings() -> None:
    with pytest.raises(ValueError):
        prototype(np.zeros((0, 4)))


def test_cosine_scores_are_inner_products_of_unit_vectors() -> None:
    scores = cosine_scores(np.array([3.0, 4.0]), np.array([[1.0, 0.0], [0.0, 2.0], [-1.0, 0.0]]))
    np.testing.assert_allclose(scores, [0.6, 0.8, -0.6], rtol=1e-6)


def test_l2_normalize_leaves_zero_vectors_finite() -> None:
    assert np.isfinite(l2_normalize(np.zeros(3))).all()


def test_decide_reports_unknown_below_threshold() -> None:
    ranked = [Match("kitchen", 0.4), Match("street", 0.2)]
    d = decide(ranked, threshold=0.5)
    assert d.unknown and d.scene is None and d.score == 0.4 and d.top_k == ranked


def test_decide_names_the_best_scene_at_or_above_threshold() -> None:
    d = decide([Match("kitchen", 0.5)], threshold=0.5)
    assert not d.unknown and d.scene == "kitchen"


def test_decide_with_no_scenes_is_unknown_not_an_error() -> None:
    d = decide([], threshold=0.5)
    assert d.unknown and d.scene is None and d.top_k == []
