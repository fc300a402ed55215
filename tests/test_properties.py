"""Property tests of the graph's invariants over random Segment message streams (in-memory SQLite)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, Phase, find, given, settings
from hypothesis import strategies as st

from helpers import BASE, World, open_world
from idstitch.core.messages import format_timestamp
from idstitch.core.rules import WINDOWS
from idstitch.engine import MessageOutcome
from idstitch.storage.times import from_micros

ZEROS = "00000000-0000-0000-0000-000000000000"

# Tighter limits than the defaults so that random streams actually reach them.
TIGHT = """
[spaces.p]
[spaces.p.identifiers.anonymous_id]
limit = 2
window = "weekly"
[spaces.p.identifiers.email]
limit = 1
window = "monthly"
[spaces.p.identifiers."android.id"]
limit = 1
window = "daily"
"""
# A low merge cap alone (with a low identifier cap as well, the identifier cap is always reached first).
MERGE_CAPPED = """
[spaces.p]
max_merges = 1
"""
# A low identifier cap and blocked values of the space's own, so that random streams reach the caps (SPEC §4.6) and
# blocked values beyond the defaults are checked too.
CAPPED = """
[spaces.p]
max_identifiers = 4
[spaces.p.blocked]
exact = ["c2"]
regex = ["^d3$"]
"""
CONFIGS = {"default": None, "tight": TIGHT, "capped": CAPPED}
# The blocked values each config adds to the defaults, written out here rather than read from the rules
# the engine uses, so that a broken matcher cannot agree with itself.
DEFAULT_BLOCKED = {"-1", "null", "undefined", "none", "nil", "anonymous", "unknown", "[object Object]", ""}
EXTRA_BLOCKED = {"default": set(), "tight": set(), "capped": {"c2", "d3"}}


def is_blocked(value: str, config: str) -> bool:
    return value in DEFAULT_BLOCKED | EXTRA_BLOCKED[config] or set(value) <= {"0", "-"}


USER_IDS = [None, "u1", "u2", "u3", "U1", 7, "null", ""]
ANONYMOUS_IDS = [None, "a1", "a2", "a3", "a4", ZEROS, "undefined"]
EMAILS = [None, "e1@x.io", " E1@X.io ", "e2@x.io", "e3@x.io", "null", "-1"]
GROUP_IDS = ["g1", "g2", "none"]
PLANS = [None, "free", "pro"]

FAST = settings(
    max_examples=int(os.environ.get("IDSTITCH_PROPERTY_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@st.composite
def message(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["identify", "track", "page", "group", "alias", "identify", "track"]))
    raw: dict[str, Any] = {"type": kind}
    raw["timestamp"] = format_timestamp(BASE + timedelta(hours=draw(st.integers(0, 24 * 20))))
    user_id = draw(st.sampled_from(USER_IDS))
    anonymous_id = draw(st.sampled_from(ANONYMOUS_IDS))
    if kind == "alias":
        raw["userId"] = draw(st.sampled_from(["u4", "u5", "u1", "u2"]))  # new ids: migrations (E11)
        raw["previousId"] = draw(st.sampled_from(["u1", "u2", "a1", "a2", "a3", "x9", "null"]))
        return raw
    if user_id is not None:
        raw["userId"] = user_id
    if anonymous_id is not None:
        raw["anonymousId"] = anonymous_id
    if kind == "track":
        raw["event"] = draw(st.sampled_from(["Signed Up", "Order Completed"]))
    if kind == "group":
        raw["groupId"] = draw(st.sampled_from(GROUP_IDS))
    context: dict[str, Any] = {}
    traits: dict[str, Any] = {}
    email = draw(st.sampled_from(EMAILS))
    if email is not None:
        if kind == "identify" and draw(st.booleans()):
            traits["email"] = email
        else:
            context["traits"] = {"email": email}
    plan = draw(st.sampled_from(PLANS))
    if plan is not None or draw(st.booleans()):
        traits["plan"] = plan
    if traits:
        raw["traits"] = traits
    if draw(st.integers(0, 3)) == 0:
        context["device"] = {
            "id": draw(st.sampled_from(["d1", "d2", "d3"])),
            "type": draw(st.sampled_from(["android", "ios"])),
            "advertisingId": draw(st.sampled_from(["ad1", "ad2"])),
            "adTrackingEnabled": draw(st.booleans()),
        }
    if draw(st.integers(0, 5)) == 0:
        context["externalIds"] = [
            {
                "id": draw(st.sampled_from(["c1", "c2"])),
                "type": "crm_id",
                "collection": "users",
                "encoding": "none",
            }
        ]
    if context:
        raw["context"] = context
    return raw


@st.composite
def streams(draw: st.DrawFn, max_size: int = 25) -> list[dict[str, Any]]:
    items = draw(st.lists(message(), min_size=1, max_size=max_size))
    # Unique message ids, except for the occasional deliberate retry of an earlier message.
    result: list[dict[str, Any]] = []
    for index, item in enumerate(items):
        if result and draw(st.integers(0, 9)) == 0:
            result.append(dict(draw(st.sampled_from(result))))
        else:
            result.append({**item, "messageId": f"p{index}"})
    return result


@st.composite
def login(draw: st.DrawFn) -> dict[str, Any]:
    raw: dict[str, Any] = {
        "type": "identify",
        "timestamp": format_timestamp(BASE + timedelta(hours=draw(st.integers(0, 24 * 16)))),
        "anonymousId": draw(st.sampled_from(["a1", "a2", "a3", "a4", "a5"])),
    }
    user_id = draw(st.sampled_from(["u1", "u1", "u2", None]))
    if user_id is not None:
        raw["userId"] = user_id
    email = draw(st.sampled_from([None, None, "e1@x.io", "e2@x.io", "e3@x.io"]))
    if email is not None:
        raw["context"] = {"traits": {"email": email}}
    return raw


def login_streams() -> st.SearchStrategy[list[dict[str, Any]]]:
    """Few people logging in from a few devices over a month: streams that reach windowed limits."""
    return st.lists(login(), min_size=8, max_size=30).map(
        lambda items: [{**item, "messageId": f"l{index}"} for index, item in enumerate(items)]
    )


def run(
    stream: list[dict[str, Any]], config: str | None, batches: list[int] | None = None
) -> tuple[World, list[MessageOutcome]]:
    """Ingest `stream` into a fresh in-memory store, in batches of the given sizes (one batch if None)."""
    world = open_world(None, config)
    space = world.space()
    outcomes: list[MessageOutcome] = []
    start = 0
    for size in batches or [len(stream)]:
        if start >= len(stream):
            break
        outcomes += space.ingest(stream[start : start + size]).outcomes
        start += size
    if start < len(stream):
        outcomes += space.ingest(stream[start:]).outcomes
    return world, outcomes


def graph_of(stream: list[dict[str, Any]], config: str | None, batches: list[int] | None = None) -> World:
    return run(stream, config, batches)[0]


def dump(world: World) -> dict[str, Any]:
    space = world.space()
    return world.store.dump(space.name)


@st.composite
def linking(draw: st.DrawFn) -> dict[str, Any]:
    """An identify carrying one to three identifiers of a small pool, mostly without a user_id.

    Without user_ids (limit 1) to stand in the way, messages that share one identifier with one profile and
    another with a second one merge them: chains of merges that reach the caps.
    """
    pool = draw(
        st.lists(
            st.sampled_from(["a1", "a2", "a3", "e1", "e2", "e3", "d1", "d2", "c1", "c2", "c3", "u1", "u2"]),
            min_size=1,
            max_size=3,
            unique=True,
        )
    )
    raw: dict[str, Any] = {
        "type": "identify",
        "timestamp": format_timestamp(BASE + timedelta(hours=draw(st.integers(0, 24 * 10)))),
    }
    context: dict[str, Any] = {}
    for item in pool:
        kind, number = item[0], item[1:]
        if kind == "a":
            raw["anonymousId"] = f"a{number}"
        elif kind == "u":
            raw["userId"] = f"u{number}"
        elif kind == "e":
            context["traits"] = {"email": f"e{number}@x.io"}
        elif kind == "d":
            context["device"] = {"id": f"d{number}", "type": "ios"}
        else:
            context["externalIds"] = [
                {"id": f"c{number}", "type": "crm_id", "collection": "users", "encoding": "none"}
            ]
    if context:
        raw["context"] = context
    return raw


def linking_streams() -> st.SearchStrategy[list[dict[str, Any]]]:
    return st.lists(linking(), min_size=4, max_size=20).map(
        lambda items: [{**item, "messageId": f"k{index}"} for index, item in enumerate(items)]
    )


configs = st.sampled_from(sorted(CONFIGS))
any_stream = st.one_of(streams(), login_streams(), linking_streams())


# ---------------------------------------------------------------------------------------------


@FAST
@given(stream=any_stream, config=configs)
def test_every_identifier_is_owned_by_one_root_of_its_collection(
    stream: list[dict[str, Any]], config: str
) -> None:
    world = graph_of(stream, CONFIGS[config])
    try:
        graph = dump(world)
        profiles = {row[0]: row for row in graph["profiles"]}
        roots = {segment_id for segment_id, row in profiles.items() if row[2] == ""}
        seen: set[tuple[str, str, str]] = set()
        for collection, kind, value, profile_id, *_ in graph["identifiers"]:
            assert (collection, kind, value) not in seen
            seen.add((collection, kind, value))
            assert profile_id in roots, f"{kind}:{value} owned by non-root {profile_id}"
            assert profiles[profile_id][1] == collection
    finally:
        world.close()


@FAST
@given(stream=any_stream, config=configs)
def test_no_profile_exceeds_a_limit_within_its_window(stream: list[dict[str, Any]], config: str) -> None:
    check_limits(stream, CONFIGS[config])


@settings(FAST, max_examples=100)
@given(stream=login_streams())
def test_no_profile_exceeds_a_windowed_limit_over_a_month_of_logins(stream: list[dict[str, Any]]) -> None:
    check_limits(stream, TIGHT)


@FAST
@given(stream=linking_streams(), config=st.sampled_from([MERGE_CAPPED, CAPPED]))
def test_no_profile_passes_the_caps_of_merges_and_identifiers(
    stream: list[dict[str, Any]], config: str
) -> None:
    check_limits(stream, config)


def check_limits(stream: list[dict[str, Any]], config: str | None) -> None:
    world = graph_of(stream, config)
    try:
        space = world.space()
        rules = space.rules
        graph = dump(world)
        values: dict[tuple[str, str], dict[str, datetime]] = defaultdict(dict)
        for _collection, kind, value, profile_id, _first, last_seen, retired, _owner in graph["identifiers"]:
            if not retired:
                values[(profile_id, kind)][value] = from_micros(last_seen)
        for (profile_id, kind), seen in values.items():
            rule = rules.rule(kind)
            window = WINDOWS[rule.window]
            if window is None:
                assert len(seen) <= rule.limit, (profile_id, kind, seen)
                continue
            for end in seen.values():
                inside = [v for v, last in seen.items() if end - window < last <= end]
                assert len(inside) <= rule.limit, (profile_id, kind, rule.describe(), seen)
        # the explicit ones of the brief
        for (_, kind), seen in values.items():
            if kind in ("user_id", "group_id"):
                assert len(seen) <= 1
        # The caps (SPEC §4.6): identifiers per profile (retired ones included) and profiles merged into
        # one, counted from the graph itself and as the profile records them.
        held = Counter(row[3] for row in graph["identifiers"])
        for profile_id, count in held.items():
            assert count <= rules.max_identifiers, (profile_id, count, rules.max_identifiers)
        merged_into = Counter(
            world.store.resolve_segment_id(space.name, row[0]) for row in graph["profiles"] if row[2]
        )
        for segment_id, _collection, parent, _created, merge_count in graph["profiles"]:
            if parent == "":
                assert merged_into[segment_id] == merge_count, (segment_id, merge_count)
                assert merge_count <= rules.max_merges, (segment_id, merge_count, rules.max_merges)
    finally:
        world.close()


@FAST
@given(stream=any_stream, config=configs)
def test_blocked_values_are_never_stored(stream: list[dict[str, Any]], config: str) -> None:
    world = graph_of(stream, CONFIGS[config])
    try:
        blocked = world.space().rules.blocked
        graph = dump(world)
        for _collection, kind, value, *_ in graph["identifiers"]:
            assert not blocked.matches(value), f"{kind}:{value}"
            assert not is_blocked(value, config), f"{kind}:{value}"
        # nor are they ever suspect, evidence, or the identifier a merge went by
        for _collection, kind, value, _evidence_type, evidence in graph["suspects"]:
            assert not is_blocked(value, config), f"suspect {kind}:{value}"
            assert not any(is_blocked(item, config) for item in json.loads(evidence)), (kind, value, evidence)
        for *_, via, _at in graph["merges"]:
            assert not is_blocked(via.split(":", 1)[1], config), via
        # every blocked value a message carried is on record as dropped by a blocked rule
        for message_id, identifier, rule, _profile in graph["dropped"]:
            if is_blocked(identifier.split(":", 1)[1], config):
                assert rule.startswith("blocked"), (message_id, identifier, rule)
    finally:
        world.close()


@FAST
@given(stream=any_stream, config=configs)
def test_same_messages_same_order_give_the_same_graph(stream: list[dict[str, Any]], config: str) -> None:
    first, second = graph_of(stream, CONFIGS[config]), graph_of(stream, CONFIGS[config])
    try:
        assert dump(first) == dump(second)
    finally:
        first.close()
        second.close()


# Rebuilds graphs in a process of its own: what a restart, a replay on another machine or a backfill does.
REBUILD = """
import json, sys
sys.path.insert(0, sys.argv[1])
from test_properties import CONFIGS, dump, graph_of
graphs = []
for stream, config in json.load(sys.stdin):
    world = graph_of(stream, CONFIGS[config])
    graphs.append(dump(world))
    world.close()
print(json.dumps(graphs))
"""


@settings(FAST, max_examples=2)
@given(cases=st.lists(st.tuples(any_stream, configs), min_size=12, max_size=12))
def test_another_process_builds_the_same_graph_ids_included(
    cases: list[tuple[list[dict[str, Any]], str]],
) -> None:
    """Segment ids and every row must not depend on the process (str hash seeds, id() or the clock)."""
    here = []
    for stream, config in cases:
        world = graph_of(stream, CONFIGS[config])
        try:
            here.append(dump(world))
        finally:
            world.close()
    tests = str(Path(__file__).resolve().parent)
    env = {
        **os.environ,
        "PYTHONHASHSEED": "12345" if os.environ.get("PYTHONHASHSEED") != "12345" else "54321",
    }
    done = subprocess.run(
        [sys.executable, "-c", REBUILD, tests],
        input=json.dumps(cases),
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    there = json.loads(done.stdout)
    assert len(there) == len(cases)
    for index, (mine, theirs) in enumerate(zip(here, there, strict=True)):
        assert json.loads(json.dumps(mine)) == theirs, index
    assert any(graph["profiles"] for graph in here)


@FAST
@given(stream=any_stream, config=configs)
def test_ingesting_twice_is_ingesting_once(stream: list[dict[str, Any]], config: str) -> None:
    world = graph_of(stream, CONFIGS[config])
    doubled = graph_of(stream + stream, CONFIGS[config])  # the whole stream again inside one batch
    try:
        once = dump(world)
        again = world.space().ingest(stream)
        assert {o.status for o in again.outcomes} <= {"duplicate", "rejected"}
        stored = set(ids(world))
        assert again.count("duplicate") == sum(1 for raw in stream if raw["messageId"] in stored)
        assert dump(world) == once
        assert dump(doubled) == once
    finally:
        world.close()
        doubled.close()


def ids(world: World) -> list[str]:
    return list(world.store.iter_event_ids(world.space().name))


@FAST
@given(stream=any_stream, config=configs)
def test_merged_children_resolve_to_their_root(stream: list[dict[str, Any]], config: str) -> None:
    world = graph_of(stream, CONFIGS[config])
    try:
        name = world.space().name
        graph = dump(world)
        parents = {row[0]: row[2] for row in graph["profiles"]}
        for segment_id, parent in parents.items():
            root = world.store.resolve_segment_id(name, segment_id)
            if parent == "":
                assert root == segment_id
                assert world.store.profile(name, segment_id) is not None
            else:
                assert root == parent and parents[parent] == ""
                assert world.store.profile(name, segment_id) is None
        for parent_id, child_id, *_ in graph["merges"]:
            assert world.store.resolve_segment_id(name, child_id) == world.store.resolve_segment_id(
                name, parent_id
            )
        for _message_id, profile_id, account_id, _identifiers in graph["events"]:
            for segment_id in (profile_id, account_id):
                if segment_id:
                    assert parents[str(world.store.resolve_segment_id(name, segment_id))] == ""
    finally:
        world.close()


@FAST
@given(stream=any_stream, config=configs)
def test_each_message_is_stored_exactly_once(stream: list[dict[str, Any]], config: str) -> None:
    world, outcomes = run(stream, CONFIGS[config])
    try:
        space = world.space()
        stored = ids(world)
        assert len(stored) == len(set(stored))
        landed = [o for o in outcomes if o.status in ("resolved", "unresolved")]
        assert len(landed) == len(stored)
        assert {o.message_id for o in landed} == set(stored)
        for outcome in outcomes:
            if outcome.status == "duplicate":
                assert outcome.message_id in stored
            if outcome.status == "rejected":
                assert outcome.error
        graph = dump(world)
        assert world.store.stats(space.name).events == len(stored) == len(graph["events"])
        # every event is counted once, on the profile it belongs to (families included)
        on_users = sum(1 for row in graph["events"] if row[1])
        assert sum(world.store.event_count(space.name, root) for root in space.roots()) == on_users
        on_accounts = sum(1 for row in graph["events"] if row[2])
        assert (
            sum(world.store.event_count(space.name, root) for root in space.roots("accounts")) == on_accounts
        )
        unresolved = {row[0] for row in graph["events"] if not row[1] and not row[2]}
        assert unresolved == {o.message_id for o in outcomes if o.status == "unresolved"}
        assert world.store.stats(space.name).unresolved == len(unresolved)
    finally:
        world.close()


@FAST
@given(stream=any_stream, config=configs, data=st.data())
def test_batch_boundaries_do_not_matter(
    stream: list[dict[str, Any]], config: str, data: st.DataObject
) -> None:
    sizes = data.draw(st.lists(st.integers(1, 5), min_size=1, max_size=len(stream)))
    whole = graph_of(stream, CONFIGS[config])
    split = graph_of(stream, CONFIGS[config], sizes)
    single = graph_of(stream, CONFIGS[config], [1] * len(stream))
    try:
        assert dump(whole) == dump(split) == dump(single)
    finally:
        whole.close()
        split.close()
        single.close()


# -- the generators reach every situation the invariants are about -------------------------------------


def situations(stream: list[dict[str, Any]], config: str) -> set[str]:
    """What ingesting `stream` under `config` did, in the words of the invariants above."""
    world, outcomes = run(stream, CONFIGS[config])
    try:
        graph = dump(world)
        found = {outcome.status for outcome in outcomes}
        rules = [row[2] for row in graph["dropped"]]
        if graph["merges"]:
            found.add("merge")
        if any(row[4] >= 2 for row in graph["profiles"]):
            found.add("merge chain")
        if any("limit" in rule for rule in rules):
            found.add("limit violation")
        if any(rule.startswith("blocked") for rule in rules):
            found.add("blocked value")
        if any(
            row[2].startswith("blocked") and row[1].split(":", 1)[1] in EXTRA_BLOCKED[config]
            for row in graph["dropped"]
        ):
            found.add("space's own blocked value")
        if any(rule.startswith("cap ") for rule in rules):
            found.add("cap")
        if graph["suspects"]:
            found.add("suspect")
        if any(row[6] for row in graph["identifiers"]):
            found.add("retired")
        if graph["links"]:
            found.add("account link")
        return found
    finally:
        world.close()


@pytest.mark.parametrize(
    "situation",
    [
        "merge",
        "merge chain",
        "limit violation",
        "blocked value",
        "space's own blocked value",
        "cap",
        "suspect",
        "unresolved",
        "duplicate",
        "retired",
        "account link",
    ],
)
def test_the_generated_streams_reach(situation: str) -> None:
    """Each invariant is tested on streams that can break it: merges, limit drops, blocked values, caps,
    suspects, unresolved messages, retries, alias migrations and account links all occur."""
    found = find(
        st.tuples(any_stream, configs),
        lambda case: situation in situations(*case),
        settings=settings(max_examples=1000, phases=[Phase.generate], database=None, deadline=None),
        # Seeded: the rarest situations (a retired user_id) were missed by about one run in twenty.
        random=random.Random(situation),
    )
    assert situation in situations(*found)
