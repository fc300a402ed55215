"""The memory store: the whole graph in Python dicts, with exactly the SQLite adapter's semantics.

For benchmarks of the core (`idstitch bench core`) and for tests; nothing is durable. Every lookup the
engine makes per message is an O(1) dict access (identifiers by `(type, value, collection)`, identifiers
per root profile, children per root, events per profile), so the core's own cost is what gets measured.

Atomicity comes from an undo log: every write records how to reverse itself (a dict entry's previous
value, an attribute's previous value, or a list append). A failing transaction replays its log
backwards; a savepoint remembers the log's length and rolls back only what came after it. Nothing is
copied up front, so a transaction costs what it writes.

Times are kept as aware UTC datetimes (normalised exactly as the SQLite adapter's integer microseconds
would round-trip them) and become integer microseconds in `dump()`, which is structurally identical to
SQLiteStore.dump so the two stores can be compared.

Reads see the writer's uncommitted changes (like `sqlite://`, unlike a file database with WAL), except
inside `snapshot()`, which waits for the open transaction.
"""

from __future__ import annotations

import heapq
import threading
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from itertools import islice
from typing import Any, Final

import msgspec

from idstitch.core.graph import GraphView, ProfileState, StoredIdentifier
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
    SuspectRecord,
    TokenRecord,
    TraitRecord,
)
from idstitch.storage.times import from_micros, to_micros

__all__ = ["IntegrityError", "MemoryStore", "MemoryTransaction"]

_json_encode = msgspec.json.encode
_json_decode = msgspec.json.decode


# -- the undo log -----------------------------------------------------------------------------------
# Entries are (kind, container, key, old): restore a dict entry (old _MISSING: delete it), restore an
# attribute, or pop the last element of a list.
_MISSING: Final[Any] = object()
_DICT: Final = 0
_ATTR: Final = 1
_APPEND: Final = 2

_Entry = tuple[int, Any, Any, Any]


def _undo(log: list[_Entry], mark: int) -> None:
    pop = log.pop
    while len(log) > mark:
        kind, container, key, old = pop()
        if kind == _DICT:
            if old is _MISSING:
                del container[key]
            else:
                container[key] = old
        elif kind == _ATTR:
            setattr(container, key, old)
        else:
            container.pop()


def _utc(value: datetime) -> datetime:
    """The datetime the SQLite adapter would read back: aware UTC, microseconds (naive: TypeError)."""
    if value.tzinfo is UTC:
        return value
    return from_micros(to_micros(value))


# -- rows -------------------------------------------------------------------------------------------
class _Profile:
    __slots__ = ("collection", "created_at", "created_by", "merge_count", "merged_at", "parent")

    def __init__(self, collection: str, created_at: datetime, created_by: str) -> None:
        self.collection = collection
        self.parent: str | None = None
        self.created_at = created_at
        self.created_by = created_by
        self.merged_at: datetime | None = None
        self.merge_count = 0


class _Ident:
    __slots__ = (
        "device_owner",
        "device_owner_at",
        "first_message_id",
        "first_seen",
        "last_seen",
        "profile_id",
        "retired",
        "source",
    )

    def __init__(self, profile_id: str, seen: datetime, source: str | None, message_id: str) -> None:
        self.profile_id = profile_id
        self.first_seen = seen
        self.last_seen = seen
        self.retired = False
        self.device_owner: str | None = None
        self.device_owner_at: datetime | None = None
        # Who first attached it: set once, never written again (a merge moves the row as it is).
        self.source = source
        self.first_message_id = message_id


# A suspect: (evidence_type, evidence_values as JSON text, message_id, at)
_Suspect = tuple[str, str, str, datetime]
# A trait: (value as JSON text or None for a removal, set_at, source, the message that set it or None)
_Trait = tuple[str | None, datetime, str | None, str | None]
# An event, in EventRecord's field order (sequence last).
_Event = tuple[
    str, str, str | None, datetime, datetime, str | None, str | None, str | None, tuple[str, ...], bytes, int
]


class _Space:
    """Every table of one space, with the indexes the reads and the resolver need."""

    __slots__ = (
        "account_events",
        "account_links",
        "children",
        "dropped",
        "events",
        "evidence",
        "identifiers",
        "learned",
        "links",
        "merges",
        "message_dropped",
        "message_ids",
        "owned",
        "parent_merges",
        "profile_dropped",
        "profiles",
        "roots",
        "suspects",
        "traits",
        "unresolved",
        "user_events",
        "user_links",
    )

    def __init__(self) -> None:
        self.learned: dict[str, str] = {}  # type -> collection, first seen first
        self.profiles: dict[str, _Profile] = {}
        self.children: dict[str, dict[str, None]] = {}  # root -> its merged profiles (flat)
        self.roots: dict[str, int] = {}  # collection -> number of root profiles
        # Keys are Identifier(type, value, collection): the identifiers table's primary key.
        self.identifiers: dict[Identifier, _Ident] = {}
        self.owned: dict[str, dict[Identifier, _Ident]] = {}  # profile -> its identifiers
        self.evidence: dict[Identifier, dict[Identifier, datetime]] = {}
        self.suspects: dict[Identifier, _Suspect] = {}
        self.traits: dict[str, dict[str, _Trait]] = {}
        self.links: dict[tuple[str, str], datetime] = {}  # (user, account) -> at
        self.user_links: dict[str, dict[str, None]] = {}
        self.account_links: dict[str, dict[str, None]] = {}
        self.message_ids: dict[str, int] = {}  # message id -> sequence, in sequence order
        self.events: dict[int, _Event] = {}
        self.user_events: dict[str, list[int]] = {}  # events.profile_id -> sequences, ascending
        self.account_events: dict[str, list[int]] = {}  # events.account_id -> sequences, ascending
        self.unresolved: list[int] = []
        self.merges: list[MergeRecord] = []
        self.parent_merges: dict[str, list[int]] = {}  # parent_id -> positions in merges
        self.dropped: list[DroppedRecord] = []
        self.profile_dropped: dict[str, list[int]] = {}  # profile_id -> positions in dropped
        self.message_dropped: dict[str, list[int]] = {}  # message_id -> positions in dropped

    def family(self, profile_id: str) -> list[str]:
        """A profile and the profiles whose parent it is."""
        children = self.children.get(profile_id)
        return [profile_id, *children] if children else [profile_id]

    def is_account(self, profile_id: str) -> bool:
        """Whether a profile's events and links are on the account side."""
        profile = self.profiles.get(profile_id)
        return profile is not None and profile.collection == "accounts"


_EMPTY: Final = _Space()  # what reads of a space nobody wrote to see; never written


def _event_record(row: _Event) -> EventRecord:
    return EventRecord(*row)


def _suspect_record(key: Identifier, mark: _Suspect) -> SuspectRecord:
    evidence_type, values, message_id, at = mark
    return SuspectRecord(str(key), key.collection, evidence_type, tuple(_json_decode(values)), message_id, at)


def _family_positions(index: Mapping[str, list[int]], family: Iterable[str]) -> list[int]:
    positions: list[int] = []
    for member in family:
        found = index.get(member)
        if found:
            positions += found
    positions.sort()
    return positions


class MemoryStore:
    """A store in process memory (`memory://`): fast, not durable, the SQLite adapter's semantics."""

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        # Reentrant: a snapshot holds it, and reads under it may meet a write of the same thread.
        self._lock = threading.RLock()
        self._spaces: dict[str, int] = {}  # name -> created_at (microseconds)
        self._sources: dict[tuple[str, str], str] = {}  # (space, name) -> write key
        self._write_keys: dict[str, tuple[str, str]] = {}
        self._tokens: dict[str, tuple[str, str]] = {}  # token -> (space, kind)
        self._data: dict[str, _Space] = {}
        self._sequence = 0  # the last event sequence handed out (shared by every space, like SQLite's)

    def close(self) -> None:
        """Nothing to release: the data lives as long as this object."""

    # -- writes ------------------------------------------------------------------------------
    @contextmanager
    def transaction(self) -> Iterator[MemoryTransaction]:
        """One write transaction; an exception undoes everything it wrote."""
        with self._lock:
            log: list[_Entry] = []
            try:
                yield MemoryTransaction(self, log)
            except BaseException:
                _undo(log, 0)
                raise
            log.clear()

    def ensure_space(self, space: str) -> None:
        """Create the space if new."""
        with self.transaction() as transaction:
            if space not in self._spaces:
                transaction.set_item(self._spaces, space, time.time_ns() // 1000)

    def upsert_source(self, source: SourceRecord, *, replace: bool = True) -> None:
        """Create or update a source (or keep an existing one); a write key belongs to one source only."""
        key = (source.space, source.name)
        if not replace and key in self._sources:
            return
        with self.transaction() as transaction:
            holder = self._write_keys.get(source.write_key)
            if holder is not None and holder != key:
                raise IntegrityError(f"write key already used by source {holder[1]!r} of space {holder[0]!r}")
            old = self._sources.get(key)
            if old == source.write_key:
                return
            if old is not None:
                transaction.del_item(self._write_keys, old)
            transaction.set_item(self._sources, key, source.write_key)
            transaction.set_item(self._write_keys, source.write_key, key)

    def upsert_token(self, token: TokenRecord) -> None:
        """Create a token or change its space or kind."""
        with self.transaction() as transaction:
            transaction.set_item(self._tokens, token.token, (token.space, token.kind))

    def unmark_declared(self, space: str, identifiers: Sequence[Identifier]) -> None:
        """Remove the declared (not the detected) marks of these identifiers."""
        with self.transaction() as transaction:
            marks = self._read(space).suspects
            for item in identifiers:
                key = Identifier(item.type, item.value, item.collection)
                found = marks.get(key)
                if found is not None and found[0] == "declared":
                    transaction.del_item(marks, key)

    def first_token(self, token: TokenRecord) -> TokenRecord:
        """Store `token` unless its space has one of its kind; the one kept, either way."""
        with self.transaction() as transaction:
            kept = sorted(
                stored
                for stored, (space, kind) in self._tokens.items()
                if (space, kind) == (token.space, token.kind)
            )
            if kept:
                return TokenRecord(token.space, kept[0], token.kind)
            transaction.set_item(self._tokens, token.token, (token.space, token.kind))
        return token

    # -- reads -------------------------------------------------------------------------------
    @contextmanager
    def snapshot(self) -> Iterator[None]:
        """Reads inside see no transaction half done: they wait for the open one, and hold off the next."""
        with self._lock:
            yield

    def _read(self, space: str) -> _Space:
        return self._data.get(space) or _EMPTY

    def spaces(self) -> list[str]:
        """Every space, sorted."""
        return sorted(list(self._spaces))

    def sources(self) -> list[SourceRecord]:
        """Every source, by space and name."""
        return [SourceRecord(space, name, key) for (space, name), key in sorted(list(self._sources.items()))]

    def tokens(self) -> list[TokenRecord]:
        """Every token, by space and token."""
        return sorted(
            (TokenRecord(space, token, kind) for token, (space, kind) in list(self._tokens.items())),
            key=lambda record: (record.space, record.token),
        )

    def learned_types(self, space: str) -> list[tuple[str, str]]:
        """Custom types of a space, first seen first."""
        return list(self._read(space).learned.items())

    def find_profile(self, space: str, identifier: Identifier) -> str | None:
        """Root owning an identifier."""
        key = Identifier(identifier.type, identifier.value, identifier.collection)
        found = self._read(space).identifiers.get(key)
        return None if found is None else found.profile_id

    def resolve_segment_id(self, space: str, segment_id: str) -> str | None:
        """Root of a segment id."""
        profile = self._read(space).profiles.get(segment_id)
        if profile is None:
            return None
        return profile.parent or segment_id

    def profile(self, space: str, segment_id: str) -> ProfileRecord | None:
        """A root profile with its merged children's ids (oldest first)."""
        data = self._read(space)
        profile = data.profiles.get(segment_id)
        if profile is None or profile.parent is not None:
            return None
        profiles = data.profiles
        children = sorted(
            (profiles[child].created_at, child) for child in list(data.children.get(segment_id, ()))
        )
        return ProfileRecord(
            segment_id,
            profile.collection,
            profile.created_at,
            profile.merge_count,
            tuple(child for _, child in children),
            profile.created_by,
        )

    def identifiers(self, space: str, profile_id: str) -> list[IdentifierRecord]:
        """Identifiers of a root, first seen first."""
        data = self._read(space)
        suspects = data.suspects
        records = [
            IdentifierRecord(
                key.type,
                key.value,
                key.collection,
                row.first_seen,
                row.last_seen,
                row.retired,
                key in suspects,
                row.source,
                row.first_message_id,
            )
            for key, row in list(data.owned.get(profile_id, {}).items())
        ]
        records.sort(key=lambda record: (record.first_seen, record.type, record.value))
        return records

    def traits(self, space: str, profile_id: str) -> dict[str, Any]:
        """Current traits of a root (removals left out)."""
        stored = self._read(space).traits.get(profile_id, {})
        return {
            key: _json_decode(value)
            for key, (value, _, _, _) in sorted(list(stored.items()))
            if value is not None
        }

    def trait_records(
        self,
        space: str,
        profile_id: str,
        *,
        after: str = "",
        include: Sequence[str] = (),
        limit: int | None = None,
    ) -> list[TraitRecord]:
        """Current traits of a root with their source and time, by key (removals left out; a page)."""
        stored = self._read(space).traits.get(profile_id, {})
        named = set(include)
        return [
            TraitRecord(key, _json_decode(value), source, set_at)
            for key, (value, set_at, source, _) in sorted(list(stored.items()))
            if value is not None and key >= after and (not named or key in named)
        ][:limit]

    def activity(self, space: str, profile_id: str) -> ProfileActivity:
        """The creating message of a root and the last message ingested for its family."""
        data = self._read(space)
        profile = data.profiles.get(profile_id)
        first = None if profile is None else profile.created_by
        first_source = None
        if first is not None:
            sequence = data.message_ids.get(first)
            if sequence is not None:
                first_source = data.events[sequence][5]
        index = data.account_events if data.is_account(profile_id) else data.user_events
        # Each member's sequences ascend: the family's last event is the largest of their last ones.
        last = max(
            (found[-1] for member in data.family(profile_id) if (found := index.get(member))), default=0
        )
        if not last:
            return ProfileActivity(first, first_source, None, None, None)
        row = data.events[last]
        return ProfileActivity(first, first_source, row[0], row[5], row[4])

    def event_count(self, space: str, profile_id: str) -> int:
        """Events of a root's family."""
        data = self._read(space)
        index = data.account_events if data.is_account(profile_id) else data.user_events
        return sum(len(index.get(member, ())) for member in data.family(profile_id))

    def events(
        self, space: str, profile_id: str, *, limit: int = 10, after_sequence: int | None = None
    ) -> list[EventRecord]:
        """Events of a root's family, newest ingested first; page with the last sequence seen."""
        data = self._read(space)
        index = data.account_events if data.is_account(profile_id) else data.user_events
        streams: list[Iterator[int]] = []
        for member in data.family(profile_id):
            sequences = index.get(member)
            if not sequences:
                continue
            skip = 0 if after_sequence is None else len(sequences) - bisect_left(sequences, after_sequence)
            streams.append(islice(reversed(sequences), skip, None))
        merged: Iterator[int] = heapq.merge(*streams, reverse=True)
        chosen = merged if limit < 0 else islice(merged, limit)
        rows = data.events
        return [_event_record(rows[sequence]) for sequence in chosen]

    def event_page(self, space: str, profile_id: str, query: EventQuery) -> list[EventRecord]:
        """A page of a root family's events by (timestamp, message_id), after the query's cursor."""
        data = self._read(space)
        index = data.account_events if data.is_account(profile_id) else data.user_events
        rows = data.events
        after = None if query.after is None else (_utc(query.after[0]), query.after[1])
        start = None if query.start is None else _utc(query.start)
        end = None if query.end is None else _utc(query.end)
        include, exclude = query.include, query.exclude
        descending = query.descending
        chosen: list[_Event] = []
        for member in data.family(profile_id):
            for sequence in list(index.get(member, ())):
                row = rows[sequence]
                timestamp, name = row[3], row[2]
                if after is not None and (
                    (timestamp, row[0]) >= after if descending else (timestamp, row[0]) <= after
                ):
                    continue
                if (start is not None and timestamp < start) or (end is not None and timestamp >= end):
                    continue
                if (include and name not in include) or name in exclude:
                    continue
                chosen.append(row)
        chosen.sort(key=lambda row: (row[3], row[0]), reverse=descending)
        return [_event_record(row) for row in (chosen if query.limit < 0 else chosen[: query.limit])]

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
        data = self._read(space)
        links = data.links
        if data.is_account(profile_id):
            pairs = [
                (links.get((user, profile_id)), user) for user in list(data.account_links.get(profile_id, ()))
            ]
        else:
            pairs = [
                (links.get((profile_id, account)), account)
                for account in list(data.user_links.get(profile_id, ()))
            ]
        found = sorted((at, other) for at, other in pairs if at is not None)
        records = [LinkRecord(other, at) for at, other in found]
        if after is not None:
            records = [item for item in records if (item.at, item.segment_id) > after]
        return records[:limit]

    def merges(self, space: str, profile_id: str) -> list[MergeRecord]:
        """Merge log of a root's family, oldest first."""
        data = self._read(space)
        log = data.merges
        return [log[position] for position in _family_positions(data.parent_merges, data.family(profile_id))]

    def dropped(self, space: str, profile_id: str) -> list[DroppedRecord]:
        """Dropped identifiers of a root's family, in the order they were recorded."""
        data = self._read(space)
        log = data.dropped
        return [
            log[position] for position in _family_positions(data.profile_dropped, data.family(profile_id))
        ]

    def dropped_in(self, space: str, message_ids: Sequence[str]) -> list[DroppedRecord]:
        """Dropped identifiers of these messages, in the order they were recorded."""
        data = self._read(space)
        log = data.dropped
        return [log[position] for position in _family_positions(data.message_dropped, set(message_ids))]

    def suspects_among(self, space: str, identifiers: Sequence[Identifier]) -> list[SuspectRecord]:
        """The marks of these identifiers, by time marked."""
        found = self._read(space).suspects
        rows = sorted(
            ((key, found[key]) for key in dict.fromkeys(identifiers) if key in found),
            key=lambda item: (item[1][3], item[0].type, item[0].value, item[0].collection),
        )
        return [
            SuspectRecord(
                str(key), key.collection, evidence_type, tuple(_json_decode(values)), message_id, at
            )
            for key, (evidence_type, values, message_id, at) in rows
        ]

    def suspects_from(self, space: str, identifier: Identifier, *, limit: int) -> list[SuspectRecord] | None:
        """A page of marks from this identifier's (None: not suspect)."""
        rows = self._suspect_rows(space)
        keys = [key for key, _ in rows]
        if identifier not in keys:
            return None
        start = keys.index(identifier)
        return [_suspect_record(key, mark) for key, mark in rows[start : start + limit]]

    def suspects(self, space: str, *, limit: int | None = None) -> list[SuspectRecord]:
        """Suspect identifiers of a space, by time marked."""
        return [_suspect_record(key, mark) for key, mark in self._suspect_rows(space)[:limit]]

    def _suspect_rows(self, space: str) -> list[tuple[Identifier, _Suspect]]:
        return sorted(
            list(self._read(space).suspects.items()),
            key=lambda item: (item[1][3], item[0].type, item[0].value, item[0].collection),
        )

    def unresolved(
        self, space: str, *, limit: int = 100, before_sequence: int | None = None
    ) -> list[EventRecord]:
        """Messages whose identifiers were all blocked, newest first; page with the last sequence seen."""
        data = self._read(space)
        sequences = data.unresolved
        end = len(sequences) if before_sequence is None else bisect_left(sequences, before_sequence)
        start = 0 if limit < 0 else max(end - limit, 0)
        rows = data.events
        return [_event_record(rows[sequences[position]]) for position in range(end - 1, start - 1, -1)]

    def stats(self, space: str) -> SpaceStats:
        """Counts of a space."""
        data = self._read(space)
        return SpaceStats(
            space=space,
            profiles=data.roots.get("users", 0),
            accounts=data.roots.get("accounts", 0),
            identifiers=len(data.identifiers),
            merges=len(data.merges),
            events=len(data.message_ids),
            unresolved=len(data.unresolved),
            suspect=len(data.suspects),
            dropped=len(data.dropped),
        )

    def iter_event_ids(self, space: str) -> Iterator[str]:
        """Every stored message id, in ingest order."""
        yield from list(self._read(space).message_ids)

    def iter_event_resolutions(self, space: str) -> Iterator[EventResolution]:
        """Every stored message in ingest order with its root profiles now."""
        data = self._read(space)

        def root(segment_id: str | None) -> str | None:
            profile = data.profiles.get(segment_id) if segment_id else None
            return segment_id if profile is None else profile.parent or segment_id

        for sequence in list(data.message_ids.values()):
            row = data.events[sequence]
            yield EventResolution(row[0], root(row[6]), root(row[7]), tuple(row[8]))

    def iter_events(self, space: str, *, after_sequence: int = 0) -> Iterator[EventRecord]:
        """Every stored message after a sequence, in ingest order."""
        for sequence, row in list(self._read(space).events.items()):
            if sequence > after_sequence:
                yield _event_record(row)

    def blocked_values(self, space: str) -> frozenset[str]:
        """Every identifier that a blocked-values rule dropped from some message."""
        return frozenset(
            record.identifier
            for record in list(self._read(space).dropped)
            if record.rule.startswith("blocked")
        )

    def dump(self, space: str) -> dict[str, Any]:
        """The graph of a space, canonical (sorted, times as microseconds): equal to SQLiteStore.dump."""
        data = self._read(space)
        profiles = [
            [segment_id, row.collection, row.parent or "", to_micros(row.created_at), row.merge_count]
            for segment_id, row in sorted(list(data.profiles.items()), key=lambda item: item[0])
        ]
        identifiers = [
            [
                key.collection,
                key.type,
                key.value,
                row.profile_id,
                to_micros(row.first_seen),
                to_micros(row.last_seen),
                int(row.retired),
                row.device_owner or "",
            ]
            for key, row in sorted(
                list(data.identifiers.items()), key=lambda item: (item[0][2], item[0][0], item[0][1])
            )
        ]
        traits = [
            [profile_id, key, "null" if value is None else value, to_micros(set_at)]
            for profile_id, stored in sorted(list(data.traits.items()), key=lambda item: item[0])
            for key, (value, set_at, _, _) in sorted(list(stored.items()), key=lambda item: item[0])
        ]
        links = [[user, account] for user, account in sorted(list(data.links))]
        merges = [
            [record.parent_id, record.child_id, record.message_id, record.via, to_micros(record.at)]
            for record in sorted(list(data.merges), key=lambda record: (record.at, record.child_id))
        ]
        events = [
            [row[0], row[6] or "", row[7] or "", _json_encode(list(row[8])).decode()]
            for row in sorted(list(data.events.values()), key=lambda row: row[0])
        ]
        suspects = [
            [key.collection, key.type, key.value, row[0], row[1]]
            for key, row in sorted(
                list(data.suspects.items()), key=lambda item: (item[0][2], item[0][0], item[0][1])
            )
        ]
        dropped = sorted(
            [record.message_id, record.identifier, record.rule, record.profile_id or ""]
            for record in list(data.dropped)
        )
        return {
            "profiles": profiles,
            "identifiers": identifiers,
            "traits": traits,
            "links": links,
            "merges": merges,
            "events": events,
            "suspects": suspects,
            "dropped": dropped,
        }


class MemoryTransaction:
    """The write side of one open transaction: every write goes through the undo log."""

    def __init__(self, store: MemoryStore, log: list[_Entry]) -> None:
        self._store = store
        self._log = log

    # -- logged primitives -------------------------------------------------------------------
    def set_item(self, container: dict[Any, Any], key: Any, value: Any) -> None:
        """container[key] = value, undoably."""
        self._log.append((_DICT, container, key, container.get(key, _MISSING)))
        container[key] = value

    def del_item(self, container: dict[Any, Any], key: Any) -> None:
        """del container[key], undoably."""
        self._log.append((_DICT, container, key, container.pop(key)))

    def _set_attr(self, row: object, name: str, value: object) -> None:
        self._log.append((_ATTR, row, name, getattr(row, name)))
        setattr(row, name, value)

    def _append(self, container: list[Any], value: Any) -> None:
        container.append(value)
        self._log.append((_APPEND, container, None, None))

    def _index(self, index: dict[str, list[int]], key: str, value: int) -> None:
        found = index.get(key)
        if found is None:
            self.set_item(index, key, [value])
        else:
            self._append(found, value)

    def _child_dict(self, parent: dict[str, dict[Any, Any]], key: str) -> dict[Any, Any]:
        found = parent.get(key)
        if found is None:
            found = {}
            self.set_item(parent, key, found)
        return found

    def _space(self, space: str) -> _Space:
        data = self._store._data
        found = data.get(space)
        if found is None:
            found = _Space()
            self.set_item(data, space, found)
        return found

    # -- the protocol ------------------------------------------------------------------------
    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """A nested unit that rolls back alone."""
        mark = len(self._log)
        try:
            yield
        except BaseException:
            _undo(self._log, mark)
            raise

    def claim(self, space: str, message_id: str, identifiers: Sequence[Identifier]) -> None:
        """Nothing to lock: this store has one writer at a time."""

    def claim_many(self, claims: Sequence[tuple[str, str, Sequence[Identifier]]]) -> None:
        """Nothing to lock: this store has one writer at a time."""

    def has_message(self, space: str, message_id: str) -> bool:
        """Whether the message id is stored in this space."""
        return message_id in self._store._read(space).message_ids

    def load_view(
        self, space: str, collection: str, identifiers: Sequence[Identifier], *, every_pair: bool = True
    ) -> GraphView:
        """Owners, their profiles, evidence and suspects for a message's identifiers."""
        data = self._store._read(space)
        table = data.identifiers
        profiles = data.profiles
        stored_evidence = data.evidence
        stored_suspects = data.suspects
        owned: dict[Identifier, StoredIdentifier] = {}
        evidence: dict[Identifier, dict[Identifier, datetime]] = {}
        suspects: set[Identifier] = set()
        roots: dict[str, None] = {}
        for identifier in identifiers:
            key = (
                identifier
                if identifier.collection == collection
                else Identifier(identifier.type, identifier.value, collection)
            )
            row = table.get(key)
            if row is not None:
                owner = row.device_owner
                if owner is not None:
                    owner_profile = profiles.get(owner)
                    if owner_profile is not None and owner_profile.parent is not None:
                        owner = owner_profile.parent
                owned[identifier] = StoredIdentifier(
                    identifier,
                    row.profile_id,
                    row.first_seen,
                    row.last_seen,
                    row.retired,
                    owner,
                    row.device_owner_at,
                )
                roots[row.profile_id] = None
                if owner is not None:
                    roots[owner] = None
            if key in stored_suspects:
                suspects.add(identifier)
                continue  # a suspect stays suspect: its evidence is never needed again
            partners = stored_evidence.get(key)
            if partners and not every_pair:
                asked = (Identifier(item.type, item.value, collection) for item in identifiers)
                partners = {other: partners[other] for other in asked if other in partners}
            if partners:
                evidence[identifier] = dict(partners)
        states = {root: self._profile_state(data, root) for root in roots}
        return GraphView(owned, states, evidence, frozenset(suspects))

    @staticmethod
    def _profile_state(data: _Space, root: str) -> ProfileState:
        profile = data.profiles[root]
        members = tuple(
            StoredIdentifier(key, root, row.first_seen, row.last_seen, row.retired)
            for key, row in data.owned.get(root, {}).items()
        )
        return ProfileState(root, profile.collection, profile.created_at, profile.merge_count, members)

    def apply_resolution(
        self, space: str, resolution: Resolution, message_id: str, source: str | None = None
    ) -> None:
        """Write one collection's decision."""
        data = self._space(space)
        log = self._log
        target = resolution.profile_id
        now = _utc(resolution.timestamp)
        if resolution.created:
            if target in data.profiles:
                raise IntegrityError(f"profile {target} already exists")
            profile = _Profile(resolution.collection, _utc(resolution.created_at), message_id)
            self.set_item(data.profiles, target, profile)
            self.set_item(data.roots, profile.collection, data.roots.get(profile.collection, 0) + 1)
        for step in resolution.merges:
            self._merge(data, resolution.collection, target, step.child_id, message_id, str(step.via), now)
        table = data.identifiers
        if resolution.added:
            for item in resolution.added:
                if Identifier(item.type, item.value, item.collection) in table:
                    raise IntegrityError(f"identifier {item} ({item.collection}) already exists")
            owned = self._child_dict(data.owned, target)
            for item in resolution.added:
                key = Identifier(item.type, item.value, item.collection)
                if key in table:
                    raise IntegrityError(f"identifier {item} ({item.collection}) sent twice")
                row = _Ident(target, now, source, message_id)
                table[key] = row
                log.append((_DICT, table, key, _MISSING))
                owned[key] = row
                log.append((_DICT, owned, key, _MISSING))
        for item in resolution.touched:
            found = table.get(item)
            if found is not None:
                if now > found.last_seen:
                    log.append((_ATTR, found, "last_seen", found.last_seen))
                    found.last_seen = now
                if now < found.first_seen:
                    log.append((_ATTR, found, "first_seen", found.first_seen))
                    found.first_seen = now
        for item in resolution.retired:
            found = table.get(item)
            if found is not None and not found.retired:
                self._set_attr(found, "retired", True)
        for item in resolution.revived:
            found = table.get(item)
            if found is not None and found.retired:
                self._set_attr(found, "retired", False)
        for item in resolution.device_owned:
            found = table.get(item)
            if found is not None and (found.device_owner_at is None or found.device_owner_at <= now):
                self._set_attr(found, "device_owner", target)
                self._set_attr(found, "device_owner_at", now)
        if resolution.evidence:
            stored = data.evidence
            for lower, higher in resolution.evidence:
                key = Identifier(lower.type, lower.value, lower.collection)
                partners = stored.get(key)
                if partners is None:
                    partners = {}
                    self.set_item(stored, key, partners)
                partner = Identifier(higher.type, higher.value, lower.collection)
                last = partners.get(partner)
                if last is None or now > last:
                    self.set_item(partners, partner, now)
        if resolution.suspects:
            marks = data.suspects
            for mark in resolution.suspects:
                item = mark.identifier
                key = Identifier(item.type, item.value, item.collection)
                if key not in marks:
                    values = _json_encode(list(mark.values)).decode()
                    self.set_item(marks, key, (mark.evidence_type, values, message_id, now))
        if resolution.dropped:
            self.record_dropped(space, resolution.dropped, message_id, resolution.timestamp, target)

    def _merge(
        self, data: _Space, collection: str, target: str, child: str, message_id: str, via: str, at: datetime
    ) -> None:
        profiles = data.profiles
        child_profile = profiles[child]
        # Repoint the child and its own children straight at the target: chains stay flat.
        for member in [child, *data.children.get(child, ())]:
            row = profiles[member]
            old_parent = row.parent
            if old_parent is None:
                self.set_item(data.roots, row.collection, data.roots[row.collection] - 1)
            else:
                self.del_item(data.children[old_parent], member)
            self._set_attr(row, "parent", target)
            self._set_attr(row, "merged_at", at)
            self.set_item(self._child_dict(data.children, target), member, None)
        target_profile = profiles.get(target)
        if target_profile is not None:
            self._set_attr(
                target_profile, "merge_count", target_profile.merge_count + child_profile.merge_count + 1
            )
        # Identifiers move to the target.
        child_owned = data.owned.get(child)
        if child_owned:
            owned = self._child_dict(data.owned, target)
            for identifier, ident in child_owned.items():
                self._set_attr(ident, "profile_id", target)
                self.set_item(owned, identifier, ident)
            self.del_item(data.owned, child)
        # Per trait key the newest value wins; on a tie the value of the message ingested later (as on one
        # profile), the parent's when that is unknown (a value set without its message).
        child_traits = data.traits.get(child)
        if child_traits is not None:
            if child_traits:
                traits = self._child_dict(data.traits, target)
                for name, value in child_traits.items():
                    current = traits.get(name)
                    if (
                        current is None
                        or value[1] > current[1]
                        or (value[1] == current[1] and self._ingested_later(data, value[3], current[3]))
                    ):
                        self.set_item(traits, name, value)
            self.del_item(data.traits, child)
        # Links of the merged side move to the target (a link the target already has is kept as is).
        if collection == "accounts":
            for user in list(data.account_links.get(child, ())):
                linked_at = data.links[(user, child)]
                self._unlink(data, user, child)
                self._link(data, user, target, linked_at)
        else:
            for account in list(data.user_links.get(child, ())):
                linked_at = data.links[(child, account)]
                self._unlink(data, child, account)
                self._link(data, target, account, linked_at)
        self._index(data.parent_merges, target, len(data.merges))
        self._append(data.merges, MergeRecord(target, child, message_id, via, at))

    @staticmethod
    def _ingested_later(data: _Space, message_id: str | None, other: str | None) -> bool:
        """Whether `message_id` was stored after `other` (False when either is unknown)."""
        sequence = None if message_id is None else data.message_ids.get(message_id)
        other_sequence = None if other is None else data.message_ids.get(other)
        return sequence is not None and other_sequence is not None and sequence > other_sequence

    def _link(self, data: _Space, user_id: str, account_id: str, at: datetime) -> None:
        key = (user_id, account_id)
        if key in data.links:
            return
        self.set_item(data.links, key, at)
        self.set_item(self._child_dict(data.user_links, user_id), account_id, None)
        self.set_item(self._child_dict(data.account_links, account_id), user_id, None)

    def _unlink(self, data: _Space, user_id: str, account_id: str) -> None:
        self.del_item(data.links, (user_id, account_id))
        self.del_item(data.user_links[user_id], account_id)
        self.del_item(data.account_links[account_id], user_id)

    def record_dropped(
        self, space: str, dropped: Sequence[Dropped], message_id: str, at: datetime, profile_id: str | None
    ) -> None:
        """Record dropped identifiers."""
        when = _utc(at)
        records = [
            DroppedRecord(message_id, str(item.identifier), item.rule, when, profile_id) for item in dropped
        ]
        if not records:
            return
        data = self._space(space)
        for record in records:
            if profile_id is not None:
                self._index(data.profile_dropped, profile_id, len(data.dropped))
            self._index(data.message_dropped, message_id, len(data.dropped))
            self._append(data.dropped, record)

    def set_traits(
        self,
        space: str,
        profile_id: str,
        updates: Mapping[str, Any],
        at: datetime,
        source: str | None = None,
        message_id: str | None = None,
    ) -> None:
        """Set traits (with the source and message that sent them) unless a newer value is stored; None removes."""
        when = _utc(at)
        encoded = [
            (key, None if value is None else _json_encode(value).decode()) for key, value in updates.items()
        ]
        if not encoded:
            return
        traits = self._child_dict(self._space(space).traits, profile_id)
        for key, text in encoded:
            current = traits.get(key)
            if current is None or when >= current[1]:
                self.set_item(traits, key, (text, when, source, message_id))

    def link(self, space: str, user_id: str, account_id: str, at: datetime) -> None:
        """Link a user and an account (idempotent: the first link's time is kept)."""
        self._link(self._space(space), user_id, account_id, _utc(at))

    def add_event(self, space: str, event: EventRecord) -> None:
        """Store a message; a message id is stored once per space."""
        data = self._space(space)
        message_id = event.message_id
        if message_id in data.message_ids:
            raise IntegrityError(f"message {message_id!r} is already stored in space {space!r}")
        store = self._store
        sequence = store._sequence + 1
        row: _Event = (
            message_id,
            event.type,
            event.name,
            _utc(event.timestamp),
            _utc(event.received_at),
            event.source,
            event.profile_id,
            event.account_id,
            tuple(event.identifiers),
            bytes(event.payload),
            sequence,
        )
        log = self._log
        log.append((_ATTR, store, "_sequence", store._sequence))
        store._sequence = sequence
        log.append((_DICT, data.message_ids, message_id, _MISSING))
        data.message_ids[message_id] = sequence
        log.append((_DICT, data.events, sequence, _MISSING))
        data.events[sequence] = row
        if event.profile_id is not None:
            self._index(data.user_events, event.profile_id, sequence)
        if event.account_id is not None:
            self._index(data.account_events, event.account_id, sequence)
        if event.profile_id is None and event.account_id is None:
            self._append(data.unresolved, sequence)

    def learn_types(self, space: str, types: Sequence[tuple[str, str]]) -> None:
        """Append custom types in first-seen order (a type is learned once, with its first collection)."""
        if not types:
            return
        learned = self._space(space).learned
        for identifier_type, collection in types:
            if identifier_type not in learned:
                self.set_item(learned, identifier_type, collection)
