"""Stage 2 of ContrastASC: distil the fine-tuned teacher into a CP-Mobile student with CE + KD + CRD.

The student (BatchNorm blocks, LayerNorm on the pooled embedding by default) reads 0.96 s log-mel
crops; the teacher's outputs for exactly those 0.96 s (its training-class logits for KD, its frozen
stage-1 projection for CRD) are computed once per clip and crop position and cached, which is
cheaper here than running the 3.7M-parameter teacher beside every student step (see
``docs/results.md``). Student augmentation as in the paper's stage 2: Freq-MixStyle, frequency
masking, time rolling and frequency shift; no mixup.

One code path for one process and for several (``torchrun``, DistributedDataParallel; gloo on CPU,
NCCL on GPU): every rank draws the same global batch and augmentation, trains on its own slice, and
the student's outputs are all-gathered (with gradients) before the loss, so the loss is the
full-batch loss. One process with ``ghost_batches=W`` computes exactly what W ranks compute.

    sceneprint train student training/configs/student-contrastasc.json --out runs/student-60k
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sceneprint.bundle import save_bundle, sha256_file
from sceneprint.complexity import complexity_card
from sceneprint.config import from_dict, to_dict
from sceneprint.cpmobile import Norm, OutputNorm, parameter_count, preset
from sceneprint.encoder import Encoder, WindowConfig
from sceneprint.frontend import LogMelConfig
from sceneprint.training.checkpoint import load_checkpoint, save_checkpoint
from sceneprint.training.data import (
    ClipMeta,
    FewShotSplit,
    cached_logmels,
    dev_data_root,
    load_meta,
    load_split,
    save_cache,
)
from sceneprint.training.evaluate import calibrated_threshold, heldout_report
from sceneprint.training.fewshot import evaluate
from sceneprint.training.heads import CosineClassifier, ProjectionMLP
from sceneprint.training.losses import CRDMemory, distill_loss
from sceneprint.training.schedule import lr_at
from sceneprint.training.teacher import Teacher, TeacherConfig, yamnet_logmels

CROP_FRAMES = 96  # 0.96 s at 100 frames per second: one YAMNet patch, so teacher and student see the same audio


@dataclass(frozen=True)
class StudentDataConfig:
    root: str = ""  # empty: $SCENEPRINT_DEV_DATA or ../shared/data/sceneprint-dev
    split: str = "fewshot-v1"
    cache_dir: str = "cache"
    # "train": the split's training classes (research figures); "all": every class of the data set
    # (the shipped model, once the recipe is fixed on the split).
    classes: str = "train"


@dataclass(frozen=True)
class StudentOptimConfig:
    epochs: int = 100
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 1e-3
    warmup_epochs: int = 4
    crops_per_clip: int = 2  # crops of each clip per epoch (different positions)
    # Unlabelled inputs (KD, CRD and the embedding term need no label): waveform mixes of two training
    # clips of different classes, which the teacher embeds though no class fits. ``mix_bank`` mixes are
    # made and embedded by the teacher once (cached); ``mix_per_batch`` of them join every batch.
    mix_bank: int = 0
    mix_per_batch: int = 0


@dataclass(frozen=True)
class StudentAugmentConfig:
    mixstyle_p: float = 0.4  # share of the batch whose per-band statistics are mixed (Freq-MixStyle)
    mixstyle_alpha: float = 0.3
    freq_mask: int = 16  # widest mask, in mel bands (of 128)
    time_roll: int = 24  # largest circular shift in frames
    freq_shift: int = 4  # largest shift in mel bands
    gain_db: float = 6.0


@dataclass(frozen=True)
class LossConfig:
    alpha: float = 0.02  # CE
    beta: float = 0.98  # KD
    gamma: float = 0.1  # CRD
    kd_temperature: float = 2.0
    crd_temperature: float = 0.07
    crd_negatives: int = 4096
    crd_momentum: float = 0.5
    # CRD's teacher side: the frozen stage-1 projection (the paper), or the backbone's 1,024-d embedding
    # through a trainable linear map to 128 (Tian et al.'s original CRD).
    crd_teacher: str = "projection"
    # Beyond the paper: regression of the teacher backbone's 1,024-d embedding (standardised per dimension)
    # through a linear map from the student's embedding, as 1 - cosine. It carries what the teacher
    # knows beyond the training classes, which KD (training-class logits) and a 128-d projection do not.
    embed_weight: float = 0.0
    # How that embedding is made a target: negative, standardised per dimension; >= 0, whitened within
    # classes (the training classes' crops) with this shrinkage (``sceneprint.training.whitening``).
    embed_whiten: float = -1.0
    # Beyond the paper: binary cross-entropy to the AudioSet-pretrained YAMNet's 521 scores (its sigmoid
    # outputs, frozen weights) through a linear head: the teacher's knowledge of 521 classes, not 30.
    audioset_weight: float = 0.0


@dataclass(frozen=True)
class StudentConfig:
    """Everything a student run needs; written beside its outputs as ``config.json``."""

    model: str = "cpmobile_60k"
    norm: Norm = "batch"
    output_norm: OutputNorm = "layer"
    teacher: str = "runs/teacher-supcon"  # a teacher run directory (config.json + checkpoint.pt); "" = none
    teacher_hop_frames: int = 16  # cached teacher outputs every 0.16 s
    head_scale: float = 16.0
    projection_hidden: int = 256
    seed: int = 0
    threads: int = 2
    ghost_batches: int = 1  # one process computing what this many DDP ranks would (BatchNorm per slice)
    eval_every: int = 10
    eval_episodes: int = 300
    final_episodes: int = 2000
    model_version: str = "sceneprint-cpmobile-contrastasc-v1"
    # enrollment checks of the exported bundle: the quantile of genuine training-class enrollments each bound refuses
    enrollment_false_refusal: float = 0.005
    # Beyond the paper: fold a within-class whitening of the embedding, fitted on the training classes after
    # training, into the exported bundle (``sceneprint.training.whitening``; its figures are the whitened ones).
    whiten: bool = False
    frontend: LogMelConfig = field(default_factory=LogMelConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    data: StudentDataConfig = field(default_factory=StudentDataConfig)
    optim: StudentOptimConfig = field(default_factory=StudentOptimConfig)
    augment: StudentAugmentConfig = field(default_factory=StudentAugmentConfig)
    loss: LossConfig = field(default_factory=LossConfig)

    def __post_init__(self) -> None:
        if self.data.classes not in ("train", "all"):
            raise ValueError(f"data.classes must be 'train' or 'all', not {self.data.classes!r}")
        if self.loss.crd_teacher not in ("projection", "embedding"):
            raise ValueError(f"loss.crd_teacher must be 'projection' or 'embedding', not {self.loss.crd_teacher!r}")
        if self.optim.mix_bank and self.loss.audioset_weight:
            raise ValueError("the mix bank holds no AudioSet scores: use optim.mix_bank or loss.audioset_weight")
        if not self.teacher and (self.loss.beta or self.loss.gamma):
            raise ValueError("without a teacher, loss.beta and loss.gamma must be 0 (CE alone)")


class Student(nn.Module):
    """CP-Mobile encoder + the training heads: a cosine classifier and a 2-layer MLP to CRD's 128-d space."""

    def __init__(self, cfg: StudentConfig, n_classes: int) -> None:
        super().__init__()
        self.encoder = Encoder(cfg.frontend, preset(cfg.model, cfg.norm, cfg.output_norm), cfg.window)
        d = self.encoder.embedding_dim
        self.classifier = CosineClassifier(d, n_classes, cfg.head_scale)
        self.projection = ProjectionMLP(d, cfg.projection_hidden, 128)
        # Only for crd_teacher="embedding": the teacher side's trainable map (not part of the bundle).
        self.teacher_embed = nn.Linear(1024, 128) if cfg.loss.crd_teacher == "embedding" else None
        # Only for embed_weight > 0: the student's map to the teacher's 1,024-d embedding (not in the bundle).
        self.embed_head = nn.Linear(d, 1024) if cfg.loss.embed_weight > 0 else None
        # Only for audioset_weight > 0: logits of the 521 AudioSet classes (not in the bundle).
        self.audioset_head = nn.Linear(d, 521) if cfg.loss.audioset_weight > 0 else None

    def forward(self, logmel: torch.Tensor) -> dict[str, torch.Tensor]:
        """Log-mel crops (B, 1, F, T) -> logits (B, C), CRD embedding (B, 128) and, if used, (B, 1024)."""
        z = self.encoder.network.forward_normalized(logmel)  # (B, D) after the output normalisation
        out = {"logits": self.classifier(z), "projection": self.projection(z)}
        if self.embed_head is not None:
            out["embedding"] = self.embed_head(z)
        if self.audioset_head is not None:
            out["audioset"] = self.audioset_head(z)
        return out


# ---- the teacher's cached outputs ----


def load_teacher(run_dir: Path) -> tuple[Teacher, TeacherConfig, list[str]]:
    """The fine-tuned teacher of a stage-1 run (its config and weights-only checkpoint), in eval mode."""
    cfg = from_dict(TeacherConfig, json.loads((run_dir / "config.json").read_text()))
    state = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    n_classes = state["classifier.weight"].shape[0]
    teacher = Teacher(cfg, n_classes)
    teacher.load_state_dict(state, strict=True)
    root = dev_data_root(cfg.data.root or None)
    return teacher.eval(), cfg, sorted(load_split(root, cfg.data.split).train_classes)


def teacher_targets(run_dir: Path, root: Path, meta: list[ClipMeta], hop: int, cache_dir: Path,
                    positions: int, keys: tuple[str, ...] = ("logits", "projection")) -> dict[str, np.ndarray]:
    """Teacher outputs at crop starts 0, hop, 2*hop, ... (P positions): ``keys`` of logits (N, P, C),
    projection (N, P, 128) and embedding (N, P, 1024, the backbone's).

    Cached per teacher checkpoint (by hash), hop, outputs and clip list.
    """
    digest = sha256_file(run_dir / "checkpoint.pt")[:12]
    names = hashlib.sha256("\n".join(c.filename for c in meta).encode()).hexdigest()[:12]
    suffix = "" if keys == ("logits", "projection") else "-" + "-".join(keys)
    path = cache_dir / f"teacher-{digest}-hop{hop}-p{positions}-{names}{suffix}.npz"
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    teacher, tcfg, _ = load_teacher(run_dir)
    feats = yamnet_logmels(root, meta, tcfg.frontend, cache_dir)  # (N, 64, T)
    out: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    with torch.inference_mode():
        for i in tqdm(range(len(meta)), desc="teacher outputs", unit="clip"):
            x = torch.from_numpy(feats[i].T.astype(np.float32))  # (T, 64)
            patches = torch.stack([x[p * hop : p * hop + CROP_FRAMES] for p in range(positions)])  # (P, 96, 64)
            o = teacher(patches)
            for k in keys:
                out[k].append(o[k].numpy().astype(np.float16))
    result = {k: np.stack(v) for k, v in out.items()}
    save_cache(path, result)
    return result


def audioset_targets(root: Path, meta: list[ClipMeta], hop: int, cache_dir: Path, positions: int,
                     frontend: Any) -> np.ndarray:
    """The pretrained (frozen) YAMNet's 521 AudioSet scores (N, P, 521) at every crop position, cached."""
    from sceneprint.yamnet import pretrained_yamnet

    names = hashlib.sha256("\n".join(c.filename for c in meta).encode()).hexdigest()[:12]
    path = cache_dir / f"audioset-scores-hop{hop}-p{positions}-{names}.npy"
    if path.is_file():
        return np.load(path)
    model = pretrained_yamnet()
    feats = yamnet_logmels(root, meta, frontend, cache_dir)  # (N, 64, T)
    out = []
    with torch.inference_mode():
        for i in tqdm(range(len(meta)), desc="AudioSet scores", unit="clip"):
            x = torch.from_numpy(feats[i].T.astype(np.float32))  # (T, 64)
            patches = torch.stack([x[p * hop : p * hop + CROP_FRAMES] for p in range(positions)])  # (P, 96, 64)
            out.append(torch.sigmoid(model(patches)[1]).numpy().astype(np.float16))
    scores = np.stack(out)
    save_cache(path, scores)
    return scores


# ---- augmentation (student side only) ----


def augment_student(x: torch.Tensor, cfg: StudentAugmentConfig, norm_std: float, rng: np.random.Generator
                    ) -> torch.Tensor:
    """Freq-MixStyle, level change, time rolling, frequency shift and masking on (B, 1, F, T) log-mels."""
    b, _, n_freq, _ = x.shape
    if cfg.mixstyle_p > 0:
        # Freq-MixStyle (Schmid et al.): mix each band's statistics over time with another clip's, which
        # mimics a different recording device.
        chosen = torch.from_numpy(rng.random(b) < cfg.mixstyle_p)
        mu = x.mean(dim=3, keepdim=True)  # (B, 1, F, 1)
        sig = (x.var(dim=3, keepdim=True) + 1e-6).sqrt()
        lam = torch.from_numpy(rng.beta(cfg.mixstyle_alpha, cfg.mixstyle_alpha, size=b).astype(np.float32))
        lam = lam.view(b, 1, 1, 1)
        perm = torch.from_numpy(rng.permutation(b))
        mixed = ((x - mu) / sig) * (lam * sig + (1 - lam) * sig[perm]) + lam * mu + (1 - lam) * mu[perm]
        x = torch.where(chosen.view(b, 1, 1, 1), mixed, x)
    gains = rng.uniform(-cfg.gain_db, cfg.gain_db, size=b) * math.log(10) / 10 / norm_std
    x = x + torch.from_numpy(gains.astype(np.float32)).view(b, 1, 1, 1)
    out = torch.empty_like(x)
    floor = float(x.min())
    for i in range(b):
        xi = torch.roll(x[i], int(rng.integers(-cfg.time_roll, cfg.time_roll + 1)), dims=2)
        shift = int(rng.integers(-cfg.freq_shift, cfg.freq_shift + 1))
        if shift:
            xi = torch.roll(xi, shift, dims=1)
            if shift > 0:
                xi[:, :shift] = floor
            else:
                xi[:, shift:] = floor
        f = int(rng.integers(0, cfg.freq_mask + 1))
        f0 = int(rng.integers(0, n_freq - f + 1))
        xi[:, f0 : f0 + f] = 0.0
        out[i] = xi
    return out


# ---- distribution ----


def distributed_setup() -> tuple[int, int]:
    """(rank, world size); joins the process group that ``torchrun`` describes, if any."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if torch.cuda.is_available() else "gloo")
    return (dist.get_rank(), world) if world > 1 else (0, 1)


def gather_outputs(out: dict[str, torch.Tensor], world: int) -> dict[str, torch.Tensor]:
    """All ranks' outputs, concatenated in rank order, with gradients flowing back to each rank's slice."""
    if world == 1:
        return out
    import torch.distributed.nn.functional as dist_fn

    return {k: torch.cat(dist_fn.all_gather(v)) for k, v in out.items()}


# ---- training ----


@dataclass
class TrainingData:
    feats: np.ndarray  # (N, F, T) student log-mels, float16
    targets: dict[str, np.ndarray]  # teacher outputs (N, P, ...) or empty
    labels: np.ndarray  # (N,) class index, -1 outside the training classes
    memory_row: np.ndarray  # (N,) the clip's row in the CRD memory bank (its position in train_idx), -1 if none
    classes: list[str]
    train_idx: np.ndarray
    val_idx: np.ndarray
    held_idx: np.ndarray
    meta: list[ClipMeta]
    split: FewShotSplit
    root: Path
    mixes: dict[str, np.ndarray] | None = None  # the unlabelled mix bank: student crops and teacher outputs


def load_training_data(cfg: StudentConfig) -> TrainingData:
    root = dev_data_root(cfg.data.root or None)
    meta, split = load_meta(root), load_split(root, cfg.data.split)
    feats = cached_logmels(root, meta, cfg.frontend, Path(cfg.data.cache_dir))
    if cfg.data.classes == "all":
        classes = sorted({c.label for c in meta})
        train_idx = np.arange(len(meta))
        val_idx = np.array([i for i, c in enumerate(meta) if c.source_id in split.val_sources])
    else:
        classes = sorted(split.train_classes)
        train_idx = np.array([i for i, c in enumerate(meta) if c.label in classes and c.source_id not in
                              split.val_sources])
        val_idx = np.array([i for i, c in enumerate(meta) if c.label in classes and c.source_id in split.val_sources])
    class_id = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_id.get(c.label, -1) for c in meta])
    held_idx = np.array([i for i, c in enumerate(meta) if c.label in split.heldout_classes])
    targets: dict[str, np.ndarray] = {}
    if cfg.teacher:
        positions = (feats.shape[2] - CROP_FRAMES) // cfg.teacher_hop_frames + 1
        keys: tuple[str, ...] = ("logits", "projection")
        if cfg.loss.crd_teacher == "embedding" or cfg.loss.embed_weight > 0:
            keys = ("logits", "projection", "embedding")
        targets = teacher_targets(Path(cfg.teacher), root, meta, cfg.teacher_hop_frames, Path(cfg.data.cache_dir),
                                  positions, keys)
        if cfg.loss.audioset_weight > 0:
            _, tcfg, _ = load_teacher(Path(cfg.teacher))
            targets["audioset"] = audioset_targets(root, meta, cfg.teacher_hop_frames, Path(cfg.data.cache_dir),
                                                   positions, tcfg.frontend)
        _, _, teacher_classes = load_teacher(Path(cfg.teacher))
        if teacher_classes != classes:
            # KD needs the teacher's logits over the student's classes, in the same order.
            raise ValueError(f"teacher classes {teacher_classes} differ from the student's {classes}")
    memory_row = np.full(len(meta), -1)
    memory_row[train_idx] = np.arange(len(train_idx))
    mixes = None
    if cfg.optim.mix_bank > 0:
        if not cfg.teacher:
            raise ValueError("optim.mix_bank needs a teacher: mixes have no label")
        mixes = mix_bank(cfg, root, meta, train_idx, labels, tuple(targets))
    if "embedding" in targets:
        # Standardise each dimension over the training clips' crops, or whiten their within-class covariance
        # (``loss.embed_whiten``): fixed constants for the run.
        e = targets["embedding"][train_idx].astype(np.float32)
        if cfg.loss.embed_whiten >= 0:
            from sceneprint.training.whitening import apply_whitening, within_class_whitening

            d = e.shape[-1]
            mean, matrix = within_class_whitening(e.reshape(-1, d), np.repeat(labels[train_idx], e.shape[1]),
                                                  cfg.loss.embed_whiten)

            def transform(z: np.ndarray) -> np.ndarray:
                return apply_whitening(z.astype(np.float32).reshape(-1, d), mean, matrix).reshape(z.shape)
        else:
            mean, std = e.mean(axis=(0, 1)), e.std(axis=(0, 1)) + 1e-3

            def transform(z: np.ndarray) -> np.ndarray:
                return (z.astype(np.float32) - mean) / std
        for bank in [targets] + ([mixes] if mixes is not None else []):
            bank["embedding"] = transform(bank["embedding"]).astype(np.float16)
    return TrainingData(feats, targets, labels, memory_row, classes, train_idx, val_idx, held_idx, meta, split, root,
                        mixes)


def mix_bank(cfg: StudentConfig, root: Path, meta: list[ClipMeta], train_idx: np.ndarray, labels: np.ndarray,
             keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    """``optim.mix_bank`` waveform mixes of two training clips of different classes (gain 0.3-0.7 for the first),
    each cut at one teacher crop position: the student's log-mel crop (M, F, 96) and the teacher's outputs
    for the same 0.96 s. Cached per teacher checkpoint, size, seed and outputs.
    """
    from sceneprint.frontend import LogMel
    from sceneprint.training.data import decode_file
    from sceneprint.yamnet import YAMNetFrontend

    run_dir, cache_dir = Path(cfg.teacher), Path(cfg.data.cache_dir)
    digest = sha256_file(run_dir / "checkpoint.pt")[:12]
    name = f"mixes-{digest}-{cfg.optim.mix_bank}-s{cfg.seed}-hop{cfg.teacher_hop_frames}-{'-'.join(keys)}.npz"
    path = cache_dir / name
    if path.is_file():
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    teacher, tcfg, _ = load_teacher(run_dir)
    student_fe, teacher_fe = LogMel(cfg.frontend).eval(), YAMNetFrontend(tcfg.frontend).eval()
    rng = np.random.default_rng(cfg.seed + 7919)
    crops: list[np.ndarray] = []
    outputs: dict[str, list[np.ndarray]] = {k: [] for k in keys}
    with torch.inference_mode():
        for _ in tqdm(range(cfg.optim.mix_bank), desc="mix bank", unit="mix"):
            i = int(rng.choice(train_idx))
            j = int(rng.choice(train_idx[labels[train_idx] != labels[i]]))
            lam = float(rng.uniform(0.3, 0.7))
            mixed: list[torch.Tensor] = []
            for rate in (cfg.frontend.sample_rate, tcfg.frontend.sample_rate):
                a, b = decode_file(root, meta[i], rate), decode_file(root, meta[j], rate)
                n = min(len(a), len(b))
                mixed.append(torch.from_numpy(lam * a[:n] + (1 - lam) * b[:n]).unsqueeze(0))
            student_logmel = student_fe(mixed[0])[0, 0]  # (F, T)
            teacher_logmel = teacher_fe.padded_logmel(mixed[1])[0]  # (T', 64)
            positions = (student_logmel.shape[1] - CROP_FRAMES) // cfg.teacher_hop_frames + 1
            s = int(rng.integers(0, positions)) * cfg.teacher_hop_frames
            crops.append(student_logmel[:, s : s + CROP_FRAMES].numpy().astype(np.float16))
            out = teacher(teacher_logmel[s : s + CROP_FRAMES].unsqueeze(0))
            for k in keys:
                outputs[k].append(out[k][0].numpy().astype(np.float16))
    bank = {"x": np.stack(crops), **{k: np.stack(v) for k, v in outputs.items()}}
    save_cache(path, bank)
    return bank


def make_batch(data: TrainingData, cfg: StudentConfig, idx: np.ndarray, rng: np.random.Generator
               ) -> dict[str, torch.Tensor]:
    """Crops at random teacher positions (and, with a mix bank, unlabelled mixes), augmented, with their labels,
    memory rows and teacher outputs."""
    n_pos = ((data.feats.shape[2] - CROP_FRAMES) // cfg.teacher_hop_frames + 1)
    pos = rng.integers(0, n_pos, size=len(idx))
    starts = pos * cfg.teacher_hop_frames
    x = np.stack([data.feats[i, :, s : s + CROP_FRAMES] for i, s in zip(idx, starts, strict=True)])
    labels, rows = data.labels[idx], data.memory_row[idx]
    teacher = {k: v[idx, pos] for k, v in data.targets.items()}
    if data.mixes is not None and cfg.optim.mix_per_batch > 0:
        m = rng.integers(0, len(data.mixes["x"]), size=cfg.optim.mix_per_batch)
        x = np.concatenate([x, data.mixes["x"][m]])
        labels = np.concatenate([labels, np.full(len(m), -1)])
        rows = np.concatenate([rows, len(data.train_idx) + m])  # mix rows follow the clips' rows in the memory
        teacher = {k: np.concatenate([v, data.mixes[k][m]]) for k, v in teacher.items()}
    batch = {"x": augment_student(torch.from_numpy(x.astype(np.float32)).unsqueeze(1), cfg.augment,
                                  cfg.frontend.norm_std, rng),
             "labels": torch.from_numpy(labels), "indices": torch.from_numpy(rows)}
    for k, v in teacher.items():
        batch[f"teacher_{k}"] = torch.from_numpy(v.astype(np.float32))
    return batch


def train_student(cfg: StudentConfig, out_dir: Path, export: Path | None = None) -> dict[str, Any]:
    """Train (resuming from ``out_dir/checkpoint.pt``), evaluate through the service's path, optionally export."""
    rank, world = distributed_setup()
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)  # the same stream on every rank: same batches, same augmentation
    if rank == 0:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))
    data = load_training_data(cfg)
    n_classes = len(data.classes)
    student = Student(cfg, n_classes)
    model: nn.Module = nn.parallel.DistributedDataParallel(student) if world > 1 else student
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    memory_labels = data.labels[data.train_idx]
    if data.mixes is not None:  # one unlabelled row per mix
        memory_labels = np.concatenate([memory_labels, np.full(len(data.mixes["x"]), -1)])
    memory = (CRDMemory(torch.from_numpy(memory_labels), momentum=cfg.loss.crd_momentum, seed=cfg.seed)
              if cfg.loss.gamma > 0 else None)
    n_params, macs = parameter_count(student.encoder.network), student.encoder.macs_per_second()
    if rank == 0:
        print(f"{cfg.model} (blocks {cfg.norm}, output {cfg.output_norm}): {n_params:,} parameters, "
              f"{macs / 1e6:.1f} M MACs/s; teacher {cfg.teacher or 'none'}; {len(data.train_idx)} train clips, "
              f"{n_classes} classes; world {world}")

    o = cfg.optim
    samples = np.repeat(data.train_idx, o.crops_per_clip)
    steps_per_epoch = len(samples) // o.batch_size
    total_steps = steps_per_epoch * o.epochs
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.jsonl"
    start_epoch = 0
    if ckpt_path.is_file():
        start_epoch = load_checkpoint(ckpt_path, _with_memory(student, memory), opt, rng)
        if rank == 0:
            print(f"resumed from {ckpt_path} at epoch {start_epoch}")

    slices = max(world, cfg.ghost_batches)
    for epoch in range(start_epoch, o.epochs):
        student.train()
        t0, sums, seen = time.time(), {"loss": 0.0, "ce": 0.0, "kd": 0.0, "crd": 0.0, "embed": 0.0, "audioset": 0.0}, 0
        order = rng.permutation(samples)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{o.epochs}", leave=False, disable=rank != 0)
        for step in bar:
            idx = order[step * o.batch_size : (step + 1) * o.batch_size]
            batch = make_batch(data, cfg, idx, rng)
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps_per_epoch + step, total_steps, o.warmup_epochs * steps_per_epoch, o.lr)
            losses = step_loss(model, student, batch, cfg, memory, rank=rank, world=world, slices=slices,
                               n_classes=n_classes)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            for k in sums:
                sums[k] += float(losses[k].detach()) * len(idx)
            seen += len(idx)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}")
        if rank != 0:
            continue
        elapsed = time.time() - t0
        record: dict[str, Any] = {"epoch": epoch + 1, **{f"train_{k}": v / seen for k, v in sums.items()},
                                  "lr": opt.param_groups[0]["lr"], "seconds": round(elapsed, 1),
                                  "crops_per_s": round(seen / elapsed, 1)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == o.epochs:
            record.update(quick_eval(student, data, cfg.eval_episodes))
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(json.dumps(record))
        save_checkpoint(ckpt_path, _with_memory(student, memory), opt, rng, epoch)
    if world > 1:
        dist.barrier()
    if rank != 0:
        return {}
    results = final_eval(student, data, cfg)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    if export is not None:
        export_student(student.encoder, export, cfg, data, results, calibrate=not cfg.whiten)
        if cfg.whiten:
            from sceneprint.training.whitening import summary, whiten_bundle

            m = whiten_bundle(export, export, data.root, split=cfg.data.split, episodes=cfg.final_episodes,
                              cache_dir=Path(cfg.data.cache_dir), calibrate=True,
                              false_refusal=cfg.enrollment_false_refusal)
            print(summary(m))
            results = {**results, "whitened": {k: m.evaluation[k] for k in ("heldout_fewshot",
                                                                            "heldout_open_set_5way_5shot")}}
            (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    elif cfg.whiten:
        print("whiten: only an exported bundle is whitened (give --export)")
    return results


def _with_memory(student: Student, memory: CRDMemory | None) -> nn.Module:
    """The module whose state a checkpoint holds: the student and, with CRD, its memory bank."""
    holder = nn.Module()
    holder.student = student
    if memory is not None:
        holder.memory = memory
    return holder


def step_loss(model: nn.Module, student: Student, batch: dict[str, torch.Tensor], cfg: StudentConfig,
              memory: CRDMemory | None, *, rank: int, world: int, slices: int, n_classes: int
              ) -> dict[str, torch.Tensor]:
    """The full-batch loss of one step; this rank computes its slice(s) of the student's outputs."""
    x = batch["x"]
    bounds = np.linspace(0, len(x), slices + 1).astype(int)
    mine = range(slices) if world == 1 else [rank]
    parts = [model(x[bounds[s] : bounds[s + 1]]) for s in mine]
    out = gather_outputs({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, world)
    labels = batch["labels"]
    targets = F.one_hot(labels.clamp_min(0), n_classes).float() * (labels >= 0).float().unsqueeze(1)
    lc = cfg.loss
    teacher_side = batch.get("teacher_projection")
    if student.teacher_embed is not None and "teacher_embedding" in batch:
        teacher_side = student.teacher_embed(batch["teacher_embedding"])  # (B, 128); every rank alike
    losses = distill_loss(out["logits"], batch.get("teacher_logits"), targets, out["projection"],
                          teacher_side, batch["indices"], labels, memory,
                          alpha=lc.alpha, beta=lc.beta, gamma=lc.gamma, kd_temperature=lc.kd_temperature,
                          crd_temperature=lc.crd_temperature, crd_k=lc.crd_negatives)
    losses["embed"] = torch.zeros(())
    if lc.embed_weight > 0:
        cos = F.cosine_similarity(out["embedding"], batch["teacher_embedding"], dim=1)  # (B,)
        losses["embed"] = (1 - cos).mean()
        losses["loss"] = losses["loss"] + lc.embed_weight * losses["embed"]
    losses["audioset"] = torch.zeros(())
    if lc.audioset_weight > 0:
        # Summed over the 521 classes, averaged over the batch (like KD's batchmean), so its weight compares.
        bce = F.binary_cross_entropy_with_logits(out["audioset"], batch["teacher_audioset"], reduction="none")
        losses["audioset"] = bce.sum(dim=1).mean()
        losses["loss"] = losses["loss"] + lc.audioset_weight * losses["audioset"]
    return losses


@torch.inference_mode()
def embed_cached(student: Student, feats: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """Embeddings of whole cached 5 s clips (monitoring only; reported figures use decoded audio)."""
    student.eval()
    out = [student.encoder.network(torch.from_numpy(feats[idx[i : i + 64]].astype(np.float32)).unsqueeze(1))
           for i in range(0, len(idx), 64)]
    student.train()
    return torch.cat(out).numpy()


def quick_eval(student: Student, data: TrainingData, episodes: int) -> dict[str, float]:
    held = embed_cached(student, data.feats, data.held_idx)
    labels = [data.meta[i].label for i in data.held_idx]
    sources = [data.meta[i].source_id for i in data.held_idx]
    return {"heldout_5w5s": evaluate(held, labels, sources, episodes=episodes).accuracy}


def final_eval(student: Student, data: TrainingData, cfg: StudentConfig) -> dict[str, Any]:
    """Held-out few-shot and open-set figures from decoded audio through ``Encoder.embed_clip``."""
    student.eval()
    report = heldout_report(student.encoder, data.root, data.meta, data.split, episodes=cfg.final_episodes,
                            cache_dir=Path(cfg.data.cache_dir))
    return {"parameter_count": parameter_count(student.encoder.network),
            "macs_per_second": student.encoder.macs_per_second(), **report}


def export_student(encoder: Encoder, export: Path, cfg: StudentConfig, data: TrainingData,
                   results: dict[str, Any], *, calibrate: bool = True) -> None:
    licences = sorted({data.meta[i].license for i in data.train_idx})
    teacher = "none (CE alone)"
    if cfg.teacher:
        tcfg = json.loads((Path(cfg.teacher) / "config.json").read_text())
        teacher = f"YAMNet fine-tuned with ce_weight={tcfg['ce_weight']} ({tcfg['model_version']})"
    # The card's latencies are measured here, in the training process (one thread; figures of a loaded
    # machine are noisy: docs/complexity.md holds a one-run comparison of every size).
    card = complexity_card(encoder, repeats=10, threads=(1,))
    save_bundle(export, encoder.eval(), model_version=cfg.model_version, evaluation={**results, "complexity": card},
                unknown_threshold=calibrated_threshold(results), training={
        "recipe": (f"ContrastASC stage 2: {cfg.loss.alpha:g} CE + {cfg.loss.beta:g} KD (T={cfg.loss.kd_temperature:g})"
                   f" + {cfg.loss.gamma:g} CRD (T={cfg.loss.crd_temperature:g}) from the teacher; 0.96 s crops; "
                   + ("Freq-MixStyle, " if cfg.augment.mixstyle_p > 0 else "no Freq-MixStyle; ")
                   + "masking, time roll, frequency shift"
                   + (f"; + {cfg.loss.embed_weight:g} x regression of the teacher backbone's "
                      + ("standardised" if cfg.loss.embed_whiten < 0
                         else f"within-class whitened (shrinkage {cfg.loss.embed_whiten:g})")
                      + " 1,024-d embedding (1 - cosine)" if cfg.loss.embed_weight else "")
                   + (f"; + {cfg.loss.audioset_weight:g} x BCE to the frozen AudioSet YAMNet's 521 scores"
                      if cfg.loss.audioset_weight else "")
                   + (f"; {cfg.optim.mix_per_batch} unlabelled two-clip mixes per batch"
                      if cfg.optim.mix_bank else "")),
        "teacher": teacher,
        "config": to_dict(cfg),
        "data": {"dataset": "sceneprint-dev (ESC-50 clips, 32 kHz mono, 5 s)", "split": cfg.data.split,
                 "train_clips": len(data.train_idx), "val_clips": len(data.val_idx), "classes": data.classes,
                 "heldout_classes_never_seen": ([] if cfg.data.classes == "all"
                                                else list(data.split.heldout_classes))},
        "licenses": {
            "data": licences,
            "teacher": "YAMNet (Google, AudioSet), Apache-2.0; fine-tuned on the same sceneprint-dev data",
            "note": ("Trained on ESC-50 audio (K. J. Piczak, 2015), CC BY-NC 3.0 as a whole (ESC-10 clips CC BY 3.0): "
                     "the weights are derived from non-commercial data; do not use this model commercially."),
            "citation": "K. J. Piczak. ESC: Dataset for Environmental Sound Classification. ACM MM 2015. "
                        "DOI: 10.1145/2733373.2806390",
        },
    })
    print(f"bundle written to {export}")
    from sceneprint.export import add_onnx_after_training

    print(add_onnx_after_training(export))  # the graph the service runs
    from sceneprint.bundle import read_manifest
    from sceneprint.training.calibration import calibrate_bundle

    if calibrate and read_manifest(export).graph is not None:  # embeds through the graph, as the service will
        cal = calibrate_bundle(export, data.root, split=cfg.data.split,
                               false_refusal=cfg.enrollment_false_refusal).calibration
        print(f"enrollment calibration: {cal}")
