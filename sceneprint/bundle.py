"""The encoder bundle: a directory holding ``manifest.json`` and ``weights.pt``.

The manifest names the encoder's architecture (``ARCHITECTURES``: the CP-Mobile student, YAMNet) and
carries everything that rebuilds it (front-end, network and window configs),
what it was trained on and under which licences, and its evaluation figures. Loading checks the
weights' sha256 against the manifest before ``torch.load(weights_only=True)`` touches them, loads
strictly, and probes the encoder once, so a bundle never executes code and never half-loads.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from importlib.resources import files
from pathlib import Path
from typing import Any

import torch

from sceneprint.beats import BEATsConfig, BEATsEncoder, BEATsFrontendConfig
from sceneprint.config import ConfigError, from_dict, to_dict
from sceneprint.cpmobile import CPMobileConfig, parameter_count
from sceneprint.encoder import ClipEncoder, Encoder, WindowConfig, network_macs_per_second
from sceneprint.frontend import LogMelConfig
from sceneprint.state import load_state_strict
from sceneprint.yamnet import YAMNetConfig, YAMNetEncoder, YAMNetFrontendConfig

# Version 2 names the architecture; version 1 bundles (CP-Mobile only) still load.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
WEIGHTS = "weights.pt"


class BundleError(RuntimeError):
    """A bundle that cannot be used; the message says why."""


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


@dataclass(frozen=True)
class Manifest:
    """Everything a bundle says about itself."""

    format_version: int
    model_version: str
    created_at: str
    architecture: str
    sample_rate: int
    embedding_dim: int
    parameter_count: int
    macs_per_second: int
    frontend: Any  # the architecture's front-end config (LogMelConfig for CP-Mobile)
    network: Any  # the architecture's network config (CPMobileConfig for CP-Mobile)
    window: WindowConfig
    weights_sha256: str
    training: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    # Best cosine score below which a clip is unknown, calibrated on held-out classes by training (None: not
    # calibrated). The service reads it as its default unknown threshold.
    unknown_threshold: float | None = None

    def to_json(self) -> dict[str, Any]:
        return to_dict(self)


def default_bundle_path() -> Path:
    """The bundled default encoder, shipped inside the package (``sceneprint.models``)."""
    return Path(str(files("sceneprint.models"))) / "sceneprint-default"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    _write_json_atomic(out / MANIFEST, manifest.to_json())
    return manifest


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and validate a bundle's manifest without loading its weights."""
    path = Path(directory) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path} does not exist: not a Sceneprint bundle") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise BundleError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict) or data.get("format_version") not in READABLE_VERSIONS:
        found = data.get("format_version") if isinstance(data, dict) else None
        raise BundleError(f"{path}: format_version {found!r} is not supported (readable: {READABLE_VERSIONS})")
    if data["format_version"] == 1:
        # Version 1 knew one architecture, with the normalisation inside the head convolution.
        data = {**data, "architecture": "cpmobile", "network": {**data.get("network", {}), "output_norm": "head"}}
    arch = ARCHITECTURES.get(data.get("architecture"))  # type: ignore[arg-type]
    if arch is None:
        raise BundleError(f"{path}: architecture {data.get('architecture')!r} is not one of {sorted(ARCHITECTURES)}")
    try:
        manifest = from_dict(Manifest, data)
        manifest = replace(manifest, frontend=from_dict(arch.frontend, manifest.frontend, "frontend."),
                           network=from_dict(arch.network, manifest.network, "network."))
    except ConfigError as exc:
        raise BundleError(f"{path}: {exc}") from exc
    if manifest.sample_rate != manifest.frontend.sample_rate:
        raise BundleError(f"{path}: sample_rate {manifest.sample_rate} != frontend.sample_rate")
    if manifest.embedding_dim != manifest.network.embedding_dim:
        raise BundleError(f"{path}: embedding_dim {manifest.embedding_dim} != network.embedding_dim")
    return manifest


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


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a bundle is meant to be read by others
    os.replace(tmp, path)


__all__ = ["ARCHITECTURES", "FORMAT_VERSION", "BundleError", "Manifest", "default_bundle_path", "load_bundle",
           "read_manifest", "save_bundle"]
