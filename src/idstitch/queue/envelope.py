"""The JetStream message of queue mode: one accepted request's valid messages, with space, source and time.

JSON, so that `nats stream view` shows what is waiting:

    {"v": 1, "space": "default", "source": "web", "received_at": "2026-03-02T09:00:00.123Z",
     "messages": [{...normalised payload, with messageId, timestamp and receivedAt...}, ...]}

Each message is the normalised payload the engine would have stored (`Message.payload`): it carries its
final `messageId`, `timestamp` and `receivedAt`, so parsing it again gives the very same `Message`. A
redelivered JetStream message therefore repeats the same `messageId`s, which the store de-duplicates,
even for messages whose id was generated from the time they were received.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

import msgspec

from idstitch.core.errors import IdstitchError, InvalidEvent
from idstitch.core.messages import Message, parse_message
from idstitch.engine import IngestBatch

__all__ = ["FORMAT_VERSION", "QueuedRequest", "RequestTooLarge", "UndecodableMessage", "decode", "encode"]

FORMAT_VERSION: Final = 1

_encoder = msgspec.json.Encoder()


class QueuedRequest(msgspec.Struct, frozen=True):
    """A JetStream message as decoded: the request's space, source, time and normalised payloads."""

    v: int
    space: str
    source: str | None
    received_at: datetime
    messages: list[dict[str, Any]]


_decoder = msgspec.json.Decoder(QueuedRequest)


class UndecodableMessage(IdstitchError):
    """A JetStream message that is not a queued request this version can read; retrying cannot help."""


class RequestTooLarge(IdstitchError):
    """One message is larger than a JetStream message may be (the server's `max_payload`, the stream's `max_msg_size`)."""


def encode(
    space: str,
    source: str | None,
    received_at: datetime,
    messages: Sequence[Message],
    *,
    max_bytes: int,
) -> list[bytes]:
    """The JetStream messages of one request: one, or several when one would exceed `max_bytes`.

    A request is at most 500 KB, but normalised payloads repeat the batch's shared context in every
    message, so a request with a large context may outgrow the server's limit (1 MB by default).
    """
    head = _encoder.encode(
        {"v": FORMAT_VERSION, "space": space, "source": source, "received_at": received_at}
    )
    head = head[:-1] + b',"messages":['  # the same object, still open for the list
    tail = b"]}"
    chunks: list[bytes] = []
    parts: list[bytes] = []
    size = len(head) + len(tail)
    for message in messages:
        part = _encoder.encode(message.payload)
        if len(head) + len(part) + len(tail) > max_bytes:
            raise RequestTooLarge(
                f"message {message.message_id} is {len(part)} bytes normalised, "
                f"over the {max_bytes} bytes a JetStream message may hold (NATS max_payload, stream max_msg_size)"
            )
        if parts and size + len(part) + 1 > max_bytes:
            chunks.append(head + b",".join(parts) + tail)
            parts, size = [], len(head) + len(tail)
        size += len(part) + (1 if parts else 0)
        parts.append(part)
    if parts:
        chunks.append(head + b",".join(parts) + tail)
    return chunks


def decode(data: bytes) -> IngestBatch:
    """A JetStream message back into the batch the engine resolves; UndecodableMessage when it is not one.

    A payload that no longer parses (it cannot happen to what `encode` wrote) becomes a rejected item, so
    that the engine reports it with its reason while the request's other messages land.
    """
    try:
        request = _decoder.decode(data)
    except msgspec.DecodeError as error:  # ValidationError is a DecodeError
        raise UndecodableMessage(f"not a queued request: {error}") from None
    if request.v != FORMAT_VERSION:
        raise UndecodableMessage(f"format version {request.v}; this worker reads version {FORMAT_VERSION}")
    items: list[Message | InvalidEvent] = []
    for payload in request.messages:
        try:
            items.append(parse_message(payload, received_at=request.received_at))
        except InvalidEvent as error:
            items.append(error)
    return IngestBatch(items, request.space, request.source)
