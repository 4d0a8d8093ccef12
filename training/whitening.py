"""Within-class whitening of a student's embedding, fitted on the training classes, folded into its weights.

A prototype is a mean of five clips, and a query is held against it by cosine; the directions along which
clips of one class differ most (level, background, recording) drown the directions that tell classes
apart. Whitening the training classes' *within-class* covariance (the first step of linear discriminant
analysis, shrunk toward the identity by ``shrinkage`` times its mean eigenvalue) and centring on their mean
makes those nuisance directions count less, and they are largely shared by classes never seen: on the dev
held-out classes it lifts the default student's 5-way 5-shot accuracy by about 3.5 points (docs/results.md),
with the same prototype rule and nothing fitted on held-out clips.

The map is affine, ``e -> (e - mean) @ matrix``, so it folds into CP-Mobile's 1x1 head convolution
(which gains a bias, ``CPMobileConfig.head_bias``): the bundle format, its ONNX graph and the service
stay as they are. The shrinkage is chosen without the held-out classes: cross-validation over folds of
the training *classes* (fit on the others, 5-way 5-shot episodes on the fold's classes).

    sceneprint bundle whiten runs/student/bundle --out runs/student/bundle-whitened
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from sceneprint.bundle import load_bundle, read_manifest, save_bundle
from sceneprint.complexity import complexity_card
from sceneprint.cpmobile import CPMobileConfig
from sceneprint.encoder import ClipEncoder, Encoder
from sceneprint.manifest import Manifest
from sceneprint.prototypes import l2_normalize
from sceneprint.runtime import OnnxEncoder
from sceneprint.training.data import load_meta, load_split
from sceneprint.training.datasets import LabelledClip, read_dataset
from sceneprint.training.evaluate import calibrated_threshold, embed_dataset, heldout_report
from sceneprint.training.fewshot import evaluate

SHRINKAGE_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)


def within_class_whitening(embeddings: np.ndarray, labels: Sequence[str] | np.ndarray, shrinkage: float
                           ) -> tuple[np.ndarray, np.ndarray]:
    """The affine map ``e -> (e - mean) @ matrix`` that whitens the within-class covariance of ``embeddings``.

    Args:
        embeddings: (N, D) embeddings before normalisation, of at least two classes.
        labels: The class of each row.
        shrinkage: Added to every eigenvalue of the within-class covariance, as a multiple of their mean
            (0: full whitening; large: little more than centring).

    Returns:
        ``mean`` (D,), the embeddings' mean, and ``matrix`` (D, D) = V diag(1 / sqrt(w + shrinkage mean(w)))
        for the covariance's eigenvectors V and eigenvalues w.
    """
    x = np.asarray(embeddings, dtype=np.float64)
    y = np.asarray(labels)
    classes = np.unique(y)
    if x.ndim != 2 or len(classes) < 2 or len(x) <= len(classes):
        raise ValueError(f"need (N, D) embeddings of at least two classes with more rows than classes, got "
                         f"shape {x.shape} and {len(classes)} classes")
    if shrinkage < 0:
        raise ValueError(f"shrinkage must be >= 0, not {shrinkage}")
    centred = x.copy()
    for c in classes:
        centred[y == c] -= x[y == c].mean(axis=0)
    cov = centred.T @ centred / (len(x) - len(classes))
    w, v = np.linalg.eigh(cov)
    w = np.clip(w, 0.0, None)
    if not w.mean() > 0:
        raise ValueError("the within-class covariance is zero: every class's embeddings are identical")
    if shrinkage == 0 and w.min() <= 0:
        raise ValueError("the within-class covariance is singular: use a shrinkage above 0")
    matrix = v / np.sqrt(w + shrinkage * w.mean())
    return x.mean(axis=0), matrix


def apply_whitening(embeddings: np.ndarray, mean: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """(N, D) -> (N, D): ``(e - mean) @ matrix``."""
    return (np.asarray(embeddings, dtype=np.float64) - mean) @ matrix


def class_folds(n_classes: int, folds: int = 3) -> int:
    """How many folds of classes ``choose_shrinkage`` uses: at most ``folds``, each holding a 5-way episode."""
    return min(folds, n_classes // 5)


def choose_shrinkage(embeddings: np.ndarray, labels: Sequence[str], sources: Sequence[str], *,
                     grid: Sequence[float] = SHRINKAGE_GRID, folds: int = 3, episodes: int = 200, seed: int = 0
                     ) -> tuple[float, dict[str, float]]:
    """The shrinkage of ``grid`` with the best 5-way 5-shot accuracy on classes its whitening was not fitted on.

    The classes are split into ``folds`` groups (at random, ``seed``; fewer where a group would hold under
    five classes); each group's clips are classified in episodes (the service's prototype rule) after a
    whitening fitted on the other groups' clips.

    Returns:
        The best shrinkage (the smallest among equals) and the mean accuracy of each (keys as ``f"{s:g}"``).
    """
    x, y, src = np.asarray(embeddings, dtype=np.float64), np.asarray(labels), np.asarray(sources)
    classes = np.random.default_rng(seed).permutation(np.unique(y))
    folds = class_folds(len(classes), folds)
    if folds < 2:
        raise ValueError(f"{len(classes)} classes are too few to cross-validate the whitening: at least 10 "
                         "(two folds of 5-way episodes)")
    groups = np.array_split(classes, folds)
    scores: dict[str, float] = {}
    for s in grid:
        accs = []
        for k, group in enumerate(groups):
            fit = ~np.isin(y, group)
            mean, matrix = within_class_whitening(x[fit], y[fit], s)
            held = ~fit
            accs.append(evaluate(l2_normalize(apply_whitening(x[held], mean, matrix)), y[held].tolist(),
                                 src[held].tolist(),
                                 n_way=5, k_shot=5, episodes=episodes, seed=seed + k).accuracy)
        scores[f"{s:g}"] = round(float(np.mean(accs)), 4)
    best = max(grid, key=lambda s: (scores[f"{s:g}"], -s))
    return float(best), scores


def fit_whitening(encoder: ClipEncoder | OnnxEncoder, clips: Sequence[LabelledClip]
                  ) -> tuple[np.ndarray, np.ndarray, float, dict[str, float]]:
    """The within-class whitening of ``encoder``'s clip embeddings (before normalisation) of ``clips``, the
    shrinkage cross-validated over folds of their classes: ``(mean, matrix, shrinkage, accuracy per shrinkage)``."""
    _, raw = embed_dataset(encoder, clips)
    labels, sources = [c.label for c in clips], [c.source_id for c in clips]
    shrinkage, cv = choose_shrinkage(raw, labels, sources)
    mean, matrix = within_class_whitening(raw, labels, shrinkage)
    return mean, matrix, shrinkage, cv


@torch.no_grad()
def fold_whitening(encoder: Encoder, mean: np.ndarray, matrix: np.ndarray) -> Encoder:
    """A copy of ``encoder`` whose embeddings before normalisation are ``(e - mean) @ matrix`` of its own.

    The head is a bias-free 1x1 convolution ``W`` followed by global average pooling, so the map folds
    exactly into a head ``matrix.T @ W`` with the bias ``-matrix.T @ mean`` (``head_bias``).
    """
    net = encoder.network_config
    if not isinstance(net, CPMobileConfig) or net.output_norm == "head" or net.head_bias:
        raise ValueError("whitening folds into a CP-Mobile network's plain 1x1 head convolution, once")
    d = net.embedding_dim
    if mean.shape != (d,) or matrix.shape != (d, d):
        raise ValueError(f"expected mean ({d},) and matrix ({d}, {d}), got {mean.shape} and {matrix.shape}")
    out = Encoder(encoder.frontend_config, dataclasses.replace(net, head_bias=True), encoder.window)
    state = encoder.state_dict()
    m = torch.from_numpy(np.asarray(matrix, dtype=np.float64))
    w = state["network.head.weight"].to(torch.float64)  # (D, C, 1, 1)
    state["network.head.weight"] = torch.einsum("dk,dcij->kcij", m, w).to(torch.float32)
    state["network.head.bias"] = (-(m.T @ torch.from_numpy(np.asarray(mean, dtype=np.float64)))).to(torch.float32)
    out.load_state_dict(state, strict=True)
    return out.eval()


def whiten_bundle(src: Path, dst: Path, data: Path, *, split: str = "fewshot-v1", episodes: int = 2000,
                  cache_dir: Path = Path("cache"), model_version: str | None = None,
                  calibrate: bool | None = None, false_refusal: float | None = None) -> Manifest:
    """Fit the whitening on the clips of the classes ``src`` was trained on, fold it in, write ``dst``.

    ``dst`` (may be ``src``) gets the held-out figures of the whitened encoder (those before it stay in the
    manifest's ``evaluation.before_whitening``), its complexity card, its ONNX graph and, where ``src`` was
    calibrated (or ``calibrate``), its enrollment calibration at ``false_refusal`` (default: the training
    config's, else 0.5%).
    """
    from sceneprint.export import add_onnx_after_training
    from sceneprint.training.calibration import calibrate_bundle

    encoder, manifest = load_bundle(src)
    if not isinstance(encoder, Encoder):
        raise ValueError(f"{src}: a {manifest.architecture} bundle; whitening folds into CP-Mobile students")
    if "whitening" in manifest.training:
        raise ValueError(f"{src}: already whitened")
    trained_on = set(manifest.training.get("data", {}).get("classes", []))
    clips = [c for c in read_dataset(data) if c.label in trained_on]
    if not clips:
        raise ValueError(f"{src}: none of the classes it was trained on ({sorted(trained_on)[:3]}...) is in {data}")
    mean, matrix, shrinkage, cv = fit_whitening(encoder, clips)
    whitened = fold_whitening(encoder, mean, matrix)
    results = heldout_report(whitened, data, load_meta(data), load_split(data, split), episodes=episodes,
                             cache_dir=cache_dir)
    before = {k: manifest.evaluation[k] for k in ("heldout_fewshot", "heldout_open_set_5way_5shot")
              if k in manifest.evaluation}
    info = {"kind": "within-class whitening, folded into the 1x1 head convolution",
            "fitted_on": f"{len(clips)} clips of the {len(trained_on)} classes the student was trained on",
            "shrinkage": shrinkage,
            "shrinkage_cross_validation": {"folds_of_classes": class_folds(len(trained_on)),
                                           "probe": "prototype 5-way 5-shot",
                                           "accuracy": cv}}
    saved = save_bundle(dst, whitened, model_version=model_version or manifest.model_version,
                        training={**manifest.training, "whitening": info},
                        evaluation={**results, "before_whitening": before,
                                    "complexity": complexity_card(whitened, repeats=10, threads=(1,))},
                        unknown_threshold=calibrated_threshold(results))
    print(f"whitening (shrinkage {shrinkage:g}, cross-validated {cv}) folded into {dst}")
    print(add_onnx_after_training(dst))
    if (manifest.calibration is not None if calibrate is None else calibrate) and read_manifest(dst).graph is not None:
        quantile = false_refusal or manifest.training.get("config", {}).get("enrollment_false_refusal", 0.005)
        saved = calibrate_bundle(dst, data, split=split, false_refusal=quantile)
    return saved


def summary(manifest: Manifest) -> str:
    """One line: the whitened bundle's held-out 5-way 5-shot accuracy, and before."""
    now = manifest.evaluation["heldout_fewshot"]["5way_5shot"]["accuracy"]
    before = manifest.evaluation.get("before_whitening", {}).get("heldout_fewshot", {}).get("5way_5shot", {})
    return (f"{manifest.model_version}: held-out 5-way 5-shot {100 * now:.1f}%"
            + (f" (before whitening {100 * before['accuracy']:.1f}%)" if before else "")
            + f"; {json.dumps(manifest.training['whitening']['shrinkage_cross_validation']['accuracy'])}")


__all__ = ["SHRINKAGE_GRID", "apply_whitening", "choose_shrinkage", "class_folds", "fit_whitening", "fold_whitening",
           "summary", "whiten_bundle", "within_class_whitening"]
