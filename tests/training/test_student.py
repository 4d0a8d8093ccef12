"""The student stage on generated audio: a one-epoch run, output-norm variants, DDP agreeing with one process."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from sceneprint.bundle import load_bundle
from sceneprint.config import apply_overrides
from sceneprint.cpmobile import PRESETS, build, parameter_count, preset
from sceneprint.training.student import Student, StudentConfig, load_training_data, make_batch, step_loss, train_student
from sceneprint.training.teacher import TeacherConfig, train_teacher
from tests import audio_factory as af


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A generated data set and a (barely) trained teacher run on it."""
    tmp = tmp_path_factory.mktemp("student")
    dataset = af.write_labelled_dataset(tmp / "data")
    cfg = apply_overrides(TeacherConfig(), [f"data.root={dataset}", f"data.cache_dir={tmp / 'cache'}",
                                            "optim.frozen_epochs=1", "optim.finetune_epochs=0", "optim.batch_size=16",
                                            "eval_episodes=5", "threads=1"])
    train_teacher(cfg, tmp / "teacher")
    return dataset, tmp / "teacher"


def student_config(teacher_run: tuple[Path, Path], tmp: Path, *overrides: str) -> StudentConfig:
    dataset, teacher = teacher_run
    return apply_overrides(StudentConfig(), [
        "model=cpmobile_6k", f"teacher={teacher}", f"data.root={dataset}", f"data.cache_dir={tmp / 'cache'}",
        "optim.epochs=1", "optim.batch_size=16", "optim.warmup_epochs=1", "eval_every=1", "eval_episodes=5",
        "final_episodes=5", "threads=1", "loss.crd_negatives=32", *overrides])


def test_one_epoch_logs_every_term_and_exports_a_bundle_with_its_figures(teacher_run: tuple[Path, Path],
                                                                         tmp_path: Path) -> None:
    cfg = student_config(teacher_run, tmp_path)
    results = train_student(cfg, tmp_path / "run", export=tmp_path / "bundle")
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    for term in ("loss", "ce", "kd", "crd"):
        assert np.isfinite(record[f"train_{term}"])
    assert record["train_kd"] > 0 and record["train_crd"] > 0
    expected = 0.02 * record["train_ce"] + 0.98 * record["train_kd"] + 0.1 * record["train_crd"]
    assert record["train_loss"] == pytest.approx(expected, rel=1e-4)
    encoder, manifest = load_bundle(tmp_path / "bundle")
    assert manifest.network.output_norm == "layer" and manifest.network.norm == "batch"
    assert manifest.evaluation["heldout_fewshot"]["5way_5shot"]["accuracy"] == results["heldout_fewshot"][
        "5way_5shot"]["accuracy"]
    assert "non-commercial" in manifest.training["licenses"]["note"]
    assert encoder.embed_clip(af.class_clip(3, seed=9)).shape == (manifest.embedding_dim,)


def test_without_a_teacher_the_student_trains_on_cross_entropy_alone(teacher_run: tuple[Path, Path],
                                                                     tmp_path: Path) -> None:
    cfg = student_config(teacher_run, tmp_path, 'teacher=""', "loss.alpha=1", "loss.beta=0", "loss.gamma=0")
    train_student(cfg, tmp_path / "run")
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert record["train_kd"] == 0 and record["train_crd"] == 0 and record["train_loss"] == record["train_ce"]


@pytest.mark.parametrize("name", sorted(PRESETS))
@pytest.mark.parametrize("output_norm", ["layer", "batch", "none"])
def test_output_norm_variants_keep_shapes_and_add_only_their_own_parameters(name: str, output_norm: str) -> None:
    config = preset(name, output_norm=output_norm)  # type: ignore[arg-type]
    model = build(config).eval()
    x = torch.randn(2, 1, 128, 96)
    assert model.forward_features(x).shape == model.forward_normalized(x).shape == (2, config.embedding_dim)
    extra = {"layer": 2 * config.embedding_dim, "batch": 2 * config.embedding_dim, "none": 0}[output_norm]
    assert parameter_count(model) == parameter_count(build(preset(name, output_norm="none"))) + extra
    # The service's embedding is the pooled embedding before the output normalisation, L2-normalised.
    torch.testing.assert_close(model(x), torch.nn.functional.normalize(model.forward_features(x), dim=-1))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train_steps(cfg: StudentConfig, steps: int, rank: int, world: int) -> dict[str, torch.Tensor]:
    """``steps`` optimiser steps on the same global batches; returns the student's parameters."""
    from sceneprint.training.losses import CRDMemory

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    data = load_training_data(cfg)
    student = Student(cfg, len(data.classes))
    model = torch.nn.parallel.DistributedDataParallel(student) if world > 1 else student
    # lr 0.01: at 0.1, float reduction-order noise (gloo's all-reduce against one process's sums) grew to 1.5e-4
    # in 3 steps through BatchNorm on 8-clip slices for some features; a DDP mistake (a gradient not averaged,
    # a slice missed) moves the weights by ~lr * grad, orders of magnitude above the tolerance below.
    opt = torch.optim.SGD(student.parameters(), lr=0.01)
    memory = CRDMemory(torch.from_numpy(data.labels[data.train_idx]), seed=0)
    for _ in range(steps):
        batch = make_batch(data, cfg, rng.choice(data.train_idx, size=16, replace=False), rng)
        loss = step_loss(model, student, batch, cfg, memory, rank=rank, world=world, slices=2,
                         n_classes=len(data.classes))["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.detach().clone() for k, v in student.named_parameters()}


def _ddp_worker(rank: int, world: int, port: int, cfg: StudentConfig, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from sceneprint.training.student import distributed_setup

    distributed_setup()
    params = _train_steps(cfg, steps=3, rank=rank, world=world)
    torch.save(params, f"{out}.{rank}")
    torch.distributed.destroy_process_group()


def test_two_ddp_processes_on_cpu_agree_with_one_process_on_the_same_batches(
        teacher_run: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The spawned interpreters import this module by name: they need the repository on their path.
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[2]))
    cfg = student_config(teacher_run, tmp_path)
    load_training_data(cfg)  # fill the caches once, before two processes race for them
    single = _train_steps(cfg, steps=3, rank=0, world=1)
    out = str(tmp_path / "params")
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg, out), nprocs=2, join=True)
    ranks = [torch.load(f"{out}.{r}", weights_only=True) for r in range(2)]
    for name, value in single.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name])  # replicas stay identical
        torch.testing.assert_close(ranks[0][name], value, atol=1e-5, rtol=1e-4)


def test_unlabelled_mixes_join_every_batch_with_teacher_targets_and_no_label(teacher_run: tuple[Path, Path],
                                                                             tmp_path: Path) -> None:
    cfg = student_config(teacher_run, tmp_path, "optim.mix_bank=12", "optim.mix_per_batch=4",
                         "loss.embed_weight=1.0")
    data = load_training_data(cfg)
    assert data.mixes is not None and data.mixes["x"].shape == (12, 128, 96)
    batch = make_batch(data, cfg, data.train_idx[:8], np.random.default_rng(0))
    assert batch["x"].shape[0] == 12 and (batch["labels"][8:] == -1).all()
    assert (batch["indices"][8:] >= len(data.train_idx)).all()  # their own rows in the CRD memory
    assert batch["teacher_embedding"].shape == (12, 1024)
    results = train_student(cfg, tmp_path / "run")
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert record["train_embed"] > 0 and np.isfinite(record["train_loss"])
    assert results["heldout_fewshot"]


def test_audioset_scores_of_the_frozen_teacher_are_a_target_per_crop(teacher_run: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    cfg = student_config(teacher_run, tmp_path, "loss.audioset_weight=0.3")
    data = load_training_data(cfg)
    scores = data.targets["audioset"]
    assert scores.shape[2] == 521 and scores.min() >= 0 and scores.max() <= 1  # sigmoid outputs
    train_student(cfg, tmp_path / "run")
    (record,) = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert record["train_audioset"] > 0
    expected = (0.02 * record["train_ce"] + 0.98 * record["train_kd"] + 0.1 * record["train_crd"]
                + 0.3 * record["train_audioset"])
    assert record["train_loss"] == pytest.approx(expected, rel=1e-4)


def test_the_embedding_target_can_be_whitened_within_the_training_classes(teacher_run: tuple[Path, Path],
                                                                          tmp_path: Path) -> None:
    standard = load_training_data(student_config(teacher_run, tmp_path, "loss.embed_weight=1.0"))
    whitened = load_training_data(student_config(teacher_run, tmp_path, "loss.embed_weight=1.0",
                                                 "loss.embed_whiten=1.0"))
    for data in (standard, whitened):
        e = data.targets["embedding"][data.train_idx].astype(np.float64)  # (N, P, 1024)
        np.testing.assert_allclose(e.mean(axis=(0, 1)), 0.0, atol=2e-2)
    e = whitened.targets["embedding"][whitened.train_idx].astype(np.float64)
    labels = np.repeat(whitened.labels[whitened.train_idx], e.shape[1])
    flat = e.reshape(-1, e.shape[-1])
    centred = flat - np.stack([flat[labels == c].mean(axis=0) for c in labels])
    w = np.linalg.eigvalsh(centred.T @ centred / (len(flat) - len(set(labels))))
    # Within-class eigenvalues w / (w + mean(w)) after whitening with shrinkage 1: all below 1, the largest
    # near 1 (a direction far above the mean), where standardising leaves them anything.
    assert w.max() < 1.0 and w.max() > 0.5
