"""The Profile API's response bodies as msgspec structs: one definition both encodes the responses and
generates their OpenAPI schemas, so the document cannot drift from what the server sends.

Field names and nesting follow Segment's Profile API (SEGMENT_API.md §A); idstitch's own endpoints
(merges, graph, suspect, unresolved, rules, stats) use the same conventions.
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, Struct, UnsetType

__all__ = [
    "Cursor",
    "ErrorBody",
    "ErrorDetail",
    "EventExternalId",
    "EventItem",
    "EventsResponse",
    "ExplainResponse",
    "ExternalId",
    "ExternalIdsResponse",
    "GraphResponse",
    "LinkItem",
    "LinksResponse",
    "Metadata",
    "MetadataResponse",
    "RulesResponse",
    "StatsResponse",
    "SuspectItem",
    "SuspectsResponse",
    "TraitsResponse",
    "UnresolvedItem",
    "UnresolvedResponse",
    "VerboseTrait",
]


class Cursor(Struct):
    """Where a list is: `url` fetches the next page while `has_more`, `next` is the cursor ("" at the end)."""

    url: str
    has_more: bool
    next: str
    limit: int


class VerboseTrait(Struct):
    """A trait with `verbose=true`: its value, the source that set it and when."""

    value: Any
    source_id: str | None
    updated_at: str


class TraitsResponse(Struct):
    """`GET …/traits`: key → value (or → VerboseTrait with `verbose=true`)."""

    traits: dict[str, Any]
    cursor: Cursor


class ExternalId(Struct, omit_defaults=True):
    """One identifier of a profile; `last_seen`, `suspect`, `retired` are idstitch's, with `verbose=true`."""

    source_id: str | None
    collection: str
    id: str
    type: str
    created_at: str
    encoding: str
    first_message_id: str | None
    last_seen: str | UnsetType = UNSET
    suspect: bool | UnsetType = UNSET
    retired: bool | UnsetType = UNSET


class ExternalIdsResponse(Struct):
    """`GET …/external_ids`."""

    data: list[ExternalId]
    cursor: Cursor


class EventExternalId(Struct):
    """An identifier a stored event carried that became part of the profile."""

    collection: str
    type: str
    id: str
    encoding: str


class EventItem(Struct, omit_defaults=True):
    """One event as stored: Segment's snake_case top level, `context` / `properties` / `traits` as sent."""

    external_ids: list[EventExternalId]
    context: dict[str, Any]
    type: str
    message_id: str
    source_id: str | None
    timestamp: str
    related: dict[str, str]
    # Always present (null / {} where the call has none): clients read every row with one shape.
    event: str | None
    properties: dict[str, Any]
    name: str | UnsetType = UNSET
    traits: dict[str, Any] | UnsetType = UNSET


class EventsResponse(Struct):
    """`GET …/events`."""

    data: list[EventItem]
    cursor: Cursor


class Metadata(Struct):
    """When a profile was created and last updated, and by which messages and sources."""

    created_at: str
    updated_at: str
    expires_at: str | None
    first_message_id: str | None
    first_source_id: str | None
    last_message_id: str | None
    last_source_id: str | None


class MetadataResponse(Struct):
    """`GET …/metadata` (with the `segment_id` that Segment's real responses carry)."""

    segment_id: str
    metadata: Metadata


class LinkItem(Struct):
    """A linked profile of the other collection, named by its identifiers."""

    to_collection: str
    external_ids: list[ExternalId]


class LinksResponse(Struct):
    """`GET …/links` (idstitch adds the cursor: an account may have thousands of users)."""

    data: list[LinkItem]
    cursor: Cursor


class MergeItem(Struct):
    """One merge: `child` was fused into `parent` by `message_id` because both had `via`."""

    parent: str
    child: str
    message_id: str
    via: str
    at: str


class DroppedItem(Struct):
    """An identifier a message carried that was not attached, and the rule that dropped it."""

    identifier: str
    rule: str
    message_id: str
    at: str


class ProfileSuspect(Struct):
    """A non-unique identifier on this profile or dropped from its messages, with its evidence."""

    identifier: str
    on_profile: bool
    evidence_type: str
    evidence_values: list[str]
    message_id: str
    at: str


class RetiredItem(Struct):
    """An identifier an alias retired: it still resolves to the profile but counts toward no limit."""

    identifier: str
    first_seen: str
    last_seen: str


class ExplainResponse(Struct):
    """`GET …/merges`: how the profile came to be."""

    segment_id: str
    collection: str
    merged_segment_ids: list[str]
    merges: list[MergeItem]
    dropped: list[DroppedItem]
    retired: list[RetiredItem]
    suspects: list[ProfileSuspect]


class GraphNode(Struct, omit_defaults=True):
    """A profile (root or merged child) or an identifier."""

    id: str
    kind: str  # profile | identifier
    collection: str
    root: bool | UnsetType = UNSET
    created_at: str | UnsetType = UNSET
    created_by: str | UnsetType | None = UNSET
    merged_at: str | UnsetType | None = UNSET
    type: str | UnsetType = UNSET
    value: str | UnsetType = UNSET
    first_seen: str | UnsetType = UNSET
    last_seen: str | UnsetType = UNSET
    suspect: bool | UnsetType = UNSET
    retired: bool | UnsetType = UNSET


class GraphEdge(Struct, omit_defaults=True, rename={"source": "from", "target": "to"}):
    """`owns` (profile → identifier) or `merged_into` (child → parent), with the message that made it."""

    kind: str
    source: str
    target: str
    message_id: str | None
    at: str
    via: str | UnsetType = UNSET


class GraphResponse(Struct):
    """`GET …/graph`: what the web explorer draws."""

    segment_id: str
    collection: str
    nodes: list[GraphNode]
    edges: list[GraphEdge]


class SuspectItem(Struct):
    """An identifier of the space marked non-unique: it never merges again."""

    identifier: str
    collection: str
    evidence_type: str
    evidence_values: list[str]
    message_id: str
    at: str


class SuspectsResponse(Struct):
    """`GET /v1/spaces/{space}/identifiers/suspect`."""

    data: list[SuspectItem]
    cursor: Cursor


class UnresolvedItem(Struct):
    """A stored message whose identifiers were all blocked."""

    message_id: str
    type: str
    source_id: str | None
    timestamp: str
    received_at: str
    identifiers: list[str]
    payload: dict[str, Any]


class UnresolvedResponse(Struct):
    """`GET /v1/spaces/{space}/unresolved`, newest first."""

    data: list[UnresolvedItem]
    cursor: Cursor


class RulesResponse(Struct):
    """`GET /v1/spaces/{space}/rules`: the rules in effect, learned custom types included."""

    space: str
    rules: dict[str, Any]


class StatsResponse(Struct):
    """`GET /v1/spaces/{space}/stats`."""

    space: str
    profiles: int
    accounts: int
    identifiers: int
    merges: int
    events: int
    unresolved: int
    suspect: int
    dropped: int


class ErrorDetail(Struct):
    """What went wrong: a short machine code and a message naming the parameter or limit."""

    code: str
    message: str


class ErrorBody(Struct):
    """Every Profile API error: `{"error": {"code", "message"}}`."""

    error: ErrorDetail


def schemas(types: list[type[Struct]]) -> tuple[tuple[dict[str, Any], ...], dict[str, Any]]:
    """JSON schemas of the response types (refs into `#/components/schemas/`) and those components."""
    return msgspec.json.schema_components(types, ref_template="#/components/schemas/{name}")
