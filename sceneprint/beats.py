"""BEATs (Chen et al. 2022, "Audio Pre-Training with Acoustic Tokenizers"), re-implemented.

A 16 kHz waveform becomes a Kaldi fbank (128 mel bins, 10 ms hop), cut into 16x16 patches (16 frames by
16 mel bins). Each patch is embedded by a strided convolution, layer-normalised and projected to the
encoder width; a grouped, weight-normalised convolution adds positional information; a post-LN
transformer with DeepNorm residual scaling and a query-gated, bucketed relative position bias (one table
shared by all layers) encodes the sequence.

Module and parameter names follow the reference implementation (microsoft/unilm ``beats/``), so the
published checkpoints, ``{"cfg": <dict>, "model": <state dict>}``, load strictly without renaming a key.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache, partial
from typing import Any, Literal

import torch
import torch.nn.functional as F
import torchaudio.compliance.kaldi as kaldi
from torch import nn

from sceneprint.config import ConfigError, from_dict
from sceneprint.encoder import ClipEncoder, WindowConfig, count_macs
from sceneprint.state import load_state_strict

SAMPLE_RATE = 16_000
N_MELS = 128
FRAME_LENGTH = 400  # samples: 25 ms at 16 kHz
FRAME_SHIFT = 160  # samples: 10 ms at 16 kHz
PADDED_FRAME = 512  # the frame zero-padded to a power of two for the FFT
PREEMPHASIS = 0.97
# Statistics of BEATs' fbank values on its pre-training data. The reference divides by twice the std;
# the checkpoints expect exactly that scale.
FBANK_MEAN = 15.41663
FBANK_STD = 6.55582

Activation = Literal["gelu", "gelu_accurate", "relu"]
_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_accurate": partial(F.gelu, approximate="tanh"),
    "relu": F.relu,
}


class BEATsCheckpointError(ValueError):
    """A BEATs checkpoint that cannot be used; the message says why."""


@dataclass(frozen=True)
class BEATsConfig:
    """Everything that rebuilds a BEATs network.

    Field names are the keys of the official checkpoints' ``cfg`` dict, and defaults are the reference's
    (a ``cfg`` that leaves a key out means the same thing here as there), except ``input_patch_size``:
    the reference's -1 is a "must be set" marker, and 16 is the only size ever published.
    """

    input_patch_size: int = 16  # patch side, in fbank frames and mel bins
    embed_dim: int = 512  # patch embedding width
    conv_bias: bool = False  # bias in the patch embedding
    encoder_layers: int = 12
    encoder_embed_dim: int = 768
    encoder_ffn_embed_dim: int = 3072
    encoder_attention_heads: int = 12
    activation_fn: Activation = "gelu"
    layer_wise_gradient_decay_ratio: float = 1.0  # gradients are scaled by this at every layer's input
    layer_norm_first: bool = False  # pre-LN instead of post-LN
    deep_norm: bool = False  # DeepNorm residual scaling and init (post-LN only)
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation_dropout: float = 0.0
    encoder_layerdrop: float = 0.0  # probability of skipping a whole layer in training
    dropout_input: float = 0.0
    conv_pos: int = 128  # kernel size of the convolutional positional embedding
    conv_pos_groups: int = 16
    relative_position_embedding: bool = False
    num_buckets: int = 320
    max_distance: int = 1280  # offsets this far apart or further share the last bucket
    gru_rel_pos: bool = False  # gate the relative position bias by the query
    finetuned_model: bool = False  # has the AudioSet ``predictor`` head
    predictor_dropout: float = 0.1
    predictor_class: int = 527

    def __post_init__(self) -> None:
        sizes = ("input_patch_size", "embed_dim", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim",
                 "encoder_attention_heads", "conv_pos", "conv_pos_groups", "num_buckets", "max_distance",
                 "predictor_class")
        for name in sizes:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, not {getattr(self, name)}")
        probabilities = ("dropout", "attention_dropout", "activation_dropout", "encoder_layerdrop", "dropout_input",
                         "predictor_dropout")
        for name in probabilities:
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name} must be in [0, 1), not {getattr(self, name)}")
        if self.activation_fn not in _ACTIVATIONS:
            raise ValueError(f"activation_fn must be one of {sorted(_ACTIVATIONS)}, not {self.activation_fn!r}")
        if self.encoder_embed_dim % self.encoder_attention_heads:
            raise ValueError(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                             f"encoder_attention_heads {self.encoder_attention_heads}")
        if self.encoder_embed_dim % self.conv_pos_groups:
            raise ValueError(f"encoder_embed_dim {self.encoder_embed_dim} is not divisible by "
                             f"conv_pos_groups {self.conv_pos_groups}")
        if self.deep_norm and self.layer_norm_first:
            raise ValueError("deep_norm applies to post-LN layers; it cannot be combined with layer_norm_first")
        if self.relative_position_embedding and not self.num_buckets // 4 < self.max_distance:
            # Buckets grow logarithmically from num_buckets // 4 up to max_distance.
            raise ValueError(f"max_distance {self.max_distance} must exceed num_buckets // 4 ({self.num_buckets // 4})")

    @property
    def embedding_dim(self) -> int:
        return self.encoder_embed_dim

    @property
    def min_samples(self) -> int:
        """The shortest waveform that fills one patch: ``input_patch_size`` fbank frames."""
        return FRAME_LENGTH + (self.input_patch_size - 1) * FRAME_SHIFT


# Size presets: named functions returning configs.


def beats_base() -> BEATsConfig:
    """The published BEATs iter3 model: 12 layers of width 768, about 90M parameters."""
    return BEATsConfig(
        layer_wise_gradient_decay_ratio=0.6,
        deep_norm=True,
        dropout=0.0,
        attention_dropout=0.0,
        encoder_layerdrop=0.05,
        relative_position_embedding=True,
        max_distance=800,
        gru_rel_pos=True,
    )


def beats_tiny() -> BEATsConfig:
    """The base structure at toy size (2 layers of width 64), for tests; no weights exist for it."""
    return dataclasses.replace(
        beats_base(),
        embed_dim=32,  # unlike encoder_embed_dim, so post_extract_proj exists as in base
        encoder_layers=2,
        encoder_embed_dim=64,
        encoder_ffn_embed_dim=128,
        encoder_attention_heads=4,
        conv_pos=16,
        conv_pos_groups=4,
    )


PRESETS: dict[str, Callable[[], BEATsConfig]] = {"beats_base": beats_base, "beats_tiny": beats_tiny}


def preset(name: str) -> BEATsConfig:
    """The config of a named size preset."""
    try:
        return PRESETS[name]()
    except KeyError:
        raise ValueError(f"unknown BEATs preset {name!r}; valid: {', '.join(sorted(PRESETS))}") from None


def beats_config_from_checkpoint_cfg(cfg: Mapping[str, Any]) -> BEATsConfig:
    """Build the config from an official checkpoint's ``cfg`` dict.

    Every key the published checkpoints carry, dropouts included, is a field, so nothing is dropped:
    an unknown key is an error rather than a setting silently ignored.

    Args:
        cfg: The ``cfg`` entry of a checkpoint; missing keys take the reference's defaults.

    Returns:
        The config.

    Raises:
        ConfigError: On unknown keys, values of the wrong type, or an impossible combination.
    """
    return from_dict(BEATsConfig, cfg)


class KaldiFbank(nn.Module):
    """The features BEATs was trained on: Kaldi fbank (``torchaudio.compliance.kaldi.fbank``'s defaults: povey
    window, DC offset removed, pre-emphasis 0.97, 512-point power spectrum, 128 mel bins from 20 Hz, log)
    of 16-bit sample values, normalised as ``(fbank - mean) / (2 * std)``.

    Batched, with its window and mel matrix as (non-persistent) buffers, so that the whole encoder exports to
    ONNX; tests hold it to ``kaldi.fbank`` itself.
    """

    window: torch.Tensor
    mel: torch.Tensor

    def __init__(self) -> None:
        super().__init__()
        window = torch.hann_window(FRAME_LENGTH, periodic=False, dtype=torch.float64).pow(0.85)  # povey
        mel, _ = kaldi.get_mel_banks(N_MELS, PADDED_FRAME, float(SAMPLE_RATE), 20.0, 0.0, 100.0, -500.0, 1.0)
        mel = F.pad(mel, (0, 1))  # (128, 257): no weight on the Nyquist bin
        self.register_buffer("window", window.float(), persistent=False)
        self.register_buffer("mel", mel.T.contiguous().float(), persistent=False)  # (257, 128)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        """(B, N) samples in [-1, 1] at 16 kHz -> (B, T, 128), 25 ms frames every 10 ms (edges snipped)."""
        if waveform.dim() != 2:
            raise ValueError(f"expected a waveform batch (B, N), got shape {tuple(waveform.shape)}")
        # Kaldi works on 16-bit integer sample values; the log energies, and so the normalisation
        # constants, assume that scale.
        frames = (waveform.float() * 2**15).unfold(1, FRAME_LENGTH, FRAME_SHIFT)  # (B, T, 400)
        frames = frames - frames.mean(dim=-1, keepdim=True)
        previous = torch.cat([frames[..., :1], frames[..., :-1]], dim=-1)
        frames = (frames - PREEMPHASIS * previous) * self.window
        spectrum = torch.fft.rfft(frames, n=PADDED_FRAME)  # (B, T, 257)
        power = spectrum.real**2 + spectrum.imag**2
        energies = torch.clamp(power @ self.mel, min=torch.finfo(torch.float32).eps)  # (B, T, 128)
        return (torch.log(energies) - FBANK_MEAN) / (2 * FBANK_STD)


@lru_cache(maxsize=1)
def _fbank() -> KaldiFbank:
    return KaldiFbank().eval()


def beats_fbank(waveform: torch.Tensor) -> torch.Tensor:
    """``KaldiFbank`` of a (B, N) batch: (B, T, 128)."""
    return _fbank()(waveform)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int,
                              device: torch.device | None = None) -> torch.Tensor:
    """Bucket of every (query, key) offset in a sequence, T5-style: exact near, logarithmic far.

    Keys after the query use the upper half of the buckets. Within a half, the first quarter of all
    buckets holds distances one by one; larger distances share logarithmically wider buckets, and
    ``max_distance`` or more falls in the last one.

    Args:
        length: Sequence length T.
        num_buckets: Total number of buckets (both directions).
        max_distance: Distance from which offsets share the last bucket of their side.
        device: Where to build the result.

    Returns:
        (T, T) long tensor; entry [i, j] is the bucket of key j seen from query i.
    """
    positions = torch.arange(length, device=device)
    offset = positions[None, :] - positions[:, None]  # (T, T): key minus query
    half = num_buckets // 2
    exact = half // 2
    distance = offset.abs()
    # The clamp only keeps log(0) out of entries that torch.where discards anyway.
    log_ratio = torch.log(distance.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return (offset > 0).long() * half + torch.where(distance < exact, distance, far)


class WeightNormConv1d(nn.Module):
    """Grouped Conv1d, weight-normalised per kernel tap, whose output is as long as its input.

    The weight is ``weight_g * weight_v / ||weight_v||``, the norm taken over all but the kernel axis:
    what ``torch.nn.utils.weight_norm(conv, dim=2)`` computes, under the names it gave the official
    checkpoints.
    """

    def __init__(self, channels: int, kernel_size: int, groups: int) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.groups = groups
        self.weight_v = nn.Parameter(torch.empty(channels, channels // groups, kernel_size))
        self.weight_g = nn.Parameter(torch.empty(1, 1, kernel_size))
        self.bias = nn.Parameter(torch.zeros(channels))
        nn.init.normal_(self.weight_v, std=math.sqrt(4 / (kernel_size * channels)))
        with torch.no_grad():
            self.weight_g.copy_(self._v_norm())

    def _v_norm(self) -> torch.Tensor:
        return self.weight_v.norm(dim=(0, 1), keepdim=True)  # (1, 1, K)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight_v * (self.weight_g / self._v_norm())  # (C, C/groups, K)
        y = F.conv1d(x, weight, self.bias, padding=self.kernel_size // 2, groups=self.groups)  # (B, C, T')
        # An even kernel gives one frame too many; like the reference, drop the last.
        return y[..., : x.shape[-1]]  # (B, C, T)


class MultiheadSelfAttention(nn.Module):
    """Self-attention with an optional relative position bias, optionally gated by the query."""

    def __init__(self, config: BEATsConfig, relative_attention_bias: nn.Embedding | None) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.num_heads = config.encoder_attention_heads
        self.head_dim = dim // self.num_heads
        self.dropout = config.attention_dropout
        self.num_buckets = config.num_buckets
        self.max_distance = config.max_distance
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)
        # Bucket -> per-head bias. The encoder passes the same table to every layer: the reference ties
        # them, and its checkpoints hold one (identical) copy per layer.
        self.relative_attention_bias = relative_attention_bias
        # Two gates per head and query, each the sum of 4 linear outputs, scale the shared bias.
        self.grep_linear = nn.Linear(self.head_dim, 8) if config.gru_rel_pos else None
        self.grep_a = nn.Parameter(torch.ones(1, self.num_heads, 1, 1)) if config.gru_rel_pos else None

    def position_bias(self, length: int) -> torch.Tensor:
        """The ungated bias (H, T, T) of a sequence of ``length``."""
        assert self.relative_attention_bias is not None
        table = self.relative_attention_bias
        buckets = relative_position_buckets(length, self.num_buckets, self.max_distance, table.weight.device)
        return table(buckets).permute(2, 0, 1)  # (H, T, T)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attend over ``x`` (B, T, C); returns the output (B, T, C) and the ungated bias for later layers."""
        b, t, c = x.shape
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        k = self.k_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        v = self.v_proj(x).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)
        if position_bias is None and self.relative_attention_bias is not None:
            position_bias = self.position_bias(t)
        mask = None
        if position_bias is not None:
            mask = position_bias.unsqueeze(0)  # (1, H, T, T)
            if self.grep_linear is not None and self.grep_a is not None:
                gates = torch.sigmoid(self.grep_linear(q).view(b, self.num_heads, t, 2, 4).sum(-1))  # (B, H, T, 2)
                gate_a, gate_b = gates.chunk(2, dim=-1)  # (B, H, T, 1) each
                mask = (gate_a * (gate_b * self.grep_a - 1.0) + 2.0) * mask  # (B, H, T, T)
            mask = mask.to(q.dtype)
        # The reference subtracts each row's maximum before its softmax (a float16 guard); softmax does not
        # change under that shift, and the fused kernel is stable on its own.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask,
                                           dropout_p=self.dropout if self.training else 0.0)  # (B, H, T, d)
        # out_proj over the heads without merging them into (B, T, C) first: with a symbolic length, torch.export
        # cannot prove the attention output's strides viewable, so the ONNX export failed on that reshape.
        weight = self.out_proj.weight.view(c, self.num_heads, self.head_dim)  # (C, H, d)
        out = torch.einsum("bhtd,chd->btc", y, weight)
        if self.out_proj.bias is not None:
            out = out + self.out_proj.bias
        return out, position_bias


class TransformerLayer(nn.Module):
    """Attention and feed-forward blocks, post-LN (with DeepNorm scaling) or pre-LN."""

    def __init__(self, config: BEATsConfig, relative_attention_bias: nn.Embedding | None) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.self_attn = MultiheadSelfAttention(config, relative_attention_bias)
        self.self_attn_layer_norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, config.encoder_ffn_embed_dim)
        self.fc2 = nn.Linear(config.encoder_ffn_embed_dim, dim)
        self.final_layer_norm = nn.LayerNorm(dim)
        self.activation = _ACTIVATIONS[config.activation_fn]
        self.dropout = nn.Dropout(config.dropout)
        self.activation_dropout = nn.Dropout(config.activation_dropout)
        self.layer_norm_first = config.layer_norm_first
        # DeepNorm (Wang et al. 2022) up-weights the residual path so a deep post-LN stack trains stably.
        self.residual_scale = (2 * config.encoder_layers) ** 0.25 if config.deep_norm else 1.0
        self._reset_parameters(config)

    def _reset_parameters(self, config: BEATsConfig) -> None:
        # BERT-style init of every linear map and embedding, then DeepNorm's down-scaled Xavier init.
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        if config.deep_norm:
            beta = (8 * config.encoder_layers) ** -0.25
            attn = self.self_attn
            for linear, gain in ((attn.q_proj, 1.0), (attn.k_proj, 1.0), (attn.v_proj, beta), (attn.out_proj, beta),
                                 (self.fc1, beta), (self.fc2, beta)):
                nn.init.xavier_normal_(linear.weight, gain=gain)

    def _feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.activation_dropout(self.activation(self.fc1(x)))  # (B, T, F)
        return self.dropout(self.fc2(x))  # (B, T, C)

    def forward(self, x: torch.Tensor, position_bias: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.layer_norm_first:
            attn, position_bias = self.self_attn(self.self_attn_layer_norm(x), position_bias)
            x = x + self.dropout(attn)
            x = x + self._feed_forward(self.final_layer_norm(x))
        else:
            attn, position_bias = self.self_attn(x, position_bias)
            x = self.self_attn_layer_norm(x * self.residual_scale + self.dropout(attn))
            x = self.final_layer_norm(x * self.residual_scale + self._feed_forward(x))
        return x, position_bias  # (B, T, C)


class TransformerEncoder(nn.Module):
    """Convolutional positional embedding, then the transformer layers."""

    def __init__(self, config: BEATsConfig) -> None:
        super().__init__()
        dim = config.encoder_embed_dim
        self.pos_conv = nn.Sequential(WeightNormConv1d(dim, config.conv_pos, config.conv_pos_groups), nn.GELU())
        table = (nn.Embedding(config.num_buckets, config.encoder_attention_heads)
                 if config.relative_position_embedding else None)
        self.layers = nn.ModuleList(TransformerLayer(config, table) for _ in range(config.encoder_layers))
        self.layer_norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(config.dropout)
        self.layer_norm_first = config.layer_norm_first
        self.layerdrop = config.encoder_layerdrop
        self.gradient_decay = config.layer_wise_gradient_decay_ratio

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Encode patch embeddings (B, P, C) -> (B, P, C)."""
        x = x + self.pos_conv(x.transpose(1, 2)).transpose(1, 2)  # (B, P, C)
        if not self.layer_norm_first:
            x = self.layer_norm(x)
        x = self.dropout(x)
        position_bias = None  # computed by the first layer that runs, reused by the rest
        for layer in self.layers:
            if self.gradient_decay != 1.0 and x.requires_grad:
                # Lower layers learn more slowly: each layer boundary scales the gradient passing through it.
                x.register_hook(lambda grad: grad * self.gradient_decay)
            if self.training and self.layerdrop > 0 and float(torch.rand(())) < self.layerdrop:
                continue
            x, position_bias = layer(x, position_bias)
        if self.layer_norm_first:
            x = self.layer_norm(x)
        return x  # (B, P, C)


class BEATs(nn.Module):
    """Waveform (B, N) at 16 kHz -> clip embedding (B, encoder_embed_dim), the mean over patches."""

    def __init__(self, config: BEATsConfig) -> None:
        super().__init__()
        self.config = config
        patch = config.input_patch_size
        self.fbank = KaldiFbank()  # buffers only, not in the checkpoint
        self.patch_embedding = nn.Conv2d(1, config.embed_dim, kernel_size=patch, stride=patch, bias=config.conv_bias)
        self.layer_norm = nn.LayerNorm(config.embed_dim)
        # The reference has no projection when the widths agree, and so no such keys in its checkpoints.
        self.post_extract_proj = (nn.Linear(config.embed_dim, config.encoder_embed_dim)
                                  if config.embed_dim != config.encoder_embed_dim else None)
        self.dropout_input = nn.Dropout(config.dropout_input)
        self.encoder = TransformerEncoder(config)
        self.predictor_dropout = nn.Dropout(config.predictor_dropout)
        self.predictor = (nn.Linear(config.encoder_embed_dim, config.predictor_class)
                          if config.finetuned_model else None)

    @property
    def embedding_dim(self) -> int:
        return self.config.encoder_embed_dim

    def extract_features(self, waveform: torch.Tensor) -> torch.Tensor:
        """Last-layer features of every patch.

        Args:
            waveform: (B, N) samples in [-1, 1] at 16 kHz, N >= ``config.min_samples``; clips in a
                batch share one length (there is no padding mask).

        Returns:
            (B, P, encoder_embed_dim). Patches are time-major: with F = 128 // 16 = 8 patches per
            column, patch ``t * F + f`` covers fbank frames [16t, 16t + 16) and mel bins [16f, 16f + 16).
            Frames beyond the last whole patch are dropped.
        """
        if waveform.dim() != 2:
            raise ValueError(f"expected a waveform batch (B, N), got shape {tuple(waveform.shape)}")
        if waveform.shape[1] < self.config.min_samples:
            raise ValueError(f"BEATs needs at least {self.config.min_samples} samples (one patch of "
                             f"{self.config.input_patch_size} frames), got {waveform.shape[1]}")
        fbank = self.fbank(waveform).to(self.patch_embedding.weight.dtype)  # (B, T, 128)
        x = self.patch_embedding(fbank.unsqueeze(1))  # (B, E, T/16, 128/16)
        x = self.layer_norm(x.flatten(2).transpose(1, 2))  # (B, P, E)
        if self.post_extract_proj is not None:
            x = self.post_extract_proj(x)  # (B, P, C)
        return self.encoder(self.dropout_input(x))  # (B, P, C)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.extract_features(waveform).mean(dim=1)  # (B, C)

    def logits(self, waveform: torch.Tensor) -> torch.Tensor:
        """AudioSet class logits (B, predictor_class) of a fine-tuned model: per-patch logits, averaged.

        Their sigmoid is what the reference returns as class probabilities.
        """
        if self.predictor is None:
            raise ValueError("this BEATs model has no predictor (config.finetuned_model is False)")
        x = self.predictor(self.predictor_dropout(self.extract_features(waveform)))  # (B, P, K)
        return x.mean(dim=1)  # (B, K)


def save_beats_checkpoint(model: BEATs, path: str | os.PathLike[str]) -> None:
    """Write ``model`` in Microsoft's checkpoint format: ``{"cfg": <config fields>, "model": <state dict>}``."""
    torch.save({"cfg": dataclasses.asdict(model.config), "model": model.state_dict()}, path)


def load_beats_checkpoint(path: str | os.PathLike[str]) -> BEATs:
    """Load a checkpoint in Microsoft's format (an official one or one written by ``save_beats_checkpoint``).

    The file is read with ``weights_only=True`` (it never runs code), and the state must match the
    model built from its ``cfg`` key for key and shape.

    Args:
        path: A ``.pt`` file holding ``{"cfg": dict, "model": state dict}``.

    Returns:
        The model, in eval mode, on the CPU.

    Raises:
        BEATsCheckpointError: If the file is unreadable, its cfg is invalid, or its keys or shapes differ
            from the model's (the message lists them).
    """
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a missing, malformed or unsafe file
        raise BEATsCheckpointError(f"{path}: cannot be loaded with weights_only=True: {exc}") from exc
    if not isinstance(checkpoint, dict) or set(checkpoint) != {"cfg", "model"}:
        found = sorted(checkpoint) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise BEATsCheckpointError(f"{path}: expected a dict with keys ['cfg', 'model'], found {found}")
    try:
        config = beats_config_from_checkpoint_cfg(checkpoint["cfg"])
    except ConfigError as exc:
        raise BEATsCheckpointError(f"{path}: invalid cfg: {exc}") from exc
    model = BEATs(config)
    load_state_strict(model, checkpoint["model"], source=str(path), error=BEATsCheckpointError)
    return model.eval()


@dataclass(frozen=True)
class BEATsFrontendConfig:
    """BEATs' pre-processing is fixed (Kaldi fbank, its constants); a bundle records only the input rate."""

    sample_rate: int = SAMPLE_RATE

    def __post_init__(self) -> None:
        if self.sample_rate != SAMPLE_RATE:
            raise ValueError(f"BEATs takes {SAMPLE_RATE} Hz audio, not {self.sample_rate}")


class BEATsEncoder(ClipEncoder):
    """BEATs as a clip encoder: the mean over patches of the last layer, per window."""

    architecture = "beats"

    def __init__(self, frontend: BEATsFrontendConfig, network: BEATsConfig, window: WindowConfig) -> None:
        super().__init__()
        self.frontend_config = frontend
        self.network_config = network
        self.window = window
        self.network = BEATs(network)

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        # Clips shorter than one patch are zero-padded to it, as the service accepts clips from 1 s.
        short = self.network_config.min_samples - waveform.shape[-1]
        return self.network(F.pad(waveform, (0, max(short, 0))))  # (B, C)

    def macs_per_second(self) -> int:
        # Convolutions and linear layers only: attention's two matmuls per layer are not counted.
        return count_macs(self.network, torch.zeros(1, SAMPLE_RATE))
