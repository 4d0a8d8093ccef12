"""Peak RSS of decoding hostile wide files at once (issue 22, item 5).

Four threads each decode a small FLAC of near-silence (59 s, 384 kHz, 8 channels) through ``decode_clip``, as
four concurrent requests would. Run: ``.venv/bin/python -m bench.decode_memory [--json out.json]``.
"""

from __future__ import annotations

import argparse
import json
import resource
import threading
import time

from sceneprint.audio import ClipLimits, decode_clip
from tests import audio_factory as af


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=59.0)
    parser.add_argument("--json")
    args = parser.parse_args()
    data = af.wide_quiet_flac(args.seconds)
    before = rss_mb()
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    threads = [threading.Thread(target=decode_clip, args=(data,),
                                kwargs={"sample_rate": 32_000, "limits": ClipLimits(max_seconds=60.0)})
               for _ in range(args.requests)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    out = {"file_bytes": len(data), "requests": args.requests, "seconds": args.seconds,
           "rss_before_mb": round(before, 1),
           "peak_before_decoding_mb": round(peak_before, 1), "peak_rss_mb": round(peak, 1), "wall_s": round(wall, 2)}
    print(json.dumps(out))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
