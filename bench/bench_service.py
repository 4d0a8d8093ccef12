"""Service benchmark: raw encoder throughput versus the HTTP service, on the same clips, in one run.

What it measures (all on one machine, in this order):

1. Raw encoder throughput in this process, one stream: ``decode_clip`` + ``OnnxEncoder.embed_clip`` per clip
   (the bundle's ONNX graph in ONNX Runtime: the work the service does per classify request), and embed-only
   throughput (decode excluded).
   Measured before and after the HTTP runs, to expose drift on a busy machine; the ratio uses the mean.
2. Classify throughput and latency over real HTTP against ``sceneprint serve`` in a subprocess, with one
   client sequentially and with ``--clients`` concurrent clients (threads, one ``httpx2.Client`` each).
3. Enroll latency (five clips per request) for the scenes enrolled before the classify runs.
4. Peak RSS (VmHWM) of each server process.
5. Scale: sequential classify latency with 10 enrolled scenes versus ``--scale`` scenes, with synthetic
   prototypes bulk-inserted into the database through the service's own schema and migrations; both
   servers run side by side and the requests are interleaved, so drift hits both alike. Start-up time
   (the index is rebuilt from the database) is reported for both.

Nothing here asserts on timings: targets are printed as PASS/MISS, and ``--json`` writes every figure.

Run from the repository root, e.g.::

    .venv/bin/python -m bench.bench_service --json bench-results.json
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import os
import platform
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

import httpx2
import numpy as np
import onnxruntime
import soundfile as sf
from sqlalchemy import insert
from sqlalchemy.orm import Session

from sceneprint.audio import ClipLimits, decode_clip
from sceneprint.manifest import Manifest, model_key
from sceneprint.runtime import OnnxEncoder, SessionConfig, limit_blas_threads, load_onnx_encoder
from sceneprint.service.db import make_engine
from sceneprint.service.migrate import upgrade
from sceneprint.service.settings import Settings, default_bundle_path
from sceneprint.service.tables import Prototype, Scene

DEV_DATA_ENV = "SCENEPRINT_DEV_DATA"
CLIPS_PER_ENROLLMENT = 5
SCALE_BASELINE_SCENES = 10
PAIRED_REQUESTS = 50  # at most this many clips in the paired time-share pass

# Targets: (value must be) >= / <= these; issue 12's (serving without torch).
TARGET_HTTP_RAW_RATIO = 0.90  # HTTP classify throughput over raw decode+embed throughput, at 1 and 4 clients
TARGET_P99_P50_CONCURRENT = 2.0
TARGET_PEAK_RSS_MB = 250.0  # server peak; the issue sets it for 16 clients sending 20 s clips
TARGET_SCALE_SLOWDOWN = 1.10

SCENE_NAME_BAD = re.compile(r"[^a-z0-9_-]+")


# --- clips ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Clip:
    filename: str
    data: bytes
    mime: str
    scene: str  # the scene it was drawn from (expected classification)


@dataclass(frozen=True)
class ClipSet:
    source: str
    enrollments: list[tuple[str, list[Clip]]]  # (scene name, its five clips)
    queries: list[Clip]  # distinct query clips; request k sends queries[k % len(queries)]


def synth_waveform(scene: int, take: int, seconds: float, rate: int) -> np.ndarray:
    """A deterministic synthetic clip (N,) float32: scene ``scene`` sets the character, ``take`` the variation.

    Four families (hum, bird-like chirps, clicks, coloured noise with tones), each with scene-specific
    parameters, over a faint noise floor so that no clip is silent.
    """
    scene_rng = np.random.default_rng([7, scene])
    g = np.random.default_rng([11, scene, take])
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = 0.003 * g.standard_normal(n)
    kind = scene % 4
    if kind == 0:  # hum: harmonics of a scene-specific mains-like frequency over brown noise
        f0 = scene_rng.uniform(45.0, 130.0) * g.uniform(0.98, 1.02)
        for k in range(1, 7):
            x += 0.15 / k * np.sin(2 * np.pi * k * f0 * t + g.uniform(0, 2 * np.pi))
        brown = np.cumsum(g.standard_normal(n))
        x += 0.05 * brown / (np.abs(brown).max() + 1e-9)
    elif kind == 1:  # birds: short up-chirps in a scene-specific band
        lo = scene_rng.uniform(1500.0, 5000.0)
        seg_len = rate // 8
        seg_t = np.arange(seg_len) / rate
        for _ in range(int(seconds * scene_rng.uniform(2.0, 8.0))):
            start = int(g.integers(0, n - seg_len))
            f = lo * g.uniform(0.9, 1.1)
            x[start : start + seg_len] += (0.3 * np.sin(2 * np.pi * (f * seg_t + 6000 * seg_t**2))
                                           * np.hanning(seg_len))
    elif kind == 2:  # clicks: sparse broadband transients at a scene-specific rate
        for start in g.integers(0, n - 400, size=int(seconds * scene_rng.uniform(4.0, 20.0))):
            x[start : start + 400] += 0.5 * g.standard_normal(400) * np.exp(-np.arange(400) / 40)
    else:  # coloured noise with a scene-specific spectral tilt, plus a steady tone
        spectrum = np.fft.rfft(g.standard_normal(n))
        freqs = np.fft.rfftfreq(n, 1 / rate)
        spectrum /= np.maximum(freqs, 20.0) ** scene_rng.uniform(0.0, 1.5)
        coloured = np.fft.irfft(spectrum, n)
        x += 0.2 * coloured / (np.abs(coloured).max() + 1e-9)
        x += 0.05 * np.sin(2 * np.pi * scene_rng.uniform(300.0, 3000.0) * t)
    peak = float(np.abs(x).max())
    return (0.5 * x / peak).astype(np.float32)


def wav_bytes(samples: np.ndarray, rate: int) -> bytes:
    buf = io.BytesIO()
    sf.write(buf, samples, rate, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def synthetic_clips(n_scenes: int, n_queries: int, seconds: float, rate: int) -> ClipSet:
    """``n_scenes`` scenes of five clips each, and ``n_queries`` further clips drawn round-robin from them."""
    enrollments: list[tuple[str, list[Clip]]] = []
    for s in range(n_scenes):
        name = f"bench-scene-{s:03d}"
        clips = [Clip(f"{name}-{take}.wav", wav_bytes(synth_waveform(s, take, seconds, rate), rate), "audio/wav", name)
                 for take in range(CLIPS_PER_ENROLLMENT)]
        enrollments.append((name, clips))
    queries: list[Clip] = []
    for q in range(n_queries):
        s = q % n_scenes
        take = CLIPS_PER_ENROLLMENT + q // n_scenes
        name = enrollments[s][0]
        queries.append(Clip(f"query-{q:04d}.wav", wav_bytes(synth_waveform(s, take, seconds, rate), rate),
                            "audio/wav", name))
    return ClipSet(source=f"synthetic: {seconds:g} s, {rate} Hz mono, 16-bit WAV", enrollments=enrollments,
                   queries=queries)


def dev_data_clips(root: Path, n_scenes: int, n_queries: int) -> ClipSet:
    """Real clips from a sceneprint-dev folder (meta.csv + audio/), read in place.

    Scenes are labels spread evenly over the sorted label list; each is enrolled from its first five clips
    (meta.csv order), and the queries are the following clips of those labels, round-robin.
    """
    meta = root / "meta.csv"
    if not meta.is_file():
        raise SystemExit(f"--dev-data: {meta} does not exist")
    by_label: dict[str, list[str]] = {}
    with meta.open(newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            by_label.setdefault(row["scene_label"], []).append(row["filename"])
    labels = sorted(label for label, files in by_label.items() if len(files) > CLIPS_PER_ENROLLMENT)
    if len(labels) < n_scenes:
        raise SystemExit(f"--dev-data: only {len(labels)} labels have more than {CLIPS_PER_ENROLLMENT} clips; "
                         f"--scenes {n_scenes} asks for more")
    chosen = [labels[i * len(labels) // n_scenes] for i in range(n_scenes)]

    def load(filename: str, scene: str) -> Clip:
        path = root / filename
        mime = "audio/ogg" if path.suffix.lower() == ".ogg" else "application/octet-stream"
        return Clip(path.name, path.read_bytes(), mime, scene)

    enrollments: list[tuple[str, list[Clip]]] = []
    pools: list[tuple[str, list[str]]] = []
    for label in chosen:
        name = ("bench-" + SCENE_NAME_BAD.sub("-", label.lower()))[:64]
        files = by_label[label]
        enrollments.append((name, [load(fn, name) for fn in files[:CLIPS_PER_ENROLLMENT]]))
        pools.append((name, files[CLIPS_PER_ENROLLMENT:]))
    queries: list[Clip] = []
    depth = 0
    while len(queries) < n_queries and any(depth < len(files) for _, files in pools):
        for name, files in pools:
            if depth < len(files) and len(queries) < n_queries:
                queries.append(load(files[depth], name))
        depth += 1
    return ClipSet(source=f"dev data: {root} ({len(chosen)} labels, files read in place)",
                   enrollments=enrollments, queries=queries)


def request_sequence(queries: Sequence[Clip], n: int) -> list[Clip]:
    """The ``n`` clips sent, in order: the same sequence for the raw encoder and every HTTP run."""
    return [queries[k % len(queries)] for k in range(n)]


# --- statistics -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Latency:
    n: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float

    @property
    def p99_over_p50(self) -> float:
        return self.p99_ms / self.p50_ms if self.p50_ms > 0 else float("nan")


def latency(seconds: Sequence[float]) -> Latency:
    ms = np.asarray(seconds, dtype=np.float64) * 1000.0
    if ms.size == 0:
        nan = float("nan")
        return Latency(0, nan, nan, nan, nan, nan, nan)
    p50, p90, p99 = (float(v) for v in np.percentile(ms, [50, 90, 99]))
    return Latency(n=int(ms.size), mean_ms=float(ms.mean()), p50_ms=p50, p90_ms=p90, p99_ms=p99,
                   min_ms=float(ms.min()), max_ms=float(ms.max()))


# --- raw encoder ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class RawResult:
    clips: int
    decode_embed_wall_s: float
    decode_embed_clips_per_s: float
    embed_only_wall_s: float
    embed_only_clips_per_s: float
    decode: Latency
    embed: Latency
    decode_embed: Latency


def bench_raw(encoder: OnnxEncoder, sequence: Sequence[Clip], limits: ClipLimits, warmup: int) -> RawResult:
    """Decode + embed each clip of ``sequence`` in turn; then embed the pre-decoded waveforms only."""
    rate = encoder.sample_rate
    for clip in sequence[:warmup]:
        encoder.embed_clip(decode_clip(clip.data, sample_rate=rate, limits=limits).waveform)
    t_decode: list[float] = []
    t_embed: list[float] = []
    t_total: list[float] = []
    start = time.perf_counter()
    for clip in sequence:
        a = time.perf_counter()
        decoded = decode_clip(clip.data, sample_rate=rate, limits=limits)
        b = time.perf_counter()
        encoder.embed_clip(decoded.waveform)
        c = time.perf_counter()
        t_decode.append(b - a)
        t_embed.append(c - b)
        t_total.append(c - a)
    decode_embed_wall = time.perf_counter() - start

    waveforms: dict[int, np.ndarray] = {}
    for clip in sequence:
        if id(clip) not in waveforms:
            waveforms[id(clip)] = decode_clip(clip.data, sample_rate=rate, limits=limits).waveform
    ordered = [waveforms[id(clip)] for clip in sequence]
    start = time.perf_counter()
    for waveform in ordered:
        encoder.embed_clip(waveform)
    embed_only_wall = time.perf_counter() - start
    n = len(sequence)
    return RawResult(clips=n, decode_embed_wall_s=decode_embed_wall, decode_embed_clips_per_s=n / decode_embed_wall,
                     embed_only_wall_s=embed_only_wall, embed_only_clips_per_s=n / embed_only_wall,
                     decode=latency(t_decode), embed=latency(t_embed), decode_embed=latency(t_total))


# --- the server subprocess ------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_client(base_url: str, timeout_s: float = 120.0) -> httpx2.Client:
    # trust_env=False: a proxy set in the environment must not sit between the benchmark and 127.0.0.1.
    return httpx2.Client(base_url=base_url, timeout=timeout_s, trust_env=False)


def proc_status_kb(pid: int, field: str) -> int | None:
    """A ``kB`` field (VmHWM, VmRSS) of /proc/<pid>/status, or None where unavailable."""
    try:
        text = Path(f"/proc/{pid}/status").read_text(encoding="ascii")
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return int(match.group(1)) if match else None


class Server:
    """``sceneprint serve`` on 127.0.0.1 in a subprocess; always stopped by ``stop`` (idempotent)."""

    def __init__(self, label: str, bundle: Path, data_dir: Path, inference_threads: int, log_dir: Path) -> None:
        self.label = label
        self.bundle = bundle
        self.data_dir = data_dir
        self.inference_threads = inference_threads
        self.log_path = log_dir / f"server-{label}.log"
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.startup_s: float | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"server {self.label} is not running")
        return self.proc.pid

    def command(self) -> list[str]:
        return [sys.executable, "-m", "sceneprint.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--data-dir", str(self.data_dir), "--model", str(self.bundle), "--log-level", "warning"]

    def start(self, timeout_s: float) -> float:
        """Start the process and wait for GET /readyz == 200; returns seconds from spawn to ready."""
        env = dict(os.environ)
        # The command line names the data dir and bundle; a database URL in the environment would override
        # the data dir's SQLite file, so it is cleared. Other SCENEPRINT_* settings pass through.
        for key in ("SCENEPRINT_DATABASE_URL", "SCENEPRINT_DATA_DIR", "SCENEPRINT_MODEL_PATH"):
            env.pop(key, None)
        env["SCENEPRINT_INFERENCE_THREADS"] = str(self.inference_threads)
        with self.log_path.open("wb") as log:
            spawned = time.perf_counter()
            self.proc = subprocess.Popen(self.command(), env=env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        deadline = spawned + timeout_s
        with http_client(self.base_url, timeout_s=2.0) as client:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"server {self.label} exited with {self.proc.returncode} before it was "
                                       f"ready; log:\n{self.log_tail()}")
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx2.TransportError:
                    pass
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"server {self.label} not ready after {timeout_s:g} s; log:\n{self.log_tail()}")
                time.sleep(0.05)
        self.startup_s = time.perf_counter() - spawned
        return self.startup_s

    def peak_rss_mb(self) -> float | None:
        kb = proc_status_kb(self.pid, "VmHWM")
        return None if kb is None else kb / 1024.0

    def rss_mb(self) -> float | None:
        kb = proc_status_kb(self.pid, "VmRSS")
        return None if kb is None else kb / 1024.0

    def log_tail(self, chars: int = 4000) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=15)


@contextlib.contextmanager
def running(server: Server, timeout_s: float) -> Iterator[Server]:
    try:
        server.start(timeout_s)
        yield server
    finally:
        server.stop()


# --- HTTP load ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadResult:
    clients: int
    requests: int
    errors: int
    wall_s: float
    throughput_rps: float
    latency: Latency
    top1_expected: int  # responses whose scene is the one the clip was drawn from
    error_samples: list[str]


def classify(client: httpx2.Client, clip: Clip) -> httpx2.Response:
    return client.post("/classify", files={"file": (clip.filename, clip.data, clip.mime)})


def describe_error(response: httpx2.Response) -> str:
    return f"{response.status_code} {response.text[:300]}"


def warm_up(base_url: str, sequence: Sequence[Clip], n: int) -> None:
    with http_client(base_url) as client:
        for clip in sequence[:n]:
            r = classify(client, clip)
            if r.status_code != 200:
                raise RuntimeError(f"warm-up classify failed: {describe_error(r)}")


def run_load(base_url: str, sequence: Sequence[Clip], clients: int) -> LoadResult:
    """Send ``sequence`` to /classify from ``clients`` threads (client i sends requests i, i+clients, ...)."""
    n = len(sequence)
    lat: list[float] = [float("nan")] * n
    ok: list[bool] = [False] * n
    top1: list[bool] = [False] * n
    errors: list[str] = []
    failures: list[BaseException] = []
    finished: list[float] = [0.0] * clients
    barrier = threading.Barrier(clients + 1)
    lock = threading.Lock()

    def worker(i: int) -> None:
        try:
            with http_client(base_url) as client:
                r = classify(client, sequence[i % n])  # opens this client's connection, outside the timing
                if r.status_code != 200:
                    raise RuntimeError(f"classify failed: {describe_error(r)}")
                barrier.wait()
                for k in range(i, n, clients):
                    clip = sequence[k]
                    t0 = time.perf_counter()
                    r = classify(client, clip)
                    lat[k] = time.perf_counter() - t0
                    if r.status_code == 200:
                        ok[k] = True
                        top1[k] = r.json().get("scene") == clip.scene
                    else:
                        with lock:
                            errors.append(describe_error(r))
                finished[i] = time.perf_counter()
        except BaseException as exc:
            failures.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(i,), name=f"client-{i}", daemon=True) for i in range(clients)]
    for t in threads:
        t.start()
    with contextlib.suppress(threading.BrokenBarrierError):  # a client failed; reported below
        barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    if failures:
        raise RuntimeError(f"a client failed: {failures[0]!r}") from failures[0]
    wall = max(finished) - start
    good = [lat[k] for k in range(n) if ok[k]]
    return LoadResult(clients=clients, requests=n, errors=n - len(good), wall_s=wall,
                      throughput_rps=len(good) / wall if wall > 0 else float("nan"), latency=latency(good),
                      top1_expected=sum(top1), error_samples=errors[:3])


@dataclass(frozen=True)
class Paired:
    """Mean milliseconds per clip, decode and embed timed in this process next to the clip's HTTP request."""

    pairs: int
    decode_ms: float
    embed_ms: float
    request_ms: float
    server_infer_ms: float  # the service's own queue + decode + embed + search (its Server-Timing header)

    @property
    def rest_ms(self) -> float:
        return self.request_ms - self.decode_ms - self.embed_ms

    @property
    def http_ms(self) -> float:
        """What the request costs outside the service's inference: client, TCP, HTTP parsing, multipart, routing,
        the hop to the inference pool and back, the response and its log line."""
        return self.request_ms - self.server_infer_ms

    @property
    def decode_share(self) -> float:
        return self.decode_ms / self.request_ms

    @property
    def embed_share(self) -> float:
        return self.embed_ms / self.request_ms

    @property
    def rest_share(self) -> float:
        return self.rest_ms / self.request_ms

    @property
    def throughput_ratio(self) -> float:
        """Sequential HTTP throughput over raw decode+embed throughput, both from the same paired pass."""
        return (self.decode_ms + self.embed_ms) / self.request_ms


def paired_breakdown(base_url: str, encoder: OnnxEncoder, sequence: Sequence[Clip], limits: ClipLimits) -> Paired:
    """Where a classify request's time goes: each clip is decoded + embedded here and sent over HTTP, in turn
    (alternating which goes first), so that both see the same machine state even on a busy host."""
    rate = encoder.sample_rate
    decode_s = embed_s = request_s = server_s = 0.0
    with http_client(base_url) as client:
        for k, clip in enumerate(sequence):
            for step in ((0, 1) if k % 2 == 0 else (1, 0)):
                if step == 0:
                    a = time.perf_counter()
                    decoded = decode_clip(clip.data, sample_rate=rate, limits=limits)
                    b = time.perf_counter()
                    encoder.embed_clip(decoded.waveform)
                    decode_s += b - a
                    embed_s += time.perf_counter() - b
                else:
                    t0 = time.perf_counter()
                    r = classify(client, clip)
                    request_s += time.perf_counter() - t0
                    if r.status_code != 200:
                        raise RuntimeError(f"classify failed: {describe_error(r)}")
                    server_s += server_timing_ms(r.headers.get("server-timing", "")) / 1000
    n = max(1, len(sequence))
    return Paired(pairs=len(sequence), decode_ms=decode_s / n * 1000, embed_ms=embed_s / n * 1000,
                  request_ms=request_s / n * 1000, server_infer_ms=server_s / n * 1000)


def server_timing_ms(header: str) -> float:
    """The sum of a W3C Server-Timing header's durations (``name;dur=ms, ...``)."""
    total = 0.0
    for entry in filter(None, (e.strip() for e in header.split(","))):
        for param in entry.split(";")[1:]:
            key, _, value = param.strip().partition("=")
            if key == "dur":
                total += float(value)
    return total


def enroll_all(base_url: str, enrollments: Sequence[tuple[str, list[Clip]]]) -> list[float]:
    """Enroll each scene over HTTP in turn; returns each request's seconds."""
    times: list[float] = []
    with http_client(base_url) as client:
        for name, clips in enrollments:
            files = [("files", (c.filename, c.data, c.mime)) for c in clips]
            t0 = time.perf_counter()
            r = client.post(f"/scenes/{name}/enroll", files=files)
            times.append(time.perf_counter() - t0)
            if r.status_code != 201:
                raise RuntimeError(f"enroll {name} failed: {describe_error(r)}")
    return times


# --- scale ----------------------------------------------------------------------------------------


def build_synthetic_db(data_dir: Path, n_scenes: int, manifest: Manifest, seed: int = 0,
                       chunk: int = 10_000) -> float:
    """Create a data dir whose database holds ``n_scenes`` scenes with random unit prototypes; returns seconds.

    The schema comes from the service's own migrations; rows are bulk-inserted through its ORM tables.
    Scenes have no clips: classification reads prototypes only.
    """
    start = time.perf_counter()
    data_dir.mkdir(parents=True, exist_ok=True)
    url = Settings(data_dir=data_dir, database_url="", model_path=data_dir).resolved_database_url
    upgrade(url)
    engine = make_engine(url)
    rng = np.random.default_rng(seed)
    now = datetime.now(UTC)
    try:
        with Session(engine) as session:
            for first in range(1, n_scenes + 1, chunk):
                ids = range(first, min(n_scenes, first + chunk - 1) + 1)
                vectors = rng.standard_normal((len(ids), manifest.embedding_dim)).astype(np.float32)
                vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
                session.execute(insert(Scene), [{"id": i, "name": f"synthetic-{i:07d}", "created_at": now}
                                                for i in ids])
                session.execute(insert(Prototype), [
                    {"scene_id": i, "model_version": model_key(manifest), "vector": v.tobytes(),
                     "n_clips": CLIPS_PER_ENROLLMENT, "updated_at": now}
                    for i, v in zip(ids, vectors, strict=True)])
            session.commit()
    finally:
        engine.dispose()
    return time.perf_counter() - start


@dataclass(frozen=True)
class ScaleSide:
    scenes: int
    db_build_s: float
    startup_s: float
    peak_rss_mb: float | None
    latency: Latency
    errors: int


def interleaved_sequential(servers: Sequence[Server], sequence: Sequence[Clip]) -> list[tuple[list[float], int]]:
    """Send each clip to every server in turn (alternating who goes first); (latencies, errors) per server."""
    out: list[tuple[list[float], int]] = [([], 0) for _ in servers]
    clients = [http_client(s.base_url) for s in servers]
    try:
        for k, clip in enumerate(sequence):
            order = range(len(servers)) if k % 2 == 0 else reversed(range(len(servers)))
            for j in order:
                t0 = time.perf_counter()
                r = classify(clients[j], clip)
                dt = time.perf_counter() - t0
                if r.status_code == 200:
                    out[j][0].append(dt)
                else:
                    out[j] = (out[j][0], out[j][1] + 1)
    finally:
        for c in clients:
            c.close()
    return out


# --- reporting ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    name: str
    value: float | None
    op: str  # ">=" or "<="; "" for a figure reported without a target
    limit: float | None
    note: str = ""

    @property
    def passed(self) -> bool | None:
        if self.limit is None or self.value is None or not np.isfinite(self.value):
            return None
        return self.value >= self.limit if self.op == ">=" else self.value <= self.limit

    def row(self) -> list[str]:
        result = "info" if self.limit is None else {True: "PASS", False: "MISS", None: "n/a"}[self.passed]
        value = "n/a" if self.value is None else f"{self.value:.3f}"
        goal = "-" if self.limit is None else f"{self.op} {self.limit:g}"
        return [self.name, value, goal, result]


def table(rows: Sequence[Sequence[str]], header: Sequence[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True)).rstrip(),
             "  ".join("-" * w for w in widths).rstrip()]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    return "\n".join(lines)


def lat_row(label: str, lat: Latency, extra: str = "") -> list[str]:
    return [label, str(lat.n), f"{lat.mean_ms:.1f}", f"{lat.p50_ms:.1f}", f"{lat.p90_ms:.1f}", f"{lat.p99_ms:.1f}",
            f"{lat.max_ms:.1f}", extra]


LAT_HEADER = ["", "n", "mean ms", "p50 ms", "p90 ms", "p99 ms", "max ms", ""]


def say(text: str = "") -> None:
    print(text, flush=True)


def mb(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} MB"


# --- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--bundle", type=Path, default=None,
                   help="Encoder bundle directory (default: the service's default bundle).")
    p.add_argument("--requests", type=int, default=200,
                   help="Classify requests per measurement: each raw pass, each HTTP concurrency level, "
                        "each scale side (default: %(default)s).")
    p.add_argument("--clients", type=int, default=4,
                   help="Concurrent clients for the concurrent run (default: %(default)s).")
    p.add_argument("--scale", type=int, default=100_000,
                   help="Scenes in the large scale database; 0 skips the scale runs (default: %(default)s).")
    p.add_argument("--scenes", type=int, default=10,
                   help="Scenes enrolled over HTTP before the classify runs; their enroll latencies are "
                        "reported (default: %(default)s).")
    p.add_argument("--distinct-queries", type=int, default=50,
                   help="Distinct query clips; request k sends clip k mod this (default: %(default)s).")
    p.add_argument("--warmup", type=int, default=5,
                   help="Untimed requests before each measurement (default: %(default)s).")
    p.add_argument("--inference-threads", type=int, default=None,
                   help="ONNX Runtime intra-op threads, in this process and in the server "
                        "(SCENEPRINT_INFERENCE_THREADS) (default: the service's inference_threads setting).")
    p.add_argument("--clip-seconds", type=float, default=5.0,
                   help="Length of the synthetic clips (default: %(default)s).")
    p.add_argument("--clip-rate", type=int, default=32_000,
                   help="Sample rate of the synthetic clips; the decoder resamples to the encoder's rate "
                        "(default: %(default)s).")
    p.add_argument("--dev-data", nargs="?", const="", default=None, metavar="DIR",
                   help=f"Use real clips from a sceneprint-dev folder (meta.csv, audio/*.ogg), read in place "
                        f"(DIR default: ${DEV_DATA_ENV}).")
    p.add_argument("--startup-timeout", type=float, default=600.0,
                   help="Seconds to wait for a server's /readyz (default: %(default)s).")
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="Write every figure as JSON to OUT.")
    args = p.parse_args(argv)
    if args.bundle is None:
        args.bundle = default_bundle()
    if args.inference_threads is None:
        args.inference_threads = service_settings(args.bundle).inference_threads
    for name in ("requests", "clients", "scenes", "distinct_queries", "inference_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.scale < 0 or args.warmup < 0:
        p.error("--scale and --warmup must not be negative")
    if args.scale and args.scale <= SCALE_BASELINE_SCENES:
        p.error(f"--scale must be above the {SCALE_BASELINE_SCENES}-scene baseline (or 0 to skip)")
    return args


def default_bundle() -> Path:
    """The service's default bundle path, as ``default_bundle_path()`` gives it.

    That function imports ``sceneprint.models``; where the package cannot be imported (``models/`` without
    an ``__init__.py``), fall back to the same folder in this checkout.
    """
    try:
        return default_bundle_path()
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[1] / "models" / "sceneprint-default"


def service_settings(bundle: Path, **overrides: Any) -> Settings:
    """The service's settings as the server will see them (environment included) for ``bundle``.

    ``model_path`` is always passed, so that its default (an import of ``sceneprint.models``) is never needed.
    """
    return Settings(model_path=bundle, **overrides)


def load_clips(args: argparse.Namespace) -> ClipSet:
    if args.dev_data is None:
        return synthetic_clips(args.scenes, args.distinct_queries, args.clip_seconds, args.clip_rate)
    root = args.dev_data or os.environ.get(DEV_DATA_ENV, "")
    if not root:
        raise SystemExit(f"--dev-data without DIR needs ${DEV_DATA_ENV} set to a sceneprint-dev folder")
    return dev_data_clips(Path(root), args.scenes, args.distinct_queries)


def _raise_on_sigterm(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)  # so that the finally blocks stop the servers
    command_line = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    bundle: Path = args.bundle.resolve()
    if not (bundle / "manifest.json").is_file():
        raise SystemExit(f"{bundle} is not an encoder bundle (no manifest.json); pass --bundle")
    threads: int = args.inference_threads
    limits = service_settings(bundle, inference_threads=threads).clip_limits
    limit_blas_threads(threads)  # as the service does
    encoder = load_onnx_encoder(bundle, session=SessionConfig(intra_op_threads=threads))
    manifest = encoder.manifest
    clipset = load_clips(args)
    sequence = request_sequence(clipset.queries, args.requests)
    results: dict[str, Any] = {
        "command": command_line,
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "onnxruntime": onnxruntime.__version__, "loadavg_at_start": list(os.getloadavg())},
        "bundle": {"path": str(bundle), "model_version": manifest.model_version,
                   "embedding_dim": manifest.embedding_dim, "parameter_count": manifest.parameter_count,
                   "macs_per_second": manifest.macs_per_second},
        "settings": {"inference_threads": threads, "requests": args.requests, "clients": args.clients,
                     "scale": args.scale, "scenes": args.scenes, "warmup": args.warmup,
                     "clip_limits": asdict(limits)},
        "clips": {"source": clipset.source, "distinct_queries": len(clipset.queries),
                  "query_bytes_mean": float(np.mean([len(c.data) for c in clipset.queries]))},
    }
    say("sceneprint service benchmark")
    say(f"command:  {command_line}")
    say(f"bundle:   {bundle} ({manifest.model_version}, D={manifest.embedding_dim}, "
        f"{manifest.parameter_count} params, {manifest.macs_per_second / 1e6:.0f} MMAC/s)")
    say(f"clips:    {clipset.source}; {len(clipset.queries)} distinct queries, {args.requests} requests per run")
    say(f"machine:  {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; ORT threads {threads}")

    with tempfile.TemporaryDirectory(prefix="sceneprint-bench-") as tmp_name:
        tmp = Path(tmp_name)
        targets = run_all(args, bundle, encoder, manifest, limits, clipset, sequence, tmp, results)

    results["targets"] = [{**asdict(t), "passed": t.passed} for t in targets]
    say()
    say("== summary ==")
    say(f"command: {command_line}")
    say(table([t.row() for t in targets], ["target", "value", "goal", "result"]))
    notes = [f"  {t.name}: {t.note}" for t in targets if t.note]
    if notes:
        say("notes:")
        say("\n".join(notes))
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2, default=str) + "\n", encoding="utf-8")
        say(f"figures written to {args.json}")
    return 0


def run_all(args: argparse.Namespace, bundle: Path, encoder: OnnxEncoder, manifest: Manifest, limits: ClipLimits,
            clipset: ClipSet, sequence: list[Clip], tmp: Path, results: dict[str, Any]) -> list[Target]:
    threads: int = args.inference_threads

    # 1. Raw encoder, before the HTTP runs.
    say()
    say("== 1. raw encoder (this process, one stream) ==")
    raw_before = bench_raw(encoder, sequence, limits, args.warmup)
    report_raw("before HTTP", raw_before)

    # 2-4. The service: enroll, classify sequentially and concurrently, peak RSS.
    say()
    say("== 2. service over HTTP ==")
    main_server = Server("main", bundle, tmp / "data-main", threads, tmp)
    with running(main_server, args.startup_timeout):
        say(f"server started in {main_server.startup_s:.2f} s (pid {main_server.pid}, {main_server.base_url}); "
            f"RSS after start {mb(main_server.rss_mb())}")
        warm_up(main_server.base_url, sequence, args.warmup)
        enroll_s = enroll_all(main_server.base_url, clipset.enrollments)
        warm_up(main_server.base_url, sequence, args.warmup)
        sequential = run_load(main_server.base_url, sequence, 1)
        concurrent = run_load(main_server.base_url, sequence, args.clients)
        paired = paired_breakdown(main_server.base_url, encoder, sequence[:PAIRED_REQUESTS], limits)
        peak_main = main_server.peak_rss_mb()
        log_tail = main_server.log_tail(2000)
    raw_after = bench_raw(encoder, sequence, limits, args.warmup)

    enroll_lat = latency(enroll_s)
    raw_rate = (raw_before.decode_embed_clips_per_s + raw_after.decode_embed_clips_per_s) / 2
    ratio_seq = sequential.throughput_rps / raw_rate
    ratio_con = concurrent.throughput_rps / raw_rate
    say(table([lat_row("1 client", sequential.latency,
                       f"{sequential.throughput_rps:.2f} req/s, {sequential.errors} errors, "
                       f"top-1 = source scene {sequential.top1_expected}/{sequential.requests}"),
               lat_row(f"{args.clients} clients", concurrent.latency,
                       f"{concurrent.throughput_rps:.2f} req/s, {concurrent.errors} errors"),
               lat_row(f"enroll ({CLIPS_PER_ENROLLMENT} clips)", enroll_lat, f"{len(enroll_s)} new scenes")],
              LAT_HEADER))
    for run in (sequential, concurrent):
        for sample in run.error_samples:
            say(f"  error ({run.clients} clients): {sample}")
    report_raw("after HTTP", raw_after)
    say(f"raw decode+embed throughput, mean of before/after: {raw_rate:.2f} clips/s")
    say(f"HTTP / raw throughput: 1 client {ratio_seq:.3f}, {args.clients} clients {ratio_con:.3f}")
    say(f"{args.clients}-client p99/p50: {concurrent.latency.p99_over_p50:.3f}")
    say(f"server peak RSS (VmHWM): {mb(peak_main)}")
    if log_tail.strip():
        say(f"server log (tail):\n{log_tail}")

    say(f"time share of a sequential classify request, paired ({paired.pairs} clips, each decoded and embedded "
        f"in-process right next to its HTTP request): request mean {paired.request_ms:.1f} ms = decode "
        f"{paired.decode_ms:.1f} ms ({paired.decode_share:.0%}) + embed {paired.embed_ms:.1f} ms "
        f"({paired.embed_share:.0%}) + the rest (HTTP, multipart, threadpool, index search, JSON) "
        f"{paired.rest_ms:.1f} ms ({paired.rest_share:.0%}); paired HTTP/raw throughput {paired.throughput_ratio:.3f}; "
        f"the service's own inference (Server-Timing) {paired.server_infer_ms:.1f} ms, so HTTP and the framework "
        f"outside it {paired.http_ms:.1f} ms")

    results["raw"] = {"before_http": asdict(raw_before), "after_http": asdict(raw_after),
                      "decode_embed_clips_per_s_mean": raw_rate}
    results["http"] = {
        "startup_s": main_server.startup_s,
        "sequential": asdict(sequential), "concurrent": asdict(concurrent),
        "ratio_http_raw_sequential": ratio_seq, "ratio_http_raw_concurrent": ratio_con,
        "p99_over_p50_concurrent": concurrent.latency.p99_over_p50,
        "time_share_paired": {**asdict(paired), "decode_share": paired.decode_share,
                              "embed_share": paired.embed_share, "rest_share": paired.rest_share,
                              "http_ms": paired.http_ms, "throughput_ratio": paired.throughput_ratio},
    }
    results["enroll"] = {"clips_per_enrollment": CLIPS_PER_ENROLLMENT, "seconds": enroll_s,
                         "latency": asdict(enroll_lat)}
    results["memory"] = {"main_server_peak_rss_mb": peak_main}

    targets = [
        Target("raw decode+embed (clips/s)", raw_rate, "", None, note="mean of the passes before and after HTTP"),
        Target("raw embed only (clips/s)",
               (raw_before.embed_only_clips_per_s + raw_after.embed_only_clips_per_s) / 2, "", None),
        Target("HTTP classify, 1 client (req/s)", sequential.throughput_rps, "", None),
        Target("HTTP classify, 1 client p50 (ms)", sequential.latency.p50_ms, "", None),
        Target("HTTP classify, 1 client p99 (ms)", sequential.latency.p99_ms, "", None),
        Target(f"HTTP classify, {args.clients} clients (req/s)", concurrent.throughput_rps, "", None),
        Target(f"HTTP classify, {args.clients} clients p50 (ms)", concurrent.latency.p50_ms, "", None),
        Target(f"HTTP classify, {args.clients} clients p99 (ms)", concurrent.latency.p99_ms, "", None),
        Target(f"enroll, {CLIPS_PER_ENROLLMENT} clips, p50 (ms)", enroll_lat.p50_ms, "", None,
               note=f"median over {len(enroll_s)} enrollments of new scene names"),
        Target("embed share of a classify request", paired.embed_share, "", None,
               note=f"paired pass; decode share {paired.decode_share:.3f}, the rest {paired.rest_share:.3f}"),
        Target("HTTP/raw throughput, 1 client", ratio_seq, ">=", TARGET_HTTP_RAW_RATIO,
               note="sequential requests/s over raw decode+embed clips/s (one stream each: like for like)"),
        Target(f"HTTP/raw throughput, {args.clients} clients", ratio_con, ">=", TARGET_HTTP_RAW_RATIO,
               note=f"{args.clients} concurrent clients over the same one-stream raw figure"),
        Target(f"p99/p50 latency, {args.clients} clients", concurrent.latency.p99_over_p50, "<=",
               TARGET_P99_P50_CONCURRENT),
        Target("server peak RSS (MB)", peak_main, "<=", TARGET_PEAK_RSS_MB,
               note=f"VmHWM of the server after {args.scenes} enrollments and all classify runs"),
    ]

    # 5. Scale.
    if args.scale:
        say()
        say(f"== 5. scale: {SCALE_BASELINE_SCENES} vs {args.scale} scenes (synthetic prototypes) ==")
        targets += run_scale(args, bundle, manifest, sequence, tmp, results)
    return targets


def report_raw(label: str, raw: RawResult) -> None:
    say(f"raw {label}: decode+embed {raw.decode_embed_clips_per_s:.2f} clips/s "
        f"({raw.clips} clips in {raw.decode_embed_wall_s:.2f} s); embed only {raw.embed_only_clips_per_s:.2f} clips/s")
    say(table([lat_row("decode", raw.decode), lat_row("embed", raw.embed), lat_row("decode+embed", raw.decode_embed)],
              LAT_HEADER))


def run_scale(args: argparse.Namespace, bundle: Path, manifest: Manifest, sequence: list[Clip], tmp: Path,
              results: dict[str, Any]) -> list[Target]:
    threads: int = args.inference_threads
    sizes = [SCALE_BASELINE_SCENES, args.scale]
    build_s = []
    for n in sizes:
        build_s.append(build_synthetic_db(tmp / f"data-{n}", n, manifest))
        say(f"database with {n} scenes built in {build_s[-1]:.2f} s")
    servers = [Server(f"scenes-{n}", bundle, tmp / f"data-{n}", threads, tmp) for n in sizes]
    with contextlib.ExitStack() as stack:
        for server, n in zip(servers, sizes, strict=True):
            stack.enter_context(running(server, args.startup_timeout))
            say(f"server with {n} scenes ready in {server.startup_s:.2f} s (RSS {mb(server.rss_mb())})")
        for server in servers:
            warm_up(server.base_url, sequence, args.warmup)
        measured = interleaved_sequential(servers, sequence)
        peaks = [s.peak_rss_mb() for s in servers]
    sides = [ScaleSide(scenes=n, db_build_s=b, startup_s=s.startup_s or float("nan"), peak_rss_mb=p,
                       latency=latency(lat), errors=err)
             for n, b, s, p, (lat, err) in zip(sizes, build_s, servers, peaks, measured, strict=True)]
    small, large = sides
    p50_ratio = large.latency.p50_ms / small.latency.p50_ms
    p99_ratio = large.latency.p99_ms / small.latency.p99_ms
    mean_ratio = large.latency.mean_ms / small.latency.mean_ms
    say(table([lat_row(f"{s.scenes} scenes", s.latency,
                       f"start-up {s.startup_s:.2f} s, peak RSS {mb(s.peak_rss_mb)}, {s.errors} errors")
               for s in sides], LAT_HEADER))
    say(f"{args.scale} vs {SCALE_BASELINE_SCENES} scenes: p50 x{p50_ratio:.3f}, mean x{mean_ratio:.3f}, "
        f"p99 x{p99_ratio:.3f}; start-up {large.startup_s:.2f} s vs {small.startup_s:.2f} s")
    results["scale"] = {"sides": [asdict(s) for s in sides], "p50_ratio": p50_ratio, "mean_ratio": mean_ratio,
                        "p99_ratio": p99_ratio}
    return [
        Target(f"classify p50 (ms), {SCALE_BASELINE_SCENES} scenes", small.latency.p50_ms, "", None),
        Target(f"classify p50 (ms), {args.scale} scenes", large.latency.p50_ms, "", None),
        Target(f"classify p50, {args.scale} / {SCALE_BASELINE_SCENES} scenes", p50_ratio, "<=", TARGET_SCALE_SLOWDOWN,
               note=f"sequential, interleaved requests to both servers; p99 ratio {p99_ratio:.3f} (informative)"),
        Target(f"server peak RSS with {args.scale} scenes (MB)", large.peak_rss_mb, "<=", TARGET_PEAK_RSS_MB),
        Target(f"server start-up with {args.scale} scenes (s)", large.startup_s, "", None,
               note=f"spawn to /readyz 200, index rebuilt from the database; {small.startup_s:.2f} s with "
                    f"{SCALE_BASELINE_SCENES} scenes"),
    ]


if __name__ == "__main__":
    sys.exit(main())
