"""Feature caches: shared by runs that start at once."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np

WRITE_MANY = """
import sys
from pathlib import Path
import numpy as np
from sceneprint.training.data import save_cache
for _ in range(int(sys.argv[2])):
    save_cache(Path(sys.argv[1]), np.arange(1_000_000, dtype=np.float32))
"""


def test_two_processes_filling_one_cache_at_once_both_succeed(tmp_path: Path) -> None:
    # Two ablation runs that start together compute the same features and write the same cache file.
    path = tmp_path / "cache" / "logmel-x.npy"
    procs = [subprocess.Popen([sys.executable, "-c", WRITE_MANY, str(path), "100"]) for _ in range(2)]
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    assert np.array_equal(np.load(path), np.arange(1_000_000, dtype=np.float32))
    assert [p.name for p in path.parent.iterdir()] == ["logmel-x.npy"]
