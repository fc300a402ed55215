"""The SQLite store: the embedded default. WAL, one writer, durable group commit per batch."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import sqlite3
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec

from idstitch.core.errors import ConfigError
from idstitch.core.graph import GraphView
from idstitch.core.identifiers import Dropped, Identifier
from idstitch.core.resolve import Resolution
from idstitch.storage.base import (
    DroppedRecord,
    EventQuery,
    EventRecord,
    EventResolution,
    IdentifierRecord,
    IntegrityError,
    LinkRecord,
    MergeRecord,
    ProfileActivity,
    ProfileRecord,
    SourceRecord,
    SpaceStats,
    StoreConflict,
    StoreFull,
    StoreUnavailable,
    StoreWriteFailed,
    SuspectRecord,
    TokenRecord,
    TraitRecord,
)
from idstitch.storage.graph_cache import (
    DEFAULT_MAX_IDENTIFIERS,
    GraphCache,
    GraphCacheReader,
    IdentifierEntry,
    IdentifierKey,
    ProfileEntry,
    newest_pairs,
    refreshed_rows,
    seen_together,
)
from idstitch.storage.migrations import read_migrations, refuse_newer_schema, refuse_older_schema
from idstitch.storage.rows import (
    BLOCKED_VALUES_SQL,
    DUMP_QUERIES,
    EVENT_COLUMNS,
    EVENT_INSERT_COLUMNS,
    EVENT_RESOLUTIONS_SQL,
    EVENTS_PAGE,
    INSERT_TOKEN_SQL,
    TOKEN_OF_KIND_SQL,
    dropped_record,
    event_record,
    event_resolution,
    event_row,
    identifier_record,
    merge_record,
    suspect_record,
    trait_record,
)
from idstitch.storage.sqlite_checkpoint import Checkpointer
from idstitch.storage.times import from_micros, to_micros

__all__ = ["SQLiteStore", "SQLiteTransaction"]

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


_BUSY_TIMEOUT_SECONDS = 30  # how long a connection waits for another process's write lock
# In a merge's trait upsert: the child's value (excluded) was set by a message ingested after the parent's.
# A message of this transaction has no event row yet (events go in at flush): it ranks after every stored
# one, in the order of the parameter (a JSON array of this transaction's trait-setting message ids). NULL
# when either message is unknown (rows from before migration 0003), so the parent keeps its value.
_INGESTED_ORDER = (
    "coalesce((SELECT sequence FROM events WHERE space = excluded.space AND message_id = {column}), "
    "9000000000000000000 + (SELECT max(key) FROM json_each(?) WHERE value = {column}))"
)
_INGESTED_LATER = f"{_INGESTED_ORDER.format(column='excluded.message_id')} > {_INGESTED_ORDER.format(column='traits.message_id')}"


def _connect(target: str, uri: bool, cache_mb: int = 64) -> sqlite3.Connection:
    connection = sqlite3.connect(
        target, uri=uri, isolation_level=None, check_same_thread=False, timeout=_BUSY_TIMEOUT_SECONDS
    )
    connection.execute("PRAGMA journal_mode=WAL")
    # FULL: a commit is on disk before ingest reports success; batches amortise the fsync.
    connection.execute("PRAGMA synchronous=FULL")
    connection.execute("PRAGMA foreign_keys=OFF")
    connection.execute(f"PRAGMA cache_size=-{cache_mb * 1024}")
    connection.execute("PRAGMA temp_store=MEMORY")
    return connection


def _identity(path: str) -> tuple[int, int] | None:
    """The (device, inode) of the file at `path`, None when there is none."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    return (found.st_dev, found.st_ino)


def _load_suspects(db: sqlite3.Connection) -> set[IdentifierKey]:
    """Every suspect identifier of every space, as the cache keys them."""
    return {
        (row[0], row[1], row[2], row[3])
        for row in db.execute("SELECT space, collection, type, value FROM suspects")
    }


DEFAULT_PAGE_CACHE_MB = 256
# Below this much free space an open that failed is blamed on the disk: a new store's first pages, its
# WAL and its 32 KB -shm file need about that much.
_FULL_DISK_BYTES = 1 << 20


def _open_failure(url: str, path: str, error: sqlite3.DatabaseError) -> ConfigError | StoreFull:
    """Why a store could not be opened, naming the file (SQLite's own message names nothing).

    A full disk is StoreFull, as when a write finds it mid-run (exit 1: free space and run again),
    not a configuration error (exit 2).
    """
    text = f"store {url}: {error}"
    folder = Path(path).resolve().parent
    try:
        free: int | None = shutil.disk_usage(folder).free
    except OSError:
        free = None
    if Path(path).is_dir():
        text += f" ({path} is a directory)"
    elif free is not None and free < _FULL_DISK_BYTES:
        # SQLite says `disk I/O error` (it cannot map its -shm file), which reads like a broken disk.
        return StoreFull(
            f"{text} (the disk holding {folder} is full: {free:,} bytes free; SQLite needs room for the "
            "file and its -wal and -shm files beside it)"
        )
    elif "readonly" in str(error) or "unable to open" in str(error):
        text += (
            f" ({path}: SQLite needs to write the file and its -wal and -shm files beside it, "
            f"so {folder} must be writable)"
        )
    return ConfigError(text)


def _make_folder(url: str, folder: Path) -> None:
    """Create a new store's missing folders, or say which one cannot be made and why."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        # mkdir names the path it tried ("File exists: notes.txt" for notes.txt/x.db), not the problem.
        blocker = next(
            (path for path in (folder, *folder.parents) if path.exists() and not path.is_dir()), None
        )
        reason = f"{blocker} is a file" if blocker is not None else error.strerror or str(error)
        raise ConfigError(f"store {url}: cannot create its folder {folder}: {reason}") from None


def _create_private(path: str) -> None:
    """Create a new store file readable by its owner only: it keeps write keys, tokens and profiles.

    SQLite gives its -wal and -shm files the permissions of the database file, so they follow. Any
    other failure (a directory without write rights) is left for SQLite to report, as it always has.
    """
    with contextlib.suppress(OSError):
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))


class SQLiteStore:
    """A store in one SQLite file (`sqlite:///path.db`) or in memory (`sqlite://`)."""

    def __init__(
        self,
        path: str | Path,
        url: str | None = None,
        cache_size: int = DEFAULT_MAX_IDENTIFIERS,
        page_cache_mb: int = DEFAULT_PAGE_CACHE_MB,
        *,
        read_only: bool = False,
    ) -> None:
        self.path = str(path)
        self.url = url or f"sqlite:///{self.path}"
        self._memory = self.path in ("", ":memory:")
        if self._memory:
            # One shared in-memory database per store, readable from every thread.
            self._target, self._uri = f"file:idstitch_{secrets.token_hex(8)}?mode=memory&cache=shared", True
        else:
            if not read_only:  # reading creates nothing, not even a folder
                _make_folder(self.url, Path(self.path).parent)
            self._target, self._uri = self.path, False
        self.read_only = read_only
        if read_only and self._memory:
            raise ConfigError(
                "a read-only store needs a SQLite file: a memory database is private to its process"
            )
        if read_only and not Path(self.path).is_file():
            raise ConfigError(f"store {self.url} does not exist")
        if not self._memory and not read_only:
            _create_private(self.path)
        # Reentrant: a memory database's snapshot holds it, and reads under it may meet a write.
        self._write_lock = threading.RLock()
        self._cache = GraphCache(cache_size)
        self._data_version: int | None = None
        self._local = threading.local()
        self._readers: list[sqlite3.Connection] = []
        self._checkpointer: Checkpointer | None = None
        self.migrated_from: int | None = None
        try:
            # The writer's page cache holds the hot B-tree pages of the indexes every message touches.
            self._writer = _connect(self._target, self._uri, 8 if read_only else page_cache_mb)
            if read_only:
                self._check_schema()  # a reader never migrates: the writing process does that
            else:
                self._migrate()
        except sqlite3.DatabaseError as error:  # unable to open, or not a SQLite database at all
            raise _open_failure(self.url, self.path, error) from error
        # The file this store opened, as (device, inode): a file deleted or replaced under a running
        # process keeps taking writes into the old inode, lost once the process stops.
        self._identity = None if self._memory else _identity(self.path)
        if not self._memory and not read_only:
            self._writer.execute("PRAGMA wal_autocheckpoint=0")
            self._checkpointer = Checkpointer(self.path, lambda: _connect(self._target, self._uri))

    # -- connections --------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        if self._memory:
            return self._writer  # shared-cache memory databases read best through the one connection
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            connection = _connect(self._target, self._uri)
            self._local.connection = connection
            self._readers.append(connection)
        return connection

    def close(self) -> None:
        """Close every connection."""
        for connection in self._readers:
            connection.close()
        self._readers.clear()
        if self._checkpointer is not None:
            self._checkpointer.close()
        self._writer.close()
        if self._checkpointer is not None:
            self._checkpointer.release_index()  # after the last connection (see release_index)

    def _migrate(self) -> None:
        with self._write_lock:
            db = self._writer
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )
            migrations = read_migrations("sqlite")
            newest = db.execute("SELECT max(version) FROM schema_migrations").fetchone()[0]
            refuse_newer_schema(self.url, int(newest or 0), migrations[-1][0])
            self.migrated_from = None if self._memory else int(newest or 0)
            applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            for version, name, script in migrations:
                if version in applied:
                    continue
                db.execute("BEGIN IMMEDIATE")
                try:
                    # Read again under the write lock: processes opening a new store together (`serve`
                    # and an `ingest`) each find a migration applied by whoever took the lock first.
                    if db.execute("SELECT 1 FROM schema_migrations WHERE version = ?", (version,)).fetchone():
                        db.execute("COMMIT")
                        continue
                    for statement in script.split(";\n"):
                        if statement.strip():
                            db.execute(statement)
                    db.execute(
                        "INSERT INTO schema_migrations VALUES (?, ?, datetime('now'))", (version, name)
                    )
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise

    def _check_schema(self) -> None:
        latest = read_migrations("sqlite")[-1][0]
        try:
            version = self.schema_version()
        except sqlite3.OperationalError:
            version = 0
        refuse_newer_schema(self.url, version, latest)
        refuse_older_schema(self.url, version, latest)

    def schema_version(self) -> int:
        """The newest applied migration."""
        row = self._reader().execute("SELECT max(version) FROM schema_migrations").fetchone()
        return int(row[0] or 0)

    # -- writes ------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[SQLiteTransaction]:
        """One write transaction (BEGIN IMMEDIATE … COMMIT); the only writer while it is open."""
        if self.read_only:
            raise ConfigError(f"store {self.url} was opened read-only")
        with self._write_lock:
            db = self._writer
            if self._identity is not None and _identity(self.path) != self._identity:
                # SQLite (WAL mode) writes on into the deleted inode: every commit would be acknowledged
                # and then lost with the file when the process stops.
                raise StoreUnavailable(
                    f"store {self.url}: its file was deleted or replaced while idstitch had it open; "
                    "writes are refused, as they would be lost with the old file: restart idstitch to "
                    "open the file now at that path"
                )
            try:
                db.execute("BEGIN IMMEDIATE")
            except sqlite3.OperationalError as error:
                if error.sqlite_errorcode & 0xFF == sqlite3.SQLITE_BUSY:  # busy, whatever the extended code
                    # Another process (an `idstitch ingest` beside `serve`) kept the write lock for the
                    # whole busy timeout: a conflict, which the engine runs again for a while.
                    raise StoreConflict(
                        f"store {self.url} is locked: another process kept its write lock past the "
                        f"{_BUSY_TIMEOUT_SECONDS} s wait"
                    ) from error
                if "readonly" not in str(error):
                    raise
                raise _open_failure(self.url, self.path, error) from error
            cache = self._cache
            try:
                version = db.execute("PRAGMA data_version").fetchone()[0]
                if version != self._data_version:
                    cache.invalidate()  # another connection committed: what we hold may be stale
                    self._data_version = version
                if cache.over_bound():
                    cache.clear()
                if not cache.loaded:
                    self._load_cache(db, cache)
                writes = cache.writes
                transaction = SQLiteTransaction(db, cache)
                yield transaction
                transaction.flush()
                db.execute("COMMIT")
            except BaseException as error:
                # A full disk or an I/O error (SQLITE_FULL, SQLITE_IOERR), in a statement or in the
                # COMMIT, has SQLite roll the transaction back itself; a ROLLBACK then would fail and
                # hide why. Either way nothing of it is stored, so nothing of it may stay cached.
                if db.in_transaction:
                    db.execute("ROLLBACK")
                if cache.writes != writes:
                    cache.invalidate()
                if isinstance(error, sqlite3.OperationalError):
                    code = getattr(error, "sqlite_errorcode", 0) & 0xFF
                    if code == sqlite3.SQLITE_FULL:
                        raise StoreFull(f"store {self.url}: the disk is full ({error})") from error
                    if code == sqlite3.SQLITE_IOERR:
                        # EDQUOT and EFBIG are no SQLITE_FULL to SQLite (only ENOSPC is).
                        raise StoreWriteFailed(
                            f"store {self.url}: its files could not be written ({error}): "
                            "a full quota, a file size limit or a failing disk"
                        ) from error
                raise
            if self._checkpointer is not None:
                self._checkpointer.after_commit(db)

    def _load_cache(self, db: sqlite3.Connection, cache: GraphCache) -> None:
        """Suspects always; the whole graph too while it fits the bound (then misses mean "absent")."""
        cache.suspects = _load_suspects(db)
        cache.loaded = True
        count = db.execute("SELECT count(*) FROM identifiers").fetchone()[0]
        if count > cache.max_identifiers // 2:
            return
        for row in db.execute(
            "SELECT space, segment_id, collection, created_at, merge_count, parent_id FROM profiles"
        ):
            cache.profiles[(row[0], row[1])] = ProfileEntry(row[2], row[3], row[4], row[5])
        children: dict[tuple[str, str], list[str]] = {}
        for (space, segment_id), entry in cache.profiles.items():
            if entry.parent_id is not None:
                children.setdefault((space, entry.parent_id), []).append(segment_id)
        for parent, ids in children.items():
            cache.profiles[parent].children = tuple(ids)
        for row in db.execute(
            "SELECT space, collection, type, value, profile_id, first_seen, last_seen, retired, device_owner, "
            "device_owner_at FROM identifiers"
        ):
            key = (row[0], row[1], row[2], row[3])
            cache.identifiers[key] = IdentifierEntry(row[4], row[5], row[6], bool(row[7]), row[8], row[9])
            cache.profiles[(row[0], row[4])].members[key] = None
        for row in db.execute(
            "SELECT space, collection, type, value, other_type, other_value, last_seen FROM evidence"
        ):
            cache.evidence.setdefault((row[0], row[1], row[2], row[3]), {})[(row[4], row[5])] = row[6]
        cache.complete = True

    def ensure_space(self, space: str) -> None:
        """Create the space if new."""
        with self.transaction() as transaction:
            transaction.db.execute(
                "INSERT OR IGNORE INTO spaces VALUES (?, strftime('%s','now') * 1000000)", (space,)
            )

    def upsert_source(self, source: SourceRecord, *, replace: bool = True) -> None:
        """Create or update a source (or keep an existing one)."""
        update = "UPDATE SET write_key = excluded.write_key" if replace else "NOTHING"
        with self.transaction() as transaction:
            transaction.db.execute(
                f"INSERT INTO sources VALUES (?, ?, ?) ON CONFLICT (space, name) DO {update}",
                (source.space, source.name, source.write_key),
            )

    def unmark_declared(self, space: str, identifiers: Sequence[Identifier]) -> None:
        """Remove the declared (not the detected) marks of these identifiers."""
        if not identifiers:
            return
        with self.transaction() as transaction:
            removed = [
                item
                for item in identifiers
                if transaction.db.execute(
                    "DELETE FROM suspects WHERE space = ? AND collection = ? AND type = ? AND value = ? "
                    "AND evidence_type = 'declared'",
                    (space, item.collection, item.type, item.value),
                ).rowcount
            ]
            cache = transaction.cache
            for item in removed:
                cache.suspects.discard((space, item.collection, item.type, item.value))
            cache.writes += len(removed)  # a rollback reloads the suspects from the database

    def upsert_token(self, token: TokenRecord) -> None:
        """Create a token or change its space or kind."""
        with self.transaction() as transaction:
            transaction.db.execute(
                "INSERT INTO tokens (token, space, kind) VALUES (?, ?, ?) "
                "ON CONFLICT (token) DO UPDATE SET space = excluded.space, kind = excluded.kind",
                (token.token, token.space, token.kind),
            )

    def first_token(self, token: TokenRecord) -> TokenRecord:
        """Store `token` unless its space has one of its kind (BEGIN IMMEDIATE: one writer at a time)."""
        with self.transaction() as transaction:
            row = transaction.db.execute(
                TOKEN_OF_KIND_SQL.format(p="?"), (token.space, token.kind)
            ).fetchone()
            if row is not None:
                return TokenRecord(token.space, row[0], token.kind)
            transaction.db.execute(INSERT_TOKEN_SQL.format(p="?"), (token.token, token.space, token.kind))
        return token

    # -- reads -------------------------------------------------------------------------------
    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads of this thread inside see one committed moment: one read transaction (WAL keeps it)."""
        local = self._local
        if getattr(local, "snapshot", False):
            yield  # nested: the outer snapshot's moment
            return
        if self._memory:
            # Reads share the writer's connection, which sees its open transaction half done: wait for it.
            with self._write_lock:
                local.snapshot = True
                try:
                    yield
                finally:
                    local.snapshot = False
            return
        db = self._reader()
        # Deferred: the first read fixes the moment, and every later one of this thread reads it too.
        db.execute("BEGIN")
        local.snapshot = True
        try:
            yield
        finally:
            local.snapshot = False
            if db.in_transaction:
                db.execute("ROLLBACK")  # nothing was written: only the snapshot ends

    def spaces(self) -> list[str]:
        """Every space."""
        return [row[0] for row in self._reader().execute("SELECT name FROM spaces ORDER BY name")]

    def sources(self) -> list[SourceRecord]:
        """Every source."""
        rows = self._reader().execute("SELECT space, name, write_key FROM sources ORDER BY space, name")
        return [SourceRecord(*row) for row in rows]

    def tokens(self) -> list[TokenRecord]:
        """Every token, by space and token."""
        rows = self._reader().execute("SELECT space, token, kind FROM tokens ORDER BY space, token")
        return [TokenRecord(*row) for row in rows]

    def learned_types(self, space: str) -> list[tuple[str, str]]:
        """Custom types of a space, first seen first."""
        rows = self._reader().execute(
            "SELECT type, collection FROM learned_types WHERE space = ? ORDER BY position", (space,)
        )
        return [(row[0], row[1]) for row in rows]

    def find_profile(self, space: str, identifier: Identifier) -> str | None:
        """Root owning an identifier."""
        row = (
            self._reader()
            .execute(
                "SELECT profile_id FROM identifiers WHERE space = ? AND collection = ? AND type = ? AND value = ?",
                (space, identifier.collection, identifier.type, identifier.value),
            )
            .fetchone()
        )
        return None if row is None else str(row[0])

    def resolve_segment_id(self, space: str, segment_id: str) -> str | None:
        """Root of a segment id."""
        row = (
            self._reader()
            .execute(
                "SELECT coalesce(parent_id, segment_id) FROM profiles WHERE space = ? AND segment_id = ?",
                (space, segment_id),
            )
            .fetchone()
        )
        return None if row is None else str(row[0])

    def profile(self, space: str, segment_id: str) -> ProfileRecord | None:
        """A root profile with its merged children's ids."""
        with self.snapshot():
            db = self._reader()
            row = db.execute(
                "SELECT segment_id, collection, created_at, merge_count, created_by FROM profiles "
                "WHERE space = ? AND segment_id = ? AND parent_id IS NULL",
                (space, segment_id),
            ).fetchone()
            if row is None:
                return None
            children = db.execute(
                # Without INDEXED BY, the ORDER BY makes SQLite walk every profile of the space instead.
                "SELECT segment_id FROM profiles INDEXED BY profiles_by_parent WHERE space = ? AND parent_id = ? "
                "ORDER BY created_at, segment_id",
                (space, segment_id),
            )
            return ProfileRecord(
                row[0], row[1], from_micros(row[2]), row[3], tuple(child[0] for child in children), row[4]
            )

    def identifiers(self, space: str, profile_id: str) -> list[IdentifierRecord]:
        """Identifiers of a root, first seen first."""
        rows = self._reader().execute(
            "SELECT i.type, i.value, i.collection, i.first_seen, i.last_seen, i.retired, s.type IS NOT NULL, "
            "i.source, i.first_message_id FROM identifiers i INDEXED BY identifiers_by_profile "
            "LEFT JOIN suspects s ON s.space = i.space "
            "AND s.collection = i.collection AND s.type = i.type AND s.value = i.value "
            "WHERE i.space = ? AND i.profile_id = ? ORDER BY i.first_seen, i.type, i.value",
            (space, profile_id),
        )
        return [identifier_record(row) for row in rows]

    def traits(self, space: str, profile_id: str) -> dict[str, Any]:
        """Current traits of a root."""
        rows = self._reader().execute(
            "SELECT key, value FROM traits WHERE space = ? AND profile_id = ? AND value IS NOT NULL "
            "ORDER BY key",
            (space, profile_id),
        )
        return {row[0]: _json_decode(row[1]) for row in rows}

    def trait_records(
        self,
        space: str,
        profile_id: str,
        *,
        after: str = "",
        include: Sequence[str] = (),
        limit: int | None = None,
    ) -> list[TraitRecord]:
        """Current traits of a root with their source and time, by key (a page of them)."""
        named = " AND key IN (SELECT value FROM json_each(?))" if include else ""
        parameters: list[Any] = [space, profile_id, after]
        if include:
            parameters.append(_json_encode(list(include)).decode())
        rows = self._reader().execute(
            "SELECT key, value, source, set_at FROM traits WHERE space = ? AND profile_id = ? "
            f"AND value IS NOT NULL AND key >= ?{named} ORDER BY key LIMIT ?",
            (*parameters, -1 if limit is None else limit),
        )
        return [trait_record(row) for row in rows]

    def activity(self, space: str, profile_id: str) -> ProfileActivity:
        """The creating message of a root and the last message ingested for its family."""
        with self.snapshot():
            db = self._reader()
            row = db.execute(
                "SELECT p.created_by, e.source FROM profiles p LEFT JOIN events e "
                "ON e.space = p.space AND e.message_id = p.created_by WHERE p.space = ? AND p.segment_id = ?",
                (space, profile_id),
            ).fetchone()
            first, first_source = (None, None) if row is None else (row[0], row[1])
            family = self._family(db, space, profile_id)
            column = self._family_column(db, space, profile_id)
            marks = ",".join("?" * len(family))
            # max() reads only the profile index (it holds the sequence, the rowid); ORDER BY sequence DESC
            # LIMIT 1 could walk the whole table backwards from the newest event.
            last = db.execute(
                "SELECT message_id, source, received_at FROM events WHERE sequence = "
                f"(SELECT max(sequence) FROM events WHERE space = ? AND {column} IN ({marks}))",
                (space, *family),
            ).fetchone()
            if last is None:
                return ProfileActivity(first, first_source, None, None, None)
            return ProfileActivity(first, first_source, last[0], last[1], from_micros(last[2]))

    def _family(self, db: sqlite3.Connection, space: str, profile_id: str) -> list[str]:
        children = db.execute(
            "SELECT segment_id FROM profiles WHERE space = ? AND parent_id = ?", (space, profile_id)
        )
        return [profile_id, *(row[0] for row in children)]

    def _family_column(self, db: sqlite3.Connection, space: str, profile_id: str) -> str:
        row = db.execute(
            "SELECT collection FROM profiles WHERE space = ? AND segment_id = ?", (space, profile_id)
        ).fetchone()
        return "account_id" if row is not None and row[0] == "accounts" else "profile_id"

    def event_count(self, space: str, profile_id: str) -> int:
        """Events of a root's family."""
        with self.snapshot():
            db = self._reader()
            family = self._family(db, space, profile_id)
            column = self._family_column(db, space, profile_id)
            marks = ",".join("?" * len(family))
            row = db.execute(
                f"SELECT count(*) FROM events WHERE space = ? AND {column} IN ({marks})", (space, *family)
            ).fetchone()
            return int(row[0])

    def events(
        self, space: str, profile_id: str, *, limit: int = 10, after_sequence: int | None = None
    ) -> list[EventRecord]:
        """Events of a root's family, newest ingested first; page with the last sequence seen."""
        with self.snapshot():
            db = self._reader()
            family = self._family(db, space, profile_id)
            column = self._family_column(db, space, profile_id)
            marks = ",".join("?" * len(family))
            cursor = "" if after_sequence is None else " AND sequence < ?"
            parameters: list[Any] = [space, *family]
            if after_sequence is not None:
                parameters.append(after_sequence)
            rows = db.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE space = ? AND {column} IN ({marks}){cursor} "
                "ORDER BY sequence DESC LIMIT ?",
                (*parameters, limit),
            )
            return [event_record(row) for row in rows]

    def event_page(self, space: str, profile_id: str, query: EventQuery) -> list[EventRecord]:
        """A page of a root family's events by (timestamp, message_id), after the query's cursor."""
        with self.snapshot():
            if query.limit == 0:
                return []
            db = self._reader()
            family = self._family(db, space, profile_id)
            column = self._family_column(db, space, profile_id)
            direction, beyond = ("DESC", "<") if query.descending else ("ASC", ">")
            conditions = [f"space = ? AND {column} = ?"]
            parameters: list[Any] = []
            if query.after is not None:
                conditions.append(f"(timestamp, message_id) {beyond} (?, ?)")
                parameters += [to_micros(query.after[0]), query.after[1]]
            if query.start is not None:
                conditions.append("timestamp >= ?")
                parameters.append(to_micros(query.start))
            if query.end is not None:
                conditions.append("timestamp < ?")
                parameters.append(to_micros(query.end))
            if query.include:
                conditions.append(f"name IN ({','.join('?' * len(query.include))})")
                parameters += sorted(query.include)
            if query.exclude:
                conditions.append(f"(name IS NULL OR name NOT IN ({','.join('?' * len(query.exclude))}))")
                parameters += sorted(query.exclude)
            # One query per family member, not one with `IN`: each walks its profile's index in timestamp
            # order and stops after `limit` rows (ties sorted on the spot), where `IN` would read and sort
            # every event of the family. A family is the root and its merged children: a few queries.
            sql = (
                f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(conditions)} "
                f"ORDER BY timestamp {direction}, message_id {direction} LIMIT ?"
            )
            rows: list[Sequence[Any]] = []
            for member in family:
                rows += db.execute(sql, (space, member, *parameters, query.limit)).fetchall()
            rows.sort(key=lambda row: (row[3], row[0]), reverse=query.descending)
            return [event_record(row) for row in (rows if query.limit < 0 else rows[: query.limit])]

    def links(self, space: str, profile_id: str, *, limit: int | None = None) -> list[str]:
        """Roots of the other collection linked to a root, oldest link first."""
        return [item.segment_id for item in self.link_records(space, profile_id, limit=limit)]

    def link_records(
        self,
        space: str,
        profile_id: str,
        *,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[LinkRecord]:
        """Roots of the other collection linked to a root, with the time of the first link (a page)."""
        with self.snapshot():
            db = self._reader()
            own, column = self._link_columns(db, space, profile_id)
            # An account's links are read by their index, which is in page order (at, user_id): a page of an
            # account with 200,000 users reads that page. Without INDEXED BY SQLite walks every link of the
            # space.
            indexed = " INDEXED BY links_by_account" if own == "account_id" else ""
            parameters: list[Any] = [space, profile_id]
            beyond = ""
            if after is not None:
                beyond = f" AND (at, {column}) > (?, ?)"
                parameters += [to_micros(after[0]), after[1]]
            parameters.append(-1 if limit is None else limit)
            sql = (
                f"SELECT {column}, at FROM links{indexed} WHERE space = ? AND {own} = ?{beyond} "
                f"ORDER BY at, {column} LIMIT ?"
            )
            return [LinkRecord(row[0], from_micros(row[1])) for row in db.execute(sql, parameters)]

    def _link_columns(self, db: sqlite3.Connection, space: str, profile_id: str) -> tuple[str, str]:
        """The links column naming this profile and the one naming the other side."""
        if self._family_column(db, space, profile_id) == "account_id":
            return "account_id", "user_id"
        return "user_id", "account_id"

    def merges(self, space: str, profile_id: str) -> list[MergeRecord]:
        """Merge log of a root's family."""
        with self.snapshot():
            db = self._reader()
            family = self._family(db, space, profile_id)
            marks = ",".join("?" * len(family))
            rows = db.execute(
                f"SELECT parent_id, child_id, message_id, via, at FROM merges WHERE space = ? "
                f"AND parent_id IN ({marks}) ORDER BY sequence",
                (space, *family),
            )
            return [merge_record(row) for row in rows]

    def dropped(self, space: str, profile_id: str) -> list[DroppedRecord]:
        """Dropped identifiers of a root's family."""
        with self.snapshot():
            db = self._reader()
            family = self._family(db, space, profile_id)
            marks = ",".join("?" * len(family))
            rows = db.execute(
                f"SELECT message_id, identifier, rule, at, profile_id FROM dropped WHERE space = ? "
                f"AND profile_id IN ({marks}) ORDER BY sequence",
                (space, *family),
            )
            return [dropped_record(row) for row in rows]

    def dropped_in(self, space: str, message_ids: Sequence[str]) -> list[DroppedRecord]:
        """Dropped identifiers of these messages, in recording order."""
        rows = self._reader().execute(
            "SELECT message_id, identifier, rule, at, profile_id FROM dropped INDEXED BY dropped_by_message "
            "WHERE space = ? AND message_id IN (SELECT value FROM json_each(?)) ORDER BY sequence",
            (space, _json_encode(list(message_ids)).decode()),
        )
        return [dropped_record(row) for row in rows]

    def suspects_among(self, space: str, identifiers: Sequence[Identifier]) -> list[SuspectRecord]:
        """The marks of these identifiers, each read by its key."""
        db = self._reader()
        records = []
        for item in dict.fromkeys(identifiers):
            row = db.execute(
                "SELECT type, value, collection, evidence_type, evidence_values, message_id, at FROM suspects "
                "WHERE space = ? AND collection = ? AND type = ? AND value = ?",
                (space, item.collection, item.type, item.value),
            ).fetchone()
            if row is not None:
                records.append(row)
        records.sort(key=lambda row: (row[6], row[0], row[1], row[2]))
        return [suspect_record(row) for row in records]

    def suspects(self, space: str, *, limit: int | None = None) -> list[SuspectRecord]:
        """Suspect identifiers of a space, by time marked (the first `limit`)."""
        rows = self._reader().execute(
            "SELECT type, value, collection, evidence_type, evidence_values, message_id, at FROM suspects "
            "WHERE space = ? ORDER BY at, type, value, collection LIMIT ?",
            (space, -1 if limit is None else limit),
        )
        return [suspect_record(row) for row in rows]

    def suspects_from(self, space: str, identifier: Identifier, *, limit: int) -> list[SuspectRecord] | None:
        """A page of marks from this identifier's (None: not suspect), by the suspects_by_time index."""
        db = self._reader()
        key = (space, identifier.collection, identifier.type, identifier.value)
        row = db.execute(
            "SELECT at FROM suspects WHERE space = ? AND collection = ? AND type = ? AND value = ?", key
        ).fetchone()
        if row is None:
            return None
        rows = db.execute(
            "SELECT type, value, collection, evidence_type, evidence_values, message_id, at FROM suspects "
            "WHERE space = ? AND (at, type, value, collection) >= (?, ?, ?, ?) "
            "ORDER BY at, type, value, collection LIMIT ?",
            (space, row[0], identifier.type, identifier.value, identifier.collection, limit),
        )
        return [suspect_record(item) for item in rows]

    def unresolved(
        self, space: str, *, limit: int = 100, before_sequence: int | None = None
    ) -> list[EventRecord]:
        """Messages whose identifiers were all blocked, newest first; page with the last sequence seen."""
        cursor = "" if before_sequence is None else " AND sequence < ?"
        parameters: list[Any] = [space]
        if before_sequence is not None:
            parameters.append(before_sequence)
        rows = self._reader().execute(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE space = ? AND profile_id IS NULL "
            f"AND account_id IS NULL{cursor} ORDER BY sequence DESC LIMIT ?",
            (*parameters, limit),
        )
        return [event_record(row) for row in rows]

    def stats(self, space: str) -> SpaceStats:
        """Counts of a space."""
        with self.snapshot():
            db = self._reader()

            def count(sql: str) -> int:
                return int(db.execute(sql, (space,)).fetchone()[0])

            return SpaceStats(
                space=space,
                profiles=count(
                    "SELECT count(*) FROM profiles WHERE space = ? AND parent_id IS NULL AND collection = 'users'"
                ),
                accounts=count(
                    "SELECT count(*) FROM profiles WHERE space = ? AND parent_id IS NULL AND collection = 'accounts'"
                ),
                identifiers=count("SELECT count(*) FROM identifiers WHERE space = ?"),
                merges=count("SELECT count(*) FROM merges WHERE space = ?"),
                events=count("SELECT count(*) FROM events WHERE space = ?"),
                unresolved=count(
                    "SELECT count(*) FROM events WHERE space = ? AND profile_id IS NULL AND account_id IS NULL"
                ),
                suspect=count("SELECT count(*) FROM suspects WHERE space = ?"),
                dropped=count("SELECT count(*) FROM dropped WHERE space = ?"),
            )

    def iter_event_ids(self, space: str) -> Iterator[str]:
        """Every stored message id."""
        for row in self._reader().execute(
            "SELECT message_id FROM events WHERE space = ? ORDER BY sequence", (space,)
        ):
            yield row[0]

    def iter_event_resolutions(self, space: str) -> Iterator[EventResolution]:
        """Every stored message in ingest order with its root profiles now, read in pages."""
        sql, after = EVENT_RESOLUTIONS_SQL.format(p="?", events="events e NOT INDEXED"), 0
        while rows := self._reader().execute(sql, (space, after)).fetchall():
            after = rows[-1][0]
            yield from map(event_resolution, rows)

    def iter_events(self, space: str, *, after_sequence: int = 0) -> Iterator[EventRecord]:
        """Every stored message after a sequence, in ingest order, read in pages.

        Each page is a read of its own, so a long copy holds no snapshot that would keep the WAL from
        being checkpointed; the walk is by rowid (NOT INDEXED), which is the ingest order.
        """
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM events NOT INDEXED WHERE space = ? AND sequence > ? "
            f"ORDER BY sequence LIMIT {EVENTS_PAGE}"
        )
        after = after_sequence
        while rows := self._reader().execute(sql, (space, after)).fetchall():
            after = rows[-1][-1]
            yield from map(event_record, rows)

    def blocked_values(self, space: str) -> frozenset[str]:
        """Every identifier that a blocked-values rule dropped from some message."""
        rows = self._reader().execute(BLOCKED_VALUES_SQL.format(p="?"), (space,))
        return frozenset(row[0] for row in rows)

    def dump(self, space: str) -> dict[str, Any]:
        """The graph of a space, canonical (sorted, times as microseconds)."""
        with self.snapshot():
            db = self._reader()
            dump = {
                name: [list(row) for row in db.execute(sql.format(space="?"), (space,))]
                for name, sql in DUMP_QUERIES.items()
            }
            return dump


class SQLiteTransaction(GraphCacheReader):
    """The write side of one open transaction."""

    def __init__(self, db: sqlite3.Connection, cache: GraphCache) -> None:
        self.db = db
        self.cache = cache
        # Every write waits here, in order, and goes in at flush (before COMMIT, or before a read that
        # the cache cannot answer once a rollback emptied it): a message costs no statement of its
        # own, and rows of one kind go in together. Reads inside the transaction come from the cache,
        # which is updated as the writes are held, and has_message, which looks at the held events.
        self._writes: list[tuple[str, list[Sequence[Any]], bool]] = []  # (SQL, rows, a barrier?)
        self._events: list[tuple[Any, ...]] = []
        self._event_ids: set[tuple[str, str]] = set()
        # Messages of this transaction that set traits, in order: a merge's tie-break ranks them (their
        # events are not in the table yet). One rolled back stays listed; no trait row names it.
        self._trait_messages: list[str] = []
        # Refreshes of stored rows go in coalesced (one row per identifier or pair): a returning
        # visitor refreshes the same rows message after message. Each refresh is a max / min /
        # newest-wins, so applying only the last word per row gives the same rows.
        self._touches: list[tuple[Any, ...]] = []
        self._owners: list[tuple[Any, ...]] = []
        self._pairs: list[tuple[Any, ...]] = []
        # How much of each held list is in SQLite already (writes, touches, owners, pairs).
        self._sent = [0, 0, 0, 0]
        # Message ids claimed ahead: those already stored, and all that were looked up (one query).
        self._stored_ids: set[tuple[str, str]] = set()
        self._looked_up: set[tuple[str, str]] = set()
        # Open savepoints, innermost last. SAVEPOINT goes to SQLite only when held writes go in while
        # one is open, and then at its place among them: a failing one undoes exactly its own part.
        self._savepoints: list[_Savepoint] = []

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit that rolls back alone."""
        mark = _Savepoint(self._lengths(), len(self._events), self.cache.writes)
        self._savepoints.append(mark)
        try:
            yield
        except BaseException:
            self._savepoints.pop()
            if not self.db.in_transaction:
                # SQLite ended the whole transaction (a full disk): writing the held rows now would
                # commit them one statement at a time. The store's handler forgets the cache.
                raise
            if mark.sent:
                # One constant name: savepoints nest as a stack and ROLLBACK TO finds the newest.
                self.db.execute("ROLLBACK TO message")
                self.db.execute("RELEASE message")
            for row in self._events[mark.events :]:
                self._event_ids.discard((row[0], row[1]))
            del self._events[mark.events :]
            for rows, length in zip(self._held(), mark.held, strict=True):
                del rows[length:]
            self._sent = [min(sent, length) for sent, length in zip(self._sent, mark.held, strict=True)]
            if self.cache.writes != mark.cache_writes:
                # What this message wrote to the cache is gone; the transaction goes on, so the cache
                # starts again from the database, which first gets the earlier messages' held writes.
                self._send_held()
                self.cache.clear()
                self.cache.suspects = _load_suspects(self.db)
            raise
        self._savepoints.pop()
        if mark.sent:
            self.db.execute("RELEASE message")

    def _held(self) -> tuple[list[Any], ...]:
        return (self._writes, self._touches, self._owners, self._pairs)

    def _lengths(self) -> list[int]:
        return [len(rows) for rows in self._held()]

    def _hold(self, sql: str, rows: list[Sequence[Any]], *, barrier: bool = False) -> None:
        """Hold a write; a barrier (it reads what earlier writes wrote) goes in after them, alone."""
        self._writes.append((sql, rows, barrier))

    def _send_held(self) -> None:
        """Write everything held so far; an open savepoint not yet in SQLite goes in at its place."""
        for mark in self._savepoints:
            if not mark.sent:
                self._send_until(mark.held)
                self.db.execute("SAVEPOINT message")
                mark.sent = True
        self._send_until(self._lengths())

    def _send_until(self, lengths: list[int]) -> None:
        """Write the held rows up to these lengths (from where the last write stopped)."""
        start = self._sent
        if lengths[0] > start[0]:
            # Between barriers (merges, retirements), rows of one statement go in together: the others
            # insert into other tables, or upsert where the order among their own rows is kept.
            grouped: dict[str, list[Sequence[Any]]] = {}
            for sql, rows, barrier in self._writes[start[0] : lengths[0]]:
                if barrier:
                    self._execute_grouped(grouped)
                    self.db.executemany(sql, rows)
                else:
                    grouped.setdefault(sql, []).extend(rows)
            self._execute_grouped(grouped)
        touches, owners = self._touches[start[1] : lengths[1]], self._owners[start[2] : lengths[2]]
        if touches or owners:
            refreshed = refreshed_rows(touches, owners)
            self.db.executemany(
                "UPDATE identifiers SET first_seen = min(first_seen, coalesce(?1, first_seen)), "
                "last_seen = max(last_seen, coalesce(?2, last_seen)), "
                "device_owner = CASE WHEN ?4 >= coalesce(device_owner_at, ?4) THEN ?3 ELSE device_owner END, "
                "device_owner_at = CASE WHEN ?4 >= coalesce(device_owner_at, ?4) THEN ?4 "
                "ELSE device_owner_at END "
                "WHERE space = ?5 AND collection = ?6 AND type = ?7 AND value = ?8",
                [(*row, *key) for key, row in refreshed.items()],
            )
        pairs = self._pairs[start[3] : lengths[3]]
        if pairs:
            self.db.executemany(
                "INSERT INTO evidence VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE "
                "SET last_seen = max(last_seen, excluded.last_seen)",
                [(*key, *pair, at) for (key, pair), at in newest_pairs(pairs).items()],
            )
        self._sent = list(lengths)

    def _execute_grouped(self, grouped: dict[str, list[Sequence[Any]]]) -> None:
        for sql, rows in grouped.items():
            self.db.executemany(sql, rows)
        grouped.clear()

    def claim(self, space: str, message_id: str, identifiers: Sequence[Identifier]) -> None:
        """Nothing to lock: this store has one writer at a time."""

    def claim_many(self, claims: Sequence[tuple[str, str, Sequence[Identifier]]]) -> None:
        """Nothing to lock (one writer at a time): looks up which of the message ids are stored, at once."""
        by_space: dict[str, list[str]] = {}
        for space, message_id, _ in claims:
            by_space.setdefault(space, []).append(message_id)
        for space, message_ids in by_space.items():
            rows = self.db.execute(
                "SELECT message_id FROM events WHERE space = ? "
                "AND message_id IN (SELECT value FROM json_each(?))",
                (space, _json_encode(message_ids).decode()),
            )
            self._stored_ids.update((space, row[0]) for row in rows)
            self._looked_up.update((space, message_id) for message_id in message_ids)

    def has_message(self, space: str, message_id: str) -> bool:
        """Whether the message id is stored in this space."""
        key = (space, message_id)
        if key in self._event_ids or key in self._stored_ids:
            return True
        if key in self._looked_up:
            return False  # not stored when the transaction began, and this writer has not added it
        row = self.db.execute(
            "SELECT 1 FROM events WHERE space = ? AND message_id = ?", (space, message_id)
        ).fetchone()
        (self._looked_up if row is None else self._stored_ids).add(key)  # add_event asks again
        return row is not None

    def load_view(
        self, space: str, collection: str, identifiers: Sequence[Identifier], *, every_pair: bool = True
    ) -> GraphView:
        """Owners, their profiles, evidence and suspects for a message's identifiers."""
        return self._view(space, collection, identifiers, every_pair=every_pair)

    def _identifier(self, key: IdentifierKey) -> IdentifierEntry | None:
        cache = self.cache
        if key in cache.identifiers:
            return cache.identifiers[key]
        if cache.complete:
            return None
        row = self.db.execute(
            "SELECT profile_id, first_seen, last_seen, retired, device_owner, device_owner_at "
            "FROM identifiers WHERE space = ? AND collection = ? AND type = ? AND value = ?",
            key,
        ).fetchone()
        entry = None if row is None else IdentifierEntry(row[0], row[1], row[2], bool(row[3]), row[4], row[5])
        cache.identifiers[key] = entry
        return entry

    def _evidence(self, key: IdentifierKey) -> dict[tuple[str, str], int]:
        cache = self.cache
        found = cache.evidence.get(key)
        if found is not None or cache.complete:
            return found or {}
        rows = self.db.execute(
            "SELECT other_type, other_value, last_seen FROM evidence "
            "WHERE space = ? AND collection = ? AND type = ? AND value = ?",
            key,
        )
        loaded = {(row[0], row[1]): row[2] for row in rows}
        cache.evidence[key] = loaded
        return loaded

    def _profile(self, space: str, segment_id: str) -> ProfileEntry:
        cache = self.cache
        found = cache.profiles.get((space, segment_id))
        if found is not None:
            return found
        db = self.db
        row = db.execute(
            "SELECT collection, created_at, merge_count, parent_id FROM profiles "
            "WHERE space = ? AND segment_id = ?",
            (space, segment_id),
        ).fetchone()
        entry = ProfileEntry(row[0], row[1], row[2], row[3])
        if row[3] is None:
            for kind, value, first_seen, last_seen, retired, owner, owner_at in db.execute(
                "SELECT type, value, first_seen, last_seen, retired, device_owner, device_owner_at "
                "FROM identifiers INDEXED BY identifiers_by_profile WHERE space = ? AND profile_id = ?",
                (space, segment_id),
            ):
                key = (space, row[0], kind, value)
                entry.members[key] = None
                if cache.identifiers.get(key) is None:
                    cache.identifiers[key] = IdentifierEntry(
                        segment_id, first_seen, last_seen, bool(retired), owner, owner_at
                    )
            entry.children = tuple(
                child[0]
                for child in db.execute(
                    "SELECT segment_id FROM profiles WHERE space = ? AND parent_id = ?", (space, segment_id)
                )
            )
        cache.profiles[(space, segment_id)] = entry
        return entry

    def apply_resolution(
        self, space: str, resolution: Resolution, message_id: str, source: str | None = None
    ) -> None:
        """Write one collection's decision, to the database and the cache alike."""
        self._refuse_duplicates(space, resolution)
        cache = self.cache
        cache.writes += 1
        target = resolution.profile_id
        collection = resolution.collection
        now = to_micros(resolution.timestamp)
        if resolution.created:
            created_at = to_micros(resolution.created_at)
            self._hold(
                "INSERT INTO profiles (space, segment_id, collection, created_at, created_by) "
                "VALUES (?, ?, ?, ?, ?)",
                [(space, target, collection, created_at, message_id)],
            )
            cache.profiles[(space, target)] = ProfileEntry(collection, created_at)
        for step in resolution.merges:
            self._merge(space, collection, target, step.child_id, message_id, str(step.via), now)
        if resolution.added:
            self._hold(
                "INSERT INTO identifiers (space, collection, type, value, profile_id, first_seen, last_seen, "
                "source, first_message_id) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (space, item.collection, item.type, item.value, target, now, now, source, message_id)
                    for item in resolution.added
                ],
            )
            members = self._profile(space, target).members
            for item in resolution.added:
                key = (space, item.collection, item.type, item.value)
                cache.identifiers[key] = IdentifierEntry(target, now, now)
                members[key] = None
        for item in resolution.touched:
            key = (space, item.collection, item.type, item.value)
            entry = self._identifier(key)
            if entry is not None and entry.seen_at(now):  # unchanged: no write
                self._touches.append((key, now))
        for retired, items in ((True, resolution.retired), (False, resolution.revived)):
            if not items:
                continue
            self._hold(
                "UPDATE identifiers SET retired = ? WHERE space = ? AND collection = ? AND type = ? AND value = ?",
                [(int(retired), space, item.collection, item.type, item.value) for item in items],
                barrier=True,
            )
            for item in items:
                # Read into the cache if missing: the UPDATE is held, so the cache is what reads see.
                entry = self._identifier((space, item.collection, item.type, item.value))
                if entry is not None:
                    entry.retired = retired
        for item in resolution.device_owned:
            key = (space, item.collection, item.type, item.value)
            entry = self._identifier(key)
            if entry is not None and entry.owned_by(target, now):
                self._owners.append((key, target, now))
        for lower, higher in resolution.evidence:
            key = (space, lower.collection, lower.type, lower.value)
            partners = cache.evidence.get(key)
            if partners is None:
                partners = cache.evidence.setdefault(key, self._evidence(key))
            pair = (higher.type, higher.value)
            if seen_together(partners, pair, now):
                self._pairs.append((key, pair, now))
        if resolution.suspects:
            self._hold(
                "INSERT OR IGNORE INTO suspects VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        space,
                        mark.identifier.collection,
                        mark.identifier.type,
                        mark.identifier.value,
                        mark.evidence_type,
                        _json_encode(list(mark.values)).decode(),
                        message_id,
                        now,
                    )
                    for mark in resolution.suspects
                ],
            )
            for mark in resolution.suspects:
                item = mark.identifier
                cache.suspects.add((space, item.collection, item.type, item.value))
        if resolution.dropped:
            self.record_dropped(space, resolution.dropped, message_id, resolution.timestamp, target)

    def _refuse_duplicates(self, space: str, resolution: Resolution) -> None:
        """IntegrityError for a profile or identifier that exists: here, inside the caller's savepoint,
        not at COMMIT with every other message of the transaction (the writes are held until then)."""
        target = resolution.profile_id
        if resolution.created and (
            (space, target) in self.cache.profiles
            or (
                not self.cache.complete
                and self.db.execute(
                    "SELECT 1 FROM profiles WHERE space = ? AND segment_id = ?", (space, target)
                ).fetchone()
            )
        ):
            raise IntegrityError(f"profile {target} already exists")
        seen: set[IdentifierKey] = set()
        for item in resolution.added:
            key = (space, item.collection, item.type, item.value)
            if key in seen or self._identifier(key) is not None:
                raise IntegrityError(f"identifier {item} ({item.collection}) already exists")
            seen.add(key)

    def _merge(
        self, space: str, collection: str, target: str, child: str, message_id: str, via: str, at: int
    ) -> None:
        child_entry = self._profile(space, child)
        target_entry = self._profile(space, target)
        for moved in (*child_entry.children, child):
            moved_entry = self.cache.profiles.get((space, moved))
            if moved_entry is not None:
                moved_entry.parent_id = target
        target_entry.children += (*child_entry.children, child)
        target_entry.merge_count += child_entry.merge_count + 1
        for key in child_entry.members:
            member = self._identifier(key)
            if member is not None:
                member.profile_id = target
        target_entry.members.update(child_entry.members)
        child_entry.members = {}
        child_entry.children = ()
        merge_count = child_entry.merge_count
        # Two statements, not one with OR: the OR makes SQLite scan every profile of the space.
        self._hold(
            "UPDATE profiles SET parent_id = ?, merged_at = ? WHERE space = ? AND segment_id = ?",
            [(target, at, space, child)],
            barrier=True,
        )
        self._hold(
            "UPDATE profiles INDEXED BY profiles_by_parent SET parent_id = ?, merged_at = ? "
            "WHERE space = ? AND parent_id = ?",
            [(target, at, space, child)],
            barrier=True,
        )
        self._hold(
            "UPDATE profiles SET merge_count = merge_count + ? WHERE space = ? AND segment_id = ?",
            [(merge_count + 1, space, target)],
            barrier=True,
        )
        self._hold(
            "UPDATE identifiers INDEXED BY identifiers_by_profile SET profile_id = ? "
            "WHERE space = ? AND profile_id = ?",
            [(target, space, child)],
            barrier=True,
        )
        pending = _json_encode(self._trait_messages).decode()
        # Per trait key the newest value (with its source) wins; on a tie the value of the message ingested
        # later (as on one profile), the parent's when either message is unknown (rows from before 0003).
        self._hold(
            "INSERT INTO traits (space, profile_id, key, value, set_at, source, message_id) "
            "SELECT space, ?, key, value, set_at, source, message_id FROM traits WHERE space = ? "
            "AND profile_id = ? AND true ON CONFLICT DO UPDATE SET value = excluded.value, "
            "set_at = excluded.set_at, source = excluded.source, message_id = excluded.message_id "
            f"WHERE excluded.set_at > traits.set_at OR (excluded.set_at = traits.set_at AND {_INGESTED_LATER})",
            [(target, space, child, pending, pending)],
            barrier=True,
        )
        self._hold("DELETE FROM traits WHERE space = ? AND profile_id = ?", [(space, child)], barrier=True)
        own, other = ("account_id", "user_id") if collection == "accounts" else ("user_id", "account_id")
        # An account's links are found by their index; left to itself SQLite walks every link of the space.
        by_own = " INDEXED BY links_by_account" if collection == "accounts" else ""
        self._hold(
            f"INSERT OR IGNORE INTO links (space, {own}, {other}, at) "
            f"SELECT space, ?, {other}, at FROM links{by_own} WHERE space = ? AND {own} = ?",
            [(target, space, child)],
            barrier=True,
        )
        self._hold(f"DELETE FROM links WHERE space = ? AND {own} = ?", [(space, child)], barrier=True)
        self._hold(
            "INSERT INTO merges (space, parent_id, child_id, message_id, via, at) VALUES (?, ?, ?, ?, ?, ?)",
            [(space, target, child, message_id, via, at)],
            barrier=True,
        )

    def record_dropped(
        self, space: str, dropped: Sequence[Dropped], message_id: str, at: datetime, profile_id: str | None
    ) -> None:
        """Record dropped identifiers."""
        micros = to_micros(at)
        self._hold(
            "INSERT INTO dropped (space, profile_id, message_id, identifier, rule, at) VALUES (?, ?, ?, ?, ?, ?)",
            [(space, profile_id, message_id, str(item.identifier), item.rule, micros) for item in dropped],
        )

    def set_traits(
        self,
        space: str,
        profile_id: str,
        updates: Mapping[str, Any],
        at: datetime,
        source: str | None = None,
        message_id: str | None = None,
    ) -> None:
        """Set traits (with the source and message that sent them) unless a newer value is stored."""
        micros = to_micros(at)
        if message_id is not None and updates:
            self._trait_messages.append(message_id)
        self._hold(
            "INSERT INTO traits (space, profile_id, key, value, set_at, source, message_id) "
            "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT DO UPDATE SET value = excluded.value, "
            "set_at = excluded.set_at, source = excluded.source, message_id = excluded.message_id "
            "WHERE excluded.set_at >= traits.set_at",
            [
                (
                    space,
                    profile_id,
                    key,
                    None if value is None else _json_encode(value).decode(),
                    micros,
                    source,
                    message_id,
                )
                for key, value in updates.items()
            ],
        )

    def link(self, space: str, user_id: str, account_id: str, at: datetime) -> None:
        """Link a user and an account."""
        self._hold(
            "INSERT OR IGNORE INTO links VALUES (?, ?, ?, ?)", [(space, user_id, account_id, to_micros(at))]
        )

    def add_event(self, space: str, event: EventRecord) -> None:
        """Store a message (written with the transaction's other events before it commits)."""
        if self.has_message(space, event.message_id):
            raise IntegrityError(f"message {event.message_id!r} is already stored in space {space!r}")
        self._events.append(event_row(space, event))
        self._event_ids.add((space, event.message_id))

    def flush(self) -> None:
        """Write everything held back (the store calls this before COMMIT)."""
        self._send_held()
        if self._events:
            self.db.executemany(
                f"INSERT INTO events ({EVENT_INSERT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                self._events,
            )
            self._events.clear()
        self._stored_ids |= self._event_ids  # stored now: has_message must not read "looked up, absent"
        self._event_ids.clear()
        self._trait_messages.clear()  # their events are in the table now
        for rows in self._held():
            rows.clear()
        self._sent = [0, 0, 0, 0]

    def learn_types(self, space: str, types: Sequence[tuple[str, str]]) -> None:
        """Append custom types in first-seen order."""
        self._send_held()  # rare: the position is read from the table, so what is held goes first
        row = self.db.execute(
            "SELECT coalesce(max(position), 0) FROM learned_types WHERE space = ?", (space,)
        ).fetchone()
        position = int(row[0])
        for identifier_type, collection in types:
            position += 1
            self.db.execute(
                "INSERT OR IGNORE INTO learned_types VALUES (?, ?, ?, ?)",
                (space, position, identifier_type, collection),
            )


@dataclass(slots=True)
class _Savepoint:
    held: list[int]  # lengths of the held writes and refreshes when it opened
    events: int
    cache_writes: int
    sent: bool = False
