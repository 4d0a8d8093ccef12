"""Evaluate any encoder bundle the way the product is used: few-shot episodes from decoded audio.

Embeddings are computed by the encoder's own window path on clips decoded by ``decode_clip`` (the
service's path), for any folder ``sceneprint.training.datasets`` reads (meta.csv, folder per class,
TAU 2022 Mobile, TUT 2017). Supports and queries always come from different recordings.

    sceneprint evaluate --bundle models/sceneprint-default --data ../shared/data/sceneprint-dev \\
        --split fewshot-v1 --json out.json
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sceneprint.audio import ClipLimits, decode_clip
from sceneprint.bundle import MANIFEST, load_bundle, read_manifest
from sceneprint.encoder import ClipEncoder
from sceneprint.frontend import LogMel, LogMelConfig
from sceneprint.prototypes import EnrollmentCalibration, l2_normalize
from sceneprint.runtime import OnnxEncoder, load_onnx_encoder
from sceneprint.training.calibration import best_rule, check_rates, compare_rules, per_scene_sweep, rule_scores
from sceneprint.training.data import ClipMeta, FewShotSplit, cached_logmels, decode_file, load_split
from sceneprint.training.datasets import LabelledClip, read_dataset
from sceneprint.training.fewshot import Probe, evaluate, logmel_statistics, open_set
from sceneprint.windows import aggregate_windows

PROTOCOL = ("episodes over the 10 held-out classes of splits/fewshot-v1.json; supports and queries from different "
            "recordings (source_id); 15 queries per class; nearest prototype by cosine; embeddings from decoded audio "
            "through the encoder's window path, as the service computes them; mean accuracy with 95% CI over episodes "
            "(seed 0)")
# Evaluation data may hold clips of any length a recording has.
EVAL_LIMITS = ClipLimits(min_seconds=0.1, max_seconds=600.0)
GRID_SHOTS = (1, 5, 10, 20)
PROBE_ORDER: tuple[Probe, ...] = ("prototype", "logreg")


def embed_clips(encoder: ClipEncoder, root: Path, clips: list[ClipMeta]) -> np.ndarray:
    """(N, D) unit embeddings of dev clips, through the service's decode and embed path."""
    encoder.eval()
    return np.stack([encoder.embed_clip(decode_file(root, c, encoder.sample_rate))
                     for c in tqdm(clips, desc="embedding clips", leave=False)])


def embed_dataset(encoder: ClipEncoder | OnnxEncoder, clips: Sequence[LabelledClip],
                  transform: Callable[[np.ndarray], np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Unit embeddings (the service's) and embeddings before normalisation (a linear probe's) of ``clips``.

    ``encoder`` is the bundle's torch encoder or its ONNX graph (what the service runs); both window a clip
    with ``sceneprint.windows``. ``transform`` maps each window's features before they are aggregated, where a
    map folded into the network would act (e.g. a whitening: ``run_evaluate(whiten=True)``).
    """
    unit, raw = [], []
    for clip in tqdm(clips, desc="embedding clips", unit="clip"):
        wav = decode_clip(clip.path.read_bytes(), sample_rate=encoder.sample_rate, limits=EVAL_LIMITS).waveform
        windows = encoder.window_features(wav)  # (W, D)
        if transform is not None:
            windows = transform(windows)
        unit.append(aggregate_windows(windows))  # what embed_clip returns
        raw.append(windows.mean(axis=0))
    return np.stack(unit), np.stack(raw)


def logmel_baseline(clips: Sequence[LabelledClip], config: LogMelConfig | None = None) -> np.ndarray:
    """The log-mel statistics embedding (per-band mean and std, standardised over the set) of ``clips``."""
    import torch

    config = config or LogMelConfig()
    frontend = LogMel(config).eval()
    feats = []
    with torch.inference_mode():
        for clip in tqdm(clips, desc="log-mel statistics", unit="clip"):
            wav = decode_clip(clip.path.read_bytes(), sample_rate=config.sample_rate, limits=EVAL_LIMITS).waveform
            x = frontend(torch.from_numpy(wav).unsqueeze(0))[0, 0].numpy()  # (F, T)
            feats.append(np.concatenate([x.mean(axis=1), x.std(axis=1)]))
    f = np.stack(feats)
    return (f - f.mean(axis=0)) / (f.std(axis=0) + 1e-6)


def select_clips(root: Path, *, layout: str = "auto", split: str | None = None, subset: str | None = None
                 ) -> list[LabelledClip]:
    """The clips to evaluate on: the folder's, restricted to a split's held-out classes when one is named."""
    clips = read_dataset(root, layout, subset=subset)
    if split is None:
        return clips
    held = set(json.loads((root / "splits" / f"{split}.json").read_text(encoding="utf-8"))["heldout_classes"])
    return [c for c in clips if c.label in held]


def calibration_waveforms(root: Path, *, split: str, sample_rate: int, count: int, seed: int = 0,
                          layout: str = "auto") -> list[np.ndarray]:
    """``count`` decoded clips of the split's training classes (never held-out ones), drawn with ``seed``.

    What static int8 quantisation calibrates its activation ranges on.
    """
    train = set(json.loads((root / "splits" / f"{split}.json").read_text(encoding="utf-8"))["train_classes"])
    clips = [c for c in read_dataset(root, layout) if c.label in train]
    if not clips:
        raise ValueError(f"no clips of the training classes of {split} in {root}")
    chosen = np.random.default_rng(seed).choice(len(clips), size=min(count, len(clips)), replace=False)
    return [decode_clip(clips[i].path.read_bytes(), sample_rate=sample_rate, limits=EVAL_LIMITS).waveform
            for i in sorted(chosen)]


def fewshot_figures(unit: np.ndarray, raw: np.ndarray, clips: Sequence[LabelledClip], *, shots: int, ways: int | None,
                    episodes: int, seed: int, probe: Probe, grid: bool, unknown_threshold: float | None = None,
                    calibration: EnrollmentCalibration | None = None) -> dict[str, Any]:
    """The JSON report: the chosen probe's figure, open-set figures (AUROC; the decision rules compared at the
    false-accept rate of ``unknown_threshold``, with the rule ``calibration`` chooses), and (``grid``) every
    K, N and probe."""
    labels, sources = [c.label for c in clips], [c.source_id for c in clips]
    n_classes = len(set(labels))
    ways = ways or n_classes

    def run(k: int, n: int, p: Probe) -> dict[str, Any]:
        emb = unit if p == "prototype" else raw
        return evaluate(emb, labels, sources, n_way=n, k_shot=k, episodes=episodes, seed=seed, probe=p).as_dict()

    chosen = run(shots, ways, probe)
    report: dict[str, Any] = {
        "few_shot": {"shots": shots, "ways": ways, "episodes": episodes, "accuracy": chosen["accuracy"],
                     "ci95": chosen["ci95"], "probe": probe},
        "clips": len(clips), "classes": n_classes, "seed": seed,
    }
    open_ways = min(5, n_classes // 2)
    if open_ways >= 2:
        found = open_set(unit, labels, sources, n_way=open_ways, k_shot=shots, episodes=min(episodes, 500), seed=seed)
        # The rules compared at the false-accept rate of the threshold in force: the bundle's, else the one
        # with the best balanced accuracy here.
        threshold = unknown_threshold if unknown_threshold is not None else found.threshold
        cal = calibration
        q = rule_scores(unit, labels, sources, n_way=open_ways, shots=shots, episodes=min(episodes, 500), seed=seed)
        comparison = compare_rules(q, threshold=threshold, slope=cal.slope if cal else 0.0,
                                   reference_cohesion=cal.reference_cohesion if cal else 0.0)
        reference = cal.reference_cohesion if cal else float(np.median(q["cohesion"]))
        report["open_set"] = {**found.as_dict(), "rule": cal.rule if cal else "global",
                              "best_rule_here": best_rule(comparison), **comparison,
                              "per_scene_named_accuracy_by_slope": per_scene_sweep(q, threshold=threshold,
                                                                                   reference_cohesion=reference)}
        if cal is not None:
            report["open_set"]["enrollment_checks"] = {
                "min_clip_similarity": cal.min_clip_similarity, "min_cohesion": cal.min_cohesion,
                **check_rates(unit, labels, sources, cal, shots=shots, seed=seed)}
    if grid:
        rows = []
        for n in sorted({5, n_classes}):
            for k in GRID_SHOTS:
                for p in PROBE_ORDER:
                    try:
                        rows.append(run(k, n, p))
                    except ValueError as exc:  # a class without enough recordings for this K
                        rows.append({"probe": p, "n_way": n, "k_shot": k, "error": str(exc)})
        report["grid"] = rows
    return report


def format_table(report: dict[str, Any]) -> str:
    """The report as a plain-text table for the terminal."""
    lines = [f"{'probe':<10} {'ways':>4} {'shots':>5} {'accuracy':>9} {'ci95':>7}"]
    rows = report.get("grid") or [{**report["few_shot"], "n_way": report["few_shot"]["ways"],
                                   "k_shot": report["few_shot"]["shots"]}]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['probe']:<10} {r['n_way']:>4} {r['k_shot']:>5}   n/a ({r['error']})")
        else:
            lines.append(f"{r['probe']:<10} {r['n_way']:>4} {r['k_shot']:>5} {100 * r['accuracy']:>8.1f}% "
                         f"{100 * r['ci95']:>6.1f}")
    if "open_set" in report:
        o = report["open_set"]
        lines.append(f"open-set AUROC ({o['n_way']}-way enrolled): {o['auroc']:.3f}")
        lines.append(f"at the threshold {o['global_threshold']:.3f} "
                     f"(false accepts {100 * o['false_accept_rate']:.1f}%): "
                     f"nearest scene right {100 * o['nearest_accuracy']:.1f}%, named right by rule (same false "
                     f"accepts): " + ", ".join(f"{r} {100 * v['named_accuracy']:.1f}%" for r, v in o["rules"].items())
                     + f"; rule in force: {o['rule']}")
        if "enrollment_checks" in o:
            c = o["enrollment_checks"]
            lines.append(f"enrollment checks: {100 * c['genuine_refused']:.1f}% of genuine enrollments refused, "
                         f"{100 * c['intruder_refused']:.1f}% of enrollments with one intruder")
    return "\n".join(lines)


def heldout_report(encoder: ClipEncoder, root: Path, meta: list[ClipMeta], split: FewShotSplit, *, episodes: int,
                   cache_dir: Path) -> dict[str, Any]:
    """Few-shot and open-set figures on the dev held-out classes, with the log-mel statistics baseline.

    The figures a bundle's manifest carries (``sceneprint evaluate`` gives the same on any folder).
    """
    held = [c for c in meta if c.label in split.heldout_classes]
    emb = embed_clips(encoder, root, held)
    labels, sources = [c.label for c in held], [c.source_id for c in held]
    fewshot = {f"{n}way_{k}shot": evaluate(emb, labels, sources, n_way=n, k_shot=k, episodes=episodes).as_dict()
               for n, k in [(5, 5), (5, 1), (10, 5)] if n <= len(set(labels))}
    held_idx = np.array([i for i, c in enumerate(meta) if c.label in split.heldout_classes])
    feats = cached_logmels(root, meta, LogMelConfig(), cache_dir)[held_idx]
    baseline = evaluate(logmel_statistics(feats), labels, sources, episodes=episodes).as_dict()
    return {
        "heldout_fewshot": fewshot,
        "heldout_fewshot_logmel_stats_baseline_5way_5shot": baseline,
        "heldout_open_set_5way_5shot": open_set(emb, labels, sources, n_way=min(5, len(set(labels)) // 2),
                                                episodes=min(episodes, 500)).as_dict(),
        "protocol": PROTOCOL,
    }


def calibrated_threshold(report: dict[str, Any]) -> float | None:
    """The unknown threshold a ``heldout_report`` calibrated (the manifest's typed field), if it has one."""
    open_set = report.get("heldout_open_set_5way_5shot")
    return float(open_set["threshold"]) if open_set else None


def run_evaluate(*, bundle: Path | None, baseline: str | None, data: Path, layout: str, split: str | None,
                 subset: str | None, shots: int, ways: int | None, episodes: int, seed: int, probe: Probe,
                 grid: bool, engine: str = "auto", whiten: bool = False) -> dict[str, Any]:
    """What ``sceneprint evaluate`` does; returns the JSON report.

    ``engine``: ``onnx`` embeds through the bundle's ONNX graph (what the service runs: float32 or int8),
    ``torch`` through its weights; ``auto`` is ``onnx`` when the bundle has a graph. ``whiten``: first map
    every clip's mean window embedding through a within-class whitening fitted on the clips of the split's
    training classes (``sceneprint.training.whitening``; any bundle, where ``bundle whiten`` folds it into
    a CP-Mobile student's weights).
    """
    if whiten and (split is None or bundle is None):
        raise ValueError("whiten needs a bundle and a split: it is fitted on the split's training classes")
    clips = select_clips(data, layout=layout, split=split, subset=subset)
    if not clips:
        raise ValueError(f"no clips to evaluate in {data}")
    if bundle is not None:
        if engine not in ("auto", "onnx", "torch"):
            raise ValueError(f"engine must be auto, onnx or torch, not {engine!r}")
        manifest = read_manifest(bundle)
        chosen: ClipEncoder | OnnxEncoder
        if engine == "onnx" or (engine == "auto" and manifest.graph is not None):
            chosen = load_onnx_encoder(bundle)
            assert chosen.manifest.graph is not None
            used = f"onnx ({chosen.manifest.graph.precision})"
        else:
            chosen, manifest = load_bundle(bundle)
            used = "torch"
        threshold, calibration = manifest.unknown_threshold, manifest.calibration
        source: dict[str, Any] = {"bundle": str(bundle), "model_version": manifest.model_version,
                                  "architecture": manifest.architecture, "engine": used}
        transform = None
        if whiten:
            assert split is not None
            transform, source["whitening"] = _whitening(chosen, data, layout, split)
            threshold, calibration = None, None  # the bundle's were calibrated on other embeddings
        unit, raw = embed_dataset(chosen, clips, transform)
    elif baseline == "logmel-stats":
        threshold, calibration = None, None
        raw = logmel_baseline(clips)
        unit = l2_normalize(raw)
        source = {"baseline": "log-mel statistics (per-band mean and std, standardised)"}
    else:
        raise ValueError("give --bundle, or --baseline logmel-stats")
    report = fewshot_figures(unit, raw, clips, shots=shots, ways=ways, episodes=episodes, seed=seed, probe=probe,
                             grid=grid, unknown_threshold=threshold, calibration=calibration)
    return {**source, "data": str(data), "split": split, **report}


def _whitening(encoder: ClipEncoder | OnnxEncoder, data: Path, layout: str, split: str
               ) -> tuple[Callable[[np.ndarray], np.ndarray], dict[str, Any]]:
    """A within-class whitening of window features fitted on the split's training classes, and what was fitted."""
    from sceneprint.training.whitening import apply_whitening, fit_whitening

    train = set(load_split(data, split).train_classes)
    fit_clips = [c for c in read_dataset(data, layout) if c.label in train]
    mean, matrix, shrinkage, cv = fit_whitening(encoder, fit_clips)
    info = {"fitted_on": f"{len(fit_clips)} clips of the {len(train)} training classes of {split}",
            "shrinkage": shrinkage, "shrinkage_cross_validation": cv}
    return (lambda w: apply_whitening(w, mean, matrix).astype(np.float32)), info


def update_manifest(bundle: Path, figures: dict[str, Any]) -> None:
    """Merge ``figures`` into the bundle manifest's evaluation section (weights and their hash unchanged)."""
    path = bundle / MANIFEST
    data = json.loads(path.read_text())
    data["evaluation"].update(figures)
    path.write_text(json.dumps(data, indent=2) + "\n")
    load_bundle(bundle)  # still loads
