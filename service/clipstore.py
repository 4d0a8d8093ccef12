"""The clip store: original uploaded audio, content-addressed under ``<data_dir>/clips``.

A clip lives at ``clips/<sha256[:2]>/<sha256>``; the client's file name is never part of a path.
Writes go to a temporary file that is fsynced and renamed, so a crash leaves either the whole file
or none. Files that no clip row references are removed by ``sweep`` (at start-up and after deletes).
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
from collections.abc import Iterable
from pathlib import Path


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ClipStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        # Held across "write blobs + commit rows" and "check references + unlink", so a delete never
        # removes a blob that a concurrent enrollment is about to reference.
        self.lock = threading.RLock()

    def path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise ValueError(f"not a sha256 hex digest: {sha256!r}")
        return self.root / sha256[:2] / sha256

    def put(self, data: bytes, sha256: str) -> None:
        """Store ``data``, whose ``content_hash`` the caller computed once (idempotent).

        Raises:
            OSError: When the disk refuses.
        """
        target = self.path(sha256)
        if target.is_file() and target.stat().st_size == len(data):
            return
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".incoming-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def all_hashes(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {p.name for p in self.root.glob("??/*") if not p.name.startswith(".")}

    def remove(self, hashes: Iterable[str]) -> None:
        for sha in hashes:
            self.path(sha).unlink(missing_ok=True)

    def sweep(self, referenced: set[str]) -> int:
        """Remove blobs not in ``referenced`` and stale temporary files; return how many blobs went."""
        orphans = self.all_hashes() - referenced
        self.remove(orphans)
        if self.root.is_dir():
            for tmp in self.root.glob("??/.incoming-*"):
                tmp.unlink(missing_ok=True)
        return len(orphans)
