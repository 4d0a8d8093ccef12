"""The enrolled scenes' kept audio as a labelled data set, for retraining the encoder on them.

``sceneprint scenes export`` writes, from the clip store, a folder in the training data's ``meta.csv``
layout: ``audio/<scene>/<clip>-<k>.wav`` (mono, one sample rate, equal-length segments, as the student's
feature cache needs), one class per scene (its name is the label) and one source per stored clip (so a
few-shot split never draws a support and a query from the same recording). ``sceneprint retrain
--extra-classes DIR`` adds them to the training classes.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Any

import numpy as np
import soundfile as sf
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from sceneprint.audio import decode_clip
from sceneprint.service.clipstore import ClipStore
from sceneprint.service.scenes import STORED_CLIP_LIMITS
from sceneprint.service.tables import Clip, Scene

LICENSE = "enrolled through the service by its users: check that you may train on it"


def segments(waveform: np.ndarray, length: int) -> list[np.ndarray]:
    """``waveform`` (N,) cut into segments of ``length`` samples; a remainder of at least half a segment is kept
    as one more (its end), and a clip shorter than a segment is repeated to fill one."""
    if len(waveform) < length:
        return [np.tile(waveform, math.ceil(length / len(waveform)))[:length]]
    whole = len(waveform) // length
    out = [waveform[i * length : (i + 1) * length] for i in range(whole)]
    if len(waveform) - whole * length >= length // 2:
        out.append(waveform[-length:])
    return out


def export_scenes(sessions: sessionmaker[Session], clip_dir: Path, out: Path, *, sample_rate: int,
                  segment_seconds: float) -> dict[str, Any]:
    """Write every enrolled scene's stored clips under ``out`` with a ``meta.csv``; return what was written."""
    store = ClipStore(clip_dir)
    with sessions() as session:
        rows = session.execute(select(Scene.name, Clip.sha256).join(Clip, Clip.scene_id == Scene.id)
                               .order_by(Scene.name, Clip.id)).all()
    length = round(segment_seconds * sample_rate)
    meta: list[dict[str, Any]] = []
    for name, sha in rows:
        decoded = decode_clip(store.read(sha), sample_rate=sample_rate, limits=STORED_CLIP_LIMITS)
        folder = out / "audio" / name
        folder.mkdir(parents=True, exist_ok=True)
        for k, piece in enumerate(segments(decoded.waveform, length)):
            relative = f"audio/{name}/{sha[:16]}-{k}.wav"
            sf.write(out / relative, piece, sample_rate, subtype="FLOAT")
            meta.append({"filename": relative, "scene_label": name, "source_id": f"enrolled:{sha[:16]}", "fold": 1,
                         "license": LICENSE})
    out.mkdir(parents=True, exist_ok=True)
    with (out / "meta.csv").open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["filename", "scene_label", "source_id", "fold", "license"])
        writer.writeheader()
        writer.writerows(meta)
    return {"scenes": len({name for name, _ in rows}), "stored_clips": len(rows), "clips": len(meta)}
