"""A write-through, bounded, in-memory copy of the identity graph for a single-writer store.

The SQLite adapter has exactly one writer, so what it wrote is what the database holds: the cache can
answer the resolver's reads without SQL. It is *complete* (a miss means "absent") while it holds the
whole graph, and a positive cache (a miss means "ask the database") once it has been cleared: after a
rollback that touched it, after another connection committed, or when it outgrows its bound.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any, Final

import msgspec

from idstitch.core.graph import GraphView, ProfileState, StoredIdentifier
from idstitch.core.identifiers import Identifier
from idstitch.storage.times import from_micros

__all__ = [
    "DEFAULT_MAX_IDENTIFIERS",
    "GraphCache",
    "GraphCacheReader",
    "IdentifierEntry",
    "IdentifierKey",
    "ProfileEntry",
    "newest_pairs",
    "refreshed_rows",
    "seen_together",
]

# Measured at 1M messages (453k identifiers): a 250k bound ingests as fast as 2M (4,061 vs 3,973
# msg/s) because the hot part of the graph is recent visitors, and it keeps RSS flat as the store grows.
DEFAULT_MAX_IDENTIFIERS: Final = 250_000

IdentifierKey = tuple[str, str, str, str]  # space, collection, type, value
ProfileKey = tuple[str, str]  # space, segment_id


# The cache holds up to DEFAULT_MAX_IDENTIFIERS of these: gc=False keeps them (they hold no cycles) out of
# the garbage collector's full scans, which stop every thread. With 68k identifiers cached a full
# collection took 160 ms as plain classes with sets and lists, and 11 ms like this.
class IdentifierEntry(msgspec.Struct, gc=False):
    """One identifier row (times in microseconds)."""

    profile_id: str
    first_seen: int
    last_seen: int
    retired: bool = False
    device_owner: str | None = None
    device_owner_at: int | None = None

    def seen_at(self, at: int) -> bool:
        """Widen first and last seen to include `at`; whether that changed anything."""
        if self.last_seen >= at and self.first_seen <= at:
            return False
        self.last_seen = max(self.last_seen, at)
        self.first_seen = min(self.first_seen, at)
        return True

    def owned_by(self, owner: str, at: int) -> bool:
        """A login by `owner` on this device at `at`; whether it changed the device's owner."""
        if self.device_owner_at is not None and self.device_owner_at > at:
            return False  # a newer login on this device already owns it
        if self.device_owner == owner and self.device_owner_at == at:
            return False
        self.device_owner, self.device_owner_at = owner, at
        return True


class ProfileEntry(msgspec.Struct, gc=False):
    """One profile row; a root also knows its members and its merged children.

    `members` is a dict used as an ordered set, and `children` a tuple: unlike a set or a list, both are
    left out of the garbage collector's scans once they hold only strings, like the entries themselves.
    """

    collection: str
    created_at: int
    merge_count: int = 0
    parent_id: str | None = None
    members: dict[IdentifierKey, None] = msgspec.field(default_factory=dict)
    children: tuple[str, ...] = ()


class GraphCache:
    """The cached graph: identifiers, profiles, evidence. Suspects are small and always held in full."""

    def __init__(self, max_identifiers: int = DEFAULT_MAX_IDENTIFIERS) -> None:
        self.max_identifiers = max_identifiers
        self.complete = False
        self.loaded = False
        self.writes = 0  # bumped on every change, so a rollback knows whether the cache is dirty
        self.identifiers: dict[IdentifierKey, IdentifierEntry | None] = {}
        self.profiles: dict[ProfileKey, ProfileEntry] = {}
        self.evidence: dict[IdentifierKey, dict[tuple[str, str], int]] = {}
        self.suspects: set[IdentifierKey] = set()

    def clear(self) -> None:
        """Forget everything but the suspects; misses go to the database from now on."""
        self.complete = False
        self.identifiers.clear()
        self.profiles.clear()
        self.evidence.clear()

    def invalidate(self) -> None:
        """Forget everything, suspects included (another writer or a rollback changed the database)."""
        self.clear()
        self.suspects.clear()
        self.loaded = False

    def over_bound(self) -> bool:
        """Whether the cache has grown past its bound and should be cleared."""
        return len(self.identifiers) > self.max_identifiers


def seen_together(partners: dict[tuple[str, str], int], other: tuple[str, str], at: int) -> bool:
    """Evidence: an identifier seen with `other` (type, value) at `at`; whether that is news."""
    last = partners.get(other)
    if last is not None and last >= at:
        return False
    partners[other] = at
    return True


def refreshed_rows(
    touches: Iterable[tuple[IdentifierKey, int]], owners: Iterable[tuple[IdentifierKey, str, int]]
) -> dict[IdentifierKey, list[Any]]:
    """Held-back refreshes reduced to the last word per identifier, as applying them one by one would
    leave it: key -> [first seen, last seen, device owner, owned at] (None leaves a column alone)."""
    rows: dict[IdentifierKey, list[Any]] = {}
    for key, at in touches:
        row = rows.setdefault(key, [at, at, None, None])
        row[0], row[1] = min(row[0], at), max(row[1], at)
    for key, owner, at in owners:
        row = rows.setdefault(key, [None, None, None, None])
        if row[3] is None or at >= row[3]:
            row[2], row[3] = owner, at  # a tie goes to the later login, as row by row would
    return rows


def newest_pairs(
    pairs: Iterable[tuple[IdentifierKey, tuple[str, str], int]],
) -> dict[tuple[IdentifierKey, tuple[str, str]], int]:
    """Held-back evidence reduced to the newest time per (identifier, other identifier)."""
    newest: dict[tuple[IdentifierKey, tuple[str, str]], int] = {}
    for key, other, at in pairs:
        newest[(key, other)] = max(at, newest.get((key, other), at))
    return newest


class GraphCacheReader:
    """The resolver's view of a cached graph; a store says how it reads what the cache lacks."""

    cache: GraphCache

    def _identifier(self, key: IdentifierKey) -> IdentifierEntry | None:
        """An identifier row (None: absent)."""
        raise NotImplementedError

    def _evidence(self, key: IdentifierKey) -> dict[tuple[str, str], int]:
        """The identifiers (type, value) a lower-priority identifier was seen with, and when."""
        raise NotImplementedError

    def _profile(self, space: str, segment_id: str) -> ProfileEntry:
        """A profile row (a root with its members)."""
        raise NotImplementedError

    def _view(
        self, space: str, collection: str, identifiers: Sequence[Identifier], *, every_pair: bool = True
    ) -> GraphView:
        """Owners, their profiles, evidence and suspects for a message's identifiers (evidence only
        between them unless `every_pair`)."""
        # Only with detection off, where it bounds the evidence read: the default path pays nothing.
        asked = () if every_pair else [(identifier.type, identifier.value) for identifier in identifiers]
        owned: dict[Identifier, StoredIdentifier] = {}
        evidence: dict[Identifier, dict[Identifier, datetime]] = {}
        suspects: set[Identifier] = set()
        roots: dict[str, None] = {}
        for identifier in identifiers:
            key = (space, collection, identifier.type, identifier.value)
            entry = self._identifier(key)
            if entry is not None:
                owner = entry.device_owner
                if owner is not None:
                    owner = self._root(space, owner)
                    roots[owner] = None
                owned[identifier] = StoredIdentifier(
                    identifier,
                    entry.profile_id,
                    from_micros(entry.first_seen),
                    from_micros(entry.last_seen),
                    entry.retired,
                    owner,
                    None if entry.device_owner_at is None else from_micros(entry.device_owner_at),
                )
                roots[entry.profile_id] = None
            if key in self.cache.suspects:
                suspects.add(identifier)
                continue  # a suspect stays suspect: its evidence is never needed again
            partners = self._evidence(key)
            if partners and not every_pair:
                partners = {pair: partners[pair] for pair in asked if pair in partners}
            if partners:
                evidence[identifier] = {
                    Identifier(other_type, other_value, collection): from_micros(last_seen)
                    for (other_type, other_value), last_seen in partners.items()
                }
        profiles = {root: self._profile_state(space, root) for root in roots}
        return GraphView(owned, profiles, evidence, frozenset(suspects))

    def _root(self, space: str, segment_id: str) -> str:
        """The root of a profile (a merge may have moved it)."""
        entry = self._profile(space, segment_id)
        while entry.parent_id is not None:
            segment_id = entry.parent_id
            entry = self._profile(space, segment_id)
        return segment_id

    def _profile_state(self, space: str, root: str) -> ProfileState:
        entry = self._profile(space, root)
        members = []
        for key in entry.members:
            member = self._identifier(key)
            assert member is not None, key
            members.append(
                StoredIdentifier(
                    Identifier(key[2], key[3], key[1]),
                    root,
                    from_micros(member.first_seen),
                    from_micros(member.last_seen),
                    member.retired,
                )
            )
        return ProfileState(
            root, entry.collection, from_micros(entry.created_at), entry.merge_count, tuple(members)
        )
