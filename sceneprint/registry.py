"""The model registry: a directory of encoder bundles, one sub-directory per version, and a pointer to the current one.

    registry/
      CURRENT              {"version": "v3", "key": "...@...", "model_version": "...", "updated_at": "..."}
      v1/ v2/ v3/          bundles (manifest.json, encoder.onnx, weights.pt, ...), each with its published.json
      .staging-*/          a publish in progress (ignored by readers; removed when it fails)
      .lock                serialises publish and rollback between processes

A version directory is complete before it has its name (copied to a staging directory, verified there,
renamed) and never changes after; earlier versions stay for rollback. The pointer is replaced atomically
(a temporary file written, fsynced and renamed over it, then the directory fsynced), so a reader sees the
old version or the new one, never half of either. Nothing here imports torch: publishing, rolling back and
listing work in a serve-only install.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sceneprint.manifest import BundleError, Manifest, model_key, sha256_file
from sceneprint.runtime import OnnxEncoder, SessionConfig, load_onnx_encoder, probe_waveform

POINTER = "CURRENT"
RECORD = "published.json"  # written into each version directory when it is published
LOCK = ".lock"
VERSION_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
AUTO_VERSION = re.compile(r"^v(\d+)$")
WEIGHTS_FILE = "weights.pt"
# The figure a floor (``--min-accuracy``) is held against: few-shot accuracy on the held-out classes.
ACCURACY_FIGURE = ("heldout_fewshot", "5way_5shot", "accuracy")
PROBE_SECONDS = 3.0  # long enough for the windowed path (several windows when the window is short)


class RegistryError(RuntimeError):
    """A registry operation that cannot be done; the message says why."""


@dataclass(frozen=True)
class Verified:
    """A bundle that passed the checks: its encoder (ready to serve), the key its embeddings are stored under,
    its figure."""

    encoder: OnnxEncoder
    key: str
    accuracy: float | None

    @property
    def manifest(self) -> Manifest:
        return self.encoder.manifest


@dataclass(frozen=True)
class Pointer:
    """The current version, as the pointer file names it."""

    version: str
    key: str
    model_version: str
    updated_at: str


@dataclass(frozen=True)
class RegistryVersion:
    """One published version."""

    version: str
    path: Path
    key: str
    model_version: str
    published_at: str
    accuracy: float | None
    current: bool


def accuracy_of(manifest: Manifest) -> float | None:
    """The bundle's held-out 5-way 5-shot accuracy, where its evaluation figures have it."""
    value: Any = manifest.evaluation
    for part in ACCURACY_FIGURE:
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return float(value) if isinstance(value, int | float) else None


def verify_bundle(directory: Path, *, min_accuracy: float | None = None,
                  session: SessionConfig | None = None) -> Verified:
    """Check a bundle as the service will run it, before it can become current.

    Its hashes (weights, where it has them, and graph), that ONNX Runtime loads its graph, that a probe clip
    gives a finite unit embedding of the manifest's size, and, where it carries evaluation figures, that its
    accuracy is not below ``min_accuracy``. ``session``: the ONNX Runtime options of the encoder returned.

    Raises:
        BundleError: Naming the check that failed.
    """
    encoder = load_onnx_encoder(directory, session=session)  # graph hash, a session, the raw output's shape
    manifest = encoder.manifest
    weights = Path(directory) / WEIGHTS_FILE
    if weights.is_file() and sha256_file(weights) != manifest.weights_sha256:
        raise BundleError(f"{weights}: sha256 does not match the manifest's; the weights were modified")
    embedding = encoder.embed_clip(np.tile(probe_waveform(manifest.sample_rate), math.ceil(PROBE_SECONDS)))
    if embedding.shape != (manifest.embedding_dim,):
        raise BundleError(f"the probe clip's embedding has shape {embedding.shape}, not ({manifest.embedding_dim},)")
    if not np.isfinite(embedding).all():
        raise BundleError("the probe clip's embedding is not finite")
    norm = float(np.linalg.norm(embedding))
    if abs(norm - 1.0) > 1e-3:
        raise BundleError(f"the probe clip's embedding has norm {norm:.4f}, not 1")
    accuracy = accuracy_of(manifest)
    if min_accuracy is not None and accuracy is not None and accuracy < min_accuracy:
        raise BundleError(f"held-out 5-way 5-shot accuracy {accuracy:.4f} is below the floor {min_accuracy:.4f}")
    return Verified(encoder=encoder, key=model_key(manifest), accuracy=accuracy)


def _fsync_directory(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_durably(path: Path, data: dict[str, Any]) -> None:
    """Replace ``path`` with ``data`` atomically and durably: write new, fsync, rename, fsync the directory."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_directory(path.parent)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


class Registry:
    """A registry directory (created on first write)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def pointer_path(self) -> Path:
        return self.root / POINTER

    # --- reading ------------------------------------------------------------------------------------

    def pointer(self) -> Pointer | None:
        """The current version, or None when nothing was published yet."""
        try:
            data = json.loads(self.pointer_path.read_text(encoding="utf-8"))
            return Pointer(version=str(data["version"]), key=str(data["key"]),
                           model_version=str(data["model_version"]), updated_at=str(data["updated_at"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise RegistryError(f"{self.pointer_path} is not a readable pointer: {exc}") from exc

    def stamp(self) -> tuple[int, int, int] | None:
        """What changes whenever the pointer is replaced (inode, size, mtime); None when it does not exist."""
        try:
            st = self.pointer_path.stat()
        except FileNotFoundError:
            return None
        return st.st_ino, st.st_size, st.st_mtime_ns

    def path(self, version: str) -> Path:
        """The directory of ``version`` (which must be a valid version name)."""
        if not VERSION_NAME.fullmatch(version):
            raise RegistryError(f"{version!r} is not a version name (1-64 of letters, digits, '.', '_', '-')")
        return self.root / version

    def versions(self) -> list[RegistryVersion]:
        """Every published version, oldest first."""
        if not self.root.is_dir():
            return []
        current = self.pointer()
        found = []
        for entry in self.root.iterdir():
            record = entry / RECORD
            if not VERSION_NAME.fullmatch(entry.name) or not record.is_file():
                continue
            data = json.loads(record.read_text(encoding="utf-8"))
            found.append(RegistryVersion(
                version=entry.name, path=entry, key=data["key"], model_version=data["model_version"],
                published_at=data["published_at"], accuracy=data.get("accuracy"),
                current=current is not None and current.version == entry.name))
        return sorted(found, key=lambda v: (v.published_at, v.version))

    def version(self, version: str) -> RegistryVersion:
        for v in self.versions():
            if v.version == version:
                return v
        raise RegistryError(f"version {version!r} is not in the registry {self.root}")

    # --- writing ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One publish or rollback at a time, across processes (an advisory lock on ``.lock``)."""
        self.root.mkdir(parents=True, exist_ok=True)
        with (self.root / LOCK).open("a") as f:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f.fileno(), fcntl.LOCK_UN)

    def publish(self, bundle: Path, *, version: str | None = None, min_accuracy: float | None = None,
                activate: bool = True) -> RegistryVersion:
        """Copy ``bundle`` into the registry as a new version, verify the copy, and make it current.

        Args:
            bundle: A bundle directory with its ONNX graph.
            version: The version's name (default: ``v<N>``, one above the highest such name).
            min_accuracy: Refuse a bundle whose held-out accuracy is below this (where it carries one).
            activate: Make it the current version (else it is only stored).

        Raises:
            BundleError: The bundle failed a check; nothing is left in the registry.
            RegistryError: The version exists.
        """
        if not (Path(bundle) / "manifest.json").is_file():
            raise BundleError(f"{bundle} is not a bundle directory (it has no manifest.json)")
        with self._locked():
            return self._publish_locked(bundle, version=version, min_accuracy=min_accuracy, activate=activate)

    def _publish_locked(self, bundle: Path, *, version: str | None, min_accuracy: float | None,
                        activate: bool) -> RegistryVersion:
        name = version or self._next_version()
        target = self.path(name)
        if target.exists():
            raise RegistryError(f"version {name!r} exists in {self.root}; versions never change (choose another "
                                "--version)")
        staging = Path(tempfile.mkdtemp(dir=self.root, prefix=".staging-"))
        try:
            shutil.copytree(bundle, staging, dirs_exist_ok=True, ignore=shutil.ignore_patterns(".*"))
            verified = verify_bundle(staging, min_accuracy=min_accuracy)  # the copy is what gets served
            record = {"version": name, "key": verified.key, "model_version": verified.manifest.model_version,
                      "published_at": _now(), "accuracy": verified.accuracy, "source": str(Path(bundle).resolve())}
            (staging / RECORD).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
            for file in staging.rglob("*"):
                if file.is_file():
                    with file.open("rb") as f:
                        os.fsync(f.fileno())
            os.chmod(staging, 0o755)  # mkdtemp makes it 0700; a bundle is meant to be read by others
            os.rename(staging, target)
            _fsync_directory(self.root)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        if activate:
            self._point(name, verified.key, verified.manifest.model_version)
        return self.version(name)

    def rollback(self, to: str | None = None) -> RegistryVersion:
        """Make an earlier version current again: ``to``, or the version published before the current one.

        The version is verified again (hashes, load, probe) before the pointer moves.
        """
        with self._locked():
            versions = self.versions()
            current = next((v for v in versions if v.current), None)
            if to is None:
                if current is None:
                    raise RegistryError(f"the registry {self.root} has no current version to roll back from")
                earlier = [v for v in versions if (v.published_at, v.version) < (current.published_at,
                                                                                   current.version)]
                if not earlier:
                    raise RegistryError(f"no version was published before {current.version!r}")
                chosen = earlier[-1]
            else:
                named = [v for v in versions if v.version == to]
                if not named:
                    raise RegistryError(f"version {to!r} is not in the registry {self.root}; `sceneprint models` "
                                        "lists them")
                chosen = named[0]
            verified = verify_bundle(chosen.path)
            self._point(chosen.version, verified.key, verified.manifest.model_version)
        return self.version(chosen.version)

    def seed(self, bundle: Path) -> Pointer:
        """The current version; in a registry with none, ``bundle`` is published first (a service's first start)."""
        pointer = self.pointer()
        if pointer is not None:
            return pointer
        with self._locked():
            if self.pointer() is None:  # another process may have seeded it meanwhile
                versions = self.versions()
                if versions:  # published but never pointed to (a crash between the two): the newest
                    newest = versions[-1]
                    self._point(newest.version, newest.key, newest.model_version)
                else:
                    self._publish_locked(bundle, version=None, min_accuracy=None, activate=True)
        pointer = self.pointer()
        assert pointer is not None
        return pointer

    def _point(self, version: str, key: str, model_version: str) -> None:
        write_json_durably(self.pointer_path, {"version": version, "key": key, "model_version": model_version,
                                               "updated_at": _now()})

    def _next_version(self) -> str:
        numbers = [int(m.group(1)) for p in (self.root.iterdir() if self.root.is_dir() else [])
                   if (m := AUTO_VERSION.fullmatch(p.name))]
        return f"v{max(numbers, default=0) + 1}"
