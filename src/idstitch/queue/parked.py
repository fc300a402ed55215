"""Parked requests: what workers could not resolve, kept in the dead-letter stream until an operator acts.

A worker parks a request whose failure every delivery would repeat (its space is unknown to the
worker's config, say) or that failed on `max_deliveries` deliveries: it copies the JetStream message,
bytes unchanged, to the stream `<stream>_DEAD` (subject `<subject>_dead.<space>`), with headers saying
why (`Idstitch-Parked-Reason`), where it came from (`Idstitch-Original-Stream`, `-Subject`,
`-Sequence`) and how often it was delivered (`Idstitch-Deliveries`), and only then terminates it.

`parked_requests` lists them and `parked_request` reads one, creating nothing; `replay_parked`
publishes them again to the subjects they came from, once the cause is fixed, and deletes them from the
dead-letter stream; `delete_parked` discards those that can never succeed. A replayed request that had
partly landed changes nothing twice: its messages keep their `messageId`s, which the store de-duplicates.
`idstitch parked list|show|replay|delete` runs these from the command line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import TypeVar

import nats.errors
import nats.js.errors
from nats.js.api import RawStreamMsg

from idstitch.queue.jetstream import (
    PARKED_DELIVERIES,
    PARKED_REASON,
    PARKED_SEQUENCE,
    PARKED_SUBJECT,
    JetStream,
    QueueConfig,
    jetstream_unanswered,
    parse_queue_url,
)

__all__ = ["ParkedRequest", "delete_parked", "parked_request", "parked_requests", "replay_parked"]

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class ParkedRequest:
    """A request in the dead-letter stream: where it is, why it is there, where it came from, its bytes."""

    sequence: int  # in the dead-letter stream
    parked_at: datetime | None
    reason: str
    subject: str  # the one it was published to, and is replayed to
    original_sequence: int | None
    deliveries: int | None
    data: bytes


def parked_requests(queue: str | QueueConfig, *, limit: int | None = None) -> list[ParkedRequest]:
    """The parked requests of a queue, oldest first (at most `limit`); creates no stream."""

    async def read(jetstream: JetStream) -> list[ParkedRequest]:
        return [parked async for parked in _parked(jetstream, limit)]

    return _run(queue, "idstitch parked", read, ensure_stream=False)


def parked_request(queue: str | QueueConfig, sequence: int) -> ParkedRequest | None:
    """The parked request at `sequence` of the dead-letter stream, or None; creates no stream."""

    async def read(jetstream: JetStream) -> ParkedRequest | None:
        try:
            raw = await jetstream.js.get_msg(jetstream.queue.dead_stream, sequence)
        except nats.js.errors.NotFoundError:
            return None  # never parked, deleted or replayed since, or no dead-letter stream at all
        return _request(jetstream.queue, raw)

    return _run(queue, "idstitch parked", read, ensure_stream=False)


def replay_parked(
    queue: str | QueueConfig, sequences: Iterable[int] | None = None, *, timeout: float = 10.0
) -> list[int]:
    """Publish parked requests (all, or those `sequences`) again, then delete them; the sequences replayed.

    Each is published to the subject it came from, bytes unchanged, and deleted from the dead-letter
    stream only once JetStream has acknowledged it. Its `Nats-Msg-Id` names the parked copy, so running
    this again after an interruption publishes it once.
    """
    wanted = None if sequences is None else set(sequences)

    async def replay(jetstream: JetStream) -> list[int]:
        dead_stream = jetstream.queue.dead_stream
        replayed: list[int] = []
        async for parked in _parked(jetstream, None):
            if wanted is not None and parked.sequence not in wanted:
                continue
            stamp = "" if parked.parked_at is None else parked.parked_at.isoformat()
            await jetstream.publish(
                parked.subject,
                parked.data,
                message_id=f"replay:{dead_stream}:{parked.sequence}:{stamp}",
                timeout=timeout,
            )
            await jetstream.js.delete_msg(dead_stream, parked.sequence)
            replayed.append(parked.sequence)
        return replayed

    # The stream is made when missing: the requests go back to it.
    return _run(queue, "idstitch replay", replay, ensure_stream=True)


def delete_parked(queue: str | QueueConfig, sequences: Iterable[int]) -> list[int]:
    """Delete these parked requests for good (requests that can never succeed); the sequences deleted."""

    async def delete(jetstream: JetStream) -> list[int]:
        deleted: list[int] = []
        for sequence in sequences:
            try:
                await jetstream.js.delete_msg(jetstream.queue.dead_stream, sequence)
            except nats.js.errors.NotFoundError:
                continue  # not there (any more): nothing to delete
            deleted.append(sequence)
        return deleted

    return _run(queue, "idstitch parked", delete, ensure_stream=False)


def _run(
    queue: str | QueueConfig,
    name: str,
    work: Callable[[JetStream], Awaitable[_T]],
    *,
    ensure_stream: bool,
) -> _T:
    """Connect, do `work`, close; a NATS without JetStream is a QueueUnavailable, as for serve and workers."""
    config = parse_queue_url(queue) if isinstance(queue, str) else queue

    async def run() -> _T:
        jetstream = await JetStream.connect(config, name=name, ensure_stream=ensure_stream)
        try:
            return await work(jetstream)
        except (
            nats.errors.NoRespondersError,
            nats.errors.TimeoutError,
            nats.js.errors.ServiceUnavailableError,
        ) as error:
            raise jetstream_unanswered(config, error) from None
        finally:
            await jetstream.close()

    return asyncio.run(run())


async def _parked(jetstream: JetStream, limit: int | None) -> AsyncIterator[ParkedRequest]:
    """The dead-letter stream's messages, oldest first, read one at a time (never all at once)."""
    queue = jetstream.queue
    sequence = 1
    count = 0
    while limit is None or count < limit:
        try:
            raw = await jetstream.js.get_msg(
                queue.dead_stream, sequence, subject=queue.dead_filter_subject, next=True
            )
        except nats.js.errors.NotFoundError:
            return  # none left, or no dead-letter stream at all: nothing was ever parked
        yield _request(queue, raw)
        count += 1
        sequence = (raw.seq or sequence) + 1


def _request(queue: QueueConfig, raw: RawStreamMsg) -> ParkedRequest:
    """A dead-letter message as a ParkedRequest."""
    headers = raw.headers or {}
    subject = headers.get(PARKED_SUBJECT)
    if subject is None:  # parked by hand, say: its dead-letter subject names the space all the same
        subject = queue.subject + (raw.subject or "").removeprefix(f"{queue.subject}_dead")
    return ParkedRequest(
        sequence=raw.seq or 0,
        parked_at=raw.time,
        reason=str(headers.get(PARKED_REASON, "")),
        subject=str(subject),
        original_sequence=_number(headers.get(PARKED_SEQUENCE)),
        deliveries=_number(headers.get(PARKED_DELIVERIES)),
        data=raw.data or b"",
    )


def _number(value: object) -> int | None:
    """A header's whole number; None when it is missing or is not one."""
    try:
        return int(str(value))
    except ValueError:
        return None
