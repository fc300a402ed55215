"""The Profile API (SPEC §7) as a plain ASGI app: Segment's read routes plus idstitch's explain, graph and
space views, behind per-space tokens with a per-token rate limit.

Routes, under `/v1/spaces/{space}` (`/v1/namespaces/{space}`, Segment's legacy name, works too):
- `collections/{users|accounts}/profiles/{id}/traits|external_ids|events|links|metadata` (read token)
- `collections/{users|accounts}/profiles/{id}/merges|graph` (read token)
- `identifiers/suspect`, `unresolved`, `rules`, `stats` (admin token)
and `GET /openapi.json`. Reads go through read connections of their own, so they never wait for the
ingest writer (SQLite WAL) and it never waits for them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
import re
import secrets
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode

import msgspec

from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import format_timestamp, parse_timestamp, repaired_text
from idstitch.core.segment_ids import ACCOUNT_PREFIX, USER_PREFIX
from idstitch.engine import Engine
from idstitch.http.auth import basic_user
from idstitch.http.logs import request_logger
from idstitch.http.metrics import Metrics
from idstitch.http.problems import HTTPProblem
from idstitch.http.profile_shapes import (
    Cursor,
    ErrorBody,
    ErrorDetail,
    EventExternalId,
    EventItem,
    EventsResponse,
    ExplainResponse,
    ExternalId,
    ExternalIdsResponse,
    GraphResponse,
    LinkItem,
    LinksResponse,
    Metadata,
    MetadataResponse,
    RulesResponse,
    StatsResponse,
    SuspectItem,
    SuspectsResponse,
    TraitsResponse,
    UnresolvedItem,
    UnresolvedResponse,
    VerboseTrait,
)
from idstitch.http.rate_limits import RateLimiter
from idstitch.http.tracking import Receive, Scope, Send
from idstitch.profiles import (
    COLLECTIONS,
    InvalidProfileId,
    explain_document,
    find_root,
    graph_document,
    identifier_readings,
)
from idstitch.storage.base import (
    EventQuery,
    EventRecord,
    IdentifierRecord,
    LinkRecord,
    StoreConflict,
    StoreUnavailable,
    TokenRecord,
)

__all__ = ["PROFILE_RESOURCES", "SPACE_RESOURCES", "ProfileAPI", "RateLimiter", "is_profile_api_path"]

PROFILE_RESOURCES = ("traits", "external_ids", "events", "links", "metadata", "merges", "graph")
SPACE_RESOURCES = ("identifiers/suspect", "unresolved", "rules", "stats")
_ADMIN_RESOURCES = frozenset(SPACE_RESOURCES)
# Reads that scan a whole space run on a worker thread so the event loop keeps serving. Every other
# read is bounded (indexed lookups of one profile, at most `limit` rows, a profile at most 1,000
# identifiers and 100 merges) and costs ~60 µs on the event loop, where a hop to a thread and back
# costs ~110 µs more (measured in process); SQLite's WAL keeps both from waiting on the ingest writer.
_SCANS = frozenset({"stats", "identifiers/suspect", "unresolved"})

# (default, maximum) of `limit` per list; Segment documents traits 10 / 200 and links 20, and 1-100
# for every other list.
_LIMITS: dict[str, tuple[int, int]] = {
    "traits": (10, 200),
    "external_ids": (10, 100),
    "events": (10, 100),
    "links": (20, 100),
    "identifiers/suspect": (100, 1000),
    "unresolved": (100, 1000),
}
_NOT_FOUND = "Profile was not found."
# Request ids: random per process, counted within it; unique without a random draw per request.
_REQUEST_ID_PREFIX = secrets.token_hex(6)
_request_numbers = itertools.count(1)
_JSON = b"application/json"
_encoder = msgspec.json.Encoder()
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def is_profile_api_path(path: str) -> bool:
    """Whether a request path belongs to this app (the rest of the port is the Tracking API's)."""
    return path.startswith(("/v1/spaces/", "/v1/namespaces/")) or path == "/openapi.json"


@dataclass(frozen=True, slots=True)
class _Call:
    """One parsed request: which space and resource, for which profile, with which query."""

    space: str
    resource: str
    path: str  # the raw path, for cursor URLs
    query: list[tuple[str, str]]
    collection: str | None = None
    profile_id: str | None = None


def _problem(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> HTTPProblem:
    return HTTPProblem(status, code, message, headers)


def _error_body(problem: HTTPProblem) -> bytes:
    return _encoder.encode(ErrorBody(ErrorDetail(problem.code, problem.message)))


def _store_unavailable(error: StoreConflict) -> HTTPProblem:
    """503 with Retry-After; the server and libpq's reason go to the log only."""
    return HTTPProblem(
        503,
        "store_unavailable",
        "the store cannot be reached; retry later",
        {"Retry-After": "1"},
        detail=f"{error}; retry later",
    )


def _not_found() -> HTTPProblem:
    return _problem(404, "not_found", _NOT_FOUND)


class ProfileAPI:
    """ASGI app of the Profile API over one engine (its store and config)."""

    def __init__(
        self,
        engine: Engine,
        *,
        rate_limiter: RateLimiter | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.engine = engine
        self.rate_limiter = rate_limiter or RateLimiter()
        self.metrics = metrics or Metrics()
        self._log = request_logger()
        self._openapi: bytes | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] != "http":
            return
        started = time.perf_counter()
        method: str = scope["method"]
        raw_path = scope.get("raw_path") or scope["path"].encode()
        path = raw_path.decode("latin-1").split("?", 1)[0]
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        request_id = headers.get("request-id") or f"{_REQUEST_ID_PREFIX}-{next(_request_numbers)}"
        status, body, extra = 200, b"", []
        space: str | None = None
        route = "other"
        error: HTTPProblem | None = None
        try:
            if path == "/openapi.json":
                route = path
                _read_only(method, path)
                body = self._openapi_document()
            else:
                # Who asks, then what: a caller without a valid token learns nothing about the routes.
                token = self._token(headers.get("authorization"))
                call = _parse_call(path, scope.get("query_string", b""))
                space = call.space
                route = _route_of(call)
                _read_only(method, path)
                self._authorise(call, token)
                if call.resource in _SCANS:
                    body = await asyncio.to_thread(self._answer, call)
                else:
                    body = self._answer(call)
        except (HTTPProblem, StoreConflict) as failure:
            # PostgreSQL down or restarting (or a read's connection lost twice) is no fault of the
            # request's: 503, not a 500 with a traceback.
            problem = failure if isinstance(failure, HTTPProblem) else _store_unavailable(failure)
            error = problem
            status, body = problem.status, _error_body(problem)
            extra = [(key.lower().encode(), value.encode()) for key, value in problem.headers.items()]
        except Exception:
            self._log.exception("request failed", extra={"path": path, "request_id": request_id})
            status = 500
            body = _error_body(_problem(500, "internal_error", "the request could not be completed"))
        response_headers = [
            (b"content-type", _JSON),
            (b"content-length", str(len(body)).encode()),
            (b"request-id", request_id.encode("latin-1")),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": b"" if method == "HEAD" else body})
        seconds = time.perf_counter() - started
        self.metrics.observe_request(route, status, seconds)
        if self._log.isEnabledFor(logging.INFO):
            fields: dict[str, Any] = {
                "method": method,
                "path": path,
                "status": status,
                "space": space,
                "request_id": request_id,
                "duration_ms": round(seconds * 1000, 3),
            }
            if error is not None:
                fields["error"] = error.code
                fields["reason"] = error.reason
            self._log.info("request", extra=fields)

    # -- auth ----------------------------------------------------------------------------------
    def _token(self, authorization: str | None) -> TokenRecord:
        name = basic_user(authorization)
        if name is None:
            raise _problem(
                401,
                "authentication_error",
                "authenticate with HTTP Basic: a Profile API token of the space as user name, no password",
                {"WWW-Authenticate": 'Basic realm="idstitch profile api"'},
            )
        token = self.engine.token(name)
        if token is None:
            raise _problem(
                401,
                "authentication_error",
                "unknown Profile API token",
                {"WWW-Authenticate": 'Basic realm="idstitch profile api"'},
            )
        return token

    def _authorise(self, call: _Call, token: TokenRecord) -> None:
        if token.space != call.space:
            raise _problem(403, "forbidden", f"this token does not give access to space {call.space!r}")
        if call.resource in _ADMIN_RESOURCES and token.kind != "admin":
            raise _problem(403, "forbidden", f"{call.resource} needs an admin token of the space")
        rate = self.engine.config.space(call.space).rate_limit
        wait = self.rate_limiter.retry_after(token.token, rate)
        if wait:
            raise _problem(
                429,
                "rate_limit_error",
                f"more than {rate} requests per second with this token; retry after {wait} s",
                {"Retry-After": str(wait), "X-RateLimit-Reset": str(wait)},
            )

    # -- answers (on the event loop, or a worker thread for the space-wide scans) ---------------
    def _answer(self, call: _Call) -> bytes:
        # One moment of the graph for the whole response: its reads (the root an id names, then that
        # root's identifiers, traits, events, links) must not straddle a merge that commits meanwhile.
        try:
            with self.engine.store.snapshot():
                return self._answer_now(call)
        except StoreUnavailable:
            raise
        except StoreConflict:
            # The connection died under the read while the server answers (one backend ended): a read
            # may run again, on another connection, rather than fail a request no one did wrong.
            with self.engine.store.snapshot():
                return self._answer_now(call)

    def _answer_now(self, call: _Call) -> bytes:
        if call.profile_id is None:
            return self._space_answer(call)
        assert call.collection is not None
        store = self.engine.store
        try:
            root = find_root(
                store, self.engine.rules(call.space), call.space, call.profile_id, call.collection
            )
        except InvalidProfileId as error:
            if call.profile_id.startswith((USER_PREFIX, ACCOUNT_PREFIX)):
                raise _not_found() from None  # shaped like a segment id: one that names no profile
            raise _problem(400, "validation_error", f"profile id: {error}") from None
        if root is None:
            raise _not_found()
        handler = getattr(self, "_" + call.resource)
        result: bytes = handler(call, root)
        return result

    def _traits(self, call: _Call, root: str) -> bytes:
        query = _Query(call)
        limit = query.limit("traits")
        verbose = query.boolean("verbose")
        include = query.names("include")
        trait_class = query.choice("class", ("audience", "computed_trait"))
        after = query.text("next")
        query.done()
        store = self.engine.store
        traits: dict[str, Any]
        # idstitch computes no audiences and no computed traits. Otherwise the page and the key after it
        # are read, not every trait: a profile may hold 50,000 keys.
        records = (
            []
            if trait_class
            else store.trait_records(call.space, root, after=after, include=include, limit=limit + 1)
        )
        page = records[:limit]
        if verbose:
            traits = {
                item.key: VerboseTrait(item.value, item.source, format_timestamp(item.updated_at))
                for item in page
            }
        else:
            traits = {item.key: item.value for item in page}
        next_key = records[limit].key if len(records) > limit else ""
        return _encoder.encode(TraitsResponse(traits, _cursor(call, limit, next_key)))

    def _external_ids(self, call: _Call, root: str) -> bytes:
        query = _Query(call)
        limit = query.limit("external_ids")
        verbose = query.boolean("verbose")
        # Types are lower-case, as in a path's `type:value`, which takes any case too.
        include = {name.lower() for name in query.names("include")}
        after = query.cursor_key("next")
        if after is not None and (len(after) != 3 or not after[0].isdigit() or len(after[0]) != 20):
            raise _bad_cursor("next")  # another list's cursor would compare as some place in this one
        query.done()
        items = [
            item
            for item in self.engine.store.identifiers(call.space, root)
            if (not include or item.type in include) and (after is None or _identifier_key(item) >= after)
        ]
        page, more = items[:limit], items[limit:]
        next_cursor = _encode_cursor(_identifier_key(more[0])) if more else ""
        data = [_external_id(item, verbose) for item in page]
        return _encoder.encode(ExternalIdsResponse(data, _cursor(call, limit, next_cursor)))

    def _events(self, call: _Call, root: str) -> bytes:
        query = _Query(call)
        limit = query.limit("events")
        start = query.time("start")
        end = query.time("end")
        descending = query.choice("sort", ("asc", "desc")) != "asc"
        include = query.names("include")
        exclude = query.names("exclude")
        after = query.event_cursor("next")
        query.done()
        store = self.engine.store
        records = store.event_page(
            call.space,
            root,
            EventQuery(
                limit=limit + 1,
                descending=descending,
                after=after,
                start=start,
                end=end,
                include=frozenset(include),
                exclude=frozenset(exclude),
            ),
        )
        page, more = records[:limit], records[limit:]
        # The drops of this page's messages only: a profile may hold a drop per message (a bot sending a
        # blocked value), and reading them all made each page cost as much as the profile's history.
        dropped = {
            (item.message_id, item.identifier)
            for item in (store.dropped_in(call.space, [record.message_id for record in page]) if page else ())
        }
        # An event lists the identifiers it promoted: of this profile's collection, only those the profile
        # holds (a suspect device id that routed the event here, or an id a refused merge left on another
        # profile, is not this profile's).
        owned = (
            {f"{item.type}:{item.value}" for item in store.identifiers(call.space, root)} if page else set()
        )
        accounts: dict[str, str] = {}
        data = [self._event_item(call, root, record, dropped, owned, accounts) for record in page]
        next_cursor = _event_cursor(page[-1]) if more else ""
        return _encoder.encode(EventsResponse(data, _cursor(call, limit, next_cursor)))

    def _event_item(
        self,
        call: _Call,
        root: str,
        record: EventRecord,
        dropped: set[tuple[str, str]],
        owned: set[str],
        accounts: dict[str, str],
    ) -> EventItem:
        payload = msgspec.json.decode(record.payload)
        rules = self.engine.rules(call.space)
        assert call.collection is not None  # an events route names its collection
        external_ids = []
        for text in record.identifiers:
            if (record.message_id, text) in dropped:
                continue
            kind, _, value = text.partition(":")
            if text in owned:
                # The profile's own identifier is in its collection, whatever the config says of the
                # type now (a custom type whose table was removed, or whose collection changed).
                collection = call.collection
            else:
                collection = "accounts" if kind == "group_id" else rules.rule(kind).collection
                if collection == call.collection:
                    continue
            external_ids.append(EventExternalId(collection, kind, value, "none"))
        related: dict[str, str] = {}
        store = self.engine.store
        user_profile, account_profile = record.profile_id, record.account_id
        if call.collection == "users":
            related["users"] = root
        elif user_profile is not None:
            related["users"] = store.resolve_segment_id(call.space, user_profile) or user_profile
        if call.collection == "accounts":
            related["accounts"] = root
        elif account_profile is not None:
            if account_profile not in accounts:
                accounts[account_profile] = (
                    store.resolve_segment_id(call.space, account_profile) or account_profile
                )
            related["accounts"] = accounts[account_profile]
        item = EventItem(
            external_ids=external_ids,
            context=_object(payload.get("context")),
            type=record.type,
            message_id=record.message_id,
            source_id=record.source,
            timestamp=format_timestamp(record.timestamp),
            related=related,
            event=record.name if record.type == "track" else None,
            properties=_object(payload.get("properties"))
            if record.type in ("track", "page", "screen")
            else {},
        )
        if record.type in ("page", "screen") and record.name is not None:
            item.name = record.name
        if record.type in ("identify", "group"):
            item.traits = _object(payload.get("traits"))
        return item

    def _links(self, call: _Call, root: str) -> bytes:
        query = _Query(call)
        limit = query.limit("links")
        after = query.cursor_key("next")
        query.done()
        store = self.engine.store
        if after is not None and len(after) == 1:
            # A cursor of an earlier release: the id of the next page's first link.
            every = store.link_records(call.space, root)
            ids = [item.segment_id for item in every]
            if after[0] not in ids:
                raise _problem(400, "invalid_request_error", "`next` does not name a link of this profile")
            start = ids.index(after[0])
            linked = every[start : start + limit + 1]
        else:
            # The place after the last link shown, in the list's order (first linked, then id): it stays
            # a place while profiles on the list merge away (a linked id would no longer be listed). One
            # page and the link after it are read, not every link (an account may have 200,000 users).
            position = None
            if after is not None:
                if len(after) != 2 or not after[0].isdigit() or len(after[0]) != 20:
                    raise _bad_cursor("next")
                position = (_EPOCH + timedelta(microseconds=int(after[0])), after[1])
            linked = store.link_records(call.space, root, after=position, limit=limit + 1)
        page, more = linked[:limit], linked[limit:]
        other = "users" if call.collection == "accounts" else "accounts"
        data = [
            LinkItem(
                other, [_external_id(item, False) for item in store.identifiers(call.space, link.segment_id)]
            )
            for link in page
        ]
        next_cursor = _encode_cursor(_link_key(page[-1])) if more else ""
        return _encoder.encode(LinksResponse(data, _cursor(call, limit, next_cursor)))

    def _metadata(self, call: _Call, root: str) -> bytes:
        query = _Query(call)
        query.boolean("verbose")  # accepted for compatibility; metadata has no short form
        query.done()
        store = self.engine.store
        record = store.profile(call.space, root)
        if record is None:
            raise _not_found()
        activity = store.activity(call.space, root)
        # created_at is the creating message's time, updated_at the server's when the last one arrived:
        # a message stamped in the future (client clock, backfill) must not make a profile updated
        # before it was created.
        updated = max(activity.updated_at or record.created_at, record.created_at)
        metadata = Metadata(
            created_at=format_timestamp(record.created_at),
            updated_at=format_timestamp(updated),
            expires_at=None,
            first_message_id=activity.first_message_id,
            first_source_id=activity.first_source,
            last_message_id=activity.last_message_id,
            last_source_id=activity.last_source,
        )
        return _encoder.encode(MetadataResponse(root, metadata))

    def _merges(self, call: _Call, root: str) -> bytes:
        _Query(call).done()
        document = explain_document(self.engine.store, call.space, root)
        if document is None:
            raise _not_found()
        return _encoder.encode(msgspec.convert(document, ExplainResponse))

    def _graph(self, call: _Call, root: str) -> bytes:
        _Query(call).done()
        document = graph_document(self.engine.store, call.space, root)
        if document is None:
            raise _not_found()
        return _encoder.encode(msgspec.convert(document, GraphResponse, from_attributes=False))

    def _space_answer(self, call: _Call) -> bytes:
        store = self.engine.store
        query = _Query(call)
        if call.resource == "stats":
            query.done()
            return _encoder.encode(msgspec.convert(store.stats(call.space).as_dict(), StatsResponse))
        if call.resource == "rules":
            query.done()
            return _encoder.encode(RulesResponse(call.space, self.engine.rules(call.space).as_dict()))
        if call.resource == "unresolved":
            limit = query.limit("unresolved")
            after = query.cursor_key("next")
            query.done()
            before = _sequence(after)
            records = store.unresolved(call.space, limit=limit + 1, before_sequence=before)
            page, more = records[:limit], records[limit:]
            next_cursor = _encode_cursor((str(page[-1].sequence),)) if more else ""
            unresolved = [
                UnresolvedItem(
                    message_id=record.message_id,
                    type=record.type,
                    source_id=record.source,
                    timestamp=format_timestamp(record.timestamp),
                    received_at=format_timestamp(record.received_at),
                    identifiers=list(record.identifiers),
                    payload=_object(msgspec.json.decode(record.payload)),
                )
                for record in page
            ]
            return _encoder.encode(UnresolvedResponse(unresolved, _cursor(call, limit, next_cursor)))
        limit = query.limit("identifiers/suspect")
        after = query.cursor_key("next")
        query.done()
        # One page and the mark after it are read, from the one the cursor names: a space may hold a
        # million suspects, and reading them all made every page cost as much as the whole list.
        found = None
        if after is None:
            found = store.suspects(call.space, limit=limit + 1)
        elif len(after) == 2:
            for key in identifier_readings(after[1], after[0]):
                found = store.suspects_from(call.space, key, limit=limit + 1)
                if found is not None:
                    break
        if found is None:
            raise _problem(400, "invalid_request_error", "`next` does not name a suspect identifier")
        suspects = [
            SuspectItem(
                identifier=item.identifier,
                collection=item.collection,
                evidence_type=item.evidence_type,
                evidence_values=list(item.evidence_values),
                message_id=item.message_id,
                at=format_timestamp(item.at),
            )
            for item in found
        ]
        page_suspects, rest = suspects[:limit], suspects[limit:]
        next_cursor = _encode_cursor((rest[0].collection, rest[0].identifier)) if rest else ""
        return _encoder.encode(SuspectsResponse(page_suspects, _cursor(call, limit, next_cursor)))

    # -- OpenAPI ---------------------------------------------------------------------------------
    def _openapi_document(self) -> bytes:
        if self._openapi is None:
            from idstitch.http.openapi import openapi_document  # built once, on first request

            self._openapi = _encoder.encode(openapi_document())
        return self._openapi


# -- request parsing ----------------------------------------------------------------------------


def _read_only(method: str, path: str) -> None:
    """405, with the methods this route has, for anything but a read."""
    if method not in ("GET", "HEAD"):
        raise _problem(
            405, "method_not_allowed", f"{method} is not allowed on {path}; use GET", {"Allow": "GET, HEAD"}
        )


def _route_of(call: _Call) -> str:
    """The route template of a call: a metrics label with few values, whatever the ids."""
    if call.profile_id is None:
        return f"/v1/spaces/{{space}}/{call.resource}"
    return f"/v1/spaces/{{space}}/collections/{call.collection}/profiles/{{id}}/{call.resource}"


_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _path_part(text: str, name: str) -> str:
    """One segment of the path, percent-decoded; a broken escape or non-UTF-8 bytes are a 400, not a 404."""
    try:
        if _BAD_ESCAPE.search(text):
            raise ValueError
        # A NUL is read as the Tracking API stores it (U+FFFD): PostgreSQL refuses one in a parameter.
        return repaired_text(unquote(text, errors="strict"))
    except ValueError:  # UnicodeDecodeError is one
        raise _problem(
            400, "validation_error", f"The parameter `{name}` is not percent-encoded UTF-8: {text!r}"
        ) from None


def _parse_call(path: str, query_string: bytes) -> _Call:
    parts = path.split("/")
    # ["", "v1", "spaces", space, ...]
    if len(parts) < 5 or parts[1] != "v1" or parts[2] not in ("spaces", "namespaces"):
        raise _problem(404, "not_found", f"no route {path}")
    space = _path_part(parts[3], "space")
    rest = parts[4:]
    query = parse_qsl(query_string.decode("latin-1"), keep_blank_values=True)
    if not space:
        raise _problem(400, "validation_error", "The parameter `space` is empty")
    tail = "/".join(rest)
    if tail in SPACE_RESOURCES:
        return _Call(space, tail, path, query)
    if len(rest) == 5 and rest[0] == "collections" and rest[2] == "profiles":
        collection = _path_part(rest[1], "collection")
        if collection not in COLLECTIONS:
            raise _problem(
                400,
                "validation_error",
                f"The parameter `collection` must be users or accounts, got {collection!r}",
            )
        profile_id = _path_part(rest[3], "id")
        if not profile_id:
            raise _problem(400, "validation_error", "The parameter `id` is empty: expected type:value")
        resource = rest[4]
        if resource not in PROFILE_RESOURCES:
            raise _problem(404, "not_found", f"no route {path}: a profile has {', '.join(PROFILE_RESOURCES)}")
        return _Call(space, resource, path, query, collection, profile_id)
    raise _problem(404, "not_found", f"no route {path}")


class _Query:
    """The query parameters of one call, validated one by one; `done()` refuses repeated parameters."""

    def __init__(self, call: _Call) -> None:
        self._values: dict[str, list[str]] = {}
        for key, value in call.query:
            # As a path part: a NUL is read as stored (U+FFFD), so that no store is handed one.
            self._values.setdefault(key, []).append(repaired_text(value))
        self._resource = call.resource

    def _one(self, name: str) -> str | None:
        values = self._values.get(name)
        if not values:
            return None
        if len(values) > 1:
            raise _problem(400, "invalid_request_error", f"The parameter `{name}` is given more than once")
        return values[0]

    def limit(self, resource: str) -> int:
        """`limit` within the list's range, or its default."""
        default, maximum = _LIMITS[resource]
        text = self._one("limit")
        if text is None or text == "":
            return default
        try:
            value = int(text)
        except ValueError:
            raise _problem(
                400, "validation_error", f"The parameter `limit` must be a whole number, got {text!r}"
            ) from None
        if not 1 <= value <= maximum:
            raise _problem(
                400, "validation_error", f"The parameter `limit` must be between 1 and {maximum}, got {value}"
            )
        return value

    def boolean(self, name: str) -> bool:
        """`true` / `false` (also 1 / 0); absent is false."""
        text = self._one(name)
        if text is None or text == "":
            return False
        lowered = text.lower()
        if lowered in ("true", "1"):
            return True
        if lowered in ("false", "0"):
            return False
        raise _problem(400, "validation_error", f"The parameter `{name}` must be true or false, got {text!r}")

    def names(self, name: str) -> list[str]:
        """A comma-separated list (empty entries ignored)."""
        text = self._one(name)
        return [] if not text else [item.strip() for item in text.split(",") if item.strip()]

    def choice(self, name: str, allowed: Sequence[str]) -> str | None:
        """One of `allowed`, or None when absent."""
        text = self._one(name)
        if text is None or text == "":
            return None
        if text not in allowed:
            raise _problem(
                400,
                "validation_error",
                f"The parameter `{name}` must be one of {', '.join(allowed)}, got {text!r}",
            )
        return text

    def text(self, name: str) -> str:
        """A free text ("" when absent)."""
        return self._one(name) or ""

    def time(self, name: str) -> datetime | None:
        """An ISO 8601 date or date-time (UTC when no offset is given)."""
        text = self._one(name)
        if text is None or text == "":
            return None
        try:
            return parse_timestamp(text, name)
        except InvalidEvent:
            raise _problem(
                400,
                "validation_error",
                f"The parameter `{name}` must be an ISO 8601 date or time (e.g. 2026-01-31), got {text!r}",
            ) from None

    def cursor_key(self, name: str) -> tuple[str, ...] | None:
        """An opaque cursor this API made (a base64url JSON list of strings)."""
        text = self._one(name)
        if text is None or text == "":
            return None
        try:
            value = msgspec.json.decode(_unbase64(text), type=tuple[str, ...])
        except (binascii.Error, ValueError, msgspec.DecodeError):
            raise _bad_cursor(name) from None
        if not value:
            raise _bad_cursor(name)
        return value

    def event_cursor(self, name: str) -> tuple[datetime, str] | None:
        """Segment's event cursor: base64 of `<nanoseconds since the epoch>::<message_id>`."""
        text = self._one(name)
        if text is None or text == "":
            return None
        try:
            nanos, separator, message_id = _unbase64(text).decode("utf-8").partition("::")
            if not separator or not message_id:
                raise ValueError(text)
            at = _EPOCH + timedelta(microseconds=int(nanos) // 1000)
        except (binascii.Error, ValueError, OverflowError):
            raise _bad_cursor(name) from None
        return at, repaired_text(message_id)

    def done(self) -> None:
        """Refuse a parameter given twice (silently using one of them would hide a client bug)."""
        for name, values in self._values.items():
            if len(values) > 1:
                raise _problem(
                    400, "invalid_request_error", f"The parameter `{name}` is given more than once"
                )


def _bad_cursor(name: str) -> HTTPProblem:
    return _problem(
        400, "invalid_request_error", f"The parameter `{name}` is not a cursor of this list: use cursor.next"
    )


def _unbase64(text: str) -> bytes:
    # Segment's cursors are standard base64, ours URL-safe without padding: accept both.
    cleaned = text.strip().replace("-", "+").replace("_", "/")
    return base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)


def _encode_cursor(key: tuple[str, ...]) -> str:
    return base64.urlsafe_b64encode(_encoder.encode(list(key))).decode().rstrip("=")


def _micros(value: datetime) -> int:
    delta = value - _EPOCH  # integer arithmetic: a float of microseconds since 1970 rounds
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _event_cursor(record: EventRecord) -> str:
    raw = f"{_micros(record.timestamp) * 1000}::{record.message_id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _identifier_key(item: IdentifierRecord) -> tuple[str, ...]:
    # The store's order (first seen, type, value); the time as fixed-width text so tuples compare right.
    return (f"{_micros(item.first_seen):020d}", item.type, item.value)


def _link_key(item: LinkRecord) -> tuple[str, ...]:
    # The store's order (first linked, segment id); the time as fixed-width text so tuples compare right.
    return (f"{_micros(item.at):020d}", item.segment_id)


def _sequence(key: tuple[str, ...] | None) -> int | None:
    if key is None:
        return None
    try:
        (text,) = key
        return int(text)
    except ValueError:
        raise _bad_cursor("next") from None


def _cursor(call: _Call, limit: int, next_cursor: str) -> Cursor:
    """The cursor of a page: its `url` fetches the next page while there is one, else names this list."""
    if not call.query and not next_cursor:
        return Cursor(url=call.path, has_more=False, next="", limit=limit)  # the usual lookup: no encoding
    kept = [(key, value) for key, value in call.query if key != "next"]
    if next_cursor:
        kept.append(("next", next_cursor))
    query = urlencode(kept, quote_via=quote)
    return Cursor(
        url=call.path + ("?" + query if query else ""),
        has_more=bool(next_cursor),
        next=next_cursor,
        limit=limit,
    )


def _external_id(item: IdentifierRecord, verbose: bool) -> ExternalId:
    external = ExternalId(
        source_id=item.source,
        collection=item.collection,
        id=item.value,
        type=item.type,
        created_at=format_timestamp(item.first_seen),
        encoding="none",  # base64 ids are decoded when they arrive, so every stored value is plain
        first_message_id=item.first_message_id,
    )
    if verbose:
        external.last_seen = format_timestamp(item.last_seen)
        external.suspect = item.suspect
        external.retired = item.retired
    return external


def _object(value: object) -> dict[str, Any]:
    return dict(value) if isinstance(value, dict) else {}
