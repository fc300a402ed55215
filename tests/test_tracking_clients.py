"""Real tracking clients against a real `idstitch serve` (SPEC §6): Segment's and RudderStack's libraries work
unchanged when pointed at idstitch, and what they deliver resolves as SPEC E1, E2, E3 and E8 say.

Every test starts `python -m idstitch serve` as a subprocess on a free local port over a fresh SQLite file,
drives it with an unmodified client library (segment-analytics-python, @segment/analytics-node run by the
machine's node, rudder-sdk-python, @rudderstack/rudder-sdk-node, the legacy analytics-node v6, analytics.js
in Debian's Chromium on a page of another origin) or with
plain urllib, stops the server (SIGTERM must exit 0), and then reads the graph through the Store protocol,
as tests/helpers.py does.

The crash test kills the server with SIGKILL mid-stream and restarts it on the same store: a 200 must mean
durable (SPEC §6), and retries must never double a message.
"""

from __future__ import annotations

import base64
import copy
import gzip
import http.client
import json
import math
import os
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from helpers import BASE, ident, open_world
from idstitch.core.messages import format_timestamp
from idstitch.storage.base import EventRecord, SpaceStats, Store
from idstitch.storage.urls import open_store
from live_server import WRITE_KEY, Server

SPACE = "default"  # the zero-configuration space that IDSTITCH_WRITE_KEY's source belongs to
NODE_CLIENT = Path(__file__).resolve().parent / "clients" / "node"

Call = dict[str, Any]  # one client call: {"method": "track", ...params in Segment's camelCase}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    """A started server over a fresh store; killed at the end whatever the test did."""
    running = Server(tmp_path / "server")
    running.start()
    try:
        yield running
    finally:
        running.kill()


# -- reading the graph ---------------------------------------------------------------------------------


class Graph:
    """One space of a store, read through the Store protocol."""

    def __init__(self, store: Store, space: str = SPACE) -> None:
        self.store = store
        self.space = space

    def root(self, ref: str) -> str:
        """The root profile of `type:value` (group_id → accounts) or of a segment id."""
        if ":" in ref:
            found = self.store.find_profile(self.space, ident(ref))
        else:
            found = self.store.resolve_segment_id(self.space, ref)
        assert found is not None, f"no profile for {ref}"
        return found

    def identifiers(self, root: str) -> set[str]:
        return {f"{item.type}:{item.value}" for item in self.store.identifiers(self.space, root)}

    def events(self, root: str) -> list[EventRecord]:
        return self.store.events(self.space, root, limit=1000)

    def event_count(self, root: str) -> int:
        return self.store.event_count(self.space, root)

    def traits(self, root: str) -> dict[str, Any]:
        return self.store.traits(self.space, root)

    def links(self, root: str) -> set[str]:
        return set(self.store.links(self.space, root))

    def roots(self, collection: str = "users") -> list[str]:
        return [row[0] for row in self.dump()["profiles"] if row[1] == collection and row[2] == ""]

    def stats(self) -> SpaceStats:
        return self.store.stats(self.space)

    def dump(self) -> dict[str, Any]:
        return self.store.dump(self.space)

    def event_id_counts(self) -> Counter[str]:
        return Counter(self.store.iter_event_ids(self.space))


@contextmanager
def graph_of(url: str) -> Iterator[Graph]:
    store = open_store(url)
    try:
        yield Graph(store)
    finally:
        store.close()


# -- the clients ---------------------------------------------------------------------------------------

# Segment's camelCase call fields → the keyword arguments both Python libraries take.
PYTHON_KWARGS = {
    "userId": "user_id",
    "anonymousId": "anonymous_id",
    "groupId": "group_id",
    "previousId": "previous_id",
    "messageId": "message_id",
}


@dataclass
class Delivery:
    """What a client library did on the wire: HTTP requests made, and how many were answered 429."""

    requests: int
    throttled: int = 0


def _send_python(
    client_class: Callable[..., Any],
    consumer: ModuleType,
    calls: list[Call],
    monkeypatch: pytest.MonkeyPatch,
    **options: Any,
) -> Delivery:
    """Send through a Python library's queue and consumer thread, then flush and shut it down.

    The library's own `post` is wrapped (not replaced) so that every attempt is seen: a failure it retried
    away would pass on_error silently, and the test must still fail on it.
    """
    real_post = consumer.post
    attempts: list[Any] = []

    def recording_post(*args: Any, **kwargs: Any) -> Any:
        try:
            response = real_post(*args, **kwargs)
        except Exception as error:
            attempts.append(("error", getattr(error, "status", None), str(error)))
            raise
        attempts.append((response.status_code, response.json(), kwargs.get("gzip")))
        return response

    monkeypatch.setattr(consumer, "post", recording_post)
    errors: list[str] = []
    client = client_class(
        write_key=WRITE_KEY,
        on_error=lambda error, batch: errors.append(f"{error!r} ({len(batch)} messages)"),
        upload_interval=0.05,  # the library's batching window; short so that tests do not wait on it
        max_retries=3,
        **options,
    )
    for call in calls:
        fields = copy.deepcopy(call)  # the libraries write into context (library name): keep ours intact
        method = getattr(client, fields.pop("method"))
        method(**{PYTHON_KWARGS.get(key, key): value for key, value in fields.items()})
    client.flush()
    client.shutdown()
    assert errors == [], errors
    throttled = sum(1 for attempt in attempts if attempt[:2] == ("error", 429))
    delivered = [attempt for attempt in attempts if attempt[:2] != ("error", 429)]
    assert delivered, "the library sent nothing"
    assert all(attempt == (200, {"success": True}, True) for attempt in delivered), delivered
    return Delivery(len(attempts), throttled)


def send_segment_python(
    server: Server, calls: list[Call], monkeypatch: pytest.MonkeyPatch, batch_size: int
) -> Delivery:
    """segment-analytics-python: gzip on, posts {"batch", "sentAt", "writeKey"} with Basic auth to /v1/batch."""
    from segment.analytics import Client, consumer

    return _send_python(
        Client, consumer, calls, monkeypatch, host=server.base_url, gzip=True, upload_size=batch_size
    )


def send_rudder_python(
    server: Server, calls: list[Call], monkeypatch: pytest.MonkeyPatch, batch_size: int
) -> Delivery:
    """rudder-sdk-python with its defaults: gzip on, identify traits moved into context.traits, Basic auth.

    Its dataPlaneUrl setting is its Client's `host`; it posts to dataPlaneUrl + /v1/batch, as Segment does.
    """
    from rudderstack.analytics import Client, consumer

    assert Client.DefaultConfig.gzip is True  # the default this test relies on: no gzip= passed below
    return _send_python(Client, consumer, calls, monkeypatch, host=server.base_url, upload_size=batch_size)


def send_analytics_node(
    server: Server, calls: list[Call], monkeypatch: pytest.MonkeyPatch, batch_size: int
) -> Delivery:
    """@segment/analytics-node in the machine's node, through tests/clients/node/send.mjs."""
    node = shutil.which("node")
    assert node is not None, "node is not on PATH"
    assert (NODE_CLIENT / "node_modules" / "@segment" / "analytics-node").is_dir(), (
        "tests/clients/node is not installed: run `make install-test` (npm ci --prefix tests/clients/node)"
    )
    calls_path = server.directory / "calls.json"
    calls_path.write_text(json.dumps(calls))
    done = subprocess.run(
        [node, str(NODE_CLIENT / "send.mjs"), server.base_url, WRITE_KEY, str(calls_path), str(batch_size)],
        capture_output=True,
        text=True,
        timeout=90,
    )
    assert done.returncode == 0, f"node client failed ({done.returncode}):\n{done.stderr}\n{server.log()}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["calls"] == len(calls)
    return Delivery(summary["requests"], summary["throttled"])


def _send_axios_node(library: str, server: Server, calls: list[Call], batch_size: int) -> Delivery:
    """An axios-based Node library (RudderStack's, Segment's legacy v6) through tests/clients/node/send-axios.mjs."""
    node = shutil.which("node")
    assert node is not None, "node is not on PATH"
    assert (NODE_CLIENT / "node_modules" / library).is_dir(), (
        "tests/clients/node is not installed: run `make install-test` (npm ci --prefix tests/clients/node)"
    )
    calls_path = server.directory / "calls.json"
    calls_path.write_text(json.dumps(calls))
    command = [node, str(NODE_CLIENT / "send-axios.mjs"), library, server.base_url, WRITE_KEY]
    done = subprocess.run(
        [*command, str(calls_path), str(batch_size)], capture_output=True, text=True, timeout=90
    )
    assert done.returncode == 0, f"{library} failed ({done.returncode}):\n{done.stderr}\n{server.log()}"
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["calls"] == len(calls)
    return Delivery(summary["requests"], summary["throttled"])


def send_rudder_node(
    server: Server, calls: list[Call], monkeypatch: pytest.MonkeyPatch, batch_size: int
) -> Delivery:
    """@rudderstack/rudder-sdk-node: gzip on, originalTimestamp and sentAt on each message, traits copied to
    context.traits, Basic auth to dataPlaneUrl + /v1/batch."""
    return _send_axios_node("@rudderstack/rudder-sdk-node", server, calls, batch_size)


def send_legacy_analytics_node(
    server: Server, calls: list[Call], monkeypatch: pytest.MonkeyPatch, batch_size: int
) -> Delivery:
    """analytics-node v6, Segment's Node library before @segment/analytics-node, still widely installed:
    a batch-level `timestamp` beside `sentAt`, `_metadata` on each message, numeric ids made strings."""
    return _send_axios_node("analytics-node", server, calls, batch_size)


Sender = Callable[[Server, list[Call], pytest.MonkeyPatch, int], Delivery]
CLIENTS: dict[str, Sender] = {
    "segment-python": send_segment_python,
    "analytics-node": send_analytics_node,
    "rudder-python": send_rudder_python,
    "rudder-node": send_rudder_node,
    "analytics-node-v6": send_legacy_analytics_node,
}


# -- SPEC's worked examples as client calls, and what the graph must then hold --------------------------


def check_e1(graph: Graph, logins: int = 0) -> None:
    """E1: one profile, found by phone, user_id, anonymous_id and its segment id, with all three events.

    `logins`: identify calls a sender needs on top of E1's events (a browser names its user that way).
    """
    root = graph.root("phone:123-456-7890")
    assert root.startswith("use_")
    assert graph.root("user_id:use_123") == root
    assert graph.root("anonymous_id:anon_123") == root
    assert graph.root(root) == root
    assert graph.identifiers(root) == {"anonymous_id:anon_123", "user_id:use_123", "phone:123-456-7890"}
    assert sorted((event.type, event.name or "") for event in graph.events(root)) == [
        *[("identify", "")] * logins,
        ("page", "Pricing"),
        ("track", "Subscription Upgraded"),
        ("track", "User Signup"),
    ]
    assert graph.roots() == [root]


def check_e2(graph: Graph) -> None:
    """E2: three anonymous pages and the identify that names the visitor are one profile, 4 events."""
    root = graph.root("user_id:u1")
    assert graph.root("anonymous_id:a1") == root
    assert graph.root("email:j@x.io") == root
    assert graph.identifiers(root) == {"anonymous_id:a1", "user_id:u1", "email:j@x.io"}
    assert graph.event_count(root) == 4
    assert sorted(event.type for event in graph.events(root)) == ["identify", "page", "page", "page"]
    # Segment's clients send identify traits as `traits`; Rudder's move them to `context.traits` (SPEC §2, §4).
    assert graph.traits(root).get("email") == "j@x.io"
    assert graph.roots() == [root]


def check_e3(graph: Graph, logins: int = 0) -> None:
    """E3: two devices, one user: one profile with both anonymous ids; the iPhone's id sees the order."""
    root = graph.root("user_id:u1")
    assert graph.root("anonymous_id:d7") == root
    assert graph.identifiers(root) == {"anonymous_id:i1", "anonymous_id:d7", "user_id:u1"}
    assert sorted((event.type, event.name or "") for event in graph.events(root)) == [
        *[("identify", "")] * logins,
        ("track", "Added to Cart"),
        ("track", "Order Completed"),
    ]
    from_iphone = graph.root("anonymous_id:i1")
    assert from_iphone == root
    assert "Order Completed" in {event.name for event in graph.events(from_iphone)}
    assert graph.roots() == [root]


def check_e8(graph: Graph) -> None:
    """E8: the group call makes account acc_… with its traits; both users link to it and it to both."""
    account = graph.root("group_id:acme")
    assert account.startswith("acc_")
    assert graph.identifiers(account) == {"group_id:acme"}
    assert graph.traits(account) == {"name": "Acme", "plan": "enterprise"}
    first, second = graph.root("user_id:u1"), graph.root("user_id:u2")
    assert first != second
    assert first.startswith("use_") and second.startswith("use_")
    assert graph.links(account) == {first, second}
    assert graph.links(first) == {account}
    assert graph.links(second) == {account}
    assert "plan" not in graph.traits(first)  # group traits describe the company, not the person
    assert graph.roots("accounts") == [account]


ALL_CALLS_IDS = {
    f"call-{n}": kind for n, kind in enumerate(("identify", "track", "page", "screen", "group", "alias"))
}


def check_all_calls(graph: Graph, message_ids: bool = True) -> None:
    """Each of the six calls lands once with the library-given messageId; alias joins the previous id (E11).

    `message_ids=False` for a sender that makes up its own ids (analytics.js): each call lands once all the same.
    """
    root = graph.root("user_id:u9")
    assert graph.identifiers(root) == {
        "user_id:u9",
        "anonymous_id:a9",
        "email:pat@x.io",
        "anonymous_id:a9old",
    }
    if message_ids:
        assert graph.event_id_counts() == Counter(list(ALL_CALLS_IDS))
        assert {event.message_id: event.type for event in graph.events(root)} == ALL_CALLS_IDS
    else:
        assert sorted(event.type for event in graph.events(root)) == sorted(ALL_CALLS_IDS.values())
    names = {event.type: event.name for event in graph.events(root)}
    assert (names["track"], names["page"], names["screen"]) == ("Clicked", "Home", "Settings")
    assert graph.traits(root)["email"] == "pat@x.io"
    account = graph.root("group_id:g9")
    assert graph.traits(account) == {"name": "Globex"}
    assert graph.links(root) == {account}


@dataclass(frozen=True)
class Scenario:
    name: str
    calls: list[Call]
    check: Callable[[Graph], None]


PHONE = {"id": "123-456-7890", "type": "phone", "collection": "users", "encoding": "none"}
SCENARIOS = [
    Scenario(
        "E1",
        [
            {"method": "page", "anonymousId": "anon_123", "name": "Pricing"},
            {"method": "track", "event": "User Signup", "userId": "use_123", "anonymousId": "anon_123"},
            # the phone arrives only as a custom external id, sent through the library's context parameter
            {
                "method": "track",
                "event": "Subscription Upgraded",
                "userId": "use_123",
                "context": {"externalIds": [PHONE]},
            },
        ],
        check_e1,
    ),
    Scenario(
        "E2",
        [
            {"method": "page", "anonymousId": "a1", "name": "Home"},
            {"method": "page", "anonymousId": "a1", "name": "Pricing"},
            {"method": "page", "anonymousId": "a1", "name": "Signup"},
            {"method": "identify", "userId": "u1", "anonymousId": "a1", "traits": {"email": "j@x.io"}},
        ],
        check_e2,
    ),
    Scenario(
        "E3",
        [
            {"method": "track", "event": "Added to Cart", "anonymousId": "i1", "userId": "u1"},
            {"method": "track", "event": "Order Completed", "anonymousId": "d7", "userId": "u1"},
        ],
        check_e3,
    ),
    Scenario(
        "E8",
        [
            {
                "method": "group",
                "userId": "u1",
                "groupId": "acme",
                "traits": {"name": "Acme", "plan": "enterprise"},
            },
            {"method": "group", "userId": "u2", "groupId": "acme"},
        ],
        check_e8,
    ),
    Scenario(
        "all-calls",
        [
            {
                "method": "identify",
                "userId": "u9",
                "anonymousId": "a9",
                "traits": {"email": "pat@x.io", "name": "Pat"},
                "messageId": "call-0",
            },
            {
                "method": "track",
                "userId": "u9",
                "event": "Clicked",
                "properties": {"button": "buy"},
                "messageId": "call-1",
            },
            {
                "method": "page",
                "anonymousId": "a9",
                "name": "Home",
                "category": "Docs",
                "properties": {"path": "/"},
                "messageId": "call-2",
            },
            {"method": "screen", "userId": "u9", "name": "Settings", "messageId": "call-3"},
            {
                "method": "group",
                "userId": "u9",
                "groupId": "g9",
                "traits": {"name": "Globex"},
                "messageId": "call-4",
            },
            {"method": "alias", "previousId": "a9old", "userId": "u9", "messageId": "call-5"},
        ],
        check_all_calls,
    ),
]


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[scenario.name for scenario in SCENARIOS])
@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_library_resolves_spec_example(
    client: str, scenario: Scenario, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    started = datetime.now(UTC)
    delivery = CLIENTS[client](server, scenario.calls, monkeypatch, 100)
    assert delivery.requests >= 1
    server.stop()
    with graph_of(server.store_url) as graph:
        stats = graph.stats()
        assert (stats.events, stats.unresolved, stats.merges) == (len(scenario.calls), 0, 0)
        scenario.check(graph)
        # Each library stamps its own timestamp format (ms with Z, ms with +00:00, µs with +00:00):
        # every one must be read as the moment of the call, give or take the clock-skew correction.
        for root in graph.roots():
            for event in graph.events(root):
                assert started - timedelta(minutes=1) <= event.timestamp <= datetime.now(UTC), event
        if client == "rudder-python":
            # The path this client exists to test: RudderStack sends identify traits in context.traits only,
            # and the email above was read from there.
            identifies = [
                json.loads(event.payload)
                for root in graph.roots()
                for event in graph.events(root)
                if event.type == "identify"
            ]
            assert len(identifies) == sum(call["method"] == "identify" for call in scenario.calls)
            for payload in identifies:
                assert "email" not in payload.get("traits", {}), payload
                assert "email" in payload["context"]["traits"], payload


def test_segment_python_reports_the_servers_reason_for_a_wrong_write_key(server: Server) -> None:
    from segment.analytics import Client
    from segment.analytics.request import APIError

    errors: list[Exception] = []
    client = Client(
        write_key="wk_wrong",
        host=server.base_url,
        on_error=lambda error, batch: errors.append(error),
        upload_interval=0.05,
        max_retries=0,
    )
    client.track(user_id="u1", event="Signed Up")
    client.flush()
    client.shutdown()
    assert len(errors) == 1 and isinstance(errors[0], APIError)
    assert (errors[0].status, errors[0].code, errors[0].message) == (401, "unauthorized", "unknown write key")


# -- analytics.js in a real browser --------------------------------------------------------------------

CHROMIUM = Path("/usr/bin/chromium")  # Debian's, installed by `make install-test`; never a downloaded one
BrowserCall = list[Any]  # ["identify", "u1", {"email": ...}]: a method of `analytics` and its arguments


@dataclass(frozen=True)
class Device:
    """One browser (its own cookies and localStorage) and the calls a site makes in it, in order."""

    anonymous_id: str
    calls: list[BrowserCall]


@dataclass(frozen=True)
class BrowserScenario:
    name: str
    devices: list[Device]
    check: Callable[[Graph], None]


def check_e1_in_a_browser(graph: Graph) -> None:
    """E1 as a site sends it: the identify that tells the page who it is comes on top of E1's three events."""
    check_e1(graph, logins=1)


def check_e3_in_a_browser(graph: Graph) -> None:
    """E3 as two browsers send it: each logs in (identify) before it tracks; one profile holds both."""
    check_e3(graph, logins=2)


def check_e6_in_a_browser(graph: Graph) -> None:
    """E6 on a library computer whose site sends its own device id: Alice and Bob stay apart, lib1 is suspect."""
    alice, bob = graph.root("user_id:alice"), graph.root("user_id:bob")
    assert alice != bob
    assert graph.identifiers(alice) == {"user_id:alice", "anonymous_id:lib1"}
    assert graph.identifiers(bob) == {"user_id:bob"}
    assert [suspect.identifier for suspect in graph.store.suspects(graph.space)] == ["anonymous_id:lib1"]
    # Bob's browsing, still sent with the device's id, lands on Bob.
    assert sorted((event.type, event.name or "") for event in graph.events(alice)) == [
        ("identify", ""),
        ("page", "Catalog"),
    ]
    assert sorted((event.type, event.name or "") for event in graph.events(bob)) == [
        ("identify", ""),
        ("page", "Loans"),
    ]
    assert sorted(graph.roots()) == sorted([alice, bob])


def check_a_new_user_gets_a_new_anonymous_id(graph: Graph) -> None:
    """analytics.js itself gives the browser a new anonymousId when another user logs in: no E6 then."""
    alice, bob = graph.root("user_id:alice"), graph.root("user_id:bob")
    assert alice != bob
    assert graph.identifiers(alice) == {"user_id:alice", "anonymous_id:lib1"}
    (bobs_device,) = graph.identifiers(bob) - {"user_id:bob"}
    assert bobs_device.startswith("anonymous_id:") and bobs_device != "anonymous_id:lib1"
    assert graph.store.suspects(graph.space) == []
    assert sorted(graph.roots()) == sorted([alice, bob])


def check_all_calls_in_a_browser(graph: Graph) -> None:
    """identify, track, page, screen, group and alias from one browser, each once under analytics.js's own id."""
    check_all_calls(graph, message_ids=False)


LIB1 = {"anonymousId": "lib1"}  # a call's options: the anonymous id it is sent with

BROWSER_SCENARIOS = [
    BrowserScenario(
        "E1",
        [
            Device(
                "anon_123",
                [
                    ["page", "Pricing"],
                    ["identify", "use_123"],
                    ["track", "User Signup"],
                    # the phone arrives only as a custom external id, through the call's options
                    ["track", "Subscription Upgraded", {}, {"context": {"externalIds": [PHONE]}}],
                ],
            )
        ],
        check_e1_in_a_browser,
    ),
    BrowserScenario(
        "E2",
        [
            Device(
                "a1",
                [
                    ["page", "Home"],
                    ["page", "Pricing"],
                    ["page", "Signup"],
                    ["identify", "u1", {"email": "j@x.io"}],
                ],
            )
        ],
        check_e2,
    ),
    BrowserScenario(
        "E3",
        [
            Device("i1", [["identify", "u1"], ["track", "Added to Cart"]]),
            Device("d7", [["identify", "u1"], ["track", "Order Completed"]]),
        ],
        check_e3_in_a_browser,
    ),
    BrowserScenario(
        "E6",
        # The site keeps its own device id (a server-set cookie, say) and passes it with every call.
        [
            Device(
                "lib1",
                [
                    ["identify", "alice", {}, LIB1],
                    ["page", "Catalog", {}, LIB1],
                    ["identify", "bob", {}, LIB1],
                    ["page", "Loans", {}, LIB1],
                ],
            )
        ],
        check_e6_in_a_browser,
    ),
    BrowserScenario(
        "new-user-new-device-id",
        [
            Device(
                "lib1", [["identify", "alice"], ["page", "Catalog"], ["identify", "bob"], ["page", "Loans"]]
            )
        ],
        check_a_new_user_gets_a_new_anonymous_id,
    ),
    BrowserScenario(
        "E8",
        [
            Device("b1", [["identify", "u1"], ["group", "acme", {"name": "Acme", "plan": "enterprise"}]]),
            Device("b2", [["identify", "u2"], ["group", "acme"]]),
        ],
        check_e8,
    ),
    BrowserScenario(
        "all-calls",
        [
            Device(
                "a9",
                [
                    ["identify", "u9", {"email": "pat@x.io", "name": "Pat"}],
                    ["track", "Clicked", {"button": "buy"}],
                    ["page", "Docs", "Home", {"path": "/"}],
                    ["screen", "Settings"],
                    ["group", "g9", {"name": "Globex"}],
                    ["alias", "u9", "a9old"],
                ],
            )
        ],
        check_all_calls_in_a_browser,
    ),
]

# analytics.js posts each call to the first letter of its type (standard), or gathers them into /v1/b.
BROWSER_PATHS = {"standard": {"/v1/i", "/v1/t", "/v1/p", "/v1/s", "/v1/g", "/v1/a"}, "batching": {"/v1/b"}}


def send_analytics_js(server: Server, scenario: BrowserScenario, strategy: str) -> dict[str, Any]:
    """The real analytics.js in Chromium, on a page of another origin, through tests/clients/node/browser.mjs."""
    node = shutil.which("node")
    assert node is not None, "node is not on PATH"
    assert CHROMIUM.is_file(), f"{CHROMIUM} is missing: `make install-test` installs Debian's chromium"
    assert (NODE_CLIENT / "node_modules" / "@segment" / "analytics-next").is_dir(), (
        "tests/clients/node is not installed: run `make install-test` (npm ci --prefix tests/clients/node)"
    )
    scenario_path = server.directory / "browser.json"
    devices = [{"anonymousId": device.anonymous_id, "calls": device.calls} for device in scenario.devices]
    scenario_path.write_text(json.dumps({"strategy": strategy, "devices": devices}))
    done = subprocess.run(
        [node, str(NODE_CLIENT / "browser.mjs"), server.base_url, WRITE_KEY, str(scenario_path)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "IDSTITCH_CHROMIUM": str(CHROMIUM)},
    )
    assert done.returncode == 0, f"analytics.js failed ({done.returncode}):\n{done.stderr}\n{server.log()}"
    summary: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return summary


@pytest.mark.parametrize("strategy", list(BROWSER_PATHS))
@pytest.mark.parametrize("scenario", BROWSER_SCENARIOS, ids=[scenario.name for scenario in BROWSER_SCENARIOS])
def test_analytics_js_in_a_browser_resolves_spec_example(
    scenario: BrowserScenario, strategy: str, server: Server
) -> None:
    calls = sum(len(device.calls) for device in scenario.devices)
    summary = send_analytics_js(server, scenario, strategy)
    assert summary["events"] == calls
    assert {request["path"] for request in summary["requests"]} <= BROWSER_PATHS[strategy]
    server.stop()
    logged = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    # Each browser read its settings from idstitch: the host is the only thing the site changed. The log
    # names the route and the source, never the write key in the path.
    settings = [line for line in logged if line.get("path") == "/v1/projects/{writeKey}/settings"]
    assert [line["status"] for line in settings] == [200] * len(scenario.devices)
    assert WRITE_KEY not in server.log()
    # The library sends Authorization, so every path was preflighted, and idstitch's answer let it through.
    preflights = [line for line in logged if line.get("method") == "OPTIONS"]
    assert {line["path"] for line in preflights} == {request["path"] for request in summary["requests"]}
    assert {line["status"] for line in preflights} == {204}
    with graph_of(server.store_url) as graph:
        stats = graph.stats()
        assert (stats.events, stats.unresolved, stats.merges) == (calls, 0, 0)
        assert set(graph.event_id_counts().values()) == {1}
        scenario.check(graph)
        for root in graph.roots():
            for event in graph.events(root):
                payload = json.loads(event.payload)
                assert payload["messageId"].startswith("ajs-next-"), payload  # the library's own ids
                assert payload["context"]["library"]["name"] == "analytics.js", payload
                assert payload["context"]["page"]["url"].startswith("http://localhost:"), payload


# -- many messages through each library's batching -----------------------------------------------------

BULK_PEOPLE = 60
BULK_ROUNDS = 10  # messages per person
BULK_BATCH = 7  # small, so that the libraries cut many batches


def bulk_calls() -> list[Call]:
    """60 people × 10 messages, interleaved; any order of delivery gives the same 60 profiles."""
    calls: list[Call] = []
    for round_ in range(BULK_ROUNDS):
        for person in range(BULK_PEOPLE):
            anonymous, user = f"anon_{person}", f"user_{person}"
            message_id = f"bulk-{round_}-{person}"
            if round_ == 0:
                calls.append({"method": "page", "anonymousId": anonymous, "name": "Landing"})
            elif round_ == 1:
                traits = {"email": f"p{person}@x.io", "plan": "free"}
                calls.append(
                    {"method": "identify", "userId": user, "anonymousId": anonymous, "traits": traits}
                )
            elif round_ % 2:
                calls.append({"method": "track", "userId": user, "event": f"Step {round_}"})
            else:
                calls.append({"method": "screen", "anonymousId": anonymous, "name": f"Screen {round_}"})
            calls[-1]["messageId"] = message_id
    return calls


@pytest.mark.parametrize("client", list(CLIENTS))
def test_client_batching_delivers_every_message_once(
    client: str, server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = bulk_calls()
    delivery = CLIENTS[client](server, calls, monkeypatch, BULK_BATCH)
    # the library really cut the stream into small batches (429 retries come on top)
    assert delivery.requests >= math.ceil(len(calls) / BULK_BATCH)
    print(
        f"{client}: {len(calls)} messages in {delivery.requests} requests, {delivery.throttled} answered 429"
    )
    server.stop()
    with graph_of(server.store_url) as graph:
        assert graph.event_id_counts() == Counter(call["messageId"] for call in calls)
        assert len(graph.roots()) == BULK_PEOPLE
        for person in (0, 17, BULK_PEOPLE - 1):
            root = graph.root(f"email:p{person}@x.io")
            assert graph.identifiers(root) == {
                f"anonymous_id:anon_{person}",
                f"user_id:user_{person}",
                f"email:p{person}@x.io",
            }
            assert graph.event_count(root) == BULK_ROUNDS
            assert graph.traits(root)["plan"] == "free"


# -- plain HTTP: crash safety and duplicate delivery ---------------------------------------------------


def post(
    url: str, body: dict[str, Any], *, compress: bool = False, basic_auth: bool = True, timeout: float = 30
) -> tuple[int, Any]:
    """POST JSON (optionally gzip) with the write key as Basic user or in the body; (status, JSON body)."""
    if not basic_auth:
        body = {**body, "writeKey": WRITE_KEY}
    data = json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if compress:
        data = gzip.compress(data)
        headers["Content-Encoding"] = "gzip"
    if basic_auth:
        headers["Authorization"] = "Basic " + base64.b64encode(f"{WRITE_KEY}:".encode()).decode()
    request = urllib.request.Request(url, data=data, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:  # a status other than 2xx: still an answer, not a lost request
        raw = error.read()
        try:
            return error.code, json.loads(raw)
        except ValueError:
            return error.code, raw.decode(errors="replace")


def stream_message(batch: int, index: int) -> dict[str, Any]:
    """Message `index` of batch `batch` in a stream of 400 people, each on two devices, some in companies.

    Fixed messageIds and timestamps: a retry is the very same message, and the graph is reproducible.
    """
    number = batch * 20 + index
    person = number * 7 % 400
    visit = number // 400
    anonymous = f"anon_{person}_{visit % 2}"
    message: dict[str, Any] = {
        "messageId": f"crash-{batch:03d}-{index:02d}",
        "timestamp": format_timestamp(BASE + timedelta(seconds=number)),
    }
    if visit in (2, 5):  # a login on each device joins the two devices' histories
        traits = {"email": f"person{person}@x.io", "visits": visit}
        message |= {
            "type": "identify",
            "userId": f"user_{person}",
            "anonymousId": anonymous,
            "traits": traits,
        }
    elif visit == 7:
        message |= {"type": "group", "userId": f"user_{person}", "groupId": f"org_{person % 25}"}
        message["traits"] = {"name": f"Org {person % 25}"}
    elif visit % 2:
        message |= {"type": "track", "anonymousId": anonymous, "event": "Viewed Item"}
    else:
        message |= {"type": "page", "anonymousId": anonymous, "name": "Catalogue"}
    return message


CRASH_BATCHES = 200
CRASH_BATCH_SIZE = 20
# SIGKILL once this many batches are acknowledged (plus a delay, to hit a request at another point of its
# life: parsing, resolving, committing, answering), then restart on the same store and port.
KILLS = ((50, 0.0), (120, 0.02))


def test_kill_9_mid_stream_loses_no_acknowledged_batch_and_doubles_nothing(tmp_path: Path) -> None:
    batches = [[stream_message(b, i) for i in range(CRASH_BATCH_SIZE)] for b in range(CRASH_BATCHES)]
    server = Server(tmp_path / "server")
    server.start()
    acknowledged: list[int] = []
    attempts: Counter[int] = Counter()
    failures: list[str] = []

    def client() -> None:
        """One batch at a time, each retried until it gets a 200, as a client library does."""
        deadline = time.monotonic() + 90
        for number, batch in enumerate(batches):
            while True:
                if time.monotonic() > deadline:
                    failures.append(f"batch {number}: no 200 within 90 s")
                    return
                attempts[number] += 1
                try:
                    status, answer = post(f"{server.base_url}/v1/batch", {"batch": batch}, timeout=10)
                except (OSError, http.client.HTTPException):  # refused while down, reset by the kill
                    time.sleep(0.05)
                    continue
                if status == 200:
                    if answer != {"success": True}:
                        failures.append(f"batch {number}: 200 with {answer}")
                        return
                    acknowledged.append(number)
                    break
                if status == 429 or status >= 500:  # overloaded or going down: the retryable answers
                    time.sleep(0.1)
                    continue
                failures.append(f"batch {number}: HTTP {status} {answer}")
                return

    sender = threading.Thread(target=client, daemon=True)
    sender.start()
    try:
        for threshold, delay in KILLS:
            while len(acknowledged) < threshold and sender.is_alive():
                time.sleep(0.002)
            assert not failures, failures
            time.sleep(delay)
            server.kill()  # mid-stream: the client is always sending, so most likely mid-request
            durable = set(acknowledged)  # every 200 the client got was sent before the kill
            server.start()
            # Checked before any retry can re-send them (the client never re-sends an acknowledged batch):
            # a 200 means the batch was committed, so it must have survived the kill.
            with graph_of(server.store_url) as graph:
                stored = set(graph.event_id_counts())
            lost = [b for b in sorted(durable) if batches[b][0]["messageId"] not in stored]
            assert not lost, f"acknowledged before the kill, missing after it: batches {lost}"
        sender.join(timeout=120)
        assert not sender.is_alive(), "the client did not finish"
        assert not failures, failures
        server.stop()
    finally:
        server.kill()

    assert acknowledged == list(range(CRASH_BATCHES))
    assert sum(attempts.values()) > CRASH_BATCHES, "no request was retried: the kills hit nothing"
    retried = sorted(number for number, count in attempts.items() if count > 1)
    print(f"crash: {sum(attempts.values())} requests for {CRASH_BATCHES} batches; retried: {retried}")
    with graph_of(server.store_url) as graph:
        counts = graph.event_id_counts()
        doubled = {message_id: count for message_id, count in counts.items() if count > 1}
        assert not doubled, doubled
        expected = {message["messageId"] for batch in batches for message in batch}
        assert set(counts) == expected
        assert graph.stats().events == len(expected)
        crashed = graph.dump()

    # And the graph is the one an uninterrupted run builds: the embedded engine over the same batches.
    reference = open_world(None).space(SPACE)
    with reference:
        for batch in batches:
            reference.ingest(batch)
        assert crashed == reference.store.dump(SPACE)


def duplicate_batch() -> list[dict[str, Any]]:
    """A batch that exercises every call type, merges, account links and traits."""
    messages: list[dict[str, Any]] = []
    for person in range(5):
        anonymous, user = f"dup_anon_{person}", f"dup_user_{person}"
        messages += [
            {"type": "page", "anonymousId": anonymous, "name": "Home"},
            {"type": "track", "userId": user, "event": "Signed In"},
            {
                "type": "identify",
                "userId": user,
                "anonymousId": anonymous,
                "traits": {"email": f"d{person}@x.io"},
            },
            {"type": "screen", "anonymousId": anonymous, "name": "Settings"},
            {"type": "group", "userId": user, "groupId": f"dup_org_{person % 2}", "traits": {"plan": "pro"}},
            {"type": "alias", "previousId": f"legacy_{person}", "userId": user},
        ]
    for number, message in enumerate(messages):
        message["messageId"] = f"dup-{number}"
        message["timestamp"] = format_timestamp(BASE + timedelta(minutes=number))
    return messages


def test_duplicate_delivery_gives_the_same_graph_as_one_delivery(tmp_path: Path) -> None:
    batch = duplicate_batch()
    dumps: list[dict[str, Any]] = []
    for deliveries in (1, 2):
        server = Server(tmp_path / f"deliveries-{deliveries}")
        server.start()
        try:
            assert post(f"{server.base_url}/v1/batch", {"batch": batch}) == (200, {"success": True})
            if deliveries == 2:
                # The same batch again, as a different client would send it: gzip, writeKey in the body.
                again = post(f"{server.base_url}/v1/batch", {"batch": batch}, compress=True, basic_auth=False)
                assert again == (200, {"success": True})
                # and single messages of it again through their own endpoints
                for message in (batch[2], batch[1], batch[4]):
                    assert post(f"{server.base_url}/v1/{message['type']}", message) == (
                        200,
                        {"success": True},
                    )
            server.stop()
        finally:
            server.kill()
        with graph_of(server.store_url) as graph:
            assert graph.event_id_counts() == Counter(message["messageId"] for message in batch)
            dumps.append(graph.dump())
    assert dumps[0]["merges"], "the batch should merge profiles, or the comparison proves little"
    assert dumps[1] == dumps[0]
