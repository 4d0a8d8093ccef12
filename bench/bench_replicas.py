"""Replica benchmark: classify throughput with one and with two service processes on one database, and how long an
enrollment through one replica takes to reach the other's classifications.

Each replica is ``sceneprint serve`` on the bundled default model, sharing one data directory (clip store) and
one database: a private PostgreSQL server started for the run (``tests/postgres.py``: Debian's server binaries)
unless ``--database-url`` names one, or a SQLite file (``--sqlite``; replicas then poll the change log every
``SCENEPRINT_SYNC_POLL_S``).

1. Throughput: ``--clients`` threads send ``--requests`` classify requests each (5 s clips, 20 scenes enrolled),
   all to one replica, then spread over two (client i to replica i mod 2). On a 2-core machine two processes
   share the same cores: the point is that it works and stays correct, not that it scales.
2. Visibility: ``--trials`` times, a new scene is enrolled through replica A; as soon as the 201 arrives, replica
   B's ``/readyz`` is polled (a few ms per poll) until its index holds one scene more. The time from the 201 to
   that answer, p50 and max; then B classifies one of the scene's clips, which must name the new scene.

Nothing asserts on timings. ``--json`` writes every figure.

    .venv/bin/python -m bench.bench_replicas --json docs/results/replicas.json
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "models" / "sceneprint-default"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clip(seed: int, seconds: float = 5.0, sr: int = 32000) -> bytes:
    """A distinct synthetic scene: noise shaped by a random spectral envelope, with a random tone (WAV bytes)."""
    rng = np.random.default_rng(seed)
    n = int(seconds * sr)
    spectrum = np.fft.rfft(rng.standard_normal(n))
    envelope = np.interp(np.linspace(0, 1, spectrum.size), np.linspace(0, 1, 12), rng.uniform(0.05, 1.0, 12))
    audio = np.fft.irfft(spectrum * envelope, n)
    audio += 0.3 * np.sin(2 * np.pi * rng.uniform(100, 3000) * np.arange(n) / sr)
    audio = (0.3 * audio / np.max(np.abs(audio))).astype(np.float32)
    buf = io.BytesIO()
    sf.write(buf, audio, sr, format="WAV", subtype="PCM_16")
    return buf.getvalue()


def scene_clips(scene: int) -> list[bytes]:
    """Five clips of one scene: one envelope and tone, each with noise of its own added."""
    audio, sr = sf.read(io.BytesIO(clip(20_000 + scene)), dtype="float32")
    out = []
    for i in range(5):
        noisy = audio + 0.02 * np.random.default_rng(7919 * scene + i).standard_normal(audio.size)
        buf = io.BytesIO()
        sf.write(buf, np.clip(noisy, -1, 1).astype(np.float32), sr, format="WAV", subtype="PCM_16")
        out.append(buf.getvalue())
    return out


@contextlib.contextmanager
def serve(data_dir: Path, model: Path, env: dict[str, str], n: int) -> Iterator[list[str]]:
    procs, urls = [], []
    environment = {**{k: v for k, v in os.environ.items() if not k.startswith("SCENEPRINT_")}, **env}
    try:
        for _ in range(n):
            port = free_port()
            procs.append(subprocess.Popen([sys.executable, "-m", "sceneprint.cli", "serve", "--port", str(port),
                                           "--data-dir", str(data_dir), "--model", str(model), "--log-level",
                                           "warning"], env=environment))
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(httpx2.HTTPError):
                    if httpx2.get(f"{url}/readyz", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline or procs[-1].poll() is not None:
                    raise RuntimeError("a replica did not start")
                time.sleep(0.05)
            urls.append(url)
        yield urls
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def throughput(urls: list[str], clients: int, requests: int, queries: list[bytes]) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    lock = threading.Lock()

    def run(i: int) -> None:
        nonlocal failures
        url = urls[i % len(urls)]
        with httpx2.Client(timeout=60) as c:
            for r in range(requests):
                data = queries[(i * requests + r) % len(queries)]
                t0 = time.perf_counter()
                response = c.post(f"{url}/classify", files={"file": ("q.wav", data, "audio/wav")})
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    failures += response.status_code != 200

    t0 = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    return {"replicas": len(urls), "clients": clients, "requests": len(latencies), "failed": failures,
            "per_s": round(len(latencies) / wall, 2), "p50_ms": round(1e3 * statistics.median(latencies), 1),
            "p99_ms": round(1e3 * float(np.quantile(latencies, 0.99)), 1)}


def visibility(a: str, b: str, trials: int, offset: int) -> dict[str, Any]:
    seconds, polls, found = [], [], 0
    with httpx2.Client(timeout=60) as ca, httpx2.Client(timeout=60) as cb:
        expected = cb.get(f"{b}/readyz").json()["scenes_indexed"]
        for t in range(trials):
            name = f"vis-{offset + t}"
            clips = scene_clips(offset + t)
            files = [("files", (f"c{i}.wav", c, "audio/wav")) for i, c in enumerate(clips)]
            response = ca.post(f"{a}/scenes/{name}/enroll", files=files)
            if response.status_code != 201:
                raise RuntimeError(f"enroll {name}: {response.status_code} {response.text}")
            t0, n = time.perf_counter(), 0
            while True:  # B's readyz says how many scenes its index holds: a cheap poll (a few ms)
                n += 1
                if cb.get(f"{b}/readyz").json()["scenes_indexed"] >= expected + 1:
                    break
                if time.perf_counter() - t0 > 30:
                    raise RuntimeError(f"{name} not visible on the other replica within 30 s")
            seconds.append(time.perf_counter() - t0)
            polls.append(n)
            expected += 1
            best = cb.post(f"{b}/classify", files={"file": ("q.wav", clips[0], "audio/wav")}, params={"top_k": 1})
            found += best.json()["top_k"][0]["scene"] == name  # and B's classification finds it
    ms = [1e3 * s for s in seconds]
    return {"trials": trials, "p50_ms": round(statistics.median(ms), 1), "max_ms": round(max(ms), 1),
            "mean_ms": round(statistics.fmean(ms), 1), "first_poll_hits": sum(p == 1 for p in polls),
            "classified_as_enrolled": found}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--database-url", help="A PostgreSQL URL (default: a private server for the run)")
    parser.add_argument("--sqlite", action="store_true", help="One SQLite file instead (replicas poll)")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--requests", type=int, default=50, help="classify requests per client")
    parser.add_argument("--trials", type=int, default=100)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="bench-replicas-")))
        if args.sqlite:
            url, database = f"sqlite:///{tmp / 'shared.db'}", "sqlite (polling)"
        elif args.database_url:
            url, database = args.database_url, "postgresql"
        else:
            sys.path.insert(0, str(ROOT))
            from tests.postgres import fresh_database, postgres_server

            url = fresh_database(stack.enter_context(postgres_server()), "bench_replicas")
            database = "postgresql (private server)"
        env = {"SCENEPRINT_DATABASE_URL": url, "SCENEPRINT_MIN_CLIP_SECONDS": "0.5"}
        queries = [clip(50_000 + i) for i in range(32)]
        results: dict[str, Any] = {"database": database, "machine": f"{platform.node()} {os.cpu_count()} CPUs",
                                   "model": str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT)
                                                else args.model)}
        with serve(tmp / "data", args.model, env, 2) as (a, b):
            for s in range(20):
                files = [("files", (f"c{i}.wav", c, "audio/wav")) for i, c in enumerate(scene_clips(s))]
                if httpx2.post(f"{(a, b)[s % 2]}/scenes/base-{s}/enroll", files=files, timeout=60).status_code != 201:
                    raise RuntimeError("enrollment failed")
            throughput([a, b], args.clients, 5, queries)  # warm both
            one = throughput([a], args.clients, args.requests, queries)
            two = throughput([a, b], args.clients, args.requests, queries)
            one_again = throughput([a], args.clients, args.requests, queries)  # drift check
            results["throughput"] = {"one_replica": one, "two_replicas": two, "one_replica_again": one_again,
                                     "two_over_one": round(two["per_s"] / ((one["per_s"] + one_again["per_s"]) / 2),
                                                           2)}
            results["visibility"] = visibility(a, b, args.trials, offset=1000)
            results["visibility_reverse"] = visibility(b, a, max(10, args.trials // 10), offset=5000)
    print(json.dumps(results, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
