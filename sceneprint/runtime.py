"""The encoder as the service runs it: a bundle's ONNX graph in ONNX Runtime, without torch.

A clip goes the same way as through ``ClipEncoder.embed_clip``: cut into windows
(``sceneprint.windows.cut_windows``), each window's features computed (CP-Mobile: the numpy log-mel of
``sceneprint.logmel`` outside the graph, then the network; YAMNet and BEATs: their front-end inside
the graph), and the windows aggregated (``aggregate_windows``). Nothing here imports torch.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from threadpoolctl import threadpool_limits

from sceneprint.logmel import LogMelConfig, logmel
from sceneprint.manifest import ADD_GRAPH_COMMAND, BundleError, Manifest, parse_manifest, sha256_file
from sceneprint.windows import aggregate_windows, cut_windows

# What the service must know of each architecture's configs to run its graph: the CP-Mobile front-end
# runs outside the graph, so its config is typed; the rest of each config stays JSON (it rebuilds a
# torch network, which the service never does). The names are those of ``sceneprint.bundle.ARCHITECTURES``.
SERVING_CONFIGS: dict[str, tuple[type | None, type | None]] = {
    "cpmobile": (LogMelConfig, None),
    "yamnet": (None, None),
    "beats": (None, None),
}


@dataclass(frozen=True)
class SessionConfig:
    """ONNX Runtime session options (docs/benchmarks.md measures them).

    One intra-op thread per inference slot: the service runs one slot per core, so more threads per call
    would only time-slice the same cores. The memory arena keeps the buffers of one clip's run for the
    next; memory patterns are planned per input shape, and clip lengths vary, so they buy nothing.
    """

    intra_op_threads: int = 1
    memory_arena: bool = True
    memory_pattern: bool = False

    def session_options(self) -> ort.SessionOptions:
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.intra_op_threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.enable_cpu_mem_arena = self.memory_arena
        options.enable_mem_pattern = self.memory_pattern
        options.log_severity_level = 3  # errors only: a served graph is checked at load, not logged per node
        return options


class OnnxEncoder:
    """A bundle's ONNX graph: decoded waveform (N,) -> clip embedding (D,), as ``ClipEncoder.embed_clip``.

    Its methods are safe to call from several threads at once (one ONNX Runtime session, shared).
    """

    def __init__(self, manifest: Manifest, session: ort.InferenceSession) -> None:
        self.manifest = manifest
        self.session = session
        graph = manifest.graph
        assert graph is not None
        self._input_kind = graph.input
        self._input_name = session.get_inputs()[0].name

    @property
    def sample_rate(self) -> int:
        return self.manifest.sample_rate

    @property
    def embedding_dim(self) -> int:
        return self.manifest.embedding_dim

    def features(self, waveforms: np.ndarray) -> np.ndarray:
        """Equally long waveforms (B, N) -> embeddings before L2 normalisation (B, D)."""
        x = np.ascontiguousarray(waveforms, dtype=np.float32)
        if self._input_kind == "logmel":
            x = logmel(x, self.manifest.frontend)  # (B, 1, n_mels, T)
        out = self.session.run(None, {self._input_name: x})[0]
        return np.asarray(out, dtype=np.float32)

    def window_features(self, waveform: np.ndarray) -> np.ndarray:
        """Embeddings before normalisation of a decoded clip's windows (N,) -> (W, D).

        One window per graph run: a run's buffers then hold one window's activations whatever the clip's
        length (a 60 s clip batched would need 23 windows' worth at once), for the same arithmetic.
        """
        windows = cut_windows(waveform, self.sample_rate, self.manifest.window)  # (W, L)
        return np.concatenate([self.features(window[None]) for window in windows])  # (W, D)

    def embed_clip(self, waveform: np.ndarray) -> np.ndarray:
        """Embed one decoded clip (N,) -> (D,) unit vector: the re-normalised mean of its windows' unit vectors."""
        return aggregate_windows(self.window_features(waveform))


def limit_blas_threads(threads: int) -> None:
    """Cap numpy's BLAS (the log-mel's mel projection) at ``threads`` per call, for the whole process.

    OpenBLAS starts a thread per core by default; with one inference slot per core already busy, its threads
    only contend: measured on the loaded 2-core machine, the front-end of a 5 s clip took 36 ms with
    OpenBLAS's default against 12 ms with one thread (docs/benchmarks.md).
    """
    threadpool_limits(limits=threads, user_api="blas")


def read_servable_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """A bundle's manifest, refused with the command that fixes it when the bundle has no ONNX graph."""
    manifest = parse_manifest(directory, SERVING_CONFIGS)
    if manifest.graph is None:
        raise BundleError(f"bundle {directory} has no ONNX graph, which serving needs (it runs without torch); "
                          f"add one with `{ADD_GRAPH_COMMAND} {directory}` (needs the train extra: "
                          "pip install 'sceneprint[train]')")
    return manifest


def load_onnx_encoder(directory: str | os.PathLike[str], *, session: SessionConfig | None = None) -> OnnxEncoder:
    """Load a bundle's ONNX graph: verify its hash, open an ONNX Runtime session, probe it once.

    Args:
        directory: The bundle directory.
        session: Session options (default: ``SessionConfig()``).

    Returns:
        The encoder.

    Raises:
        BundleError: If the bundle has no graph (the message names the command that adds one), or the
            graph does not match what the manifest promises.
    """
    manifest = read_servable_manifest(directory)
    assert manifest.graph is not None
    path = Path(directory) / manifest.graph.file
    if not path.is_file():
        raise BundleError(f"{path} does not exist; the manifest names it as the bundle's graph")
    actual = sha256_file(path)
    if actual != manifest.graph.sha256:
        raise BundleError(f"{path}: sha256 {actual} does not match the manifest's {manifest.graph.sha256}; "
                          "the graph was modified or belongs to another bundle")
    try:
        inference = ort.InferenceSession(str(path), (session or SessionConfig()).session_options(),
                                         providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for a malformed graph
        raise BundleError(f"{path}: ONNX Runtime cannot load it: {exc}") from exc
    encoder = OnnxEncoder(manifest, inference)
    _probe(encoder)
    return encoder


def probe_waveform(sample_rate: int) -> np.ndarray:
    """One second of a fixed test signal (a 440 Hz tone in noise), the same for every load."""
    t = np.arange(sample_rate) / sample_rate
    noise = np.random.default_rng(0).standard_normal(sample_rate)
    return (0.1 * np.sin(2 * math.pi * 440.0 * t) + 0.01 * noise).astype(np.float32)


def _probe(encoder: OnnxEncoder) -> None:
    """Refuse a graph whose output for the probe is non-finite or of the wrong size."""
    try:
        out: Any = encoder.features(probe_waveform(encoder.sample_rate)[None])
    except Exception as exc:  # onnxruntime's own exception types: a graph that cannot run this input
        raise BundleError(f"the bundle's graph cannot embed a 1 s probe: {exc}") from exc
    if out.shape != (1, encoder.embedding_dim):
        raise BundleError(f"graph output shape {tuple(out.shape)} != (1, {encoder.embedding_dim})")
    if not np.isfinite(out).all():
        raise BundleError("the graph produces non-finite embeddings")


def release_free_memory() -> bool:
    """Return the C heap's free pages to the operating system (glibc ``malloc_trim``); False where unavailable.

    Start-up (imports, migrations, the model's first run, the index rebuild) frees much of what it
    allocated, but glibc keeps freed heap pages mapped; trimming once when start-up ends lowers the idle
    server's resident memory (docs/benchmarks.md).
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if name is None:
        return False
    try:
        return bool(ctypes.CDLL(name).malloc_trim(0))
    except (OSError, AttributeError):
        return False
