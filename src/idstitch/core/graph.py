"""The read-only view of the graph that the resolver needs: the message's identifiers and their profiles."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import msgspec

from idstitch.core.identifiers import Identifier

__all__ = ["GraphView", "ProfileState", "StoredIdentifier"]


# msgspec structs, not dataclasses: the store builds one per member of every profile a message touches,
# and a frozen dataclass's __init__ costs several times as much.
class StoredIdentifier(msgspec.Struct, frozen=True, gc=False):
    """An identifier as the store holds it; `profile_id` is always the root profile."""

    identifier: Identifier
    profile_id: str
    first_seen: datetime
    last_seen: datetime
    retired: bool = False
    # The root profile that last used this identifier together with a more trusted one (SPEC §5).
    device_owner: str | None = None
    device_owner_at: datetime | None = None


class ProfileState(msgspec.Struct, frozen=True, gc=False):
    """A root profile with every identifier it owns (its merged children's included)."""

    segment_id: str
    collection: str
    created_at: datetime
    merge_count: int
    identifiers: tuple[StoredIdentifier, ...]

    @property
    def age_key(self) -> tuple[datetime, str]:
        """Sort key for "oldest": creating message's timestamp, then the smaller segment id."""
        return (self.created_at, self.segment_id)


@dataclass(frozen=True)
class GraphView:
    """What the store knows about a message's identifiers, loaded before resolving it."""

    identifiers: Mapping[Identifier, StoredIdentifier] = field(default_factory=dict)
    profiles: Mapping[str, ProfileState] = field(default_factory=dict)
    # lower-priority identifier -> more trusted identifier -> last time seen together in a message
    evidence: Mapping[Identifier, Mapping[Identifier, datetime]] = field(default_factory=dict)
    # identifiers marked non-unique, whether or not a profile owns them
    suspects: frozenset[Identifier] = frozenset()
