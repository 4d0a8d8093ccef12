"""The encoder bundle: a directory holding ``manifest.json``, ``weights.pt`` and, once exported, ``encoder.onnx``.

The manifest names the encoder's architecture (``ARCHITECTURES``: the CP-Mobile student, YAMNet) and
carries everything that rebuilds it (front-end, network and window configs),
what it was trained on and under which licences, and its evaluation figures. Loading checks the
weights' sha256 against the manifest before ``torch.load(weights_only=True)`` touches them, loads
strictly, and probes the encoder once, so a bundle never executes code and never half-loads.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from sceneprint.beats import BEATsConfig, BEATsEncoder, BEATsFrontendConfig
from sceneprint.cpmobile import CPMobileConfig, parameter_count
from sceneprint.encoder import ClipEncoder, Encoder, WindowConfig, network_macs_per_second
from sceneprint.frontend import LogMelConfig
from sceneprint.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    READABLE_VERSIONS,
    BundleError,
    GraphInfo,
    Manifest,
    default_bundle_path,
    parse_manifest,
    sha256_file,
    write_json_atomic,
)
from sceneprint.state import load_state_strict
from sceneprint.yamnet import YAMNetConfig, YAMNetEncoder, YAMNetFrontendConfig

WEIGHTS = "weights.pt"
# Every ONNX graph file a bundle may hold (``sceneprint.export``); saving new weights removes them.
GRAPH_FILES = ("encoder.onnx", "encoder-int8.onnx")


@dataclass(frozen=True)
class Architecture:
    """How a bundle's configs become an encoder."""

    frontend: type
    network: type
    build: Callable[[Any, Any, WindowConfig], ClipEncoder]


ARCHITECTURES: dict[str, Architecture] = {
    "cpmobile": Architecture(LogMelConfig, CPMobileConfig, Encoder),
    "yamnet": Architecture(YAMNetFrontendConfig, YAMNetConfig, YAMNetEncoder),
    "beats": Architecture(BEATsFrontendConfig, BEATsConfig, BEATsEncoder),
}


def save_bundle(
    directory: str | os.PathLike[str],
    encoder: ClipEncoder,
    *,
    model_version: str,
    training: dict[str, Any],
    evaluation: dict[str, Any],
    unknown_threshold: float | None = None,
) -> Manifest:
    """Write ``encoder`` as a bundle in ``directory`` (created; an existing bundle is replaced).

    Args:
        directory: Target directory.
        encoder: The trained encoder.
        model_version: A unique, human-readable version string (e.g. ``cpmobile60k-ce-2026.11.26``).
        training: Data summary, licences, recipe.
        evaluation: Evaluation figures with how they were measured.
        unknown_threshold: The calibrated unknown threshold, if training calibrated one.

    Returns:
        The manifest written.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    # A graph exported from earlier weights would no longer be this encoder; the manifest written
    # below names none, and the files go.
    for name in GRAPH_FILES:
        (out / name).unlink(missing_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    weights = out / WEIGHTS
    tmp = weights.with_suffix(".pt.tmp")
    torch.save(state, tmp)
    os.replace(tmp, weights)
    manifest = Manifest(
        format_version=FORMAT_VERSION,
        model_version=model_version,
        created_at=datetime.now(UTC).isoformat(timespec="seconds"),
        architecture=encoder.architecture,
        sample_rate=encoder.sample_rate,
        embedding_dim=encoder.embedding_dim,
        parameter_count=parameter_count(encoder.network),
        macs_per_second=network_macs_per_second(encoder),
        frontend=encoder.frontend_config,
        network=encoder.network_config,
        window=encoder.window,
        weights_sha256=sha256_file(weights),
        training=training,
        evaluation=evaluation,
        unknown_threshold=unknown_threshold,
    )
    write_json_atomic(out / MANIFEST, manifest.to_json())
    return manifest


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and validate a bundle's manifest without loading its weights (configs typed per architecture)."""
    return parse_manifest(directory, {name: (arch.frontend, arch.network) for name, arch in ARCHITECTURES.items()})


def load_bundle(directory: str | os.PathLike[str]) -> tuple[ClipEncoder, Manifest]:
    """Load a bundle: verify, rebuild, load strictly, probe.

    Args:
        directory: The bundle directory.

    Returns:
        The encoder in eval mode, and its manifest.

    Raises:
        BundleError: If anything does not match what the manifest promises.
    """
    manifest = read_manifest(directory)
    weights = Path(directory) / WEIGHTS
    if not weights.is_file():
        raise BundleError(f"{weights} does not exist")
    actual = sha256_file(weights)
    if actual != manifest.weights_sha256:
        raise BundleError(
            f"{weights}: sha256 {actual} does not match the manifest's {manifest.weights_sha256}; "
            "the weights were modified or belong to another bundle"
        )
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a malformed or unsafe pickle
        raise BundleError(f"{weights}: cannot be loaded with weights_only=True: {exc}") from exc
    encoder = ARCHITECTURES[manifest.architecture].build(manifest.frontend, manifest.network, manifest.window)
    load_state_strict(encoder, state, source=str(weights), error=BundleError)
    encoder.eval()
    _probe(encoder, manifest)
    return encoder, manifest


def _probe(encoder: ClipEncoder, manifest: Manifest) -> None:
    """Run one second of a fixed test signal through the encoder; refuse non-finite or wrong-sized output."""
    t = torch.arange(manifest.sample_rate) / manifest.sample_rate
    g = torch.Generator().manual_seed(0)
    probe = 0.1 * torch.sin(2 * math.pi * 440.0 * t) + 0.01 * torch.randn(len(t), generator=g)
    with torch.inference_mode():
        out = encoder(probe.unsqueeze(0))
    if out.shape != (1, manifest.embedding_dim):
        raise BundleError(f"encoder output shape {tuple(out.shape)} != (1, {manifest.embedding_dim})")
    if not torch.isfinite(out).all():
        raise BundleError("encoder produces non-finite embeddings")


__all__ = ["ARCHITECTURES", "FORMAT_VERSION", "GRAPH_FILES", "MANIFEST", "READABLE_VERSIONS", "WEIGHTS", "BundleError",
           "GraphInfo", "Manifest", "default_bundle_path", "load_bundle", "read_manifest", "save_bundle", "sha256_file"]
