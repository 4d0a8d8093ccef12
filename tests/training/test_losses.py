"""Losses: SupCon, teacher objective, KD, CRD memory and loss, and the combined distillation objective."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from sceneprint.training.losses import (
    CRDMemory,
    crd_loss,
    distill_loss,
    kd_loss,
    supcon_loss,
    teacher_loss,
)


def supcon_by_loops(features: torch.Tensor, targets: torch.Tensor, temperature: float) -> float:
    """Soft-weighted SupCon written out pair by pair; the textbook L_out when targets are one-hot."""
    z = F.normalize(features.double(), dim=1)
    n = z.shape[0]
    losses = []
    for i in range(n):
        denominator = sum(math.exp(float(z[i] @ z[k]) / temperature) for k in range(n) if k != i)
        weighted, mass = 0.0, 0.0
        for j in range(n):
            if j == i:
                continue
            w = float(targets[i].double() @ targets[j].double())
            if w > 0:
                log_p = float(z[i] @ z[j]) / temperature - math.log(denominator)
                weighted += w * log_p
                mass += w
        if mass > 0:
            losses.append(-weighted / mass)
    return sum(losses) / len(losses)


def textbook_supcon(features: torch.Tensor, classes: list[int], temperature: float) -> float:
    """Khosla et al. Eq. 2: -1/|P(i)| sum_{p in P(i)} log softmax over A(i), averaged over anchors with P(i)."""
    z = F.normalize(features.double(), dim=1)
    n = z.shape[0]
    losses = []
    for i in range(n):
        others = [a for a in range(n) if a != i]
        positives = [p for p in others if classes[p] == classes[i]]
        if not positives:
            continue
        log_denominator = math.log(sum(math.exp(float(z[i] @ z[a]) / temperature) for a in others))
        losses.append(-sum(float(z[i] @ z[p]) / temperature - log_denominator for p in positives) / len(positives))
    return sum(losses) / len(losses)


# --- SupCon ---------------------------------------------------------------------------------------------------


def test_supcon_matches_hand_computed_three_sample_case() -> None:
    # z0=(1,0), z1=(0,1), z2=(-1,0); classes a, a, b; T=0.5 -> s/T: s01=0, s02=-2, s12=0.
    # anchor 0: p01 = 1 / (1 + e^-2)  -> log(1 + e^-2) = 0.126928
    # anchor 1: p10 = 1 / (1 + 1)     -> log 2         = 0.693147
    # anchor 2: no positive, skipped. Mean: 0.410038
    features = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0]])  # unnormalised on purpose
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    loss = supcon_loss(features, targets, temperature=0.5)
    assert float(loss) == pytest.approx((math.log(1 + math.exp(-2)) + math.log(2)) / 2, abs=1e-6)
    assert float(loss) == pytest.approx(0.410038, abs=1e-6)


def test_supcon_with_one_hot_labels_is_the_textbook_loss() -> None:
    generator = torch.Generator().manual_seed(0)
    features = torch.randn(7, 5, generator=generator)
    classes = [0, 1, 0, 2, 1, 0, 3]  # class 3 has a single sample: its anchor is skipped
    targets = F.one_hot(torch.tensor(classes), 4).float()
    for temperature in (0.1, 0.2, 1.0):
        loss = supcon_loss(features, targets, temperature)
        assert float(loss) == pytest.approx(textbook_supcon(features, classes, temperature), rel=1e-5)


def test_supcon_with_mixup_targets_weights_pairs_by_shared_label_mass() -> None:
    generator = torch.Generator().manual_seed(1)
    features = torch.randn(6, 4, generator=generator)
    targets = torch.tensor(
        [
            [0.7, 0.3, 0.0],
            [1.0, 0.0, 0.0],
            [0.0, 0.4, 0.6],
            [0.0, 1.0, 0.0],
            [0.5, 0.0, 0.5],
            [0.0, 0.0, 1.0],
        ]
    )
    loss = supcon_loss(features, targets, temperature=0.2)
    assert float(loss) == pytest.approx(supcon_by_loops(features, targets, 0.2), rel=1e-5)


def test_supcon_skips_unlabelled_rows_and_is_zero_without_positives() -> None:
    generator = torch.Generator().manual_seed(2)
    features = torch.randn(4, 3, generator=generator)
    targets = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.0, 1.0]])
    with_unlabelled = supcon_loss(features, targets)
    assert float(with_unlabelled) == pytest.approx(supcon_by_loops(features, targets, 0.2), rel=1e-5)
    distinct = torch.eye(4)
    assert float(supcon_loss(features, distinct)) == 0.0


def test_supcon_on_clustered_features_falls_with_lower_temperature() -> None:
    # Positives closer than negatives: a sharper softmax puts more mass on them.
    features = torch.tensor([[1.0, 0.1], [1.0, -0.1], [-0.1, 1.0], [0.1, 1.0]])
    targets = F.one_hot(torch.tensor([0, 0, 1, 1]), 2).float()
    assert float(supcon_loss(features, targets, 0.1)) < float(supcon_loss(features, targets, 1.0))


def test_supcon_is_stable_at_tiny_temperature_and_has_gradients() -> None:
    features = torch.randn(8, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    targets = F.one_hot(torch.arange(8) % 3, 3).float()
    loss = supcon_loss(features, targets, temperature=1e-3)
    loss.backward()
    assert torch.isfinite(loss)
    assert features.grad is not None and torch.isfinite(features.grad).all()


# --- teacher objective ----------------------------------------------------------------------------------------


def test_teacher_loss_combines_ce_and_supcon_with_ce_weight() -> None:
    generator = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 3, generator=generator)
    projections = torch.randn(6, 8, generator=generator)
    targets = F.one_hot(torch.tensor([0, 1, 2, 0, 1, 2]), 3).float()
    terms = teacher_loss(logits, projections, targets, ce_weight=0.25, temperature=0.2)
    assert set(terms) == {"loss", "ce", "supcon"}
    assert float(terms["ce"]) == pytest.approx(float(F.cross_entropy(logits, targets.argmax(1))), rel=1e-6)
    assert float(terms["supcon"]) == pytest.approx(float(supcon_loss(projections, targets, 0.2)), rel=1e-6)
    assert float(terms["loss"]) == pytest.approx(0.25 * float(terms["ce"]) + 0.75 * float(terms["supcon"]), rel=1e-6)


def test_teacher_loss_ce_only_baseline_reports_supcon_without_its_gradient() -> None:
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(4, 2, generator=generator, requires_grad=True)
    projections = torch.randn(4, 8, generator=generator, requires_grad=True)
    targets = F.one_hot(torch.tensor([0, 1, 0, 1]), 2).float()
    terms = teacher_loss(logits, projections, targets, ce_weight=1.0)
    assert float(terms["supcon"]) > 0 and not terms["supcon"].requires_grad
    terms["loss"].backward()
    assert projections.grad is None and logits.grad is not None
    with pytest.raises(ValueError, match="ce_weight"):
        teacher_loss(logits, projections, targets, ce_weight=1.5)


# --- KD -------------------------------------------------------------------------------------------------------


def test_kd_matches_hand_computed_case_with_temperature_squared() -> None:
    # Teacher [2 ln 3, 0] / T=2 -> p_t = (3/4, 1/4); student [0, 0] -> p_s = (1/2, 1/2).
    # KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812; times T^2 = 4 -> 0.523248.
    teacher = torch.tensor([[2 * math.log(3.0), 0.0]])
    student = torch.zeros(1, 2)
    assert float(kd_loss(student, teacher, temperature=2.0)) == pytest.approx(0.523248, abs=1e-6)


def test_kd_is_zero_for_identical_logits_and_positive_otherwise() -> None:
    generator = torch.Generator().manual_seed(6)
    logits = torch.randn(5, 4, generator=generator)
    assert float(kd_loss(logits, logits.clone())) == pytest.approx(0.0, abs=1e-7)
    assert float(kd_loss(torch.randn(5, 4, generator=generator), logits)) > 0


# --- CRD memory -----------------------------------------------------------------------------------------------


def labelled_memory(n: int = 200, classes: int = 5, dim: int = 16, seed: int = 0) -> CRDMemory:
    labels = torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))
    return CRDMemory(labels, dim=dim, seed=seed)


def test_memory_starts_with_unit_rows_and_registers_its_state_as_buffers() -> None:
    memory = labelled_memory()
    assert memory.student.shape == memory.teacher.shape == (200, 16)
    assert torch.allclose(memory.student.norm(dim=1), torch.ones(200))
    assert torch.allclose(memory.teacher.norm(dim=1), torch.ones(200))
    assert {"student", "teacher", "sample_labels", "z_student", "z_teacher"} <= set(memory.state_dict())


def test_negatives_never_come_from_the_anchors_class() -> None:
    memory = labelled_memory()
    indices = torch.arange(0, 200, 7)
    labels = memory.sample_labels[indices]
    for _ in range(20):
        negatives = memory.sample_negatives(indices, labels, k=100)
        assert negatives.shape == (indices.numel(), 100)
        assert (memory.sample_labels[negatives] != labels.unsqueeze(1)).all()


def test_negatives_change_between_calls_and_repeat_for_the_same_seed() -> None:
    first, second = labelled_memory(), labelled_memory()
    indices = torch.arange(8)
    labels = first.sample_labels[indices]
    draw_a = first.sample_negatives(indices, labels, k=50)
    assert not torch.equal(first.sample_negatives(indices, labels, k=50), draw_a)
    assert torch.equal(second.sample_negatives(indices, labels, k=50), draw_a)


def test_negatives_cover_the_other_classes_uniformly() -> None:
    memory = labelled_memory()
    label = int(memory.sample_labels[0])
    pool = (memory.sample_labels != label).nonzero().flatten()
    draws = memory.sample_negatives(torch.zeros(200, dtype=torch.long), torch.full((200,), label), k=100).flatten()
    counts = torch.bincount(draws, minlength=200)[pool].float()
    expected = draws.numel() / pool.numel()  # about 125 per sample
    assert int(torch.bincount(draws, minlength=200).sum()) == int(counts.sum())  # nothing outside the pool
    assert float(counts.min()) > 0.55 * expected and float(counts.max()) < 1.45 * expected


def test_unlabelled_anchor_draws_from_every_other_sample_but_itself() -> None:
    memory = labelled_memory(n=30, classes=3)
    draws = memory.sample_negatives(torch.full((50,), 4), torch.full((50,), -1), k=200).flatten()
    seen = set(draws.tolist())
    assert 4 not in seen
    assert seen == set(range(30)) - {4}


def test_negatives_are_clipped_to_the_smallest_pool() -> None:
    memory = CRDMemory(torch.tensor([0, 0, 0, 1, 1, 2]), dim=4)
    assert memory.max_negatives == 3
    assert memory.sample_negatives(torch.tensor([0, 3]), torch.tensor([0, 1]), k=4096).shape == (2, 3)
    with pytest.raises(ValueError, match="negatives"):
        CRDMemory(torch.zeros(5, dtype=torch.long))


def test_momentum_update_moves_rows_toward_the_new_embedding_and_keeps_them_unit() -> None:
    memory = labelled_memory(dim=8)
    indices = torch.tensor([3, 10])
    old_student, old_teacher = memory.student[indices].clone(), memory.teacher[indices].clone()
    new = F.normalize(torch.randn(2, 8, generator=torch.Generator().manual_seed(7)), dim=1)
    memory.update(indices, new, new)
    for old, bank in ((old_student, memory.student), (old_teacher, memory.teacher)):
        row = bank[indices]
        assert torch.allclose(row.norm(dim=1), torch.ones(2), atol=1e-6)
        assert torch.allclose(row, F.normalize(0.5 * old + 0.5 * new, dim=1), atol=1e-6)
        assert ((row * new).sum(1) > (old * new).sum(1)).all()
    untouched = torch.ones(200, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(memory.student[untouched], labelled_memory(dim=8).student[untouched])


# --- CRD loss -------------------------------------------------------------------------------------------------


def test_crd_matches_hand_computed_nce_case() -> None:
    # N=2, classes (0, 1): anchor 0's only negative is sample 1, so k is clipped to 1 and the draw is fixed.
    # Banks rows (1,0), (0,1); anchor embedding (1,0); T=1; Z fixed at 2.
    # P_pos = e/2, P_neg = 1/2, noise m/N = 1/2:
    #   -log[(e/2) / (e/2 + 1/2)] - log[(1/2) / (1/2 + 1/2)] = log(1 + e^-1) + log 2 = 1.006409 per direction.
    memory = CRDMemory(torch.tensor([0, 1]), dim=2)
    memory.student.copy_(torch.eye(2))
    memory.teacher.copy_(torch.eye(2))
    memory.z_student.fill_(2.0)
    memory.z_teacher.fill_(2.0)
    anchor = torch.tensor([[3.0, 0.0]])  # normalised inside
    terms = crd_loss(anchor, anchor, torch.tensor([0]), torch.tensor([0]), memory, temperature=1.0)
    expected = math.log(1 + math.exp(-1)) + math.log(2)
    assert float(terms["crd_s"]) == pytest.approx(expected, abs=1e-6)
    assert float(terms["crd_t"]) == pytest.approx(expected, abs=1e-6)
    assert float(terms["crd"]) == pytest.approx(2 * expected, abs=1e-6)


def test_crd_sets_z_on_first_call_then_keeps_it() -> None:
    memory = labelled_memory()
    generator = torch.Generator().manual_seed(8)
    batch = torch.randn(8, 16, generator=generator)
    crd_loss(batch, batch, torch.arange(8), memory.sample_labels[:8], memory, k=32)
    z = (float(memory.z_student), float(memory.z_teacher))
    assert z[0] > 0 and z[1] > 0
    other = torch.randn(8, 16, generator=generator)
    crd_loss(other, other, torch.arange(8, 16), memory.sample_labels[8:16], memory, k=32)
    assert (float(memory.z_student), float(memory.z_teacher)) == z


def test_crd_falls_as_the_student_matches_the_teacher() -> None:
    generator = torch.Generator().manual_seed(9)
    teacher = F.normalize(torch.randn(200, 16, generator=generator), dim=1)
    indices = torch.arange(0, 32)

    def loss_for(student_batch: torch.Tensor) -> float:
        memory = labelled_memory()  # same seed: identical banks and negatives in both calls
        memory.teacher.copy_(teacher)  # the teacher bank already holds the teacher's embeddings
        memory.z_student.fill_(float(200 * math.exp(1.0)))
        memory.z_teacher.fill_(float(200 * math.exp(1.0)))
        labels = memory.sample_labels[indices]
        return float(crd_loss(student_batch, teacher[indices], indices, labels, memory, k=64)["crd_s"])

    matched = loss_for(teacher[indices])
    unrelated = loss_for(torch.randn(32, 16, generator=generator))
    assert matched < unrelated


def test_crd_updates_the_banks_after_computing_the_loss() -> None:
    memory = labelled_memory()
    indices = torch.tensor([1, 2])
    before = memory.student[indices].clone()
    emb = torch.randn(2, 16, generator=torch.Generator().manual_seed(10), requires_grad=True)
    terms = crd_loss(emb, emb.detach(), indices, memory.sample_labels[indices], memory, k=16)
    terms["crd"].backward()
    assert emb.grad is not None and torch.isfinite(emb.grad).all()
    assert not torch.equal(memory.student[indices], before)
    assert not memory.student.requires_grad


# --- distillation objective -----------------------------------------------------------------------------------


def test_distill_loss_combines_its_terms_with_the_weights() -> None:
    generator = torch.Generator().manual_seed(11)
    memory = labelled_memory()
    indices = torch.arange(6)
    labels = memory.sample_labels[indices]
    student_logits, teacher_logits = torch.randn(6, 5, generator=generator), torch.randn(6, 5, generator=generator)
    targets = F.one_hot(labels, 5).float()
    student_emb, teacher_emb = torch.randn(6, 16, generator=generator), torch.randn(6, 16, generator=generator)
    terms = distill_loss(
        student_logits,
        teacher_logits,
        targets,
        student_emb,
        teacher_emb,
        indices,
        labels,
        memory,
        alpha=0.3,
        beta=0.5,
        gamma=0.2,
        crd_k=32,
    )
    assert set(terms) == {"loss", "ce", "kd", "crd"}
    assert float(terms["ce"]) == pytest.approx(float(F.cross_entropy(student_logits, labels)), rel=1e-6)
    assert float(terms["kd"]) == pytest.approx(float(kd_loss(student_logits, teacher_logits, 2.0)), rel=1e-6)
    assert float(terms["crd"]) > 0
    combined = 0.3 * float(terms["ce"]) + 0.5 * float(terms["kd"]) + 0.2 * float(terms["crd"])
    assert float(terms["loss"]) == pytest.approx(combined, rel=1e-6)


def test_distill_loss_ce_ignores_unlabelled_rows() -> None:
    generator = torch.Generator().manual_seed(12)
    logits = torch.randn(4, 3, generator=generator)
    targets = torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    ce = distill_loss(logits, None, targets, None, None, None, None, None, beta=0.0, gamma=0.0)["ce"]
    assert float(ce) == pytest.approx(float(F.cross_entropy(logits[[0, 2]], torch.tensor([0, 2]))), rel=1e-6)
    shifted = logits.clone()
    shifted[[1, 3]] += torch.randn(2, 3, generator=generator) * 10
    again = distill_loss(shifted, None, targets, None, None, None, None, None, beta=0.0, gamma=0.0)["ce"]
    assert float(again) == float(ce)
    none_labelled = distill_loss(logits, None, torch.zeros(4, 3), None, None, None, None, None, beta=0.0, gamma=0.0)
    assert float(none_labelled["ce"]) == 0.0


def test_distill_loss_skips_weightless_terms_and_rejects_missing_inputs() -> None:
    generator = torch.Generator().manual_seed(13)
    student_logits, teacher_logits = torch.randn(3, 4, generator=generator), torch.randn(3, 4, generator=generator)
    targets = F.one_hot(torch.tensor([0, 1, 2]), 4).float()
    terms = distill_loss(student_logits, teacher_logits, targets, None, None, None, None, None, gamma=0.0)
    assert float(terms["crd"]) == 0.0
    assert float(terms["loss"]) == pytest.approx(0.02 * float(terms["ce"]) + 0.98 * float(terms["kd"]), rel=1e-6)
    with pytest.raises(ValueError, match="gamma"):
        distill_loss(student_logits, teacher_logits, targets, None, None, None, None, None)
    with pytest.raises(ValueError, match="beta"):
        distill_loss(student_logits, None, targets, None, None, None, None, None, gamma=0.0)


def test_distill_loss_unlabelled_rows_take_crd_negatives_from_all_other_samples() -> None:
    generator = torch.Generator().manual_seed(14)
    memory = labelled_memory()
    indices = torch.tensor([0, 1])
    labels = torch.tensor([int(memory.sample_labels[0]), -1])
    targets = torch.zeros(2, 5)
    targets[0, labels[0]] = 1.0
    terms = distill_loss(
        torch.randn(2, 5, generator=generator),
        torch.randn(2, 5, generator=generator),
        targets,
        torch.randn(2, 16, generator=generator),
        torch.randn(2, 16, generator=generator),
        indices,
        labels,
        memory,
        crd_k=64,
    )
    assert all(torch.isfinite(value) for value in terms.values())


# --- devices --------------------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_losses_run_on_cuda_with_a_cuda_sampler() -> None:
    device = torch.device("cuda")
    memory = labelled_memory().to(device)
    indices = torch.arange(16, device=device)
    labels = memory.sample_labels[indices]
    negatives = memory.sample_negatives(indices, labels, k=128)
    assert negatives.device.type == "cuda"
    assert (memory.sample_labels[negatives] != labels.unsqueeze(1)).all()
    generator = torch.Generator().manual_seed(15)
    features, emb = torch.randn(16, 16, generator=generator), torch.randn(16, 16, generator=generator)
    targets = F.one_hot(labels.cpu(), 5).float()
    on_cpu = supcon_loss(features, targets)
    on_gpu = supcon_loss(features.to(device), targets.to(device))
    assert float(on_gpu) == pytest.approx(float(on_cpu), rel=1e-4)
    terms = crd_loss(emb.to(device), emb.to(device), indices, labels, memory, k=128)
    assert terms["crd"].device.type == "cuda" and torch.isfinite(terms["crd"])
