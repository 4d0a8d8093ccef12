"""A bundle's manifest, readable without torch: what the service needs to run a bundle's ONNX graph.

``sceneprint.bundle`` (torch) rebuilds the encoder from the manifest's configs; the service
(``sceneprint.runtime``, ONNX Runtime) reads the same manifest here and runs the graph it names.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from importlib.resources import files
from pathlib import Path
from typing import Any, Literal

from sceneprint.config import ConfigError, from_dict, to_dict
from sceneprint.prototypes import EnrollmentCalibration
from sceneprint.windows import WindowConfig

# Version 2 names the architecture; version 1 bundles (CP-Mobile only) still load. The ONNX graph is an
# optional field of both: bundles without one still load in the torch path.
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST = "manifest.json"
# The command that gives a bundle its graph, as named in refusals.
ADD_GRAPH_COMMAND = "sceneprint bundle add-onnx"


class BundleError(RuntimeError):
    """A bundle that cannot be used; the message says why."""


@dataclass(frozen=True)
class GraphInfo:
    """The encoder as an ONNX graph inside the bundle."""

    file: str  # relative to the bundle directory
    sha256: str
    # What the graph takes: ``logmel`` (B, 1, n_mels, T) from ``sceneprint.logmel`` run outside it, or
    # ``waveform`` (B, N) when the architecture's front-end is inside the graph.
    input: Literal["logmel", "waveform"]
    precision: Literal["float32", "int8"]
    opset: int
    # The graph's output: embeddings before L2 normalisation (B, D), as ``ClipEncoder.features``.


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
    # The ONNX graph the service runs (None: the bundle has none yet; ``sceneprint bundle add-onnx`` adds it).
    graph: GraphInfo | None = None
    # Bounds on enrollment quality and the per-scene threshold rule, calibrated on the training classes
    # (None: not calibrated; ``sceneprint bundle calibrate`` adds it).
    calibration: EnrollmentCalibration | None = None

    def to_json(self) -> dict[str, Any]:
        data = to_dict(self)
        for optional in ("graph", "calibration"):
            if data[optional] is None:
                del data[optional]  # a bundle without one reads exactly as it did before the field existed
        return data


# What decides the embeddings a bundle makes: its configs and the hashes of its weights and graph. Figures,
# calibration, dates and the version string may change without changing one embedding.
MAX_KEY_VERSION = 111
IDENTITY_FIELDS = ("architecture", "sample_rate", "embedding_dim", "frontend", "network", "window",
                   "weights_sha256", "graph")


def model_fingerprint(manifest: Manifest) -> str:
    """The sha256 of what makes a bundle's embeddings: two bundles share it only if they embed alike."""
    data = manifest.to_json()
    identity = {name: data.get(name) for name in IDENTITY_FIELDS}
    return hashlib.sha256(json.dumps(identity, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def model_key(manifest: Manifest) -> str:
    """The key embeddings and prototypes are stored under: ``<model_version>@<first 16 of the fingerprint>``.

    The version string alone is not enough: two bundles of one name but different weights embed into
    different spaces and must never share vectors.
    """
    # The version is cut to keep the key within the database's 128 characters; the fingerprint tells keys apart.
    return f"{manifest.model_version[:MAX_KEY_VERSION]}@{model_fingerprint(manifest)[:16]}"


def default_bundle_path() -> Path:
    """The bundled default encoder, shipped inside the package (``sceneprint.models``)."""
    return Path(str(files("sceneprint.models"))) / "sceneprint-default"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_manifest_json(directory: str | os.PathLike[str]) -> dict[str, Any]:
    """A bundle's manifest as JSON, its format version checked and format 1 read as format 2's fields."""
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
    return data


def parse_manifest(directory: str | os.PathLike[str],
                   configs: Mapping[str, tuple[type | None, type | None]]) -> Manifest:
    """Read and validate a bundle's manifest.

    Args:
        directory: The bundle directory.
        configs: Per architecture name, the classes of its front-end and network configs; ``None`` leaves
            that section as JSON (the service does not rebuild a network, so it needs no network class).

    Returns:
        The manifest, its config sections typed as ``configs`` says.
    """
    path = Path(directory) / MANIFEST
    data = read_manifest_json(directory)
    arch = configs.get(data.get("architecture"))  # type: ignore[arg-type]
    if arch is None:
        raise BundleError(f"{path}: architecture {data.get('architecture')!r} is not one of {sorted(configs)}")
    frontend_cls, network_cls = arch
    try:
        manifest = from_dict(Manifest, data)
        if frontend_cls is not None:
            manifest = replace(manifest, frontend=from_dict(frontend_cls, manifest.frontend, "frontend."))
        if network_cls is not None:
            manifest = replace(manifest, network=from_dict(network_cls, manifest.network, "network."))
    except ConfigError as exc:
        raise BundleError(f"{path}: {exc}") from exc
    frontend_rate = (manifest.frontend.get("sample_rate") if isinstance(manifest.frontend, dict)
                     else manifest.frontend.sample_rate)
    if manifest.sample_rate != frontend_rate:
        raise BundleError(f"{path}: sample_rate {manifest.sample_rate} != frontend.sample_rate")
    if network_cls is not None and manifest.embedding_dim != manifest.network.embedding_dim:
        raise BundleError(f"{path}: embedding_dim {manifest.embedding_dim} != network.embedding_dim")
    return manifest


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    """Write JSON to ``path`` so that readers see the old file or the new one, never half of one."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".manifest-", suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a bundle is meant to be read by others
    os.replace(tmp, path)
