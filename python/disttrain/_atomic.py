"""Atomic file replacement, shared by every writer of a file a crash must never tear
(metrics.csv, peers.csv, the advisor's cache entries and calibrations)."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import IO, Any


def write_atomically(path: str | os.PathLike[str], fill: Callable[[IO[Any]], None], *, binary: bool = False,
                     mode: int | None = None, durable: bool = True) -> None:
    """Replaces ``path`` with what ``fill`` writes into an open file object.

    The new content goes into a temporary file of a random name in the same folder,
    created exclusively (never through a symlink planted at a predictable name), then
    renamed over ``path``: a reader sees the old file or the new one, never a part.
    ``mode`` is the file's permission bits (default 0600, mkstemp's). With ``durable``,
    the file is fsynced before the rename and the folder after it, so the new content
    survives a power loss once this returns. On any error the temporary is removed and
    the error propagates; ``path`` is untouched.
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        f: IO[Any]
        with (os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", newline="")) as f:
            fill(f)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            if durable:
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    if durable:
        fsync_directory(folder)


def fsync_directory(path: str) -> None:
    """Makes the folder's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def umask() -> int:
    """The process's umask, read without changing it (os.umask would, for every thread)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    return 0o077
