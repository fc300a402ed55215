"""The PostgreSQL store: many processes resolve into one graph at once, serialised per identifier.

Concurrency. Every writer locks what it is about to read and change, with transaction-scoped advisory
locks on 64-bit hashes:

- `claim_many`, at the start of a transaction, waits for its first message's locks (its id, its
  identifiers and the roots they had a moment before) in one sorted statement, then takes the next
  messages' ids and identifiers while they are free, and tries the roots it then reads;
- `claim` (per message) locks whatever that did not cover, and the root profile of every identifier
  it finds (and of a device's owner), reading again until the roots it holds are the roots the graph
  shows (a merge may have moved them).

Whoever changes an identifier row holds that identifier's lock or its root profile's lock (a merge holds
both roots), so once both are held the neighbourhood cannot change under the resolver: read, decide,
write, commit. Messages on disjoint identifiers and profiles take disjoint locks and never wait on each
other.

Deadlock freedom: a transaction waits for a lock only while it holds none (its first statement that
locks, taken in sorted order). Every later lock is a try-lock; when it is busy the
store raises LockBusy and the engine commits what it has done and starts the message again in a fresh
transaction. Deadlocks PostgreSQL detects anyway (a unique index waiting on a concurrent insert),
serialisation failures and lost connections become StoreConflict, which the engine retries.

Schema: storage/migrations/postgres (the SQLite schema in PostgreSQL's types, ready for Citus: every
table leads with `space`).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import msgspec
import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool, PoolClosed, PoolTimeout

from idstitch.core.errors import ConfigError
from idstitch.core.identifiers import Identifier
from idstitch.storage.base import (
    DroppedRecord,
    EventQuery,
    EventRecord,
    EventResolution,
    IdentifierRecord,
    LinkRecord,
    MergeRecord,
    ProfileActivity,
    ProfileRecord,
    SourceRecord,
    SpaceStats,
    StoreConflict,
    StoreUnavailable,
    SuspectRecord,
    TokenRecord,
    TraitRecord,
)
from idstitch.storage.migrations import read_migrations, refuse_newer_schema, refuse_older_schema
from idstitch.storage.postgres_transaction import PostgresTransaction, lock_key
from idstitch.storage.rows import (
    BLOCKED_VALUES_SQL,
    DUMP_QUERIES,
    EVENT_COLUMNS,
    EVENT_RESOLUTIONS_SQL,
    EVENTS_PAGE,
    INSERT_TOKEN_SQL,
    TOKEN_OF_KIND_SQL,
    dropped_record,
    event_record,
    event_resolution,
    identifier_record,
    merge_record,
    suspect_record,
    trait_record,
)
from idstitch.storage.times import from_micros, to_micros
from idstitch.storage.urls import redact_url

__all__ = ["PostgresStore", "PostgresTransaction", "lock_key"]

_logger = logging.getLogger(__name__)

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode

# Taken around migrations, so that workers started together migrate once.
_MIGRATION_LOCK = 0x1D5_7C4_0001


# This process ANALYZEs the graph tables after writing this many messages, then 4x as many, … up to
# the last (autovacuum keeps the statistics of a grown graph; see PostgresStore._grown).
_FIRST_ANALYZE = 500
_LAST_ANALYZE = 2_000_000

# How long a connection attempt that checks whether the server is back may take (unless the URL says).
_CONNECT_TIMEOUT = 10

# Errors after which the transaction may simply run again; PoolTimeout (no connection) is one too.
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure, psycopg.OperationalError)


class PostgresStore:
    """A store in a PostgreSQL database (`postgresql://user@host:port/db`, any libpq URL)."""

    def __init__(self, url: str, *, read_only: bool = False, max_connections: int = 8) -> None:
        self.url = url
        self.read_only = read_only
        self.migrated_from: int | None = None
        self._events_written = 0
        self._analyze_at = _FIRST_ANALYZE
        self._max_connections = max_connections
        # Set while the server cannot be reached: the reason, and since when (for the log line once back).
        self._outage: tuple[str, float] | None = None
        self._reconnecting = threading.Lock()
        self._local = threading.local()  # .pinned: the connection of this thread's open snapshot
        try:
            # One plain connection first: an unreachable server or a refused login fails at once, with
            # libpq's own words, instead of after the pool's retries.
            self._connect_once()
        except psycopg.Error as error:
            raise ConfigError(
                f"store {_safe(url)}: cannot connect to PostgreSQL: {self._reason(error)}"
            ) from error
        self._pool = self._new_pool()
        try:
            if read_only:
                self._check_schema()
            else:
                self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def _connect_once(self) -> None:
        """Connect and disconnect, or raise libpq's error."""
        # The URL's own connect_timeout is the pool's too: overriding it here would let a bad one pass
        # this check and fail every pooled connection after it.
        if "connect_timeout" in self.url:
            psycopg.connect(self.url).close()
        else:
            psycopg.connect(self.url, connect_timeout=_CONNECT_TIMEOUT).close()

    def _reason(self, error: BaseException) -> str:
        """An error's text on one line, without the URL's password."""
        return _without_password(" ".join(str(error).split()), self.url)

    def _new_pool(self) -> ConnectionPool:
        return ConnectionPool(
            self.url,
            min_size=1,
            max_size=self._max_connections,
            kwargs={"autocommit": True},
            open=True,
            timeout=30,
            name="idstitch",
        )

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        """A pooled connection that works, or StoreUnavailable at once while the server cannot be reached.

        A connection that died while idle in the pool (a server restart, a failover,
        pg_terminate_backend, an idle timeout) is replaced when taken, not handed out to fail: one empty
        round trip per checkout, and a checkout serves a whole transaction or read. When no new
        connection can be made either, the store is unavailable: the pool would wait 30 s for one and
        then retry with a backoff that grows to minutes, so until a connection attempt of our own
        succeeds, every checkout makes one such attempt (instant when refused) instead.
        """
        pool = self._reachable_pool()
        while True:
            try:
                db = pool.getconn()
            except PoolClosed:
                if pool is self._pool:
                    raise
                pool = self._pool  # replaced by a fresh one while this thread waited
                continue
            except PoolTimeout:
                self._check_reachable()  # the server gone: StoreUnavailable; else every connection is busy
                raise
            try:
                db.execute("")
                break
            except psycopg.Error:
                pool.putconn(db)  # broken: the pool drops it and connects another
                self._check_reachable()  # the server gone: StoreUnavailable; else take the next one
                pool = self._reachable_pool()
        try:
            with db:
                yield db
        except psycopg.OperationalError:
            if db.broken:
                self._check_reachable()  # lost mid-statement: an outage, or only this connection?
            raise
        finally:
            pool.putconn(db)

    def _check_reachable(self) -> None:
        """Connect once, directly; StoreUnavailable (and the outage remembered) when the server does not answer."""
        try:
            self._connect_once()
        except psycopg.Error as error:
            raise self._unavailable(error) from error

    def _unavailable(self, error: BaseException) -> StoreUnavailable:
        reason = self._reason(error)
        if self._outage is None:
            _logger.warning("PostgreSQL cannot be reached: %s", reason)
            self._outage = (reason, time.monotonic())
        else:
            self._outage = (reason, self._outage[1])
        return StoreUnavailable(
            f"store {_safe(self.url)} is unavailable: cannot connect to PostgreSQL: {reason}"
        )

    def _reachable_pool(self) -> ConnectionPool:
        """The pool, once the server answers again after an outage (with fresh connections), else raise."""
        if self._outage is None:
            return self._pool
        if not self._reconnecting.acquire(blocking=False):
            # Another thread is trying the server right now: fail at once rather than queue behind it.
            raise StoreUnavailable(
                f"store {_safe(self.url)} is unavailable: cannot connect to PostgreSQL: {self._outage[0]}"
            )
        try:
            if self._outage is None:
                return self._pool
            self._check_reachable()
            # Back. The old pool may be waiting out a reconnection backoff of minutes: start afresh.
            old, self._pool = self._pool, self._new_pool()
            _logger.warning("PostgreSQL answers again after %.1f s", time.monotonic() - self._outage[1])
            self._outage = None
        finally:
            self._reconnecting.release()
        old.close(timeout=1)
        return self._pool

    def close(self) -> None:
        """Close every connection."""
        self._pool.close()

    # -- schema ------------------------------------------------------------------------------
    def _migrate(self) -> None:
        migrations = read_migrations("postgres")
        latest = migrations[-1][0]
        with self._connection() as db:
            user, schema = self._where(db)
            # Up to date: nothing to create, so a role with rights on the tables only (no CREATE on the
            # schema, as PostgreSQL 15 gives no one but the owner on `public`) may run idstitch. Newer:
            # said before anything is tried, which such a role could not do (read again under the lock).
            current = self._applied(db)
            refuse_newer_schema(_safe(self.url), current, latest)
            self.migrated_from = current
            if current == latest:
                return
            try:
                with db.transaction():
                    db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
                    db.execute(
                        "CREATE TABLE IF NOT EXISTS schema_migrations "
                        "(version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL)"
                    )
                    applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
                    refuse_newer_schema(_safe(self.url), max(applied, default=0), latest)
                    for version, name, script in migrations:
                        if version not in applied:
                            db.execute(script.encode())  # several statements: no parameters, simple protocol
                            db.execute(
                                "INSERT INTO schema_migrations VALUES (%s, %s, now())", (version, name)
                            )
            except psycopg.errors.InsufficientPrivilege as error:
                if current:
                    # Tables to alter, not to create: only their owner may, whatever the rights on the schema.
                    owner = self._owner(db, schema)
                    raise ConfigError(
                        f"store {_safe(self.url)}: role {user} may not migrate schema {schema} from version "
                        f"{current} to {latest}: only the owner of its tables, role {owner}, may alter them; "
                        f"let {owner} run `idstitch migrate` on it once"
                    ) from error
                raise ConfigError(
                    f"store {_safe(self.url)}: role {user} may not create the tables in schema {schema} "
                    f'(permission denied): grant it once with GRANT CREATE ON SCHEMA "{schema}" TO "{user}", '
                    "or let a role that may (the schema's owner) open the store once to create them"
                ) from error

    def _where(self, db: psycopg.Connection[Any]) -> tuple[str, str]:
        """The role and the schema the store's tables are in; ConfigError when the search_path names none."""
        row = db.execute("SELECT current_user, current_schema()").fetchone()
        if row is None or row[1] is None:
            # current_schema() skips schemas the role may not use: one that exists is a missing grant.
            hidden = db.execute(
                "SELECT current_user, n.nspname FROM "
                "unnest(string_to_array(current_setting('search_path'), ',')) WITH ORDINALITY AS p(name, i) "
                "JOIN pg_namespace n ON n.nspname = replace(trim(both ' \"' from p.name), '$user', current_user) "
                "WHERE NOT has_schema_privilege(n.oid, 'USAGE') ORDER BY p.i LIMIT 1"
            ).fetchone()
            if hidden is not None:
                user, schema = str(hidden[0]), str(hidden[1])
                raise ConfigError(
                    f"store {_safe(self.url)}: role {user} may not use schema {schema} (permission denied): "
                    f'grant it once with GRANT USAGE ON SCHEMA "{schema}" TO "{user}"'
                )
            raise ConfigError(f"store {_safe(self.url)}: the search_path names no existing schema")
        return str(row[0]), str(row[1])

    @staticmethod
    def _owner(db: psycopg.Connection[Any], schema: str) -> str:
        """The role owning the store's tables (the one that created them)."""
        row = db.execute(
            "SELECT tableowner FROM pg_tables WHERE schemaname = %s AND tablename = 'schema_migrations'",
            (schema,),
        ).fetchone()
        return str(row[0]) if row is not None else "?"

    def _applied(self, db: psycopg.Connection[Any]) -> int:
        """The newest applied migration, 0 for a schema without idstitch's tables."""
        # In the schema tables are created in, not one further down the search_path.
        row = db.execute(
            "SELECT to_regclass(format('%I.schema_migrations', current_schema())) IS NOT NULL"
        ).fetchone()
        if row is None or not row[0]:
            return 0
        try:
            newest = db.execute("SELECT max(version) FROM schema_migrations").fetchone()
        except psycopg.errors.InsufficientPrivilege as error:
            user, schema = self._where(db)
            raise ConfigError(
                f"store {_safe(self.url)}: role {user} may not read the tables of schema {schema} "
                "(permission denied for table schema_migrations): grant it once with GRANT SELECT, INSERT, "
                f'UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{user}" (SELECT alone for reading '
                "commands)"
            ) from error
        return int(newest[0] or 0) if newest is not None else 0

    def _check_schema(self) -> None:
        latest = read_migrations("postgres")[-1][0]
        with self._connection() as db:
            self._where(db)
            version = self._applied(db)
        refuse_newer_schema(_safe(self.url), version, latest)
        refuse_older_schema(_safe(self.url), version, latest)

    def schema_version(self) -> int:
        """The newest applied migration."""
        row = self._one("SELECT max(version) FROM schema_migrations", ())
        return int(row[0] or 0) if row is not None else 0

    # -- writes ------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        """One write transaction on a pooled connection; others may run at the same time."""
        if self.read_only:
            raise ConfigError(f"store {_safe(self.url)} was opened read-only")
        try:
            with self._connection() as db, db.transaction(), db.pipeline():
                transaction = PostgresTransaction(db)
                yield transaction
                transaction.flush()
        except _RETRYABLE as error:
            if isinstance(error, psycopg.errors.ProgramLimitExceeded):
                # An OperationalError, but no retry can make a row fit (an index row over a third of a
                # page): retried, it held every writer for two minutes and then failed all the same.
                raise
            raise StoreConflict(f"{type(error).__name__}: {error}".strip()) from error
        self._grown(transaction.events)

    def _grown(self, events: int) -> None:
        """ANALYZE the graph while it is young and grows by factors, so that plans follow its size.

        Statements are prepared, and a prepared statement keeps the plan made from the statistics of
        its first runs. On a new database those say "empty", and a lookup planned as a scan of an empty
        table stays a scan as the table grows, until autovacuum's ANALYZE (a minute or more later) makes
        the plans be made again. Measured: PostgreSQL's CPU per message doubled within a 64 s run.
        """
        self._events_written += events
        if self._events_written < self._analyze_at or self._analyze_at > _LAST_ANALYZE:
            return
        self._analyze_at *= 4
        try:
            with self._pool.connection() as db:
                db.execute("ANALYZE profiles, identifiers, evidence, suspects, events, traits, links")
        except psycopg.Error as error:
            # The transaction has committed: a connection lost now must not report its messages as failed
            # (a client would resend them). Autovacuum's ANALYZE comes later all the same.
            _logger.warning("ANALYZE after a commit failed (%s: %s)", type(error).__name__, error)

    def ensure_space(self, space: str) -> None:
        """Create the space if new."""
        self._write(
            "INSERT INTO spaces VALUES (%s, (extract(epoch FROM now()) * 1000000)::bigint) "
            "ON CONFLICT DO NOTHING",
            (space,),
        )

    def upsert_source(self, source: SourceRecord, *, replace: bool = True) -> None:
        """Create or update a source (or keep an existing one)."""
        update = "UPDATE SET write_key = excluded.write_key" if replace else "NOTHING"
        self._write(
            f"INSERT INTO sources VALUES (%s, %s, %s) ON CONFLICT (space, name) DO {update}",
            (source.space, source.name, source.write_key),
        )

    def unmark_declared(self, space: str, identifiers: Sequence[Identifier]) -> None:
        """Remove the declared (not the detected) marks of these identifiers."""
        if self.read_only:
            raise ConfigError(f"store {_safe(self.url)} was opened read-only")
        if not identifiers:
            return
        with self._connection() as db, db.transaction(), db.cursor() as cursor:
            cursor.executemany(
                "DELETE FROM suspects WHERE space = %s AND collection = %s AND type = %s AND value = %s "
                "AND evidence_type = 'declared'",
                [(space, item.collection, item.type, item.value) for item in identifiers],
            )

    def upsert_token(self, token: TokenRecord) -> None:
        """Create a token or change its space or kind."""
        self._write(
            "INSERT INTO tokens (token, space, kind) VALUES (%s, %s, %s) "
            "ON CONFLICT (token) DO UPDATE SET space = excluded.space, kind = excluded.kind",
            (token.token, token.space, token.kind),
        )

    def first_token(self, token: TokenRecord) -> TokenRecord:
        """Store `token` unless its space has one of its kind; an advisory lock orders concurrent callers."""
        if self.read_only:
            raise ConfigError(f"store {_safe(self.url)} was opened read-only")
        with self._connection() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("t", token.space, token.kind),))
            row = db.execute(TOKEN_OF_KIND_SQL.format(p="%s"), (token.space, token.kind)).fetchone()
            if row is not None:
                return TokenRecord(token.space, row[0], token.kind)
            db.execute(INSERT_TOKEN_SQL.format(p="%s"), (token.token, token.space, token.kind))
        return token

    def _write(self, sql: str, parameters: Sequence[Any]) -> None:
        if self.read_only:
            raise ConfigError(f"store {_safe(self.url)} was opened read-only")
        with self._connection() as db:
            try:
                db.execute(sql, parameters)
            except psycopg.errors.InsufficientPrivilege as error:
                # A start-up write (space, source, token) by a role given only the readers' rights.
                user, schema = self._where(db)
                denied = str(error).splitlines()[0] if str(error) else "permission denied"
                raise ConfigError(
                    f"store {_safe(self.url)}: role {user} may not write the tables of schema {schema} "
                    f"({denied}): grant it once with GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES "
                    f'IN SCHEMA "{schema}" TO "{user}"'
                ) from error

    # -- reads -------------------------------------------------------------------------------
    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads of this thread inside see one moment: one REPEATABLE READ, READ ONLY transaction.

        Under autocommit (READ COMMITTED) each statement sees the graph of its own start, so the reads
        of one response could straddle a merge committed between them.
        """
        if getattr(self._local, "pinned", None) is not None:
            yield  # nested: the outer snapshot's moment
            return
        with self._connection() as db, self._lost_while_reading(db):
            db.execute("BEGIN ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            self._local.pinned = db
            try:
                yield
            finally:
                self._local.pinned = None
                if not db.broken and db.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    db.execute("ROLLBACK")  # nothing was written: only the snapshot ends

    @contextmanager
    def _lost_while_reading(self, db: psycopg.Connection[Any]) -> Iterator[None]:
        """A connection that died under a read while the server answers (its backend ended: an admin's
        pg_terminate_backend, a pooler, a restart already over) is StoreConflict: the read may simply
        run again on another connection; StoreUnavailable when the server is gone."""
        try:
            yield
        except psycopg.OperationalError as error:
            if not db.broken:
                raise
            self._check_reachable()
            raise StoreConflict(
                f"store {_safe(self.url)}: the connection was lost while reading: {self._reason(error)}"
            ) from error

    @contextmanager
    def _read_connection(self) -> Iterator[psycopg.Connection[Any]]:
        """The connection of this thread's snapshot if one is open, else a pooled one (writes never
        take the snapshot's: it is read-only)."""
        pinned: psycopg.Connection[Any] | None = getattr(self._local, "pinned", None)
        if pinned is not None:
            yield pinned  # the snapshot puts it back
            return
        with self._connection() as db, self._lost_while_reading(db):
            yield db

    @contextmanager
    def _reading(self) -> Iterator[psycopg.Connection[Any]]:
        """A connection whose statements read one moment (this thread's snapshot, or one of their own)."""
        with self.snapshot(), self._read_connection() as db:
            yield db

    def _all(self, sql: str, parameters: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._read_connection() as db:
            return db.execute(sql, parameters).fetchall()

    def _one(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any]) -> tuple[Any, ...] | None:
        with self._read_connection() as db:
            return db.execute(sql, parameters).fetchone()

    def spaces(self) -> list[str]:
        """Every space."""
        return [row[0] for row in self._all("SELECT name FROM spaces ORDER BY name", ())]

    def sources(self) -> list[SourceRecord]:
        """Every source."""
        rows = self._all("SELECT space, name, write_key FROM sources ORDER BY space, name", ())
        return [SourceRecord(*row) for row in rows]

    def tokens(self) -> list[TokenRecord]:
        """Every token, by space and token."""
        rows = self._all("SELECT space, token, kind FROM tokens ORDER BY space, token", ())
        return [TokenRecord(*row) for row in rows]

    def learned_types(self, space: str) -> list[tuple[str, str]]:
        """Custom types of a space, first seen first."""
        rows = self._all(
            "SELECT type, collection FROM learned_types WHERE space = %s ORDER BY position, type", (space,)
        )
        return [(row[0], row[1]) for row in rows]

    def find_profile(self, space: str, identifier: Identifier) -> str | None:
        """Root owning an identifier."""
        row = self._one(
            "SELECT profile_id FROM identifiers WHERE space = %s AND collection = %s AND type = %s "
            "AND value = %s",
            (space, identifier.collection, identifier.type, identifier.value),
        )
        return None if row is None else str(row[0])

    def resolve_segment_id(self, space: str, segment_id: str) -> str | None:
        """Root of a segment id."""
        row = self._one(
            "SELECT coalesce(parent_id, segment_id) FROM profiles WHERE space = %s AND segment_id = %s",
            (space, segment_id),
        )
        return None if row is None else str(row[0])

    def profile(self, space: str, segment_id: str) -> ProfileRecord | None:
        """A root profile with its merged children's ids."""
        with self._reading() as db:
            row = db.execute(
                "SELECT segment_id, collection, created_at, merge_count, created_by FROM profiles "
                "WHERE space = %s AND segment_id = %s AND parent_id IS NULL",
                (space, segment_id),
            ).fetchone()
            if row is None:
                return None
            children = db.execute(
                "SELECT segment_id FROM profiles WHERE space = %s AND parent_id = %s "
                "ORDER BY created_at, segment_id",
                (space, segment_id),
            ).fetchall()
        return ProfileRecord(
            row[0], row[1], from_micros(row[2]), row[3], tuple(child[0] for child in children), row[4]
        )

    def identifiers(self, space: str, profile_id: str) -> list[IdentifierRecord]:
        """Identifiers of a root, first seen first."""
        rows = self._all(
            "SELECT i.type, i.value, i.collection, i.first_seen, i.last_seen, i.retired, "
            "s.type IS NOT NULL, i.source, i.first_message_id FROM identifiers i "
            "LEFT JOIN suspects s ON s.space = i.space "
            "AND s.collection = i.collection AND s.type = i.type AND s.value = i.value "
            "WHERE i.space = %s AND i.profile_id = %s ORDER BY i.first_seen, i.type, i.value",
            (space, profile_id),
        )
        return [identifier_record(row) for row in rows]

    def traits(self, space: str, profile_id: str) -> dict[str, Any]:
        """Current traits of a root."""
        rows = self._all(
            "SELECT key, value FROM traits WHERE space = %s AND profile_id = %s AND value IS NOT NULL "
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
        named = " AND key = ANY(%s)" if include else ""
        parameters: list[Any] = [space, profile_id, after]
        if include:
            parameters.append(list(include))
        rows = self._all(
            "SELECT key, value, source, set_at FROM traits WHERE space = %s AND profile_id = %s "
            f"AND value IS NOT NULL AND key >= %s{named} ORDER BY key LIMIT %s",
            (*parameters, limit),
        )
        return [trait_record(row) for row in rows]

    def _family(self, db: psycopg.Connection[Any], space: str, profile_id: str) -> tuple[list[str], str]:
        """The root and its merged children, and the events column that points at them."""
        rows = db.execute(
            "SELECT segment_id, collection FROM profiles WHERE space = %s "
            "AND (segment_id = %s OR parent_id = %s) ORDER BY parent_id NULLS FIRST, segment_id",
            (space, profile_id, profile_id),
        ).fetchall()
        column = "account_id" if rows and rows[0][1] == "accounts" else "profile_id"
        return [profile_id, *(row[0] for row in rows if row[0] != profile_id)], column

    def activity(self, space: str, profile_id: str) -> ProfileActivity:
        """The creating message of a root and the last message ingested for its family."""
        with self._reading() as db:
            row = db.execute(
                "SELECT p.created_by, e.source FROM profiles p LEFT JOIN events e "
                "ON e.space = p.space AND e.message_id = p.created_by "
                "WHERE p.space = %s AND p.segment_id = %s",
                (space, profile_id),
            ).fetchone()
            first, first_source = (None, None) if row is None else (row[0], row[1])
            family, column = self._family(db, space, profile_id)
            last = db.execute(
                f"SELECT message_id, source, received_at FROM events WHERE space = %s "
                f"AND {column} = ANY(%s) ORDER BY sequence DESC LIMIT 1",
                (space, family),
            ).fetchone()
        if last is None:
            return ProfileActivity(first, first_source, None, None, None)
        return ProfileActivity(first, first_source, last[0], last[1], from_micros(last[2]))

    def event_count(self, space: str, profile_id: str) -> int:
        """Events of a root's family."""
        with self._reading() as db:
            family, column = self._family(db, space, profile_id)
            row = db.execute(
                f"SELECT count(*) FROM events WHERE space = %s AND {column} = ANY(%s)", (space, family)
            ).fetchone()
        return int(row[0]) if row is not None else 0

    def events(
        self, space: str, profile_id: str, *, limit: int = 10, after_sequence: int | None = None
    ) -> list[EventRecord]:
        """Events of a root's family, newest ingested first; page with the last sequence seen."""
        with self._reading() as db:
            family, column = self._family(db, space, profile_id)
            cursor = "" if after_sequence is None else " AND sequence < %s"
            parameters: list[Any] = [space, family]
            if after_sequence is not None:
                parameters.append(after_sequence)
            rows = db.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE space = %s AND {column} = ANY(%s){cursor} "
                "ORDER BY sequence DESC LIMIT %s",
                (*parameters, limit),
            ).fetchall()
        return [event_record(row) for row in rows]

    def event_page(self, space: str, profile_id: str, query: EventQuery) -> list[EventRecord]:
        """A page of a root family's events by (timestamp, message_id), after the query's cursor."""
        if query.limit == 0:
            return []
        direction, beyond = ("DESC", "<") if query.descending else ("ASC", ">")
        with self._reading() as db:
            family, column = self._family(db, space, profile_id)
            conditions = [f"space = %s AND {column} = ANY(%s)"]
            parameters: list[Any] = [space, family]
            if query.after is not None:
                conditions.append(f"(timestamp, message_id) {beyond} (%s, %s)")
                parameters += [to_micros(query.after[0]), query.after[1]]
            if query.start is not None:
                conditions.append("timestamp >= %s")
                parameters.append(to_micros(query.start))
            if query.end is not None:
                conditions.append("timestamp < %s")
                parameters.append(to_micros(query.end))
            if query.include:
                conditions.append("name = ANY(%s)")
                parameters.append(sorted(query.include))
            if query.exclude:
                conditions.append("(name IS NULL OR NOT name = ANY(%s))")
                parameters.append(sorted(query.exclude))
            limit = "" if query.limit < 0 else f" LIMIT {int(query.limit)}"
            rows = db.execute(
                f"SELECT {EVENT_COLUMNS} FROM events WHERE {' AND '.join(conditions)} "
                f"ORDER BY timestamp {direction}, message_id {direction}{limit}",
                parameters,
            ).fetchall()
        return [event_record(row) for row in rows]

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
        with self._reading() as db:
            own, column = self._link_columns(db, space, profile_id)
            parameters: list[Any] = [space, profile_id]
            beyond = ""
            if after is not None:
                # A row comparison: an account's links index (at, user_id) starts the page where it begins.
                beyond = f" AND (at, {column}) > (%s, %s)"
                parameters += [to_micros(after[0]), after[1]]
            parameters.append(limit)
            sql = (
                f"SELECT {column}, at FROM links WHERE space = %s AND {own} = %s{beyond} "
                f"ORDER BY at, {column} LIMIT %s"
            )
            rows = db.execute(sql, parameters).fetchall()
        return [LinkRecord(row[0], from_micros(row[1])) for row in rows]

    def _link_columns(self, db: psycopg.Connection[Any], space: str, profile_id: str) -> tuple[str, str]:
        """The links column naming this profile and the one naming the other side."""
        row = db.execute(
            "SELECT collection FROM profiles WHERE space = %s AND segment_id = %s", (space, profile_id)
        ).fetchone()
        if row is not None and row[0] == "accounts":
            return "account_id", "user_id"
        return "user_id", "account_id"

    def merges(self, space: str, profile_id: str) -> list[MergeRecord]:
        """Merge log of a root's family."""
        with self._reading() as db:
            family, _ = self._family(db, space, profile_id)
            rows = db.execute(
                "SELECT parent_id, child_id, message_id, via, at FROM merges WHERE space = %s "
                "AND parent_id = ANY(%s) ORDER BY sequence",
                (space, family),
            ).fetchall()
        return [merge_record(row) for row in rows]

    def dropped(self, space: str, profile_id: str) -> list[DroppedRecord]:
        """Dropped identifiers of a root's family."""
        with self._reading() as db:
            family, _ = self._family(db, space, profile_id)
            rows = db.execute(
                "SELECT message_id, identifier, rule, at, profile_id FROM dropped WHERE space = %s "
                "AND profile_id = ANY(%s) ORDER BY sequence",
                (space, family),
            ).fetchall()
        return [dropped_record(row) for row in rows]

    def dropped_in(self, space: str, message_ids: Sequence[str]) -> list[DroppedRecord]:
        """Dropped identifiers of these messages, in recording order."""
        rows = self._all(
            "SELECT message_id, identifier, rule, at, profile_id FROM dropped "
            "WHERE space = %s AND message_id = ANY(%s) ORDER BY sequence",
            (space, list(message_ids)),
        )
        return [dropped_record(row) for row in rows]

    def suspects_among(self, space: str, identifiers: Sequence[Identifier]) -> list[SuspectRecord]:
        """The marks of these identifiers, read by their keys in one statement."""
        keys = [[item.collection, item.type, item.value] for item in dict.fromkeys(identifiers)]
        # LATERAL … OFFSET 0: a primary-key probe per identifier, whatever the planner believes of the
        # table's size (as the resolver's reads, postgres_transaction._OWNED_SQL).
        rows = self._all(
            "SELECT s.type, s.value, s.collection, s.evidence_type, s.evidence_values, s.message_id, s.at "
            "FROM (SELECT r->>0 AS collection, r->>1 AS type, r->>2 AS value "
            "FROM jsonb_array_elements(%s::jsonb) AS r) AS k "
            "CROSS JOIN LATERAL (SELECT * FROM suspects s WHERE s.space = %s AND s.collection = k.collection "
            "AND s.type = k.type AND s.value = k.value OFFSET 0) AS s",
            (_json_encode(keys).decode(), space),
        )
        rows.sort(key=lambda row: (row[6], row[0], row[1], row[2]))
        return [suspect_record(row) for row in rows]

    def suspects(self, space: str, *, limit: int | None = None) -> list[SuspectRecord]:
        """Suspect identifiers of a space, by time marked (the first `limit`)."""
        rows = self._all(
            "SELECT type, value, collection, evidence_type, evidence_values, message_id, at FROM suspects "
            "WHERE space = %s ORDER BY at, type, value, collection LIMIT %s",
            (space, limit),
        )
        return [suspect_record(row) for row in rows]

    def suspects_from(self, space: str, identifier: Identifier, *, limit: int) -> list[SuspectRecord] | None:
        """A page of marks from this identifier's (None: not suspect), by the suspects_by_time index."""
        with self._reading() as db:
            row = db.execute(
                "SELECT at FROM suspects WHERE space = %s AND collection = %s AND type = %s AND value = %s",
                (space, identifier.collection, identifier.type, identifier.value),
            ).fetchone()
            if row is None:
                return None
            rows = db.execute(
                "SELECT type, value, collection, evidence_type, evidence_values, message_id, at FROM suspects "
                "WHERE space = %s AND (at, type, value, collection) >= (%s, %s, %s, %s) "
                "ORDER BY at, type, value, collection LIMIT %s",
                (space, row[0], identifier.type, identifier.value, identifier.collection, limit),
            ).fetchall()
        return [suspect_record(item) for item in rows]

    def unresolved(
        self, space: str, *, limit: int = 100, before_sequence: int | None = None
    ) -> list[EventRecord]:
        """Messages whose identifiers were all blocked, newest first; page with the last sequence seen."""
        cursor = "" if before_sequence is None else " AND sequence < %s"
        parameters: list[Any] = [space]
        if before_sequence is not None:
            parameters.append(before_sequence)
        rows = self._all(
            f"SELECT {EVENT_COLUMNS} FROM events WHERE space = %s AND profile_id IS NULL "
            f"AND account_id IS NULL{cursor} ORDER BY sequence DESC LIMIT %s",
            (*parameters, limit),
        )
        return [event_record(row) for row in rows]

    def stats(self, space: str) -> SpaceStats:
        """Counts of a space."""
        row = self._one(
            "SELECT "
            "(SELECT count(*) FROM profiles WHERE space = %(s)s AND parent_id IS NULL AND collection = 'users'),"
            "(SELECT count(*) FROM profiles WHERE space = %(s)s AND parent_id IS NULL "
            "AND collection = 'accounts'),"
            "(SELECT count(*) FROM identifiers WHERE space = %(s)s),"
            "(SELECT count(*) FROM merges WHERE space = %(s)s),"
            "(SELECT count(*) FROM events WHERE space = %(s)s),"
            "(SELECT count(*) FROM events WHERE space = %(s)s AND profile_id IS NULL AND account_id IS NULL),"
            "(SELECT count(*) FROM suspects WHERE space = %(s)s),"
            "(SELECT count(*) FROM dropped WHERE space = %(s)s)",
            {"s": space},
        )
        assert row is not None
        return SpaceStats(space, *(int(value) for value in row))

    def iter_event_ids(self, space: str) -> Iterator[str]:
        """Every stored message id, in ingest order (read in pages, not all at once)."""
        after = 0
        while True:
            rows = self._all(
                "SELECT sequence, message_id FROM events WHERE space = %s AND sequence > %s "
                "ORDER BY sequence LIMIT 10000",
                (space, after),
            )
            if not rows:
                return
            for _, message_id in rows:
                yield message_id
            after = rows[-1][0]

    def iter_event_resolutions(self, space: str) -> Iterator[EventResolution]:
        """Every stored message in ingest order with its root profiles now, read in pages."""
        sql, after = EVENT_RESOLUTIONS_SQL.format(p="%s", events="events e"), 0
        while rows := self._all(sql, (space, after)):
            after = rows[-1][0]
            yield from map(event_resolution, rows)

    def iter_events(self, space: str, *, after_sequence: int = 0) -> Iterator[EventRecord]:
        """Every stored message after a sequence, in ingest order, read in pages (each a query of its own)."""
        sql = (
            f"SELECT {EVENT_COLUMNS} FROM events WHERE space = %s AND sequence > %s "
            f"ORDER BY sequence LIMIT {EVENTS_PAGE}"
        )
        after = after_sequence
        while rows := self._all(sql, (space, after)):
            after = rows[-1][-1]
            yield from map(event_record, rows)

    def blocked_values(self, space: str) -> frozenset[str]:
        """Every identifier that a blocked-values rule dropped from some message."""
        return frozenset(row[0] for row in self._all(BLOCKED_VALUES_SQL.format(p="%s"), (space,)))

    def dump(self, space: str) -> dict[str, Any]:
        """The graph of a space, canonical (sorted, times as microseconds), equal to SQLiteStore.dump."""
        with self._reading() as db:
            dump = {
                name: [list(row) for row in db.execute(sql.format(space="%s"), (space,))]
                for name, sql in DUMP_QUERIES.items()
            }
        for row in dump["identifiers"]:
            row[6] = int(row[6])  # retired: a boolean here, 0/1 in SQLite
        return dump


_PASSWORD_IN_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:([^/@]+)@")


def _without_password(text: str, url: str) -> str:
    """`text` with the URL's password replaced: libpq quotes a URL it cannot parse, password and all."""
    found = _PASSWORD_IN_URL.match(url)
    return text.replace(found.group(1), "…") if found else text


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://…"  # where a password would sit in a URL libpq cannot parse is anyone's guess
    # Whole, search_path included (errors may say "a wrong URL"), as `idstitch migrate` prints it.
    return redact_url(url)
