"""Segment-spec messages: decode, validate and normalise one message or a batch (SPEC §2, §6).

Pure: no I/O, no clock, no randomness. The caller passes `received_at`; a missing `messageId` is
derived from the message's content so that a retried message gets the same id.

Dicts in a `Message` (context, integrations, payload, ...) may be shared with the decoded input and
with the other messages of the same batch (the batch context is not copied per message): treat
them as read-only.
"""

import base64
import binascii
import contextlib
import json
import math
import re
import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from hashlib import blake2b
from typing import Any

import msgspec

from idstitch.core.errors import InvalidEvent

__all__ = [
    "MAX_BATCH_BYTES",
    "MAX_BATCH_MESSAGES",
    "MAX_MESSAGE_BYTES",
    "MAX_MESSAGE_ID_LENGTH",
    "MAX_TRAIT_KEY_BYTES",
    "MAX_TYPE_LENGTH",
    "MESSAGE_TYPES",
    "UTF8_BOM",
    "ExternalId",
    "Message",
    "SourceOccurrences",
    "decimal_string",
    "decode_document",
    "decode_json",
    "decode_message",
    "format_timestamp",
    "parse_batch",
    "parse_message",
    "parse_stored",
    "parse_timestamp",
    "repaired_text",
]

MESSAGE_TYPES: frozenset[str] = frozenset({"identify", "track", "page", "screen", "group", "alias"})
MAX_MESSAGE_BYTES = 32 * 1024
MAX_BATCH_BYTES = 500 * 1024
MAX_BATCH_MESSAGES = 2500
MAX_MESSAGE_ID_LENGTH = 100
# Types and trait keys are parts of index keys (a PostgreSQL index row must fit a third of a page).
MAX_TYPE_LENGTH = 64
MAX_TRAIT_KEY_BYTES = 1000

_TYPE_CHOICES = ", ".join(sorted(MESSAGE_TYPES))
_COLLECTIONS = frozenset({"users", "accounts"})
_ENCODINGS = frozenset({"none", "base64"})
_EXTERNAL_ID_KEYS = ("id", "type", "collection", "encoding")
_ABSENT = (None, "")  # null, missing and empty strings all mean "absent" (SPEC §2)
# Envelope keys that parse_batch applies to the elements itself; the rest go back to the caller.
_BATCH_KEYS = frozenset({"batch", "context", "integrations", "sentAt"})

_OUT_OF_RANGE = f"a number beyond {sys.float_info.max:.4g} is out of range"


class _OutOfRange(ValueError):
    """A float literal past a float's range, raised from inside msgspec's decoding."""


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _OutOfRange(_OUT_OF_RANGE)
    return value


# float_hook: msgspec reads a number past a float's range (1e400) as infinity, which JSON can only write
# back as null; the hook refuses it instead. It costs nothing measurable (floats are few in a message).
_decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(float_hook=_finite_float)
_encoder = msgspec.json.Encoder()
_canonical_encoder = msgspec.json.Encoder(order="sorted")


# gc=False: these structs never take part in reference cycles, and skipping GC tracking
# matters when tens of thousands are built per second.
class ExternalId(msgspec.Struct, frozen=True, gc=False):
    """One validated `context.externalIds` entry; `id` is already base64-decoded."""

    id: str
    type: str
    collection: str
    encoding: str


class Message(msgspec.Struct, frozen=True, gc=False):
    """A validated, normalised Segment message; `payload` is what gets stored."""

    type: str
    message_id: str
    timestamp: datetime
    received_at: datetime
    user_id: str | None
    anonymous_id: str | None
    previous_id: str | None
    group_id: str | None
    event: str | None
    name: str | None
    traits: dict[str, Any]
    properties: dict[str, Any]
    context: dict[str, Any]
    integrations: dict[str, Any]
    external_ids: tuple[ExternalId, ...]
    payload: dict[str, Any]


UTF8_BOM = b"\xef\xbb\xbf"  # an editor's byte order mark, skipped wherever JSON is read


def decode_json(data: bytes) -> object:
    """Decode JSON bytes (a UTF-8 BOM is skipped), raising InvalidEvent("", "invalid JSON: ...")."""
    try:
        return _decoder.decode(data.removeprefix(UTF8_BOM))
    except msgspec.DecodeError as exc:
        raise InvalidEvent("", f"invalid JSON: {exc}") from None
    except _OutOfRange as exc:
        raise InvalidEvent("", f"invalid JSON: {exc}") from None
    except RecursionError:
        raise InvalidEvent(
            "", "invalid JSON: nested deeper than the decoder goes (about 1,000 levels)"
        ) from None


class _Unrepresentable:
    """A JSON value no message can hold (a huge integer, NaN), kept to name it in the rejection."""

    __slots__ = ("reason",)

    def __init__(self, reason: str) -> None:
        self.reason = reason


def decode_document(data: bytes) -> object:
    """A message or a batch envelope, read as leniently as JavaScript clients need.

    msgspec refuses a whole document for one unpaired UTF-16 surrogate, which is what JSON.stringify
    writes for a string cut mid-emoji; the standard library reads it, and the half character becomes
    U+FFFD, as browsers do: the message keeps everything else. A NUL becomes U+FFFD as well. A value
    no message can hold (an integer past Python's digit limit, NaN, Infinity) rejects only its own
    message: in a batch envelope, that element becomes an InvalidEvent (carrying its messageId) while
    the others stay; anywhere else the whole document is refused with InvalidEvent("", "invalid JSON: ...").
    """
    try:
        document = decode_json(data)
        if b"\\u0000" in data:
            # NUL is valid JSON but no PostgreSQL text column can hold it: U+FFFD, as for a cut character.
            document = _repaired(document)
    except InvalidEvent as strict:
        # Bytes that are not UTF-8 (a Latin-1 name from a server library) become U+FFFD, as a browser
        # would show them; an identifier holding one is then never matched on.
        text = data.removeprefix(UTF8_BOM).decode("utf-8", "replace")
        try:
            document = _repaired(
                json.loads(
                    text,
                    parse_int=_lenient_int,
                    parse_float=_lenient_float,
                    parse_constant=lambda name: _Unrepresentable(f"{name} is not a JSON number"),
                )
            )
        except ValueError:  # JSONDecodeError is a ValueError
            raise strict from None
        except RecursionError:
            # Nested past the decoder's depth: in a batch, that element alone is refused.
            salvaged = _batch_without_deep_elements(text)
            if salvaged is None:
                raise strict from None
            return salvaged
    else:
        return document  # msgspec read it all: nothing in it is unrepresentable, no need to look
    batch = document.get("batch") if isinstance(document, dict) else None
    if not isinstance(document, dict) or not isinstance(batch, list):
        _refuse_unrepresentable(document)
        return document
    envelope = {key: value for key, value in document.items() if key != "batch"}
    _refuse_unrepresentable(envelope)  # the envelope applies to every element: nothing could land
    elements: list[object] = []
    for element in batch:
        reason = _unrepresentable(element)
        if reason is None:
            elements.append(element)
            continue
        message_id = element.get("messageId") if isinstance(element, dict) else None
        elements.append(
            InvalidEvent("", f"invalid JSON: {reason}", message_id if isinstance(message_id, str) else None)
        )
    envelope["batch"] = elements
    return envelope


def _batch_without_deep_elements(text: str) -> dict[str, object] | None:
    """A batch envelope whose elements are decoded one by one (one nested too deep becomes an
    InvalidEvent); None when `text` is no batch envelope, or its envelope itself cannot be read."""
    split = _split_batch(text)
    if split is None or not split[1]:
        return None  # no batch, or an empty one: the depth is the envelope's own
    envelope_text, pieces = split
    try:
        envelope = decode_document(envelope_text.encode())
    except InvalidEvent:
        return None
    if not isinstance(envelope, dict):
        return None
    elements: list[object] = []
    for piece in pieces:
        try:
            elements.append(decode_document(piece.encode()))
        except InvalidEvent as error:
            elements.append(InvalidEvent("", str(error)))
    envelope["batch"] = elements
    return envelope


def _split_batch(text: str) -> tuple[str, list[str]] | None:
    """The envelope's text with an empty `batch`, and each element's text; None without a top-level batch.

    A scan for brackets outside strings, not a parse: each piece is decoded on its own afterwards.
    """
    depth = 0
    index = 0
    length = len(text)
    last_string = ""  # at depth 1, the key a value follows
    opened = closed = -1
    start = -1
    pieces: list[str] = []
    while index < length:
        char = text[index]
        if char == '"':
            end = index + 1
            while end < length and text[end] != '"':
                end += 2 if text[end] == "\\" else 1
            if end >= length:
                return None
            if depth == 1:
                last_string = text[index + 1 : end]
            index = end + 1
            continue
        if char in "[{":
            depth += 1
            if char == "[" and depth == 2 and opened < 0 and last_string == "batch":
                opened, start = index, index + 1
        elif char in "]}":
            if char == "]" and depth == 2 and opened >= 0 and closed < 0:
                if text[start:index].strip():
                    pieces.append(text[start:index])
                closed = index
            depth -= 1
        elif char == "," and depth == 2 and opened >= 0 and closed < 0:
            pieces.append(text[start:index])
            start = index + 1
        index += 1
    if closed < 0:
        return None
    return text[:opened] + "[]" + text[closed + 1 :], pieces


def _refuse_unrepresentable(value: object) -> None:
    reason = _unrepresentable(value)
    if reason is not None:
        raise InvalidEvent("", f"invalid JSON: {reason}")


def repaired_text(text: str) -> str:
    """`text` as a decoded document holds it: every unpaired surrogate and NUL replaced by U+FFFD."""
    try:
        text.encode()
    except UnicodeEncodeError:
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    return text.replace("\x00", "\ufffd")


def _repaired(value: object) -> object:
    """The decoded document with every unpaired surrogate and NUL replaced by U+FFFD (keys included)."""
    if isinstance(value, str):
        return repaired_text(value)
    if isinstance(value, dict):
        return {_repaired(key): _repaired(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_repaired(item) for item in value]
    return value


def _lenient_float(text: str) -> object:
    try:
        return _finite_float(text)
    except _OutOfRange as error:
        return _Unrepresentable(str(error))


def _lenient_int(text: str) -> object:
    try:
        return int(text)
    except ValueError:  # past the interpreter's int-to-str digit limit
        return _Unrepresentable(f"an integer of {len(text.lstrip('-'))} digits is out of range")


def _unrepresentable(value: object) -> str | None:
    """Why a leniently decoded value cannot be (part of) a message; None when it can."""
    if isinstance(value, _Unrepresentable):
        return value.reason
    if isinstance(value, dict):
        items: Iterable[object] = value.values()
    elif isinstance(value, list):
        items = value
    else:
        return None
    for item in items:
        reason = _unrepresentable(item)
        if reason is not None:
            return reason
    return None


@dataclass(slots=True)
class SourceOccurrences:
    """How often each timeless message without a messageId has been seen so far in one named source."""

    source: str
    counts: dict[str, int] = field(default_factory=dict)


def decode_message(data: bytes, *, received_at: datetime, default_type: str | None = None) -> Message:
    """Decode and parse one message body, enforcing the 32 KB limit before decoding."""
    size = len(data)
    if size > MAX_MESSAGE_BYTES:
        raise InvalidEvent("", _size_reason(size))
    return parse_message(decode_json(data), received_at=received_at, default_type=default_type)


def parse_message(
    raw: object,
    *,
    received_at: datetime,
    batch_context: dict[str, Any] | None = None,
    batch_integrations: dict[str, Any] | None = None,
    default_type: str | None = None,
    occurrences: SourceOccurrences | None = None,
    delivery: str | None = None,
    estimated_receipt: bool = False,
) -> Message:
    """Validate one decoded message and normalise it into a Message.

    `occurrences` is for replayable sources (files): a message with neither messageId nor any timestamp
    then gets an id from its content, the source's name and how many identical ones came before it
    there, so a re-run gives the same ids; without it, the id also depends on `received_at`.

    `delivery` is for a live endpoint: a token unique to the request. There a message's own
    `receivedAt` is replaced by the server's, and a message without messageId is a send of its own,
    never a copy of another with the same content: its id comes from the token and its position.

    `estimated_receipt` is for files: `received_at` then only stands in for the unknown time the
    messages reached a server (the file's modification time), so `sentAt` corrects `originalTimestamp`
    only against a message's own `receivedAt`; a message without one keeps its client's time
    (`originalTimestamp`, else `sentAt`). A message's own `receivedAt` (an archive's) also bounds its time,
    as the server's clock does live.
    """
    received = _utc_ms(received_at)
    return _parse(
        raw,
        received,
        format_timestamp(received),
        batch_context,
        batch_integrations,
        default_type,
        None,
        occurrences,
        None if delivery is None else f"{delivery}#0",
        estimated_receipt,
    )


def parse_stored(payload: bytes, *, received_at: datetime) -> Message:
    """A stored message read back as the Message it was when it arrived (a copy or replay resolves it again).

    The stored payload already holds its messageId, its final timestamp (clock skew corrected, a live
    client's time moved to originalTimestamp) and its receivedAt, and the batch's context merged in, so
    parsing it as an archived message gives the same Message, once its time is taken as final (it is not
    capped at its receivedAt again); `received_at` is the stored receipt.
    """
    received = _utc_ms(received_at)
    return _parse(
        decode_json(payload), received, format_timestamp(received), None, None, None, None, stored=True
    )


def parse_batch(
    raw: object,
    *,
    received_at: datetime,
    occurrences: SourceOccurrences | None = None,
    delivery: str | None = None,
    estimated_receipt: bool = False,
) -> tuple[list[Message | InvalidEvent], dict[str, Any]]:
    """Parse a batch envelope into per-element results (Message or its error) and the other envelope keys.

    An element may already be an InvalidEvent (see decode_batch_json). `occurrences`, `delivery` and
    `estimated_receipt` are as for parse_message.
    """
    if not isinstance(raw, dict):
        raise InvalidEvent("", "batch request must be a JSON object")
    batch = raw.get("batch")
    if batch is None:
        raise InvalidEvent("batch", "required")
    if not isinstance(batch, list):
        raise InvalidEvent("batch", f"must be a list, got {_kind(batch)}")
    if len(batch) > MAX_BATCH_MESSAGES:
        raise InvalidEvent("batch", f"{len(batch)} messages, over the {MAX_BATCH_MESSAGES:,} per-batch limit")
    context = _object(raw.get("context"), "context")
    integrations = _object(raw.get("integrations"), "integrations")
    sent_value = raw.get("sentAt")
    batch_sent: tuple[object, datetime | InvalidEvent] | None = None
    if sent_value is not None and sent_value != "":
        # A bad batch sentAt fails only the elements whose time it would correct.
        batch_sent = (sent_value, _timestamp_or_error(sent_value, "sentAt"))
    received = _utc_ms(received_at)
    received_text = format_timestamp(received)  # the same for every element: format it once

    results: list[Message | InvalidEvent] = []
    append = results.append
    for index, item in enumerate(batch):
        if isinstance(item, InvalidEvent):
            append(item)
            continue
        try:
            size = _encoded_size(item)
            if size > MAX_MESSAGE_BYTES:
                raise InvalidEvent("", _size_reason(size))
            append(
                _parse(
                    item,
                    received,
                    received_text,
                    context,
                    integrations,
                    None,
                    batch_sent,
                    occurrences,
                    None if delivery is None else f"{delivery}#{index}",
                    estimated_receipt,
                )
            )
        except InvalidEvent as exc:
            # One bad element must not sink the rest of the batch.
            append(exc)
    rest = {key: value for key, value in raw.items() if key not in _BATCH_KEYS}
    return results, rest


def format_timestamp(value: datetime) -> str:
    """Format a datetime as ISO-8601 UTC with milliseconds and a "Z" suffix (naive means UTC)."""
    tz = value.tzinfo
    if tz is not None:
        if tz is not UTC:
            value = value.astimezone(UTC)
        value = value.replace(tzinfo=None)
    return value.isoformat(timespec="milliseconds") + "Z"


def parse_timestamp(value: object, field: str) -> datetime:
    """Parse an ISO-8601 timestamp (offset, "Z", naive or date-only) into an aware UTC datetime."""
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            parsed = _parse_timestamp_lenient(value, field)
    elif isinstance(value, datetime):
        parsed = value
    else:
        raise InvalidEvent(field, f"must be an ISO-8601 timestamp string, got {_kind(value)}")
    tz = parsed.tzinfo
    if tz is None:
        return parsed.replace(tzinfo=UTC)
    if tz is UTC:
        return parsed
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidEvent(field, "out of range") from None


# A leap second (RFC 3339 allows second 60, NTP-synced servers log 23:59:60), which fromisoformat refuses.
_LEAP_SECOND = re.compile(r"(\d{4}-\d{2}-\d{2}[T ](?:[01]\d|2[0-3]):[0-5]\d):60(?:[.,]\d+)?", re.ASCII)


def _parse_timestamp_lenient(value: str, field: str) -> datetime:
    # fromisoformat rejects surrounding blanks and lower-case "t"/"z", which some clients send.
    cleaned = value.strip().upper()
    leap = _LEAP_SECOND.match(cleaned)
    if leap is not None:
        # The last millisecond of its minute: it stays after the second before it and before the next.
        cleaned = f"{leap.group(1)}:59.999{cleaned[leap.end() :]}"
    if cleaned != value:
        try:
            return datetime.fromisoformat(cleaned)
        except ValueError:
            pass
    raise InvalidEvent(field, "not an ISO-8601 timestamp")


def _timestamp_or_error(value: object, field: str) -> datetime | InvalidEvent:
    try:
        return parse_timestamp(value, field)
    except InvalidEvent as error:
        return error


def _parse(
    raw: object,
    received_at: datetime,
    received_text: str,
    batch_context: dict[str, Any] | None,
    batch_integrations: dict[str, Any] | None,
    default_type: str | None,
    batch_sent: tuple[object, datetime | InvalidEvent] | None,
    occurrences: SourceOccurrences | None = None,
    delivery: str | None = None,
    estimated_receipt: bool = False,
    stored: bool = False,
) -> Message:
    if not isinstance(raw, dict):
        raise InvalidEvent("", "message must be a JSON object")
    get = raw.get
    mtype = _message_type(get("type"), default_type)

    user_id = _identifier(raw, "userId", "user_id")
    anonymous_id = _identifier(raw, "anonymousId", "anonymous_id")
    previous_id: str | None = None
    group_id: str | None = None
    event: str | None = None
    name: str | None = None
    if mtype == "track":
        event_value = get("event")
        if event_value is None or event_value == "":
            raise InvalidEvent("event", "required for track")
        if not isinstance(event_value, str):
            raise InvalidEvent("event", f"must be a string, got {_kind(event_value)}")
        event = event_value
    elif mtype in ("page", "screen"):
        name_value = get("name")
        if name_value is not None and not isinstance(name_value, str):
            raise InvalidEvent("name", f"must be a string, got {_kind(name_value)}")
        name = name_value or None
        category = get("category")
        if mtype == "page" and category is not None and not isinstance(category, str):
            raise InvalidEvent("category", f"must be a string, got {_kind(category)}")
    elif mtype == "alias":
        previous_id = _identifier(raw, "previousId", "previous_id")
        if previous_id is None:
            raise InvalidEvent("previousId", "required for alias")
        if user_id is None:
            raise InvalidEvent("userId", "required for alias")
    elif mtype == "group":
        group_id = _identifier(raw, "groupId", "group_id")
        if group_id is None:
            raise InvalidEvent("groupId", "required for group")

    traits = _object(get("traits"), "traits")
    if traits:
        _check_trait_keys(traits, "traits")
    properties = _object(get("properties"), "properties")
    own_context = _object(get("context"), "context")
    own_integrations = _object(get("integrations"), "integrations")
    context = _merge(batch_context, own_context)
    integrations = _merge(batch_integrations, own_integrations)

    external_ids: tuple[ExternalId, ...] = ()
    if context:
        context_traits = context.get("traits")
        if context_traits is None:
            if "traits" in context:
                # Downstream reads context.traits as a dict; a null one is simply absent.
                context = {key: value for key, value in context.items() if key != "traits"}
        elif not isinstance(context_traits, dict):
            raise InvalidEvent("context.traits", f"must be an object, got {_kind(context_traits)}")
        else:
            _check_trait_keys(context_traits, "context.traits")
        raw_external_ids = context.get("externalIds")
        if raw_external_ids is not None:
            external_ids = _external_ids(raw_external_ids)

    # Timestamps (SPEC §6). An archived message's own receivedAt is kept (a live endpoint passes
    # `delivery` and keeps its own clock); a bad one cannot break ingestion, the server's is used.
    received = received_at
    # Whether `received` is when the message reached a server: only then can sentAt correct its time.
    receipt_known = not estimated_receipt
    # Whether the message carries the time a server received it (an archive of Segment or RudderStack).
    own_receipt = False
    own_received = get("receivedAt")
    if delivery is None and own_received is not None and own_received != "":
        with contextlib.suppress(InvalidEvent):
            received = _utc_ms(parse_timestamp(own_received, "receivedAt"))
            received_text = own_received if _is_canonical(own_received) else format_timestamp(received)
            receipt_known = own_receipt = True
    sent_value = get("sentAt")
    sent_or_error: datetime | InvalidEvent | None = None
    batch_sent_applied = False
    if sent_value is not None and sent_value != "":
        sent_or_error = _timestamp_or_error(sent_value, "sentAt")
    elif batch_sent is not None:
        sent_value, sent_or_error = batch_sent
        batch_sent_applied = True
    original_value = get("originalTimestamp")
    original = None
    if original_value is not None and original_value != "":
        original = parse_timestamp(original_value, "originalTimestamp")
    timestamp_value = get("timestamp")
    timestamp_text = None
    sent = None
    if isinstance(sent_or_error, InvalidEvent):
        # sentAt only corrects originalTimestamp: a bad one matters only where it would do that.
        if original is not None and timestamp_value in _ABSENT and receipt_known:
            raise sent_or_error
    else:
        sent = sent_or_error
    explicit = None
    if timestamp_value is not None and timestamp_value != "":
        explicit = parse_timestamp(timestamp_value, "timestamp")
    live = delivery is not None
    if live and explicit is not None and original is None:
        # Segment's pipeline (SEGMENT_API B.6): a live client's `timestamp` is its own clock, so it
        # becomes originalTimestamp and is corrected by sentAt. Segment's libraries never send
        # originalTimestamp themselves: without this a browser a day ahead would date its calls
        # tomorrow, and their traits would outrank every later one. Files keep explicit times (replays).
        original, original_value, explicit = explicit, timestamp_value, None
        live_original = True
    else:
        live_original = False
    if explicit is not None:
        timestamp = explicit
        if _is_canonical(timestamp_value):
            timestamp_text = timestamp_value
    elif sent is not None and original is not None and receipt_known:
        try:
            timestamp = received - (sent - original)
        except OverflowError:
            # Past the calendar (Go's zero time from a clock a little ahead): its nearest end, never a
            # rejection, which would hang on which of two clocks ran ahead. Later than receipt is capped below.
            timestamp = _EARLIEST if sent > original else received
        # A sentAt before the call it sends cannot be: the correction would date the call after it
        # reached us (a sentAt in year 1 put it in year 4051), and a time in the future would skew every
        # window it falls in. Such a message is dated when it arrived; both client times stay in the payload.
        timestamp = min(timestamp, received)
    elif original is not None:
        timestamp = original
    elif sent is not None and not receipt_known:
        # A file's time may be months after the send: the client's clock is the better guess.
        timestamp = sent
    else:
        timestamp = received
    # A stored message's time is final: a file's message without a receivedAt of its own kept its time
    # past the file's, which stands in as its receipt, and a replay must date it as it was dated.
    if (live or (own_receipt and not stored)) and timestamp > received:
        # A call cannot happen after it reached us; a future time would outrank every later trait. The same
        # for an archived message after the receipt it carries: replayed, it is dated as it was live.
        timestamp, timestamp_text = received, None
    timestamp = _truncate_ms(timestamp)

    message_id = _message_id(get("messageId"))

    payload: dict[str, Any] = dict(raw)
    payload.pop("writeKey", None)  # a secret: never stored
    payload["type"] = mtype
    if batch_context or "context" in raw:
        payload["context"] = context
    if batch_integrations or "integrations" in raw:
        payload["integrations"] = integrations
    if batch_sent_applied:
        payload["sentAt"] = sent_value
    if live_original:
        payload["originalTimestamp"] = original_value
    if message_id is None:
        # Without any client-side time, content alone would merge two genuinely separate sends.
        timeless = sent is None and original is None and timestamp_value in _ABSENT
        canonical = _canonical(payload)
        if delivery is not None:
            message_id = _id_from(canonical, delivery)
        elif timeless and occurrences is not None:
            content = _id_from(canonical, None)
            seen = occurrences.counts.get(content, 0)
            occurrences.counts[content] = seen + 1
            message_id = _id_from(canonical, f"{occurrences.source}#{seen}")
        else:
            message_id = _id_from(canonical, f"receivedAt={received_text}" if timeless else None)
    payload["messageId"] = message_id
    payload["timestamp"] = timestamp_text or format_timestamp(timestamp)
    payload["receivedAt"] = received_text

    return Message(
        type=mtype,
        message_id=message_id,
        timestamp=timestamp,
        received_at=received,
        user_id=user_id,
        anonymous_id=anonymous_id,
        previous_id=previous_id,
        group_id=group_id,
        event=event,
        name=name,
        traits=traits if traits is not None else {},
        properties=properties if properties is not None else {},
        context=context,
        integrations=integrations,
        external_ids=external_ids,
        payload=payload,
    )


def _message_type(value: object, default_type: str | None) -> str:
    if value is None or value == "":
        value = default_type
        if value is None:
            raise InvalidEvent("type", "required")
    if not isinstance(value, str):
        raise InvalidEvent("type", f"must be a string, got {_kind(value)}")
    if value in MESSAGE_TYPES:
        return value
    lowered = value.lower()
    if lowered in MESSAGE_TYPES:
        return lowered
    raise InvalidEvent("type", f"must be one of {_TYPE_CHOICES}")


def _identifier(raw: dict[Any, Any], camel: str, snake: str) -> str | None:
    value = raw.get(camel)
    field = camel
    if value is None or value == "":
        alternative = raw.get(snake)
        if alternative is not None:
            value, field = alternative, snake
    return _id_string(value, field)


def _id_string(value: object, field: str) -> str | None:
    """Identifier value as a string; None when absent (null or empty)."""
    if isinstance(value, str):
        return value or None
    if value is None:
        return None
    if isinstance(value, bool):
        raise InvalidEvent(field, "must be a string or number, got boolean")
    if isinstance(value, int | float):
        try:
            return decimal_string(value)
        except ValueError as error:
            raise InvalidEvent(field, str(error)) from None
    raise InvalidEvent(field, f"must be a string or number, got {_kind(value)}")


def decimal_string(number: int | float) -> str:
    """A number as an identifier: its decimal string, never an exponent (1e-07 is "0.0000001").

    Raises ValueError for a number no identifier can be (infinite, NaN, past the int digit limit).
    """
    if isinstance(number, int):
        try:
            return str(number)
        except ValueError:  # beyond Python's int-to-str digit limit
            raise ValueError("number too large") from None
    if not math.isfinite(number):
        raise ValueError("must be a finite number")
    return str(int(number)) if number.is_integer() else format(Decimal(repr(number)), "f")


def _message_id(value: object) -> str | None:
    if value is None or value == "":
        return None
    if isinstance(value, str):
        message_id = value
    else:
        converted = _id_string(value, "messageId")
        if converted is None:
            return None
        message_id = converted
    if len(message_id) > MAX_MESSAGE_ID_LENGTH:
        raise InvalidEvent("messageId", f"longer than {MAX_MESSAGE_ID_LENGTH} characters")
    return message_id


def _canonical(payload: dict[str, Any]) -> bytes:
    try:
        return _canonical_encoder.encode(payload)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent("", f"message is not JSON-encodable: {exc}") from None


def _id_from(canonical: bytes, salt: str | None) -> str:
    """A generated messageId: the hash of the message's canonical JSON, and of the salt when given."""
    digest = blake2b(canonical, digest_size=16)
    if salt is not None:
        digest.update(b"\x00" + salt.encode())
    return "gen-" + digest.hexdigest()


def _object(value: object, field: str) -> dict[str, Any] | None:
    if value is None or isinstance(value, dict):
        return value
    raise InvalidEvent(field, f"must be an object, got {_kind(value)}")


def _merge(base: dict[str, Any] | None, over: dict[str, Any] | None) -> dict[str, Any]:
    """Deep-merge `over` onto `base` (over wins), copying only the dicts that really merge."""
    if not base:
        return over if over is not None else {}
    if not over:
        return base
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict):
            under = merged.get(key)
            if isinstance(under, dict):
                merged[key] = _merge(under, value)
                continue
        merged[key] = value
    return merged


def _external_ids(value: object) -> tuple[ExternalId, ...]:
    if not isinstance(value, list):
        raise InvalidEvent("context.externalIds", f"must be a list, got {_kind(value)}")
    result: list[ExternalId] = []
    for index, item in enumerate(value):
        if not isinstance(item, dict):
            raise InvalidEvent(_external_id_path(index), f"must be an object, got {_kind(item)}")
        id_value = item.get("id")
        id_type = item.get("type")
        collection = item.get("collection")
        encoding = item.get("encoding")
        if id_value in _ABSENT or id_type in _ABSENT or collection in _ABSENT or encoding in _ABSENT:
            for key in _EXTERNAL_ID_KEYS:
                if item.get(key) in _ABSENT:
                    raise InvalidEvent(_external_id_path(index, key), "required")
        id_text = (
            _id_string(id_value, _external_id_path(index, "id"))
            if not isinstance(id_value, str)
            else id_value
        )
        assert id_text is not None  # empty values were rejected above
        if not isinstance(id_type, str):
            raise InvalidEvent(_external_id_path(index, "type"), f"must be a string, got {_kind(id_type)}")
        if ":" in id_type:
            # Identifiers are looked up as `type:value`: this type could never be found again.
            raise InvalidEvent(_external_id_path(index, "type"), "must not contain ':'")
        if len(id_type) > MAX_TYPE_LENGTH:
            raise InvalidEvent(_external_id_path(index, "type"), f"longer than {MAX_TYPE_LENGTH} characters")
        collection = collection.lower() if isinstance(collection, str) else None
        if collection not in _COLLECTIONS:
            raise InvalidEvent(_external_id_path(index, "collection"), "must be one of users, accounts")
        encoding = encoding.lower() if isinstance(encoding, str) else None
        if encoding not in _ENCODINGS:
            raise InvalidEvent(_external_id_path(index, "encoding"), "must be one of none, base64")
        if encoding == "base64":
            id_text = _decode_base64(id_text, _external_id_path(index, "id"))
        result.append(ExternalId(id=id_text, type=id_type.lower(), collection=collection, encoding=encoding))
    return tuple(result)


def _check_trait_keys(traits: dict[str, Any], field: str) -> None:
    for key in traits:
        # Four bytes per character at most: only a key past a quarter of the limit needs encoding.
        if len(key) * 4 > MAX_TRAIT_KEY_BYTES:
            size = len(key.encode("utf-8", "surrogatepass"))
            if size > MAX_TRAIT_KEY_BYTES:
                raise InvalidEvent(
                    field, f"a key of {size:,} bytes is over the {MAX_TRAIT_KEY_BYTES:,}-byte limit"
                )


def _external_id_path(index: int, key: str | None = None) -> str:
    # Built only when an error is raised: formatting it for every entry costs on the hot path.
    path = f"context.externalIds[{index}]"
    return f"{path}.{key}" if key else path


def _decode_base64(value: str, field: str) -> str:
    # Accept the url-safe alphabet and missing padding as well: clients differ.
    text = value.strip().replace("-", "+").replace("_", "/").rstrip("=")
    if len(text) % 4 == 1:
        raise InvalidEvent(field, "not valid base64")
    text += "=" * (-len(text) % 4)
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error:
        raise InvalidEvent(field, "not valid base64") from None
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidEvent(field, "base64 of bytes that are not UTF-8 text") from None
    if not decoded:
        raise InvalidEvent(field, "required")
    # A NUL is valid UTF-8 but no PostgreSQL text column can hold it: U+FFFD, as decode_document does
    # for a \u0000 in the JSON (the identifier is then dropped as damaged, in every store alike).
    return decoded.replace("\x00", "\ufffd")


def _encoded_size(item: object) -> int:
    try:
        return len(_encoder.encode(item))
    except (TypeError, ValueError) as exc:
        raise InvalidEvent("", f"message is not JSON-encodable: {exc}") from None


def _size_reason(size: int) -> str:
    return f"message is {size} bytes, over the {MAX_MESSAGE_BYTES // 1024} KB per-message limit"


def _is_canonical(text: object) -> bool:
    """Whether a successfully parsed timestamp string is already exactly what format_timestamp gives."""
    # Reusing the string skips a costly isoformat() per message; the separators pin the layout
    # (fromisoformat already vouched for the digits), which rules out week dates and the like.
    return (
        isinstance(text, str)
        and len(text) == 24
        and text[23] == "Z"
        and text[19] == "."
        and text[16] == ":"
        and text[17] < "6"  # a leap second (:60) is read as :59.999
        and text[13] == ":"
        and text[10] == "T"
        and text[7] == "-"
        and text[4] == "-"
    )


_EARLIEST = datetime.min.replace(tzinfo=UTC)


def _utc_ms(value: datetime) -> datetime:
    tz = value.tzinfo
    if tz is None:
        value = value.replace(tzinfo=UTC)
    elif tz is not UTC:
        value = value.astimezone(UTC)
    return _truncate_ms(value)


def _truncate_ms(value: datetime) -> datetime:
    # Stored payloads carry milliseconds; truncating here keeps a Message equal to the one
    # re-parsed from its own stored payload (replays are then exact).
    extra = value.microsecond % 1000
    return value.replace(microsecond=value.microsecond - extra) if extra else value


def _kind(value: object) -> str:
    """JSON name of a value's type, for error reasons."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    if isinstance(value, dict):
        return "object"
    return type(value).__name__
