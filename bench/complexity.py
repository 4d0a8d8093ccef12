"""Complexity card: parameters, MACs per second of audio (front-end and network apart), CPU latency of a
5 s clip at batch 1, and how far that latency sits above this machine's fp32 matmul rate, all in one run.

For every CP-Mobile size preset and the YAMNet teacher (random weights: latency does not depend on them),
and for any ``--bundle``. Nothing here asserts on timings; ``--json`` writes every figure.

    .venv/bin/python -m bench.complexity --repeats 30 --threads 1 2 --json OUT.json --markdown OUT.md
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from sceneprint.bundle import load_bundle
from sceneprint.complexity import MATMUL_REPEATS, MATMUL_SIZE, complexity_card, measure_matmul_gflops
from sceneprint.cpmobile import PRESETS, preset
from sceneprint.encoder import ClipEncoder, Encoder, WindowConfig
from sceneprint.frontend import LogMelConfig
from sceneprint.yamnet import YAMNetConfig, YAMNetEncoder, YAMNetFrontendConfig

# --- the run --------------------------------------------------------------------------------------


def reference_encoders() -> dict[str, ClipEncoder]:
    """Every CP-Mobile preset and the YAMNet teacher, freshly initialised."""
    torch.manual_seed(0)
    encoders: dict[str, ClipEncoder] = {name: Encoder(LogMelConfig(), preset(name), WindowConfig()) for name in PRESETS}
    encoders["yamnet"] = YAMNetEncoder(YAMNetFrontendConfig(), YAMNetConfig(), WindowConfig())
    return encoders


def cpu_entry(card: Mapping[str, Any], threads: int) -> dict[str, Any]:
    entry: dict[str, Any] = next(e for e in card["cpu"] if e["threads"] == threads)
    return entry


def text_table(cards: Mapping[str, Mapping[str, Any]], threads: Sequence[int]) -> str:
    header = ["model", "params", "FE MMAC/s", "net MMAC/s"]
    for t in threads:
        header += [f"clip p50/p90 ms ({t}t)", f"FE ms ({t}t)", f"net ms ({t}t)", f"floor ms ({t}t)",
                   f"lat/floor ({t}t)"]
    rows = []
    for name, card in cards.items():
        row = [name, f"{card['parameters']:,}", f"{card['frontend_macs_per_second'] / 1e6:.1f}",
               f"{card['network_macs_per_second'] / 1e6:.1f}"]
        for t in threads:
            e = cpu_entry(card, t)
            row += [f"{e['embed_clip']['median_ms']:.1f}/{e['embed_clip']['p90_ms']:.1f}",
                    f"{e['frontend']['median_ms']:.1f}", f"{e['network']['median_ms']:.1f}",
                    f"{e['floor_ms']:.2f}", f"{e['latency_over_floor']:.0f}x"]
        rows.append(row)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(r, widths, strict=True)) for r in [header, *rows])


def markdown_table(cards: Mapping[str, Mapping[str, Any]], results: Mapping[str, Any]) -> str:
    """The card as markdown: latency and floor at 1 thread (or the first thread count timed)."""
    t = 1 if 1 in results["threads"] else results["threads"][0]
    gflops = results["matmul_gflops"][str(t)]
    lines = [
        "# Complexity card",
        "",
        f"Measured {results['date']} on {results['machine']['cpus']} CPUs, torch {results['machine']['torch']}, "
        f"{results['repeats']} repetitions after warm-up; fp32 matmul rate {gflops:.1f} GFLOP/s at {t} thread(s).",
        f"Command: `{results['command']}`",
        "",
        "Front-end MACs are analytic (FFT 2·n_fft·log2(n_fft) + window + |X|² + dense mel matrix, per frame); "
        "network MACs are `macs_per_second()`. Latency: median of `embed_clip` on one 5 s clip, batch 1. "
        "Floor: 2 × MACs of 5 s / matmul rate.",
        "",
        f"| model | params | front-end MMAC/s | network MMAC/s | latency 5 s clip ms ({t} thread) | floor ms "
        "| latency/floor |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, card in cards.items():
        e = cpu_entry(card, t)
        lines.append(f"| {name} | {card['parameters']:,} | {card['frontend_macs_per_second'] / 1e6:.1f} | "
                     f"{card['network_macs_per_second'] / 1e6:.1f} | {e['embed_clip']['median_ms']:.1f} | "
                     f"{e['floor_ms']:.2f} | {e['latency_over_floor']:.0f} |")
    return "\n".join(lines) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.complexity",
                                description="Complexity card of every CP-Mobile preset and YAMNet.")
    p.add_argument("--repeats", type=int, default=30, help="Timed calls per figure (default 30).")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="Torch thread counts (default 1 2).")
    p.add_argument("--bundle", type=Path, action="append", default=[], metavar="DIR",
                   help="Also card this encoder bundle (repeatable).")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="Write every figure as JSON to OUT.")
    p.add_argument("--markdown", type=Path, default=None, metavar="OUT", help="Write the markdown table to OUT.")
    args = p.parse_args(argv)
    if args.repeats < 1 or min(args.threads) < 1:
        p.error("--repeats and --threads must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    command_line = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    threads: list[int] = args.threads
    encoders = reference_encoders()
    for bundle in args.bundle:
        encoder, manifest = load_bundle(bundle)
        encoders[manifest.model_version] = encoder
    results: dict[str, Any] = {
        "command": command_line,
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "torch": torch.__version__, "loadavg_at_start": list(os.getloadavg())},
        "threads": threads,
        "repeats": args.repeats,
    }
    print(f"command: {command_line}")
    print(f"machine: {os.cpu_count()} CPUs, torch {torch.__version__}, load average {os.getloadavg()[0]:.2f}")
    # Measured once, before the cards, so that every model's floor divides by the same rate.
    gflops = {t: measure_matmul_gflops(t) for t in threads}
    results["matmul"] = {"size": MATMUL_SIZE, "repeats": MATMUL_REPEATS, "statistic": "median"}
    results["matmul_gflops"] = {str(t): g for t, g in gflops.items()}
    print("fp32 matmul " + ", ".join(f"{g:.1f} GFLOP/s at {t} thread(s)" for t, g in gflops.items()), flush=True)
    cards: dict[str, dict[str, Any]] = {}
    for name, encoder in encoders.items():
        cards[name] = complexity_card(encoder, repeats=args.repeats, threads=threads, matmul_gflops=gflops)
        print(f"  {name} done", flush=True)
    results["cards"] = cards
    results["machine"]["loadavg_at_end"] = list(os.getloadavg())
    print(text_table(cards, threads))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
        print(f"figures written to {args.json}")
    if args.markdown is not None:
        args.markdown.write_text(markdown_table(cards, results), encoding="utf-8")
        print(f"table written to {args.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
