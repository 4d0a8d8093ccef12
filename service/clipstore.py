"""The clip store: original uploaded audio, content-addressed under ``<data_dir>/clips``.

A clip lives at ``clips/<sha256[:2]>/<sha256>``; the client's file name is never part of a path.
Writes go to a temporary file that is fsynced and renamed, so a crash leaves either the whole file
or none: two writers of the same content (two replicas) both rename a whole file over the target.

Several replicas share one store (a shared volume), and one may remove a blob that no committed clip row
references at the very moment another enrolls the same content. So removal and writing follow a protocol that
never loses a referenced blob, with no lock across processes:

- a remover first renames the blob aside (``.trash-*``), then reads the references again, in a transaction that
  starts after the rename: referenced now, the blob is put back; else it is deleted (``discard``);
- a writer stores (or touches) the blob, commits its clip rows, then checks that the blob is still there and
  writes it again from the request's bytes if not (``ensure``).

Either the writer's commit precedes the remover's second read (which then sees the reference and puts the blob
back), or it follows it, and the writer's check, after its commit and so after the rename, finds the blob gone
and writes it again. The lock below orders this process's own writers and removers.

A blob that cannot be removed (the disk refuses: read-only, no permission) is not an error of the request that
removed its rows, which has committed: it is logged, counted (``removal_failures``) and kept in ``pending``, which
the service retries (``retry_pending``) on its next write and every few seconds; a restart's sweep finds it too.
Directories are created 0700 and blobs 0600 (``service/storage.py``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Collection
from pathlib import Path

from sceneprint.service.storage import make_private_dir

log = logging.getLogger("sceneprint.service.clipstore")
# Temporary files older than this are left-overs of a crashed write (a live write finishes in seconds); younger
# ones may be another replica's write in progress, and are left alone.
STALE_TEMP_S = 3600.0
References = Callable[[list[str]], set[str]]  # which of these hashes committed clip rows reference, read now


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class ClipStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        # Held across "write blobs + commit rows" and "check references + unlink", so a delete never
        # removes a blob that a concurrent enrollment is about to reference.
        self.lock = threading.RLock()
        self.pending: set[str] = set()  # blobs whose removal the disk refused, to retry
        self.removal_failures = 0  # blobs whose removal failed, since start (a metric)

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
        self._write(target, data)

    def ensure(self, data: bytes, sha256: str) -> bool:
        """After the commit that references it: write the blob again if a remover took it meanwhile (see the
        module's protocol); whether it had to."""
        if self.exists(sha256):
            return False
        self._write(self.path(sha256), data)
        return True

    def _write(self, target: Path, data: bytes) -> None:
        make_private_dir(target.parent)
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

    def read(self, sha256: str, wait_s: float = 5.0) -> bytes:
        """The blob's bytes. One that a remover has set aside (its second read under way) is waited for, up to
        ``wait_s``: it comes back if referenced.

        Raises:
            FileNotFoundError: There is no such blob.
        """
        deadline = time.monotonic() + wait_s
        missing = 0  # consecutive looks that found neither the blob nor a copy set aside
        while True:
            try:
                return self.path(sha256).read_bytes()
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise
                # The remover may have put the blob back between the failed read and this look: a blob is gone
                # only when a second read after the look fails too, and still nothing is aside.
                missing = 0 if self._aside(sha256) else missing + 1
                if missing == 2:
                    raise
            if missing == 0:
                time.sleep(0.01)

    def _aside(self, sha256: str) -> bool:
        return any(self.path(sha256).parent.glob(f".trash-{sha256}-*"))

    def exists(self, sha256: str) -> bool:
        return self.path(sha256).is_file()

    def all_hashes(self) -> set[str]:
        if not self.root.is_dir():
            return set()
        return {p.name for p in self.root.glob("??/*") if not p.name.startswith(".")}

    def discard(self, hashes: Collection[str], references: References) -> int:
        """Remove the blobs ``hashes`` that no committed clip row references, safely beside writers in other
        processes (the module's protocol); return how many went. A blob the disk refuses to move or delete is
        logged and kept in ``pending`` (not raised: the caller's rows are gone already)."""
        aside: dict[str, Path] = {}
        refused: dict[str, str] = {}
        for sha in hashes:
            trash = self.path(sha).with_name(f".trash-{sha}-{uuid.uuid4().hex[:8]}")
            try:
                os.rename(self.path(sha), trash)
            except FileNotFoundError:
                self.pending.discard(sha)
                continue
            except OSError as exc:
                refused[sha] = exc.strerror or type(exc).__name__
                continue
            aside[sha] = trash
        try:
            return self._discard_aside(aside, references, refused)
        finally:
            self._note_refused(refused)

    def _discard_aside(self, aside: dict[str, Path], references: References, refused: dict[str, str]) -> int:
        if not aside:
            return 0
        try:
            kept = references(list(aside))
        except BaseException:
            kept = set(aside)  # cannot tell: put every one back
            raise
        finally:
            for sha, trash in aside.items():
                if sha in kept and not self.exists(sha):
                    os.replace(trash, self.path(sha))
                else:
                    try:
                        trash.unlink(missing_ok=True)
                    except OSError as exc:  # left aside: the sweep removes stale ones, and reads still find it
                        refused[sha] = exc.strerror or type(exc).__name__
                        continue
                self.pending.discard(sha)
        return len(aside) - len(kept & set(aside)) - len(set(refused) & set(aside) - kept)

    def _note_refused(self, refused: dict[str, str]) -> None:
        new = set(refused) - self.pending  # a retry that fails again is neither logged nor counted again
        self.pending.update(refused)
        if not new:
            return
        self.removal_failures += len(new)
        log.warning("could not remove %d unreferenced clip blob(s) (%s); retrying later (%d pending)", len(new),
                    ", ".join(sorted({refused[sha] for sha in new})), len(self.pending))

    def retry_pending(self, references: References) -> int:
        """Try again to remove the blobs whose removal failed; how many went."""
        with self.lock:
            if not self.pending:
                return 0
            return self.discard(set(self.pending), references)

    def probe(self) -> None:
        """Write and remove a small file in the store (is the disk writable again?).

        Raises:
            OSError: When the disk refuses.
        """
        make_private_dir(self.root)
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".incoming-probe-")
        try:
            os.write(fd, b"\0")
            os.fsync(fd)
        finally:
            os.close(fd)
            Path(tmp).unlink(missing_ok=True)

    def sweep(self, referenced: set[str], references: References) -> int:
        """Remove blobs that no clip row references and stale temporary files; how many blobs went.

        Args:
            referenced: Every hash referenced, read before the store is listed (candidates are the others).
            references: The second read, of the candidates, after they are set aside (``discard``).
        """
        gone = self.discard(self.all_hashes() - referenced, references)
        if self.root.is_dir():
            now = time.time()
            for tmp in [*self.root.glob("??/.incoming-*"), *self.root.glob("??/.trash-*")]:
                try:
                    if now - tmp.stat().st_mtime > STALE_TEMP_S:
                        tmp.unlink(missing_ok=True)
                except OSError:  # gone meanwhile, or the disk refuses: the next sweep tries again
                    pass
        return gone
