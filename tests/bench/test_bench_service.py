"""The service benchmark's own arithmetic (its figures are benchmarks, never timed assertions)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

# bench/ is a directory of scripts run from the repository root (`python -m bench.bench_service`), not an
# installed package: load the module from its file.
_spec = importlib.util.spec_from_file_location(
    "bench_service", Path(__file__).resolve().parents[2] / "bench" / "bench_service.py")
assert _spec is not None and _spec.loader is not None
bench_service = importlib.util.module_from_spec(_spec)
sys.modules["bench_service"] = bench_service  # dataclasses resolve their module by name
_spec.loader.exec_module(bench_service)
Paired, server_timing_ms = bench_service.Paired, bench_service.server_timing_ms


def test_server_timing_sums_every_duration_and_ignores_other_parameters() -> None:
    header = 'queue;dur=0.12, decode;desc="decode";dur=1.5, embed;dur=14.3, search;dur=0.2, cache'
    assert server_timing_ms(header) == pytest.approx(16.12)
    assert server_timing_ms("") == 0.0


def test_paired_breakdown_splits_the_request_into_inference_and_http() -> None:
    p = Paired(pairs=10, decode_ms=2.0, embed_ms=15.0, request_ms=20.0, server_infer_ms=16.5)
    assert p.rest_ms == pytest.approx(3.0) and p.http_ms == pytest.approx(3.5)
    assert p.throughput_ratio == pytest.approx(17.0 / 20.0)
