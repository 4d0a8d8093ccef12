"""The sceneprint-dev metadata and fixed split (skipped where the data folder is absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

from sceneprint.training.data import load_meta, load_split


@pytest.fixture(scope="module")
def root(dev_root: Path) -> Path:
    return dev_root


def test_split_is_recording_disjoint_and_covers_the_classes(root) -> None:  # type: ignore[no-untyped-def]
    meta, split = load_meta(root), load_split(root)
    assert len(meta) == 1600
    assert set(split.train_classes).isdisjoint(split.heldout_classes)
    held_sources = {c.source_id for c in meta if c.label in split.heldout_classes}
    train_sources = {c.source_id for c in meta if c.label in split.train_classes}
    assert held_sources.isdisjoint(train_sources)
    assert split.val_sources <= train_sources
