"""Scratch directories of benchmark runs: removed afterwards, and by a later run when a run was killed.

A benchmark killed with SIGKILL (or a machine's OOM killer) cannot remove its scratch directory, which
holds a SQLite store of up to gigabytes. Each run holds an exclusive lock on a file in its directory for
as long as it lives; the kernel drops the lock when the process dies however it dies, so a later run
can tell an abandoned directory from one in use, even in another PID namespace sharing the same /tmp.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

__all__ = ["OWNER_LOCK", "remove_abandoned_scratch", "scratch_directory"]

PREFIX = "idstitch-bench-"
OWNER_LOCK = ".owner.lock"  # held by the run that made the directory, for as long as it lives


def _held_by_nobody(lock_path: Path) -> bool:
    """True when no living process holds the lock file (its run ended without removing the directory)."""
    try:
        descriptor = os.open(lock_path, os.O_RDWR)
    except OSError:  # no lock file: a run still making its directory, or not ours
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    finally:
        os.close(descriptor)  # releases the lock taken, if it was
    return True


def remove_abandoned_scratch(base: Path | None = None) -> list[Path]:
    """Remove the scratch directories of benchmark runs that died without removing them; those removed."""
    folder = Path(base or tempfile.gettempdir())
    removed = []
    for entry in sorted(folder.glob(PREFIX + "*")):
        if entry.is_dir() and not entry.is_symlink() and _held_by_nobody(entry / OWNER_LOCK):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def scratch_directory(name: str) -> Iterator[Path]:
    """A temporary directory for one benchmark run, removed afterwards (or by the next run if this one is killed)."""
    remove_abandoned_scratch()
    with tempfile.TemporaryDirectory(prefix=f"{PREFIX}{name}-") as folder:
        descriptor = os.open(Path(folder) / OWNER_LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield Path(folder)
        finally:
            os.close(descriptor)
