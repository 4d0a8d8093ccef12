"""Strict config construction and overrides."""

from __future__ import annotations

import pytest

from sceneprint.config import ConfigError, apply_overrides, from_dict, to_dict
from sceneprint.cpmobile import CPMobileConfig
from sceneprint.training.supervised import TrainConfig


def test_round_trip_through_a_dict() -> None:
    cfg = TrainConfig()
    assert from_dict(TrainConfig, to_dict(cfg)) == cfg


def test_overrides_reach_nested_sections_and_parse_types() -> None:
    cfg = apply_overrides(TrainConfig(), ["--optim.epochs=7", "norm=batch", "frontend.n_mels=64", "optim.lr=0.01"])
    assert cfg.optim.epochs == 7 and cfg.norm == "batch" and cfg.frontend.n_mels == 64 and cfg.optim.lr == 0.01


@pytest.mark.parametrize("override, message", [
    ("optim.epochz=3", "unknown key 'epochz'"),
    ("optim.epochs=three", "expected int"),
    ("norm=group", "not one of"),
    ("nosection.x=1", "not a config section"),
    ("epochs", "section.key=value"),
])
def test_bad_overrides_are_refused_with_the_key(override: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        apply_overrides(TrainConfig(), [override])


def test_unknown_keys_in_a_dict_are_listed() -> None:
    with pytest.raises(ConfigError, match="bogus"):
        from_dict(CPMobileConfig, {"bogus": 1})
