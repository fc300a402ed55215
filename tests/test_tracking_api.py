"""The Tracking API (SPEC §6) in process: httpx against the ASGI app, a real SQLite store and writer.

The last tests start `python -m idstitch serve` as a subprocess and stop it with SIGTERM.
"""

from __future__ import annotations

import base64
import gzip
import json
import logging
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from helpers import RECEIVED, FailsAtCommit, World, open_world
from idstitch.cli import app as cli_app
from idstitch.config import Config
from idstitch.core.errors import ConfigError
from idstitch.core.messages import decimal_string
from idstitch.engine import Engine, IngestBatch, IngestResult
from idstitch.group_commit import GroupCommitWriter
from idstitch.http.auth import basic_user
from idstitch.http.logs import JsonFormatter
from idstitch.http.source_settings import parse_public_url
from idstitch.http.tracking import TrackingAPI
from idstitch.profiles import explain_document
from idstitch.queue.envelope import RequestTooLarge
from idstitch.storage.base import Store, StoreUnavailable
from idstitch.storage.urls import open_store

pytestmark = pytest.mark.anyio

CONFIG = """
[spaces.app.sources.web]
write_key = "wk_test"

[spaces.app.sources.crm]
write_key = "wk_crm"
merge = false

[spaces.app.blocked]
exact = ["void"]

[spaces.other.sources.web]
write_key = "wk_other"
"""
SPACE = "app"
OK = {"success": True}
NO_IDENTIFIER = (
    "message carries no identifier: needs userId, anonymousId, traits.email, "
    "context.externalIds or another configured identifier"
)
SINGLE_CALLS = ("identify", "track", "page", "screen", "group", "alias")
# analytics.js (analytics-next) names each call by its type's first letter, and a batch b.
SHORT_CALLS = {
    "a": "alias",
    "b": "batch",
    "g": "group",
    "i": "identify",
    "p": "page",
    "s": "screen",
    "t": "track",
}


def problem(code: str, message: str) -> dict[str, Any]:
    return {"success": False, "code": code, "message": message, "error": {"code": code, "message": message}}


def basic(key: str) -> str:
    return "Basic " + base64.b64encode(f"{key}:".encode()).decode()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class GatedEngine(Engine):
    """An engine whose commits wait at a gate (open by default), to pile requests up behind one."""

    def __init__(self, store: Store, config: Config) -> None:
        super().__init__(store, config)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail = False

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
        self.entered.set()
        assert self.gate.wait(timeout=30)
        if self.fail:
            raise OSError("disk full")  # what a store failure looks like to the writer
        return super().ingest_group(batches)


@dataclass
class Api:
    """The app over a fresh store, with a client and shortcuts to read what landed."""

    world: World
    engine: GatedEngine
    writer: GroupCommitWriter
    app: TrackingAPI
    client: httpx.AsyncClient

    async def post(
        self,
        path: str,
        body: object = None,
        *,
        key: str | None = "wk_test",
        content: bytes | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        """POST JSON (or raw `content`) with Basic auth for `key`; the status and the decoded body."""
        sent = dict(headers or {})
        if key is not None:
            sent["Authorization"] = basic(key)
        data = content if content is not None else json.dumps(body).encode()
        response = await self.client.post(path, content=data, headers=sent)
        return response.status_code, response.json()

    def event_ids(self, space: str = SPACE) -> list[str]:
        return list(self.world.store.iter_event_ids(space))

    def payload(self, user: str, message_id: str, space: str = SPACE) -> dict[str, Any]:
        events = self.world.space(space).events_of(f"user_id:{user}")
        (event,) = [event for event in events if event.message_id == message_id]
        decoded: dict[str, Any] = json.loads(event.payload)
        return decoded


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[Api]:
    async with open_api(tmp_path, CONFIG) as opened:
        yield opened


@asynccontextmanager
async def open_api(tmp_path: Path, toml: str) -> AsyncIterator[Api]:
    """The app over a fresh store configured by `toml`, closed on leaving."""
    world = open_world(tmp_path, toml)
    engine = GatedEngine(world.store, world.config)
    writer = GroupCommitWriter(engine, max_pending_messages=3000)
    tracking = TrackingAPI(writer, clock=lambda: RECEIVED)
    transport = httpx.ASGITransport(app=tracking)
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://idstitch.test") as client:
            yield Api(world, engine, writer, tracking, client)
    finally:
        engine.gate.set()
        writer.close()
        world.close()


def track(number: int, **fields: Any) -> dict[str, Any]:
    return {
        "type": "track",
        "event": "Viewed",
        "userId": f"u{number}",
        "messageId": f"m{number}",
        "timestamp": "2026-01-05T09:00:00.000Z",
        **fields,
    }


# -- each endpoint ---------------------------------------------------------------------------------


@pytest.mark.parametrize("call", SINGLE_CALLS)
async def test_each_single_message_endpoint_stores_its_message(api: Api, call: str) -> None:
    body = {"userId": "u1", "anonymousId": "a1", "messageId": f"{call}-1"}
    body |= {"track": {"event": "Signed Up"}, "group": {"groupId": "g1"}, "alias": {"previousId": "a0"}}.get(
        call, {}
    )
    assert await api.post(f"/v1/{call}", body) == (200, OK)
    assert api.event_ids() == [f"{call}-1"]
    # The path says which call it is; a message needs no `type` on these endpoints.
    assert api.payload("u1", f"{call}-1")["type"] == call


@pytest.mark.parametrize("path", ["/v1/batch", "/v1/import"])
async def test_batch_and_import_store_every_message(api: Api, path: str) -> None:
    batch = [track(1), {"type": "identify", "userId": "u2", "messageId": "m2", "traits": {"plan": "pro"}}]
    assert await api.post(path, {"batch": batch}) == (200, OK)
    assert api.event_ids() == ["m1", "m2"]
    assert api.world.space(SPACE).traits_of("user_id:u2") == {"plan": "pro"}


@pytest.mark.parametrize(("short", "call"), sorted(SHORT_CALLS.items()))
async def test_analytics_js_short_paths_answer_as_the_long_ones(api: Api, short: str, call: str) -> None:
    # analytics.js in the browser posts to /v1/t, /v1/p, ... and batches to /v1/b.
    if call == "batch":
        assert await api.post(f"/v1/{short}", {"batch": [track(1), track(2)]}) == (200, OK)
        assert api.event_ids() == ["m1", "m2"]
        return
    body = {"userId": "u1", "anonymousId": "a1", "messageId": f"{short}-1"}
    body |= {"track": {"event": "Signed Up"}, "group": {"groupId": "g1"}, "alias": {"previousId": "a0"}}.get(
        call, {}
    )
    assert await api.post(f"/v1/{short}", body) == (200, OK)
    assert api.payload("u1", f"{short}-1")["type"] == call


async def test_rudderstack_beacon_batches_authenticate_by_the_query_string(api: Api) -> None:
    # RudderStack's JavaScript SDK with useBeacon: navigator.sendBeacon sets no header, so the write key
    # is in the query string and the body is text/plain, without writeKey.
    beacon = {"batch": [track(1), track(2)], "sentAt": "2026-01-05T09:00:01.000Z"}
    headers = {"Content-Type": "text/plain;charset=UTF-8"}
    assert await api.post("/beacon/v1/batch?writeKey=wk_other", beacon, key=None, headers=headers) == (
        200,
        OK,
    )
    assert api.event_ids("other") == ["m1", "m2"]
    assert await api.post("/beacon/v1/batch?writeKey=wk_wrong", {"batch": [track(3)]}, key=None) == (
        401,
        problem("unauthorized", "unknown write key"),
    )
    status, body = await api.post("/beacon/v1/batch", {"batch": [track(3)]}, key=None)
    assert status == 401 and "query string (?writeKey=" in body["error"]["message"]
    # Only the beacon path reads the query string: elsewhere a key must come as Basic auth or in the body.
    status, _ = await api.post("/v1/batch?writeKey=wk_test", {"batch": [track(3)]}, key=None)
    assert status == 401
    assert api.event_ids() == []


async def test_an_empty_batch_is_a_success_that_stores_nothing(api: Api) -> None:
    assert await api.post("/v1/batch", {"batch": []}) == (200, OK)
    assert api.event_ids() == []


# -- authentication --------------------------------------------------------------------------------


async def test_basic_auth_and_body_write_key_both_authenticate_and_pick_the_source(api: Api) -> None:
    assert await api.post("/v1/track", track(1), key="wk_test") == (200, OK)
    assert await api.post("/v1/track", {**track(2), "writeKey": "wk_crm"}, key=None) == (200, OK)
    assert await api.post("/v1/batch", {"batch": [track(3)], "writeKey": "wk_other"}, key=None) == (200, OK)
    assert api.event_ids() == ["m1", "m2"]
    assert api.event_ids("other") == ["m3"]
    sources = {
        event.message_id: event.source
        for u in ("u1", "u2")
        for event in api.world.space(SPACE).events_of(f"user_id:{u}")
    }
    assert sources == {"m1": "web", "m2": "crm"}
    # The write key is a secret: it is never stored with the message.
    assert "writeKey" not in api.payload("u2", "m2")


async def test_basic_auth_without_the_colon_is_accepted_as_old_clients_send_it(api: Api) -> None:
    header = "Basic " + base64.b64encode(b"wk_test").decode()
    response = await api.client.post("/v1/track", json=track(1), headers={"Authorization": header})
    assert (response.status_code, response.json()) == (200, OK)


def test_basic_user_parsing() -> None:
    assert basic_user(basic("wk_1")) == "wk_1"
    assert basic_user("basic " + base64.b64encode(b"wk_1:").decode()) == "wk_1"
    assert basic_user("Basic Og==") is None  # an empty key, as analytics-node sends without one
    assert basic_user("Bearer token") is None
    assert basic_user("Basic %%%") is None
    assert basic_user(None) is None


async def test_a_wrong_or_missing_key_is_401_and_nothing_is_stored(api: Api) -> None:
    unknown = problem("unauthorized", "unknown write key")
    missing = problem(
        "unauthorized",
        "no write key: send HTTP Basic auth with the write key as user name, or writeKey in the JSON body",
    )
    assert await api.post("/v1/track", track(1), key="wk_wrong") == (401, unknown)
    assert await api.post("/v1/batch", {"batch": [track(2)], "writeKey": "wk_wrong"}, key=None) == (
        401,
        unknown,
    )
    assert await api.post("/v1/track", track(3), key=None) == (401, missing)
    assert await api.post("/v1/track", track(4), key="") == (401, missing)
    response = await api.client.post("/v1/track", json=track(5))
    assert response.headers["www-authenticate"] == 'Basic realm="idstitch"'
    assert api.event_ids() == [] and api.event_ids("other") == []


# -- untrusted clients -----------------------------------------------------------------------------
# A browser or an app carries its write key in the open, so anyone can send `identify` with another
# person's userId or email. The README's "Untrusted clients" config: the public source may contribute
# anonymous ids only; the backend, whose key stays secret, says who is who.

UNTRUSTED_CONFIG = """
[spaces.app]
email_from_track_properties = true

[spaces.app.sources.web]
write_key = "wk_web"
identifier_types = ["anonymous_id"]

[spaces.app.sources.backend]
write_key = "wk_backend"

[spaces.app.identifiers.phone]
trait_keys = ["phone"]
"""
VICTIM = {"user_id:victim", "anonymous_id:v_anon", "email:victim@x.io", "phone:+15550100"}


def external(id: str, type: str, encoding: str = "none", collection: str = "users") -> dict[str, str]:
    return {"id": id, "type": type, "collection": collection, "encoding": encoding}


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


# Every place identifiers.py reads an identifier from, each naming the victim's; "att" is the attacker's
# own anonymousId. None of them may reach the victim's profile through a source limited to anonymous ids.
FORGERIES: dict[str, tuple[str, dict[str, Any]]] = {
    "userId": ("identify", {"userId": "victim"}),
    "traits.email in another case": ("identify", {"traits": {"email": " VICTIM@x.io"}}),
    "context.traits.email": ("track", {"event": "x", "context": {"traits": {"email": "victim@x.io"}}}),
    "properties.email": ("track", {"event": "x", "properties": {"email": "victim@x.io"}}),
    "a custom trait key": ("identify", {"traits": {"Phone": "+15550100"}}),
    "a custom key in properties": ("track", {"event": "x", "properties": {"phone": "+15550100"}}),
    "externalIds in base64": (
        "track",
        {
            "event": "x",
            "context": {
                "externalIds": [
                    external(b64("victim"), "USER_ID", "base64"),
                    external(b64("victim@x.io"), "Email", "BASE64"),
                    external("+15550100", "phone"),
                ]
            },
        },
    ),
    "alias of the victim's user_id": ("alias", {"userId": "att_uid", "previousId": "victim"}),
    "alias to the victim's user_id": ("alias", {"userId": "victim", "previousId": "att"}),
    "group": (
        "group",
        {"userId": "victim", "groupId": "acme", "context": {"traits": {"email": "victim@x.io"}}},
    ),
    "a device id": ("track", {"event": "x", "context": {"device": {"type": "ios", "id": "dev-v"}}}),
}


@asynccontextmanager
async def victim_and_web(tmp_path: Path) -> AsyncIterator[Api]:
    """UNTRUSTED_CONFIG with a victim the backend identified (anonymous id, user id, email, phone,
    an iPhone) and an attacker who browsed with anonymousId att."""
    async with open_api(tmp_path, UNTRUSTED_CONFIG) as api:
        victim_page = {"anonymousId": "v_anon", "name": "Home"}
        assert await api.post("/v1/page", victim_page, key="wk_web") == (200, OK)
        identify = {
            "userId": "victim",
            "anonymousId": "v_anon",
            "traits": {"email": "victim@x.io", "phone": "+15550100", "address": "1 Secret St"},
            "context": {"device": {"type": "ios", "id": "dev-v"}},
        }
        assert await api.post("/v1/identify", identify, key="wk_backend") == (200, OK)
        assert await api.post("/v1/page", {"anonymousId": "att", "name": "Home"}, key="wk_web") == (200, OK)
        yield api


@pytest.mark.parametrize("path", list(FORGERIES))
async def test_a_source_limited_to_anonymous_ids_lets_no_forged_identifier_through(
    tmp_path: Path, path: str
) -> None:
    call, fields = FORGERIES[path]
    async with victim_and_web(tmp_path) as api:
        space = api.world.space(SPACE)
        assert await api.post(f"/v1/{call}", {"anonymousId": "att", **fields}, key="wk_web") == (200, OK)
        assert space.identifiers_of("user_id:victim") == VICTIM | {"ios.id:dev-v"}
        assert space.identifiers_of("anonymous_id:att") == {"anonymous_id:att"}
        assert space.profile_of("anonymous_id:att") != space.profile_of("user_id:victim")
        assert "address" not in space.traits_of("anonymous_id:att")
        assert space.store.stats(SPACE).merges == 0
        # What was dropped is explained on the attacker's own profile, each with the source's rule.
        document = explain_document(space.store, SPACE, str(space.profile_of("anonymous_id:att")))
        assert document is not None and document["dropped"]
        assert {item["rule"].partition(" may not")[0] for item in document["dropped"]} == {"source web"}


async def test_batch_level_context_obeys_the_source_of_the_request(tmp_path: Path) -> None:
    async with victim_and_web(tmp_path) as api:
        space = api.world.space(SPACE)
        body = {
            "batch": [{"type": "track", "event": "b", "anonymousId": "att"}],
            "context": {"traits": {"email": "victim@x.io"}, "externalIds": [external("victim", "user_id")]},
        }
        assert await api.post("/v1/batch", body, key="wk_web") == (200, OK)
        assert space.identifiers_of("anonymous_id:att") == {"anonymous_id:att"}
        assert space.identifiers_of("user_id:victim") == VICTIM | {"ios.id:dev-v"}


async def test_basic_auth_names_the_source_whatever_write_key_the_body_names(tmp_path: Path) -> None:
    # A client holding the public key cannot borrow the backend's policy by naming its key in the body.
    async with victim_and_web(tmp_path) as api:
        space = api.world.space(SPACE)
        forged = {"userId": "victim", "anonymousId": "att", "writeKey": "wk_backend"}
        assert await api.post("/v1/identify", forged, key="wk_web") == (200, OK)
        batch = {"batch": [{**forged, "type": "identify"}], "writeKey": "wk_backend"}
        assert await api.post("/v1/batch", batch, key="wk_web") == (200, OK)
        assert space.identifiers_of("anonymous_id:att") == {"anonymous_id:att"}
        assert {event.source for event in space.events_of("anonymous_id:att")} == {"web"}


async def test_a_public_write_key_cannot_grow_the_rules_without_bound(tmp_path: Path) -> None:
    # Each new externalIds type became a rule of the space for good, and learning one rebuilt them all:
    # a client with the page's key could send thousands and stall every writer. Past the cap (100 by
    # default) new types are dropped; a source limited to anonymous ids teaches none at all.
    spam = [
        {
            "type": "track",
            "event": "x",
            "anonymousId": f"s{n}",
            "context": {"externalIds": [external("v", f"t{n}")]},
        }
        for n in range(150)
    ]
    async with open_api(tmp_path, CONFIG) as api:
        assert await api.post("/v1/batch", {"batch": spam}) == (200, OK)
        assert len(api.world.store.learned_types(SPACE)) == 100
        assert api.engine.rules(SPACE).knows("t99") and not api.engine.rules(SPACE).knows("t100")
    async with open_api(tmp_path / "limited", UNTRUSTED_CONFIG) as api:
        assert await api.post("/v1/batch", {"batch": spam}, key="wk_web") == (200, OK)
        assert api.world.store.learned_types(SPACE) == []


async def test_with_an_unrestricted_public_source_a_forged_identify_joins_the_victim(tmp_path: Path) -> None:
    # The threat the README's "Untrusted clients" describes, as it is with the default rules and one
    # source: the attacker's device joins the victim's profile, so whatever reads profiles by the
    # visitor's own anonymousId reads the victim's traits and events. merge = false does not stop it
    # (a fresh anonymousId is a new identifier joining one profile, not a merge of two).
    toml = CONFIG + '\n[spaces.app.sources.public_nomerge]\nwrite_key = "wk_nomerge"\nmerge = false\n'
    async with open_api(tmp_path, toml) as api:
        space = api.world.space(SPACE)
        identify = {"userId": "victim", "anonymousId": "v_anon", "traits": {"address": "1 Secret St"}}
        assert await api.post("/v1/identify", identify) == (200, OK)
        for key, anonymous_id in (("wk_test", "att1"), ("wk_nomerge", "att2")):
            forged = {"userId": "victim", "anonymousId": anonymous_id}
            assert await api.post("/v1/identify", forged, key=key) == (200, OK)
            assert space.profile_of(f"anonymous_id:{anonymous_id}") == space.profile_of("user_id:victim")
            assert space.traits_of(f"anonymous_id:{anonymous_id}")["address"] == "1 Secret St"


# -- invalid requests ------------------------------------------------------------------------------


async def test_invalid_or_empty_json_is_400(api: Api) -> None:
    assert await api.post("/v1/batch", content=b'{"batch": [') == (
        400,
        problem("invalid_json", "invalid JSON: Input data was truncated"),
    )
    assert await api.post("/v1/track", content=b"[1, 2]") == (
        400,
        problem("invalid_request", "the request body must be a JSON object"),
    )
    # No body at all (`curl -X POST` without -d) is named as such, not as JSON "truncated" in transit.
    for empty in (b"", b" \r\n", b"\xef\xbb\xbf", gzip.compress(b"")):
        encoding = {"Content-Encoding": "gzip"} if empty.startswith(b"\x1f\x8b") else {}
        assert await api.post("/v1/track", content=empty, headers=encoding) == (
            400,
            problem("invalid_json", "the request body is empty: send a JSON object"),
        )
    assert api.event_ids() == []  # nothing of a refused body is stored
    # and the next good request lands as usual
    assert await api.post("/v1/track", track(1)) == (200, OK)
    assert api.event_ids() == ["m1"]


async def test_an_invalid_single_message_is_400_with_the_reason(api: Api) -> None:
    assert await api.post("/v1/track", {"userId": "u1"}) == (
        400,
        problem("invalid_message", "event: required for track"),
    )
    # Rejected by the engine after parsing: no identifier at all.
    assert await api.post("/v1/track", {"event": "E", "messageId": "m1"}) == (
        400,
        problem("invalid_message", NO_IDENTIFIER),
    )
    assert api.event_ids() == []


async def test_an_invalid_batch_envelope_is_400(api: Api) -> None:
    assert await api.post("/v1/batch", {"batch": {"a": 1}}) == (
        400,
        problem("invalid_batch", "batch: must be a list, got object"),
    )
    assert await api.post("/v1/batch", {"messages": []}) == (400, problem("invalid_batch", "batch: required"))


async def test_a_batch_with_invalid_messages_rejects_them_by_index_and_stores_the_rest(api: Api) -> None:
    batch = [
        track(1),
        {"type": "track", "userId": "u2", "messageId": "bad-1"},  # no event
        track(3),
        "not an object",
        {"type": "bogus", "userId": "u5"},
        {"type": "track", "event": "E", "messageId": "bad-5"},  # no identifier: the engine refuses it
        track(6),
    ]
    status, body = await api.post("/v1/batch", {"batch": batch})
    assert (status, body) == (
        200,
        {
            "success": True,
            "rejected": [
                {"index": 1, "messageId": "bad-1", "error": "event: required for track"},
                {"index": 3, "messageId": None, "error": "message must be a JSON object"},
                {
                    "index": 4,
                    "messageId": None,
                    "error": "type: must be one of alias, group, identify, page, screen, track",
                },
                {"index": 5, "messageId": "bad-5", "error": NO_IDENTIFIER},
            ],
        },
    )
    assert api.event_ids() == ["m1", "m3", "m6"]


async def test_a_string_cut_mid_emoji_is_kept_and_an_unholdable_element_is_rejected_alone(api: Api) -> None:
    # JavaScript's JSON.stringify of a string cut mid-emoji writes a lone UTF-16 surrogate: msgspec
    # refuses the whole body for it; the message lands with U+FFFD for the half character. An integer
    # past Python's digit limit rejects only its own element, named by its messageId.
    body = (
        '{"batch": [' + json.dumps(track(1)) + ","
        '{"type": "identify", "userId": "u2", "messageId": "m2", "traits": {"cut": "ok \\ud83d"}},'
        + json.dumps(track(3))
        + ',{"type": "track", "event": "E", "userId": "u4", "messageId": "m4", "n": '
        + "9" * 5000
        + "}]}"
    )
    status, answer = await api.post("/v1/batch", content=body.encode())
    assert (status, answer) == (
        200,
        {
            "success": True,
            "rejected": [
                {
                    "index": 3,
                    "messageId": "m4",
                    "error": "invalid JSON: an integer of 5000 digits is out of range",
                }
            ],
        },
    )
    assert api.event_ids() == ["m1", "m2", "m3"]
    assert api.world.space(SPACE).traits_of("user_id:u2") == {"cut": "ok \ufffd"}
    # The single-message routes read it the same way.
    single = '{"userId": "u5", "event": "E", "messageId": "m5", "properties": {"c": "\\ud83dx"}}'
    assert await api.post("/v1/track", content=single.encode()) == (200, OK)
    assert "m5" in api.event_ids()
    # In the envelope it concerns every element: the whole request is refused.
    bad_context = '{"context": {"n": NaN}, "batch": [' + json.dumps(track(6)) + "]}"
    status, answer = await api.post("/v1/batch", content=bad_context.encode())
    assert status == 400 and answer["code"] == "invalid_json"
    # Nested past the decoder's depth: a 400 with the reason, not a 500.
    deep = '{"userId": "u7", "event": "E", "p": ' + "[" * 1000 + "]" * 1000 + "}"
    status, answer = await api.post("/v1/track", content=deep.encode())
    assert status == 400 and "nested deeper" in answer["message"]
    # In a batch, that element alone: the others land.
    batch = '{"batch": [' + json.dumps(track(8)) + "," + deep + "]}"
    status, answer = await api.post("/v1/batch", content=batch.encode())
    assert status == 200 and [item["index"] for item in answer["rejected"]] == [1], answer
    assert "nested deeper" in answer["rejected"][0]["error"] and "m8" in api.event_ids()


async def test_a_rejected_message_is_named_by_the_id_it_was_sent_with_and_logged_with_its_reason(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    long_id = "x" * 150
    caplog.set_level(logging.INFO, logger="idstitch")
    status, answer = await api.post("/v1/batch", {"batch": [track(1), {**track(2), "messageId": long_id}]})
    assert (status, answer["rejected"]) == (
        200,
        [{"index": 1, "messageId": long_id, "error": "messageId: longer than 100 characters"}],
    )
    (line,) = [record for record in caplog.records if getattr(record, "path", None) == "/v1/batch"]
    assert line.rejections == [
        {"index": 1, "messageId": long_id, "error": "messageId: longer than 100 characters"}
    ]


async def test_messages_without_a_message_id_are_each_stored_however_alike(api: Api) -> None:
    twin = {"type": "track", "event": "Click", "userId": "twin"}
    assert await api.post("/v1/batch", {"batch": [twin, twin, twin]}) == (200, OK)
    assert await api.post("/v1/batch", {"batch": [twin], "sentAt": "2026-01-01T00:00:00Z"}) == (200, OK)
    assert await api.post("/v1/batch", {"batch": [twin], "sentAt": "2026-01-01T00:00:00Z"}) == (200, OK)
    assert await api.post("/v1/track", twin) == (200, OK)
    assert await api.post("/v1/track", twin) == (200, OK)
    assert api.world.space(SPACE).event_count_of("user_id:twin") == 7


async def test_received_at_is_the_servers_whatever_the_client_sends(api: Api) -> None:
    sent = {
        **track(1),
        "receivedAt": "2001-01-01T00:00:00.000Z",
        "timestamp": None,
        "sentAt": "2026-01-01T00:00:30.000Z",
        "originalTimestamp": "2026-01-01T00:00:00.000Z",
    }
    assert await api.post("/v1/track", sent) == (200, OK)
    payload = api.payload("u1", "m1")
    assert payload["receivedAt"] == "2027-06-01T00:00:00.000Z"
    assert payload["timestamp"] == "2027-05-31T23:59:30.000Z"  # corrected from the server's clock


async def test_a_bad_sent_at_fails_only_what_it_would_correct(api: Api) -> None:
    needs = {"timestamp": None, "originalTimestamp": "2026-01-01T00:00:00.000Z"}
    body = {"sentAt": "garbage", "batch": [track(1), track(2, **needs), track(3, sentAt="also garbage")]}
    status, answer = await api.post("/v1/batch", body)
    assert (status, answer) == (
        200,
        {
            "success": True,
            "rejected": [{"index": 1, "messageId": "m2", "error": "sentAt: not an ISO-8601 timestamp"}],
        },
    )
    assert api.event_ids() == ["m1", "m3"]


async def test_a_body_starting_with_a_utf8_bom_is_read(api: Api) -> None:
    assert await api.post("/v1/track", content=b"\xef\xbb\xbf" + json.dumps(track(1)).encode()) == (200, OK)
    assert api.event_ids() == ["m1"]


async def test_a_batch_of_only_invalid_messages_rejects_them_all(api: Api) -> None:
    assert await api.post("/v1/batch", {"batch": [{"type": "track", "userId": "u1"}]}) == (
        200,
        {
            "success": True,
            "rejected": [{"index": 0, "messageId": None, "error": "event: required for track"}],
        },
    )
    assert api.writer.commits == 0  # nothing to write, nothing committed


# -- limits ----------------------------------------------------------------------------------------


async def test_a_message_over_32_kb_is_refused(api: Api) -> None:
    big = track(1, properties={"blob": "x" * (32 * 1024)})
    assert await api.post("/v1/track", big) == (
        400,
        problem("message_too_large", "message is over the 32 KB per-message limit"),
    )
    status, body = await api.post("/v1/batch", {"batch": [track(2), big]})
    size = len(json.dumps(big, separators=(",", ":")))
    assert (status, body) == (
        200,
        {
            "success": True,
            "rejected": [
                {
                    "index": 1,
                    "messageId": "m1",
                    "error": f"message is {size} bytes, over the 32 KB per-message limit",
                }
            ],
        },
    )
    assert api.event_ids() == ["m2"]


def oversized_batch() -> bytes:
    # Twenty messages of 30 KB each: every message is within its limit, the request is not.
    batch = [track(n, properties={"blob": "y" * (30 * 1024)}) for n in range(20)]
    data = json.dumps({"batch": batch}).encode()
    assert len(data) > 500 * 1024
    return data


async def test_a_body_over_500_kb_is_413_declared_streamed_or_decompressed(api: Api) -> None:
    data = oversized_batch()
    too_large = problem("request_too_large", "request body is over the 500 KB per-request limit")
    # Declared by Content-Length: refused before reading.
    assert await api.post("/v1/batch", content=data) == (413, too_large)

    # Streamed without a length: refused at the chunk that crosses the limit.
    async def chunks() -> AsyncIterator[bytes]:
        for start in range(0, len(data), 64 * 1024):
            yield data[start : start + 64 * 1024]

    response = await api.client.post(
        "/v1/batch", content=chunks(), headers={"Authorization": basic("wk_test")}
    )
    assert "content-length" not in response.request.headers
    assert (response.status_code, response.json()) == (413, too_large)

    # Small on the wire, too large once inflated.
    packed = gzip.compress(data)
    assert len(packed) < 500 * 1024
    assert await api.post("/v1/batch", content=packed, headers={"Content-Encoding": "gzip"}) == (
        413,
        problem("request_too_large", "decompressed request body is over the 500 KB per-request limit"),
    )
    # Too large even compressed.
    noise = gzip.compress(random.Random(1).randbytes(600 * 1024))
    assert await api.post("/v1/batch", content=noise, headers={"Content-Encoding": "gzip"}) == (
        413,
        problem("request_too_large", "compressed request body is over the 500 KB per-request limit"),
    )
    assert api.event_ids() == []


async def test_a_batch_of_2501_messages_is_refused_whole(api: Api) -> None:
    batch = [{"type": "track", "event": "E", "userId": "u"} for _ in range(2501)]
    assert await api.post("/v1/batch", {"batch": batch}) == (
        400,
        problem("batch_too_large", "batch: 2501 messages, over the 2,500 per-batch limit"),
    )
    assert api.event_ids() == []


# -- gzip and content types ------------------------------------------------------------------------


async def test_gzip_bodies_are_accepted_whatever_the_content_type(api: Api) -> None:
    packed = gzip.compress(json.dumps({"batch": [track(1), track(2)]}).encode())
    headers = {"Content-Encoding": "gzip", "Content-Type": "text/plain"}
    assert await api.post("/v1/batch", content=packed, headers=headers) == (200, OK)
    # Two concatenated gzip members are one valid gzip stream.
    double = gzip.compress(b'{"event": "E", ') + gzip.compress(b'"userId": "u3", "messageId": "m3"}')
    assert await api.post("/v1/track", content=double, headers={"Content-Encoding": "gzip"}) == (200, OK)
    assert await api.post("/v1/track", content=json.dumps(track(4)).encode(), headers={}) == (200, OK)
    assert api.event_ids() == ["m1", "m2", "m3", "m4"]


async def test_truncated_or_corrupt_gzip_is_400(api: Api) -> None:
    packed = gzip.compress(json.dumps({"batch": [track(1)]}).encode())
    headers = {"Content-Encoding": "gzip"}
    assert await api.post("/v1/batch", content=packed[:-10], headers=headers) == (
        400,
        problem("invalid_gzip", "gzip body is truncated"),
    )
    assert await api.post("/v1/batch", content=b"not gzip at all", headers=headers) == (
        400,
        problem(
            "invalid_gzip",
            "body is not valid gzip: Error -3 while decompressing data: incorrect header check",
        ),
    )
    assert await api.post("/v1/batch", content=packed, headers={"Content-Encoding": "br"}) == (
        415,
        problem("unsupported_encoding", "Content-Encoding 'br' is not supported (use gzip or none)"),
    )
    assert api.event_ids() == []


# -- what is stored --------------------------------------------------------------------------------


async def test_batch_context_and_integrations_are_merged_into_each_message(api: Api) -> None:
    body = {
        "batch": [
            track(
                1, context={"locale": "fr-FR", "library": {"name": "own"}}, integrations={"Mixpanel": True}
            ),
            track(2),
        ],
        "context": {"library": {"name": "analytics-python", "version": "2.3"}, "ip": "10.0.0.1"},
        "integrations": {"All": False},
    }
    assert await api.post("/v1/batch", body) == (200, OK)
    first = api.payload("u1", "m1")
    assert first["context"] == {
        "library": {"name": "own", "version": "2.3"},
        "ip": "10.0.0.1",
        "locale": "fr-FR",
    }
    assert first["integrations"] == {"All": False, "Mixpanel": True}
    second = api.payload("u2", "m2")
    assert second["context"] == {"library": {"name": "analytics-python", "version": "2.3"}, "ip": "10.0.0.1"}
    assert second["integrations"] == {"All": False}


async def test_a_retried_message_id_is_stored_once(api: Api) -> None:
    body = {"batch": [track(1), track(2)]}
    assert await api.post("/v1/batch", body) == (200, OK)
    assert await api.post("/v1/batch", body) == (200, OK)
    assert await api.post("/v1/track", track(1)) == (200, OK)
    assert api.event_ids() == ["m1", "m2"]
    assert api.world.space(SPACE).event_count_of("user_id:u1") == 1


async def test_clock_skew_is_corrected_from_sent_at_and_original_timestamp(api: Api) -> None:
    # The server's clock says 2027-06-01T00:00:00Z (RECEIVED).
    skewed = {"type": "track", "event": "E", "originalTimestamp": "2026-01-01T00:00:00.000Z"}
    body = {
        "batch": [
            {**skewed, "userId": "u1", "messageId": "m1"},  # the batch's sentAt applies
            {**skewed, "userId": "u2", "messageId": "m2", "sentAt": "2026-01-01T00:00:30.000Z"},
            {**skewed, "userId": "u3", "messageId": "m3", "timestamp": "2025-05-05T05:05:05.000Z"},
            {"type": "track", "event": "E", "userId": "u4", "messageId": "m4"},
        ],
        "sentAt": "2026-01-01T00:10:00.000Z",
    }
    assert await api.post("/v1/batch", body) == (200, OK)
    stamps = {user: api.payload(user, f"m{user[1]}")["timestamp"] for user in ("u1", "u2", "u3", "u4")}
    assert stamps == {
        "u1": "2027-05-31T23:50:00.000Z",  # receivedAt − (sentAt − originalTimestamp)
        "u2": "2027-05-31T23:59:30.000Z",  # the message's own sentAt wins over the batch's
        "u3": "2025-05-05T05:05:05.000Z",  # an explicit timestamp wins
        "u4": "2027-06-01T00:00:00.000Z",  # nothing given: the server's time
    }
    assert {api.payload(user, f"m{user[1]}")["receivedAt"] for user in stamps} == {"2027-06-01T00:00:00.000Z"}


async def test_a_client_clock_ahead_is_corrected_and_a_future_time_cannot_outrank_later_traits(
    api: Api,
) -> None:
    # The server's clock says 2027-06-01T00:00:00Z; this browser's is a day ahead, as Segment's libraries
    # send it: timestamp per call, sentAt per batch, no originalTimestamp.
    ahead = {"type": "identify", "userId": "u1", "traits": {"plan": "free"}, "messageId": "m1"}
    body = {
        "batch": [{**ahead, "timestamp": "2027-06-01T23:59:59.000Z"}],
        "sentAt": "2027-06-02T00:00:00.000Z",
    }
    assert await api.post("/v1/batch", body) == (200, OK)
    payload = api.payload("u1", "m1")
    assert payload["timestamp"] == "2027-05-31T23:59:59.000Z"
    assert payload["originalTimestamp"] == "2027-06-01T23:59:59.000Z"
    # Far in the future and no sentAt: dated on arrival, so a later call's trait still wins.
    future = {**ahead, "messageId": "m2", "traits": {"plan": "team"}, "timestamp": "2999-01-01T00:00:00Z"}
    assert await api.post("/v1/identify", future) == (200, OK)
    assert api.payload("u1", "m2")["timestamp"] == "2027-06-01T00:00:00.000Z"
    assert api.payload("u1", "m2")["originalTimestamp"] == "2999-01-01T00:00:00Z"
    assert await api.post("/v1/identify", {**ahead, "messageId": "m3", "traits": {"plan": "pro"}}) == (
        200,
        OK,
    )
    assert api.world.space(SPACE).traits_of("user_id:u1")["plan"] == "pro"


# -- CORS, routing ---------------------------------------------------------------------------------


async def test_cors_preflight_and_headers_let_a_browser_on_another_origin_send(api: Api) -> None:
    preflight = await api.client.options(
        "/v1/batch",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, authorization",
        },
    )
    assert preflight.status_code == 204
    assert preflight.content == b""
    assert {key: preflight.headers[key] for key in preflight.headers if key.startswith("access-control")} == {
        "access-control-allow-origin": "https://shop.example",
        "access-control-allow-methods": "POST, OPTIONS",
        "access-control-allow-headers": "content-type, authorization",
        "access-control-max-age": "86400",
        "access-control-expose-headers": "Retry-After, X-RateLimit-Reset",
    }
    # Whatever a client library adds is allowed (RudderStack sends an AnonymousId header).
    extra = await api.client.options(
        "/v1/batch",
        headers={
            "Origin": "https://shop.example",
            "Access-Control-Request-Headers": "content-type,anonymousid",
        },
    )
    assert extra.headers["access-control-allow-headers"] == "content-type,anonymousid"
    bare = await api.client.options("/v1/batch", headers={"Origin": "https://shop.example"})
    assert bare.headers["access-control-allow-headers"] == "Authorization, Content-Type, Content-Encoding"
    response = await api.client.post(
        "/v1/track", json={**track(1), "writeKey": "wk_test"}, headers={"Origin": "https://shop.example"}
    )
    assert (response.status_code, response.json()) == (200, OK)
    assert response.headers["access-control-allow-origin"] == "https://shop.example"
    refused = await api.client.post("/v1/track", json=track(2), headers={"Origin": "https://shop.example"})
    assert refused.status_code == 401
    assert refused.headers["access-control-allow-origin"] == "https://shop.example"  # readable by the page
    plain = await api.client.post("/v1/track", json=track(3), headers={"Authorization": basic("wk_test")})
    assert plain.headers["access-control-allow-origin"] == "*"


async def test_a_sources_settings_point_segments_libraries_back_at_idstitch(api: Api) -> None:
    # analytics.js reads {cdnURL}/v1/projects/{writeKey}/settings before it sends anything, and the
    # mobile libraries read the same path under their cdnHost: served here, only the host changes.
    response = await api.client.get(
        "/v1/projects/wk_test/settings",
        headers={"Host": "events.shop.example:8443", "Origin": "https://shop.example"},
    )
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] == "https://shop.example"
    settings = response.json()
    assert settings["integrations"] == {
        "Segment.io": {
            "apiKey": "wk_test",
            "apiHost": "events.shop.example:8443/v1",
            "protocol": "http",  # the scheme the request came by
            "addBundledMetadata": False,
            "unbundledIntegrations": [],
        }
    }
    # nothing that would make analytics.js load more code: no tracking plan, routing rules or videos
    assert settings["plan"] == {} and settings["middlewareSettings"] == {} and settings["remotePlugins"] == []
    assert "legacyVideoPluginsEnabled" not in settings
    over_tls = await api.client.get("https://events.shop.example/v1/projects/wk_test/settings")
    assert over_tls.json()["integrations"]["Segment.io"]["protocol"] == "https"
    unknown = await api.client.get("/v1/projects/wk_nope/settings")
    assert (unknown.status_code, unknown.json()) == (404, problem("not_found", "unknown write key"))
    assert "www-authenticate" not in unknown.headers  # a challenge could make a browser prompt its user
    posted = await api.client.post("/v1/projects/wk_test/settings", json={})
    assert (posted.status_code, posted.headers["allow"]) == (405, "GET, HEAD")
    assert (await api.client.get("/v1/projects/wk_test/other")).status_code == 404


async def test_the_request_log_of_a_settings_fetch_names_the_source_not_its_write_key(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    # Logs travel further than the write keys should (log shippers, support tickets): the key in the
    # settings path stays out of them; the source it names is logged instead.
    caplog.set_level("INFO", logger="idstitch.http")
    assert (await api.client.get("/v1/projects/wk_test/settings")).status_code == 200
    assert (await api.client.post("/v1/projects/wk_test/settings", json={})).status_code == 405
    assert (await api.client.get("/v1/projects/wk_nope/settings")).status_code == 404
    records = [record for record in caplog.records if record.name == "idstitch.http"]
    assert [record.path for record in records] == ["/v1/projects/{writeKey}/settings"] * 3
    assert (records[0].space, records[0].source) == ("app", "web")
    logged = "".join(JsonFormatter().format(record) for record in records)
    assert "wk_test" not in logged and "wk_nope" not in logged


async def test_behind_a_proxy_the_settings_name_the_public_url_not_the_host_header(api: Api) -> None:
    # nginx sends its upstream's address as Host by default: analytics.js would post to it and lose all.
    api.app.public_address = parse_public_url("https://events.shop.example/collect/")
    response = await api.client.get("/v1/projects/wk_test/settings", headers={"Host": "127.0.0.1:8000"})
    segment_io = response.json()["integrations"]["Segment.io"]
    assert (segment_io["apiHost"], segment_io["protocol"]) == ("events.shop.example/collect/v1", "https")
    for bad in (
        "events.shop.example",
        "ftp://x.example",
        "https://",
        "https://x.example/?a=1",
        "https://u@x.example",
    ):
        with pytest.raises(ConfigError, match="public URL"):
            parse_public_url(bad)


async def test_unknown_routes_and_methods(api: Api) -> None:
    response = await api.client.get("/v1/track")
    assert (response.status_code, response.json()) == (
        405,
        problem("method_not_allowed", "GET is not allowed on /v1/track"),
    )
    assert response.headers["allow"] == "POST, OPTIONS"
    response = await api.client.post("/v1/identity", json={})
    assert (response.status_code, response.json()) == (404, problem("not_found", "no route /v1/identity"))
    response = await api.client.post("/v1/x", json={})  # one letter, but no call's
    assert (response.status_code, response.json()) == (404, problem("not_found", "no route /v1/x"))
    assert await api.post("/v1/track/", track(1)) == (200, OK)  # a trailing slash is tolerated


async def test_healthz(api: Api) -> None:
    response = await api.client.get("/healthz")
    assert (response.status_code, response.json()) == (200, {"status": "ok"})
    assert response.headers["content-type"] == "application/json"
    assert (await api.client.head("/healthz")).status_code == 200
    response = await api.client.post("/healthz")
    assert (response.status_code, response.json()) == (
        405,
        problem("method_not_allowed", "POST is not allowed on /healthz"),
    )


# -- overload --------------------------------------------------------------------------------------


async def test_a_full_writer_backlog_is_429_with_retry_after_and_nothing_accepted_is_lost(
    tmp_path: Path,
) -> None:
    world = open_world(tmp_path, CONFIG)
    engine = GatedEngine(world.store, world.config)
    engine.gate.clear()
    writer = GroupCommitWriter(engine, max_pending_messages=3)
    app = TrackingAPI(writer, clock=lambda: RECEIVED)
    headers = {"Authorization": basic("wk_test")}
    transport = httpx.ASGITransport(app=app)
    answers: dict[str, tuple[int, Any]] = {}
    try:
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            async def post(name: str, path: str, body: object) -> None:
                response = await client.post(path, json=body, headers=headers)
                answers[name] = (response.status_code, response.json())
                if name in ("over the bound", "at the bound"):
                    assert response.headers["retry-after"] == "1"
                    assert response.headers["x-ratelimit-reset"] == "1"  # as Segment sends it
                    # readable by a page on another origin, where analytics.js looks for Retry-After
                    exposed = response.headers["access-control-expose-headers"]
                    assert exposed == "Retry-After, X-RateLimit-Reset"

            async with anyio.create_task_group() as group:
                group.start_soon(post, "first", "/v1/batch", {"batch": [track(1), track(2)]})
                # The writer holds the first request's two messages at the gate.
                assert await anyio.to_thread.run_sync(lambda: engine.entered.wait(10))
                # 2 waiting + 2 more > 3: the writer refuses.
                await post("over the bound", "/v1/batch", {"batch": [track(3), track(4)]})
                # 2 + 1 fits: accepted, it waits its turn.
                group.start_soon(post, "fits", "/v1/track", track(5))
                while writer.pending_messages < 3:
                    await anyio.sleep(0.001)
                # The backlog is full: refused before the body is even read.
                await post("at the bound", "/v1/track", track(6))
                engine.gate.set()
    finally:
        engine.gate.set()
        writer.close()
    assert answers == {
        "first": (200, OK),
        "over the bound": (
            429,
            problem("overloaded", "overloaded: 2 messages are waiting to be written (bound 3); retry later"),
        ),
        "fits": (200, OK),
        "at the bound": (
            429,
            problem("overloaded", "overloaded: 3 messages are waiting to be written (bound 3); retry later"),
        ),
    }
    assert list(world.store.iter_event_ids(SPACE)) == ["m1", "m2", "m5"]
    # the two messages refused after their body was read are counted as such; the one refused before is not
    refused = app.metrics.registry.get_sample_value("idstitch_messages_refused_busy_total", {"space": SPACE})
    assert refused == 2.0
    world.close()


class TooLargeForTheStream(GroupCommitWriter):
    """Queue mode with a stream whose max_msg_size is under 32 KB: the publisher refuses the message."""

    def submit(self, items: Any, *, space: str, source: str | None = None) -> Future[IngestResult]:
        future: Future[IngestResult] = Future()
        future.set_exception(RequestTooLarge("message m1 is 900 bytes normalised, over the 800 bytes …"))
        return future


async def test_a_message_too_large_for_the_queue_is_400_not_a_500_retried_for_ever(tmp_path: Path) -> None:
    world = open_world(tmp_path, CONFIG)
    writer = TooLargeForTheStream(world.engine)
    app = TrackingAPI(writer, clock=lambda: RECEIVED)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            response = await client.post(
                "/v1/track", json=track(1), headers={"Authorization": basic("wk_test")}
            )
        assert (response.status_code, response.json()) == (
            400,
            problem("message_too_large", "message m1 is 900 bytes normalised, over the 800 bytes …"),
        )
        rejected = app.metrics.registry.get_sample_value("idstitch_messages_rejected_total", {"space": SPACE})
        assert rejected == 1.0
    finally:
        writer.close()
        world.close()


async def test_too_many_open_requests_is_429_before_reading_the_body(api: Api) -> None:
    api.app.max_in_flight = 0
    assert await api.post("/v1/track", track(1)) == (
        429,
        problem("overloaded", "overloaded: 0 requests are being read (bound 0); retry later"),
    )
    assert api.event_ids() == []


async def test_a_store_failure_is_500_so_clients_retry_and_is_logged_with_its_reason(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="idstitch.http")
    api.engine.fail = True
    assert await api.post("/v1/batch", {"batch": [track(1)]}) == (
        500,
        problem("internal_error", "the request could not be completed; retry later"),
    )
    (record,) = [record for record in caplog.records if record.name == "idstitch.http"]
    assert (record.levelname, getattr(record, "error", None), getattr(record, "reason", None)) == (
        "ERROR",
        "internal_error",
        "OSError: disk full",
    )
    assert record.exc_info is not None
    api.engine.fail = False
    assert await api.post("/v1/batch", {"batch": [track(1)]}) == (200, OK)  # the retry lands
    assert api.event_ids() == ["m1"]


async def test_healthz_is_503_while_commits_fail_and_ok_once_one_lands_or_a_while_has_passed(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full disk: before, /healthz said ok while every request was answered 500, so a load balancer
    kept sending this server all its traffic."""
    api.engine.fail = True
    assert (await api.post("/v1/batch", {"batch": [track(1)]}))[0] == 500
    response = await api.client.get("/healthz")
    assert (response.status_code, response.json()) == (
        503,
        {
            "status": "unavailable",
            "reason": "the last commit failed: OSError; the server's log has the detail",
        },
    )
    api.engine.fail = False
    assert await api.post("/v1/batch", {"batch": [track(1)]}) == (200, OK)
    assert (await api.client.get("/healthz")).status_code == 200
    # Taken out of the load balancer, it gets nothing to commit: the failure is forgotten after a while.
    api.engine.fail = True
    assert (await api.post("/v1/batch", {"batch": [track(2)]}))[0] == 500
    assert (await api.client.get("/healthz")).status_code == 503
    monkeypatch.setattr("idstitch.group_commit._FAILURE_SECONDS", 0.0)
    assert (await api.client.get("/healthz")).status_code == 200


async def test_a_store_another_process_keeps_locked_is_503_with_retry_after_then_lands(
    api: Api, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`idstitch ingest --batch-size 100000` into serve's SQLite file holds the write lock past the busy
    timeout and the engine's retries. Before: 500 internal_error, logged with a traceback. The store's
    file (or a PostgreSQL error, with its hosts and relations) is the operator's to read in the log, not
    any client's: before, the answer named the file."""
    caplog.set_level("INFO", logger="idstitch.http")
    monkeypatch.setattr("idstitch.engine._CONFLICT_RETRY_SECONDS", 0.2)
    api.world.store._writer.execute("PRAGMA busy_timeout = 50")  # type: ignore[attr-defined]
    other = sqlite3.connect(tmp_path / "idstitch.db", isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        response = await api.client.post(
            "/v1/batch",
            content=json.dumps({"batch": [track(1)]}).encode(),
            headers={"Authorization": basic("wk_test")},
        )
        assert response.status_code == 503
        assert response.headers["retry-after"] == "1"
        assert response.json() == problem("store_busy", "the store is busy; retry later")
        (record,) = [record for record in caplog.records if record.name == "idstitch.http"]
        assert f"store sqlite:///{tmp_path}/idstitch.db is locked: another process" in record.reason
        other.execute("COMMIT")
    finally:
        other.close()
    assert await api.post("/v1/batch", {"batch": [track(1)]}) == (200, OK)  # the retry lands


async def test_a_full_disk_is_503_store_full_with_retry_after_and_healthz_says_so_then_lands(
    api: Api, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The SQLite store's disk fills up. Before: 500 internal_error, logged with a traceback as if
    idstitch had a bug, on every request, and /healthz said only `OperationalError`."""
    caplog.set_level("INFO", logger="idstitch.http")
    writer = api.world.store._writer  # type: ignore[attr-defined]
    (pages,) = writer.execute("PRAGMA page_count").fetchone()
    writer.execute(f"PRAGMA max_page_count = {pages}")  # the file may not grow: the disk is full
    batch = {"batch": [track(number, properties={"note": "x" * 2000}) for number in range(20)]}
    response = await api.client.post(
        "/v1/batch", content=json.dumps(batch).encode(), headers={"Authorization": basic("wk_test")}
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == problem("store_full", "the store's disk is full; retry later")
    (record,) = [record for record in caplog.records if record.name == "idstitch.http"]
    assert (
        record.reason
        == f"store sqlite:///{tmp_path}/idstitch.db: the disk is full (database or disk is full)"
    )
    assert record.exc_info is None  # no traceback: it is no bug of idstitch's
    response = await api.client.get("/healthz")
    assert (response.status_code, response.json()) == (
        503,
        {"status": "unavailable", "reason": "the last commit failed: the store's disk is full"},
    )
    assert api.event_ids() == []
    writer.execute("PRAGMA max_page_count = 1073741823")  # space freed: no restart needed
    assert await api.post("/v1/batch", batch) == (200, OK)
    assert api.event_ids() == [f"m{number}" for number in range(20)]
    assert (await api.client.get("/healthz")).status_code == 200


async def test_a_store_whose_writes_fail_is_503_with_retry_after_and_healthz_says_so_then_lands(
    api: Api, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Writes fail without the disk being full: a quota (EDQUOT) or a file size limit (EFBIG), which
    SQLite reports as `disk I/O error`. Before: 500 internal_error with a traceback on every request."""
    caplog.set_level("INFO", logger="idstitch.http")
    store = api.world.store
    writer = store._writer  # type: ignore[attr-defined]
    store._writer = FailsAtCommit(writer, sqlite3.SQLITE_IOERR_WRITE, "disk I/O error")  # type: ignore[attr-defined]
    response = await api.client.post(
        "/v1/batch",
        content=json.dumps({"batch": [track(1)]}).encode(),
        headers={"Authorization": basic("wk_test")},
    )
    assert response.status_code == 503
    assert response.headers["retry-after"] == "1"
    assert response.json() == problem(
        "store_write_failed", "the store could not write to its disk; retry later"
    )
    (record,) = [record for record in caplog.records if record.name == "idstitch.http"]
    assert record.reason == (
        f"store sqlite:///{tmp_path}/idstitch.db: its files could not be written (disk I/O error): "
        "a full quota, a file size limit or a failing disk"
    )
    assert record.exc_info is None
    response = await api.client.get("/healthz")
    assert (response.status_code, response.json()) == (
        503,
        {"status": "unavailable", "reason": "the last commit failed: the store could not write to its disk"},
    )
    store._writer = writer  # type: ignore[attr-defined]
    assert await api.post("/v1/batch", {"batch": [track(1)]}) == (200, OK)
    assert api.event_ids() == ["m1"]


async def test_a_store_file_deleted_under_the_server_is_503_not_200_for_messages_it_would_lose(
    api: Api, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`rm idstitch.db*` (or a backup moved over it) while serve runs. Before: every request was still
    answered 200 and /healthz said ok, while the messages went into the deleted file, gone for good
    once the server stopped; nothing said so."""
    caplog.set_level("INFO", logger="idstitch.http")
    assert await api.post("/v1/batch", {"batch": [track(1)]}) == (200, OK)
    for path in tmp_path.glob("idstitch.db*"):
        path.unlink()
    status, body = await api.post("/v1/batch", {"batch": [track(2)]})
    assert status == 503 and body == problem("store_unavailable", "the store cannot be reached; retry later")
    (record,) = [
        record for record in caplog.records if record.name == "idstitch.http" and record.status == 503
    ]
    assert record.reason.startswith(
        f"store sqlite:///{tmp_path}/idstitch.db: its file was deleted or replaced while idstitch had it open"
    )
    assert (await api.client.get("/healthz")).status_code == 503


async def test_a_store_whose_server_is_down_is_503_store_unavailable_at_once_then_lands(
    api: Api, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """PostgreSQL restarting. Before: the engine retried the lost connection as a conflict for 2 minutes
    (a client's request hung 150 s), then answered `store_busy`, which says the opposite of what is wrong."""
    caplog.set_level("INFO", logger="idstitch.http")
    down = "store postgresql://app@db:5432/idstitch is unavailable: cannot connect to PostgreSQL: refused"
    tries: list[int] = []

    def unreachable() -> Any:
        tries.append(1)
        raise StoreUnavailable(down)

    monkeypatch.setattr(api.world.store, "transaction", unreachable)
    status, body = await api.post("/v1/batch", {"batch": [track(1)]})
    assert status == 503 and body == problem("store_unavailable", "the store cannot be reached; retry later")
    assert tries == [1]  # not retried: every try fails alike until the server is back
    (record,) = [record for record in caplog.records if record.name == "idstitch.http"]
    assert record.reason == f"{down}; retry later"
    assert (await api.client.get("/healthz")).status_code == 503
    monkeypatch.undo()
    assert await api.post("/v1/batch", {"batch": [track(1)]}) == (200, OK)
    assert api.event_ids() == ["m1"]


# -- metrics and logs ------------------------------------------------------------------------------


async def test_metrics_count_messages_resolutions_merges_drops_and_latency(api: Api) -> None:
    body = {
        "batch": [
            {"type": "identify", "anonymousId": "a1", "messageId": "m1"},  # creates a profile
            {"type": "identify", "userId": "u1", "messageId": "m2"},  # creates another
            {"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m3"},  # merges them
            {"type": "identify", "userId": "void", "anonymousId": "a1", "messageId": "m4"},  # drops "void"
            {"type": "track", "userId": "u1"},  # no event: rejected
        ]
    }
    assert (await api.post("/v1/batch", body))[0] == 200
    assert (await api.post("/v1/batch", body))[0] == 200  # four duplicates, one rejected again
    assert (await api.post("/v1/track", {"event": "E"}, key="wk_nope"))[0] == 401
    response = await api.client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=")
    samples = {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in response.text.splitlines()
        if line.startswith("idstitch_") and "_created" not in line
    }
    assert {name: value for name, value in samples.items() if "_http_" not in name} == {
        'idstitch_messages_accepted_total{space="app"}': 4.0,
        'idstitch_messages_duplicate_total{space="app"}': 4.0,
        'idstitch_messages_rejected_total{space="app"}': 2.0,
        'idstitch_resolutions_total{result="created",space="app"}': 2.0,
        'idstitch_resolutions_total{result="matched",space="app"}': 2.0,
        'idstitch_merges_total{space="app"}': 1.0,
        'idstitch_identifiers_dropped_total{rule="blocked exact \'void\'",space="app"}': 1.0,
        "idstitch_writer_pending_messages": 0.0,
        "idstitch_writer_max_pending_messages": 3000.0,
        "idstitch_writer_commits_total": 2.0,
        "idstitch_writer_batches_total": 2.0,
    }
    assert samples['idstitch_http_request_duration_seconds_count{route="/v1/batch",status="200"}'] == 2.0
    assert samples['idstitch_http_request_duration_seconds_count{route="/v1/track",status="401"}'] == 1.0
    buckets = [
        key.split('le="')[1].split('"')[0]
        for key in samples
        if key.startswith("idstitch_http_request_duration_seconds_bucket{") and 'route="/v1/batch"' in key
    ]
    # fine buckets around the 7 ms latency target, and the open one
    assert {"0.005", "0.007", "0.01", "+Inf"} <= set(buckets)
    assert "# TYPE idstitch_http_request_duration_seconds histogram" in response.text


async def test_dropped_identifiers_are_counted_by_rule_not_by_size_or_letter_case(api: Api) -> None:
    # Before: each length of a too long id was a label of its own ("too long: 1,001 bytes, …"), so a few
    # hundred long ids used up the 200 rules the metric holds and every rule seen later was "other".
    batch = [
        {"type": "track", "event": "E", "userId": "u1", "anonymousId": "z" * (1001 + n), "messageId": f"m{n}"}
        for n in range(250)
    ]
    batch += [
        {"type": "track", "event": "E", "userId": value, "anonymousId": "a1", "messageId": f"v{n}"}
        for n, value in enumerate(["VOID", "Void", "void"])
    ]
    assert await api.post("/v1/batch", {"batch": batch}) == (200, OK)
    text = (await api.client.get("/metrics")).text
    dropped = {
        line.rpartition(" ")[0]: float(line.rpartition(" ")[2])
        for line in text.splitlines()
        if line.startswith("idstitch_identifiers_dropped_total")
    }
    assert dropped == {
        'idstitch_identifiers_dropped_total{rule="too long",space="app"}': 250.0,
        'idstitch_identifiers_dropped_total{rule="blocked exact \'void\'",space="app"}': 3.0,
    }


def rejected_total(text: str) -> float:
    """idstitch_messages_rejected_total of the space `app` in a /metrics answer (0 before any)."""
    for line in text.splitlines():
        if line.startswith('idstitch_messages_rejected_total{space="app"} '):
            return float(line.rpartition(" ")[2])
    return 0.0


async def test_a_message_refused_whole_request_and_all_counts_as_rejected(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    # The same message over 32 KB was counted as rejected inside a batch but not on /v1/track, and a
    # 2,501-message batch moved no counter at all: an alert on rejected messages missed both.
    caplog.set_level("INFO", logger="idstitch.http")
    big = track(1, properties={"blob": "x" * (32 * 1024)})
    assert (await api.post("/v1/batch", {"batch": [track(2), big]}))[0] == 200  # 1 rejected, as before
    assert (await api.post("/v1/track", big))[0] == 400  # message_too_large: 1 message
    assert (await api.post("/v1/track", content=b"{nope"))[0] == 400  # invalid_json: 1 message
    assert (await api.post("/v1/identify", content=b"[1]"))[0] == 400  # not an object: 1 message
    too_many = [track(n) for n in range(2501)]
    assert (await api.post("/v1/batch", {"batch": too_many}))[0] == 400  # 2,501 messages
    # Not counted: how many messages a batch that is not JSON held is unknown; a refused key has no space.
    assert (await api.post("/v1/batch", content=b"{nope"))[0] == 400
    assert (await api.post("/v1/track", track(3), key="wk_nope"))[0] == 401
    assert rejected_total((await api.client.get("/metrics")).text) == 1 + 1 + 1 + 1 + 2501
    lines = [
        (getattr(record, "path", None), getattr(record, "messages", None), getattr(record, "rejected", None))
        for record in caplog.records
        if record.name == "idstitch.http" and getattr(record, "status", None) == 400
    ]
    assert lines == [
        ("/v1/track", 1, 1),
        ("/v1/track", 1, 1),
        ("/v1/identify", 1, 1),
        ("/v1/batch", 2501, 2501),
        ("/v1/batch", 0, None),
    ]
    assert api.event_ids() == ["m2"]


async def test_a_client_that_stalls_mid_body_is_answered_408_and_frees_its_slot(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    """A client that sends part of a body and then nothing (a phone that lost its network without closing
    the connection, a slowloris) is cut off after the body timeout. Before: it waited for ever, holding one
    of the `max_in_flight` slots; once they were all held, every ingest request was refused with 429."""
    caplog.set_level("INFO", logger="idstitch.http")
    api.app.body_timeout = 0.2
    api.app.max_in_flight = 1
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/track",
        "headers": [(b"authorization", basic("wk_test").encode()), (b"content-length", b"100")],
    }
    first = True

    async def receive() -> dict[str, Any]:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b'{"userId":', "more_body": True}
        await anyio.sleep(3600)  # the rest never comes
        raise AssertionError("unreachable")

    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with anyio.fail_after(10):
        await api.app(scope, receive, send)
    start, body = sent
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    assert json.loads(body["body"]) == problem(
        "request_timeout", "the request body was not received within 0.2 s"
    )
    # The slot is free again: the next client is served, not refused as overloaded.
    assert await api.post("/v1/track", track(1)) == (200, OK)
    assert api.event_ids() == ["m1"]


async def test_a_client_that_goes_away_mid_body_is_logged_with_a_reason(
    api: Api, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="idstitch.http")
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/track",
        "headers": [(b"authorization", basic("wk_test").encode()), (b"content-length", b"100")],
    }
    messages = iter([{"type": "http.request", "body": b'{"userId":', "more_body": True}])

    async def receive() -> dict[str, Any]:
        return next(messages, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        raise AssertionError(f"nobody to answer: {message}")

    await api.app(scope, receive, send)
    (record,) = [record for record in caplog.records if record.name == "idstitch.http"]
    assert (record.levelname, getattr(record, "status", None), getattr(record, "error", None)) == (
        "INFO",
        499,
        "client_closed_request",
    )
    assert getattr(record, "reason", None) == "the client closed the connection before sending the whole body"
    assert api.event_ids() == []


async def test_one_structured_log_line_per_request(api: Api, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="idstitch.http")
    await api.post("/v1/batch", {"batch": [track(1), {"type": "track", "userId": "u2"}]})
    await api.post("/v1/track", track(3), key="wk_bad")
    records = [record for record in caplog.records if record.name == "idstitch.http"]
    fields = [
        {
            key: getattr(record, key, None)
            for key in ("method", "path", "status", "messages", "rejected", "error", "reason", "space")
        }
        for record in records
    ]
    assert fields == [
        {
            "method": "POST",
            "path": "/v1/batch",
            "status": 200,
            "messages": 2,
            "rejected": 1,
            "error": None,
            "reason": None,
            "space": "app",
        },
        {
            "method": "POST",
            "path": "/v1/track",
            "status": 401,
            "messages": 0,
            "rejected": None,
            "error": "unauthorized",
            "reason": "unknown write key",
            "space": None,
        },
    ]
    assert all(isinstance(getattr(record, "duration_ms", None), float) for record in records)
    assert all(record.levelname == "INFO" and record.getMessage() == "request" for record in records)


def test_the_json_formatter_writes_one_object_per_line() -> None:
    record = logging.makeLogRecord(
        {
            "name": "idstitch.http",
            "levelno": 20,
            "levelname": "INFO",
            "msg": "request",
            "status": 200,
            "path": "/v1/t",
        }
    )
    line = JsonFormatter().format(record)
    assert "\n" not in line
    document = json.loads(line)
    assert {key: document[key] for key in ("level", "logger", "msg", "status", "path")} == {
        "level": "info",
        "logger": "idstitch.http",
        "msg": "request",
        "status": 200,
        "path": "/v1/t",
    }


# -- generated requests ----------------------------------------------------------------------------

_json = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8,
)
# the fields of a message, each of which a generated message may hold any JSON value in
_FIELDS = ("type", "userId", "anonymousId", "messageId", "previousId", "groupId", "event", "timestamp")
_FIELDS += ("sentAt", "originalTimestamp", "traits", "properties", "context", "integrations", "writeKey")


@st.composite
def _generated_message(draw: st.DrawFn) -> object:
    """A valid track, with a few fields replaced by any JSON value or dropped; or any JSON value."""
    if draw(st.integers(0, 4)) == 0:
        return draw(_json)
    message: dict[str, Any] = {
        "type": "track",
        "event": "E",
        "userId": "u1",
        "messageId": draw(st.text(max_size=6)),
    }
    for key in draw(st.lists(st.sampled_from(_FIELDS), max_size=3, unique=True)):
        message[key] = draw(_json | st.sampled_from(["2026-01-05", "u2", "", None, "wk_test", 7]))
    return message


@st.composite
def _generated_request(draw: st.DrawFn) -> tuple[str, bytes, dict[str, str], list[object]]:
    """A request to an ingest path, mostly well-formed, and the messages it posts (none when it is not an
    envelope of them)."""
    path = draw(st.sampled_from(["/v1/track", "/v1/identify", "/v1/alias", "/v1/batch", "/v1/b"]))
    single = "b" not in path
    sent = [draw(_generated_message())] if single else draw(st.lists(_generated_message(), max_size=4))
    document: object = sent[0] if single else {"batch": sent}
    if draw(st.integers(0, 9)) == 0:
        document, sent = draw(_json), []  # not even an envelope
    data = json.dumps(document, ensure_ascii=draw(st.booleans())).encode()
    headers = {"Content-Type": draw(st.sampled_from(["application/json", "text/plain", "x/y; q=1", "\xe9"]))}
    odd = draw(st.booleans()) and draw(st.booleans())  # a quarter of requests get odd headers
    headers["Authorization"] = (
        draw(st.sampled_from([basic("wk_nope"), "Bearer x", "Basic !", ""])) if odd else basic("wk_test")
    )
    encoding = draw(st.sampled_from(["gzip", "GZIP", "x-gzip", "br", "gzip, gzip"])) if odd else ""
    if encoding or draw(st.booleans()):
        headers["Content-Encoding"] = encoding or "gzip"
        if "gzip" in headers["Content-Encoding"].lower() and (not odd or draw(st.booleans())):
            data = gzip.compress(data, mtime=0)
    return path, data, headers, sent


def _sent_id(message: object) -> str | None:
    """The id a message sent with this messageId is stored under; None when the server makes one."""
    value = message.get("messageId") if isinstance(message, dict) else None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return decimal_string(value)
    return value.replace("\x00", "\ufffd") if isinstance(value, str) and value else None


def test_generated_requests_are_answered_as_documented_and_what_is_accepted_is_stored_once(
    tmp_path: Path,
) -> None:
    """Generated bodies and headers: never a 500; every error has the documented shape; every message a
    200 accepts is stored, under the id it was sent with, and sending the request again stores nothing new."""
    world = open_world(tmp_path, CONFIG)
    writer = GroupCommitWriter(world.engine)
    app = TrackingAPI(writer, clock=lambda: RECEIVED)

    async def post(path: str, data: bytes, headers: dict[str, str]) -> httpx.Response:
        sent = {name: value.encode("latin-1") for name, value in headers.items()}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post(path, content=data, headers=sent)

    @settings(max_examples=100, deadline=None, derandomize=True, database=None)
    @given(request=_generated_request())
    def check(request: tuple[str, bytes, dict[str, str], list[object]]) -> None:
        path, data, headers, sent = request
        before = list(world.store.iter_event_ids(SPACE))
        response = anyio.run(post, path, data, headers)
        body = response.json()
        after = list(world.store.iter_event_ids(SPACE))
        assert response.status_code in (200, 400, 401, 413, 415), body
        if response.status_code != 200:
            assert body == problem(body["code"], body["message"]), body
            assert after == before
            return
        rejected = {item["index"] for item in body.get("rejected", [])}
        assert body == ({"success": True, "rejected": body["rejected"]} if rejected else OK)
        if not sent:  # `{"batch": []}`, say
            assert len(after) - len(before) <= 1
            return
        ids = [_sent_id(message) for index, message in enumerate(sent) if index not in rejected]
        fresh = {message_id for message_id in ids if message_id is not None} - set(before)
        # each accepted message once: a new id once, a known id not again, each one without an id apart
        assert len(after) - len(before) == len(fresh) + ids.count(None)
        assert fresh <= set(after)
        if None not in ids:  # a retry stores nothing twice
            assert anyio.run(post, path, data, headers).status_code == 200
            assert list(world.store.iter_event_ids(SPACE)) == after

    try:
        check()
    finally:
        writer.close()
        world.close()


# -- the real server -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Served:
    process: subprocess.Popen[bytes]
    log: Path

    def wait_for(self, needle: str, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if needle in line:
                    return line
            assert self.process.poll() is None, self.log.read_text()
            time.sleep(0.02)
        raise AssertionError(f"{needle!r} not seen: {self.log.read_text()}")


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    started: list[Served] = []

    def start(*args: str, env: dict[str, str] | None = None) -> Served:
        log = tmp_path / f"serve{len(started)}.log"
        environment = {k: v for k, v in os.environ.items() if not k.startswith("IDSTITCH_")}
        environment |= env or {}
        with log.open("wb") as sink:
            process = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "idstitch",
                    "serve",
                    "--store",
                    f"sqlite:///{tmp_path}/served.db",
                    *args,
                ],
                cwd=tmp_path,
                env=environment,
                stdout=subprocess.DEVNULL,
                stderr=sink,
            )
        served = Served(process, log)
        started.append(served)
        return served

    yield start
    for served in started:
        if served.process.poll() is None:
            served.process.kill()
            served.process.wait()


def test_serve_acknowledges_only_what_is_stored_and_drains_on_sigterm(serve: Any, tmp_path: Path) -> None:
    port = free_port()
    served: Served = serve("--port", str(port))
    key_line = served.wait_for("created space default with source default, write key wk_")
    write_key = key_line.rpartition(" ")[2]
    assert served.wait_for("idstitch serving on") == f"idstitch serving on http://127.0.0.1:{port}"
    base = f"http://127.0.0.1:{port}"
    assert httpx.get(f"{base}/healthz").json() == {"status": "ok"}

    acknowledged: list[str] = []
    lock = threading.Lock()
    stop = threading.Event()

    def sender(worker: int) -> None:
        with httpx.Client(base_url=base, auth=(write_key, ""), timeout=10) as client:
            for round_ in range(200):  # bounded; the server goes away long before
                ids = [f"w{worker}-r{round_}-{n}" for n in range(20)]
                batch = [{"type": "track", "event": "E", "userId": f"u{worker}", "messageId": i} for i in ids]
                try:
                    response = client.post("/v1/batch", json={"batch": batch})
                except httpx.TransportError:
                    return  # the server stopped accepting
                if response.status_code == 200:
                    assert response.json() == OK
                    with lock:
                        acknowledged.extend(ids)
                if stop.is_set():
                    return

    workers = [threading.Thread(target=sender, args=(n,)) for n in range(4)]
    for worker in workers:
        worker.start()
    deadline = time.monotonic() + 10
    while len(acknowledged) < 200 and time.monotonic() < deadline:
        time.sleep(0.01)
    served.process.send_signal(signal.SIGTERM)  # requests are still in flight here
    assert served.process.wait(timeout=30) == 0
    stop.set()
    for worker in workers:
        worker.join(timeout=30)
    assert len(acknowledged) >= 200
    store = open_store(f"sqlite:///{tmp_path}/served.db")
    try:
        stored = set(store.iter_event_ids("default"))
    finally:
        store.close()
    assert set(acknowledged) <= stored
    requests = [json.loads(line) for line in served.log.read_text().splitlines() if line.startswith("{")]
    assert {(line["msg"], line["method"], line["path"]) for line in requests} >= {
        ("request", "POST", "/v1/batch")
    }
    assert all(isinstance(line["duration_ms"], float) for line in requests if line["msg"] == "request")


def test_serve_with_a_write_key_from_the_environment_on_any_free_port(serve: Any) -> None:
    served: Served = serve("--port", "0", env={"IDSTITCH_WRITE_KEY": "wk_env"})
    url = served.wait_for("idstitch serving on").rpartition(" ")[2]
    assert "created space" not in served.log.read_text()
    response = httpx.post(f"{url}/v1/track", json={"event": "E", "userId": "u1"}, auth=("wk_env", ""))
    assert (response.status_code, response.json()) == (200, OK)
    served.process.send_signal(signal.SIGTERM)
    assert served.process.wait(timeout=30) == 0


def test_serve_on_a_busy_port_is_a_usage_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = CliRunner().invoke(
            cli_app, ["serve", "--port", str(port), "--store", f"sqlite:///{tmp_path}/busy.db"]
        )
    assert result.exit_code == 2
    assert f"error: cannot listen on 127.0.0.1:{port}: Address already in use" in result.output
