"""Where the service's resident memory comes from: RSS after importing each layer, and the largest
mappings after ``import torch`` (from /proc/self/smaps). Each measurement runs in a fresh interpreter.

    python -m bench.import_rss
"""

from __future__ import annotations

import subprocess
import sys

STEPS = ["numpy", "faiss", "torch", "torchaudio", "sceneprint.service.app"]

PROBE = """
import resource, sys
for name in sys.argv[1:]:
    __import__(name)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)
"""

SMAPS = """
import collections, torch
rss, dirty, current = collections.Counter(), collections.Counter(), "[anon]"
for line in open("/proc/self/smaps"):
    parts = line.split()
    if not parts[0].endswith(":") or not parts[0][:-1].replace("_", "").isalpha():
        current = parts[5].rsplit("/", 1)[-1] if len(parts) > 5 else "[anon]"
    elif parts[0] == "Rss:":
        rss[current] += int(parts[1])
    elif parts[0] == "Private_Dirty:":
        dirty[current] += int(parts[1])
print(f"after import torch: RSS {sum(rss.values()) // 1024} MB, private dirty {sum(dirty.values()) // 1024} MB")
for name, kb in rss.most_common(8):
    print(f"  {name:<28} RSS {kb // 1024:>4} MB  private dirty {dirty[name] // 1024:>4} MB")
"""


def main() -> None:
    version = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"],
                             capture_output=True, text=True, check=True).stdout.strip()
    print(f"torch build: {version}")
    for i in range(len(STEPS)):
        mods = STEPS[: i + 1]
        out = subprocess.run([sys.executable, "-c", PROBE, *mods], capture_output=True, text=True, check=True)
        print(f"peak RSS after importing {' + '.join(mods)}: {out.stdout.strip()} MB")
    print(subprocess.run([sys.executable, "-c", SMAPS], capture_output=True, text=True, check=True).stdout, end="")


if __name__ == "__main__":
    main()
