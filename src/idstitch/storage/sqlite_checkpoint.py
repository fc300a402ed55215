"""WAL checkpoints on a thread of their own, so that the writer mostly just appends to the WAL.

SQLite's automatic checkpoint runs inside the COMMIT that crosses the threshold: the writer stops to copy
pages back into the database file. Here a second connection does the copying (PASSIVE: it never blocks
the writer, and sqlite3 releases the GIL while it works, so it uses the machine's other core).

A pass starts once the WAL holds `every_frames` frames not yet copied, whatever the size of the commits
that wrote them. Each pass ends in an fsync of the database file (and the writer's catch-up, below, in
another): started every 32 commits, small commits (a 5 ms latency budget: ~6 messages each) paid those
fsyncs every ~200 messages. `bench sqlite -n 50000`, the same minutes: 1,108 msg/s with a P99 of 30.5 ms
every 32 commits, 1,325 msg/s with a P99 of 7.0 ms every 16,384 frames (~64 MB of WAL); at 100
messages a commit, 2,237 against 2,700 msg/s.

A WAL file only rewinds when a write transaction starts with every frame copied, which a busy writer
never sees: its next commit always lands while the thread copies. So the thread passes again over what
was committed during its pass, until little is left (each pass is shorter than the one before), and only
then does the writer copy the few frames committed since (cheap), so that its next transaction rewinds
the WAL. A single pass left the writer copying all the frames of a long pass: at 300k messages, 54 ms
of the writer's time per catch-up. Should
the WAL outgrow `hard_limit_bytes` anyway (readers pinning old frames), the writer runs a TRUNCATE
checkpoint after each commit, so the file shrinks as soon as no reader holds an old snapshot (it does
not wait for readers: a long reader would otherwise stall every commit for the busy timeout).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import struct
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
        every_frames: int = 16384,
        hard_limit_bytes: int = 512 * 1024 * 1024,
        catch_up_frames: int = 256,
        max_passes: int = 8,
    ) -> None:
        self.wal_path = path + "-wal"
        self.shm_path = path + "-shm"
        # Opened once and closed only after every connection: closing any descriptor of a file drops all
        # of this process's POSIX locks on it, SQLite's shared-memory locks included (another process
        # would then rebuild the -shm file under this one's mapping: SIGBUS).
        self._index: int | None = None
        self.every_frames = every_frames
        self.hard_limit_bytes = hard_limit_bytes
        self.catch_up_frames = catch_up_frames
        self.max_passes = max_passes
        self.checkpoints = 0
        self._idle = threading.Event()  # set while no background pass runs
        self._idle.set()
        self._pass_done = False
        self._connection = connect()
        self._wake = threading.Event()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="idstitch-checkpoint", daemon=True)
        self._thread.start()

    @property
    def busy(self) -> bool:
        """Whether a background pass is running."""
        return not self._idle.is_set()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no background pass runs; whether that happened within `timeout` seconds."""
        return self._idle.wait(timeout)

    def after_commit(self, writer: sqlite3.Connection) -> None:
        """Called by the writer after each commit: finish a background pass, or start one, or block."""
        if self._pass_done:
            self._pass_done = False
            # A full disk (the database file must grow) fails it, say: the commit before it landed and
            # must not be reported failed; the frames stay in the WAL until a later pass copies them.
            with contextlib.suppress(sqlite3.Error):
                writer.execute("PRAGMA wal_checkpoint(PASSIVE)")  # only what was committed during the pass
            return
        if self._wal_size() >= self.hard_limit_bytes:
            # TRUNCATE, not RESTART: the file's size is how the next commits tell that it was done. It
            # waits for every reader to leave the WAL, and a reader of another process (a backup, a
            # `sqlite3` shell) may keep its snapshot for minutes: without the busy timeout it copies what
            # it can and gives up at once, and the next commit tries again, instead of each commit
            # stalling for the whole timeout while the WAL grows anyway.
            (timeout,) = writer.execute("PRAGMA busy_timeout").fetchone()
            writer.execute("PRAGMA busy_timeout = 0")
            try:
                writer.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.OperationalError:
                pass  # busy: the next commit tries again
            finally:
                writer.execute(f"PRAGMA busy_timeout = {int(timeout)}")
            return
        if self._idle.is_set() and self._uncopied_frames() >= self.every_frames:
            self._idle.clear()
            self._wake.set()

    def close(self) -> None:
        """Stop the thread and close its connection (the last connection to close checkpoints fully)."""
        self._stopping = True
        self._wake.set()
        self._thread.join()
        self._connection.close()

    def release_index(self) -> None:
        """Close the -shm file; only once every SQLite connection of this process to it is closed."""
        if self._index is not None:
            os.close(self._index)
            self._index = None

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
                self._idle.set()

    def _uncopied_frames(self) -> int:
        """Frames in the WAL not yet copied into the database, from the WAL-index header in the -shm file
        (https://sqlite.org/walformat.html: mxFrame at byte 16, nBackfill at byte 96, native order)."""
        try:
            if self._index is None:
                self._index = os.open(self.shm_path, os.O_RDONLY)
            header = os.pread(self._index, 100, 0)
        except OSError:
            return 0
        if len(header) < 100:
            return 0
        last_frame: int = struct.unpack_from("=I", header, 16)[0]
        copied: int = struct.unpack_from("=I", header, 96)[0]
        return max(0, last_frame - copied)

    def _wal_size(self) -> int:
        try:
            return os.stat(self.wal_path).st_size
        except FileNotFoundError:
            return 0
