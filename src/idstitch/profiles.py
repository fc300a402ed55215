"""Reading profiles: find the root an id names, and explain how it came to be (CLI and Profile API share it).

An application service beside the engine: it reads the store and knows the space's rules (for the
normalisation and collection of an identifier type), and returns plain data that edges render.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from idstitch.core.errors import IdstitchError
from idstitch.core.identifiers import Identifier, normalise_value, parse_identifier
from idstitch.core.messages import format_timestamp
from idstitch.core.rules import IdentityRules
from idstitch.core.segment_ids import collection_of_segment_id
from idstitch.storage.base import Store

__all__ = [
    "COLLECTIONS",
    "InvalidProfileId",
    "ProfileRef",
    "explain_document",
    "find_root",
    "graph_document",
    "identifier_readings",
    "parse_profile_id",
]

COLLECTIONS = ("users", "accounts")


class InvalidProfileId(IdstitchError):
    """A profile id that is neither `type:value` nor a segment id (or has an empty part)."""


@dataclass(frozen=True, slots=True)
class ProfileRef:
    """What a profile id names: a segment id, or an identifier (type lower-cased, value as given)."""

    segment_id: str | None = None
    identifier: Identifier | None = None


def parse_profile_id(text: str) -> ProfileRef:
    """`type:value` (any case of type) or a segment id; InvalidProfileId says what is wrong."""
    if collection_of_segment_id(text) is not None:
        return ProfileRef(segment_id=text)
    try:
        return ProfileRef(identifier=parse_identifier(text))
    except ValueError:
        if ":" not in text:
            raise InvalidProfileId(
                f"{text!r} is neither type:value (e.g. user_id:u1, email:jane@example.com) nor a segment id"
            ) from None
        missing = "type" if text.startswith(":") else "value"
        raise InvalidProfileId(f"{text!r} has an empty {missing}: expected type:value") from None


def find_root(
    store: Store, rules: IdentityRules, space: str, text: str, collection: str | None = None
) -> str | None:
    """The root segment id `text` names in a collection (None: infer it from the type), or None if unknown.

    A merged child's segment id resolves to its root; an identifier's value is normalised as its type's
    rule says, so `email:Jane@Example.com` finds `jane@example.com`.
    """
    ref = parse_profile_id(text)
    if ref.segment_id is not None:
        own = collection_of_segment_id(ref.segment_id)
        root = store.resolve_segment_id(space, ref.segment_id)
        if root is None or (collection is not None and collection != own):
            return None
        return root
    assert ref.identifier is not None
    identifier = ref.identifier
    collections = [collection] if collection is not None else []
    if collection is None:
        declared = rules.rule(identifier.type).collection if rules.knows(identifier.type) else "users"
        inferred = "accounts" if identifier.type == "group_id" else declared
        collections = [inferred, *(other for other in COLLECTIONS if other != inferred)]
    value = normalise_value(identifier.value, rules.rule(identifier.type).normalise)
    # Stored identifiers keep the collection and spelling of the rules they were stored under: after a
    # type's collection or normalisation changes in the config (or a custom type is removed from it),
    # the value as given and the other collection are looked at too, or what a profile holds is unfindable.
    values = dict.fromkeys((value, identifier.value))
    for where in collections:
        for candidate in values:
            # Identifiers always name their root (a merge repoints them), so a hit is the answer.
            found = store.find_profile(space, Identifier(identifier.type, candidate, where))
            if found is not None:
                return found
    return None


def _time(value: datetime) -> str:
    return format_timestamp(value)


def identifier_readings(text: str, collection: str) -> list[Identifier]:
    """Every identifier that `type:value` text can be: a store from the first release may hold a custom
    type with a colon, so each colon is tried as the separator."""
    return [
        Identifier(text[:position], text[position + 1 :], collection)
        for position, character in enumerate(text)
        if character == ":"
    ]


def explain_document(store: Store, space: str, root: str) -> dict[str, Any] | None:
    """How a root profile came to be: merges (oldest first), dropped, retired and suspect identifiers."""
    record = store.profile(space, root)
    if record is None:
        return None
    identifiers = store.identifiers(space, root)
    dropped = store.dropped(space, root)
    on_profile = {f"{item.type}:{item.value}" for item in identifiers if item.suspect}
    related = on_profile | {item.identifier for item in dropped}
    # The marks of these identifiers are read by key: a space may hold a million suspects.
    keys = [key for text in related for key in identifier_readings(text, record.collection)]
    suspects = [
        {
            "identifier": item.identifier,
            "on_profile": item.identifier in on_profile,
            "evidence_type": item.evidence_type,
            "evidence_values": list(item.evidence_values),
            "message_id": item.message_id,
            "at": _time(item.at),
        }
        for item in store.suspects_among(space, keys)
    ]
    return {
        "segment_id": record.segment_id,
        "collection": record.collection,
        "merged_segment_ids": list(record.merged_segment_ids),
        "merges": [
            {
                "parent": item.parent_id,
                "child": item.child_id,
                "message_id": item.message_id,
                "via": item.via,
                "at": _time(item.at),
            }
            for item in store.merges(space, root)
        ],
        "dropped": [
            {
                "identifier": item.identifier,
                "rule": item.rule,
                "message_id": item.message_id,
                "at": _time(item.at),
            }
            for item in dropped
        ],
        # Retired by an alias that moved the person to a new user id (SPEC §4, E11): the identifier
        # still resolves here but no longer counts toward its type's limit.
        "retired": [
            {
                "identifier": f"{item.type}:{item.value}",
                "first_seen": _time(item.first_seen),
                "last_seen": _time(item.last_seen),
            }
            for item in identifiers
            if item.retired
        ],
        "suspects": suspects,
    }


def graph_document(store: Store, space: str, root: str) -> dict[str, Any] | None:
    """Nodes (the root, its merged children, its identifiers) and edges (ownership, merges) to draw.

    Every edge names the message that created it: an ownership edge the message that first attached the
    identifier, a merge edge the message that fused the two profiles.
    """
    record = store.profile(space, root)
    if record is None:
        return None
    merges = store.merges(space, root)
    nodes: list[dict[str, Any]] = [
        {
            "id": record.segment_id,
            "kind": "profile",
            "collection": record.collection,
            "root": True,
            "created_at": _time(record.created_at),
            "created_by": record.created_by or None,
        }
    ]
    merged_at = {item.child_id: item for item in merges}
    for child in record.merged_segment_ids:
        step = merged_at.get(child)
        nodes.append(
            {
                "id": child,
                "kind": "profile",
                "collection": record.collection,
                "root": False,
                "merged_at": None if step is None else _time(step.at),
            }
        )
    edges: list[dict[str, Any]] = []
    for item in store.identifiers(space, root):
        node_id = f"{item.type}:{item.value}"
        nodes.append(
            {
                "id": node_id,
                "kind": "identifier",
                "collection": item.collection,
                "type": item.type,
                "value": item.value,
                "first_seen": _time(item.first_seen),
                "last_seen": _time(item.last_seen),
                "suspect": item.suspect,
                "retired": item.retired,
            }
        )
        edges.append(
            {
                "kind": "owns",
                "from": record.segment_id,
                "to": node_id,
                "message_id": item.first_message_id,
                "at": _time(item.first_seen),
            }
        )
    for step in merges:
        edges.append(
            {
                "kind": "merged_into",
                "from": step.child_id,
                "to": step.parent_id,
                "message_id": step.message_id,
                "via": step.via,
                "at": _time(step.at),
            }
        )
    return {"segment_id": record.segment_id, "collection": record.collection, "nodes": nodes, "edges": edges}
