"""A store that cannot be written says which file and why, in one line, for a newcomer to fix."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from types import SimpleNamespace

import pytest

from idstitch.core.errors import ConfigError
from idstitch.storage.base import StoreFull
from idstitch.storage.migrations import read_migrations
from idstitch.storage.sqlite import SQLiteStore
from idstitch.storage.urls import open_store, redact_url, without_password

MESSAGE = '{"type": "identify", "userId": "u1", "messageId": "m1", "timestamp": "2026-01-01T00:00:00Z"}\n'


@pytest.fixture
def read_only_folder() -> Iterator[Path]:
    """A folder holding one NDJSON file; `_forbid_writes` then makes it read-only."""
    folder = Path(tempfile.mkdtemp(prefix="idstitch-read-only-"))
    (folder / "events.ndjson").write_text(MESSAGE)
    yield folder
    _allow_writes(folder)
    shutil.rmtree(folder)


# Root writes through permission bits, and CI runs as root: there the folder is made immutable instead.
AS_ROOT = os.geteuid() == 0


def _forbid_writes(folder: Path) -> None:
    if AS_ROOT:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    else:
        folder.chmod(0o555)


def _allow_writes(folder: Path) -> None:
    if AS_ROOT:
        subprocess.run(["chattr", "-i", str(folder)], check=True)
    else:
        folder.chmod(0o755)


def _ingest_without_write_access(folder: Path, store: Path) -> subprocess.CompletedProcess[str]:
    _forbid_writes(folder)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "idstitch",
            "ingest",
            str(folder / "events.ndjson"),
            "--store",
            f"sqlite:///{store}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_a_new_store_in_a_read_only_folder_names_the_file_and_the_folder(read_only_folder: Path) -> None:
    store = read_only_folder / "graph.db"
    done = _ingest_without_write_access(read_only_folder, store)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert line.startswith(f"error: store sqlite:///{store}: unable to open database file")
    assert f"so {read_only_folder.resolve()} must be writable" in line
    assert "\n" not in line


def test_an_existing_store_that_cannot_be_written_says_so_before_writing_anything(
    read_only_folder: Path,
) -> None:
    store = read_only_folder / "graph.db"
    SQLiteStore(store).close()
    before = store.read_bytes()
    done = _ingest_without_write_access(read_only_folder, store)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    line = done.stderr.strip()
    assert line.startswith(f"error: store sqlite:///{store}: ")
    assert "readonly" in line or "unable to open" in line
    assert f"so {read_only_folder.resolve()} must be writable" in line
    assert store.read_bytes() == before


def test_a_directory_given_as_the_store_is_called_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"{tmp_path} is a directory"):
        SQLiteStore(tmp_path)


def test_a_store_under_a_file_says_that_file_is_no_directory(tmp_path: Path) -> None:
    """Before: `--store sqlite:///notes.txt/x.db` said `error: File exists: notes.txt`."""
    (tmp_path / "notes.txt").write_text("")
    store = tmp_path / "notes.txt" / "x.db"
    with pytest.raises(ConfigError) as raised:
        SQLiteStore(store)
    assert str(raised.value) == (
        f"store sqlite:///{store}: cannot create its folder {store.parent}: {tmp_path / 'notes.txt'} is a file"
    )


@pytest.mark.parametrize(
    ("url", "needle"),
    [("sqlite:///", "names no file"), ("sqlite:///./x.db?mode=ro", "query parameters are not supported")],
)
def test_a_sqlite_url_without_a_file_or_with_parameters_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, url: str, needle: str
) -> None:
    # Before: the first opened a private temporary database (ingest said "accepted", then all was gone),
    # the second created a file literally named "x.db?mode=ro".
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=needle):
        open_store(url)
    assert list(tmp_path.iterdir()) == []


def test_processes_opening_a_new_store_together_all_open_it(tmp_path: Path) -> None:
    """`idstitch serve` and `idstitch ingest` started together on a new file: each applies or skips each
    migration under the write lock. Before: the losers failed with `table spaces already exists`."""
    opener = (
        f"from idstitch.storage.sqlite import SQLiteStore; SQLiteStore({str(tmp_path / 'new.db')!r}).close()"
    )
    processes = [
        subprocess.Popen([sys.executable, "-c", opener], stderr=subprocess.PIPE, text=True) for _ in range(4)
    ]
    failures = [
        error for process in processes if (error := process.communicate(timeout=60)[1]) and process.returncode
    ]
    assert failures == []
    store = SQLiteStore(tmp_path / "new.db", read_only=True)
    try:
        assert store.schema_version() == read_migrations("sqlite")[-1][0]
    finally:
        store.close()


def test_a_store_a_newer_idstitch_migrated_is_refused_for_writing_and_reading(tmp_path: Path) -> None:
    """Before: the writer opened it and wrote as if nothing had changed; a reader told the user to open it
    for writing "to migrate it", which an older build cannot do."""
    path = tmp_path / "newer.db"
    SQLiteStore(path).close()
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("INSERT INTO schema_migrations VALUES (99, 'future', datetime('now'))")
    for read_only in (False, True):
        with pytest.raises(
            ConfigError, match=r"schema version 99, newer than this build's \d+: .* upgrade idstitch"
        ):
            SQLiteStore(path, read_only=read_only)
    with closing(sqlite3.connect(path)) as db:
        assert db.execute("SELECT count(*) FROM spaces").fetchone() == (0,)


def test_migration_0004_reads_back_what_the_events_tell_for_certain_and_leaves_the_rest_null(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Stores of the first release (schema 1) kept no first attachment per identifier and no source per
    trait. Before: null in the Profile API and graph for all their rows, though their events say it."""
    path = tmp_path / "first.db"
    migrations = read_migrations("sqlite")
    with monkeypatch.context() as patch:
        patch.setattr("idstitch.storage.sqlite.read_migrations", lambda adapter: migrations[:1])
        SQLiteStore(path).close()
    with closing(sqlite3.connect(path)) as db, db:
        db.executemany(
            "INSERT INTO profiles VALUES ('s', ?, 'users', ?, 0, 'm1', NULL, 0)",
            [("use_a", None), ("use_b", "use_a")],  # use_b merged into use_a
        )
        db.executemany(
            "INSERT INTO events VALUES (?, 's', ?, 'identify', NULL, ?, 0, ?, ?, NULL, ?, x'7b7d')",
            [
                (1, "m1", 1, "web", "use_b", '["user_id:u1"]'),  # attached u1 to the profile merged since
                (2, "m2", 2, "ios", "use_a", '["user_id:u1","email:e@x.io"]'),
                (3, "m3", 3, "web", "use_a", '["anonymous_id:a1"]'),  # dropped a1
                (4, "m4", 4, "ios", "use_a", '["anonymous_id:a1"]'),
                (5, "m5", 5, "web", "use_a", "[]"),  # two sources at one instant
                (6, "m6", 5, "ios", "use_a", "[]"),
            ],
        )
        db.executemany(
            "INSERT INTO identifiers VALUES ('s', 'users', ?, ?, 'use_a', 0, 0, 0, NULL, NULL, NULL)",
            [("user_id", "u1"), ("email", "e@x.io"), ("anonymous_id", "a1"), ("crm:x", "1"), ("crm", "x:1")],
        )  # the first release took a type with a ':': two identifiers that read alike as type:value
        db.execute("INSERT INTO dropped VALUES (1, 's', 'use_a', 'm3', 'anonymous_id:a1', 'limit', 3)")
        db.executemany("INSERT INTO traits VALUES ('s', 'use_a', ?, '\"x\"', ?)", [("plan", 2), ("name", 5)])
    store = SQLiteStore(path)
    try:
        assert {
            (item.type, item.first_message_id, item.source) for item in store.identifiers("s", "use_a")
        } == {
            ("user_id", "m1", "web"),
            ("email", "m2", "ios"),
            ("anonymous_id", "m4", "ios"),
            ("crm:x", None, None),
            ("crm", None, None),
        }
        assert {item.key: item.source for item in store.trait_records("s", "use_a")} == {
            "plan": "ios",
            "name": None,
        }
    finally:
        store.close()


def test_a_file_that_is_not_a_sqlite_database_is_named(tmp_path: Path) -> None:
    """Before: `error: store: file is not a database`, which could be any file of the command line."""
    path = tmp_path / "notes.db"
    path.write_text("these are my notes, not a database\n" * 100)
    for read_only in (False, True):
        with pytest.raises(ConfigError, match=f"^store sqlite:///{path}: file is not a database$"):
            SQLiteStore(path, read_only=read_only)
    assert path.read_text().startswith("these are my notes")


def test_a_store_that_cannot_be_opened_on_a_full_disk_says_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk even reading commands fail: SQLite must create the store's -shm file beside it.
    Before: `error: store …: disk I/O error` (exit 2), which reads like a broken disk, for `idstitch
    stats` or `profile` as for `ingest` and `serve`."""
    (tmp_path / "graph.db-shm").mkdir()  # SQLite cannot make its -shm file, as on a full disk
    monkeypatch.setattr(shutil, "disk_usage", lambda path: SimpleNamespace(free=8192))
    with pytest.raises(StoreFull) as raised:
        SQLiteStore(tmp_path / "graph.db")
    assert str(raised.value).endswith(
        f"(the disk holding {tmp_path} is full: 8,192 bytes free; SQLite needs room for the file and "
        "its -wal and -shm files beside it)"
    )


def test_a_full_disk_at_start_up_exits_1_as_a_full_disk_mid_run_does(tmp_path: Path) -> None:
    """README: exit 1 when the store could not be written (a full disk), 2 for usage and configuration
    errors. Before: a full disk found when the store is opened (an `ingest` or `serve` started on it)
    exited 2, as for a wrong argument; mid-run the same disk gave 1."""
    SQLiteStore(tmp_path / "graph.db").close()  # a store, then its disk fills up
    for leftover in ("graph.db-wal", "graph.db-shm"):
        (tmp_path / leftover).unlink(missing_ok=True)
    (tmp_path / "graph.db-shm").mkdir()  # SQLite cannot make its -shm file, as on a full disk
    probe = (
        "import shutil, sys, types\n"
        "shutil.disk_usage = lambda path: types.SimpleNamespace(free=8192)\n"
        "from idstitch.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "ingest", "-", "--store", f"sqlite:///{tmp_path}/graph.db"],
        input="",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1, done.stderr
    assert (
        done.stderr.startswith(f"error: store sqlite:///{tmp_path}/graph.db: ")
        and done.stderr.count("\n") == 1
    )
    assert f"(the disk holding {tmp_path} is full: 8,192 bytes free;" in done.stderr


def test_a_mistyped_scheme_never_echoes_the_url_s_password() -> None:
    """Before: `store URL 'postgresq://app:S3CRETPW@db:5432/x': unknown scheme`."""
    with pytest.raises(ConfigError) as refused:
        open_store("postgresq://app:S3CRETPW@db:5432/x")
    assert "S3CRETPW" not in str(refused.value) and "postgresq://app:…@db:5432/x" in str(refused.value)
    assert redact_url("postgresql://app@db/x?sslmode=disable&password=S3CRETPW") == (
        "postgresql://app@db/x?sslmode=disable&password=…"
    )
    # libpq's sslpassword unlocks the client key: as secret (before: printed as given).
    assert redact_url("postgresql://app@db/x?sslpassword=S3CRETPW&sslmode=verify-full") == (
        "postgresql://app@db/x?sslpassword=…&sslmode=verify-full"
    )
    assert without_password(
        "bad URL: sslpassword=S3CRETPW", "postgresql://app@db/x?sslpassword=S3CRETPW"
    ) == ("bad URL: sslpassword=…")
