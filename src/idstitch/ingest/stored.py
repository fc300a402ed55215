"""Stored messages read back for the engine: what `idstitch copy` replays into another store.

A store keeps every message it accepted with the source it came from (SPEC §5: the raw message is kept so
that any part of the graph can be re-resolved). Read back in the order they were stored and resolved again
under the same rules, they give the same graph, segment ids included (SPEC §5, deterministic replay).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import Message, parse_stored
from idstitch.engine import IngestBatch
from idstitch.storage.base import DroppedRecord, EventRecord, StoreConflict

__all__ = [
    "CopiedBefore",
    "StoredGroup",
    "StoredMessages",
    "copied_before",
    "drops_differing",
    "read_stored_groups",
]


class StoredMessages(Protocol):
    """What a copy reads from the store it copies: its stored messages in order (Store has it)."""

    def iter_events(self, space: str, *, after_sequence: int = 0) -> Iterator[EventRecord]:
        """Every stored message of a space after a sequence, in ingest order."""
        ...

    def dropped_in(self, space: str, message_ids: Sequence[str]) -> list[DroppedRecord]:
        """Dropped identifiers of these messages, in recording order."""
        ...


class StoredMessageIds(Protocol):
    """What a copy reads from the store it writes to, to find what an earlier run put there (Store has it)."""

    def iter_event_ids(self, space: str) -> Iterator[str]:
        """Every stored message id of a space, in ingest order."""
        ...


@dataclass(frozen=True, slots=True)
class CopiedBefore:
    """What the store copied into already holds of one space, measured against the store copied from."""

    messages: int  # the source's first messages, held in the same order: an earlier run copied them
    after_sequence: int  # the source's sequence of the last of those: the copy goes on after it
    foreign: int  # messages held that the source does not hold at all: another store's
    first_foreign: str | None = None


def copied_before(
    source: StoredMessages, target: StoredMessageIds, space: str, *, outage_wait: float = 0.0
) -> CopiedBefore:
    """How far an earlier copy of `space` got, and whether the target holds messages of its own.

    A copy commits the source's messages in their order, so an interrupted one leaves the source's first
    messages: those are skipped without being resolved again (a resumed copy of millions would otherwise
    check each one as a duplicate). Past the first difference (a message rejected again, or one a
    PostgreSQL source committed late and a later run appended) the copy goes on with its duplicate check;
    the target's messages the source never held are counted, as a copy into them would mix two graphs.
    """
    held = iter(target.iter_event_ids(space))
    expected = next(held, None)
    if expected is None:
        return CopiedBefore(0, 0, 0)
    messages = after = 0
    unmatched: dict[str, None] | None = None  # the target's messages not (yet) seen in the source, in order
    for event in _events_through_outages(source, space, 0, outage_wait, 1.0):
        if unmatched is None:
            if event.message_id == expected:
                messages, after = messages + 1, event.sequence
                expected = next(held, None)
                if expected is None:
                    return CopiedBefore(messages, after, 0)
                continue
            unmatched = dict.fromkeys([expected, *held])
        unmatched.pop(event.message_id, None)
        if not unmatched:
            return CopiedBefore(messages, after, 0)
    if unmatched is None:  # the source ended before what the target holds did
        unmatched = dict.fromkeys([expected, *held]) if expected is not None else {}
    return CopiedBefore(messages, after, len(unmatched), next(iter(unmatched), None))


@dataclass(slots=True)
class StoredGroup:
    """Consecutive stored messages of one space, for one transaction: a batch per run of one source."""

    batches: list[IngestBatch] = field(default_factory=list)
    # Per batch, each message as the source stored it: its id, sequence, and the profile and account it
    # resolved to there.
    placed: list[list[tuple[str, int, str | None, str | None]]] = field(default_factory=list)
    messages: int = 0


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
            group.placed.append([])
        last.items.append(item)
        group.placed[-1].append((event.message_id, event.sequence, event.profile_id, event.account_id))
        group.messages += 1
        if group.messages >= group_size:
            yield group
            group = StoredGroup()
    if group.messages:
        yield group


def drops_differing(
    source: StoredMessages,
    target: StoredMessages,
    space: str,
    message_ids: Sequence[str],
    *,
    outage_wait: float = 0.0,
) -> int:
    """How many of these messages the two stores dropped other identifiers from, or by other rules.

    A rules change can leave every count as it was (a window widened drops the same identifiers, by a rule
    `explain` names otherwise): the drops of the messages a copy resolved are compared, one read a group.
    """

    def drops(store: StoredMessages) -> dict[str, set[tuple[str, str, str | None]]]:
        found: dict[str, set[tuple[str, str, str | None]]] = {}
        for record in _through_outages(lambda: store.dropped_in(space, message_ids), outage_wait, 1.0):
            found.setdefault(record.message_id, set()).add(
                (record.identifier, record.rule, record.profile_id)
            )
        return found

    there, here = drops(source), drops(target)
    return sum(1 for message_id in message_ids if there.get(message_id) != here.get(message_id))


def _through_outages(
    read: Callable[[], list[DroppedRecord]], wait: float, pause: float
) -> list[DroppedRecord]:
    """One read, tried again while the store cannot be reached (or lost its connection), for up to `wait`."""
    started = time.monotonic()
    while True:
        try:
            return read()
        except StoreConflict:
            if time.monotonic() - started >= wait:
                raise
            time.sleep(pause)


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
