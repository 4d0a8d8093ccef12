"""``sceneprint retrain`` on generated data: it trains, evaluates and publishes to the registry when the floor is
passed, refuses to when it is not, and can add extra classes (e.g. the service's exported scenes)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from sceneprint.cli import app as cli
from sceneprint.config import apply_overrides
from sceneprint.registry import Registry
from sceneprint.training.data import load_meta, load_split
from sceneprint.training.retrain import EXTRA_LABEL_PREFIX, merge_extra_classes, retrain
from sceneprint.training.student import StudentConfig
from tests import audio_factory as af

SMALL = ["model=cpmobile_6k", 'teacher=""', "loss.alpha=1", "loss.beta=0", "loss.gamma=0", "optim.epochs=1",
         "optim.batch_size=16", "optim.warmup_epochs=0", "eval_every=1", "eval_episodes=5", "final_episodes=5",
         "threads=1", "model_version=retrained-v1"]


@pytest.fixture(scope="module")
def datasets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A generated training set, and two more classes in a meta.csv folder (as `sceneprint scenes export` writes)."""
    tmp = tmp_path_factory.mktemp("retrain")
    extra = af.write_labelled_dataset(tmp / "extra", n_classes=2, heldout=0, recordings=3)
    return af.write_labelled_dataset(tmp / "data"), extra


def test_extra_classes_join_the_training_classes_and_the_held_out_ones_stay(datasets: tuple[Path, Path],
                                                                            tmp_path: Path) -> None:
    root, extra = datasets
    merged, added = merge_extra_classes(root, "fewshot-v1", extra, tmp_path / "merged")
    split, original = load_split(merged, "fewshot-v1"), load_split(root, "fewshot-v1")
    assert added == [f"{EXTRA_LABEL_PREFIX}class0", f"{EXTRA_LABEL_PREFIX}class1"]
    assert split.train_classes == (*sorted(original.train_classes), *added)
    assert split.heldout_classes == original.heldout_classes and split.val_sources == original.val_sources
    meta = load_meta(merged)
    assert len(meta) == len(load_meta(root)) + len(load_meta(extra))
    assert all((merged / clip.filename).is_file() for clip in meta)  # the audio is read in place, linked


def test_retrain_publishes_a_model_that_passes_the_floor_and_refuses_one_that_does_not(
        datasets: tuple[Path, Path], tmp_path: Path) -> None:
    root, extra = datasets
    cfg = apply_overrides(StudentConfig(), [*SMALL, f"data.root={root}", f"data.cache_dir={tmp_path / 'cache'}"])
    registry = Registry(tmp_path / "registry")
    summary = retrain(cfg, registry=registry.root, out_dir=tmp_path / "run", min_accuracy=0.0, extra_classes=extra)
    assert summary["published"] and summary["version"] == "v1" and summary["extra_classes"] == [
        f"{EXTRA_LABEL_PREFIX}class0", f"{EXTRA_LABEL_PREFIX}class1"]
    pointer = registry.pointer()
    assert pointer is not None and pointer.key == summary["key"] and pointer.model_version == "retrained-v1"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["key"] == summary["key"]
    manifest = json.loads((registry.path("v1") / "manifest.json").read_text())
    assert f"{EXTRA_LABEL_PREFIX}class1" in manifest["training"]["data"]["classes"]

    # The same job again (its run resumes: no epoch left) with a floor above its figure: nothing is published.
    floor = min(1.0, summary["heldout_5way_5shot"] + 0.01)
    if summary["heldout_5way_5shot"] >= 1.0:
        pytest.skip("the generated held-out classes are all told apart: no floor can be above that")
    config = tmp_path / "student.json"
    config.write_text("{}")
    result = CliRunner().invoke(cli, ["retrain", str(config), *SMALL, f"data.root={root}",
                                      f"data.cache_dir={tmp_path / 'cache'}", "--registry", str(registry.root),
                                      "--out", str(tmp_path / "run"), "--min-accuracy", str(floor),
                                      "--extra-classes", str(extra)])
    assert result.exit_code == 1 and "below the floor" in result.output, result.output
    assert [v.version for v in registry.versions()] == ["v1"]
