"""The encoder: log-mel front-end + CP-Mobile network + how long audio is windowed.

``Encoder.embed_clip`` is the one path from a decoded waveform to a clip embedding; the service,
the few-shot evaluation and the benchmarks all call it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sceneprint.cpmobile import CPMobile, CPMobileConfig
from sceneprint.frontend import LogMel, LogMelConfig
from sceneprint.windows import WindowConfig, aggregate_windows, cut_windows

__all__ = ["ClipEncoder", "Encoder", "WindowConfig", "count_macs", "network_macs_per_second"]


class ClipEncoder(nn.Module):
    """Waveform (B, N) at ``sample_rate`` -> unit embeddings (B, D); long clips are embedded over windows.

    Every architecture a bundle can hold (``sceneprint.bundle.ARCHITECTURES``) is a subclass: the
    windowing and aggregation of ``embed_clip`` exist once, whatever the network.
    """

    architecture: str = ""
    frontend_config: Any
    network_config: Any
    window: WindowConfig
    network: nn.Module  # the trainable network: its parameters are what a bundle counts

    @property
    def sample_rate(self) -> int:
        return int(self.frontend_config.sample_rate)

    @property
    def embedding_dim(self) -> int:
        return int(self.network_config.embedding_dim)

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveforms (B, N) -> embeddings before L2 normalisation (B, D)."""
        raise NotImplementedError

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.features(waveform), dim=-1)  # (B, D) unit vectors

    def macs_per_second(self) -> int:
        """Network MACs for one second of audio (front-end FFTs not counted)."""
        raise NotImplementedError

    def windows(self, waveform: np.ndarray) -> torch.Tensor:
        """Cut a mono waveform (N,) into windows (W, L); the last window ends at the clip's end."""
        return torch.from_numpy(cut_windows(waveform, self.sample_rate, self.window))  # (W, L)

    @torch.inference_mode()
    def window_features(self, waveform: np.ndarray) -> np.ndarray:
        """Embeddings before normalisation of a decoded clip's windows (N,) -> (W, D)."""
        was_training = self.training
        self.eval()
        try:
            return self.features(self.windows(waveform)).numpy()
        finally:
            self.train(was_training)

    def embed_clip(self, waveform: np.ndarray) -> np.ndarray:
        """Embed one decoded clip (N,) -> (D,) unit vector: the re-normalised mean of its windows' unit vectors."""
        return aggregate_windows(self.window_features(waveform))


class Encoder(ClipEncoder):
    """The CP-Mobile student: log-mel front-end + CP-Mobile network."""

    architecture = "cpmobile"
    network: CPMobile

    def __init__(self, frontend: LogMelConfig, network: CPMobileConfig, window: WindowConfig) -> None:
        super().__init__()
        self.frontend_config = frontend
        self.network_config = network
        self.window = window
        self.frontend = LogMel(frontend)
        self.network = CPMobile(network)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.network(self.frontend(waveform))  # CP-Mobile normalises its own output

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        return self.network.forward_features(self.frontend(waveform))

    def macs_per_second(self) -> int:
        frames = self.frontend_config.frames(self.sample_rate)
        return count_macs(self.network, torch.zeros(1, 1, self.frontend_config.n_mels, frames))


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of convolutions and linear layers for one forward pass of ``example``."""
    total = 0

    def conv_hook(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Conv2d)
        kh, kw = m.kernel_size
        total += out.numel() * (m.in_channels // m.groups) * kh * kw

    def linear_hook(m: nn.Module, _inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        nonlocal total
        assert isinstance(m, nn.Linear)
        total += out.numel() * m.in_features

    handles = []
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
    try:
        with torch.inference_mode():
            module.eval()
            module(example)
    finally:
        for h in handles:
            h.remove()
    return total


def network_macs_per_second(encoder: ClipEncoder) -> int:
    """Network MACs for one second of audio (the front-end's FFTs are not counted)."""
    return encoder.macs_per_second()
