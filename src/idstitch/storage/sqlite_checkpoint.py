"""WAL checkpoints on a thread of their own, so that the writer mostly just appends to the WAL.

SQLite's automatic checkpoint runs inside the COMMIT that crosses the threshold: the writer stops to copy
pages back into the database file. Here a second connection does the copying (PASSIVE: it never blocks
the writer, and sqlite3 releases the GIL while it works, so it uses the machine's other core).

A WAL file only rewinds when a write transaction starts with every frame copied, which a busy writer
never sees: its next commit always lands while the thread copies. So the thread passes again over what
was committed during its pass, until little is left (each pass is shorter than the one before), and only
then does the writer copy the few frames committed since (cheap), so that its next transaction rewinds
the WAL. A single pass left the writer copying all the frames of a long pass: at 300k messages, 54 ms
of the writer's time per catch-up. Should
the WAL outgrow `hard_limit_bytes` anyway (readers pinning old frames), the writer runs a blocking
TRUNCATE checkpoint, so the file stays bounded.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable

__all__ = ["Checkpointer"]


class Checkpointer:
    """Copies WAL frames into the database in the background once the WAL passes a size."""

    def __init__(
        self,
        path: str,
        connect: Callable[[], sqlite3.Connection],
        *,
        every_commits: int = 32,
        hard_limit_bytes: int = 512 * 1024 * 1024,
        catch_up_frames: int = 256,
        max_passes: int = 8,
    ) -> None:
        self.wal_path = path + "-wal"
        self.every_commits = every_commits
        self.hard_limit_bytes = hard_limit_bytes
        self.catch_up_frames = catch_up_frames
        self.max_passes = max_passes
        self.checkpoints = 0
        self._commits = 0
        self._busy = False
        self._pass_done = False
        self._connection = connect()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="idstitch-checkpoint", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a background pass is running."""
        return self._busy

    def after_commit(self, writer: sqlite3.Connection) -> None:
        """Called by the writer after each commit: finish a background pass, or start one, or block."""
        self._commits += 1
        if self._pass_done:
            self._pass_done = False
            writer.execute("PRAGMA wal_checkpoint(PASSIVE)")  # only what was committed during the pass
            return
        if self._wal_size() >= self.hard_limit_bytes:
            # TRUNCATE, not RESTART: the file's size is how the next commits tell that it was done.
            writer.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return
        if not self._busy and self._commits >= self.every_commits:
            self._commits = 0
            self._busy = True
            self._wake.set()

    def close(self) -> None:
        """Stop the thread and close its connection (the last connection to close checkpoints fully)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._connection.close()

    def _run(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            if self._stopping:
                return
            try:
                for _ in range(self.max_passes):
                    _, frames, copied = self._connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchone()
                    self.checkpoints += 1
                    if frames - copied <= self.catch_up_frames:
                        break  # what is left (and what comes in meanwhile) the writer copies quickly
                self._pass_done = True
            except sqlite3.Error:
                pass  # busy or interrupted: the next pass catches up
            finally:
                self._busy = False

    def _wal_size(self) -> int:
        try:
            return os.stat(self.wal_path).st_size
        except FileNotFoundError:
            return 0
