"""The encoder on ONNX Runtime against torch eager, in one run: time per 5 s clip, the compute floor,
session options, int8 against float32 (size, speed), and the serving process's import memory.

    python -m bench.bench_onnx [--bundle DIR] [--int8-bundle DIR] [--json OUT]

A bundle without a graph gets one in a temporary copy. Nothing here asserts on timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sceneprint.bundle import default_bundle_path, load_bundle, read_manifest
from sceneprint.complexity import CLIP_SECONDS, frontend_macs_per_second, measure_matmul_gflops, timing
from sceneprint.encoder import Encoder
from sceneprint.export import add_onnx
from sceneprint.logmel import logmel
from sceneprint.runtime import SessionConfig, limit_blas_threads, load_onnx_encoder

# Peak RSS of a fresh interpreter after importing what the service imports (no torch).
# VmHWM, not ru_maxrss: the latter survives exec, so a child of this (large) process would report ours.
IMPORT_PROBE = """
import re, sys
import sceneprint.service.app, sceneprint.runtime
hwm = re.search(r"VmHWM:\\s+(\\d+)", open("/proc/self/status").read())
print(int(hwm.group(1)) // 1024, "torch" in sys.modules)
"""


def ms(t: Any) -> str:
    return f"{t.median_ms:6.2f} ms (p90 {t.p90_ms:6.2f})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bundle", type=Path, default=None, help="Bundle (default: the bundled model).")
    p.add_argument("--int8-bundle", type=Path, default=None, help="A copy of it served as int8 (add-onnx --int8).")
    p.add_argument("--repeats", type=int, default=50)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    limit_blas_threads(1)  # as the service does: one thread per inference slot, numpy's share included
    results: dict[str, Any] = {"command": " ".join(sys.argv), "loadavg_at_start": list(os.getloadavg())}
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle or default_bundle_path()
        if read_manifest(bundle).graph is None:
            bundle = Path(shutil.copytree(bundle, Path(tmp) / "bundle"))
            add_onnx(bundle)
        encoder, manifest = load_bundle(bundle)
        assert isinstance(encoder, Encoder), "this benchmark splits the CP-Mobile front-end from the network"
        wav = (0.1 * np.random.default_rng(0).standard_normal(round(CLIP_SECONDS * encoder.sample_rate))
               ).astype(np.float32)
        windows = wav[None]
        feats = logmel(windows, encoder.frontend_config)
        fig: dict[str, Any] = {}
        print(f"bundle {manifest.model_version}; 5 s clip, 1 thread, {args.repeats} repeats; "
              f"load average {os.getloadavg()[0]:.2f}")
        with torch.inference_mode():
            tf = torch.from_numpy(feats)
            fig["torch_embed_clip"] = timing(lambda: encoder.embed_clip(wav), args.repeats)
            fig["torch_network"] = timing(lambda: encoder.network.forward_features(tf), args.repeats)
        fig["frontend_numpy"] = timing(lambda: logmel(windows, encoder.frontend_config), args.repeats)
        variants = {"arena+pattern": SessionConfig(memory_arena=True, memory_pattern=True),
                    "arena (served)": SessionConfig(),
                    "no arena": SessionConfig(memory_arena=False, memory_pattern=False)}
        for name, config in variants.items():
            onnx = load_onnx_encoder(bundle, session=config)
            inp = onnx.session.get_inputs()[0].name
            fig[f"onnx_embed_clip[{name}]"] = timing(partial(onnx.embed_clip, wav), args.repeats)
            fig[f"onnx_network[{name}]"] = timing(partial(onnx.session.run, None, {inp: feats}), args.repeats)
        int8_size = None
        if args.int8_bundle is not None:
            int8 = load_onnx_encoder(args.int8_bundle)
            assert int8.manifest.graph is not None
            int8_size = (args.int8_bundle / int8.manifest.graph.file).stat().st_size
            inp = int8.session.get_inputs()[0].name
            fig["int8_embed_clip"] = timing(lambda: int8.embed_clip(wav), args.repeats)
            fig["int8_network"] = timing(lambda: int8.session.run(None, {inp: feats}), args.repeats)
        for name, t in fig.items():
            print(f"  {name:<34} {ms(t)}")
        gflops = measure_matmul_gflops(1)
        macs = (frontend_macs_per_second(encoder.frontend_config) + encoder.macs_per_second()) * CLIP_SECONDS
        floor_ms = 2.0 * macs / (gflops * 1e9) * 1e3
        served = fig["onnx_embed_clip[arena (served)]"].median_ms
        speedup = fig["torch_embed_clip"].median_ms / served
        print(f"  compute floor: {macs / 1e6:.0f} M MACs at {gflops:.1f} GFLOP/s (1 thread) = {floor_ms:.2f} ms; "
              f"ONNX Runtime embed_clip {served:.2f} ms = x{served / floor_ms:.2f} the floor; "
              f"torch/ONNX Runtime x{speedup:.2f}")
        served_graph = read_manifest(bundle).graph
        assert served_graph is not None
        graph_size = (Path(bundle) / served_graph.file).stat().st_size
        print(f"  graph size: float32 {graph_size / 1e3:.0f} kB" +
              (f", int8 {int8_size / 1e3:.0f} kB" if int8_size else ""))
        out = subprocess.run([sys.executable, "-c", IMPORT_PROBE], capture_output=True, text=True, check=True)
        rss, torch_loaded = out.stdout.split()
        print(f"  peak RSS after importing the service (fresh interpreter): {rss} MB; torch imported: {torch_loaded}")
        results.update({name: asdict(t) for name, t in fig.items()})
        results.update({"matmul_gflops_1_thread": gflops, "macs_per_clip": macs, "floor_ms": floor_ms,
                        "onnx_over_floor": served / floor_ms, "torch_over_onnx": speedup,
                        "graph_bytes": graph_size, "int8_graph_bytes": int8_size, "service_import_rss_mb": int(rss)})
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
