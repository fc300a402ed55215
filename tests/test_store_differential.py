"""Differential property test: adversarial streams through the engine on memory, SQLite and PostgreSQL.

SPEC §5: the same messages in the same order give an identical graph, ids included, on every store and
whatever the batching. Hypothesis writes valid but awkward streams (shared devices, aliases back and
forth, group calls, caps and limits reached, blocked values, suspects, traits of every JSON shape,
timestamps out of order, retried message ids, two spaces), ingests them in one transaction, one per
message and in random splits into every store, and compares everything a user can read: each profile's
`idstitch profile --json` document, explain and graph documents, events, stats, suspects, unresolved.

A second property holds spaces apart: each space of a store that received both reads exactly as a store
that received only that space's messages.

IDSTITCH_DIFFERENTIAL_EXAMPLES sets how many streams (default 12, ~15 s, and half as many for the second
property, ~10 s; 200 and more find rarer cases).
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from datetime import timedelta, timezone
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helpers import BASE, RECEIVED, config_from_toml
from idstitch.cli import _profile_document
from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import Message, decode_document, format_timestamp, parse_message
from idstitch.engine import Engine, IngestBatch
from idstitch.profiles import explain_document, find_root, graph_document
from idstitch.storage.base import EventQuery, EventRecord, Store
from idstitch.storage.sqlite import SQLiteStore
from idstitch.storage.urls import open_store

CONFIG = config_from_toml(
    """
[spaces.p]
max_merges = 2
max_identifiers = 7
[spaces.p.identifiers.anonymous_id]
limit = 2
window = "weekly"
[spaces.p.identifiers.email]
limit = 1
window = "monthly"
[spaces.p.identifiers.phone]
priority = 3
limit = 1
window = "ever"
trait_keys = ["phone"]
[spaces.p.blocked]
exact = ["junk"]
regex = ["^bad-"]
[spaces.p.sources.web]
write_key = "wk_diff_p_web"
[spaces.p.sources.crm]
write_key = "wk_diff_p_crm"
merge = false
[spaces.q]
[spaces.q.sources.web]
write_key = "wk_diff_q_web"
"""
)
SOURCES = {"p": [None, "web", "crm"], "q": [None, "web"]}

EXAMPLES = int(os.environ.get("IDSTITCH_DIFFERENTIAL_EXAMPLES", "12"))
# Mostly a few common values (so that streams merge, reach limits and caps, and turn up suspects), now
# and then something awkward: unicode, NUL (U+FFFD after decoding), ESC and zero-width characters,
# Unicode spaces and a BOM around an email, blocked values, numbers.
ODD_USER_IDS = ["Ü1", "u\x00", "U1", "\U0001f600", "junk", "null", "0000", "bad-x", 7, 2**70]
USER_IDS = ["u1", "u2", "u3", "u1", "u2", *ODD_USER_IDS]
ANONYMOUS_IDS = ["a1", "a2", "a3", "a1", "a2", "a4", "ä\u0301", "undefined", "-1", "\x1b[0m", "a\u200b1"]
# A no-break and an ideographic space are trimmed as the blank is (e1@x.io); a BOM is no space: another email.
EMAILS = ["e1@x.io", " E1@X.io ", "e2@x.io", "ü@x.io", "null", "\u00a0e1@x.io\u3000", "\ufeffe1@x.io"]
DEVICES = ["d1", "d2", "shared"]
GROUP_IDS = ["g1", "g2", "g\u00e9", "none", 42]
PHONES = ["+1555", "+1666", "junk"]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from([0, -1, 2**53 + 1, 2**63 - 1, -(2**63), 2**64, 10**30, -(10**25)]),
    st.integers(-(10**6), 10**6),
    st.sampled_from([0.1, -0.0, 1.0, 1e300, -2.5e-308, 5e-324, 1.7976931348623157e308, 3.141592653589793]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", "x", "ü", "\U0001f600", "a\u0301", "line\nbreak", '"quoted"', "\\", "\t"]),
    st.text(max_size=8),
)
json_values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=3),
        st.dictionaries(st.sampled_from(["a", "b", "Ü", "\U0001f600", "", "z"]), inner, max_size=3),
    ),
    max_leaves=6,
)
trait_keys = st.sampled_from(
    ["plan", "name", "Plan", "k\x00", "ü", "\U0001f600", "nested", "n", "phone", "x" * 40]
)


@st.composite
def timestamps(draw: st.DrawFn) -> str:
    # Few distinct moments: ties (same timestamp, different messages) are where orders can differ.
    moment = BASE + timedelta(
        hours=draw(st.sampled_from([0, 1, 30, 24 * 8, 24 * 35]) | st.integers(0, 24 * 40)),
        microseconds=draw(st.sampled_from([0, 1, 999_999])),
    )
    style = draw(st.integers(0, 4))
    if style == 1:  # the same moment in another zone
        zone = timezone(timedelta(hours=draw(st.sampled_from([5.5, -8, 14]))))
        return moment.astimezone(zone).isoformat()
    if style == 2:  # as some clients write it
        return format_timestamp(moment).replace("T", "t").lower() + " "
    if style == 3:
        return "not a time"  # the server's time is used
    return format_timestamp(moment)


@st.composite
def message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["identify", "identify", "track", "page", "screen", "group", "alias", "bad"]))
    if kind == "bad":  # rejected, with its reason, wherever it stands in a batch
        return draw(st.sampled_from([{"type": "track", "userId": "u1"}, {"type": "identify", "traits": 3}]))
    raw: dict[str, Any] = {"type": kind}
    if draw(st.integers(0, 9)):
        raw["timestamp"] = draw(timestamps())
    if kind == "alias":
        raw["userId"] = draw(st.sampled_from(USER_IDS[:5]))
        raw["previousId"] = draw(st.sampled_from([*USER_IDS[:5], "a1", "a2", "null"]))
        return raw
    user_id = draw(st.none() | st.sampled_from(USER_IDS))
    anonymous_id = draw(st.none() | st.sampled_from(ANONYMOUS_IDS))
    if user_id is not None:
        raw["userId"] = user_id
    if anonymous_id is not None or user_id is None:
        raw["anonymousId"] = anonymous_id if anonymous_id is not None else "a1"
    if kind == "track":
        raw["event"] = draw(st.sampled_from(["Signed Up", "Order \U0001f600", "x"]))
        if draw(st.booleans()):
            raw["properties"] = draw(st.dictionaries(trait_keys, json_values, max_size=3))
    if kind in ("page", "screen") and draw(st.booleans()):
        raw["name"] = draw(st.sampled_from(["Home", "ü"]))
    if kind == "group":
        raw["groupId"] = draw(st.sampled_from(GROUP_IDS))
    traits = draw(st.dictionaries(trait_keys, json_values, max_size=4))
    context: dict[str, Any] = {}
    email = draw(st.none() | st.sampled_from(EMAILS))
    if email is not None:
        if kind in ("identify", "group") and draw(st.booleans()):
            traits["email"] = email
        else:
            context["traits"] = {"email": email}
    if draw(st.integers(0, 3)) == 0:
        traits["phone"] = draw(st.sampled_from(PHONES))
    if traits and kind in ("identify", "group"):
        raw["traits"] = traits
    if draw(st.integers(0, 2)) == 0:
        context["device"] = {
            "id": draw(st.sampled_from(DEVICES)),
            "type": draw(st.sampled_from(["android", "ios"])),
            "advertisingId": draw(st.sampled_from(["ad1", "ad2"])),
            "adTrackingEnabled": draw(st.booleans()),
        }
    if draw(st.integers(0, 4)) == 0:
        context["externalIds"] = [
            {
                **draw(
                    st.sampled_from(
                        [
                            {"id": "c1", "encoding": "none"},
                            {"id": "c2", "encoding": "none"},
                            {"id": "junk", "encoding": "none"},
                            {"id": "YzE=", "encoding": "base64"},  # c1
                            {"id": "YwBi", "encoding": "base64"},  # c, NUL, b
                        ]
                    )
                ),
                "type": draw(st.sampled_from(["crm_id", "shop_id"])),
                "collection": draw(st.sampled_from(["users", "users", "accounts"])),
            }
        ]
    if context:
        raw["context"] = context
    return raw


@st.composite
def streams(draw: st.DrawFn) -> list[tuple[str, str | None, dict[str, Any]]]:
    """(space, source, message) in order; ids unique, except retries (same or changed body) of earlier ids."""
    result: list[tuple[str, str | None, dict[str, Any]]] = []
    for index in range(draw(st.integers(1, 30))):
        space = draw(st.sampled_from(["p", "p", "q"]))
        source = draw(st.sampled_from(SOURCES[space]))
        if result and draw(st.integers(0, 7)) == 0:
            earlier_space, earlier_source, earlier = draw(st.sampled_from(result))
            again = (
                dict(earlier)
                if draw(st.booleans())
                else {**draw(message()), "messageId": earlier["messageId"]}
            )
            retried_in = earlier_space if draw(st.booleans()) else space
            # Sent again into another space: by a source that space has (an unknown one is a ConfigError).
            result.append(
                (retried_in, earlier_source if earlier_source in SOURCES[retried_in] else source, again)
            )
        else:
            result.append((space, source, {**draw(message()), "messageId": f"m{index}"}))
    return result


@st.composite
def linking(draw: st.DrawFn) -> dict[str, Any]:
    """An identify with one to three ids of a tiny pool, at one of few moments: chains of merges to the caps."""
    raw: dict[str, Any] = {"type": "identify", "timestamp": draw(timestamps())}
    context: dict[str, Any] = {}
    for item in draw(
        st.lists(
            st.sampled_from(["a1", "a2", "a3", "e1", "e2", "d1", "c1", "u1", "u2"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    ):
        kind, number = item[0], item[1:]
        if kind == "a":
            raw["anonymousId"] = item
        elif kind == "u":
            raw["userId"] = item
        elif kind == "e":
            context["traits"] = {"email": f"e{number}@x.io"}
        elif kind == "d":
            context["device"] = {"id": item, "type": "ios"}
        else:
            context["externalIds"] = [
                {"id": item, "type": "crm_id", "collection": "users", "encoding": "none"}
            ]
    if context:
        raw["context"] = context
    if draw(st.booleans()):
        raw["traits"] = {draw(trait_keys): draw(json_values)}
    return raw


@st.composite
def linking_streams(draw: st.DrawFn) -> list[tuple[str, str | None, dict[str, Any]]]:
    items = draw(st.lists(linking(), min_size=5, max_size=50))
    space = draw(st.sampled_from(["p", "q"]))
    return [
        (space, draw(st.sampled_from(SOURCES[space])), {**item, "messageId": f"k{index}"})
        for index, item in enumerate(items)
    ]


def _parse(raw: dict[str, Any]) -> Message | InvalidEvent:
    try:
        # As the HTTP edge and file ingestion do: the message as JSON bytes, decoded leniently.
        return parse_message(decode_document(msgspec.json.encode(raw)), received_at=RECEIVED)
    except InvalidEvent as error:
        return error


def _ingest(
    opener: Callable[[], Store], stream: list[tuple[str, str | None, dict[str, Any]]], cuts: list[int]
) -> tuple[Store, list[Any]]:
    """The stream in transactions ending at `cuts`; the store and the outcomes (indexes left out).

    `opener` opens the store; when it opens a new one each time (a file store), the store is closed and
    opened again between transactions: a restart, with a cold cache.
    """
    store = opener()
    engine = Engine(store, CONFIG)
    outcomes: list[Any] = []
    start = 0
    for end in [*cuts, len(stream)]:
        chunk = stream[start:end]
        start = end
        if not chunk:
            continue
        # One transaction per chunk (ingest_group); each run of one space and source is a caller's batch.
        batches: list[IngestBatch] = []
        for space, source, raw in chunk:
            if batches and (space, source) == (batches[-1].space, batches[-1].source):
                batches[-1].items.append(_parse(raw))
            else:
                batches.append(IngestBatch([_parse(raw)], space, source))
        try:
            results = engine.ingest_group(batches)
        except BaseException:
            store.close()
            raise
        for result in results:
            outcomes += [msgspec.structs.astuple(outcome)[1:] for outcome in result.outcomes]
        reopened = opener()
        if reopened is not store:
            store.close()
            store, engine = reopened, Engine(reopened, CONFIG)
    return store, outcomes


def _no_sequences(value: Any) -> Any:
    if isinstance(value, EventRecord):
        return msgspec.structs.replace(value, sequence=0)
    if isinstance(value, dict):
        return {key: _no_sequences(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_no_sequences(item) for item in value]
    return value


def _pages(store: Store, space: str, root: str) -> list[list[EventRecord]]:
    """event_page both ways, filtered by name and time, and walked on with its cursor."""
    first = store.event_page(space, root, EventQuery(limit=3))
    pages = [
        first,
        store.event_page(space, root, EventQuery(limit=3, descending=False, include=frozenset({"x", "ü"}))),
        store.event_page(
            space, root, EventQuery(limit=3, exclude=frozenset({"Order \U0001f600"}), start=BASE)
        ),
        store.event_page(space, root, EventQuery(limit=50, end=BASE + timedelta(days=8))),
    ]
    if first:
        after = (first[-1].timestamp, first[-1].message_id)
        pages.append(store.event_page(space, root, EventQuery(limit=3, after=after)))
        pages.append(store.event_page(space, root, EventQuery(limit=3, after=after, descending=False)))
    return pages


def _observe(store: Store) -> dict[str, Any]:
    """Everything a user can read of both spaces."""
    seen: dict[str, Any] = {}
    for space in ("p", "q"):
        dump = store.dump(space)
        roots = [row[0] for row in dump["profiles"] if row[2] == ""]
        seen[space] = {
            "dump": dump,
            "stats": store.stats(space),
            "suspects": store.suspects(space),
            "unresolved": store.unresolved(space, limit=1000),
            "learned": store.learned_types(space),
            "event_ids": sorted(store.iter_event_ids(space)),
            "resolutions": sorted(store.iter_event_resolutions(space), key=lambda item: item.message_id),
            "children": {row[0]: store.resolve_segment_id(space, row[0]) for row in dump["profiles"]},
            "found": [
                find_root(store, CONFIG.space(space).rules, space, f"{kind}:{value}", collection)
                for collection, kind, value, *_ in dump["identifiers"]
            ]
            + [find_root(store, CONFIG.space(space).rules, space, "email: E1@X.IO ")],
            "profiles": {
                root: {
                    "profile": _profile_document(store, space, root),
                    "explain": explain_document(store, space, root),
                    "graph": graph_document(store, space, root),
                    "trait_records": store.trait_records(space, root),
                    "activity": store.activity(space, root),
                    "events": store.events(space, root, limit=1000),
                    "pages": _pages(store, space, root),
                    "dropped": store.dropped(space, root),
                }
                for root in roots
            },
        }
    return _no_sequences(seen)


def _fresh_schema(database: str) -> tuple[str, str]:
    schema = f"audit_diff_{secrets.token_hex(5)}"
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(f'CREATE SCHEMA "{schema}"')
    return schema, f"{database}?options=-csearch_path%3D{schema}"


def _drop_schema(database: str, schema: str) -> None:
    with psycopg.connect(database, autocommit=True) as db:
        db.execute(f'DROP SCHEMA "{schema}" CASCADE')


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(stream=st.one_of(streams(), linking_streams()), data=st.data())
def test_every_store_and_batching_gives_the_same_observable_graph(
    stream: list[tuple[str, str | None, dict[str, Any]]],
    data: st.DataObject,
    postgres_database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    split = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=4))))
    batchings = {"one": [], "each": list(range(1, len(stream))), "split": split}
    reference: tuple[list[Any], dict[str, Any]] | None = None
    for adapter in ("memory", "sqlite", "sqlite-file", "postgres"):
        for name, cuts in batchings.items():
            if adapter == "sqlite-file" and name == "one":
                continue  # nothing to restart between
            schema = None
            opener: Callable[[], Store]
            if adapter == "postgres":
                schema, url = _fresh_schema(postgres_database)
                opened = open_store(url)
                opener = lambda opened=opened: opened  # noqa: E731
            elif adapter == "sqlite-file":
                # Reopened after every transaction, with a graph cache of two identifiers.
                path = tmp_path_factory.mktemp("differential") / "graph.db"
                opener = lambda path=path: SQLiteStore(path, cache_size=2)  # noqa: E731
            else:
                opened = open_store(f"{adapter}://")
                opener = lambda opened=opened: opened  # noqa: E731
            try:
                store, outcomes = _ingest(opener, stream, cuts)
                try:
                    seen = (outcomes, _observe(store))
                finally:
                    store.close()
            finally:
                if schema is not None:
                    _drop_schema(postgres_database, schema)
            if reference is None:
                reference = seen
                continue
            assert seen[0] == reference[0], (adapter, name, "outcomes")
            for space in ("p", "q"):
                for key, value in seen[1][space].items():
                    assert value == reference[1][space][key], (adapter, name, space, key)


def _opener(
    adapter: str, postgres_database: str, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Callable[[], Store], str | None]:
    """A store opener of the adapter, and the PostgreSQL schema to drop afterwards (None for the others)."""
    if adapter == "postgres":
        schema, url = _fresh_schema(postgres_database)
        opened = open_store(url)
        return (lambda: opened), schema
    if adapter == "sqlite-file":
        # Reopened after every transaction, with a graph cache of two identifiers (both spaces share it).
        path = tmp_path_factory.mktemp("isolation") / "graph.db"
        return (lambda: SQLiteStore(path, cache_size=2)), None
    opened = open_store(f"{adapter}://")
    return (lambda: opened), None


@settings(
    max_examples=max(1, EXAMPLES // 2),  # three stores per adapter and example
    deadline=None,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(stream=streams(), data=st.data())
def test_a_space_reads_the_same_whatever_another_space_of_the_store_receives(
    stream: list[tuple[str, str | None, dict[str, Any]]],
    data: st.DataObject,
    postgres_database: str,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    # SPEC §1: nothing crosses spaces. p and q (different rules) get the same user ids, devices, emails
    # and message ids, interleaved in shared transactions: everything a user can read of each space must
    # be what a store that only ever received that space's messages gives.
    split = sorted(set(data.draw(st.lists(st.integers(1, max(1, len(stream) - 1)), max_size=4))))
    for adapter in ("memory", "sqlite-file", "postgres"):
        seen: dict[str, dict[str, Any]] = {}
        for label, part, cuts in (
            ("both", stream, split),
            ("p", [item for item in stream if item[0] == "p"], []),
            ("q", [item for item in stream if item[0] == "q"], []),
        ):
            opener, schema = _opener(adapter, postgres_database, tmp_path_factory)
            try:
                store, _ = _ingest(opener, part, cuts)
                try:
                    seen[label] = _observe(store)
                finally:
                    store.close()
            finally:
                if schema is not None:
                    _drop_schema(postgres_database, schema)
        for space in ("p", "q"):
            for key, value in seen["both"][space].items():
                assert value == seen[space][space][key], (adapter, space, key)
