"""Reload benchmark: how long a model reload takes against embedding the same clips raw, and what classify
requests see while it runs.

For each size (stored clips; scenes of five), in a fresh data dir and registry:

1. The database and clip store are seeded directly (the service's own migrations, tables and clip store):
   synthetic clips (``bench.bench_service.synth_waveform``, WAV at the encoder's rate), with embeddings and
   prototypes under the *from* model's key as if it had enrolled them (random unit vectors: classify results
   do not matter here) and that model recorded as the one last switched to.
2. Raw: every stored clip read, decoded and embedded by the *to* model in this process, on as many threads as
   the service has inference slots, with nothing else: the least work a reload has to do. Measured before
   and after the idle reload (the machine's load drifts); the ratio uses their mean.
3. ``sceneprint serve --registry`` on the seeded data (a subprocess), serving the *from* model.
4. Reload, idle: the *to* bundle published to the registry; the server sees the pointer move and reloads;
   its own reload time (``GET /admin/reload``: bundle checks, re-embedding, catch-up, index, switch) is the
   figure against the raw time.
5. Reload under load (sizes in ``--latency-at``, once per client count of ``--clients``): back to the *from*
   model (a rollback: immediate), the *to* model's embeddings deleted; classify latency with that many
   clients ("normal"); then the *to* bundle published again with the same clients running through the
   whole reload: their latency against normal, the reload's time, and every failed request counted.

Targets (printed as PASS/MISS, never asserted): raw/reload time >= 0.9; classify p50 and p99 during a reload
within 1.5x of normal. Run from the repository root, e.g.::

    .venv/bin/python -m bench.bench_reload --from runs/retrain-student-smoke/bundle \\
        --to models/sceneprint-default --json reload.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from sqlalchemy import delete, insert
from sqlalchemy.orm import Session

from bench.bench_service import (
    LAT_HEADER,
    Clip,
    Latency,
    Server,
    _raise_on_sigterm,
    classify,
    default_bundle,
    http_client,
    lat_row,
    latency,
    say,
    synth_waveform,
    table,
    wav_bytes,
)
from sceneprint.audio import decode_clip
from sceneprint.registry import Registry, Verified, verify_bundle
from sceneprint.runtime import SessionConfig, limit_blas_threads
from sceneprint.service.clipstore import ClipStore, content_hash
from sceneprint.service.db import make_engine
from sceneprint.service.migrate import upgrade
from sceneprint.service.scenes import STORED_CLIP_LIMITS
from sceneprint.service.settings import Settings
from sceneprint.service.tables import Clip as ClipRow
from sceneprint.service.tables import ClipEmbedding, Prototype, Scene, ServedModel

CLIPS_PER_SCENE = 5
TARGET_RAW_OVER_RELOAD = 0.9
TARGET_LATENCY_RATIO = 1.5
CHUNK = 2000  # rows per bulk insert


class RegistryServer(Server):
    """``sceneprint serve --registry`` (``bench_service.Server`` serves one bundle by path)."""

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sceneprint.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--registry", str(self.bundle), "--log-level", "warning"]


@dataclass(frozen=True)
class UnderLoad:
    """Classify latency with ``clients`` clients, normal and during a reload, and that reload's time."""

    clients: int
    normal: Latency
    during: Latency
    reload_s: float
    failed_requests: int
    versions_seen: tuple[str, ...]


@dataclass(frozen=True)
class SizeResult:
    clips: int
    clip_seconds: float
    raw_before_s: float
    raw_after_s: float
    reload_s: float
    raw_over_reload: float  # the mean of the two raw times over the reload's
    under_load: tuple[UnderLoad, ...] = ()


def seed(data_dir: Path, source: Verified, n_clips: int, seconds: float, seed_: int = 0) -> list[str]:
    """A data dir holding ``n_clips`` synthetic clips in scenes of five, enrolled as if by ``source``; their hashes."""
    data_dir.mkdir(parents=True)
    url = Settings(data_dir=data_dir, model_path=data_dir).resolved_database_url
    upgrade(url)
    store = ClipStore(data_dir / "clips")
    rate, dim, key = source.manifest.sample_rate, source.manifest.embedding_dim, source.key
    rng = np.random.default_rng(seed_)
    now = datetime.now(UTC)
    scenes: list[dict[str, Any]] = []
    clips: list[dict[str, Any]] = []
    embeddings: list[dict[str, Any]] = []
    prototypes: list[dict[str, Any]] = []
    hashes: list[str] = []
    for s in range(math.ceil(n_clips / CLIPS_PER_SCENE)):
        scenes.append({"id": s + 1, "name": f"bench-{s:05d}", "created_at": now})
        vector = rng.standard_normal(dim).astype(np.float32)
        prototypes.append({"scene_id": s + 1, "model_version": key, "vector": (vector / np.linalg.norm(vector))
                           .tobytes(), "n_clips": CLIPS_PER_SCENE, "updated_at": now})
        for take in range(CLIPS_PER_SCENE):
            data = wav_bytes(synth_waveform(s, take, seconds, rate), rate)
            sha = content_hash(data)
            store.put(data, sha)
            clip_id = len(clips) + 1
            clips.append({"id": clip_id, "scene_id": s + 1, "sha256": sha, "filename": f"{take}.wav",
                          "byte_size": len(data), "duration_s": seconds, "created_at": now})
            vector = rng.standard_normal(dim).astype(np.float32)
            embeddings.append({"clip_id": clip_id, "model_version": key,
                               "vector": (vector / np.linalg.norm(vector)).tobytes()})
            hashes.append(sha)
    engine = make_engine(url)
    try:
        with Session(engine) as session:
            for table_, rows in ((Scene, scenes), (ClipRow, clips), (ClipEmbedding, embeddings),
                                 (Prototype, prototypes)):
                for i in range(0, len(rows), CHUNK):
                    session.execute(insert(table_), rows[i : i + CHUNK])
            session.add(ServedModel(key=key, model_version=source.manifest.model_version, registry_version="v1",
                                    created_at=now, activated_at=now))
            session.commit()
    finally:
        engine.dispose()
    return hashes


def raw_embed_seconds(target: Verified, store: ClipStore, hashes: Sequence[str], threads: int) -> float:
    """Read, decode and embed every clip with ``target`` on ``threads`` threads, nothing else; seconds."""
    encoder, rate = target.encoder, target.manifest.sample_rate

    def embed(sha: str) -> None:
        encoder.embed_clip(decode_clip(store.read(sha), sample_rate=rate, limits=STORED_CLIP_LIMITS).waveform)

    with ThreadPoolExecutor(max_workers=threads) as pool:
        list(pool.map(embed, hashes[: min(20, len(hashes))]))  # warm-up
        started = time.perf_counter()
        list(pool.map(embed, hashes))
        return time.perf_counter() - started


class Clients:
    """``n`` classify clients in threads, each sending queries round-robin until stopped."""

    def __init__(self, base_url: str, queries: Sequence[Clip], n: int) -> None:
        self.base_url, self.queries, self.n = base_url, queries, n
        self.seconds: list[float] = []
        self.failed = 0
        self.versions: set[str] = set()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(n)]

    def _run(self, i: int) -> None:
        with http_client(self.base_url) as client:
            k = i
            while not self._stop.is_set():
                started = time.perf_counter()
                try:
                    r = classify(client, self.queries[k % len(self.queries)])
                    ok = r.status_code == 200
                    if ok:
                        self.versions.add(r.json()["model_version"])
                except Exception:
                    ok = False
                self.seconds.append(time.perf_counter() - started)
                self.failed += not ok
                k += self.n

    def __enter__(self) -> Clients:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()


def wait_reload(base_url: str, version: str, timeout_s: float) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    with http_client(base_url) as client:
        while time.monotonic() < deadline:
            status: dict[str, Any] = client.get("/admin/reload").json()
            if status.get("target_version") == version and status["state"] in ("done", "failed"):
                if status["state"] == "failed":
                    raise RuntimeError(f"reload failed: {status['error']}")
                return status
            time.sleep(0.05)
    raise RuntimeError(f"reload to {version} not done after {timeout_s:g} s")


def bench_size(args: argparse.Namespace, n: int, seconds: float, source: Verified, target: Verified,
               tmp: Path) -> SizeResult:
    root = tmp / f"n{n}"
    registry = Registry(root / "registry")
    registry.publish(Path(args.source), version="v1")
    say(f"\n{n} stored clips ({n // CLIPS_PER_SCENE} scenes), {seconds:g} s each: seeding ...")
    hashes = seed(root / "data", source, n, seconds)
    store = ClipStore(root / "data" / "clips")
    raw_before = raw_embed_seconds(target, store, hashes, args.slots)
    say(f"  raw: {raw_before:.2f} s ({n / raw_before:.1f} clips/s on {args.slots} threads)")
    rate = source.manifest.sample_rate
    queries = [Clip(f"q{q}.wav", wav_bytes(synth_waveform(q, 100 + q, 5.0, rate), rate), "audio/wav", "")
               for q in range(8)]
    server = RegistryServer(f"n{n}", registry.root, root / "data", 1, root)
    server.start(args.startup_timeout)
    loads: list[UnderLoad] = []
    try:
        registry.publish(Path(args.target), version="v2")
        reload_s = float(wait_reload(server.base_url, "v2", args.reload_timeout)["seconds"])
        raw_after = raw_embed_seconds(target, store, hashes, args.slots)
        raw = (raw_before + raw_after) / 2
        say(f"  reload, idle: {reload_s:.2f} s; raw again: {raw_after:.2f} s (mean raw/reload {raw / reload_s:.3f})")
        for clients in args.clients if n in args.latency_at else []:
            registry.rollback(to="v1")  # immediate: the from model's vectors are kept
            wait_reload(server.base_url, "v1", args.reload_timeout)
            engine = make_engine(Settings(data_dir=root / "data", model_path=root).resolved_database_url)
            with Session(engine) as session:  # the target's vectors gone: the next reload re-embeds everything
                session.execute(delete(ClipEmbedding).where(ClipEmbedding.model_version == target.key))
                session.execute(delete(Prototype).where(Prototype.model_version == target.key))
                session.commit()
            engine.dispose()
            with Clients(server.base_url, queries, clients) as before:
                time.sleep(args.normal_seconds)
            version = f"v{len(registry.versions()) + 1}"
            with Clients(server.base_url, queries, clients) as during:
                time.sleep(0.5)
                registry.publish(Path(args.target), version=version)
                status = wait_reload(server.base_url, version, args.reload_timeout)
                time.sleep(0.5)
            loads.append(UnderLoad(clients=clients, normal=latency(before.seconds), during=latency(during.seconds),
                                   reload_s=float(status["seconds"]), failed_requests=before.failed + during.failed,
                                   versions_seen=tuple(sorted(during.versions))))
            say(f"  reload under {clients} classify client(s): {status['seconds']:.2f} s; "
                f"{before.failed + during.failed} failed requests; answered by {', '.join(sorted(during.versions))}")
    finally:
        server.stop()
    return SizeResult(clips=n, clip_seconds=seconds, raw_before_s=round(raw_before, 3),
                      raw_after_s=round(raw_after, 3), reload_s=round(reload_s, 3),
                      raw_over_reload=round(raw / reload_s, 3), under_load=tuple(loads))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from", dest="source", type=Path, default=None, help="The bundle served before the reload "
                   "(default: the bundled model).")
    p.add_argument("--to", dest="target", type=Path, required=True, help="The bundle reloaded to.")
    p.add_argument("--sizes", default="100,1000,10000", help="Stored clips, comma-separated.")
    p.add_argument("--clip-seconds", default="5,5,1",
                   help="Length of the synthetic clips at each size (the largest may use short ones to keep the run "
                        "short).")
    p.add_argument("--latency-at", default="1000", help="Sizes at which classify latency is measured during a "
                   "second reload (comma-separated; empty: none).")
    p.add_argument("--clients", default="1,2", help="Concurrent classify clients, comma-separated: one reload "
                   "under load (and one normal measurement) for each.")
    p.add_argument("--normal-seconds", type=float, default=10.0, help="How long normal latency is measured.")
    p.add_argument("--slots", type=int, default=os.cpu_count() or 1, help="Raw-embedding threads (the service's "
                   "inference slots, which default to the CPU count).")
    p.add_argument("--startup-timeout", type=float, default=300.0)
    p.add_argument("--reload-timeout", type=float, default=3600.0)
    p.add_argument("--json", type=Path, default=None, help="Write every figure as JSON here.")
    args = p.parse_args(argv)
    args.source = (args.source or default_bundle()).resolve()
    args.target = args.target.resolve()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    args.clip_seconds = [float(s) for s in args.clip_seconds.split(",")]
    if len(args.clip_seconds) != len(args.sizes):
        p.error("--clip-seconds needs one length per size")
    args.latency_at = {int(s) for s in args.latency_at.split(",") if s}
    args.clients = [int(c) for c in args.clients.split(",")]
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that the finally blocks stop the servers
    limit_blas_threads(1)  # as the service does: numpy's share of an embed runs in its slot
    os.environ["SCENEPRINT_REGISTRY_POLL_S"] = "0.1"
    os.environ["SCENEPRINT_INFERENCE_SLOTS"] = str(args.slots)
    session = SessionConfig(intra_op_threads=1)
    source, target = verify_bundle(args.source, session=session), verify_bundle(args.target, session=session)
    if source.key == target.key:
        raise SystemExit("--from and --to are the same model: a reload between them re-embeds nothing")
    say("sceneprint reload benchmark")
    say(f"from: {args.source} ({source.key})\nto:   {args.target} ({target.key})")
    say(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; "
        f"{args.slots} inference slots; classify clients {args.clients}")
    results = []
    with tempfile.TemporaryDirectory(prefix="sceneprint-reload-") as tmp:
        for n, seconds in zip(args.sizes, args.clip_seconds, strict=True):
            results.append(bench_size(args, n, seconds, source, target, Path(tmp)))
    say()
    say(table([[f"{r.clips:,}", f"{r.clip_seconds:g}", f"{r.raw_before_s:.2f} / {r.raw_after_s:.2f}",
                f"{r.reload_s:.2f}", f"{r.raw_over_reload:.3f}",
                "PASS" if r.raw_over_reload >= TARGET_RAW_OVER_RELOAD else "MISS"] for r in results],
              ["clips", "clip s", "raw s (before / after)", "reload s", "raw/reload", f">= {TARGET_RAW_OVER_RELOAD}"]))
    for r in results:
        for load in r.under_load:
            say()
            p50, p99 = load.during.p50_ms / load.normal.p50_ms, load.during.p99_ms / load.normal.p99_ms
            verdict = "PASS" if max(p50, p99) <= TARGET_LATENCY_RATIO else "MISS"
            say(f"classify latency, {r.clips:,} clips, {load.clients} client(s): during/normal p50 {p50:.2f}x, p99 "
                f"{p99:.2f}x (target <= {TARGET_LATENCY_RATIO}x: {verdict}); reload {load.reload_s:.1f} s "
                f"(idle {r.reload_s:.1f} s); failed requests {load.failed_requests}")
            say(table([lat_row("normal", load.normal), lat_row("during reload", load.during)], LAT_HEADER))
    if args.json is not None:
        args.json.write_text(json.dumps({
            "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
            "from": str(args.source), "to": str(args.target), "from_key": source.key, "to_key": target.key,
            "cpus": os.cpu_count(), "slots": args.slots,
            "results": [asdict(r) for r in results]}, indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
