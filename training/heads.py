"""Classifier heads used only in training (the bundle holds the encoder alone)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineClassifier(nn.Module):
    """Logits = scale * cos(embedding, class weight): trains the embedding for cosine scoring."""

    def __init__(self, dim: int, n_classes: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_classes, dim) * 0.01)
        self.scale = scale

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        # (B, D) x (C, D) -> (B, C)
        return self.scale * F.normalize(embedding, dim=-1) @ F.normalize(self.weight, dim=-1).T


class ProjectionMLP(nn.Module):
    """Two-layer MLP (Linear-ReLU-Linear) mapping an embedding to the contrastive space."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, out_dim)
