"""One PostgreSQL write transaction: locks, a copy of what it locked, and writes sent in bulk.

A worker that sent each message's reads and writes as statements of their own spent most of its CPU,
and PostgreSQL most of its own, on statements: about fifteen per message. Here a transaction

- claims its messages at once (`claim_many`): one statement waits, in sorted order, for the first
  message's locks (its id, its identifiers and the roots they had a moment before), one takes the next
  messages' while they are free, then a few statements read what the locks protect and try its roots;
- keeps what it read in a transaction-scoped `GraphCache`, which it updates as it writes: everything in
  it is locked, so no other writer can change it, and the resolver's reads need no SQL;
- holds its writes back and sends them in bulk (one statement per table, `jsonb_array_elements` of
  one JSON parameter) when it commits, when a merge needs the rows before it, or before reading what
  it did not claim.

A message that fails inside its savepoint drops the writes it held back; the SQL savepoint is sent only
if something was written while it was open. See `postgres.py` for the locking protocol.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import msgspec
import psycopg

from idstitch.core.graph import GraphView
from idstitch.core.identifiers import Dropped, Identifier
from idstitch.core.resolve import Resolution
from idstitch.storage.base import EventRecord, LockBusy
from idstitch.storage.graph_cache import (
    GraphCache,
    GraphCacheReader,
    IdentifierEntry,
    IdentifierKey,
    ProfileEntry,
    seen_together,
)
from idstitch.storage.postgres_writes import HeldWrites
from idstitch.storage.rows import event_row
from idstitch.storage.times import to_micros

__all__ = ["PostgresTransaction", "lock_key"]

_json_encode = msgspec.json.encode

# Advisory locks a transaction takes before it commits and goes on in a new one. They live in the
# server's lock table, shared by every session (max_locks_per_transaction × max_connections entries,
# 6,400 by default, with some slack): `idstitch ingest --batch-size 12000` held ~18,000 and failed with
# "out of shared memory", after retrying it for two minutes.
_LOCK_BUDGET = 4096


def lock_key(kind: str, space: str, *parts: str) -> int:
    """The advisory lock key (signed 64-bit) of a message (`m`), identifier (`i`) or profile (`p`)."""
    text = "\x1f".join((kind, space, *parts)).encode()
    return int.from_bytes(hashlib.blake2b(text, digest_size=8).digest(), "big", signed=True)


# The neighbourhood of identifiers in one statement: each identifier's row (if any), the root of its
# device owner, whether it is suspect, and its evidence. LATERAL with OFFSET 0 (which keeps the planner
# from flattening it into a join), so that every lookup is a primary-key probe whatever the planner
# believes about the tables' sizes: as a plain join to `unnest` it was planned as a scan of the whole
# collection while the statistics still described an empty table.
_KEYS_SQL = (
    "(SELECT r->>0 AS collection, r->>1 AS type, r->>2 AS value "
    "FROM jsonb_array_elements(%(keys)s::jsonb) AS r) AS k(collection, type, value)"
)
_IDENTIFIER_SQL = (
    "LEFT JOIN LATERAL (SELECT i.profile_id, i.first_seen, i.last_seen, i.retired, i.device_owner_at, "
    "(SELECT coalesce(o.parent_id, o.segment_id) FROM profiles o "
    "WHERE o.space = %(space)s AND o.segment_id = i.device_owner) AS owner "
    "FROM identifiers i WHERE i.space = %(space)s AND i.collection = k.collection "
    "AND i.type = k.type AND i.value = k.value OFFSET 0) AS i ON true"
)
_OWNED_SQL = (
    "SELECT k.collection, k.type, k.value, i.profile_id, i.first_seen, i.last_seen, i.retired, i.owner, "
    "i.device_owner_at, EXISTS (SELECT FROM suspects s WHERE s.space = %(space)s "
    "AND s.collection = k.collection AND s.type = k.type AND s.value = k.value), "
    f"e.other_types, e.other_values, e.seen FROM {_KEYS_SQL} {_IDENTIFIER_SQL} "
    "CROSS JOIN LATERAL (SELECT array_agg(e.other_type) AS other_types, array_agg(e.other_value) AS other_values, "
    "array_agg(e.last_seen) AS seen FROM evidence e WHERE e.space = %(space)s AND e.collection = k.collection "
    "AND e.type = k.type AND e.value = k.value) AS e"
)
# The same rows without suspects and evidence: enough to see which roots to lock.
_GUESS_SQL = (
    "SELECT k.collection, k.type, k.value, i.profile_id, i.first_seen, i.last_seen, i.retired, i.owner, "
    f"i.device_owner_at FROM {_KEYS_SQL} {_IDENTIFIER_SQL}"
)
_STORED_SQL = "SELECT EXISTS (SELECT FROM events WHERE space = %s AND message_id = %s)"
_STORED_MANY_SQL = (
    "SELECT message_id FROM events WHERE space = %s "
    "AND message_id IN (SELECT jsonb_array_elements_text(%s::jsonb))"
)
# Root profiles with their members, one row per root (the members as parallel arrays); LATERAL … OFFSET 0
# for primary-key probes, as above.
_ROOTS_SQL = (
    "SELECT p.segment_id, p.collection, p.created_at, p.merge_count, p.parent_id, "
    "m.collections, m.types, m.values, m.first_seen, m.last_seen, m.retired "
    "FROM jsonb_array_elements_text(%(roots)s::jsonb) AS r(segment_id) "
    "CROSS JOIN LATERAL (SELECT * FROM profiles p WHERE p.space = %(space)s AND p.segment_id = r.segment_id "
    "OFFSET 0) AS p "
    "CROSS JOIN LATERAL (SELECT array_agg(i.collection) AS collections, array_agg(i.type) AS types, "
    "array_agg(i.value) AS values, array_agg(i.first_seen) AS first_seen, array_agg(i.last_seen) AS last_seen, "
    "array_agg(i.retired) AS retired FROM identifiers i "
    "WHERE i.space = %(space)s AND i.profile_id = p.segment_id) AS m"
)
_LOCK_KEYS = "(SELECT value::bigint FROM jsonb_array_elements_text(%s::jsonb)) AS k(key)"
_WAIT_FOR_LOCKS_SQL = f"SELECT key, pg_advisory_xact_lock(key) IS NOT NULL FROM {_LOCK_KEYS}"
_TRY_LOCKS_SQL = f"SELECT key, pg_try_advisory_xact_lock(key) FROM {_LOCK_KEYS}"
# Messages' locks (a JSON array of arrays, one per message), taken message by message while all of a
# message's locks are free; answers how many messages got all theirs. A recursive CTE runs in order
# and stops at the first message that finds one busy.
_TRY_LOCKS_IN_ORDER_SQL = (
    "WITH RECURSIVE taken(message, ok) AS (SELECT 0, true UNION ALL "
    "SELECT t.message + 1, (SELECT bool_and(pg_try_advisory_xact_lock(k.value::bigint)) "
    "FROM jsonb_array_elements_text(%(plans)s::jsonb -> t.message) AS k) "
    "FROM taken AS t WHERE t.ok AND t.message < %(count)s) "
    "SELECT max(message) FROM taken WHERE ok"
)

_PROBES_ONLY_SQL = (
    "SELECT set_config('enable_hashjoin', 'off', true), set_config('enable_mergejoin', 'off', true)"
)

_Owned = tuple[Any, ...]  # a row of _OWNED_SQL
_MessageKey = tuple[str, str]  # space, message id


# Parameters go as JSON (msgspec encodes in C; psycopg's array dumper is Python and costs ~15x more).
_encode = msgspec.json.Encoder().encode


def _json(value: Any) -> str:
    """A parameter for `%s::jsonb`."""
    return _encode(value).decode()


def _arrays(space: str, keys: Sequence[IdentifierKey]) -> dict[str, Any]:
    """Identifier keys of one space as the parameters of _OWNED_SQL: one statement for all of them."""
    return {"space": space, "keys": _json([key[1:] for key in keys])}


def _roots_of(rows: Sequence[_Owned]) -> list[str]:
    """The profiles the rows name: their owners and their device owners' roots, first seen first."""
    return list(dict.fromkeys(root for row in rows for root in (row[3], row[7]) if root is not None))


def _still_roots(rows: Sequence[_Owned], roots: Sequence[str], root_rows: Sequence[tuple[Any, ...]]) -> bool:
    """Whether rows read before `roots` were locked still agree with them: each is still a root and
    still owns the rows that named it."""
    if len(root_rows) != len(roots):
        return False
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
    wanted = set(roots)
    return all(
        row[3] is None or row[3] not in wanted or (row[3], row[0], row[1], row[2]) in members for row in rows
    )


@dataclass
class _Savepoint:
    """An open savepoint: where its held writes start, and whether SQL has heard of it."""

    writes: int  # held writes before it
    events: int  # events added before it
    graph_writes: int  # GraphCache.writes when it opened
    sent: bool = False  # SAVEPOINT was sent (something was written to the database while it was open)
    locks: set[int] = field(default_factory=set)  # locks held when SAVEPOINT was sent


class PostgresTransaction(GraphCacheReader):
    """The write side of one open transaction: locks, then reads, then writes held back and sent in bulk.

    The connection is in pipeline mode: statements go out without waiting for their answers, and the
    next read (or the commit) waits for all of them. Errors of a write surface there and fail the
    whole transaction.
    """

    def __init__(self, db: psycopg.Connection[Any]) -> None:
        self.db = db
        self._cursor = db.cursor()
        self._locks: set[int] = set()
        self._claims = 0  # messages claimed one by one (`claim`): all but the last are done
        # What this transaction locked and read, updated as it writes: identifiers (with their evidence,
        # suspect flag and device owner's root) in `_known`, their root profiles with every member.
        self.cache = GraphCache()
        self._known: set[IdentifierKey] = set()
        self._stored: dict[_MessageKey, bool] = {}  # claimed message ids: stored before this transaction?
        self._added: list[_MessageKey] = []  # messages stored by this transaction, in order
        self._added_set: set[_MessageKey] = set()
        self._writes = HeldWrites()
        self._savepoints: list[_Savepoint] = []
        # Every statement here probes keys: `UPDATE … FROM` a few hundred rows must look them up by
        # primary key, never hash a scan of the table. The planner, seeing 100 rows to find among ten
        # thousand, scans (5.0 ms against 1.7 ms for 150 rows among 9,000 identifiers), and keeps
        # scanning until the table is several times larger.
        self._cursor.execute(_PROBES_ONLY_SQL)

    @property
    def events(self) -> int:
        """Messages stored in this transaction."""
        return len(self._added)

    # -- savepoints and sending ----------------------------------------------------------------
    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit that rolls back alone: its held writes are dropped, what it sent is undone."""
        mark = _Savepoint(len(self._writes), len(self._added), self.cache.writes)
        self._savepoints.append(mark)
        try:
            yield
        except psycopg.Error:
            raise  # the transaction is lost as a whole; rolling back to here would not be heard
        except BaseException:
            self._savepoints.pop()
            if mark.sent:
                # One constant name: savepoints nest as a stack and ROLLBACK TO finds the newest.
                self._cursor.execute("ROLLBACK TO message")
                self._cursor.execute("RELEASE message")
                self._locks = mark.locks  # ROLLBACK TO SAVEPOINT released the locks taken since
                self._writes.truncate(0)  # everything held was written after SAVEPOINT went out
                # What was claimed since is no longer locked: the next claim locks and reads it again.
                self._stored = {
                    key: stored for key, stored in self._stored.items() if lock_key("m", *key) in self._locks
                }
            else:
                self._writes.truncate(mark.writes)
            for key in self._added[mark.events :]:
                self._added_set.discard(key)
            del self._added[mark.events :]
            if mark.sent or self.cache.writes != mark.graph_writes:
                self._forget_graph()  # it holds writes now undone, or rows no longer locked: read again
            raise
        self._savepoints.pop()
        if mark.sent:
            self._cursor.execute("RELEASE message")

    def flush(self) -> None:
        """Send the held writes (the store calls this before COMMIT; reads of the unclaimed, before they read).

        An open savepoint that was not sent yet goes out at its place among them, so that rolling it
        back undoes exactly its own part.
        """
        start = 0
        for mark in self._savepoints:
            if not mark.sent:
                self._writes.send(self._cursor, start, mark.writes)
                start = mark.writes
                self._cursor.execute("SAVEPOINT message")
                mark.sent = True
                mark.locks = set(self._locks)
        self._writes.send(self._cursor, start, len(self._writes))
        self._writes.truncate(0)

    def _forget_graph(self) -> None:
        # The same cache, emptied: its count of writes goes on, so that a savepoint open since before
        # still sees that the graph changed.
        self.cache.invalidate()
        self._known.clear()

    # -- locks and reads -------------------------------------------------------------------------
    def _ask(self, sql: str, parameters: Sequence[Any] | Mapping[str, Any]) -> psycopg.Cursor[Any]:
        """Queue a read; its rows come with the next fetch (one round trip for everything queued)."""
        cursor = self.db.cursor()
        cursor.execute(sql, parameters)
        return cursor

    def _queue_lock(self, keys: Sequence[int]) -> psycopg.Cursor[Any] | None:
        """Queue the advisory locks not yet held: waiting, in sorted order, if none is held yet."""
        wanted = sorted(set(keys) - self._locks)
        if not wanted:
            return None
        if not self._locks:
            # Sorted, one after the other (unnest keeps the array's order): two transactions that
            # wait this way cannot wait on each other in a cycle.
            self._locks.update(wanted)
            return self._ask(_WAIT_FOR_LOCKS_SQL, (_json(wanted),))
        return self._ask(_TRY_LOCKS_SQL, (_json(wanted),))

    def _check_lock(self, cursor: psycopg.Cursor[Any] | None) -> None:
        if cursor is None:
            return
        rows = cursor.fetchall()
        self._locks.update(key for key, taken in rows if taken)
        if not all(taken for _, taken in rows):
            raise LockBusy("a concurrent transaction holds an identifier or profile of this message")

    def claim_many(self, claims: Sequence[tuple[str, str, Sequence[Identifier]]]) -> None:
        """Lock and read, at the start of a transaction, what the messages (space, message id,
        identifiers) about to be claimed need, in a few round trips for all of them.

        The first message's locks (its id, its identifiers and their roots) are waited for. Then, in
        order, each next message's id and identifiers are locked if all are free, up to the first
        message that finds one busy; the roots of the identifiers read are then tried. A message with
        a busy lock is left to its own `claim`, which raises LockBusy, so the engine commits the
        messages before it and starts a new transaction with it, which waits: a busy identifier
        delays its own message, not the messages before it.
        """
        if self._locks or len(self._writes) or not claims:
            return  # only the first statement of a transaction may wait for locks without a cycle
        wanted: list[tuple[str, str, list[IdentifierKey]]] = []
        for space, message_id, identifiers in claims:
            keys = list(
                dict.fromkeys((space, item.collection, item.type, item.value) for item in identifiers)
            )
            wanted.append((space, message_id, keys))
        # The roots the first message's identifiers have now, read without locks, are waited for with
        # them; the other messages' roots are tried once their rows are read. A row whose root is busy,
        # or moved meanwhile, is left to its message's own claim.
        first_space, _, first_keys = wanted[0]
        guessed = self._ask(_GUESS_SQL, _arrays(first_space, first_keys)).fetchall() if first_keys else []
        plans = [
            [lock_key("m", space, message_id), *(lock_key("i", *key) for key in keys)]
            for space, message_id, keys in wanted
        ]
        plans[0] += [lock_key("p", first_space, root) for root in _roots_of(guessed)]
        total = 0
        for number, plan in enumerate(plans):
            total += len(plan)
            if number and total > _LOCK_BUDGET:
                del plans[number:]  # left to their own claim, which starts a new transaction for them
                break
        # Sorted, one after the other (the array's order): two transactions that wait this way cannot
        # wait on each other in a cycle. The try-locks run after the wait.
        self._ask(_WAIT_FOR_LOCKS_SQL, (_json(sorted(set(plans[0]))),))
        taken = self._ask(_TRY_LOCKS_IN_ORDER_SQL, {"plans": _json(plans), "count": len(plans)}).fetchone()
        count = max(int(taken[0]) if taken and taken[0] is not None else 0, 1)  # the first one waited
        for plan in plans[:count]:
            self._locks.update(plan)
        claimed = wanted[:count]
        stored = {
            space: self._ask(
                _STORED_MANY_SQL, (space, _json([message_id for s, message_id, _ in claimed if s == space]))
            )
            for space in dict.fromkeys(space for space, _, _ in claimed)
        }
        keys_by_space: dict[str, list[IdentifierKey]] = {}
        for space, _, keys in claimed:
            keys_by_space.setdefault(space, []).extend(keys)
        owned = {
            space: self._ask(_OWNED_SQL, _arrays(space, list(dict.fromkeys(keys))))
            for space, keys in keys_by_space.items()
            if keys
        }
        for space, cursor in stored.items():
            found = {row[0] for row in cursor.fetchall()}
            for message_space, message_id, _ in claimed:
                if message_space == space:
                    self._stored[(space, message_id)] = message_id in found
        rows_by_space = {space: cursor.fetchall() for space, cursor in owned.items()}
        names_by_space = {space: _roots_of(rows) for space, rows in rows_by_space.items()}
        root_locks = {
            (space, name): lock_key("p", space, name)
            for space, names in names_by_space.items()
            for name in names
        }
        trying = sorted(set(root_locks.values()) - self._locks)
        tried = self._ask(_TRY_LOCKS_SQL, (_json(trying),)) if trying else None
        roots = {
            space: self._ask(_ROOTS_SQL, {"space": space, "roots": _json(names)})
            for space, names in names_by_space.items()
            if names
        }
        if tried is not None:
            self._locks.update(key for key, ok in tried.fetchall() if ok)
        for space, rows in rows_by_space.items():
            held = {
                row[0]: row
                for row in (roots[space].fetchall() if space in roots else ())
                if row[4] is None and root_locks[(space, row[0])] in self._locks
            }
            members = {
                (segment_id, *member)
                for segment_id, row in held.items()
                for member in zip(row[5] or (), row[6] or (), row[7] or (), strict=True)
            }
            # A row is known once its profile and its device owner's root are locked and agree with it.
            usable = [
                row
                for row in rows
                if (row[3] is None or (row[3], row[0], row[1], row[2]) in members)
                and (row[7] is None or row[7] in held)
            ]
            self._add_roots(space, [held[root] for root in _roots_of(usable)])
            self._record(space, usable)

    def claim(self, space: str, message_id: str, identifiers: Sequence[Identifier]) -> None:
        """Lock the message id and its identifiers (and their roots) until commit; read what they are."""
        if self._claims and len(self._locks) >= _LOCK_BUDGET:
            # The messages claimed before this one are done: commit them, go on in a new transaction.
            raise LockBusy(f"this transaction holds {len(self._locks)} locks, its budget")
        self._claims += 1
        self._claim(
            space, message_id, [(space, item.collection, item.type, item.value) for item in identifiers]
        )

    def _claim(self, space: str, message_id: str | None, keys: Sequence[IdentifierKey]) -> None:
        """Lock and read what of a message id and identifiers this transaction does not hold yet."""
        message = None if message_id is None or (space, message_id) in self._stored else (space, message_id)
        missing = list(dict.fromkeys(key for key in keys if key not in self._known))
        if message is None and not missing:
            return
        self.flush()  # what is read next must include this transaction's own writes
        locking = self._queue_lock(
            ([lock_key("m", *message)] if message is not None else [])
            + [lock_key("i", *key) for key in missing]
        )
        # Separate statements from the lock: a statement reads the snapshot of its start, before the
        # lock was granted.
        stored = self._ask(_STORED_SQL, message) if message is not None else None
        owned = self._ask(_OWNED_SQL, _arrays(space, missing)) if missing else None
        self._check_lock(locking)
        if stored is not None and message is not None:
            row = stored.fetchone()
            self._stored[message] = bool(row and row[0])
        if owned is not None:
            self._record(space, self._lock_roots(space, missing, owned.fetchall()))

    def _lock_roots(self, space: str, keys: Sequence[IdentifierKey], rows: list[_Owned]) -> list[_Owned]:
        """Lock and read the root profiles the rows name (not held yet); read the rows again until
        they agree (a merge may move an identifier before its new root is locked). Returns the rows."""
        while True:
            roots = [root for root in _roots_of(rows) if not self._is_root(space, root)]
            if not roots:
                return rows
            locking = self._queue_lock([lock_key("p", space, root) for root in roots])
            found = self._ask(_ROOTS_SQL, {"space": space, "roots": _json(roots)})
            self._check_lock(locking)
            root_rows = found.fetchall()
            if locking is None or _still_roots(rows, roots, root_rows):
                # Locked before these rows were read, or checked: nothing can move them now.
                self._add_roots(space, root_rows)
                return rows
            rows = self._ask(_OWNED_SQL, _arrays(space, keys)).fetchall()

    def _is_root(self, space: str, segment_id: str) -> bool:
        entry = self.cache.profiles.get((space, segment_id))
        return entry is not None and entry.parent_id is None

    def _add_roots(self, space: str, root_rows: Sequence[tuple[Any, ...]]) -> None:
        """Keep locked root profiles, with their members, in the transaction's graph."""
        graph = self.cache
        for (
            segment_id,
            collection,
            created_at,
            count,
            parent_id,
            collections,
            types,
            values,
            *times,
        ) in root_rows:
            if parent_id is not None or (space, segment_id) in graph.profiles:
                continue
            entry = ProfileEntry(collection, created_at, count)
            for member_collection, kind, value, first, last, retired in zip(
                collections or (), types or (), values or (), *(column or () for column in times), strict=True
            ):
                key = (space, member_collection, kind, value)
                entry.members[key] = None
                if graph.identifiers.get(key) is None:
                    graph.identifiers[key] = IdentifierEntry(segment_id, first, last, retired)
            graph.profiles[(space, segment_id)] = entry

    def _record(self, space: str, rows: Sequence[_Owned]) -> None:
        """Keep identifier rows read under their locks (their roots already kept)."""
        graph = self.cache
        for (
            collection,
            kind,
            value,
            profile_id,
            first,
            last,
            retired,
            owner,
            owner_at,
            suspect,
            *evidence,
        ) in rows:
            key = (space, collection, kind, value)
            graph.identifiers[key] = (
                None
                if profile_id is None
                else IdentifierEntry(profile_id, first, last, retired, owner, owner_at)
            )
            if suspect:
                graph.suspects.add(key)
            other_types, other_values, seen = evidence
            if other_types:
                graph.evidence[key] = dict(
                    zip(zip(other_types, other_values, strict=True), seen, strict=True)
                )
            else:
                graph.evidence.pop(key, None)
            self._known.add(key)

    def has_message(self, space: str, message_id: str) -> bool:
        """Whether the message id is stored in this space."""
        key = (space, message_id)
        if key in self._added_set:
            return True
        stored = self._stored.get(key)
        if stored is not None:
            return stored
        row = self._ask(_STORED_SQL, key).fetchone()
        return bool(row and row[0])

    def load_view(
        self, space: str, collection: str, identifiers: Sequence[Identifier], *, every_pair: bool = True
    ) -> GraphView:
        """Owners, their profiles, evidence and suspects, from what this transaction locked and read."""
        # What was not claimed (the engine claims first; direct callers may not) is claimed now.
        self._claim(space, None, [(space, collection, item.type, item.value) for item in identifiers])
        return self._view(space, collection, identifiers, every_pair=every_pair)

    def _identifier(self, key: IdentifierKey) -> IdentifierEntry | None:
        return self.cache.identifiers[key]  # claimed, or a member of a claimed root

    def _evidence(self, key: IdentifierKey) -> dict[tuple[str, str], int]:
        return self.cache.evidence.get(key) or {}

    def _profile(self, space: str, segment_id: str) -> ProfileEntry:
        return self.cache.profiles[(space, segment_id)]  # locked and read, or made here

    # -- writes ----------------------------------------------------------------------------------
    def apply_resolution(
        self, space: str, resolution: Resolution, message_id: str, source: str | None = None
    ) -> None:
        """Write one collection's decision: held back, and kept in the transaction's graph."""
        writes = self._writes
        self.cache.writes += 1
        target = resolution.profile_id
        collection = resolution.collection
        now = to_micros(resolution.timestamp)
        if resolution.created:
            created_at = to_micros(resolution.created_at)
            writes.profile(space, target, collection, created_at, message_id)
            self.cache.profiles[(space, target)] = ProfileEntry(collection, created_at)
        for step in resolution.merges:
            writes.merge(space, collection, target, step.child_id, message_id, str(step.via), now)
            self._merge_in_graph(space, target, step.child_id)
        graph = self.cache
        target_entry = graph.profiles.get((space, target))
        # A decision about profiles this transaction never read (a direct caller's) is only written;
        # from then on the database answers.
        held = target_entry is not None and target_entry.parent_id is None
        for item in resolution.added:
            key = (space, item.collection, item.type, item.value)
            writes.identifier(key, target, now, source, message_id)
            if held and target_entry is not None:
                # Its evidence and suspect mark (kept from before it had an owner) are as read: known
                # only if it was claimed.
                graph.identifiers[key] = IdentifierEntry(target, now, now)
                target_entry.members[key] = None
        # A row this transaction does not hold is written anyway (the statements widen, never narrow).
        for item in resolution.touched:
            key = (space, item.collection, item.type, item.value)
            entry = graph.identifiers.get(key)
            if entry is None or entry.seen_at(now):
                writes.touch(key, now)
        for retired, items in ((True, resolution.retired), (False, resolution.revived)):
            for item in items:
                key = (space, item.collection, item.type, item.value)
                entry = graph.identifiers.get(key)
                if entry is not None:
                    if entry.retired == retired:
                        continue
                    entry.retired = retired
                writes.set_retired(key, retired)
        for item in resolution.device_owned:
            key = (space, item.collection, item.type, item.value)
            entry = graph.identifiers.get(key)
            # The graph knows the owner's root, the row may name a merged child of it: a login at the
            # stored time rewrites the row even when the root is the same.
            if (
                entry is None
                or key not in self._known
                or entry.owned_by(target, now)
                or entry.device_owner_at == now
            ):
                writes.own(key, target, now)
        for lower, higher in resolution.evidence:
            key = (space, lower.collection, lower.type, lower.value)
            pair = (higher.type, higher.value)
            if key not in self._known or seen_together(graph.evidence.setdefault(key, {}), pair, now):
                writes.evidence(key, pair, now)
        for mark in resolution.suspects:
            item = mark.identifier
            key = (space, item.collection, item.type, item.value)
            writes.suspect(key, mark.evidence_type, _json_encode(list(mark.values)).decode(), message_id, now)
            if key in self._known:
                graph.suspects.add(key)
        if resolution.dropped:
            self.record_dropped(space, resolution.dropped, message_id, resolution.timestamp, target)
        if not held:
            self._forget_graph()

    def _merge_in_graph(self, space: str, target: str, child: str) -> None:
        graph = self.cache
        child_entry = graph.profiles.get((space, child))
        target_entry = graph.profiles.get((space, target))
        if child_entry is None or target_entry is None:
            self._forget_graph()  # profiles this transaction never read: the database knows them
            return
        child_entry.parent_id = target
        target_entry.merge_count += child_entry.merge_count + 1
        for key in child_entry.members:
            member = graph.identifiers.get(key)
            if member is not None:
                member.profile_id = target
        target_entry.members.update(child_entry.members)
        child_entry.members = {}

    def record_dropped(
        self, space: str, dropped: Sequence[Dropped], message_id: str, at: datetime, profile_id: str | None
    ) -> None:
        """Record dropped identifiers."""
        micros = to_micros(at)
        for item in dropped:
            self._writes.dropped(space, profile_id, message_id, str(item.identifier), item.rule, micros)

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
        for key, value in updates.items():
            encoded = None if value is None else _json_encode(value).decode()
            self._writes.trait(space, profile_id, key, encoded, micros, source, message_id)

    def link(self, space: str, user_id: str, account_id: str, at: datetime) -> None:
        """Link a user and an account."""
        self._writes.link(space, user_id, account_id, to_micros(at))

    def add_event(self, space: str, event: EventRecord) -> None:
        """Store a message."""
        key = (space, event.message_id)
        self._added.append(key)
        self._added_set.add(key)
        self._writes.event(event_row(space, event))

    def learn_types(self, space: str, types: Sequence[tuple[str, str]]) -> None:
        """Append custom types in first-seen order (a type another writer learned first keeps its place)."""
        self._writes.learn(space, types)
