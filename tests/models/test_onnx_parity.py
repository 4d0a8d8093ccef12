"""ONNX Runtime and torch embed real recordings alike (skipped where ../shared/data/sceneprint-dev is absent).

The bundled model's graph (exported into a copy when the bundle has none yet) against its torch weights,
on every clip of the 10 held-out classes of splits/fewshot-v1.json, decoded as the service decodes them.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from sceneprint.bundle import default_bundle_path, load_bundle, read_manifest
from sceneprint.export import add_onnx
from sceneprint.prototypes import prototype
from sceneprint.runtime import load_onnx_encoder
from sceneprint.training.data import decode_file, load_meta, load_split
from sceneprint.training.fewshot import sample_episode

EPISODES = 200
SEED = 0


@pytest.fixture(scope="module")
def root(dev_root: Path) -> Path:
    return dev_root


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if read_manifest(default_bundle_path()).graph is not None:
        return default_bundle_path()
    copy = tmp_path_factory.mktemp("default") / "bundle"
    shutil.copytree(default_bundle_path(), copy)
    add_onnx(copy)
    return copy


def test_onnx_runtime_embeds_held_out_clips_as_torch_does_and_picks_the_same_scenes(root: Path, bundle: Path) -> None:
    torch_encoder, manifest = load_bundle(bundle)
    onnx_encoder = load_onnx_encoder(bundle)
    split = load_split(root)
    clips = [c for c in load_meta(root) if c.label in split.heldout_classes]
    waveforms = [decode_file(root, c, manifest.sample_rate) for c in clips]
    reference = np.stack([torch_encoder.embed_clip(w) for w in waveforms])  # (N, D) unit vectors
    served = np.stack([onnx_encoder.embed_clip(w) for w in waveforms])
    cosine = np.sum(reference * served, axis=1)
    assert cosine.min() >= 0.9999, [c.filename for c, v in zip(clips, cosine, strict=True) if v < 0.9999]

    labels, sources = [c.label for c in clips], [c.source_id for c in clips]
    rng = np.random.default_rng(SEED)
    for _ in range(EPISODES):
        episode = sample_episode(labels, sources, rng, n_way=5, k_shot=5, queries_per_class=15)
        support = [s for _, s, _ in episode]
        queries = [i for _, _, q in episode for i in q]
        picks = [np.argmax(np.stack([prototype(emb[s]) for s in support]) @ emb[queries].T, axis=0)
                 for emb in (reference, served)]  # the service's rule: nearest prototype by cosine
        assert np.array_equal(picks[0], picks[1])
