"""The data directory on disk: private permissions, and which failures mean "storage cannot be written".

Everything the service creates under the data directory is private to the user it runs as, whatever the umask:
directories 0700, the SQLite database 0600 (SQLite gives its ``-wal``, ``-shm`` and ``-journal`` files the
database file's permissions, so they are 0600 too), clip blobs 0600 (``tempfile.mkstemp``). A directory that
already exists keeps the permissions its owner gave it.

A storage failure is a write refused by the disk or the file system (full, read-only, no permission) or by
SQLite for those reasons; the service answers it 503 ``storage_unavailable`` and keeps serving reads.
"""

from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from sqlalchemy.exc import DBAPIError

from sceneprint.service.errors import StorageUnavailable, from_database_error

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# errno values that mean the disk or file system refuses writes (not a bug, not a missing file).
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO})


def make_private_dir(path: Path) -> None:
    """Create ``path`` and any missing parents, each one created 0700 (chmod after mkdir: the umask cannot widen
    it); directories that exist are left as they are."""
    missing = []
    for p in [path, *path.parents]:
        if p.is_dir():
            break
        missing.append(p)
    for p in reversed(missing):
        try:
            p.mkdir(mode=PRIVATE_DIR)
        except FileExistsError:
            continue  # made meanwhile (another replica, another thread): not ours to chmod
        os.chmod(p, PRIVATE_DIR)


def create_private_file(path: Path) -> None:
    """Create ``path`` empty, 0600, unless it exists (an empty file is a valid, empty SQLite database)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE)
    except FileExistsError:
        return
    try:
        os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)


def sqlite_path(url: str) -> Path | None:
    """The database file of a SQLite URL (None: not SQLite, or in memory)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix):] in ("", ":memory:"):
        return None
    return Path(url[len(prefix):].split("?", 1)[0])


def storage_failure(exc: BaseException) -> str | None:
    """A short reason (no path) if ``exc`` is the disk or database refusing a write; None for anything else."""
    if isinstance(exc, StorageUnavailable):
        return exc.detail
    if isinstance(exc, OSError) and exc.errno in STORAGE_ERRNOS:
        return exc.strerror or errno.errorcode.get(exc.errno or 0, "I/O error")
    message = None
    if isinstance(exc, DBAPIError):
        message = str(exc.orig) if exc.orig is not None else str(exc)
    elif isinstance(exc, sqlite3.OperationalError):
        message = str(exc)
    if message is not None and isinstance(from_database_error(message), StorageUnavailable):
        return message
    return None
