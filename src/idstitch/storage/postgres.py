"""The PostgreSQL store: many processes resolve into one graph at once, serialised per identifier.

Concurrency. Every writer locks what it is about to read and change, with transaction-scoped advisory
locks on 64-bit hashes:

- `claim` locks the message id and every identifier the message carries, in sorted order;
- `load_view` then locks the root profile of every identifier it finds (and of a device's owner), and
  reads again until the roots it holds are the roots the graph shows (a merge may have moved them).

Whoever changes an identifier row holds that identifier's lock or its root profile's lock (a merge holds
both roots), so once both are held the neighbourhood cannot change under the resolver: read, decide,
write, commit. Messages on disjoint identifiers and profiles take disjoint locks and never wait on each
other.

Deadlock freedom: a transaction waits for a lock only while it holds none (the first message of a
transaction, whose claim is taken in sorted order). Every later lock is a try-lock; when it is busy the
store raises LockBusy and the engine commits what it has done and starts the message again in a fresh
transaction. Deadlocks PostgreSQL detects anyway (a unique index waiting on a concurrent insert),
serialisation failures and lost connections become StoreConflict, which the engine retries.

Schema: storage/migrations/postgres (the SQLite schema in PostgreSQL's types, ready for Citus: every
table leads with `space`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from typing import Any

import msgspec
import psycopg
import psycopg.errors
from psycopg_pool import ConnectionPool

from idstitch.core.errors import ConfigError
from idstitch.core.graph import GraphView, ProfileState, StoredIdentifier
from idstitch.core.identifiers import Dropped, Identifier
from idstitch.core.resolve import Resolution
from idstitch.storage.base import (
    DroppedRecord,
    EventQuery,
    EventRecord,
    EventResolution,
    IdentifierRecord,
    LockBusy,
    MergeRecord,
    ProfileActivity,
    ProfileRecord,
    SourceRecord,
    SpaceStats,
    StoreConflict,
    SuspectRecord,
    TokenRecord,
    TraitRecord,
)
from idstitch.storage.migrations import read_migrations
from idstitch.storage.rows import (
    BLOCKED_VALUES_SQL,
    DUMP_QUERIES,
    EVENT_COLUMNS,
    EVENT_INSERT_COLUMNS,
    EVENT_RESOLUTIONS_SQL,
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
from idstitch.storage.times import from_micros, to_micros

__all__ = ["PostgresStore", "PostgresTransaction", "lock_key"]

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode

# Taken around migrations, so that workers started together migrate once.
_MIGRATION_LOCK = 0x1D5_7C4_0001


def lock_key(kind: str, space: str, *parts: str) -> int:
    """The advisory lock key (signed 64-bit) of a message (`m`), identifier (`i`) or profile (`p`)."""
    text = "\x1f".join((kind, space, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big", signed=True)


# This process ANALYZEs the graph tables after writing this many messages, then 4x as many, … up to
# the last (autovacuum keeps the statistics of a grown graph; see PostgresStore._grown).
_FIRST_ANALYZE = 500
_LAST_ANALYZE = 2_000_000

# Errors after which the transaction may simply run again; PoolTimeout (no connection) is one too.
_RETRYABLE = (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure, psycopg.OperationalError)


class PostgresStore:
    """A store in a PostgreSQL database (`postgresql://user@host:port/db`, any libpq URL)."""

    def __init__(self, url: str, *, read_only: bool = False, max_connections: int = 8) -> None:
        self.url = url
        self.read_only = read_only
        self._events_written = 0
        self._analyze_at = _FIRST_ANALYZE
        try:
            # One plain connection first: an unreachable server or a refused login fails at once, with
            # libpq's own words, instead of after the pool's retries.
            psycopg.connect(url, connect_timeout=10).close()
        except psycopg.Error as error:
            reason = " ".join(str(error).split())
            raise ConfigError(f"store {_safe(url)}: cannot connect to PostgreSQL: {reason}") from error
        self._pool = ConnectionPool(
            url,
            min_size=1,
            max_size=max_connections,
            kwargs={"autocommit": True},
            open=True,
            timeout=30,
            name="idstitch",
            # A connection that died while idle in the pool (a server restart, a failover,
            # pg_terminate_backend, an idle timeout) is replaced when taken, not handed out to fail:
            # one empty round trip per checkout, and a checkout serves a whole transaction or read.
            check=ConnectionPool.check_connection,
        )
        try:
            if read_only:
                self._check_schema()
            else:
                self._migrate()
        except BaseException:
            self._pool.close()
            raise

    def close(self) -> None:
        """Close every connection."""
        self._pool.close()

    # -- schema ------------------------------------------------------------------------------
    def _migrate(self) -> None:
        with self._pool.connection() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
            if db.execute("SELECT current_schema()").fetchone() == (None,):
                raise ConfigError(f"store {_safe(self.url)}: the search_path names no existing schema")
            db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations "
                "(version integer PRIMARY KEY, name text NOT NULL, applied_at timestamptz NOT NULL)"
            )
            applied = {row[0] for row in db.execute("SELECT version FROM schema_migrations")}
            for version, name, script in read_migrations("postgres"):
                if version not in applied:
                    db.execute(script.encode())  # several statements: no parameters, simple protocol
                    db.execute("INSERT INTO schema_migrations VALUES (%s, %s, now())", (version, name))

    def _check_schema(self) -> None:
        latest = read_migrations("postgres")[-1][0]
        try:
            version = self.schema_version()
        except psycopg.errors.UndefinedTable:
            version = 0
        if version != latest:
            raise ConfigError(
                f"store {_safe(self.url)} is at schema version {version}, this build reads {latest}: "
                "open it once for writing (e.g. `idstitch serve`) to migrate it"
            )

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
            with self._pool.connection() as db, db.transaction(), db.pipeline():
                transaction = PostgresTransaction(db)
                yield transaction
        except _RETRYABLE as error:
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
        with self._pool.connection() as db:
            db.execute("ANALYZE profiles, identifiers, evidence, suspects, events, traits, links")

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
        with self._pool.connection() as db, db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("t", token.space, token.kind),))
            row = db.execute(TOKEN_OF_KIND_SQL.format(p="%s"), (token.space, token.kind)).fetchone()
            if row is not None:
                return TokenRecord(token.space, row[0], token.kind)
            db.execute(INSERT_TOKEN_SQL.format(p="%s"), (token.token, token.space, token.kind))
        return token

    def _write(self, sql: str, parameters: Sequence[Any]) -> None:
        if self.read_only:
            raise ConfigError(f"store {_safe(self.url)} was opened read-only")
        with self._pool.connection() as db:
            db.execute(sql, parameters)

    # -- reads -------------------------------------------------------------------------------
    def _all(self, sql: str, parameters: Sequence[Any]) -> list[tuple[Any, ...]]:
        with self._pool.connection() as db:
            return db.execute(sql, parameters).fetchall()

    def _one(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any]) -> tuple[Any, ...] | None:
        with self._pool.connection() as db:
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
        with self._pool.connection() as db:
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

    def trait_records(self, space: str, profile_id: str) -> list[TraitRecord]:
        """Current traits of a root with their source and time, by key."""
        rows = self._all(
            "SELECT key, value, source, set_at FROM traits WHERE space = %s AND profile_id = %s "
            "AND value IS NOT NULL ORDER BY key",
            (space, profile_id),
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
        with self._pool.connection() as db:
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
        with self._pool.connection() as db:
            family, column = self._family(db, space, profile_id)
            row = db.execute(
                f"SELECT count(*) FROM events WHERE space = %s AND {column} = ANY(%s)", (space, family)
            ).fetchone()
        return int(row[0]) if row is not None else 0

    def events(
        self, space: str, profile_id: str, *, limit: int = 10, after_sequence: int | None = None
    ) -> list[EventRecord]:
        """Events of a root's family, newest ingested first; page with the last sequence seen."""
        with self._pool.connection() as db:
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
        with self._pool.connection() as db:
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

    def links(self, space: str, profile_id: str) -> list[str]:
        """Roots of the other collection linked to a root."""
        with self._pool.connection() as db:
            _, column = self._family(db, space, profile_id)
            if column == "account_id":
                sql = "SELECT user_id FROM links WHERE space = %s AND account_id = %s ORDER BY at, user_id"
            else:
                sql = "SELECT account_id FROM links WHERE space = %s AND user_id = %s ORDER BY at, account_id"
            return [row[0] for row in db.execute(sql, (space, profile_id))]

    def merges(self, space: str, profile_id: str) -> list[MergeRecord]:
        """Merge log of a root's family."""
        with self._pool.connection() as db:
            family, _ = self._family(db, space, profile_id)
            rows = db.execute(
                "SELECT parent_id, child_id, message_id, via, at FROM merges WHERE space = %s "
                "AND parent_id = ANY(%s) ORDER BY sequence",
                (space, family),
            ).fetchall()
        return [merge_record(row) for row in rows]

    def dropped(self, space: str, profile_id: str) -> list[DroppedRecord]:
        """Dropped identifiers of a root's family."""
        with self._pool.connection() as db:
            family, _ = self._family(db, space, profile_id)
            rows = db.execute(
                "SELECT message_id, identifier, rule, at, profile_id FROM dropped WHERE space = %s "
                "AND profile_id = ANY(%s) ORDER BY sequence",
                (space, family),
            ).fetchall()
        return [dropped_record(row) for row in rows]

    def suspects(self, space: str) -> list[SuspectRecord]:
        """Suspect identifiers of a space."""
        rows = self._all(
            "SELECT type, value, collection, evidence_type, evidence_values, message_id, at FROM suspects "
            "WHERE space = %s ORDER BY at, type, value",
            (space,),
        )
        return [suspect_record(row) for row in rows]

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

    def blocked_values(self, space: str) -> frozenset[str]:
        """Every identifier that a blocked-values rule dropped from some message."""
        return frozenset(row[0] for row in self._all(BLOCKED_VALUES_SQL.format(p="%s"), (space,)))

    def dump(self, space: str) -> dict[str, Any]:
        """The graph of a space, canonical (sorted, times as microseconds), equal to SQLiteStore.dump."""
        with self._pool.connection() as db:
            dump = {
                name: [list(row) for row in db.execute(sql.format(space="%s"), (space,))]
                for name, sql in DUMP_QUERIES.items()
            }
        for row in dump["identifiers"]:
            row[6] = int(row[6])  # retired: a boolean here, 0/1 in SQLite
        return dump


def _still_roots(rows: list[_Owned], roots: list[str], root_rows: list[tuple[Any, ...]]) -> bool:
    """Whether the identifiers read before their roots were locked are still where the roots say."""
    members: set[tuple[str, str, str, str]] = set()
    for segment_id, _, _, _, parent_id, collections, types, values, *_ in root_rows:
        if parent_id is not None:
            return False  # merged into another profile meanwhile
        members.update(
            zip(
                [segment_id] * len(collections or ()),
                collections or (),
                types or (),
                values or (),
                strict=True,
            )
        )
    if len(root_rows) != len(roots):
        return False
    return all(row[3] is None or (row[3], row[0], row[1], row[2]) in members for row in rows)


def _profile_states(roots: list[str], root_rows: list[tuple[Any, ...]]) -> dict[str, ProfileState]:
    """ProfileStates of roots from the rows of _ROOTS_SQL."""
    states = {}
    for (
        segment_id,
        collection,
        created_at,
        count,
        _,
        collections,
        types,
        values,
        first,
        last,
        retired,
    ) in root_rows:
        members = tuple(
            StoredIdentifier(
                Identifier(kind, value, member_collection), segment_id, from_micros(f), from_micros(t), gone
            )
            for member_collection, kind, value, f, t, gone in zip(
                collections or (),
                types or (),
                values or (),
                first or (),
                last or (),
                retired or (),
                strict=True,
            )
        )
        states[segment_id] = ProfileState(segment_id, collection, from_micros(created_at), count, members)
    return {root: states[root] for root in roots}


def _safe(url: str) -> str:
    """The URL without its password, for messages."""
    try:
        info = psycopg.conninfo.conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://…"
    user = f"{info['user']}@" if info.get("user") else ""
    return f"postgresql://{user}{info.get('host', '')}:{info.get('port', 5432)}/{info.get('dbname', '')}"


# The neighbourhood of identifiers in one statement: each identifier's row (if any), the root of its
# device owner, and whether it is suspect. LATERAL with OFFSET 0 (which keeps the planner from
# flattening it into a join), so that every lookup is a primary-key probe whatever the planner believes
# about the tables' sizes: as a plain join to `unnest` it was planned as a scan of the whole collection
# while the statistics still described an empty table.
_OWNED_SQL = (
    "SELECT k.collection, k.type, k.value, i.profile_id, i.first_seen, i.last_seen, i.retired, i.owner, "
    "i.device_owner_at, EXISTS (SELECT FROM suspects s WHERE s.space = %(space)s "
    "AND s.collection = k.collection AND s.type = k.type AND s.value = k.value), "
    "e.other_types, e.other_values, e.seen "
    "FROM unnest(%(collections)s::text[], %(types)s::text[], %(values)s::text[]) AS k(collection, type, value) "
    "LEFT JOIN LATERAL (SELECT i.profile_id, i.first_seen, i.last_seen, i.retired, i.device_owner_at, "
    "(SELECT coalesce(o.parent_id, o.segment_id) FROM profiles o "
    "WHERE o.space = %(space)s AND o.segment_id = i.device_owner) AS owner "
    "FROM identifiers i WHERE i.space = %(space)s AND i.collection = k.collection "
    "AND i.type = k.type AND i.value = k.value OFFSET 0) AS i ON true "
    "CROSS JOIN LATERAL (SELECT array_agg(e.other_type) AS other_types, array_agg(e.other_value) AS other_values, "
    "array_agg(e.last_seen) AS seen FROM evidence e WHERE e.space = %(space)s AND e.collection = k.collection "
    "AND e.type = k.type AND e.value = k.value) AS e"
)
_STORED_SQL = "SELECT EXISTS (SELECT FROM events WHERE space = %s AND message_id = %s)"
# Root profiles with their members, one row per root (the members as parallel arrays).
_ROOTS_SQL = (
    "SELECT p.segment_id, p.collection, p.created_at, p.merge_count, p.parent_id, "
    "m.collections, m.types, m.values, m.first_seen, m.last_seen, m.retired "
    "FROM unnest(%(roots)s::text[]) AS r(segment_id) "
    "JOIN profiles p ON p.space = %(space)s AND p.segment_id = r.segment_id "
    "CROSS JOIN LATERAL (SELECT array_agg(i.collection) AS collections, array_agg(i.type) AS types, "
    "array_agg(i.value) AS values, array_agg(i.first_seen) AS first_seen, array_agg(i.last_seen) AS last_seen, "
    "array_agg(i.retired) AS retired FROM identifiers i "
    "WHERE i.space = %(space)s AND i.profile_id = p.segment_id) AS m"
)

_Key = tuple[str, str, str]  # collection, type, value
_Owned = tuple[Any, ...]  # a row of _OWNED_SQL


def _arrays(space: str, identifiers: Sequence[Identifier]) -> dict[str, Any]:
    """Identifiers as parallel arrays for `unnest`: one statement for all of them."""
    return {
        "space": space,
        "collections": [item.collection for item in identifiers],
        "types": [item.type for item in identifiers],
        "values": [item.value for item in identifiers],
    }


class PostgresTransaction:
    """The write side of one open transaction: locks, then reads, then writes, all pipelined.

    The connection is in pipeline mode: writes are sent without waiting for their answers, and go out
    with the next read (or the commit). A message costs about three round trips: its claim (locks, the
    duplicate check, its identifiers' rows and evidence in one go), its roots (locks, a check that they
    are still roots, their profiles), and the commit it shares with the rest of the transaction. An
    error of a write surfaces at the next read and fails the whole transaction.
    """

    def __init__(self, db: psycopg.Connection[Any]) -> None:
        self.db = db
        self._writes = db.cursor()
        self._held: set[int] = set()
        self.events = 0  # messages stored in this transaction
        self._message: tuple[str, str, bool] | None = None  # (space, message id, stored) of the claim
        self._owned: dict[_Key, _Owned] = {}  # rows read after their identifiers' locks were taken

    def _send(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any]) -> None:
        """Queue a write (its errors surface with the next read)."""
        self._owned.clear()  # rows read before a write may describe what it changes
        self._message = None
        self._writes.execute(sql, parameters)

    def _send_many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        """Queue one write per row."""
        self._owned.clear()
        self._message = None
        self._writes.executemany(sql, rows)

    def _ask(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any]) -> psycopg.Cursor[Any]:
        """Queue a read; its rows come with the next fetch (one round trip for everything queued)."""
        cursor = self.db.cursor()
        cursor.execute(sql, parameters)
        return cursor

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit that rolls back alone, and with it the advisory locks it took."""
        held = set(self._held)
        self._writes.execute("SAVEPOINT message")
        try:
            yield
        except psycopg.Error:
            raise  # the transaction is lost as a whole; rolling back to here would not be heard
        except BaseException:
            self._writes.execute("ROLLBACK TO message")
            self._writes.execute("RELEASE message")
            self._held = held  # ROLLBACK TO SAVEPOINT released the locks taken since
            self._owned.clear()  # rows read inside may describe writes now undone
            raise
        self._writes.execute("RELEASE message")

    def _queue_lock(self, keys: Sequence[int]) -> tuple[list[int], psycopg.Cursor[Any] | None]:
        """Queue the advisory locks not yet held: waiting, in sorted order, if none is held yet."""
        wanted = sorted(set(keys) - self._held)
        if not wanted:
            return wanted, None
        if not self._held:
            # Sorted, one after the other (unnest keeps the array's order): two transactions that
            # wait this way cannot wait on each other in a cycle.
            self._held.update(wanted)
            return wanted, self._ask(
                "SELECT key, pg_advisory_xact_lock(key) IS NOT NULL FROM unnest(%s::bigint[]) AS key",
                (wanted,),
            )
        return wanted, self._ask(
            "SELECT key, pg_try_advisory_xact_lock(key) FROM unnest(%s::bigint[]) AS key", (wanted,)
        )

    def _check_lock(self, cursor: psycopg.Cursor[Any] | None) -> None:
        if cursor is None:
            return
        rows = cursor.fetchall()
        self._held.update(key for key, taken in rows if taken)
        if not all(taken for _, taken in rows):
            raise LockBusy("a concurrent transaction holds an identifier or profile of this message")

    def claim(self, space: str, message_id: str, identifiers: Sequence[Identifier]) -> None:
        """Lock the message id and its identifiers until commit; read what they are now, in one go."""
        _, locking = self._queue_lock(
            [
                lock_key("m", space, message_id),
                *(lock_key("i", space, item.collection, item.type, item.value) for item in identifiers),
            ]
        )
        # A separate statement from the lock: a statement reads the snapshot of its start, before the
        # lock was granted.
        stored = self._ask(_STORED_SQL, (space, message_id))
        owned = self._ask(_OWNED_SQL, _arrays(space, identifiers)) if identifiers else None
        self._owned.clear()
        self._message = None
        self._check_lock(locking)
        row = stored.fetchone()
        self._message = (space, message_id, bool(row and row[0]))
        if owned is not None:
            self._owned = {(row[0], row[1], row[2]): row for row in owned.fetchall()}

    def has_message(self, space: str, message_id: str) -> bool:
        """Whether the message id is stored in this space."""
        if self._message is not None and self._message[:2] == (space, message_id):
            return self._message[2]
        row = self._ask(_STORED_SQL, (space, message_id)).fetchone()
        return bool(row and row[0])

    def load_view(self, space: str, collection: str, identifiers: Sequence[Identifier]) -> GraphView:
        """Lock the identifiers and their roots, then read owners, profiles, evidence and suspects."""
        keys = [(collection, item.type, item.value) for item in identifiers]
        wanted = [Identifier(item.type, item.value, collection) for item in identifiers]
        if not all(key in self._owned for key in keys):
            # Not claimed: lock and read them now (the engine claims first; direct callers may not).
            _, locking = self._queue_lock([lock_key("i", space, *key) for key in keys])
            owned_rows = self._ask(_OWNED_SQL, _arrays(space, wanted))
            self._check_lock(locking)
            self._owned.update({(row[0], row[1], row[2]): row for row in owned_rows.fetchall()})
        rows = [self._owned[key] for key in keys]
        states: dict[str, ProfileState] = {}
        while True:
            roots = list(dict.fromkeys(root for row in rows for root in (row[3], row[7]) if root is not None))
            if not roots:
                break
            _, locking = self._queue_lock([lock_key("p", space, root) for root in roots])
            found = self._ask(_ROOTS_SQL, {"space": space, "roots": roots})
            self._check_lock(locking)
            root_rows = found.fetchall()
            if locking is None or _still_roots(rows, roots, root_rows):
                # Locked before these rows were read, or checked: nothing can move them now.
                states = _profile_states(roots, root_rows)
                break
            # A merge moved a root before we locked it: read again, lock the new roots.
            rows = self._ask(_OWNED_SQL, _arrays(space, wanted)).fetchall()
            self._owned.update({(row[0], row[1], row[2]): row for row in rows})
        owned: dict[Identifier, StoredIdentifier] = {}
        suspects: set[Identifier] = set()
        evidence: dict[Identifier, dict[Identifier, datetime]] = {}
        for identifier, row in zip(identifiers, rows, strict=True):
            profile_id, first_seen, last_seen, retired, owner, owner_at, suspect, types, values, seen = row[
                3:
            ]
            if profile_id is not None:
                owned[identifier] = StoredIdentifier(
                    identifier,
                    profile_id,
                    from_micros(first_seen),
                    from_micros(last_seen),
                    retired,
                    owner,
                    None if owner_at is None else from_micros(owner_at),
                )
            if suspect:
                suspects.add(identifier)  # a suspect stays suspect: its evidence is never needed again
            elif types:
                evidence[identifier] = {
                    Identifier(other_type, other_value, collection): from_micros(at)
                    for other_type, other_value, at in zip(types, values, seen, strict=True)
                }
        return GraphView(owned, states, evidence, frozenset(suspects))

    def apply_resolution(
        self, space: str, resolution: Resolution, message_id: str, source: str | None = None
    ) -> None:
        """Write one collection's decision."""
        target = resolution.profile_id
        collection = resolution.collection
        now = to_micros(resolution.timestamp)
        if resolution.created:
            self._send(
                "INSERT INTO profiles (space, segment_id, collection, created_at, created_by) "
                "VALUES (%s, %s, %s, %s, %s)",
                (space, target, collection, to_micros(resolution.created_at), message_id),
            )
        for step in resolution.merges:
            self._merge(space, collection, target, step.child_id, message_id, str(step.via), now)
        if resolution.added:
            self._send(
                "INSERT INTO identifiers (space, collection, type, value, profile_id, first_seen, last_seen, "
                "source, first_message_id) SELECT %(space)s, k.collection, k.type, k.value, %(target)s, "
                "%(now)s, %(now)s, %(source)s, %(message)s "
                "FROM unnest(%(collections)s::text[], %(types)s::text[], %(values)s::text[]) "
                "AS k(collection, type, value)",
                {
                    **_arrays(space, resolution.added),
                    "target": target,
                    "now": now,
                    "source": source,
                    "message": message_id,
                },
            )
        # Row by row by primary key (executemany pipelines them into one round trip); only rows
        # that change are rewritten (no dead tuple for an unchanged row).
        if resolution.touched:
            self._send_many(
                "UPDATE identifiers SET last_seen = greatest(last_seen, %s), first_seen = least(first_seen, %s) "
                "WHERE space = %s AND collection = %s AND type = %s AND value = %s "
                "AND (last_seen < %s OR first_seen > %s)",
                [
                    (now, now, space, item.collection, item.type, item.value, now, now)
                    for item in resolution.touched
                ],
            )
        if resolution.retired:
            self._send_many(
                "UPDATE identifiers SET retired = true WHERE space = %s AND collection = %s AND type = %s "
                "AND value = %s AND NOT retired",
                [(space, item.collection, item.type, item.value) for item in resolution.retired],
            )
        if resolution.device_owned:
            self._send_many(
                "UPDATE identifiers SET device_owner = %s, device_owner_at = %s WHERE space = %s "
                "AND collection = %s AND type = %s AND value = %s "
                "AND (device_owner_at IS NULL OR device_owner_at <= %s)",
                [
                    (target, now, space, item.collection, item.type, item.value, now)
                    for item in resolution.device_owned
                ],
            )
        if resolution.evidence:
            self._send_many(
                "INSERT INTO evidence VALUES (%s, %s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (space, collection, type, value, other_type, other_value) DO UPDATE "
                "SET last_seen = excluded.last_seen WHERE evidence.last_seen < excluded.last_seen",
                sorted(
                    {
                        (space, lower.collection, lower.type, lower.value, higher.type, higher.value, now)
                        for lower, higher in resolution.evidence
                    }
                ),
            )
        if resolution.suspects:
            self._send_many(
                "INSERT INTO suspects VALUES (%s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT DO NOTHING",
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
        if resolution.dropped:
            self.record_dropped(space, resolution.dropped, message_id, resolution.timestamp, target)

    def _merge(
        self, space: str, collection: str, target: str, child: str, message_id: str, via: str, at: int
    ) -> None:
        parameters = {"target": target, "child": child, "space": space, "at": at}
        # One round trip: the child and its former children point at the target, which counts them.
        self._send(
            "WITH moved AS (UPDATE profiles SET parent_id = %(target)s, merged_at = %(at)s "
            "WHERE space = %(space)s AND (segment_id = %(child)s OR parent_id = %(child)s) "
            "RETURNING segment_id, merge_count) "
            "UPDATE profiles SET merge_count = merge_count + "
            "(SELECT merge_count + 1 FROM moved WHERE segment_id = %(child)s) "
            "WHERE space = %(space)s AND segment_id = %(target)s",
            parameters,
        )
        self._send(
            "UPDATE identifiers SET profile_id = %(target)s WHERE space = %(space)s AND profile_id = %(child)s",
            parameters,
        )
        # Per trait key the newest value (with its source) wins; the parent keeps its value on a tie.
        self._send(
            "INSERT INTO traits (space, profile_id, key, value, set_at, source) "
            "SELECT space, %(target)s, key, value, set_at, source FROM traits "
            "WHERE space = %(space)s AND profile_id = %(child)s "
            "ON CONFLICT (space, profile_id, key) DO UPDATE SET value = excluded.value, "
            "set_at = excluded.set_at, source = excluded.source WHERE excluded.set_at > traits.set_at",
            parameters,
        )
        self._send("DELETE FROM traits WHERE space = %(space)s AND profile_id = %(child)s", parameters)
        own, other = ("account_id", "user_id") if collection == "accounts" else ("user_id", "account_id")
        self._send(
            f"INSERT INTO links (space, {own}, {other}, at) "
            f"SELECT space, %(target)s, {other}, at FROM links WHERE space = %(space)s AND {own} = %(child)s "
            "ON CONFLICT DO NOTHING",
            parameters,
        )
        self._send(f"DELETE FROM links WHERE space = %(space)s AND {own} = %(child)s", parameters)
        self._send(
            "INSERT INTO merges (space, parent_id, child_id, message_id, via, at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            (space, target, child, message_id, via, at),
        )

    def record_dropped(
        self, space: str, dropped: Sequence[Dropped], message_id: str, at: datetime, profile_id: str | None
    ) -> None:
        """Record dropped identifiers."""
        micros = to_micros(at)
        self._send_many(
            "INSERT INTO dropped (space, profile_id, message_id, identifier, rule, at) "
            "VALUES (%s, %s, %s, %s, %s, %s)",
            [(space, profile_id, message_id, str(item.identifier), item.rule, micros) for item in dropped],
        )

    def set_traits(
        self,
        space: str,
        profile_id: str,
        updates: Mapping[str, Any],
        at: datetime,
        source: str | None = None,
    ) -> None:
        """Set traits (with the source that sent them) unless a newer value is stored."""
        self._send(
            "INSERT INTO traits (space, profile_id, key, value, set_at, source) "
            "SELECT %s, %s, t.key, t.value, %s, %s FROM unnest(%s::text[], %s::text[]) AS t(key, value) "
            "ON CONFLICT (space, profile_id, key) DO UPDATE "
            "SET value = excluded.value, set_at = excluded.set_at, source = excluded.source "
            "WHERE excluded.set_at >= traits.set_at",
            (
                space,
                profile_id,
                to_micros(at),
                source,
                list(updates),
                [None if value is None else _json_encode(value).decode() for value in updates.values()],
            ),
        )

    def link(self, space: str, user_id: str, account_id: str, at: datetime) -> None:
        """Link a user and an account."""
        self._send(
            "INSERT INTO links VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
            (space, user_id, account_id, to_micros(at)),
        )

    def add_event(self, space: str, event: EventRecord) -> None:
        """Store a message."""
        self.events += 1
        self._send(
            f"INSERT INTO events ({EVENT_INSERT_COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            event_row(space, event),
        )

    def learn_types(self, space: str, types: Sequence[tuple[str, str]]) -> None:
        """Append custom types in first-seen order (a type another writer learned first keeps its place)."""
        self._send(
            "INSERT INTO learned_types (space, position, type, collection) "
            "SELECT %s, coalesce((SELECT max(position) FROM learned_types WHERE space = %s), 0) + ordinal, "
            "type, collection FROM unnest(%s::text[], %s::text[]) WITH ORDINALITY AS t(type, collection, ordinal) "
            "ON CONFLICT DO NOTHING",
            (space, space, [item[0] for item in types], [item[1] for item in types]),
        )
