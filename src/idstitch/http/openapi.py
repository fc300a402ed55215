"""The OpenAPI 3.1 document of the Profile API, served at `/openapi.json`.

Response schemas come from the same msgspec structs that encode the responses (http/profile_shapes.py),
so the document describes exactly what the server sends.
"""

from __future__ import annotations

from importlib.metadata import version
from typing import Any

from msgspec import Struct

from idstitch.http.profile_shapes import (
    ErrorBody,
    EventsResponse,
    ExplainResponse,
    ExternalIdsResponse,
    GraphResponse,
    LinksResponse,
    MetadataResponse,
    RulesResponse,
    StatsResponse,
    SuspectsResponse,
    TraitsResponse,
    UnresolvedResponse,
    schemas,
)

__all__ = ["openapi_document"]

_PROFILE_ROUTES: list[tuple[str, type[Struct], str, str]] = [
    ("traits", TraitsResponse, "Traits of a profile", "Current traits, newest value per key."),
    (
        "external_ids",
        ExternalIdsResponse,
        "Identifiers of a profile",
        "Every identifier on the profile (first seen first).",
    ),
    ("events", EventsResponse, "Events of a profile", "Events of the profile and its merged profiles."),
    ("links", LinksResponse, "Linked profiles", "Accounts of a user, or users of an account."),
    (
        "metadata",
        MetadataResponse,
        "Profile metadata",
        "Creation and last update, with messages and sources.",
    ),
    ("merges", ExplainResponse, "Explain a profile", "Merges, dropped identifiers with rules, suspects."),
    ("graph", GraphResponse, "Identity graph of a profile", "Nodes and edges, each edge with its message."),
]
_SPACE_ROUTES: list[tuple[str, type[Struct], str]] = [
    ("identifiers/suspect", SuspectsResponse, "Identifiers found non-unique (admin token)"),
    ("unresolved", UnresolvedResponse, "Messages whose identifiers were all blocked (admin token)"),
    ("rules", RulesResponse, "Identity rules in effect (admin token)"),
    ("stats", StatsResponse, "Counts of the space (admin token)"),
]
_LIMITS = {
    "traits": (10, 200),
    "external_ids": (10, 100),
    "events": (10, 100),
    "links": (20, 100),
    "identifiers/suspect": (100, 1000),
    "unresolved": (100, 1000),
}


def _query(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def _limit(resource: str) -> dict[str, Any]:
    default, maximum = _LIMITS[resource]
    return _query(
        "limit", {"type": "integer", "minimum": 1, "maximum": maximum, "default": default}, "Page size."
    )


_TIME = {"anyOf": [{"type": "string", "format": "date"}, {"type": "string", "format": "date-time"}]}
_NEXT = _query("next", {"type": "string"}, "Cursor from `cursor.next` of the previous page.")
_VERBOSE = _query("verbose", {"type": "boolean", "default": False}, "Add source and time to each item.")
_INCLUDE_KEYS = _query("include", {"type": "string"}, "Comma-separated keys or types to return.")


def _profile_parameters(resource: str) -> list[dict[str, Any]]:
    if resource == "traits":
        return [
            _limit(resource),
            _NEXT,
            _VERBOSE,
            _INCLUDE_KEYS,
            _query(
                "class",
                {"type": "string", "enum": ["audience", "computed_trait"]},
                "Only audiences or computed traits (idstitch computes neither, so these are empty).",
            ),
        ]
    if resource == "external_ids":
        return [_limit(resource), _NEXT, _VERBOSE, _INCLUDE_KEYS]
    if resource == "events":
        return [
            _limit(resource),
            _NEXT,
            _query("start", _TIME, "ISO 8601 date or time (UTC if no offset): events at or after it."),
            _query("end", _TIME, "ISO 8601 date or time (UTC if no offset): events before it."),
            _query("sort", {"type": "string", "enum": ["asc", "desc"], "default": "desc"}, "By timestamp."),
            _query("include", {"type": "string"}, "Comma-separated event names to return."),
            _query("exclude", {"type": "string"}, "Comma-separated event names to leave out."),
        ]
    if resource == "links":
        return [_limit(resource), _NEXT]
    if resource == "metadata":
        return [_VERBOSE]
    return []


def _errors(ref: dict[str, Any], *statuses: tuple[str, str]) -> dict[str, Any]:
    return {
        status: {
            "description": description,
            "headers": _REQUEST_ID,
            "content": {"application/json": {"schema": ref}},
        }
        for status, description in statuses
    }


_REQUEST_ID = {"Request-Id": {"schema": {"type": "string"}, "description": "Id of this request, for logs."}}
_COMMON_ERRORS = (
    ("400", "A malformed id, parameter or cursor."),
    ("401", "No token, or an unknown one."),
    ("403", "The token is of another space, or not an admin token where one is needed."),
    ("404", "No such profile."),
    ("429", "Too many requests with this token: retry after `Retry-After` seconds."),
    ("503", "The store cannot be reached (PostgreSQL restarting): retry after `Retry-After` seconds."),
)


def _operation(
    operation_id: str,
    summary: str,
    description: str,
    response: dict[str, Any],
    error: dict[str, Any],
    parameters: list[dict[str, Any]],
) -> dict[str, Any]:
    errors = _errors(error, *_COMMON_ERRORS)
    for status in ("429", "503"):
        errors[status]["headers"] = {
            **_REQUEST_ID,
            "Retry-After": {"schema": {"type": "string"}, "description": "Seconds to wait."},
        }
    return {
        "get": {
            "operationId": operation_id,
            "summary": summary,
            "description": description,
            "parameters": parameters,
            "responses": {
                "200": {
                    "description": "OK",
                    "headers": _REQUEST_ID,
                    "content": {"application/json": {"schema": response}},
                },
                **errors,
            },
        }
    }


def openapi_document() -> dict[str, Any]:
    """The whole OpenAPI 3.1 document."""
    types: list[type[Struct]] = [
        *(shape for _, shape, _, _ in _PROFILE_ROUTES),
        *(shape for _, shape, _ in _SPACE_ROUTES),
        ErrorBody,
    ]
    refs, components = schemas(types)
    by_type = dict(zip(types, refs, strict=True))
    error = by_type[ErrorBody]
    space = {"name": "space", "in": "path", "required": True, "schema": {"type": "string", "minLength": 1}}
    collection = {
        "name": "collection",
        "in": "path",
        "required": True,
        "schema": {"type": "string", "enum": ["users", "accounts"]},
    }
    profile_id = {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "`type:value` (URL-encoded; e.g. `email:jane%40example.com`) or a segment id.",
        # a segment id, or a non-empty type and value around the first colon
        "schema": {"type": "string", "pattern": "^(?:(?:use|acc)_[0-9A-Za-z]{27}|[^:]+:[\\s\\S]+)$"},
    }
    paths: dict[str, Any] = {}
    for resource, shape, summary, description in _PROFILE_ROUTES:
        paths[f"/v1/spaces/{{space}}/collections/{{collection}}/profiles/{{id}}/{resource}"] = _operation(
            f"profile_{resource}",
            summary,
            description,
            by_type[shape],
            error,
            [space, collection, profile_id, *_profile_parameters(resource)],
        )
    for resource, shape, summary in _SPACE_ROUTES:
        parameters = [space]
        if resource in _LIMITS:
            parameters += [_limit(resource), _NEXT]
        paths[f"/v1/spaces/{{space}}/{resource}"] = _operation(
            "space_" + resource.replace("/", "_"), summary, summary, by_type[shape], error, parameters
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "idstitch Profile API",
            "version": version("idstitch"),
            "description": "Segment-compatible Profile API with idstitch's explain, graph and space views.",
        },
        "security": [{"token": []}],
        "components": {
            "schemas": components,
            "securitySchemes": {
                "token": {
                    "type": "http",
                    "scheme": "basic",
                    "description": "A Profile API token of the space as user name, empty password.",
                }
            },
        },
        "paths": paths,
    }
