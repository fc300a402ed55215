"""The background WAL checkpointer of the SQLite store."""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from idstitch.storage.sqlite_checkpoint import Checkpointer


def connect(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA wal_autocheckpoint=0")
    return connection


def commit_megabyte(writer: sqlite3.Connection, checkpointer: Checkpointer) -> None:
    writer.execute("BEGIN IMMEDIATE")
    writer.executemany("INSERT INTO blobs (data) VALUES (?)", [(os.urandom(1024),) for _ in range(1024)])
    writer.execute("COMMIT")
    checkpointer.after_commit(writer)


@contextmanager
def writer_and_checkpointer(path: Path, **options: int) -> Iterator[tuple[sqlite3.Connection, Checkpointer]]:
    """A writer with a table of blobs and its checkpointer, closed in the store's order."""
    writer = connect(path)
    writer.execute("CREATE TABLE blobs (id INTEGER PRIMARY KEY, data BLOB)")
    checkpointer = Checkpointer(str(path), lambda: connect(path), **options)
    try:
        yield writer, checkpointer
    finally:
        checkpointer.close()
        writer.close()
        checkpointer.release_index()  # after the last connection, as SQLiteStore.close does


def wal_size(path: Path) -> int:
    return Path(f"{path}-wal").stat().st_size


def test_background_passes_keep_the_wal_small_and_the_data_reaches_the_database(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with writer_and_checkpointer(path, every_frames=512, hard_limit_bytes=1 << 40) as (writer, checkpointer):
        for _ in range(24):
            commit_megabyte(writer, checkpointer)
            assert checkpointer.wait_idle(30)  # a slow writer: each pass finishes before the next commit
        assert checkpointer.checkpoints >= 5
        # Without checkpoints the WAL would hold all 24 MB; with them it keeps being rewound.
        assert wal_size(path) < 8 << 20
        assert path.stat().st_size > 16 << 20  # the pages reached the database file
    reopened = sqlite3.connect(path)
    assert reopened.execute("SELECT count(*) FROM blobs").fetchone() == (24 * 1024,)
    reopened.close()


def test_a_pass_waits_for_enough_frames_not_for_a_count_of_commits(tmp_path: Path) -> None:
    """Many small commits do not start a pass (each ends in an fsync); enough frames do, in one commit."""
    path = tmp_path / "db.sqlite"
    with writer_and_checkpointer(path, every_frames=1000, hard_limit_bytes=1 << 40) as (writer, checkpointer):
        for _ in range(100):
            writer.execute("INSERT INTO blobs (data) VALUES (?)", (os.urandom(100),))
            checkpointer.after_commit(writer)
        assert not checkpointer.busy and checkpointer.checkpoints == 0
        assert 100 <= checkpointer._uncopied_frames() < 1000  # read from the WAL index: one frame a commit
        for _ in range(4):
            commit_megabyte(writer, checkpointer)
        assert checkpointer.wait_idle(30)  # enough frames started a pass in one of those commits
        assert checkpointer.checkpoints >= 1


class _DiskFullAtCheckpoint:
    """The writer's connection once the disk is full: a checkpoint must grow the database file, and SQLite
    fails it with SQLITE_FULL (as `PRAGMA wal_checkpoint` does on a full tmpfs)."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def execute(self, sql: str, *parameters: object) -> sqlite3.Cursor:
        if "wal_checkpoint" in sql:
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.execute(sql, *parameters)


def test_a_checkpoint_a_full_disk_fails_does_not_fail_the_commit_before_it(tmp_path: Path) -> None:
    """The writer's catch-up after a background pass runs just after its COMMIT. Before: on a full disk
    it raised, so a batch that was committed was reported failed (serve answered 500 for stored
    messages, `ingest` stopped). Its copying is only to be done later, once there is room."""
    path = tmp_path / "db.sqlite"
    with writer_and_checkpointer(path, every_frames=128, hard_limit_bytes=1 << 40) as (writer, checkpointer):
        commit_megabyte(writer, checkpointer)
        assert checkpointer.wait_idle(30) and checkpointer.checkpoints >= 1
        # A pass ran: the next commit's catch-up is the writer's.
        writer.execute("INSERT INTO blobs (data) VALUES (x'00')")
        checkpointer.after_commit(_DiskFullAtCheckpoint(writer))  # type: ignore[arg-type]
        for _ in range(2):  # space freed: passes go on as before
            commit_megabyte(writer, checkpointer)
            assert checkpointer.wait_idle(30)
        assert writer.execute("SELECT count(*) FROM blobs").fetchone() == (2 * 1024 + 1025,)


def test_past_the_hard_limit_the_writer_truncates_the_wal_itself(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    with writer_and_checkpointer(path, every_frames=10**9, hard_limit_bytes=3 << 20) as (
        writer,
        checkpointer,
    ):
        sizes = []
        for _ in range(12):
            commit_megabyte(writer, checkpointer)
            sizes.append(wal_size(path))
        assert checkpointer.checkpoints == 0  # the thread was never woken: the writer did it
        assert max(sizes) < 5 << 20 and 0 in sizes
        assert writer.execute("SELECT count(*) FROM blobs").fetchone() == (12 * 1024,)


def test_a_long_reader_past_the_hard_limit_does_not_stall_each_commit_for_the_busy_timeout(
    tmp_path: Path,
) -> None:
    """Another process reads one snapshot for minutes (a backup, a `sqlite3` shell) while the WAL is past
    its hard limit. Before: every commit waited the writer's whole busy timeout (30 s in the store) for
    that reader in its TRUNCATE checkpoint, and the WAL grew anyway."""
    path = tmp_path / "db.sqlite"
    with writer_and_checkpointer(path, every_frames=10**9, hard_limit_bytes=2 << 20) as (
        writer,
        checkpointer,
    ):
        writer.execute("PRAGMA busy_timeout = 5000")
        reader = connect(path)
        reader.execute("BEGIN")
        assert reader.execute("SELECT count(*) FROM blobs").fetchone() == (0,)  # holds this snapshot
        started = time.monotonic()
        for _ in range(6):
            commit_megabyte(writer, checkpointer)
        assert time.monotonic() - started < 4  # was 5 s a commit past the limit
        assert wal_size(path) > 5 << 20  # pinned by the reader: nothing to do but wait for it
        assert writer.execute("PRAGMA busy_timeout").fetchone() == (5000,)
        reader.execute("COMMIT")
        reader.close()
        commit_megabyte(writer, checkpointer)
        assert wal_size(path) == 0  # the reader gone, the next commit truncates


class _Cursor:
    def __init__(self, row: tuple[int, int, int]) -> None:
        self.row = row

    def fetchone(self) -> tuple[int, int, int]:
        return self.row


class _ScriptedConnection:
    """Answers each PASSIVE checkpoint with (busy, frames in the WAL, frames copied) from a script."""

    def __init__(self, answers: list[tuple[int, int, int]]) -> None:
        self.answers = answers
        self.calls = 0

    def execute(self, sql: str) -> _Cursor:
        assert sql == "PRAGMA wal_checkpoint(PASSIVE)"
        self.calls += 1
        return _Cursor(self.answers.pop(0))

    def close(self) -> None:
        pass


def _run_one_round(connection: _ScriptedConnection, **options: int) -> Checkpointer:
    checkpointer = Checkpointer(
        "/nonexistent/db.sqlite", lambda: connection, every_frames=0, hard_limit_bytes=1 << 40, **options
    )
    writer = _ScriptedConnection([(0, 10, 10)])  # the writer's catch-up after the round
    checkpointer.after_commit(writer)  # type: ignore[arg-type]
    assert checkpointer.wait_idle(30)  # the round is over, and it told the writer to catch up
    assert checkpointer._pass_done
    checkpointer.after_commit(writer)  # type: ignore[arg-type]
    assert writer.calls == 1
    checkpointer.close()
    return checkpointer


def test_the_thread_passes_again_over_what_a_busy_writer_committed_meanwhile() -> None:
    # 5,000 frames copied while 3,000 more came in; then 2,900 copied while 400 came in; then 100 left.
    connection = _ScriptedConnection([(0, 5000, 2000), (0, 5400, 5000), (0, 5500, 5400), (0, 0, 0)])
    checkpointer = _run_one_round(connection, catch_up_frames=256)
    assert connection.calls == 3 and checkpointer.checkpoints == 3


def test_the_thread_stops_after_max_passes_when_the_writer_outruns_it() -> None:
    connection = _ScriptedConnection([(0, 1000 * n, 500 * n) for n in range(1, 10)])
    checkpointer = _run_one_round(connection, catch_up_frames=256, max_passes=4)
    assert connection.calls == 4 and checkpointer.checkpoints == 4
