"""Training losses for ContrastASC: teacher contrastive fine-tuning, then distillation into the student.

Every loss returns the tensor(s) the training loop logs, so nothing is recomputed for the log:

- ``teacher_loss``: ``ce_weight * CE + (1 - ce_weight) * SupCon`` on the teacher's logits and projections
  (Khosla et al. 2020, mixup-aware through soft positive weights).
- ``distill_loss``: ``alpha * CE + beta * KD + gamma * CRD`` on the student (Hinton et al. 2015 for KD,
  Tian et al. 2020 for CRD with class-aware negatives drawn from a ``CRDMemory``).

Soft targets are ``(B, C)`` rows: one-hot, mixup mixtures, or all zeros for an unlabelled input (a mix
of two clips, say), which CE and SupCon leave out of their averages.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against soft targets, averaged over the labelled rows (rows that sum to > 0).

    Args:
        logits: ``(B, C)`` class logits.
        targets: ``(B, C)`` soft labels; an all-zero row marks an unlabelled input.

    Returns:
        Scalar mean over labelled rows; 0 when the batch has none.
    """
    labelled = targets.sum(dim=1) > 0  # (B,)
    if not bool(labelled.any()):
        return logits.new_zeros(())
    per_row = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1)  # (B,)
    return per_row[labelled].mean()


def supcon_loss(features: torch.Tensor, targets: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, the "L_out" form), with soft positive weights.

    The positive weight of pair (i, j) is ``W_ij = y_i . y_j`` with the diagonal removed, so with one-hot
    labels W is the same-class indicator and this is the textbook SupCon; with mixup targets a pair counts
    as positive in proportion to the label mass the two mixtures share. Per anchor i:

        loss_i = - sum_j W_ij log p_ij / sum_j W_ij,   p_ij = exp(s_ij / T) / sum_{k != i} exp(s_ik / T)

    where ``s`` is cosine similarity. Anchors with no positive weight (a class alone in the batch, an
    unlabelled row) are left out of the mean.

    Args:
        features: ``(B, D)`` projected embeddings; normalised here.
        targets: ``(B, C)`` soft labels (one-hot, mixup mixtures, or zero rows for unlabelled inputs).
        temperature: Softmax temperature T.

    Returns:
        Scalar mean over anchors with positives; 0 when no anchor has one.
    """
    batch = features.shape[0]
    self_mask = torch.eye(batch, dtype=torch.bool, device=features.device)  # (B, B)
    weights = (targets @ targets.T).masked_fill(self_mask, 0.0)  # (B, B)
    positive_mass = weights.sum(dim=1)  # (B,)
    has_positives = positive_mass > 0  # (B,)
    if not bool(has_positives.any()):
        return features.new_zeros(())

    z = F.normalize(features, dim=1)  # (B, D)
    logits = z @ z.T / temperature  # (B, B)
    # logsumexp subtracts the row max before exponentiating, so small temperatures cannot overflow;
    # self-similarity is masked out of the denominator as the L_out form asks.
    log_denominator = torch.logsumexp(logits.masked_fill(self_mask, float("-inf")), dim=1, keepdim=True)  # (B, 1)
    # The diagonal of log_prob stays finite (its logit is kept), and its weight is zero, so no 0 * inf.
    log_prob = logits - log_denominator  # (B, B)
    per_anchor = -(weights * log_prob).sum(dim=1)[has_positives] / positive_mass[has_positives]
    return per_anchor.mean()


def teacher_loss(
    logits: torch.Tensor,
    projections: torch.Tensor,
    targets: torch.Tensor,
    *,
    ce_weight: float = 0.25,
    temperature: float = 0.2,
) -> dict[str, torch.Tensor]:
    """Teacher fine-tuning objective: ``ce_weight * CE + (1 - ce_weight) * SupCon``.

    With ``ce_weight=1.0`` (the CE-only baseline) SupCon is still reported, for comparable logs, but is
    computed under ``no_grad`` and is not part of ``loss``.

    Args:
        logits: ``(B, C)`` classifier logits.
        projections: ``(B, D)`` projection-head outputs fed to SupCon.
        targets: ``(B, C)`` soft labels (one-hot or mixup mixtures).
        ce_weight: Weight of CE in [0, 1]; SupCon gets the rest.
        temperature: SupCon temperature.

    Returns:
        ``{"loss", "ce", "supcon"}``, scalars.

    Raises:
        ValueError: If ``ce_weight`` is outside [0, 1].
    """
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must lie in [0, 1], got {ce_weight}")
    ce = _soft_cross_entropy(logits, targets)
    if ce_weight == 1.0:
        with torch.no_grad():
            supcon = supcon_loss(projections, targets, temperature)
        return {"loss": ce, "ce": ce, "supcon": supcon}
    supcon = supcon_loss(projections, targets, temperature)
    return {"loss": ce_weight * ce + (1.0 - ce_weight) * supcon, "ce": ce, "supcon": supcon}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 2.0) -> torch.Tensor:
    """Hinton knowledge distillation: ``KL(softmax(t / T) || softmax(s / T)) * T^2``, batch mean.

    The T^2 factor keeps the gradient scale independent of T (Hinton et al. 2015). The teacher side is a
    target and is detached.

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits.
        temperature: Softening temperature T.

    Returns:
        Scalar KD loss; 0 when the logits are identical.
    """
    log_p_student = F.log_softmax(student_logits / temperature, dim=1)  # (B, C)
    log_p_teacher = F.log_softmax(teacher_logits.detach() / temperature, dim=1)  # (B, C)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * temperature**2


class CRDMemory(nn.Module):
    """The two memory banks of CRD: one student-side and one teacher-side embedding per training sample.

    Rows start as random unit vectors and follow the embeddings of their samples by momentum. Negatives
    are class-aware: an anchor of class c draws uniformly, with replacement as in the reference, from
    the samples whose class is not c, so a same-class sample is never pushed away.

    The sampler's state is not part of ``state_dict``: a resumed run restarts the negative stream from
    ``seed``, which changes which negatives are drawn but not their distribution.

    Args:
        sample_labels: ``(N,)`` class index of every training sample; -1 for unlabelled samples.
        dim: Embedding width.
        momentum: Share of the old row kept at each update.
        seed: Seed of the initial rows and of the negative sampler.

    Raises:
        ValueError: If every labelled sample has the same class, so no negatives exist.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    sample_labels: torch.Tensor
    z_student: torch.Tensor
    z_teacher: torch.Tensor
    _order: torch.Tensor
    _rank: torch.Tensor
    _sorted_labels: torch.Tensor

    def __init__(self, sample_labels: torch.Tensor, dim: int = 128, momentum: float = 0.5, seed: int = 0) -> None:
        super().__init__()
        labels = sample_labels.detach().to(dtype=torch.long).flatten()
        n_samples = labels.numel()
        init = torch.Generator().manual_seed(seed)
        self.register_buffer("student", F.normalize(torch.randn(n_samples, dim, generator=init), dim=1))
        self.register_buffer("teacher", F.normalize(torch.randn(n_samples, dim, generator=init), dim=1))
        self.register_buffer("sample_labels", labels)
        # NCE normalisers, estimated on the first batch (-1: not yet) and kept in checkpoints so a
        # resumed run keeps the same scale.
        # float64: Z grows like N * exp(1 / T) and would overflow float32 at small temperatures.
        self.register_buffer("z_student", torch.tensor(-1.0, dtype=torch.float64))
        self.register_buffer("z_teacher", torch.tensor(-1.0, dtype=torch.float64))
        # Samples sorted by class, so each class is one contiguous block that sampling can skip.
        order = torch.argsort(labels, stable=True)  # (N,)
        self.register_buffer("_order", order, persistent=False)
        self.register_buffer("_rank", torch.argsort(order), persistent=False)  # (N,) position in _order
        self.register_buffer("_sorted_labels", labels[order], persistent=False)

        labelled = labels[labels >= 0]
        largest_class = int(torch.bincount(labelled).max()) if labelled.numel() else 0
        # An unlabelled anchor excludes only itself, so the smallest pool belongs to the largest class.
        self.max_negatives = n_samples - max(largest_class, 1)
        if self.max_negatives < 1:
            raise ValueError("CRD needs negatives: every sample has the same class")
        self.momentum = momentum
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._generator_device: torch.device | None = None

    @property
    def n_samples(self) -> int:
        """Number of training samples N (rows of each bank)."""
        return self.student.shape[0]

    def _sampler(self, device: torch.device) -> torch.Generator:
        # A generator cannot follow the module across .to(device), so one is made on the banks' device
        # (CPU or CUDA) on first use and whenever they move. The device is compared with the one asked
        # for, not with generator.device, which may spell it differently ("cuda" vs "cuda:0") and would
        # then re-seed on every call, repeating the same negatives.
        if self._generator is None or self._generator_device != device:
            self._generator = torch.Generator(device=device).manual_seed(self.seed)
            self._generator_device = device
        return self._generator

    def sample_negatives(self, indices: torch.Tensor, labels_of_batch: torch.Tensor, k: int) -> torch.Tensor:
        """Draw negative sample indices per anchor, uniformly from the samples of other classes.

        Args:
            indices: ``(B,)`` dataset indices of the batch.
            labels_of_batch: ``(B,)`` class of each anchor; -1 (unlabelled) draws from all other samples.
            k: Negatives per anchor, clipped to the smallest pool any anchor can have.

        Returns:
            ``(B, k')`` long tensor of dataset indices, ``k' = min(k, max_negatives)``.
        """
        k = min(k, self.max_negatives)
        device = self._order.device
        indices = indices.to(device=device, dtype=torch.long)
        labels_of_batch = labels_of_batch.to(device=device, dtype=torch.long)
        # The excluded block in _order: the anchor's class, or only the anchor itself when unlabelled.
        class_start = torch.searchsorted(self._sorted_labels, labels_of_batch, right=False)  # (B,)
        class_end = torch.searchsorted(self._sorted_labels, labels_of_batch, right=True)  # (B,)
        unlabelled = labels_of_batch < 0
        start = torch.where(unlabelled, self._rank[indices], class_start)  # (B,)
        excluded = torch.where(unlabelled, torch.ones_like(start), class_end - class_start)  # (B,)
        pool = (self.n_samples - excluded).unsqueeze(1)  # (B, 1)

        uniform = torch.rand((indices.shape[0], k), generator=self._sampler(device), device=device)  # (B, k)
        # clamp: u * pool can round up to pool in float32 for u just below 1.
        position = (uniform * pool).long().clamp_max(pool - 1)  # (B, k) in [0, pool)
        position = position + excluded.unsqueeze(1) * (position >= start.unsqueeze(1))  # skip the block
        return self._order[position]

    @torch.no_grad()
    def update(self, indices: torch.Tensor, student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> None:
        """Move the batch's rows toward their new embeddings by momentum, then re-normalise them.

        Args:
            indices: ``(B,)`` dataset indices of the batch.
            student_emb: ``(B, D)`` normalised student embeddings.
            teacher_emb: ``(B, D)`` normalised teacher embeddings.
        """
        indices = indices.to(device=self.student.device, dtype=torch.long)
        for bank, emb in ((self.student, student_emb), (self.teacher, teacher_emb)):
            rows = self.momentum * bank[indices] + (1.0 - self.momentum) * emb.detach().to(bank)  # (B, D)
            bank.index_copy_(0, indices, F.normalize(rows, dim=1))


def _nce_loss(scores: torch.Tensor, log_z: torch.Tensor, n_data: int) -> torch.Tensor:
    """NCE loss of CRD (Tian et al. 2020, Eq. 18), computed in log space.

    With ``P = exp(s / T) / Z`` and noise mass ``m / N`` for m negatives over N samples, the positive
    (column 0) contributes ``log P / (P + m / N)`` and each negative ``log (m / N) / (P + m / N)``.
    Working with logs replaces the reference's ``+ eps`` guard with exact ``logaddexp``.

    Args:
        scores: ``(B, 1 + m)`` similarities over T, positive first.
        log_z: Scalar log of the normaliser Z.
        n_data: Number of training samples N.

    Returns:
        Scalar loss, summed over the pairs of an anchor and averaged over anchors.
    """
    n_negatives = scores.shape[1] - 1
    log_p = scores - log_z  # (B, 1 + m)
    log_noise = torch.full_like(log_p, math.log(n_negatives / n_data))  # (B, 1 + m)
    log_total = torch.logaddexp(log_p, log_noise)  # (B, 1 + m)
    log_d1 = log_p[:, 0] - log_total[:, 0]  # (B,)
    log_d0 = log_noise[:, 1:] - log_total[:, 1:]  # (B, m)
    return -(log_d1.sum() + log_d0.sum()) / scores.shape[0]


def _log_normaliser(z_buffer: torch.Tensor, scores: torch.Tensor, n_data: int) -> torch.Tensor:
    """Log Z, estimating Z on first use as ``N * mean(exp(scores))`` over the batch (as the reference)."""
    if bool(z_buffer < 0):
        with torch.no_grad():
            log_mean = torch.logsumexp(scores.flatten(), dim=0) - math.log(scores.numel())
            z_buffer.fill_(math.exp(float(log_mean)) * n_data)
    return z_buffer.log().to(scores.dtype)


def crd_loss(
    student_emb: torch.Tensor,
    teacher_emb: torch.Tensor,
    indices: torch.Tensor,
    labels: torch.Tensor,
    memory: CRDMemory,
    *,
    k: int = 4096,
    temperature: float = 0.07,
) -> dict[str, torch.Tensor]:
    """Contrastive representation distillation (Tian et al. 2020), NCE form with a fixed normaliser Z.

    Both directions share one draw of class-aware negatives: ``crd_s`` takes the student embedding as
    anchor against the teacher bank (positive: the teacher row of the same sample), ``crd_t`` the
    teacher embedding against the student bank. Bank rows are detached, so with a frozen teacher
    projection only ``crd_s`` carries gradient. Z is set once per direction, on the first call, from that
    batch's scores and kept in ``memory``; it is tied to ``temperature``, which should not change during
    a run. The banks are updated with this batch after the loss is computed.

    Args:
        student_emb: ``(B, D)`` student embeddings (its MLP head); normalised here.
        teacher_emb: ``(B, D)`` teacher embeddings (its frozen projection); normalised here.
        indices: ``(B,)`` dataset indices of the batch.
        labels: ``(B,)`` class of each row, -1 for unlabelled inputs.
        memory: The banks; N is taken from it.
        k: Negatives per anchor, clipped to what the banks can supply.
        temperature: Temperature T of the similarities.

    Returns:
        ``{"crd", "crd_s", "crd_t"}``, scalars, with ``crd = crd_s + crd_t``.
    """
    student = F.normalize(student_emb, dim=1)  # (B, D)
    teacher = F.normalize(teacher_emb, dim=1)  # (B, D)
    indices = indices.to(device=memory.student.device, dtype=torch.long)
    negatives = memory.sample_negatives(indices, labels, k)  # (B, m)
    contrast = torch.cat([indices.unsqueeze(1), negatives], dim=1)  # (B, 1 + m), positive first

    scores_s = torch.einsum("bkd,bd->bk", memory.teacher[contrast].to(student), student) / temperature  # (B, 1 + m)
    scores_t = torch.einsum("bkd,bd->bk", memory.student[contrast].to(teacher), teacher) / temperature  # (B, 1 + m)
    crd_s = _nce_loss(scores_s, _log_normaliser(memory.z_student, scores_s, memory.n_samples), memory.n_samples)
    crd_t = _nce_loss(scores_t, _log_normaliser(memory.z_teacher, scores_t, memory.n_samples), memory.n_samples)

    memory.update(indices, student, teacher)
    return {"crd": crd_s + crd_t, "crd_s": crd_s, "crd_t": crd_t}


def distill_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    targets: torch.Tensor,
    student_emb: torch.Tensor | None,
    teacher_emb: torch.Tensor | None,
    indices: torch.Tensor | None,
    labels: torch.Tensor | None,
    memory: CRDMemory | None,
    *,
    alpha: float = 0.02,
    beta: float = 0.98,
    gamma: float = 0.1,
    kd_temperature: float = 2.0,
    crd_temperature: float = 0.07,
    crd_k: int = 4096,
) -> dict[str, torch.Tensor]:
    """Student distillation objective: ``alpha * CE + beta * KD + gamma * CRD``.

    CE averages over labelled rows only (all-zero target rows are unlabelled inputs such as mixes of two
    clips); KD and CRD use every row, and an unlabelled row (label -1) draws CRD negatives from all other
    samples. ``beta=0`` skips KD and ``gamma=0`` skips CRD: a skipped term is reported as 0 and its inputs
    may be None.

    Args:
        student_logits: ``(B, C)`` student logits.
        teacher_logits: ``(B, C)`` teacher logits; may be None when ``beta == 0``.
        targets: ``(B, C)`` soft labels, zero rows for unlabelled inputs.
        student_emb: ``(B, D)`` student CRD embeddings; may be None when ``gamma == 0``.
        teacher_emb: ``(B, D)`` teacher CRD embeddings; may be None when ``gamma == 0``.
        indices: ``(B,)`` dataset indices; may be None when ``gamma == 0``.
        labels: ``(B,)`` class per row, -1 for unlabelled; may be None when ``gamma == 0``.
        memory: CRD banks; may be None when ``gamma == 0``.
        alpha: CE weight.
        beta: KD weight.
        gamma: CRD weight.
        kd_temperature: KD temperature.
        crd_temperature: CRD temperature.
        crd_k: CRD negatives per anchor.

    Returns:
        ``{"loss", "ce", "kd", "crd"}``, scalars.

    Raises:
        ValueError: If a term is weighted but its inputs are missing.
    """
    ce = _soft_cross_entropy(student_logits, targets)
    zero = student_logits.new_zeros(())
    kd = zero
    if beta != 0.0:
        if teacher_logits is None:
            raise ValueError("beta > 0 needs teacher_logits")
        kd = kd_loss(student_logits, teacher_logits, kd_temperature)
    crd = zero
    if gamma != 0.0:
        if student_emb is None or teacher_emb is None or indices is None or labels is None or memory is None:
            raise ValueError("gamma > 0 needs student_emb, teacher_emb, indices, labels and memory")
        crd = crd_loss(student_emb, teacher_emb, indices, labels, memory, k=crd_k, temperature=crd_temperature)["crd"]
    return {"loss": alpha * ce + beta * kd + gamma * crd, "ce": ce, "kd": kd, "crd": crd}
