"""Resumable training checkpoints that load with ``torch.load(weights_only=True)``, like bundles.

A checkpoint holds tensors and plain Python values only (model and optimizer state, the numpy and
torch RNG states, the epoch), so loading one never executes code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn


def save_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer, rng: np.random.Generator,
                    epoch: int) -> None:
    """Write atomically (tmp + rename): a kill mid-write leaves the previous checkpoint intact."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": epoch,
             # The numpy bit-generator state holds Python ints beyond 64 bits: stored as JSON text.
             "rng": json.dumps(rng.bit_generator.state), "torch_rng": torch.get_rng_state()}
    tmp = path.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: nn.Module, opt: torch.optim.Optimizer | None,
                    rng: np.random.Generator | None) -> int:
    """Restore ``model`` (strictly), ``opt`` and ``rng``; returns the epoch to start from."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state["model"], strict=True)
    if opt is not None:
        opt.load_state_dict(state["optimizer"])
    if rng is not None:
        rng.bit_generator.state = json.loads(state["rng"])
        torch.set_rng_state(state["torch_rng"])
    return int(state["epoch"]) + 1
