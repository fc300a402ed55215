"""The Store protocol: what the engine needs from a database, and the records reads return.

Every adapter (SQLite, PostgreSQL, memory) passes the same contract suite in tests/store_contract.py.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, runtime_checkable

import msgspec

from idstitch.core.graph import GraphView
from idstitch.core.identifiers import Dropped, Identifier
from idstitch.core.resolve import Resolution

__all__ = [
    "DroppedRecord",
    "EventQuery",
    "EventRecord",
    "EventResolution",
    "IdentifierRecord",
    "IntegrityError",
    "LinkRecord",
    "LockBusy",
    "MergeRecord",
    "MigratedStore",
    "ProfileActivity",
    "ProfileRecord",
    "SourceRecord",
    "SpaceStats",
    "Store",
    "StoreConflict",
    "StoreFull",
    "StoreTransaction",
    "StoreUnavailable",
    "StoreWriteFailed",
    "SuspectRecord",
    "TokenRecord",
    "TraitRecord",
]


class IntegrityError(Exception):
    """A write that would break a uniqueness rule of the schema (profile, identifier, message id, write
    key): the engine never makes one; a store refuses it where it is made when it can tell there."""


class StoreConflict(Exception):
    """A transaction lost to a concurrent writer or its connection (deadlock, serialisation failure,
    connection killed): nothing of it was committed, or its commit is unknown; the whole transaction
    may be run again (message-id de-duplication makes a commit that did land count once).

    Not an IdstitchError: the engine retries it instead of rejecting the message at hand.
    """


class StoreUnavailable(StoreConflict):
    """The store's server cannot be reached (down, restarting, refusing logins): raised at once, not
    after waiting out a pool; the engine does not retry it, as every try would fail the same way
    until the server is back. A conflict too, for callers that wait out both alike (the queue worker).
    """


class StoreWriteFailed(Exception):
    """The store could not write its files (a full quota, a file size limit, a failing disk): nothing of
    the transaction was committed, and it may be run again once that is mended (message-id
    de-duplication makes that safe). Not a conflict: retrying at once fails alike, so callers answer
    "retry later" (the HTTP edge: 503) or stop with what committed kept.
    """

    what = "the store could not write to its disk"  # for the public: names no file, no OS error


class StoreFull(StoreWriteFailed):
    """The store's disk is full: its writes fail until space is freed."""

    what = "the store's disk is full"


class LockBusy(StoreConflict):
    """A concurrent transaction holds a lock this one needs while it already holds others.

    Waiting could deadlock, so the store refuses at once: the engine commits the messages before this
    one and starts this one in a fresh transaction (which waits for its first locks), or, with nothing
    to commit, rolls back and retries.
    """


@dataclass(frozen=True, slots=True)
class SourceRecord:
    """A source: its space and write key."""

    space: str
    name: str
    write_key: str


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A Profile API token of a space: `read` opens profile reads, `admin` also the space-wide views."""

    space: str
    token: str
    kind: str  # read | admin


class EventRecord(msgspec.Struct, frozen=True, gc=False):
    """One stored message: which profile it resolved to (None: unresolved) and what it carried."""

    message_id: str
    type: str
    name: str | None
    timestamp: datetime
    received_at: datetime
    source: str | None
    profile_id: str | None
    account_id: str | None
    identifiers: tuple[str, ...]
    payload: bytes
    sequence: int = 0  # store-assigned ingest order; a stable cursor while new events arrive


@dataclass(frozen=True, slots=True)
class IdentifierRecord:
    """An identifier on a profile."""

    type: str
    value: str
    collection: str
    first_seen: datetime
    last_seen: datetime
    retired: bool = False
    suspect: bool = False
    source: str | None = None  # the source of the message that first attached it
    first_message_id: str | None = None  # that message


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    """A root profile."""

    segment_id: str
    collection: str
    created_at: datetime
    merge_count: int
    merged_segment_ids: tuple[str, ...] = ()
    created_by: str = ""  # the message that created it


@dataclass(frozen=True, slots=True)
class TraitRecord:
    """One current trait of a profile, with the source and time of the message that set it."""

    key: str
    value: Any
    source: str | None
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class LinkRecord:
    """A root profile of the other collection linked to a profile, and when they were first linked."""

    segment_id: str
    at: datetime


@dataclass(frozen=True, slots=True)
class ProfileActivity:
    """The first and last message of a root profile's family (the Profile API's `metadata`)."""

    first_message_id: str | None
    first_source: str | None
    last_message_id: str | None
    last_source: str | None
    updated_at: datetime | None  # when the last message was received


@dataclass(frozen=True, slots=True)
class EventQuery:
    """Which events of a profile to read, in which order, from where (a keyset cursor)."""

    limit: int = 10
    descending: bool = True  # order by (timestamp, message_id)
    # The (timestamp, message_id) of the last event already seen; the page starts after it, so pages
    # stay stable while new events arrive.
    after: tuple[datetime, str] | None = None
    start: datetime | None = None  # timestamp >= start
    end: datetime | None = None  # timestamp < end
    include: frozenset[str] = frozenset()  # only these event names (empty: all)
    exclude: frozenset[str] = frozenset()  # not these event names


@dataclass(frozen=True, slots=True)
class MergeRecord:
    """One entry of the merge log."""

    parent_id: str
    child_id: str
    message_id: str
    via: str
    at: datetime


@dataclass(frozen=True, slots=True)
class EventResolution:
    """Where one stored message stands now: the root profiles it resolved to and what it carried."""

    message_id: str
    profile_id: str | None  # the root of the user profile it reached (merges followed), if any
    account_id: str | None  # the root of the account it named, if any
    identifiers: tuple[str, ...]  # every identifier it carried, "type:value", blocked ones included


@dataclass(frozen=True, slots=True)
class DroppedRecord:
    """An identifier a message carried that was not attached, with the rule that dropped it."""

    message_id: str
    identifier: str
    rule: str
    at: datetime
    profile_id: str | None


@dataclass(frozen=True, slots=True)
class SuspectRecord:
    """An identifier found non-unique, with its evidence."""

    identifier: str
    collection: str
    evidence_type: str
    evidence_values: tuple[str, ...]
    message_id: str
    at: datetime


@dataclass(frozen=True, slots=True)
class SpaceStats:
    """Counts of one space."""

    space: str
    profiles: int = 0
    accounts: int = 0
    identifiers: int = 0
    merges: int = 0
    events: int = 0
    unresolved: int = 0
    suspect: int = 0
    dropped: int = 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-able form."""
        return {
            "space": self.space,
            "profiles": self.profiles,
            "accounts": self.accounts,
            "identifiers": self.identifiers,
            "merges": self.merges,
            "events": self.events,
            "unresolved": self.unresolved,
            "suspect": self.suspect,
            "dropped": self.dropped,
        }


class StoreTransaction(Protocol):
    """One write transaction; everything in it commits together or not at all."""

    def savepoint(self) -> AbstractContextManager[None]:
        """A nested unit: a failing message rolls back alone while the rest of the batch lands."""
        ...

    def claim(self, space: str, message_id: str, identifiers: Sequence[Identifier]) -> None:
        """Serialise with concurrent writers on this message and its identifiers until commit.

        A store with one writer does nothing. A store with concurrent writers locks them (waiting only
        while the transaction holds no other lock, else raising LockBusy).
        """
        ...

    def claim_many(self, claims: Sequence[tuple[str, str, Sequence[Identifier]]]) -> None:
        """At the start of a transaction, claim ahead the messages (space, message id, identifiers) it
        is about to claim one by one: a store with concurrent writers locks and reads them in one go."""
        ...

    def has_message(self, space: str, message_id: str) -> bool:
        """Whether this space already stored a message with this id (de-duplication)."""
        ...

    def load_view(
        self, space: str, collection: str, identifiers: Sequence[Identifier], *, every_pair: bool = True
    ) -> GraphView:
        """The graph neighbourhood of these identifiers: owners (roots), their profiles, evidence, suspects.

        `every_pair=False` (non-unique detection off): evidence only between these identifiers, which
        is all the resolver then reads; an identifier shared by a million others is not read in full.
        """
        ...

    def apply_resolution(
        self, space: str, resolution: Resolution, message_id: str, source: str | None = None
    ) -> None:
        """Write one collection's decision: new profile, merges, identifiers, suspects, evidence, drops.

        New identifiers remember `message_id` and `source` as the message and source that first attached them.
        """
        ...

    def record_dropped(
        self, space: str, dropped: Sequence[Dropped], message_id: str, at: datetime, profile_id: str | None
    ) -> None:
        """Record identifiers dropped before resolution (blocked values, source policy)."""
        ...

    def set_traits(
        self,
        space: str,
        profile_id: str,
        updates: Mapping[str, Any],
        at: datetime,
        source: str | None = None,
        message_id: str | None = None,
    ) -> None:
        """Set traits where `at` is not older than the stored value's time; None values remove.

        `message_id` names the message that sets them: a merge that finds one key set at the same time on
        both sides keeps the value of the message ingested later, as one profile would have.
        """
        ...

    def link(self, space: str, user_id: str, account_id: str, at: datetime) -> None:
        """Link a user profile and an account profile (idempotent)."""
        ...

    def add_event(self, space: str, event: EventRecord) -> None:
        """Store one message (resolved or not)."""
        ...

    def learn_types(self, space: str, types: Sequence[tuple[str, str]]) -> None:
        """Remember custom identifier types (type, collection) in first-seen order."""
        ...


@runtime_checkable
class MigratedStore(Protocol):
    """A store on disk or a server, whose schema numbered migrations bring up to this build's."""

    # The schema version a writer found on opening it (0: none); None: opened read-only, or in memory.
    migrated_from: int | None

    def schema_version(self) -> int:
        """The newest applied migration."""
        ...


class Store(Protocol):
    """A graph store. One writer at a time; reads may run concurrently with it."""

    url: str

    def close(self) -> None:
        """Release connections."""
        ...

    def transaction(self) -> AbstractContextManager[StoreTransaction]:
        """A write transaction; commits durably on success, rolls back on an exception."""
        ...

    # spaces and sources
    def ensure_space(self, space: str) -> None:
        """Create the space if it does not exist."""
        ...

    def spaces(self) -> list[str]:
        """Every space, sorted."""
        ...

    def upsert_source(self, source: SourceRecord, *, replace: bool = True) -> None:
        """Create or update a source (keyed by space and name); `replace=False` keeps an existing one.

        `replace=False` is how concurrent first runs agree on one generated write key: the first wins.
        """
        ...

    def sources(self) -> list[SourceRecord]:
        """Every source."""
        ...

    def learned_types(self, space: str) -> list[tuple[str, str]]:
        """Custom identifier types of a space in first-seen order."""
        ...

    def upsert_token(self, token: TokenRecord) -> None:
        """Create a Profile API token (keyed by the token itself) or change its space or kind."""
        ...

    def first_token(self, token: TokenRecord) -> TokenRecord:
        """Store `token` unless its space already has a token of its kind; the one kept, either way.

        How concurrent first runs agree on one generated read and one admin token: the first wins.
        """
        ...

    def tokens(self) -> list[TokenRecord]:
        """Every Profile API token the store keeps (generated on a first run without config)."""
        ...

    # reads
    def snapshot(self) -> AbstractContextManager[None]:
        """Every read of this thread inside sees one moment of the graph, whatever commits meanwhile.

        A response made of several reads (find the root, then its identifiers, traits, events, links)
        would otherwise describe a merge half applied. Nested: the outermost one's moment.
        """
        ...

    def find_profile(self, space: str, identifier: Identifier) -> str | None:
        """The root profile owning an identifier."""
        ...

    def resolve_segment_id(self, space: str, segment_id: str) -> str | None:
        """The root of a segment id (itself, or its parent once merged)."""
        ...

    def profile(self, space: str, segment_id: str) -> ProfileRecord | None:
        """A root profile (call resolve_segment_id first for a possibly merged id)."""
        ...

    def identifiers(self, space: str, profile_id: str) -> list[IdentifierRecord]:
        """Identifiers of a root profile, in first-seen order."""
        ...

    def traits(self, space: str, profile_id: str) -> dict[str, Any]:
        """Current traits of a root profile."""
        ...

    def trait_records(
        self,
        space: str,
        profile_id: str,
        *,
        after: str = "",
        include: Sequence[str] = (),
        limit: int | None = None,
    ) -> list[TraitRecord]:
        """Current traits of a root profile with source and time, sorted by key (removed ones left out).

        A page: keys from `after` on (itself included), only those in `include` when it names any, the first
        `limit`; a profile of 50,000 trait keys reads its page only.
        """
        ...

    def activity(self, space: str, profile_id: str) -> ProfileActivity:
        """First (the creating message) and last-ingested message of a root profile's family."""
        ...

    def event_count(self, space: str, profile_id: str) -> int:
        """How many events a root profile (with its merged children) has."""
        ...

    def events(
        self, space: str, profile_id: str, *, limit: int = 10, after_sequence: int | None = None
    ) -> list[EventRecord]:
        """Events of a root and its merged children, newest first by sequence; page with after_sequence."""
        ...

    def event_page(self, space: str, profile_id: str, query: EventQuery) -> list[EventRecord]:
        """One page of a root family's events, ordered by (timestamp, message_id), filtered by the query."""
        ...

    def links(self, space: str, profile_id: str, *, limit: int | None = None) -> list[str]:
        """Root profiles of the other collection linked to this one, oldest link first (the first `limit`)."""
        ...

    def link_records(
        self,
        space: str,
        profile_id: str,
        *,
        after: tuple[datetime, str] | None = None,
        limit: int | None = None,
    ) -> list[LinkRecord]:
        """The links of `links()` with their times, in its order: by first link, then segment id; a page
        of at most `limit` after the place (time, segment id) `after`, read by an index (an account may
        have 200,000 users)."""
        ...

    def merges(self, space: str, profile_id: str) -> list[MergeRecord]:
        """The merge log of a root profile's family, oldest first."""
        ...

    def dropped(self, space: str, profile_id: str) -> list[DroppedRecord]:
        """Identifiers dropped from messages that resolved to this profile's family."""
        ...

    def dropped_in(self, space: str, message_ids: Sequence[str]) -> list[DroppedRecord]:
        """Identifiers dropped from these messages, whichever profile they reached, in recording order."""
        ...

    def suspects(self, space: str, *, limit: int | None = None) -> list[SuspectRecord]:
        """Identifiers marked non-unique in a space, by time marked, type, value, collection (the first `limit`)."""
        ...

    def suspects_from(self, space: str, identifier: Identifier, *, limit: int) -> list[SuspectRecord] | None:
        """Up to `limit` marks in `suspects` order from this identifier's (included); None when it is not
        suspect. A page of a space with a million suspects reads only that page."""
        ...

    def suspects_among(self, space: str, identifiers: Sequence[Identifier]) -> list[SuspectRecord]:
        """The marks of these identifiers (the others are not suspect), in `suspects` order."""
        ...

    def unmark_declared(self, space: str, identifiers: Sequence[Identifier]) -> None:
        """Remove the marks of these identifiers that a declared non-unique rule made (detected marks stay).

        For a rule change: a value no longer declared is an ordinary identifier again.
        """
        ...

    def unresolved(
        self, space: str, *, limit: int = 100, before_sequence: int | None = None
    ) -> list[EventRecord]:
        """Messages whose identifiers were all blocked, newest first; page with the last sequence seen."""
        ...

    def stats(self, space: str) -> SpaceStats:
        """Counts of a space."""
        ...

    def dump(self, space: str) -> dict[str, Any]:
        """The whole graph of a space in a canonical JSON-able form (tests compare graphs with it)."""
        ...

    def iter_event_ids(self, space: str) -> Iterator[str]:
        """Every stored message id of a space."""
        ...

    def iter_event_resolutions(self, space: str) -> Iterator[EventResolution]:
        """Every stored message of a space in ingest order with its root profiles now, read in pages."""
        ...

    def iter_events(self, space: str, *, after_sequence: int = 0) -> Iterator[EventRecord]:
        """Every stored message of a space after a sequence, in ingest order, read in pages (a copy replays them)."""
        ...

    def blocked_values(self, space: str) -> frozenset[str]:
        """Every identifier ("type:value") that a blocked-values rule dropped from some message."""
        ...
