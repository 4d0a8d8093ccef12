"""Export a bundle's encoder as the ONNX graph the service runs (``sceneprint.runtime``).

CP-Mobile's graph is the network alone, from log-mels (the front-end stays outside, in numpy: it is
5x faster there than ONNX Runtime's STFT op, and it is the one front-end training uses too). YAMNet's
and BEATs' graphs take the waveform: their front-ends are torch code with no numpy twin, and inside the
graph they remain one definition. The graph's output is ``ClipEncoder.features``: embeddings before
L2 normalisation, so windows aggregate exactly as ``embed_clip`` does.

Needs torch and onnxscript (the ``train`` extra); the service only reads what this writes.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import nn

from sceneprint.bundle import GRAPH_FILES, MANIFEST, BundleError, GraphInfo, Manifest, load_bundle
from sceneprint.config import to_dict
from sceneprint.encoder import ClipEncoder, Encoder
from sceneprint.logmel import logmel
from sceneprint.manifest import sha256_file, write_json_atomic
from sceneprint.runtime import SessionConfig, probe_waveform
from sceneprint.windows import cut_windows

OPSET = 18
GRAPH_FP32, GRAPH_INT8 = GRAPH_FILES
# ONNX Runtime against torch on the probe, per clip: below this the export is refused.
MIN_COSINE = 0.9999
Quantisation = Literal["static", "dynamic"]


class _GraphModule(nn.Module):
    """What the graph computes: an encoder's features, from log-mels (CP-Mobile) or from the waveform."""

    def __init__(self, encoder: ClipEncoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.from_logmel = isinstance(encoder, Encoder)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.encoder, Encoder):
            return self.encoder.network.forward_features(x)  # (B, 1, n_mels, T) -> (B, D)
        return self.encoder.features(x)  # (B, N) -> (B, D)


def graph_input(encoder: ClipEncoder, waveforms: np.ndarray) -> np.ndarray:
    """What the encoder's graph takes for waveforms (B, N): their log-mels (CP-Mobile) or the waveforms."""
    if isinstance(encoder, Encoder):
        return logmel(waveforms, encoder.frontend_config)
    return np.ascontiguousarray(waveforms, dtype=np.float32)


def export_graph(encoder: ClipEncoder, path: Path) -> GraphInfo:
    """Write ``encoder`` as a float32 ONNX graph with dynamic batch and length axes.

    Returns:
        The graph's manifest entry (its file name is ``path``'s).
    """
    module = _GraphModule(encoder).eval()
    window = probe_waveform(encoder.sample_rate)[None]  # (1, N)
    example = torch.from_numpy(graph_input(encoder, np.repeat(window, 2, axis=0)))
    if module.from_logmel:
        dims = {0: torch.export.Dim("batch"), 3: torch.export.Dim("frames", min=8)}
        name = "logmel"
    else:
        dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("samples", min=1600)}
        name = "waveform"
    # The exporter reports its progress on stdout and warns about torch internals; neither is ours to act on.
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            program = torch.onnx.export(module, (example,), dynamo=True, opset_version=OPSET, input_names=[name],
                                        output_names=["features"], dynamic_shapes=(dims,), verbose=False)
    except Exception as exc:  # the exporter's own error types
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"the {encoder.architecture} encoder cannot be exported to ONNX: {first_line}") from exc
    assert program is not None
    program.save(str(path))
    return GraphInfo(file=path.name, sha256=sha256_file(path), input="logmel" if module.from_logmel else "waveform",
                     precision="float32", opset=OPSET)


def quantize_graph(source: Path, target: Path, *, mode: Quantisation,
                   calibration: Iterable[np.ndarray] = ()) -> None:
    """Write an int8 version of the float32 graph ``source`` to ``target``.

    Args:
        source: The float32 graph.
        target: Where the int8 graph goes.
        mode: ``static`` (QDQ, int8 weights per channel and uint8 activations whose ranges come from
            ``calibration``) or ``dynamic`` (int8 weights, activation ranges measured per call).
        calibration: Graph inputs (as ``graph_input`` makes them) for static quantisation: clips of the
            training classes.
    """
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    if mode == "dynamic":
        quantize_dynamic(str(source), str(target), weight_type=QuantType.QInt8)
        return
    inputs = list(calibration)
    if not inputs:
        raise BundleError("static quantisation needs calibration clips")
    name = "logmel" if inputs[0].ndim == 4 else "waveform"

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self._items: Iterator[np.ndarray] = iter(inputs)

        def get_next(self) -> dict[str, np.ndarray] | None:
            item = next(self._items, None)
            return None if item is None else {name: item}

    quantize_static(str(source), str(target), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def add_onnx(directory: str | os.PathLike[str], *, int8: Quantisation | None = None,
             calibration: Iterable[np.ndarray] = ()) -> Manifest:
    """Give a bundle its ONNX graph (replacing any), check it against torch, and name it in the manifest.

    Args:
        directory: The bundle directory; its weights are verified and loaded first.
        int8: Also write an int8 graph and make it the one the bundle serves.
        calibration: Decoded waveforms at the bundle's rate (clips of the training classes), for ``static``.

    Returns:
        The updated manifest.

    Raises:
        BundleError: If the bundle does not load, or ONNX Runtime's embedding of the probe differs from torch's.
    """
    bundle = Path(directory)
    encoder, manifest = load_bundle(bundle)
    with tempfile.TemporaryDirectory(dir=bundle, prefix=".export-") as tmp:
        staged = Path(tmp) / GRAPH_FP32
        graph = export_graph(encoder, staged)
        _check_against_torch(encoder, staged, graph)
        os.replace(staged, bundle / GRAPH_FP32)
        if int8 is not None:
            windows = [graph_input(encoder, cut_windows(w, encoder.sample_rate, encoder.window)) for w in calibration]
            staged = Path(tmp) / GRAPH_INT8
            quantize_graph(bundle / GRAPH_FP32, staged, mode=int8, calibration=windows)
            os.replace(staged, bundle / GRAPH_INT8)
            graph = replace(graph, file=GRAPH_INT8, sha256=sha256_file(bundle / GRAPH_INT8), precision="int8")
        else:
            (bundle / GRAPH_INT8).unlink(missing_ok=True)
    # The manifest is rewritten as it was read plus the graph, so nothing else in it changes.
    data = _stored_manifest(bundle)
    write_json_atomic(bundle / MANIFEST, {**data, "graph": to_dict(graph)})
    return replace(manifest, graph=graph)


def add_onnx_after_training(directory: str | os.PathLike[str]) -> str:
    """``add_onnx`` for a bundle training has just written: a failure never costs the run its bundle.

    Returns:
        What happened, for the training log (on failure, the command that adds the graph later).
    """
    try:
        manifest = add_onnx(directory)
    except Exception as exc:  # the weights are saved; any export failure leaves a bundle that training loads
        return (f"no ONNX graph written ({type(exc).__name__}: {exc}); add it with "
                f"`sceneprint bundle add-onnx {directory}`")
    assert manifest.graph is not None
    return f"ONNX graph written: {Path(directory) / manifest.graph.file}"


def _stored_manifest(bundle: Path) -> dict[str, object]:
    """The manifest's JSON as stored (``read_manifest_json`` would give a format-1 one format 2's fields)."""
    data: dict[str, object] = json.loads((bundle / MANIFEST).read_text(encoding="utf-8"))
    return data


def _check_against_torch(encoder: ClipEncoder, path: Path, graph: GraphInfo) -> None:
    """Refuse a graph whose embedding of the probe (1 s and 5 s) is not torch's, to ``MIN_COSINE``."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), SessionConfig().session_options(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    probe = probe_waveform(encoder.sample_rate)
    for waveform in (probe, np.tile(probe, 5)):
        x = waveform[None]
        with torch.inference_mode():
            expected = encoder.features(torch.from_numpy(x)).numpy()[0]
        actual = session.run(None, {name: graph_input(encoder, x)})[0][0]
        cosine = float(expected @ actual / (np.linalg.norm(expected) * np.linalg.norm(actual)))
        if not cosine >= MIN_COSINE:
            raise BundleError(f"the exported graph's embedding of a {len(x[0]) / encoder.sample_rate:g} s probe has "
                              f"cosine {cosine:.6f} to torch's (at least {MIN_COSINE} is required)")


__all__ = ["GRAPH_FP32", "GRAPH_INT8", "add_onnx", "add_onnx_after_training", "export_graph", "graph_input",
           "quantize_graph"]
