"""A write-through, bounded, in-memory copy of the identity graph for a single-writer store.

The SQLite adapter has exactly one writer, so what it wrote is what the database holds: the cache can
answer the resolver's reads without SQL. It is *complete* (a miss means "absent") while it holds the
whole graph, and a positive cache (a miss means "ask the database") once it has been cleared: after a
rollback that touched it, after another connection committed, or when it outgrows its bound.
"""

from __future__ import annotations

from typing import Final

__all__ = ["DEFAULT_MAX_IDENTIFIERS", "GraphCache", "IdentifierEntry", "IdentifierKey", "ProfileEntry"]

# Measured at 1M messages (453k identifiers): a 250k bound ingests as fast as 2M (4,061 vs 3,973
# msg/s) because the hot part of the graph is recent visitors, and it keeps RSS flat as the store grows.
DEFAULT_MAX_IDENTIFIERS: Final = 250_000

IdentifierKey = tuple[str, str, str, str]  # space, collection, type, value
ProfileKey = tuple[str, str]  # space, segment_id


class IdentifierEntry:
    """One identifier row (times in microseconds)."""

    __slots__ = ("device_owner", "device_owner_at", "first_seen", "last_seen", "profile_id", "retired")

    def __init__(
        self,
        profile_id: str,
        first_seen: int,
        last_seen: int,
        retired: bool = False,
        device_owner: str | None = None,
        device_owner_at: int | None = None,
    ) -> None:
        self.profile_id = profile_id
        self.first_seen = first_seen
        self.last_seen = last_seen
        self.retired = retired
        self.device_owner = device_owner
        self.device_owner_at = device_owner_at


class ProfileEntry:
    """One profile row; a root also knows its members and its merged children."""

    __slots__ = ("children", "collection", "created_at", "members", "merge_count", "parent_id")

    def __init__(
        self,
        collection: str,
        created_at: int,
        merge_count: int = 0,
        parent_id: str | None = None,
        members: set[IdentifierKey] | None = None,
        children: list[str] | None = None,
    ) -> None:
        self.collection = collection
        self.created_at = created_at
        self.merge_count = merge_count
        self.parent_id = parent_id
        self.members: set[IdentifierKey] = members if members is not None else set()
        self.children: list[str] = children if children is not None else []


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
