"""Property tests of traits and event history through merges (SPEC §4): an oracle computed from the input
stream and the final graph, checked on every store.

The oracle: each message lands on the profile its outcome names; a merge only ever joins families, so the
message belongs to the family of that profile's final root. For every root and trait key the value is the one
from the family's message with the latest timestamp carrying that key (ties: the later-ingested message);
`null` removes the key. A root's events are exactly its family's messages.
"""

from __future__ import annotations

import asyncio
import base64
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import new_schema
from helpers import BASE, World, config_from_toml
from idstitch.config import Config
from idstitch.core.identifiers import Identifier
from idstitch.core.messages import format_timestamp
from idstitch.engine import MessageOutcome
from idstitch.http.profiles import ProfileAPI
from idstitch.storage.urls import open_store

EXAMPLES = int(os.environ.get("IDSTITCH_PROPERTY_EXAMPLES", "60"))
FAST = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
# PostgreSQL needs a schema per example: fewer of them.
POSTGRES = settings(FAST, max_examples=max(5, EXAMPLES // 4))

# Few identifiers so that streams merge often; few hours so that timestamps tie and arrive out of order.
USER_IDS = [None, None, "u1", "u2"]
ANONYMOUS_IDS = [None, "a1", "a2", "a3", "a4"]
EMAILS = [None, None, "e1@x.io", "e2@x.io"]
GROUP_IDS = ["g1", "g2"]
ACCOUNT_CRM_IDS = [None, "k1", "k2"]  # a custom accounts identifier: the way two accounts merge
KEYS = ["plan", "name", "address"]
VALUES: list[Any] = [None, "free", "pro", 3, {"city": "Oslo"}, {"city": "Rome", "zip": "00100"}, [1, 2]]


def trait_values() -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(KEYS), st.sampled_from(VALUES), max_size=2)


@st.composite
def message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["identify", "identify", "track", "page", "group"]))
    raw: dict[str, Any] = {
        "type": kind,
        "timestamp": format_timestamp(BASE + timedelta(hours=draw(st.integers(0, 4)))),
    }
    user_id = draw(st.sampled_from(USER_IDS))
    anonymous_id = draw(st.sampled_from(ANONYMOUS_IDS))
    if user_id is None and anonymous_id is None:
        anonymous_id = "a1"
    if user_id is not None:
        raw["userId"] = user_id
    if anonymous_id is not None:
        raw["anonymousId"] = anonymous_id
    if kind == "track":
        raw["event"] = draw(st.sampled_from(["Signed Up", "Order Completed"]))
    context: dict[str, Any] = {}
    context_traits = draw(trait_values())
    email = draw(st.sampled_from(EMAILS))
    if email is not None:
        context_traits["email"] = email
    if context_traits:
        context["traits"] = context_traits
    if kind in ("identify", "group"):
        traits = draw(trait_values())
        if traits or draw(st.booleans()):
            raw["traits"] = traits
    if kind == "group":
        raw["groupId"] = draw(st.sampled_from(GROUP_IDS))
        crm = draw(st.sampled_from(ACCOUNT_CRM_IDS))
        if crm is not None:
            context["externalIds"] = [
                {"id": crm, "type": "crm_account", "collection": "accounts", "encoding": "none"}
            ]
    if context:
        raw["context"] = context
    return raw


def streams() -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(message(), min_size=1, max_size=20).map(
        lambda items: [{**item, "messageId": f"t{index}"} for index, item in enumerate(items)]
    )


def user_updates(raw: dict[str, Any]) -> dict[str, Any]:
    """The person's trait updates of a message, read off the raw message: context.traits, identify's on top."""
    updates = dict(raw.get("context", {}).get("traits", {}))
    if raw["type"] == "identify":
        updates.update(raw.get("traits", {}))
    return updates


def account_updates(raw: dict[str, Any]) -> dict[str, Any]:
    """A group call's traits, which are the account's."""
    return dict(raw.get("traits", {})) if raw["type"] == "group" else {}


def expected(world: World, stream: list[dict[str, Any]], outcomes: list[MessageOutcome]) -> dict[str, Any]:
    """Per root: its traits and its message ids, from the stream, the outcomes and the final roots alone."""
    store, space = world.store, world.space().name
    traits: dict[str, dict[str, tuple[tuple[str, int], Any]]] = {}
    messages: dict[str, set[str]] = {}
    for index, (raw, outcome) in enumerate(zip(stream, outcomes, strict=True)):
        assert outcome.status == "resolved", outcome
        for profile_id, updates in (
            (outcome.profile_id, user_updates(raw)),
            (outcome.account_id, account_updates(raw)),
        ):
            if profile_id is None:
                continue
            root = store.resolve_segment_id(space, profile_id)
            assert root is not None
            messages.setdefault(root, set()).add(raw["messageId"])
            family = traits.setdefault(root, {})
            order = (raw["timestamp"], index)  # the same format throughout: text order is time order
            for key, value in updates.items():
                if key not in family or family[key][0] <= order:
                    family[key] = (order, value)
    return {
        root: (
            {key: value for key, (_, value) in family.items() if value is not None},
            messages[root],
        )
        for root, family in traits.items()
    }


def check(world: World, stream: list[dict[str, Any]]) -> None:
    space = world.space()
    outcomes = space.ingest(stream).outcomes
    oracle = expected(world, stream, outcomes)
    roots = set(space.roots("users")) | set(space.roots("accounts"))
    assert roots == set(oracle)
    for root, (traits, message_ids) in oracle.items():
        assert world.store.traits(space.name, root) == traits, (root, stream)
        assert {event.message_id for event in world.store.events(space.name, root, limit=1000)} == message_ids
        assert world.store.event_count(space.name, root) == len(message_ids)
    # Every merged child's segment id names its root, so reads through it show the root's traits.
    for row in world.store.dump(space.name)["profiles"]:
        if row[2]:
            assert world.store.resolve_segment_id(space.name, row[0]) == row[2]


@contextmanager
def world_on(url: str, config: Config | None = None) -> Iterator[World]:
    world = World(open_store(url), config or Config.default())
    try:
        yield world
    finally:
        world.close()


@pytest.mark.parametrize("url", ["memory://", "sqlite://"])
@FAST
@given(stream=streams())
def test_traits_and_events_of_every_root_match_the_oracle(url: str, stream: list[dict[str, Any]]) -> None:
    """Newest timestamp wins per key (later-ingested on a tie) across merges either way, backfills, nulls."""
    with world_on(url) as world:
        check(world, stream)


@POSTGRES
@given(stream=streams())
def test_traits_and_events_match_the_oracle_on_postgres(
    postgres_database: str, stream: list[dict[str, Any]]
) -> None:
    """The same oracle on PostgreSQL (a fresh schema per example)."""
    with world_on(new_schema(postgres_database)) as world:
        check(world, stream)


def test_sqlite_file_store_agrees_too(tmp_path: Path) -> None:
    """A file store (what `idstitch serve` uses) on one fixed stream with a tie decided across a merge."""
    stream = [
        {"type": "identify", "userId": "u1", "traits": {"plan": "a"}},
        {"type": "identify", "anonymousId": "a1", "traits": {"plan": "b"}},
        {"type": "identify", "userId": "u1", "anonymousId": "a1"},
    ]
    stamp = format_timestamp(BASE)
    stream = [{**raw, "messageId": f"f{index}", "timestamp": stamp} for index, raw in enumerate(stream)]
    with world_on(f"sqlite:///{tmp_path}/idstitch.db") as world:
        check(world, stream)


API_CONFIG = """
[spaces.app]
profile_tokens = ["pt_app"]
[spaces.app.sources.web]
write_key = "wk_web"
"""
AUTH = {"Authorization": "Basic " + base64.b64encode(b"pt_app:").decode()}


async def api_views(world: World, refs: list[tuple[str, str]]) -> dict[tuple[str, str], tuple[Any, set[str]]]:
    """Each (collection, id)'s traits and event message ids as the Profile API shows them."""
    transport = httpx.ASGITransport(app=ProfileAPI(world.engine))
    views: dict[tuple[str, str], tuple[Any, set[str]]] = {}
    async with httpx.AsyncClient(
        transport=transport, base_url="http://idstitch.test", headers=AUTH
    ) as client:
        for collection, ref in refs:
            base = f"/v1/spaces/app/collections/{collection}/profiles/{ref}"
            traits = await client.get(f"{base}/traits", params={"limit": 200})
            assert traits.status_code == 200, traits.text
            message_ids: set[str] = set()
            params: dict[str, Any] = {"limit": 100}
            while True:
                events = await client.get(f"{base}/events", params=params)
                assert events.status_code == 200, events.text
                body = events.json()
                message_ids |= {item["message_id"] for item in body["data"]}
                if not body["cursor"]["has_more"]:
                    break
                params = {"limit": 100, "next": body["cursor"]["next"]}
            views[collection, ref] = (traits.json()["traits"], message_ids)
    return views


@FAST
@given(stream=streams())
def test_the_profile_api_shows_the_roots_traits_and_events_by_any_of_its_ids(
    stream: list[dict[str, Any]],
) -> None:
    """By a merged child's segment id or any identifier, /traits and /events show the root's (the oracle's)."""
    with world_on("sqlite://", config_from_toml(API_CONFIG)) as world:
        space = world.space()
        outcomes = space.ingest(stream).outcomes
        oracle = expected(world, stream, outcomes)
        dump = world.store.dump(space.name)
        refs = {
            (row[1], row[0]): row[2] or row[0] for row in dump["profiles"]
        }  # every segment id, merged too
        for row in dump["identifiers"]:
            root = world.store.find_profile(space.name, Identifier(row[1], row[2], row[0]))
            assert root is not None
            refs[row[0], f"{row[1]}:{quote(row[2], safe='')}"] = root
        views = asyncio.run(api_views(world, list(refs)))
        for ref, root in refs.items():
            assert views[ref] == oracle[root], (ref, stream)
