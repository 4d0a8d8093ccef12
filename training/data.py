"""The sceneprint-dev data set: metadata, the fixed few-shot split, decoding and a log-mel cache.

Clips are decoded with ``sceneprint.audio.decode_clip`` and featurised with the encoder's own
``LogMel`` module, the same code the service runs, so there is no training-only feature path.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sceneprint.audio import ClipLimits, decode_clip
from sceneprint.config import to_dict
from sceneprint.frontend import LogMel, LogMelConfig

DATA_ENV = "SCENEPRINT_DEV_DATA"
# Dev clips are 5 s; accept anything a real recording could be.
DEV_LIMITS = ClipLimits(min_seconds=0.1, max_seconds=600.0)


@dataclass(frozen=True)
class ClipMeta:
    filename: str
    label: str
    source_id: str
    fold: int
    license: str


@dataclass(frozen=True)
class FewShotSplit:
    name: str
    train_classes: tuple[str, ...]
    heldout_classes: tuple[str, ...]
    val_sources: frozenset[str]


def dev_data_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The sceneprint-dev folder: ``explicit``, else $SCENEPRINT_DEV_DATA, else ../shared/data/sceneprint-dev."""
    candidates = [explicit, os.environ.get(DATA_ENV), Path(__file__).resolve().parents[1].parent
                  / "shared" / "data" / "sceneprint-dev"]
    for c in candidates:
        if c and (Path(c) / "meta.csv").is_file():
            return Path(c)
    raise FileNotFoundError(f"sceneprint-dev not found: set {DATA_ENV} to the folder holding meta.csv")


def load_meta(root: Path) -> list[ClipMeta]:
    with (root / "meta.csv").open(newline="", encoding="utf-8") as f:
        return [ClipMeta(r["filename"], r["scene_label"], r["source_id"], int(r["fold"]), r["license"])
                for r in csv.DictReader(f)]


def load_split(root: Path, name: str = "fewshot-v1") -> FewShotSplit:
    data = json.loads((root / "splits" / f"{name}.json").read_text(encoding="utf-8"))
    return FewShotSplit(name=data["name"], train_classes=tuple(data["train_classes"]),
                        heldout_classes=tuple(data["heldout_classes"]),
                        val_sources=frozenset(data["val_sources"]))


def decode_file(root: Path, clip: ClipMeta, sample_rate: int) -> np.ndarray:
    """Decode one dev clip to a mono waveform at ``sample_rate`` through the service's decoder."""
    return decode_clip((root / clip.filename).read_bytes(), sample_rate=sample_rate, limits=DEV_LIMITS).waveform


def frontend_key(config: Any) -> str:
    return hashlib.sha256(json.dumps(to_dict(config), sort_keys=True).encode()).hexdigest()[:12]


def cached_logmels(root: Path, clips: list[ClipMeta], config: LogMelConfig, cache_dir: Path) -> np.ndarray:
    """Log-mels of all ``clips`` (N, n_mels, T) as float16, computed once per front-end config.

    The cache file name carries a hash of the front-end config, so features made with other settings
    are never reused.
    """
    frontend = LogMel(config).eval()

    def compute(wav: np.ndarray) -> np.ndarray:
        return frontend(torch.from_numpy(wav).unsqueeze(0))[0, 0].numpy()  # (F, T)

    return cached_features(root, clips, config, compute, cache_dir, prefix="logmel")


def cached_features(root: Path, clips: list[ClipMeta], config: Any, compute: Callable[[np.ndarray], np.ndarray],
                    cache_dir: Path, *, prefix: str) -> np.ndarray:
    """``compute`` (a front-end: waveform at ``config.sample_rate`` -> (F, T)) of every clip, as float16 (N, F, T).

    Computed once per front-end config (its hash is in the file name) and clip list.
    """
    names = hashlib.sha256("\n".join(c.filename for c in clips).encode()).hexdigest()[:12]
    path = cache_dir / f"{prefix}-{frontend_key(config)}-{names}.npy"
    if path.is_file():
        return np.load(path)
    out: list[np.ndarray] = []
    with torch.inference_mode():
        for clip in tqdm(clips, desc=f"{prefix} cache", unit="clip"):
            out.append(compute(decode_file(root, clip, config.sample_rate)).astype(np.float16))
    lengths = {x.shape[1] for x in out}
    if len(lengths) != 1:
        raise ValueError(f"clips have different lengths {sorted(lengths)}; the cache expects equal lengths")
    feats = np.stack(out)
    save_cache(path, feats)
    return feats


def save_cache(path: Path, data: np.ndarray | dict[str, np.ndarray]) -> None:
    """Write a cache file atomically (tmp + rename): an array as .npy, named arrays as .npz. The temporary name is
    the process's own: two runs that fill one cache at once each rename a whole file over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp{path.suffix}")
    if isinstance(data, dict):
        np.savez(tmp, **data)  # type: ignore[arg-type]
    else:
        np.save(tmp, data)
    os.replace(tmp, path)
