"""Within-class whitening: the map, its choice of shrinkage without held-out classes, and its fold into a bundle."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sceneprint.bundle import load_bundle
from sceneprint.config import apply_overrides
from sceneprint.cpmobile import CPMobileConfig, cpmobile_6k
from sceneprint.encoder import Encoder, WindowConfig
from sceneprint.frontend import LogMelConfig
from sceneprint.prototypes import l2_normalize
from sceneprint.runtime import load_onnx_encoder
from sceneprint.training.evaluate import run_evaluate
from sceneprint.training.fewshot import evaluate
from sceneprint.training.student import StudentConfig, train_student
from sceneprint.training.whitening import (
    apply_whitening,
    choose_shrinkage,
    fold_whitening,
    whiten_bundle,
    within_class_whitening,
)
from tests import audio_factory as af


def nuisance_classes(n_classes: int, per_class: int, seed: int) -> tuple[np.ndarray, list[str], list[str]]:
    """Classes whose means differ in every direction a little, and whose clips vary a lot along a few
    directions shared by all classes (the nuisance whitening should discount)."""
    rng = np.random.default_rng(seed)
    d = 16
    nuisance = np.zeros(d)
    nuisance[:3] = 8.0  # three loud shared within-class directions
    means = rng.normal(size=(n_classes, d))
    x = np.concatenate([m + rng.normal(size=(per_class, d)) * (1.0 + nuisance) for m in means])
    labels = [f"c{i}" for i in range(n_classes) for _ in range(per_class)]
    sources = [f"c{i}-r{j}" for i in range(n_classes) for j in range(per_class)]  # one clip per recording
    return x, labels, sources


def test_the_within_class_covariance_becomes_the_identity_and_the_mean_zero() -> None:
    x, labels, _ = nuisance_classes(6, 400, seed=0)
    mean, matrix = within_class_whitening(x, labels, shrinkage=0.0)
    z = apply_whitening(x, mean, matrix)
    y = np.asarray(labels)
    centred = np.concatenate([z[y == c] - z[y == c].mean(axis=0) for c in np.unique(y)])
    cov = centred.T @ centred / (len(z) - 6)
    np.testing.assert_allclose(cov, np.eye(16), atol=1e-8)
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-8)
    # Shrinkage leaves the loud directions smaller than 1 but keeps their order.
    _, shrunk = within_class_whitening(x, labels, shrinkage=1.0)
    assert np.all(np.linalg.norm(shrunk, axis=0) < np.linalg.norm(matrix, axis=0))


def test_whitening_fitted_on_some_classes_helps_prototypes_of_other_classes() -> None:
    x, labels, sources = nuisance_classes(20, 30, seed=1)
    fit = np.array([int(label[1:]) < 10 for label in labels])
    held_labels = [lab for lab, f in zip(labels, fit, strict=True) if not f]
    held_sources = [s for s, f in zip(sources, fit, strict=True) if not f]
    mean, matrix = within_class_whitening(x[fit], [lab for lab, f in zip(labels, fit, strict=True) if f], 0.1)
    before = evaluate(x[~fit], held_labels, held_sources, episodes=100).accuracy
    after = evaluate(l2_normalize(apply_whitening(x[~fit], mean, matrix)), held_labels, held_sources,
                     episodes=100).accuracy
    assert after > before + 0.2


def test_the_shrinkage_is_chosen_on_folds_of_classes() -> None:
    x, labels, sources = nuisance_classes(15, 20, seed=2)
    best, scores = choose_shrinkage(x, labels, sources, grid=(0.03, 1.0, 1000.0), episodes=30)
    assert set(scores) == {"0.03", "1", "1000"} and all(0 <= a <= 1 for a in scores.values())
    assert best == min((0.03, 1.0, 1000.0), key=lambda s: (-scores[f"{s:g}"], s))
    assert scores["1000"] < scores["0.03"]  # barely whitened loses to whitened on these classes
    with pytest.raises(ValueError, match="too few"):
        choose_shrinkage(x[:180], labels[:180], sources[:180])  # 9 classes


def test_bad_inputs_are_refused() -> None:
    x, labels, _ = nuisance_classes(3, 10, seed=3)
    with pytest.raises(ValueError, match="two classes"):
        within_class_whitening(x, ["a"] * len(x), 0.1)
    with pytest.raises(ValueError, match="shrinkage"):
        within_class_whitening(x, labels, -1.0)
    with pytest.raises(ValueError, match="singular"):
        within_class_whitening(x[:, :1].repeat(4, axis=1), labels, 0.0)


def _encoder(config: CPMobileConfig) -> Encoder:
    torch.manual_seed(0)
    return Encoder(LogMelConfig(), config, WindowConfig()).eval()


def test_folding_into_the_head_equals_whitening_the_embedding() -> None:
    encoder = _encoder(cpmobile_6k())
    with torch.no_grad():  # non-trivial BatchNorm statistics
        for m in encoder.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    rng = np.random.default_rng(0)
    d = encoder.embedding_dim
    mean, matrix = rng.normal(size=d), rng.normal(size=(d, d)) / np.sqrt(d)
    folded = fold_whitening(encoder, mean, matrix)
    assert folded.network_config.head_bias and folded.network.head.bias is not None
    waves = torch.from_numpy(np.stack([af.class_clip(i, seed=i, seconds=1.0) for i in range(3)]).astype(np.float32))
    with torch.no_grad():
        expected = apply_whitening(encoder.features(waves).double().numpy(), mean, matrix)
        got = folded.features(waves).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    with pytest.raises(ValueError, match="once"):
        fold_whitening(folded, mean, matrix)
    with pytest.raises(ValueError, match="expected mean"):
        fold_whitening(encoder, mean[:-1], matrix)
    with pytest.raises(ValueError, match="head_bias"):
        CPMobileConfig(output_norm="head", head_bias=True)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """15 generated classes: 10 training classes (enough for two folds of 5-way episodes), 5 held out."""
    return af.write_labelled_dataset(tmp_path_factory.mktemp("whiten") / "data", n_classes=15, heldout=5, seconds=1.5)


def student_alone(dataset: Path, tmp: Path, *overrides: str) -> StudentConfig:
    """A student alone (CE, no teacher), one epoch."""
    return apply_overrides(StudentConfig(), [
        "model=cpmobile_6k", 'teacher=""', "loss.alpha=1", "loss.beta=0", "loss.gamma=0", f"data.root={dataset}",
        f"data.cache_dir={tmp / 'cache'}", "optim.epochs=1", "optim.batch_size=16", "optim.warmup_epochs=1",
        "eval_every=1", "eval_episodes=5", "final_episodes=20", "threads=1", *overrides])


def test_evaluating_with_whiten_equals_evaluating_the_folded_bundle(dataset: Path, tmp_path: Path) -> None:
    train_student(student_alone(dataset, tmp_path), tmp_path / "run", export=tmp_path / "bundle")
    folded = whiten_bundle(tmp_path / "bundle", tmp_path / "whitened", dataset, episodes=20,
                           cache_dir=tmp_path / "cache")
    common = {"data": dataset, "layout": "auto", "split": "fewshot-v1", "subset": None, "shots": 5, "ways": 5,
              "episodes": 50, "seed": 0, "probe": "prototype", "grid": False, "engine": "torch"}
    applied = run_evaluate(bundle=tmp_path / "bundle", baseline=None, whiten=True, **common)
    served = run_evaluate(bundle=tmp_path / "whitened", baseline=None, **common)
    assert applied["whitening"]["shrinkage"] == folded.training["whitening"]["shrinkage"]
    assert applied["few_shot"]["accuracy"] == pytest.approx(served["few_shot"]["accuracy"], abs=0.01)
    with pytest.raises(ValueError, match="split"):
        run_evaluate(bundle=tmp_path / "bundle", baseline=None, whiten=True, **{**common, "split": None})
    with pytest.raises(ValueError, match="already whitened"):
        whiten_bundle(tmp_path / "whitened", tmp_path / "twice", dataset)


def test_a_student_exported_with_whiten_serves_the_whitened_embedding(dataset: Path, tmp_path: Path) -> None:
    """Exported with ``whiten``: the bundle holds the folded whitening, its figures and the figures before it,
    its enrollment calibration, a graph that agrees with torch, and it loads strictly."""
    results = train_student(student_alone(dataset, tmp_path, "whiten=true"), tmp_path / "run",
                            export=tmp_path / "bundle")
    encoder, manifest = load_bundle(tmp_path / "bundle")
    info = manifest.training["whitening"]
    assert info["shrinkage"] in (0.03, 0.1, 0.3, 1.0, 3.0) and len(info["shrinkage_cross_validation"]["accuracy"]) == 5
    assert manifest.network.head_bias
    assert manifest.parameter_count == results["parameter_count"] + manifest.embedding_dim  # the head's bias
    assert manifest.evaluation["before_whitening"]["heldout_fewshot"] == results["heldout_fewshot"]
    assert results["whitened"]["heldout_fewshot"] == manifest.evaluation["heldout_fewshot"]
    assert manifest.calibration is not None  # enrollment checks calibrated on the whitened embedding
    clip = af.class_clip(12, seed=5, seconds=1.5)
    np.testing.assert_allclose(load_onnx_encoder(tmp_path / "bundle").embed_clip(clip), encoder.embed_clip(clip),
                               atol=1e-4)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["whitened"] == results["whitened"]
