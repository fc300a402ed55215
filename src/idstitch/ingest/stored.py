"""Stored messages read back for the engine: what `idstitch copy` replays into another store.

A store keeps every message it accepted with the source it came from (SPEC §5: the raw message is kept so
that any part of the graph can be re-resolved). Read back in the order they were stored and resolved again
under the same rules, they give the same graph, segment ids included (SPEC §5, deterministic replay).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import Message, parse_stored
from idstitch.engine import IngestBatch
from idstitch.storage.base import EventRecord, StoreConflict

__all__ = ["StoredGroup", "StoredMessages", "read_stored_groups"]


class StoredMessages(Protocol):
    """What a copy reads from the store it copies: its stored messages in order (Store has it)."""

    def iter_events(self, space: str, *, after_sequence: int = 0) -> Iterator[EventRecord]:
        """Every stored message of a space after a sequence, in ingest order."""
        ...


@dataclass(slots=True)
class StoredGroup:
    """Consecutive stored messages of one space, for one transaction: a batch per run of one source."""

    batches: list[IngestBatch] = field(default_factory=list)
    labels: list[list[str]] = field(default_factory=list)  # per batch, each message's `id (sequence N)`
    messages: int = 0
    last_sequence: int = 0


def read_stored_groups(
    store: StoredMessages,
    space: str,
    *,
    group_size: int,
    after_sequence: int = 0,
    outage_wait: float = 0.0,
    pause: float = 1.0,
) -> Iterator[StoredGroup]:
    """The messages `store` holds in `space`, in stored order, as groups of up to `group_size`.

    A source's policy (which identifiers it may send, whether they may merge) applies to its messages
    only, so a group is split into one batch per run of messages of one source; the engine still
    resolves and commits the whole group as one transaction (interleaved sources would otherwise commit
    one message at a time). A payload that no longer parses (stored by an idstitch that validated less)
    becomes its InvalidEvent, which the engine rejects with the reason while the rest lands.

    A read that fails because the store's server cannot be reached (a PostgreSQL source restarting) or
    lost its connection is tried again every `pause` seconds for up to `outage_wait`, from after the last
    message read, as the engine rides out the same outage of the store it writes to.
    """
    group = StoredGroup()
    for event in _events_through_outages(store, space, after_sequence, outage_wait, pause):
        item: Message | InvalidEvent
        try:
            item = parse_stored(event.payload, received_at=event.received_at)
        except InvalidEvent as error:
            item = error
        last = group.batches[-1] if group.batches else None
        if last is None or last.source != event.source:
            last = IngestBatch([], space, event.source)
            group.batches.append(last)
            group.labels.append([])
        last.items.append(item)
        group.labels[-1].append(f"{event.message_id} (sequence {event.sequence})")
        group.messages += 1
        group.last_sequence = event.sequence
        if group.messages >= group_size:
            yield group
            group = StoredGroup()
    if group.messages:
        yield group


def _events_through_outages(
    store: StoredMessages, space: str, after_sequence: int, outage_wait: float, pause: float
) -> Iterator[EventRecord]:
    """The stored messages after a sequence; a failed page is read again from after the last one read."""
    after = after_sequence
    failing_since: float | None = None
    while True:
        try:
            for event in store.iter_events(space, after_sequence=after):
                after = event.sequence
                failing_since = None
                yield event
            return
        except StoreConflict:  # StoreUnavailable too: the server is down, or only this connection was lost
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since >= outage_wait:
                raise
            time.sleep(pause)
