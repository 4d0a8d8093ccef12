"""CP-Mobile, the student network (DCASE 2023/24 task 1 family), with ContrastASC's output block.

A stem of two stride-2 convolutions, stages of inverted-bottleneck blocks (1x1 expand, 3x3
depthwise, 1x1 project, residual where shapes allow), then a 1x1 convolution to the embedding size,
global average pooling, and an output normalisation of the pooled embedding. The service's
embedding is the pooled embedding *before* that normalisation, L2-normalised.

As in ContrastASC, the blocks keep BatchNorm (``norm="batch"``) and only the output block is rebuilt:
pooling, then LayerNorm over the pooled embedding (``output_norm="layer"``, the default), which the
training heads read. At inference BatchNorm is a fixed affine map, so an embedding never depends on
the batch. ``output_norm`` variants for the ablation: ``batch`` (BatchNorm1d) and ``none``;
``head`` is the layout of format-1 bundles (a normalisation inside the 1x1 head convolution, before
pooling). A bundle may carry an affine map of the embedding folded into the 1x1 head convolution
(``head_bias``: the within-class whitening of ``sceneprint.training.whitening``); the output
normalisation then no longer sees what it was trained on, which only the training heads read.
Channel LayerNorm in every block (``norm="layer"``) is a research variant: it collapses at
initialisation (every clip maps to nearly one embedding; docs/research-notes.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

Norm = Literal["layer", "batch"]
OutputNorm = Literal["layer", "batch", "none", "head"]


@dataclass(frozen=True)
class CPMobileConfig:
    """Everything that rebuilds a CP-Mobile network."""

    in_channels: int = 1
    base_channels: int = 32
    channels_multiplier: float = 1.6
    expansion_rate: float = 2.0
    n_blocks: tuple[int, ...] = (3, 2, 1)
    # One (freq, time) stride per block, in order; downsampling happens in blocks 3 and 4 as in
    # the DCASE 2024 baseline.
    strides: tuple[tuple[int, int], ...] = ((1, 1), (1, 1), (1, 2), (2, 1), (1, 1), (1, 1))
    norm: Norm = "batch"  # inside the blocks
    output_norm: OutputNorm = "layer"  # of the pooled embedding (``head``: format-1 layout)
    embedding_dim: int = 128
    # The 1x1 head convolution has a bias: where an affine map of the embedding (a whitening fitted after
    # training, ``sceneprint.training.whitening``) is folded into it. False for every network as trained.
    head_bias: bool = False

    def __post_init__(self) -> None:
        if len(self.strides) != sum(self.n_blocks):
            raise ValueError(
                f"strides has {len(self.strides)} entries but n_blocks adds up to {sum(self.n_blocks)}"
            )
        if self.norm not in ("layer", "batch"):
            raise ValueError(f"norm must be 'layer' or 'batch', not {self.norm!r}")
        if self.output_norm not in ("layer", "batch", "none", "head"):
            raise ValueError(f"output_norm must be 'layer', 'batch', 'none' or 'head', not {self.output_norm!r}")
        if self.head_bias and self.output_norm == "head":
            raise ValueError("head_bias needs a plain 1x1 head convolution (output_norm other than 'head')")
        # JSON round trips give lists; keep the config hashable and comparable.
        object.__setattr__(self, "n_blocks", tuple(int(n) for n in self.n_blocks))
        object.__setattr__(self, "strides", tuple((int(f), int(t)) for f, t in self.strides))

    def channels_per_stage(self) -> list[int]:
        base = make_divisible(self.base_channels, 8)
        return [base] + [
            make_divisible(base * self.channels_multiplier**stage, 8) for stage in range(len(self.n_blocks))
        ]


def make_divisible(value: float, divisor: int) -> int:
    """Round ``value`` to the nearest multiple of ``divisor``, never dropping more than 10%."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of a (B, C, F, T) map, at every (f, t) position."""

    def __init__(self, channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The fused layer_norm kernel over a channels-last view is ~3x faster on CPU than
        # mean/var arithmetic over dim 1, and gives the same result.
        x = F.layer_norm(x.permute(0, 2, 3, 1), (x.shape[1],), self.weight, self.bias, self.eps)  # (B, F, T, C)
        return x.permute(0, 3, 1, 2)  # (B, C, F, T)


def norm_layer(kind: Norm, channels: int) -> nn.Module:
    return ChannelLayerNorm(channels) if kind == "layer" else nn.BatchNorm2d(channels)


class ConvNormAct(nn.Sequential):
    def __init__(
        self,
        in_ch: int,
        out_ch: int,
        kernel: int,
        stride: int | tuple[int, int],
        norm: Norm,
        groups: int = 1,
        act: bool = True,
    ) -> None:
        layers: list[nn.Module] = [
            nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False),
            norm_layer(norm, out_ch),
        ]
        if act:
            layers.append(nn.ReLU())
        super().__init__(*layers)


class Block(nn.Module):
    """Inverted bottleneck: 1x1 expand -> 3x3 depthwise (strided) -> 1x1 project, + shortcut."""

    def __init__(self, in_ch: int, out_ch: int, expansion_rate: float, stride: tuple[int, int], norm: Norm):
        super().__init__()
        hidden = make_divisible(in_ch * expansion_rate, 8)
        self.block = nn.Sequential(
            ConvNormAct(in_ch, hidden, 1, 1, norm),
            ConvNormAct(hidden, hidden, 3, stride, norm, groups=hidden),
            ConvNormAct(hidden, out_ch, 1, 1, norm, act=False),
        )
        self.use_shortcut = in_ch == out_ch
        # A strided block keeps its shortcut by average-pooling the input to the same resolution.
        self.shortcut: nn.Module = (
            nn.AvgPool2d(3, stride=stride, padding=1) if stride != (1, 1) else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if self.use_shortcut:
            y = y + self.shortcut(x)
        return F.relu(y)


class CPMobile(nn.Module):
    """Log-mel (B, 1, F, T) -> L2-normalised embedding (B, embedding_dim)."""

    def __init__(self, config: CPMobileConfig) -> None:
        super().__init__()
        self.config = config
        c = config.channels_per_stage()
        self.stem = nn.Sequential(
            ConvNormAct(config.in_channels, c[0] // 4, 3, 2, config.norm),
            ConvNormAct(c[0] // 4, c[0], 3, 2, config.norm),
        )
        stages: list[nn.Module] = []
        block_index = 0
        for stage, n in enumerate(config.n_blocks):
            blocks: list[nn.Module] = []
            for i in range(n):
                in_ch = c[stage] if i == 0 else c[stage + 1]
                blocks.append(Block(in_ch, c[stage + 1], config.expansion_rate, config.strides[block_index],
                                    config.norm))
                block_index += 1
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.head: nn.Module = (ConvNormAct(c[-1], config.embedding_dim, 1, 1, config.norm, act=False)
                                if config.output_norm == "head"
                                else nn.Conv2d(c[-1], config.embedding_dim, 1, bias=config.head_bias))
        self.output_norm: nn.Module = {"layer": nn.LayerNorm(config.embedding_dim),
                                       "batch": nn.BatchNorm1d(config.embedding_dim)}.get(config.output_norm,
                                                                                          nn.Identity())
        self.apply(_init_weights)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled embedding before the output normalisation (B, embedding_dim): what probes and the service read."""
        x = self.stem(x)  # (B, c0, F/4, T/4)
        x = self.stages(x)  # (B, c_last, F/8, T/8)
        x = self.head(x)  # (B, D, F/8, T/8)
        return x.mean(dim=(2, 3))  # (B, D)

    def forward_normalized(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled embedding after the output normalisation (B, D): what the training heads read."""
        return self.output_norm(self.forward_features(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.forward_features(x), dim=-1)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
    elif isinstance(m, nn.BatchNorm2d | nn.BatchNorm1d | nn.LayerNorm | ChannelLayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# Size presets: named functions returning configs (parameter counts are checked by the tests).


def cpmobile_6k(norm: Norm = "batch", output_norm: OutputNorm = "layer") -> CPMobileConfig:
    """About 6K parameters: the smallest DCASE 2024 task 1 budget."""
    return CPMobileConfig(base_channels=8, channels_multiplier=1.4, expansion_rate=1.8, embedding_dim=48,
                          norm=norm, output_norm=output_norm)


def cpmobile_60k(norm: Norm = "batch", output_norm: OutputNorm = "layer") -> CPMobileConfig:
    """About 58K parameters: the bundled default."""
    return CPMobileConfig(base_channels=32, channels_multiplier=1.6, expansion_rate=2.0, norm=norm,
                          output_norm=output_norm)


def cpmobile_110k(norm: Norm = "batch", output_norm: OutputNorm = "layer") -> CPMobileConfig:
    """About 111K parameters, 29.6 M MACs/s: the largest of this family within 128K and 30 M MACs per second.

    (The earlier 122K preset, base 40 x 1.8, needs 41.9 M MACs/s: its width sits in the high-resolution
    stages. Here the width moves to the late, low-resolution stages; no 118-128K variant at these strides
    stays under 30 M MACs/s.)
    """
    return CPMobileConfig(base_channels=24, channels_multiplier=2.8, expansion_rate=2.5, norm=norm,
                          output_norm=output_norm)


PRESETS = {"cpmobile_6k": cpmobile_6k, "cpmobile_60k": cpmobile_60k, "cpmobile_110k": cpmobile_110k}


def preset(name: str, norm: Norm = "batch", output_norm: OutputNorm = "layer") -> CPMobileConfig:
    """The config of a named size preset."""
    try:
        return PRESETS[name](norm, output_norm)
    except KeyError:
        raise ValueError(f"unknown CP-Mobile preset {name!r}; valid: {', '.join(sorted(PRESETS))}") from None


def build(config: CPMobileConfig) -> CPMobile:
    """Build a network from its config."""
    return CPMobile(config)


def parameter_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
