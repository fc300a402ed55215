"""The Segment-compatible Tracking API (SPEC §6) as a plain ASGI app: read, authenticate, parse, submit, answer.

No business logic lives here: messages are parsed by `core.messages`, written by the group-commit
writer (so SQLite never runs on the event loop), and the engine's outcomes are mapped to HTTP.
A 200 is sent only once the writer's commit holding the request's messages is durable. In queue mode
(`serve --queue`) the writer is a JetStream publisher with the same interface: a 200 then means the
request's messages are persisted in the JetStream stream, and workers resolve them.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import parse_qsl

import msgspec

from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import (
    MAX_BATCH_BYTES,
    MAX_BATCH_MESSAGES,
    MAX_MESSAGE_BYTES,
    UTF8_BOM,
    Message,
    decode_document,
    parse_batch,
    parse_message,
)
from idstitch.engine import Engine, IngestResult, MessageOutcome
from idstitch.group_commit import WriterBusy, WriterClosed
from idstitch.http.auth import Source, WriteKeys, basic_user
from idstitch.http.bodies import BodyLimit, read_body
from idstitch.http.logs import request_logger
from idstitch.http.metrics import Metrics, WriterFigures
from idstitch.http.problems import HTTPProblem
from idstitch.http.source_settings import SETTINGS_ROUTE, PublicAddress, settings_document, settings_write_key
from idstitch.queue.envelope import RequestTooLarge
from idstitch.storage.base import StoreConflict, StoreFull, StoreUnavailable, StoreWriteFailed

__all__ = [
    "BATCH_CALLS",
    "BEACON_PATH",
    "BODY_TIMEOUT_SECONDS",
    "MESSAGE_LIMIT",
    "REQUEST_LIMIT",
    "SHORT_CALLS",
    "SINGLE_CALLS",
    "IngestWriter",
    "TrackingAPI",
]

Scope = MutableMapping[str, Any]
ASGIMessage = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[ASGIMessage]]
Send = Callable[[ASGIMessage], Awaitable[None]]

SINGLE_CALLS = frozenset({"identify", "track", "page", "screen", "group", "alias"})
BATCH_CALLS = frozenset({"batch", "import"})  # /v1/import is Segment's older name of /v1/batch
# analytics.js (analytics-next, in the browser) posts each call to the first letter of its type, and a
# batch to /b: /v1/t, /v1/p, /v1/b, ... answer as the long names do.
SHORT_CALLS = {
    "i": "identify",
    "t": "track",
    "p": "page",
    "s": "screen",
    "g": "group",
    "a": "alias",
    "b": "batch",
}
# RudderStack's JavaScript SDK with `useBeacon` sends its batches by navigator.sendBeacon, which can set
# no header: to this path, with the write key in the query string (`?writeKey=…`), as RudderStack's
# data plane takes them.
BEACON_PATH = "/beacon/v1/batch"
MESSAGE_LIMIT = BodyLimit(MAX_MESSAGE_BYTES, 400, "message_too_large", "message", "message")
REQUEST_LIMIT = BodyLimit(MAX_BATCH_BYTES, 413, "request_too_large", "request", "request body")

_SUCCESS = b'{"success":true}'
_JSON = b"application/json"
_encoder = msgspec.json.Encoder()
_PREFLIGHT = [
    (b"access-control-allow-methods", b"POST, OPTIONS"),
    (b"access-control-max-age", b"86400"),
]
_PREFLIGHT_HEADERS = "Authorization, Content-Type, Content-Encoding"
_EXPOSED_HEADERS = b"Retry-After, X-RateLimit-Reset"
_LOGGED_REJECTIONS = 10  # per request log line: enough to diagnose, bounded for a 2,500-message batch
# The most a client may take to send a body, from its first read: a client that stalls (a phone that lost
# its network without closing, a slowloris) would otherwise hold one of the `max_in_flight` slots for ever,
# and once they are all held every ingest request is refused with 429.
BODY_TIMEOUT_SECONDS = 60.0


class IngestWriter(WriterFigures, Protocol):
    """What the Tracking API writes through: `GroupCommitWriter`, or `JetStreamPublisher` in queue mode."""

    @property
    def engine(self) -> Engine:
        """The engine whose config and write keys the API uses."""
        ...

    def submit(
        self, items: Iterable[Message | InvalidEvent], *, space: str, source: str | None = None
    ) -> Future[IngestResult]:
        """Take a request; the future resolves once its messages are durable (or fails with why)."""
        ...

    def close(self) -> None:
        """Stop accepting and make everything accepted durable."""
        ...

    def unhealthy(self) -> str | None:
        """Why requests cannot be made durable now (None when they can): what /healthz reports."""
        ...


class _Disconnected(Exception):
    """The client went away before its body was read: there is nobody to answer."""


@dataclass(slots=True)
class _Request:
    """What the request log line and the metrics need to know about one request."""

    method: str
    path: str
    route: str
    started: float
    messages: int = 0
    source: Source | None = None
    rejected: int = 0
    # The first rejections of a batch with their reasons: client libraries ignore a 200's body, so
    # the log is where an operator can learn why a message was refused.
    rejections: list[dict[str, Any]] = field(default_factory=list)
    problem: HTTPProblem | None = None
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _delivery_token() -> str:
    return secrets.token_hex(8)


class TrackingAPI:
    """ASGI app: `POST /v1/{identify,track,page,screen,group,alias,batch,import}` (and RudderStack's
    `/beacon/v1/batch`), `/healthz`, `/metrics`."""

    def __init__(
        self,
        writer: IngestWriter,
        *,
        write_keys: WriteKeys | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], datetime] = _utc_now,
        delivery_tokens: Callable[[], str] = _delivery_token,
        max_in_flight: int = 512,
        retry_after: int = 1,
        public_address: PublicAddress | None = None,
        body_timeout: float = BODY_TIMEOUT_SECONDS,
    ) -> None:
        self.writer = writer
        # Behind a reverse proxy the Host header may name the proxy's upstream (nginx's default): the
        # settings document would then send browsers to an address only the proxy can reach.
        self.public_address = public_address
        self.write_keys = write_keys or WriteKeys(writer.engine)
        self.metrics = metrics or Metrics(writer)
        self.clock = clock
        # One per request: what tells two sends of alike messages without a messageId apart.
        self.delivery_tokens = delivery_tokens
        # Ingest requests open at once (reading, parsing or waiting for their commit): with the
        # per-request size limits this bounds the memory held by bodies the writer's bound does not see.
        self.max_in_flight = max_in_flight
        self.retry_after = retry_after
        self.body_timeout = body_timeout
        self._in_flight = 0
        self._log = request_logger()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """ASGI entry point."""
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        method: str = scope["method"]
        path: str = scope["path"]
        beacon = path.rstrip("/") == BEACON_PATH
        call = "batch" if beacon else _call_of(path)
        settings_key = None if call else settings_write_key(path)
        if beacon:
            route = BEACON_PATH
        elif call:
            route = f"/v1/{call}"
        elif settings_key is not None:
            route = SETTINGS_ROUTE
        else:
            route = path if path in ("/healthz", "/metrics") else "other"
        # The write key in a settings path stays out of the request log (logs travel further than keys
        # should); the source it names is logged instead.
        logged_path = SETTINGS_ROUTE if settings_key is not None else path
        request = _Request(method, logged_path, route, time.perf_counter())
        headers = _header_map(scope["headers"])
        status = 200
        body = _SUCCESS
        content_type = _JSON
        error: BaseException | None = None
        try:
            if call is not None:
                if method == "POST":
                    query_key = _query_write_key(scope) if beacon else None
                    body = await self._ingest(call, headers, receive, request, query_key)
                elif method == "OPTIONS":
                    status, body, content_type = 204, b"", b""
                    # Whatever headers the client library adds (RudderStack's AnonymousId, say):
                    # none of them is a credential the browser would send on its own.
                    allowed = headers.get("access-control-request-headers") or _PREFLIGHT_HEADERS
                    request.headers += [
                        *_PREFLIGHT,
                        (b"access-control-allow-headers", allowed.encode("latin-1")),
                    ]
                else:
                    raise _not_allowed(method, path, "POST, OPTIONS")
            elif settings_key is not None:
                if method not in ("GET", "HEAD"):
                    raise _not_allowed(method, logged_path, "GET, HEAD")
                source = await self.write_keys.resolve(settings_key)
                if source is None:
                    # Not 401: a challenge could make a browser ask its user for a password.
                    raise HTTPProblem(404, "not_found", "unknown write key")
                request.source = source
                public = self.public_address
                body = (
                    settings_document(settings_key, host=_host_of(scope, headers), scheme=scope["scheme"])
                    if public is None
                    else settings_document(settings_key, host=public.host, scheme=public.scheme)
                )
            elif route == "/healthz":
                if method not in ("GET", "HEAD"):
                    raise _not_allowed(method, path, "GET, HEAD")
                reason = self.writer.unhealthy()
                if reason is not None:
                    # A load balancer takes this server out instead of sending it requests it must refuse.
                    status = 503
                    body = _encoder.encode({"status": "unavailable", "reason": reason})
                else:
                    body = b'{"status":"ok"}'
            elif route == "/metrics":
                if method not in ("GET", "HEAD"):
                    raise _not_allowed(method, path, "GET, HEAD")
                body = self.metrics.exposition()
                content_type = self.metrics.content_type.encode()
            else:
                raise HTTPProblem(404, "not_found", f"no route {path}")
        except HTTPProblem as problem:
            request.problem = problem
            status, body, content_type = problem.status, problem.body(), _JSON
            request.headers += [
                (key.lower().encode(), value.encode()) for key, value in problem.headers.items()
            ]
        except _Disconnected:
            request.problem = HTTPProblem(
                499, "client_closed_request", "the client closed the connection before sending the whole body"
            )
            self._finish(request, 499, None)  # nginx's "client closed request": nobody gets this
            return
        except Exception as exc:
            error = exc
            request.problem = HTTPProblem(500, "internal_error", f"{type(exc).__name__}: {exc}")
            status, content_type = 500, _JSON
            body = HTTPProblem(
                500, "internal_error", "the request could not be completed; retry later"
            ).body()
        origin = headers.get("origin")
        response_headers = [
            *([(b"content-type", content_type)] if content_type else []),
            (b"content-length", str(len(body)).encode()),
            # Any origin may send, as analytics.js does from the customer's site; no cookies are used.
            (b"access-control-allow-origin", origin.encode("latin-1") if origin else b"*"),
            # A page reads only safelisted headers unless told: analytics.js honours Retry-After on a 429.
            (b"access-control-expose-headers", _EXPOSED_HEADERS),
            (b"vary", b"Origin"),
            *request.headers,
        ]
        await send({"type": "http.response.start", "status": status, "headers": response_headers})
        await send({"type": "http.response.body", "body": body})
        self._finish(request, status, error)

    async def _ingest(
        self,
        call: str,
        headers: dict[str, str],
        receive: Receive,
        request: _Request,
        query_key: str | None = None,
    ) -> bytes:
        writer = self.writer
        # Refuse before reading the body when the work could not be taken anyway.
        if self._in_flight >= self.max_in_flight:
            raise self._overloaded(f"{self._in_flight} requests are being read (bound {self.max_in_flight})")
        if writer.pending_messages >= writer.max_pending_messages:
            raise self._overloaded(
                f"{writer.pending_messages} messages are waiting to be written "
                f"(bound {writer.max_pending_messages})"
            )
        self._in_flight += 1
        try:
            return await self._ingest_counted(call, headers, receive, request, query_key)
        except HTTPProblem as problem:
            # A refused body is refused messages: one on a single-message call, each of a batch whose
            # entries were read (too many of them). A body that is not JSON holds an unknown number.
            if problem.status in (400, 413) and request.source is not None and not request.rejected:
                if call in SINGLE_CALLS:
                    request.messages = 1
                request.rejected = request.messages
                self.metrics.count_rejected(request.source.space, request.rejected)
            raise
        finally:
            self._in_flight -= 1

    async def _ingest_counted(
        self,
        call: str,
        headers: dict[str, str],
        receive: Receive,
        request: _Request,
        query_key: str | None,
    ) -> bytes:
        received_at = self.clock()
        # A beacon carries its key in the query string: it can send no Authorization header.
        header_key = basic_user(headers.get("authorization")) or query_key
        if header_key is not None:
            request.source = await self._source(header_key)  # a wrong key is refused before the body
        batch = call in BATCH_CALLS
        try:
            async with asyncio.timeout(self.body_timeout):
                body = await read_body(
                    _chunks(receive),
                    encoding=headers.get("content-encoding", ""),
                    declared_length=_int_or_none(headers.get("content-length")),
                    limit=REQUEST_LIMIT if batch else MESSAGE_LIMIT,
                )
        except TimeoutError:
            # The rest of the body may still come: close the connection rather than read it as a request.
            raise HTTPProblem(
                408,
                "request_timeout",
                f"the request body was not received within {self.body_timeout:g} s",
                {"Connection": "close"},
            ) from None
        if len(body) < 1024 and not body.removeprefix(UTF8_BOM).strip():  # no copy of a large body
            # The JSON decoder's word for it is "Input data was truncated", which reads as a cut connection.
            raise HTTPProblem(400, "invalid_json", "the request body is empty: send a JSON object")
        try:
            raw = decode_document(body)
        except InvalidEvent as error:
            raise HTTPProblem(400, "invalid_json", error.reason) from None
        if not isinstance(raw, dict):
            raise HTTPProblem(400, "invalid_request", "the request body must be a JSON object")
        if request.source is None:
            body_key = raw.get("writeKey")
            if not isinstance(body_key, str) or not body_key:
                raise _unauthorized(
                    "no write key: send HTTP Basic auth with the write key as user name, "
                    "or writeKey in the JSON body"
                    + (" or in the query string (?writeKey=…)" if request.route == BEACON_PATH else "")
                )
            request.source = await self._source(body_key)
        source = request.source
        if not batch:
            request.messages = 1
            raw["type"] = call  # the path says which call this is
            try:
                message = parse_message(raw, received_at=received_at, delivery=self.delivery_tokens())
            except InvalidEvent as error:
                request.rejected = 1
                self.metrics.count_rejected(source.space, 1)
                raise HTTPProblem(400, "invalid_message", str(error)) from None
            outcome = (await self._write([message], source)).outcomes[0]
            if outcome.status == "rejected":
                request.rejected = 1
                raise HTTPProblem(400, "invalid_message", outcome.error or "rejected")
            return _SUCCESS
        try:
            items, _ = parse_batch(raw, received_at=received_at, delivery=self.delivery_tokens())
        except InvalidEvent as error:
            entries = raw.get("batch")
            if isinstance(entries, list):
                request.messages = len(entries)
            too_many = isinstance(entries, list) and len(entries) > MAX_BATCH_MESSAGES
            raise HTTPProblem(400, "batch_too_large" if too_many else "invalid_batch", str(error)) from None
        request.messages = len(items)
        if any(isinstance(item, Message) for item in items):
            outcomes = (await self._write(items, source)).outcomes
        else:
            # Nothing valid to store: no commit needed to answer.
            outcomes = [
                MessageOutcome(index, None, "rejected", error=str(item)) for index, item in enumerate(items)
            ]
            self.metrics.count_outcomes(source.space, outcomes)
        rejected = [
            {
                "index": outcome.index,
                # The id the client sent (not one generated for it): what the client can look up.
                "messageId": _raw_message_id(raw["batch"][outcome.index]),
                "error": outcome.error,
            }
            for outcome in outcomes
            if outcome.status == "rejected"
        ]
        if not rejected:
            return _SUCCESS
        request.rejected = len(rejected)
        request.rejections = rejected[:_LOGGED_REJECTIONS]
        return _encoder.encode({"success": True, "rejected": rejected})

    async def _source(self, write_key: str) -> Source:
        source = await self.write_keys.resolve(write_key)
        if source is None:
            raise _unauthorized("unknown write key")
        return source

    async def _write(self, items: list[Message | InvalidEvent], source: Source) -> IngestResult:
        try:
            future = self.writer.submit(items, space=source.space, source=source.name)
            # shield: a request whose client went away keeps its messages; once a body is accepted it is
            # written and counted whether or not anyone waits for the answer.
            result = await asyncio.shield(asyncio.wrap_future(future))
        except WriterBusy as busy:
            # A full backlog, or in queue mode JetStream unreachable or refusing: the client retries later.
            self.metrics.count_refused_busy(source.space, len(items))
            raise self._overloaded(str(busy)) from None
        except WriterClosed:
            raise HTTPProblem(
                503,
                "shutting_down",
                "the server is shutting down; retry",
                {"Retry-After": str(self.retry_after)},
            ) from None
        except RequestTooLarge as too_large:
            # Queue mode: one message is over what the stream may hold (an operator's max_msg_size under
            # 32 KB). A 500 would have the client retry it for ever; a 400 is not retried.
            raise HTTPProblem(400, "message_too_large", str(too_large)) from None
        except StoreWriteFailed as failed:
            # Nothing of the request was stored: the client sends it again once space is freed (or the
            # disk mended), and the server takes it without a restart. The operator's log names the store.
            raise HTTPProblem(
                503,
                "store_full" if isinstance(failed, StoreFull) else "store_write_failed",
                f"{failed.what}; retry later",
                {"Retry-After": str(self.retry_after)},
                detail=str(failed),
            ) from None
        except StoreUnavailable as unavailable:
            # PostgreSQL down or restarting: answered at once, for the client to retry once it is back.
            raise HTTPProblem(
                503,
                "store_unavailable",
                "the store cannot be reached; retry later",
                {"Retry-After": str(self.retry_after)},
                detail=f"{unavailable}; retry later",  # names the server and libpq's reason: the log's
            ) from None
        except StoreConflict as conflict:
            # The engine ran it again until its bound (another process holds a SQLite store's write lock,
            # say): the client retries later (messageId de-duplication stores nothing twice). A busy
            # store, not a fault of the server's.
            raise HTTPProblem(
                503,
                "store_busy",
                "the store is busy; retry later",
                {"Retry-After": str(self.retry_after)},
                detail=f"{conflict}; retry later",  # names the store's file or the database's error
            ) from None
        self.metrics.count_outcomes(source.space, result.outcomes)
        return result

    def _overloaded(self, reason: str) -> HTTPProblem:
        wait = str(self.retry_after)
        # Both headers, as Segment sends them: clients read one or the other.
        return HTTPProblem(
            429,
            "overloaded",
            f"overloaded: {reason}; retry later",
            {"Retry-After": wait, "X-RateLimit-Reset": wait},
        )

    def _finish(self, request: _Request, status: int, error: BaseException | None) -> None:
        seconds = time.perf_counter() - request.started
        self.metrics.observe_request(request.route, status, seconds)
        level = logging.ERROR if status >= 500 else logging.INFO
        if not self._log.isEnabledFor(level):
            return
        fields: dict[str, Any] = {
            "method": request.method,
            "path": request.path,
            "status": status,
            "messages": request.messages,
            "duration_ms": round(seconds * 1000, 3),
        }
        if request.source is not None:
            fields["space"] = request.source.space
            fields["source"] = request.source.name
        if request.rejected:
            fields["rejected"] = request.rejected
        if request.rejections:
            fields["rejections"] = request.rejections
        if request.problem is not None:
            fields["error"] = request.problem.code
            fields["reason"] = request.problem.reason
        exc_info = (type(error), error, error.__traceback__) if error is not None else None
        self._log.log(level, "request", extra=fields, exc_info=exc_info)


def _call_of(path: str) -> str | None:
    """The call a /v1/ path names (`batch`, `track`, ...; `b`, `t`, ... too), None for any other path."""
    if not path.startswith("/v1/"):
        return None
    call = path[4:].rstrip("/")
    call = SHORT_CALLS.get(call, call)
    return call if call in SINGLE_CALLS or call in BATCH_CALLS else None


def _query_write_key(scope: Scope) -> str | None:
    """The `writeKey` of the query string (a beacon's), None when there is none or it is empty."""
    query: bytes = scope.get("query_string", b"")
    for name, value in parse_qsl(query.decode("latin-1")):
        if name == "writeKey" and value:
            return value
    return None


def _host_of(scope: Scope, headers: dict[str, str]) -> str:
    """The host (and port) the client reached this server by: its Host header, else the socket's address."""
    host = headers.get("host")
    if host:
        return host
    server = scope.get("server")
    return f"{server[0]}:{server[1]}" if server else "localhost"


def _header_map(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    # ASGI servers give lower-case names; latin-1 maps every byte, so no header can fail to decode.
    return {name.decode("latin-1"): value.decode("latin-1") for name, value in raw}


def _int_or_none(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text)
    except ValueError:
        return None


def _raw_message_id(item: object) -> str | None:
    """The messageId a refused batch element carried, so the client can tell which one it was."""
    if isinstance(item, InvalidEvent):
        return item.message_id  # an element the JSON decoder already refused
    if isinstance(item, dict):
        value = item.get("messageId")
        if isinstance(value, int) and not isinstance(value, bool):
            value = str(value)  # core accepts numeric ids as their decimal text
        if isinstance(value, str) and value:
            return value  # even one over the length limit: it is what the client sent
    return None


def _unauthorized(reason: str) -> HTTPProblem:
    return HTTPProblem(401, "unauthorized", reason, {"WWW-Authenticate": 'Basic realm="idstitch"'})


def _not_allowed(method: str, path: str, allowed: str) -> HTTPProblem:
    return HTTPProblem(405, "method_not_allowed", f"{method} is not allowed on {path}", {"Allow": allowed})


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks as the server hands them over."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        if chunk:
            yield chunk
        if not message.get("more_body", False):
            return


async def _lifespan(receive: Receive, send: Send) -> None:
    """Nothing to set up or tear down here: the server owns the writer and closes it after serving."""
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return
