"""Short training runs that compare CP-Mobile normalisations (the diagnostics of docs/research-notes.md).

Each variant trains cpmobile_60k with a cosine head, plain cross-entropy, AdamW, 1 s random crops of
the fewshot-v1 training clips, no augmentation, for a few epochs, and prints train loss and accuracy
per epoch. Seeds are fixed, so variants meet the same crops in the same order.

    python -m bench.norm_ablation --epochs 4 --lr 4e-3      # needs $SCENEPRINT_DEV_DATA
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sceneprint.cpmobile import Block, ChannelLayerNorm, CPMobile, build, preset
from sceneprint.frontend import LogMelConfig
from sceneprint.training.data import cached_logmels, dev_data_root, load_meta, load_split
from sceneprint.training.heads import CosineClassifier
from sceneprint.training.supervised import random_crops


class Centred(nn.Module):
    """Pooled features minus a running mean of them (DINO-style centring; fixed at inference)."""

    center: torch.Tensor

    def __init__(self, net: CPMobile, momentum: float = 0.1) -> None:
        super().__init__()
        self.net = net
        self.momentum = momentum
        self.register_buffer("center", torch.zeros(net.config.embedding_dim))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        f = self.net.forward_features(x)
        if self.training:
            with torch.no_grad():
                self.center.mul_(1 - self.momentum).add_(self.momentum * f.mean(0))
        return f - self.center


class PreNormBlock(nn.Module):
    """One LayerNorm at the block input, none inside; the residual stream stays un-normalised."""

    def __init__(self, block: Block) -> None:
        super().__init__()
        layers = [layer for layer in block.block if isinstance(layer, nn.Sequential)]
        for layer in layers:
            layer[1] = nn.Identity()  # drop the norm of each conv-norm-act triple
        first_conv = layers[0][0]
        assert isinstance(first_conv, nn.Conv2d)
        self.inner = block
        self.pre = ChannelLayerNorm(first_conv.in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner.block(self.pre(x))
        if self.inner.use_shortcut:
            y = y + self.inner.shortcut(x)
        return F.relu(y)


def swap_norms(model: CPMobile, make: Callable[[int], nn.Module]) -> CPMobile:
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, ChannelLayerNorm):
                setattr(module, name, make(child.weight.shape[0]))
    return model


def variant(name: str) -> CPMobile | Centred:
    if name == "batchnorm":
        return build(preset("cpmobile_60k", "batch"))
    net = build(preset("cpmobile_60k", "layer"))
    if name == "layernorm":
        return net
    if name == "groupnorm1":
        return swap_norms(net, lambda c: nn.GroupNorm(1, c))
    if name == "layernorm+centring":
        return Centred(net)
    if name == "layernorm+prenorm":
        for stage in net.stages:
            assert isinstance(stage, nn.Sequential)
            for i, block in enumerate(list(stage)):
                assert isinstance(block, Block)
                stage[i] = PreNormBlock(block)
        return net
    raise ValueError(name)


VARIANTS = ["batchnorm", "layernorm", "groupnorm1", "layernorm+centring", "layernorm+prenorm"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--lr", type=float, default=4e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--variants", nargs="*", default=VARIANTS, choices=VARIANTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    root = dev_data_root()
    meta, split = load_meta(root), load_split(root)
    feats = cached_logmels(root, meta, LogMelConfig(), Path("cache"))
    classes = sorted(split.train_classes)
    class_id = {c: i for i, c in enumerate(classes)}
    train = np.array([i for i, c in enumerate(meta) if c.label in class_id and c.source_id not in split.val_sources])
    labels = np.array([class_id.get(c.label, -1) for c in meta])
    print(f"cpmobile_60k, cosine head, CE, AdamW lr {args.lr}, batch 64, 1 s crops, no augmentation, "
          f"{len(train)} clips of {len(classes)} classes")
    for name in args.variants:
        torch.manual_seed(0)
        rng = np.random.default_rng(0)
        model = variant(name)
        head = CosineClassifier(128, len(classes))
        opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr, weight_decay=1e-3)
        model.train()
        for epoch in range(args.epochs):
            order, loss_sum, correct = rng.permutation(train), 0.0, 0
            for start in range(0, len(order), 64):
                idx = order[start : start + 64]
                x, y = random_crops(feats, idx, 101, rng), torch.from_numpy(labels[idx])
                logits = head(model.forward_features(x))
                loss = F.cross_entropy(logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                loss_sum += loss.item() * len(idx)
                correct += int((logits.argmax(1) == y).sum())
            print(f"  {name:<20} epoch {epoch + 1}: train loss {loss_sum / len(train):.3f}, "
                  f"train acc {correct / len(train):.1%}", flush=True)


if __name__ == "__main__":
    main()
