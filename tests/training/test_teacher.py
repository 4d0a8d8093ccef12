"""The teacher stage end to end on generated audio: one frozen and one fine-tuning epoch, export, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sceneprint.bundle import load_bundle
from sceneprint.config import apply_overrides
from sceneprint.training.teacher import TeacherConfig, train_teacher
from tests import audio_factory as af


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return af.write_labelled_dataset(tmp_path_factory.mktemp("synth"))


def smoke_config(dataset: Path, tmp: Path, *overrides: str) -> TeacherConfig:
    return apply_overrides(TeacherConfig(), [
        f"data.root={dataset}", f"data.cache_dir={tmp / 'cache'}", "optim.frozen_epochs=1", "optim.finetune_epochs=1",
        "optim.batch_size=16", "optim.warmup_epochs=1", "eval_every=1", "eval_episodes=10", "threads=1",
        *overrides])


def test_one_epoch_per_phase_trains_logs_every_term_and_exports_a_servable_bundle(dataset: Path,
                                                                                  tmp_path: Path) -> None:
    cfg = smoke_config(dataset, tmp_path)
    results = train_teacher(cfg, tmp_path / "run", export=tmp_path / "bundle")
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in log] == ["frozen", "finetune"]
    assert log[0]["lr_backbone"] == 0.0 and log[1]["lr_backbone"] > 0
    for r in log:
        assert {"train_loss", "train_ce", "train_supcon", "heldout_5w5s_embedding"} <= set(r)
        assert r["train_loss"] == pytest.approx(0.25 * r["train_ce"] + 0.75 * r["train_supcon"], rel=1e-4)
    assert 0 <= results["heldout_5w5s_embedding"] <= 1
    encoder, manifest = load_bundle(tmp_path / "bundle")
    assert manifest.architecture == "yamnet" and manifest.embedding_dim == 1024
    assert "non-commercial" in manifest.training["licenses"]["note"]
    assert encoder.embed_clip(af.class_clip(7, seed=1, rate=16_000)).shape == (1024,)
    # The checkpoint loads weights-only, and a finished run resumes to nothing left to do.
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 1
    train_teacher(cfg, tmp_path / "run")
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2


def test_frozen_phase_leaves_the_backbone_untouched(dataset: Path, tmp_path: Path) -> None:
    cfg = smoke_config(dataset, tmp_path, "optim.finetune_epochs=0", "ce_weight=1.0")
    train_teacher(cfg, tmp_path / "run")
    from sceneprint.yamnet import pretrained_yamnet

    trained = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["model"]
    for k, v in pretrained_yamnet().state_dict().items():
        torch.testing.assert_close(trained[f"encoder.network.{k}"], v)
