"""The plain supervised recipe: the student alone, no teacher (the format-1 default model's recipe).

CP-Mobile (BatchNorm blocks, LayerNorm on the pooled embedding: the ContrastASC placement) + cosine
classifier trained with cross-entropy on random 1 s log-mel crops
(mixup, SpecAugment-style masks), on the training classes of the fixed few-shot split. Few-shot
accuracy on the held-out classes is measured through ``Encoder.embed_clip`` on decoded audio,
the exact path the service uses.

    python -m sceneprint.training.supervised --out runs/default --export models/sceneprint-default \
        optim.epochs=120
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sceneprint.bundle import save_bundle
from sceneprint.config import apply_overrides, to_dict
from sceneprint.cpmobile import Norm, OutputNorm, parameter_count, preset
from sceneprint.encoder import Encoder, WindowConfig, network_macs_per_second
from sceneprint.frontend import LogMelConfig
from sceneprint.training.data import ClipMeta, FewShotSplit, cached_logmels, dev_data_root, load_meta, load_split
from sceneprint.training.evaluate import calibrated_threshold, heldout_report
from sceneprint.training.fewshot import evaluate
from sceneprint.training.heads import CosineClassifier
from sceneprint.training.schedule import lr_at


@dataclass(frozen=True)
class DataConfig:
    root: str = ""  # empty: $SCENEPRINT_DEV_DATA or ../shared/data/sceneprint-dev
    split: str = "fewshot-v1"
    cache_dir: str = "cache"


@dataclass(frozen=True)
class OptimConfig:
    epochs: int = 120
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 1e-3
    warmup_epochs: int = 4


@dataclass(frozen=True)
class AugmentConfig:
    crop_seconds: float = 1.0
    mixup_alpha: float = 0.3
    freq_mask: int = 16  # widest mask, in mel bands
    time_mask: int = 20  # widest mask, in frames
    gain_db: float = 6.0  # random level change, +-


@dataclass(frozen=True)
class TrainConfig:
    model: str = "cpmobile_60k"
    norm: Norm = "batch"
    output_norm: OutputNorm = "layer"
    head_scale: float = 16.0
    seed: int = 0
    threads: int = 2
    eval_every: int = 10
    eval_episodes: int = 300
    final_episodes: int = 2000
    model_version: str = "sceneprint-cpmobile58k-ce-v1"
    frontend: LogMelConfig = field(default_factory=LogMelConfig)
    window: WindowConfig = field(default_factory=WindowConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)


def random_crops(feats: np.ndarray, idx: np.ndarray, frames: int, rng: np.random.Generator) -> torch.Tensor:
    """(B, 1, F, frames) crops; a crop that is all padding silence is re-drawn (up to 4 tries)."""
    floor = feats.min()
    out = np.empty((len(idx), 1, feats.shape[1], frames), dtype=np.float32)
    for b, i in enumerate(idx):
        for _ in range(4):
            start = rng.integers(0, feats.shape[2] - frames + 1)
            crop = feats[i, :, start : start + frames]
            if crop.max() > floor + 1.0:
                break
        out[b, 0] = crop
    return torch.from_numpy(out)


def augment(x: torch.Tensor, cfg: AugmentConfig, norm_std: float, rng: np.random.Generator) -> torch.Tensor:
    """Level change and SpecAugment masks on a (B, 1, F, T) batch of normalised log-mels."""
    b, _, n_freq, n_time = x.shape
    # A gain of g dB adds g * ln(10) / 10 to the log power, scaled like the features.
    gains = rng.uniform(-cfg.gain_db, cfg.gain_db, size=b) * math.log(10) / 10 / norm_std
    x = x + torch.from_numpy(gains.astype(np.float32))[:, None, None, None]
    for i in range(b):
        f = rng.integers(0, cfg.freq_mask + 1)
        f0 = rng.integers(0, n_freq - f + 1)
        t = rng.integers(0, cfg.time_mask + 1)
        t0 = rng.integers(0, n_time - t + 1)
        x[i, :, f0 : f0 + f, :] = 0.0
        x[i, :, :, t0 : t0 + t] = 0.0
    return x


@torch.inference_mode()
def embed_full(encoder: Encoder, feats: np.ndarray, idx: np.ndarray, *, head_input: bool = False) -> torch.Tensor:
    """Embeddings of whole cached clips (quick in-training evaluations): the unit embedding, or (``head_input``)
    the output-normalised one the classifier head reads."""
    encoder.eval()
    net = encoder.network.forward_normalized if head_input else encoder.network
    out = [net(torch.from_numpy(feats[idx[i : i + 64]].astype(np.float32)).unsqueeze(1))
           for i in range(0, len(idx), 64)]
    return torch.cat(out)


def train(cfg: TrainConfig, out_dir: Path, export: Path | None) -> dict[str, Any]:
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2))

    root = dev_data_root(cfg.data.root or None)
    meta, split = load_meta(root), load_split(root, cfg.data.split)
    feats = cached_logmels(root, meta, cfg.frontend, Path(cfg.data.cache_dir))  # (N, F, T) float16
    classes = sorted(split.train_classes)
    class_id = {c: i for i, c in enumerate(classes)}
    train_idx = np.array([i for i, c in enumerate(meta) if c.label in class_id and c.source_id not in
                          split.val_sources])
    val_idx = np.array([i for i, c in enumerate(meta) if c.label in class_id and c.source_id in split.val_sources])
    held_idx = np.array([i for i, c in enumerate(meta) if c.label in split.heldout_classes])
    labels = np.array([class_id.get(c.label, -1) for c in meta])
    held_labels = [meta[i].label for i in held_idx]
    held_sources = [meta[i].source_id for i in held_idx]

    encoder = Encoder(cfg.frontend, preset(cfg.model, cfg.norm, cfg.output_norm), cfg.window)
    head = CosineClassifier(encoder.embedding_dim, len(classes), cfg.head_scale)
    params = list(encoder.network.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    n_params, macs = parameter_count(encoder.network), network_macs_per_second(encoder)
    print(f"{cfg.model} ({cfg.norm} norm): {n_params:,} parameters, {macs / 1e6:.1f} M MACs per second of audio;"
          f" {len(train_idx)} train / {len(val_idx)} val clips, {len(classes)} classes")

    steps_per_epoch = math.ceil(len(train_idx) / cfg.optim.batch_size)
    total_steps = steps_per_epoch * cfg.optim.epochs
    frames = cfg.frontend.frames(int(cfg.augment.crop_seconds * cfg.frontend.sample_rate))
    ckpt_path, log_path = out_dir / "checkpoint.pt", out_dir / "log.jsonl"
    start_epoch = 0
    if ckpt_path.is_file():  # resume
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        encoder.network.load_state_dict(ckpt["network"])
        head.load_state_dict(ckpt["head"])
        opt.load_state_dict(ckpt["optimizer"])
        rng.bit_generator.state = ckpt["rng"]
        torch.set_rng_state(ckpt["torch_rng"])
        start_epoch = ckpt["epoch"] + 1
        print(f"resumed from {ckpt_path} at epoch {start_epoch}")

    for epoch in range(start_epoch, cfg.optim.epochs):
        encoder.train()
        t0, sums, seen = time.time(), {"loss": 0.0, "acc": 0.0}, 0
        order = rng.permutation(train_idx)
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{cfg.optim.epochs}", leave=False)
        for step in bar:
            idx = order[step * cfg.optim.batch_size : (step + 1) * cfg.optim.batch_size]
            x = augment(random_crops(feats, idx, frames, rng), cfg.augment, cfg.frontend.norm_std, rng)
            y = F.one_hot(torch.from_numpy(labels[idx]), len(classes)).float()  # (B, C)
            if cfg.augment.mixup_alpha > 0:
                lam = float(rng.beta(cfg.augment.mixup_alpha, cfg.augment.mixup_alpha))
                perm = torch.from_numpy(rng.permutation(len(idx)))
                x, y = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
            for g in opt.param_groups:
                g["lr"] = lr_at(epoch * steps_per_epoch + step, total_steps,
                                cfg.optim.warmup_epochs * steps_per_epoch, cfg.optim.lr)
            logits = head(encoder.network.forward_normalized(x))
            loss = torch.sum(-y * F.log_softmax(logits, dim=-1), dim=-1).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sums["loss"] += loss.item() * len(idx)
            sums["acc"] += (logits.argmax(1) == y.argmax(1)).float().sum().item()
            seen += len(idx)
            bar.set_postfix(loss=f"{sums['loss'] / seen:.3f}")
        elapsed = time.time() - t0
        record: dict[str, Any] = {"epoch": epoch + 1, "train_loss": sums["loss"] / seen,
                                  "train_acc": sums["acc"] / seen, "lr": opt.param_groups[0]["lr"],
                                  "seconds": round(elapsed, 1), "clips_per_s": round(seen / elapsed, 1)}
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.optim.epochs:
            record.update(quick_eval(encoder, head, feats, labels, val_idx, held_idx, held_labels, held_sources,
                                     cfg.eval_episodes))
            encoder.train()
        with log_path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps(record))
        torch.save({"network": encoder.network.state_dict(), "head": head.state_dict(), "optimizer": opt.state_dict(),
                    "rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(), "epoch": epoch},
                   ckpt_path.with_suffix(".tmp"))
        ckpt_path.with_suffix(".tmp").replace(ckpt_path)

    results = final_eval(encoder, head, feats, root, meta, labels, val_idx, split, cfg)
    results.update({"parameter_count": n_params, "macs_per_second": macs})
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    if export is not None:
        save_bundle(export, encoder, model_version=cfg.model_version,
                    training=training_summary(cfg, meta, classes, split.heldout_classes, train_idx, val_idx),
                    evaluation=results, unknown_threshold=calibrated_threshold(results))
        print(f"bundle written to {export}")
        from sceneprint.export import add_onnx_after_training

        print(add_onnx_after_training(export))
    return results


def quick_eval(encoder: Encoder, head: CosineClassifier, feats: np.ndarray, labels: np.ndarray,
               val_idx: np.ndarray, held_idx: np.ndarray, held_labels: list[str], held_sources: list[str],
               episodes: int) -> dict[str, float]:
    with torch.inference_mode():
        head.eval()
        val_pred = head(embed_full(encoder, feats, val_idx, head_input=True)).argmax(1).numpy()
        held = embed_full(encoder, feats, held_idx).numpy()
    fs = evaluate(held, held_labels, held_sources, episodes=episodes)
    return {"val_acc": float((val_pred == labels[val_idx]).mean()), "heldout_5w5s": fs.accuracy}


def final_eval(encoder: Encoder, head: CosineClassifier, feats: np.ndarray, root: Path, meta: list[ClipMeta],
               labels: np.ndarray, val_idx: np.ndarray, split: FewShotSplit, cfg: TrainConfig) -> dict[str, Any]:
    """Closed-set accuracy on the validation recordings (the training head, on whole cached clips); few-shot
    and open-set figures on the held-out classes from decoded audio through ``Encoder.embed_clip``."""
    head.eval()
    with torch.inference_mode():
        val_pred = head(embed_full(encoder, feats, val_idx, head_input=True)).argmax(1).numpy()
    return {
        "closed_set_val_accuracy": round(float((val_pred == labels[val_idx]).mean()), 4),
        "closed_set_val_clips": len(val_idx),
        **heldout_report(encoder, root, meta, split, episodes=cfg.final_episodes, cache_dir=Path(cfg.data.cache_dir)),
    }


def training_summary(cfg: TrainConfig, meta: list[ClipMeta], classes: list[str], heldout: tuple[str, ...],
                     train_idx: np.ndarray, val_idx: np.ndarray) -> dict[str, Any]:
    licences = sorted({meta[i].license for i in train_idx})
    return {
        "recipe": "supervised: cross-entropy, cosine classifier head, mixup, SpecAugment masks, 1 s crops",
        "config": to_dict(cfg),
        "data": {
            "dataset": "sceneprint-dev (ESC-50 clips, 32 kHz mono, 5 s)",
            "split": cfg.data.split,
            "train_clips": len(train_idx),
            "val_clips": len(val_idx),
            "classes": classes,
            "heldout_classes_never_seen": list(heldout),
        },
        "licenses": {
            "data": licences,
            "note": ("Trained on ESC-50 audio (K. J. Piczak, 2015), CC BY-NC 3.0 as a whole (ESC-10 clips CC BY 3.0): "
                     "the weights are derived from non-commercial data; do not use this model commercially."),
            "citation": "K. J. Piczak. ESC: Dataset for Environmental Sound Classification. ACM MM 2015. "
                        "DOI: 10.1145/2733373.2806390",
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/default"), help="run directory (resumes if present)")
    parser.add_argument("--export", type=Path, default=None, help="write the trained encoder as a bundle here")
    parser.add_argument("--config", type=Path, default=None, help="JSON config file (overrides apply on top)")
    parser.add_argument("overrides", nargs="*", help="section.key=value, e.g. optim.epochs=50")
    args = parser.parse_args(argv)
    cfg = TrainConfig()
    if args.config is not None:
        from sceneprint.config import from_dict

        cfg = from_dict(TrainConfig, json.loads(args.config.read_text()))
    cfg = apply_overrides(cfg, args.overrides)
    train(cfg, args.out, args.export)


if __name__ == "__main__":
    main()
