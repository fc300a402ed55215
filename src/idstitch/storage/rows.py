"""What the SQL adapters share: the columns they read and how a row becomes a record.

SQLite and PostgreSQL keep the same tables with the same columns (times as integer microseconds,
JSON as text), so a row of either reads the same way. Each adapter keeps its own SQL where the
dialects differ (placeholders, `IN` lists against arrays, index hints).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec

from idstitch.storage.base import (
    DroppedRecord,
    EventRecord,
    EventResolution,
    IdentifierRecord,
    MergeRecord,
    SuspectRecord,
    TraitRecord,
)
from idstitch.storage.times import from_micros, to_micros

__all__ = [
    "BLOCKED_VALUES_SQL",
    "DUMP_QUERIES",
    "EVENTS_PAGE",
    "EVENT_COLUMNS",
    "EVENT_INSERT_COLUMNS",
    "EVENT_RESOLUTIONS_PAGE",
    "EVENT_RESOLUTIONS_SQL",
    "INSERT_TOKEN_SQL",
    "TOKEN_OF_KIND_SQL",
    "dropped_record",
    "event_record",
    "event_resolution",
    "event_row",
    "identifier_record",
    "merge_record",
    "suspect_record",
    "trait_record",
]

_json_decode = msgspec.json.decode
_json_encode = msgspec.json.encode

EVENT_COLUMNS = (
    "message_id, type, name, timestamp, received_at, source, profile_id, account_id, identifiers, payload, "
    "sequence"
)


def event_record(row: Sequence[Any]) -> EventRecord:
    """A row of EVENT_COLUMNS."""
    return EventRecord(
        message_id=row[0],
        type=row[1],
        name=row[2],
        timestamp=from_micros(row[3]),
        received_at=from_micros(row[4]),
        source=row[5],
        profile_id=row[6],
        account_id=row[7],
        identifiers=tuple(_json_decode(row[8])),
        payload=bytes(row[9]),
        sequence=row[10],
    )


def event_row(space: str, event: EventRecord) -> tuple[Any, ...]:
    """The values of an events row, in the order of EVENT_INSERT_COLUMNS."""
    return (
        space,
        event.message_id,
        event.type,
        event.name,
        to_micros(event.timestamp),
        to_micros(event.received_at),
        event.source,
        event.profile_id,
        event.account_id,
        _json_encode(list(event.identifiers)).decode(),
        event.payload,
    )


EVENT_INSERT_COLUMNS = "space, message_id, type, name, timestamp, received_at, source, profile_id, account_id, identifiers, payload"


def identifier_record(row: Sequence[Any]) -> IdentifierRecord:
    """type, value, collection, first_seen, last_seen, retired, suspect, source, first_message_id."""
    return IdentifierRecord(
        row[0],
        row[1],
        row[2],
        from_micros(row[3]),
        from_micros(row[4]),
        bool(row[5]),
        bool(row[6]),
        row[7],
        row[8],
    )


def trait_record(row: Sequence[Any]) -> TraitRecord:
    """key, value (JSON), source, set_at."""
    return TraitRecord(row[0], _json_decode(row[1]), row[2], from_micros(row[3]))


def merge_record(row: Sequence[Any]) -> MergeRecord:
    """parent_id, child_id, message_id, via, at."""
    return MergeRecord(row[0], row[1], row[2], row[3], from_micros(row[4]))


def dropped_record(row: Sequence[Any]) -> DroppedRecord:
    """message_id, identifier, rule, at, profile_id."""
    return DroppedRecord(row[0], row[1], row[2], from_micros(row[3]), row[4])


def suspect_record(row: Sequence[Any]) -> SuspectRecord:
    """type, value, collection, evidence_type, evidence_values (JSON), message_id, at."""
    return SuspectRecord(
        f"{row[0]}:{row[1]}", row[2], row[3], tuple(_json_decode(row[4])), row[5], from_micros(row[6])
    )


# Store.dump's sections: each query takes the space as its one parameter, written `{space}` here for
# the adapter's placeholder. `retired` comes back as 0/1 in SQLite and as a boolean in PostgreSQL;
# dump() makes it an int.
DUMP_QUERIES = {
    "profiles": "SELECT segment_id, collection, coalesce(parent_id, ''), created_at, merge_count "
    "FROM profiles WHERE space = {space} ORDER BY segment_id",
    "identifiers": "SELECT collection, type, value, profile_id, first_seen, last_seen, retired, "
    "coalesce(device_owner, '') FROM identifiers WHERE space = {space} ORDER BY collection, type, value",
    "traits": "SELECT profile_id, key, coalesce(value, 'null'), set_at FROM traits WHERE space = {space} "
    "ORDER BY profile_id, key",
    "links": "SELECT user_id, account_id FROM links WHERE space = {space} ORDER BY user_id, account_id",
    "merges": "SELECT parent_id, child_id, message_id, via, at FROM merges WHERE space = {space} "
    "ORDER BY at, child_id",
    "events": "SELECT message_id, coalesce(profile_id, ''), coalesce(account_id, ''), identifiers "
    "FROM events WHERE space = {space} ORDER BY message_id",
    "suspects": "SELECT collection, type, value, evidence_type, evidence_values FROM suspects "
    "WHERE space = {space} ORDER BY collection, type, value",
    "dropped": "SELECT message_id, identifier, rule, coalesce(profile_id, '') FROM dropped "
    "WHERE space = {space} ORDER BY message_id, identifier, rule, 4",
}


# One page of Store.iter_event_resolutions, after a sequence: `{p}` is the adapter's placeholder and
# `{events}` its events table (SQLite needs `events NOT INDEXED`: it would otherwise read the space
# through its (space, message_id) index and sort every page). A merge repoints every descendant to
# the new root, so one join reaches the root.
EVENT_RESOLUTIONS_PAGE = 10_000
EVENTS_PAGE = 1_000  # whole events, payloads included: a page of them stays a few MB
EVENT_RESOLUTIONS_SQL = (
    "SELECT e.sequence, e.message_id, coalesce(u.parent_id, e.profile_id), "
    "coalesce(a.parent_id, e.account_id), e.identifiers FROM {events} "
    "LEFT JOIN profiles u ON u.space = e.space AND u.segment_id = e.profile_id "
    "LEFT JOIN profiles a ON a.space = e.space AND a.segment_id = e.account_id "
    f"WHERE e.space = {{p}} AND e.sequence > {{p}} ORDER BY e.sequence LIMIT {EVENT_RESOLUTIONS_PAGE}"
)
# substr, not LIKE 'blocked%': psycopg reads a % in the SQL as a placeholder.
BLOCKED_VALUES_SQL = (
    "SELECT DISTINCT identifier FROM dropped WHERE space = {p} AND substr(rule, 1, 7) = 'blocked'"
)

# Store.first_token: the token a space already has of a kind (the first by name), and the insert.
TOKEN_OF_KIND_SQL = "SELECT token FROM tokens WHERE space = {p} AND kind = {p} ORDER BY token LIMIT 1"
INSERT_TOKEN_SQL = "INSERT INTO tokens (token, space, kind) VALUES ({p}, {p}, {p})"

_decode_identifiers = msgspec.json.Decoder(tuple[str, ...]).decode


def event_resolution(row: Sequence[Any]) -> EventResolution:
    """sequence, message_id, profile root, account root, identifiers (JSON)."""
    return EventResolution(row[1], row[2], row[3], _decode_identifiers(row[4]))
