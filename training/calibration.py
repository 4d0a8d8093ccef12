"""Calibrate a bundle's enrollment checks and per-scene decision rule on the training classes; compare rules.

Genuine enrollments (``shots`` clips of one training class from different recordings) give the
distribution of their lowest leave-one-out similarity and of their cohesion; the ``false_refusal``
quantiles are the bounds below which the service refuses a clip or a scene (``sceneprint.prototypes``),
so that about ``false_refusal`` of genuine enrollments meet each bound's refusal.
Open-set episodes compare the decision rules on the same queries: the global threshold, per-scene
thresholds that follow the scene's cohesion, and a margin rule (best minus second best).

    sceneprint bundle calibrate models/sceneprint-default --data ../shared/data/sceneprint-dev --split fewshot-v1
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from sceneprint.config import to_dict
from sceneprint.manifest import MANIFEST, Manifest, read_manifest_json, write_json_atomic
from sceneprint.prototypes import EnrollmentCalibration, l2_normalize, leave_one_out, prototype
from sceneprint.training.fewshot import auroc, sample_episode

SLOPES = (-1.0, -0.5, -0.25, 0.0, 0.25, 0.5, 1.0)


def genuine_enrollments(unit: np.ndarray, labels: Sequence[str], sources: Sequence[str], *, shots: int,
                        count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per enrollment, of ``count`` enrollments of ``shots`` clips of one class from different recordings: the
    lowest leave-one-out similarity of its clips, and its cohesion (their mean)."""
    rng = np.random.default_rng(seed)
    ways = min(5, len(set(labels)))
    lowest: list[float] = []
    cohesion: list[float] = []
    while len(cohesion) < count:
        for _, support, _ in sample_episode(labels, sources, rng, n_way=ways, k_shot=shots, queries_per_class=1):
            s = leave_one_out(unit[support])
            lowest.append(float(s.min()))
            cohesion.append(float(s.mean()))
    return np.asarray(lowest[:count]), np.asarray(cohesion[:count])


def check_rates(unit: np.ndarray, labels: Sequence[str], sources: Sequence[str], calibration: EnrollmentCalibration,
                *, shots: int = 5, count: int = 2000, seed: int = 0) -> dict[str, float]:
    """How the enrollment checks fare on these clips: the share of genuine enrollments refused, and the share of
    enrollments with one intruder (a clip of another class in place of one of the ``shots``) refused."""
    lowest, cohesion = genuine_enrollments(unit, labels, sources, shots=shots, count=count, seed=seed)
    refused = (lowest < calibration.min_clip_similarity) | (cohesion < calibration.min_cohesion)
    rng = np.random.default_rng(seed + 1)
    caught: list[bool] = []
    while len(caught) < count:
        (_, support, _), (_, other, _) = sample_episode(labels, sources, rng, n_way=2, k_shot=shots,
                                                        queries_per_class=1)
        sims = leave_one_out(np.vstack([unit[support[1:]], unit[other[:1]]]))
        caught.append(bool(sims[-1] < calibration.min_clip_similarity or sims.mean() < calibration.min_cohesion))
    return {"genuine_refused": round(float(refused.mean()), 4), "intruder_refused": round(float(np.mean(caught)), 4),
            "enrollments": count}


def rule_scores(unit: np.ndarray, labels: Sequence[str], sources: Sequence[str], *, n_way: int, shots: int,
                episodes: int, seed: int) -> dict[str, np.ndarray]:
    """Per query of ``episodes`` open-set episodes (``n_way`` enrolled and ``n_way`` never-enrolled classes,
    queries never from a support recording): whether its class is enrolled, whether the nearest scene is its
    class, the best and second-best scores, and the best scene's cohesion."""
    emb = l2_normalize(unit)
    rng = np.random.default_rng(seed)
    rows: list[tuple[float, float, float, float, float]] = []
    for _ in range(episodes):
        episode = sample_episode(labels, sources, rng, n_way=2 * n_way, k_shot=shots, queries_per_class=15)
        enrolled = episode[:n_way]
        protos = np.stack([prototype(emb[s]) for _, s, _ in enrolled])
        cohesion = np.array([leave_one_out(emb[s]).mean() for _, s, _ in enrolled])
        for k, (_, _, query) in enumerate(episode):
            scores = emb[query] @ protos.T  # (Q, n_way)
            order = np.argsort(-scores, axis=1)
            for q in range(len(query)):
                best, second = order[q, 0], order[q, 1]
                rows.append((float(k < n_way), float(best == k), scores[q, best], scores[q, second],
                             cohesion[best]))
    known, correct, s1, s2, coh = np.asarray(rows).T
    return {"known": known.astype(bool), "correct": correct.astype(bool), "s1": s1, "s2": s2, "cohesion": coh}


def compare_rules(q: dict[str, np.ndarray], *, threshold: float, slope: float, reference_cohesion: float
                  ) -> dict[str, Any]:
    """Each rule's named accuracy (enrolled-class queries named correctly) at the false-accept rate that
    the global ``threshold`` has on never-enrolled queries, its open-set AUROC, and the nearest-scene accuracy."""
    known, correct = q["known"], q["correct"]
    far = float((q["s1"][~known] >= threshold).mean())
    nearest = float(correct[known].mean())
    scores = {
        "global": q["s1"],
        "per_scene": q["s1"] - slope * (q["cohesion"] - reference_cohesion),
        "margin": q["s1"] - q["s2"],
    }
    rules: dict[str, Any] = {}
    n_unknown = int((~known).sum())
    allowed = int(np.floor(far * n_unknown + 1e-9))  # false accepts the global threshold makes here
    for name, score in scores.items():
        # Each rule at its most permissive threshold that accepts no more never-enrolled queries than the
        # global threshold does: above the (allowed + 1)-th best never-enrolled score.
        worst = np.sort(score[~known])[::-1]
        accepted = score > worst[allowed] if allowed < n_unknown else np.ones_like(score, dtype=bool)
        named = float((correct & accepted)[known].mean())
        rules[name] = {"named_accuracy": round(named, 4), "auroc": round(auroc(score[known], score[~known]), 4),
                       "gap_to_nearest": round(nearest - named, 4)}
    rules["per_scene"]["slope"] = slope
    named_in_force = float((correct & (q["s1"] >= threshold))[known].mean())
    return {"nearest_accuracy": round(nearest, 4), "false_accept_rate": round(far, 4),
            "global_threshold": round(threshold, 4), "named_accuracy_at_threshold": round(named_in_force, 4),
            "rules": rules}


def per_scene_sweep(q: dict[str, np.ndarray], *, threshold: float, reference_cohesion: float) -> dict[str, float]:
    """The per-scene rule's named accuracy for every slope of ``SLOPES`` (0 is the global threshold)."""
    return {f"{s:g}": compare_rules(q, threshold=threshold, slope=s, reference_cohesion=reference_cohesion)
            ["rules"]["per_scene"]["named_accuracy"] for s in SLOPES}


def best_rule(comparison: dict[str, Any]) -> str:
    """The rule with the highest named accuracy; the global one unless another beats it by half a point."""
    rules = comparison["rules"]
    best = max(rules, key=lambda r: rules[r]["named_accuracy"])
    return best if rules[best]["named_accuracy"] > rules["global"]["named_accuracy"] + 0.005 else "global"


def calibrate(unit: np.ndarray, labels: Sequence[str], sources: Sequence[str], *, unknown_threshold: float,
              shots: int = 5, false_refusal: float = 0.005, enrollments: int = 5000, episodes: int = 300,
              seed: int = 0, source: str = "") -> tuple[EnrollmentCalibration, dict[str, Any]]:
    """Bounds and rule from clips of the training classes (never the classes a model is evaluated on).

    The per-scene slope is the one (of ``SLOPES``) with the best named accuracy on training-class open-set
    episodes at the global threshold's false-accept rate; the rule is ``per_scene`` only where that beats the
    global threshold there. The margin rule is compared but never chosen automatically (it has no threshold a
    scene can carry). Returns the calibration and the figures it was chosen on.
    """
    lowest, cohesion = genuine_enrollments(unit, labels, sources, shots=shots, count=enrollments, seed=seed)
    reference = float(np.median(cohesion))
    q = rule_scores(unit, labels, sources, n_way=min(5, len(set(labels)) // 2), shots=shots, episodes=episodes,
                    seed=seed + 1)
    trials = {s: compare_rules(q, threshold=unknown_threshold, slope=s, reference_cohesion=reference)
              for s in SLOPES}
    slope = max(SLOPES, key=lambda s: (trials[s]["rules"]["per_scene"]["named_accuracy"], -abs(s)))
    comparison = trials[slope]
    per_scene_wins = (comparison["rules"]["per_scene"]["named_accuracy"]
                      > comparison["rules"]["global"]["named_accuracy"] + 0.005)
    calibration = EnrollmentCalibration(
        min_clip_similarity=round(float(np.quantile(lowest, false_refusal)), 4),
        min_cohesion=round(float(np.quantile(cohesion, false_refusal)), 4),
        rule="per_scene" if per_scene_wins else "global", slope=slope if per_scene_wins else 0.0,
        reference_cohesion=round(reference, 4), false_refusal=false_refusal, source=source)
    figures = {"genuine_lowest_clip_similarity": _quantiles(lowest), "genuine_cohesion": _quantiles(cohesion),
               "rules_on_training_classes": comparison}
    return calibration, figures


def _quantiles(x: np.ndarray) -> dict[str, float]:
    return {f"p{int(p * 100)}": round(float(np.quantile(x, p)), 4) for p in (0.01, 0.05, 0.5)}


def calibrate_bundle(bundle: Path, data: Path, *, split: str, layout: str = "auto", false_refusal: float = 0.005,
                     seed: int = 0) -> Manifest:
    """Embed the split's training-class clips through the bundle's graph, calibrate, write the manifest."""
    from sceneprint.runtime import load_onnx_encoder
    from sceneprint.training.datasets import read_dataset
    from sceneprint.training.evaluate import embed_dataset

    encoder = load_onnx_encoder(bundle)
    manifest = encoder.manifest
    if manifest.unknown_threshold is None:
        raise ValueError(f"{bundle}: the manifest has no unknown threshold to calibrate the rules around")
    train = set(json.loads((data / "splits" / f"{split}.json").read_text(encoding="utf-8"))["train_classes"])
    clips = [c for c in read_dataset(data, layout) if c.label in train]
    unit, _ = embed_dataset(encoder, clips)
    calibration, figures = calibrate(
        unit, [c.label for c in clips], [c.source_id for c in clips], unknown_threshold=manifest.unknown_threshold,
        false_refusal=false_refusal, seed=seed,
        source=f"{len(clips)} clips of the {len(train)} training classes of {data.name}/{split}")
    stored = read_manifest_json(bundle)
    evaluation = {**stored.get("evaluation", {}), "enrollment_calibration": figures}
    write_json_atomic(bundle / MANIFEST, {**stored, "calibration": to_dict(calibration), "evaluation": evaluation})
    return replace(manifest, calibration=calibration)
