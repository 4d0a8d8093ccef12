"""The serve install as a newcomer gets it: size, install time, start-up time and idle memory.

Runs the README's first command in a fresh virtualenv (``python3.11 -m venv V && V/bin/pip install SRC``),
then starts ``sceneprint serve`` on a free port with an empty data directory ``--starts`` times and
measures the time from spawn to the first ``/readyz`` 200 and the server's resident memory once ready
(idle). It also checks that neither torch nor scipy can be imported in that environment.

    .venv/bin/python -m bench.serve_install --source . --json docs/results/serve-install.json
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any


def du_bytes(path: Path) -> int:
    """Bytes the files under ``path`` take on disk (like ``du -sb``, hard links counted once)."""
    seen: set[tuple[int, int]] = set()
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            st = os.lstat(os.path.join(root, name))
            if (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def start_once(venv: Path, data: Path, timeout_s: float = 60.0) -> dict[str, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCENEPRINT_")}
    t0 = time.perf_counter()
    proc = subprocess.Popen([str(venv / "bin" / "sceneprint"), "serve", "--data-dir", str(data), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"serve exited with {proc.returncode}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() - t0 > timeout_s:
                raise RuntimeError("not ready in time")
            time.sleep(0.02)
        ready_s = time.perf_counter() - t0
        time.sleep(1.0)  # idle
        return {"ready_s": round(ready_s, 3), "idle_rss_mb": round(rss_mb(proc.pid), 1)}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", type=Path, default=Path("."), help="what to pip install (a clone)")
    parser.add_argument("--python", default="python3.11")
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="serve-install-"))
    try:
        venv = work / "venv"
        t0 = time.perf_counter()
        subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(args.source.resolve())], check=True)
        install_s = time.perf_counter() - t0
        absent = subprocess.run([str(venv / "bin" / "python"), "-c",
                                 "import importlib.util as u; print([m for m in ('torch', 'scipy', 'torchaudio') "
                                 "if u.find_spec(m)])"], capture_output=True, text=True, check=True).stdout.strip()
        sizes = {p.name: du_bytes(p) for p in (venv / "lib" / "python3.11" / "site-packages").iterdir() if p.is_dir()}
        starts = []
        for i in range(args.starts):
            data = work / f"data-{i}"  # a fresh data directory: the first start migrates an empty database
            starts.append(start_once(venv, data))
        result = {
            "venv_mb": round(du_bytes(venv) / 1e6, 1), "install_s": round(install_s, 1),
            "importable_of_torch_scipy_torchaudio": absent,
            "largest_packages_mb": {k: round(v / 1e6, 1) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1])[:8]},
            "starts": starts,
            "ready_s_median": sorted(s["ready_s"] for s in starts)[len(starts) // 2],
            "idle_rss_mb_median": sorted(s["idle_rss_mb"] for s in starts)[len(starts) // 2],
            "load_average": os.getloadavg(),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
