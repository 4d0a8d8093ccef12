"""Calibration of enrollment bounds and the decision rules' comparison, on embeddings made by hand."""

from __future__ import annotations

import numpy as np
import pytest

from sceneprint.prototypes import l2_normalize
from sceneprint.training.calibration import best_rule, calibrate, compare_rules, genuine_enrollments, rule_scores


def clustered(n_classes: int = 12, recordings: int = 6, per_recording: int = 2, spread: float = 0.35,
              seed: int = 0) -> tuple[np.ndarray, list[str], list[str]]:
    """Unit embeddings of classes around random centres; every class has its own tightness."""
    rng = np.random.default_rng(seed)
    emb, labels, sources = [], [], []
    for c in range(n_classes):
        centre = rng.standard_normal(16)
        tight = spread * (0.5 + c / n_classes)
        for r in range(recordings):
            for _ in range(per_recording):
                emb.append(centre / np.linalg.norm(centre) + tight * rng.standard_normal(16) / 4)
                labels.append(f"c{c}")
                sources.append(f"c{c}-r{r}")
    return l2_normalize(np.stack(emb)), labels, sources


def test_bounds_are_the_quantiles_of_genuine_enrollments() -> None:
    emb, labels, sources = clustered()
    lowest, cohesion = genuine_enrollments(emb, labels, sources, shots=5, count=400, seed=0)
    cal, figures = calibrate(emb, labels, sources, unknown_threshold=0.5, enrollments=400, episodes=40,
                             false_refusal=0.05)
    assert cal.min_clip_similarity == pytest.approx(np.quantile(lowest, 0.05), abs=1e-4)
    assert cal.min_cohesion == pytest.approx(np.quantile(cohesion, 0.05), abs=1e-4)
    # About 5% of genuine enrollments have a clip below the clip bound.
    assert (lowest < cal.min_clip_similarity).mean() == pytest.approx(0.05, abs=0.01)
    assert figures["genuine_lowest_clip_similarity"]["p5"] == cal.min_clip_similarity
    assert cal.rule in ("global", "per_scene") and (cal.rule == "per_scene") == (cal.slope != 0.0)


def test_an_intruder_falls_below_the_clip_bound() -> None:
    emb, labels, sources = clustered(spread=0.2)
    cal, _ = calibrate(emb, labels, sources, unknown_threshold=0.5, enrollments=300, episodes=20)
    from sceneprint.prototypes import leave_one_out

    kitchen = emb[[i for i, c in enumerate(labels) if c == "c0"][::2][:5]]  # five recordings of the tightest class
    intruder = emb[next(i for i, c in enumerate(labels) if c == "c5")]
    assert leave_one_out(kitchen).min() >= cal.min_clip_similarity
    assert leave_one_out(np.vstack([kitchen[:4], intruder]))[-1] < cal.min_clip_similarity


def test_compare_rules_on_a_hand_made_case() -> None:
    # Four known queries (three nearest-right) and four never-enrolled ones.
    q = {"known": np.array([1, 1, 1, 1, 0, 0, 0, 0], bool), "correct": np.array([1, 1, 1, 0, 0, 0, 0, 0], bool),
         "s1": np.array([0.9, 0.8, 0.6, 0.7, 0.85, 0.5, 0.4, 0.3]),
         "s2": np.array([0.1, 0.2, 0.55, 0.6, 0.8, 0.38, 0.36, 0.22]),
         "cohesion": np.array([0.9, 0.9, 0.5, 0.5, 0.9, 0.5, 0.5, 0.5])}
    out = compare_rules(q, threshold=0.75, slope=0.0, reference_cohesion=0.7)
    assert out["false_accept_rate"] == 0.25 and out["nearest_accuracy"] == 0.75
    assert out["named_accuracy_at_threshold"] == 0.5  # 0.9 and 0.8 pass 0.75; 0.6 (right) does not
    # One false accept allowed: the global rule may go down to just above 0.5 and then names 0.6 as well.
    assert out["rules"]["global"]["named_accuracy"] == 0.75
    # Margins: known 0.8, 0.6, 0.05, 0.1 (the last one wrong); never-enrolled 0.05, 0.12, 0.04, 0.08: above 0.08.
    assert out["rules"]["margin"]["named_accuracy"] == 0.5
    assert out["rules"]["global"]["auroc"] == pytest.approx(13 / 16)
    assert best_rule(out) == "global"
    # Slope 1 lowers the bar of loose scenes (cohesion 0.5) and raises that of tight ones: scores 0.7, 0.6, 0.8,
    # 0.9 (known) against 0.65, 0.7, 0.6, 0.5: above 0.65 it names 0.7 and 0.8 (right) but not 0.6.
    out = compare_rules(q, threshold=0.75, slope=1.0, reference_cohesion=0.7)
    assert out["rules"]["per_scene"]["named_accuracy"] == 0.5 and out["rules"]["global"]["named_accuracy"] == 0.75


def test_rule_scores_keep_supports_and_queries_apart() -> None:
    emb, labels, sources = clustered()
    q = rule_scores(emb, labels, sources, n_way=3, shots=5, episodes=5, seed=0)
    # Each class: 6 recordings of 2 clips; 5 supports take 3 recordings, so 6 clips of 3 others are queries.
    assert q["known"].sum() == 5 * 3 * 6 and (~q["known"]).sum() == 5 * 3 * 6
    assert set(np.unique(q["correct"][~q["known"]])) == {False}  # a never-enrolled query is never "right"


def test_check_rates_count_refused_genuine_and_intruded_enrollments() -> None:
    from sceneprint.prototypes import EnrollmentCalibration
    from sceneprint.training.calibration import check_rates

    emb, labels, sources = clustered(spread=0.2)
    never = EnrollmentCalibration(min_clip_similarity=-1.0, min_cohesion=-1.0)
    always = EnrollmentCalibration(min_clip_similarity=1.1, min_cohesion=-1.0)
    assert check_rates(emb, labels, sources, never, count=50) == {"genuine_refused": 0.0, "intruder_refused": 0.0,
                                                                 "enrollments": 50}
    assert check_rates(emb, labels, sources, always, count=50)["genuine_refused"] == 1.0
    cal, _ = calibrate(emb, labels, sources, unknown_threshold=0.5, enrollments=300, episodes=20, false_refusal=0.01)
    rates = check_rates(emb, labels, sources, cal, count=200)
    assert rates["genuine_refused"] <= 0.05 and rates["intruder_refused"] >= 0.9  # well-separated classes
