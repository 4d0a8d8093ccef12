"""Strict loading of a state dict: every key and shape must match, or nothing is loaded."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


def load_state_strict(module: nn.Module, state: Any, *, source: str,
                      error: type[Exception] = ValueError) -> None:
    """Load ``state`` into ``module`` only if keys and shapes match exactly; else raise ``error`` listing them."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise error(f"{source}: expected a dict of tensors")
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise error(f"{source}: missing keys {missing}; unexpected keys {unexpected}")
    wrong = [f"{k}: {tuple(state[k].shape)} != {tuple(v.shape)}" for k, v in expected.items()
             if state[k].shape != v.shape]
    if wrong:
        raise error(f"{source}: shape mismatch: {wrong}")
    module.load_state_dict(state, strict=True)
