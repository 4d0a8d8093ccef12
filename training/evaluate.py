"""Evaluate an encoder on the held-out classes of the fixed split, from decoded audio.

Embeddings are computed by ``Encoder.embed_clip`` on clips decoded by ``decode_clip``, the path the
service takes, so the figures describe what a user gets.

    python -m sceneprint.training.evaluate models/sceneprint-default --update
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from sceneprint.bundle import MANIFEST, load_bundle
from sceneprint.encoder import Encoder
from sceneprint.training.data import (
    ClipMeta,
    FewShotSplit,
    cached_logmels,
    decode_file,
    dev_data_root,
    load_meta,
    load_split,
)
from sceneprint.training.fewshot import evaluate, logmel_statistics, open_set

PROTOCOL = ("episodes over the 10 held-out classes of splits/fewshot-v1.json; supports and queries from different "
            "recordings (source_id); 15 queries per class; nearest prototype by cosine; embeddings from decoded audio "
            "through Encoder.embed_clip, as the service computes them; mean accuracy with 95% CI over episodes "
            "(seed 0)")


def embed_clips(encoder: Encoder, root: Path, clips: list[ClipMeta]) -> np.ndarray:
    """(N, D) embeddings of dev clips, through the service's decode and embed path."""
    encoder.eval()
    return np.stack([encoder.embed_clip(decode_file(root, c, encoder.sample_rate))
                     for c in tqdm(clips, desc="embedding clips", leave=False)])


def heldout_report(encoder: Encoder, root: Path, meta: list[ClipMeta], split: FewShotSplit, *, episodes: int,
                   cache_dir: Path) -> dict[str, Any]:
    """Few-shot and open-set figures on the held-out classes, with the log-mel statistics baseline."""
    held = [c for c in meta if c.label in split.heldout_classes]
    emb = embed_clips(encoder, root, held)
    labels, sources = [c.label for c in held], [c.source_id for c in held]
    fewshot = {f"{n}way_{k}shot": evaluate(emb, labels, sources, n_way=n, k_shot=k, episodes=episodes).as_dict()
               for n, k in [(5, 5), (5, 1), (10, 5)]}
    held_idx = np.array([i for i, c in enumerate(meta) if c.label in split.heldout_classes])
    feats = cached_logmels(root, meta, encoder.frontend_config, cache_dir)[held_idx]
    baseline = evaluate(logmel_statistics(feats), labels, sources, episodes=episodes).as_dict()
    return {
        "heldout_fewshot": fewshot,
        "heldout_fewshot_logmel_stats_baseline_5way_5shot": baseline,
        "heldout_open_set_5way_5shot": open_set(emb, labels, sources, episodes=min(episodes, 500)).as_dict(),
        "protocol": PROTOCOL,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("bundle", type=Path)
    parser.add_argument("--data", default=None, help="sceneprint-dev folder (default: $SCENEPRINT_DEV_DATA)")
    parser.add_argument("--episodes", type=int, default=2000)
    parser.add_argument("--cache-dir", type=Path, default=Path("cache"))
    parser.add_argument("--update", action="store_true", help="merge the figures into the bundle's manifest")
    args = parser.parse_args()
    encoder, _ = load_bundle(args.bundle)
    root = dev_data_root(args.data)
    report = heldout_report(encoder, root, load_meta(root), load_split(root), episodes=args.episodes,
                            cache_dir=args.cache_dir)
    print(json.dumps(report, indent=2))
    if args.update:
        # Only the manifest's evaluation section changes; the weights and their hash do not.
        path = args.bundle / MANIFEST
        data = json.loads(path.read_text())
        data["evaluation"].update(report)
        path.write_text(json.dumps(data, indent=2) + "\n")
        load_bundle(args.bundle)  # still loads
        print(f"updated {path}")


if __name__ == "__main__":
    main()
