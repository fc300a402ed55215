"""The store contract suite: what every Store adapter must do, written only against storage/base.py.

A test module runs it for its adapters with `from store_contract import *` and two fixtures:

- `store`: a fresh, migrated, empty Store;
- `reopen`: a callable that closes `store` and opens it again from the same URL (returning the new
  Store); tests that take it run only on adapters that persist.

Resolutions are built by hand (core/resolve.py dataclasses), so the tests pin the store alone.
Where an adapter-specific exception is expected (uniqueness), any Exception is accepted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgspec
import psycopg
import pytest

from idstitch.core.graph import GraphView, ProfileState, StoredIdentifier
from idstitch.core.identifiers import Dropped, Identifier
from idstitch.core.resolve import MergeStep, Resolution, SuspectMark
from idstitch.storage.base import (
    DroppedRecord,
    EventQuery,
    EventRecord,
    EventResolution,
    IdentifierRecord,
    IntegrityError,
    LinkRecord,
    MergeRecord,
    ProfileActivity,
    ProfileRecord,
    SourceRecord,
    SpaceStats,
    Store,
    StoreTransaction,
    SuspectRecord,
    TokenRecord,
    TraitRecord,
)
from idstitch.storage.times import to_micros

Reopen = Callable[[], Store]

SPACE = "contract"
OTHER = "other"
T0 = datetime(2026, 1, 1, tzinfo=UTC)


# -- helpers ----------------------------------------------------------------------------------------
def t(seconds: float) -> datetime:
    """A time `seconds` after T0."""
    return T0 + timedelta(seconds=seconds)


def us(seconds: float) -> int:
    """The same time as integer microseconds (how dump() reports times)."""
    return to_micros(t(seconds))


def uid(value: str) -> Identifier:
    return Identifier("user_id", value)


def anon(value: str) -> Identifier:
    return Identifier("anonymous_id", value)


def email(value: str) -> Identifier:
    return Identifier("email", value)


def group(value: str) -> Identifier:
    return Identifier("group_id", value, "accounts")


def resolution(
    profile_id: str,
    at: datetime,
    *,
    collection: str = "users",
    created: bool = False,
    merges: tuple[MergeStep, ...] = (),
    added: tuple[Identifier, ...] = (),
    touched: tuple[Identifier, ...] = (),
    dropped: tuple[Dropped, ...] = (),
    retired: tuple[Identifier, ...] = (),
    suspects: tuple[SuspectMark, ...] = (),
    evidence: tuple[tuple[Identifier, Identifier], ...] = (),
    device_owned: tuple[Identifier, ...] = (),
) -> Resolution:
    """A Resolution with everything empty unless given."""
    return Resolution(
        collection=collection,
        profile_id=profile_id,
        timestamp=at,
        created=created,
        created_at=at,
        merges=merges,
        added=added,
        touched=touched,
        dropped=dropped,
        retired=retired,
        suspects=suspects,
        evidence=evidence,
        device_owned=device_owned,
    )


def create(
    tx: StoreTransaction,
    profile_id: str,
    at: datetime,
    *identifiers: Identifier,
    message_id: str | None = None,
    space: str = SPACE,
    source: str | None = None,
) -> None:
    """A new profile owning `identifiers` (its collection is that of the first identifier)."""
    collection = identifiers[0].collection if identifiers else "users"
    tx.apply_resolution(
        space,
        resolution(profile_id, at, collection=collection, created=True, added=identifiers),
        message_id or f"create-{profile_id}",
        source,
    )


def merge(
    tx: StoreTransaction,
    target: str,
    at: datetime,
    *children: tuple[str, Identifier],
    message_id: str = "merge",
    collection: str = "users",
) -> None:
    """Merge `children` (child id, via identifier) into `target`."""
    steps = tuple(MergeStep(child, via) for child, via in children)
    tx.apply_resolution(SPACE, resolution(target, at, collection=collection, merges=steps), message_id)


def event(
    message_id: str,
    at: datetime,
    profile_id: str | None = None,
    account_id: str | None = None,
    identifiers: tuple[str, ...] = (),
    *,
    source: str | None = "web",
    name: str | None = "Viewed",
) -> EventRecord:
    """An event as the engine writes it."""
    return EventRecord(
        message_id=message_id,
        type="track",
        name=name,
        timestamp=at,
        received_at=at + timedelta(milliseconds=250),
        source=source,
        profile_id=profile_id,
        account_id=account_id,
        identifiers=identifiers,
        payload=json.dumps({"messageId": message_id}).encode(),
    )


def view(store: Store, identifiers: list[Identifier], collection: str = "users") -> GraphView:
    """load_view in a transaction of its own."""
    with store.transaction() as tx:
        return tx.load_view(SPACE, collection, identifiers)


def without_sequence(record: EventRecord) -> EventRecord:
    return msgspec.structs.replace(record, sequence=0)


def ids(records: list[EventRecord]) -> list[str]:
    return [record.message_id for record in records]


def page(store: Store, profile_id: str, **query: Any) -> list[str]:
    """The message ids of one event_page."""
    return ids(store.event_page(SPACE, profile_id, EventQuery(**query)))


def all_pages(store: Store, profile_id: str, limit: int, **query: Any) -> list[list[str]]:
    """Every page of an event_page walk, following the keyset cursor."""
    pages: list[list[str]] = []
    after: tuple[datetime, str] | None = None
    while len(pages) < 100:  # a cursor that does not advance fails the test instead of hanging it
        records = store.event_page(SPACE, profile_id, EventQuery(limit=limit, after=after, **query))
        if not records:
            return pages
        pages.append(ids(records))
        after = (records[-1].timestamp, records[-1].message_id)
    raise AssertionError(f"event_page did not end: {pages[:5]}")


def snapshot(store: Store, space: str = SPACE) -> dict[str, Any]:
    """Everything the reads say about a space and its profiles (for "nothing changed" checks)."""
    dump = store.dump(space)
    profiles = sorted({row[0] for row in dump["profiles"]} | {"use_a", "use_b", "use_c", "acc_x"})
    identifiers = [Identifier(row[1], row[2], row[0]) for row in dump["identifiers"]]
    identifiers += [uid("u1"), anon("a1"), anon("a2"), anon("a3"), group("g1")]
    with store.transaction() as tx:
        users = tx.load_view(space, "users", [item for item in identifiers if item.collection == "users"])
        accounts = tx.load_view(
            space, "accounts", [item for item in identifiers if item.collection != "users"]
        )
        seen = {message_id: tx.has_message(space, message_id) for message_id in ("m1", "m2", "m3", "m4")}
    unresolved_pages = [store.unresolved(space, limit=1)]
    while unresolved_pages[-1]:
        assert len(unresolved_pages) < 100, "unresolved() paging did not end"
        unresolved_pages.append(
            store.unresolved(space, limit=1, before_sequence=unresolved_pages[-1][-1].sequence)
        )
    return {
        "spaces": store.spaces(),
        "sources": store.sources(),
        "tokens": store.tokens(),
        "dump": dump,
        "stats": store.stats(space),
        "learned": store.learned_types(space),
        "suspects": store.suspects(space),
        "unresolved": store.unresolved(space),
        "unresolved_pages": unresolved_pages,
        "event_ids": list(store.iter_event_ids(space)),
        "seen": seen,
        "views": (_comparable(users), _comparable(accounts)),
        "find": {item: store.find_profile(space, item) for item in identifiers},
        "profiles": {
            profile_id: (
                store.resolve_segment_id(space, profile_id),
                store.profile(space, profile_id),
                store.identifiers(space, profile_id),
                store.traits(space, profile_id),
                store.trait_records(space, profile_id),
                store.activity(space, profile_id),
                store.event_count(space, profile_id),
                store.events(space, profile_id, limit=1000),
                store.event_page(space, profile_id, EventQuery(limit=1000)),
                store.event_page(space, profile_id, EventQuery(limit=1000, descending=False)),
                store.links(space, profile_id),
                store.merges(space, profile_id),
                store.dropped(space, profile_id),
            )
            for profile_id in profiles
        },
    }


def _comparable(graph: GraphView) -> tuple[Any, ...]:
    """A GraphView with member order ignored (the order of ProfileState.identifiers is not contractual)."""
    return (
        dict(graph.identifiers),
        {
            root: msgspec.structs.replace(state, identifiers=tuple(sorted(state.identifiers, key=repr)))
            for root, state in graph.profiles.items()
        },
        {key: dict(value) for key, value in graph.evidence.items()},
        graph.suspects,
    )


def members(state: ProfileState) -> set[StoredIdentifier]:
    return set(state.identifiers)


def populate(store: Store) -> None:
    """A small graph touching every table: two users merged, an account, traits, events, drops."""
    store.ensure_space(SPACE)
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"), anon("a1"), message_id="m1", source="web")
        tx.set_traits(SPACE, "use_a", {"name": "Ann", "age": None}, t(1), "web")
        create(tx, "acc_x", t(1), group("g1"), message_id="m1", source="web")
        tx.link(SPACE, "use_a", "acc_x", t(1))
        tx.add_event(
            SPACE, event("m1", t(1), "use_a", "acc_x", ("user_id:u1", "anonymous_id:a1", "group_id:g1"))
        )
    with store.transaction() as tx:
        tx.apply_resolution(
            SPACE,
            resolution(
                "use_b",
                t(2),
                created=True,
                added=(anon("a2"),),
                dropped=(Dropped(anon("null"), "blocked value"),),
            ),
            "m2",
            "app",
        )
        tx.add_event(
            SPACE, event("m2", t(2), "use_b", None, ("anonymous_id:a2", "anonymous_id:null"), source="app")
        )
    with store.transaction() as tx:
        tx.apply_resolution(
            SPACE,
            resolution(
                "use_a",
                t(3),
                merges=(MergeStep("use_b", anon("a2")),),
                touched=(uid("u1"), anon("a2")),
                retired=(anon("a1"),),
                suspects=(SuspectMark(anon("a2"), "user_id", ("u1", "u9")),),
                device_owned=(anon("a2"),),
                evidence=((anon("a2"), uid("u1")),),
            ),
            "m3",
        )
        tx.add_event(SPACE, event("m3", t(3), "use_a", None, ("user_id:u1", "anonymous_id:a2")))
        tx.add_event(SPACE, event("m4", t(4), None, None, ("anonymous_id:undefined",)))
        tx.record_dropped(SPACE, [Dropped(anon("undefined"), "blocked value")], "m4", t(4), None)
        tx.learn_types(SPACE, [("crm_id", "users")])


# -- lifecycle, spaces, sources -----------------------------------------------------------------
def test_reopen_keeps_everything_and_migrates_once(store: Store, reopen: Reopen) -> None:
    populate(store)
    store.upsert_source(SourceRecord(SPACE, "web", "wk_web"))
    store.upsert_token(TokenRecord(SPACE, "pt_read", "read"))
    before = snapshot(store)
    again = reopen()  # running the migrations a second time would fail or lose the data
    assert snapshot(again) == before
    again.ensure_space(OTHER)
    third = reopen()
    assert third.spaces() == [SPACE, OTHER]
    assert snapshot(third)["dump"] == before["dump"]


def test_empty_store_reads(store: Store) -> None:
    assert store.spaces() == []
    assert store.sources() == []
    assert store.learned_types(SPACE) == []
    assert store.find_profile(SPACE, uid("u1")) is None
    assert store.resolve_segment_id(SPACE, "use_a") is None
    assert store.profile(SPACE, "use_a") is None
    assert store.identifiers(SPACE, "use_a") == []
    assert store.traits(SPACE, "use_a") == {}
    assert store.trait_records(SPACE, "use_a") == []
    assert store.activity(SPACE, "use_a") == ProfileActivity(None, None, None, None, None)
    assert store.event_count(SPACE, "use_a") == 0
    assert store.events(SPACE, "use_a") == []
    assert store.event_page(SPACE, "use_a", EventQuery()) == []
    assert store.links(SPACE, "use_a") == []
    assert store.merges(SPACE, "use_a") == []
    assert store.dropped(SPACE, "use_a") == []
    assert store.suspects(SPACE) == []
    assert store.unresolved(SPACE) == []
    assert store.unresolved(SPACE, before_sequence=10) == []
    assert store.tokens() == []
    assert store.stats(SPACE) == SpaceStats(SPACE)
    assert list(store.iter_event_ids(SPACE)) == []
    empty = store.dump(SPACE)
    assert empty == {
        key: []
        for key in ("profiles", "identifiers", "traits", "links", "merges", "events", "suspects", "dropped")
    }
    with store.transaction() as tx:
        assert not tx.has_message(SPACE, "m1")
        graph = tx.load_view(SPACE, "users", [uid("u1")])
    assert graph == GraphView({}, {}, {}, frozenset())


def test_spaces_are_created_once_and_listed_sorted(store: Store) -> None:
    store.ensure_space("b")
    store.ensure_space("a")
    store.ensure_space("b")
    assert store.spaces() == ["a", "b"]


def test_sources_upsert_by_space_and_name(store: Store) -> None:
    store.ensure_space("a")
    store.ensure_space("b")
    store.upsert_source(SourceRecord("b", "web", "k1"))
    store.upsert_source(SourceRecord("a", "web", "k2"))
    store.upsert_source(SourceRecord("a", "app", "k3"))
    assert store.sources() == [
        SourceRecord("a", "app", "k3"),
        SourceRecord("a", "web", "k2"),
        SourceRecord("b", "web", "k1"),
    ]
    store.upsert_source(SourceRecord("a", "web", "k4"))  # rotate a key
    store.upsert_source(SourceRecord("a", "web", "k4"))  # same again: no change
    store.upsert_source(SourceRecord("b", "app", "k2"))  # the rotated-away key is free again
    assert store.sources() == [
        SourceRecord("a", "app", "k3"),
        SourceRecord("a", "web", "k4"),
        SourceRecord("b", "app", "k2"),
        SourceRecord("b", "web", "k1"),
    ]
    store.upsert_source(SourceRecord("a", "web", "k9"), replace=False)  # kept: the first key wins
    store.upsert_source(SourceRecord("c", "web", "k9"), replace=False)  # created
    assert SourceRecord("a", "web", "k4") in store.sources()
    assert SourceRecord("c", "web", "k9") in store.sources()


def test_write_keys_are_unique_across_spaces(store: Store) -> None:
    store.ensure_space("a")
    store.ensure_space("b")
    store.upsert_source(SourceRecord("a", "web", "k1"))
    store.upsert_source(SourceRecord("a", "app", "k2"))
    before = store.sources()
    with pytest.raises(Exception):  # noqa: B017 - the adapter's integrity error
        store.upsert_source(SourceRecord("b", "web", "k1"))
    with pytest.raises(Exception):  # noqa: B017
        store.upsert_source(SourceRecord("a", "app", "k1"))
    assert store.sources() == before


def test_first_token_keeps_the_first_of_each_space_and_kind(store: Store) -> None:
    store.ensure_space("a")
    store.ensure_space("b")
    assert store.first_token(TokenRecord("a", "pt_1", "read")) == TokenRecord("a", "pt_1", "read")
    assert store.first_token(TokenRecord("a", "pt_0", "read")) == TokenRecord("a", "pt_1", "read")
    assert store.first_token(TokenRecord("a", "at_1", "admin")) == TokenRecord("a", "at_1", "admin")
    assert store.first_token(TokenRecord("b", "pt_2", "read")) == TokenRecord("b", "pt_2", "read")
    assert store.tokens() == [
        TokenRecord("a", "at_1", "admin"),
        TokenRecord("a", "pt_1", "read"),
        TokenRecord("b", "pt_2", "read"),
    ]


def test_tokens_upsert_by_token_and_list_by_space_then_token(store: Store) -> None:
    store.ensure_space("a")
    store.ensure_space("b")
    store.upsert_token(TokenRecord("b", "pt_1", "read"))
    store.upsert_token(TokenRecord("a", "pt_2", "read"))
    store.upsert_token(TokenRecord("a", "at_3", "admin"))
    assert store.tokens() == [
        TokenRecord("a", "at_3", "admin"),
        TokenRecord("a", "pt_2", "read"),
        TokenRecord("b", "pt_1", "read"),
    ]
    store.upsert_token(TokenRecord("b", "pt_1", "read"))  # same again: no change
    store.upsert_token(TokenRecord("a", "pt_2", "admin"))  # another kind
    store.upsert_token(TokenRecord("a", "pt_1", "read"))  # another space: still one token
    assert store.tokens() == [
        TokenRecord("a", "at_3", "admin"),
        TokenRecord("a", "pt_1", "read"),
        TokenRecord("a", "pt_2", "admin"),
    ]


def test_learned_types_keep_first_seen_order(store: Store) -> None:
    with store.transaction() as tx:
        tx.learn_types(SPACE, [("crm_id", "users"), ("shop_id", "users")])
        tx.learn_types(SPACE, [])
    with store.transaction() as tx:
        # a type is learned once, with the collection it was first seen in
        tx.learn_types(SPACE, [("shop_id", "accounts"), ("z_id", "users"), ("a_id", "accounts")])
        tx.learn_types(OTHER, [("a_id", "users")])
    assert store.learned_types(SPACE) == [
        ("crm_id", "users"),
        ("shop_id", "users"),
        ("z_id", "users"),
        ("a_id", "accounts"),
    ]
    assert store.learned_types(OTHER) == [("a_id", "users")]
    with pytest.raises(RuntimeError), store.transaction() as tx:
        tx.learn_types(SPACE, [("lost_id", "users")])
        raise RuntimeError
    assert store.learned_types(SPACE)[-1] == ("a_id", "accounts")


# -- apply_resolution ----------------------------------------------------------------------------
def test_create_add_and_touch(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(10), uid("u1"), anon("a1"), message_id="m1")
    assert store.find_profile(SPACE, uid("u1")) == "use_a"
    assert store.find_profile(SPACE, anon("a1")) == "use_a"
    assert store.find_profile(SPACE, Identifier("user_id", "u1", "accounts")) is None
    assert store.resolve_segment_id(SPACE, "use_a") == "use_a"
    assert store.profile(SPACE, "use_a") == ProfileRecord("use_a", "users", t(10), 0, (), "m1")
    assert store.stats(SPACE).profiles == 1
    with store.transaction() as tx:
        tx.apply_resolution(
            SPACE, resolution("use_a", t(20), added=(email("e"),), touched=(uid("u1"),)), "m2"
        )
    with store.transaction() as tx:  # an older message lowers first_seen and keeps last_seen
        tx.apply_resolution(SPACE, resolution("use_a", t(5), touched=(anon("a1"), uid("u1"))), "m3")
    assert store.identifiers(SPACE, "use_a") == [
        IdentifierRecord("anonymous_id", "a1", "users", t(5), t(10), first_message_id="m1"),
        IdentifierRecord("user_id", "u1", "users", t(5), t(20), first_message_id="m1"),
        IdentifierRecord("email", "e", "users", t(20), t(20), first_message_id="m2"),
    ]
    # created_at is the creating message's time, not changed by later messages
    assert store.profile(SPACE, "use_a") == ProfileRecord("use_a", "users", t(10), 0, (), "m1")


def test_identifiers_remember_the_message_and_source_that_first_attached_them(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(10), uid("u1"), message_id="m1", source="web")
        create(tx, "use_b", t(11), anon("b1"), message_id="m2", source="app")
        create(tx, "acc_x", t(10), group("g1"), message_id="m1", source="web")
    with store.transaction() as tx:
        # later and earlier messages of other sources touch them: the first attachment stays
        tx.apply_resolution(
            SPACE, resolution("use_a", t(20), added=(email("e"),), touched=(uid("u1"),)), "m3", "ios"
        )
        tx.apply_resolution(SPACE, resolution("use_a", t(5), added=(anon("a0"),), touched=(uid("u1"),)), "m4")
        tx.apply_resolution(
            SPACE,
            resolution(
                "use_b", t(12), touched=(anon("b1"),), retired=(anon("b1"),), device_owned=(anon("b1"),)
            ),
            "m5",
            "crm",
        )

    def origins(profile_id: str) -> dict[str, tuple[str | None, str | None]]:
        return {
            record.value: (record.first_message_id, record.source)
            for record in store.identifiers(SPACE, profile_id)
        }

    assert origins("use_a") == {"u1": ("m1", "web"), "e": ("m3", "ios"), "a0": ("m4", None)}
    assert origins("acc_x") == {"g1": ("m1", "web")}
    with store.transaction() as tx:  # a merge repoints use_b's identifier and adds one of its own
        tx.apply_resolution(
            SPACE,
            resolution(
                "use_a",
                t(30),
                merges=(MergeStep("use_b", anon("b1")),),
                added=(anon("a9"),),
                touched=(anon("b1"),),
            ),
            "m6",
            "server",
        )
    expected = {
        "u1": ("m1", "web"),
        "e": ("m3", "ios"),
        "a0": ("m4", None),
        "b1": ("m2", "app"),
        "a9": ("m6", "server"),
    }
    assert origins("use_a") == expected
    assert IdentifierRecord("anonymous_id", "b1", "users", t(11), t(30), True, False, "app", "m2") in (
        store.identifiers(SPACE, "use_a")
    )
    assert store.identifiers(SPACE, "use_b") == []
    with store.transaction() as tx:  # merged again, into a newer root: still the first attachment
        create(tx, "use_z", t(40), uid("z1"), message_id="m7", source="app")
        merge(tx, "use_z", t(41), ("use_a", uid("u1")), message_id="m8")
    assert origins("use_z") == {**expected, "z1": ("m7", "app")}
    # a root keeps the message that created it, whatever merged into it later
    root = store.profile(SPACE, "use_z")
    assert root is not None and root.created_by == "m7"
    assert root.merged_segment_ids == ("use_a", "use_b")
    assert store.profile(SPACE, "use_a") is None


def test_identifiers_are_ordered_by_first_seen_then_type_then_value(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"), anon("b"), anon("a"), email("z"))
    assert [(record.type, record.value) for record in store.identifiers(SPACE, "use_a")] == [
        ("anonymous_id", "a"),
        ("anonymous_id", "b"),
        ("email", "z"),
        ("user_id", "u1"),
    ]


def test_an_identifier_has_one_owner_and_a_profile_is_created_once(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
    before = snapshot(store)
    with pytest.raises(Exception), store.transaction() as tx:  # noqa: B017
        create(tx, "use_b", t(2), anon("a9"), uid("u1"))
    with pytest.raises(Exception), store.transaction() as tx:  # noqa: B017
        create(tx, "use_a", t(2), anon("a8"))
    assert snapshot(store) == before


def _merge_fixture(store: Store) -> None:
    """use_c merged into use_b; then use_b (with use_c) is ready to merge into use_a."""
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
        create(tx, "use_b", t(2), anon("b1"))
        create(tx, "use_c", t(3), anon("c1"))
        create(tx, "acc_x", t(1), group("gx"))
        create(tx, "acc_y", t(1), group("gy"))
        tx.set_traits(SPACE, "use_a", {"name": "A", "plan": "free", "age": 30, "color": "red"}, t(1))
        tx.set_traits(SPACE, "use_a", {"plan": "team", "color": "red"}, t(6))
        tx.set_traits(SPACE, "use_b", {"name": "B", "age": None}, t(4))  # newer name; newer removal
        tx.set_traits(SPACE, "use_b", {"plan": "pro"}, t(2))  # older than the parent's plan
        tx.set_traits(SPACE, "use_b", {"color": "blue"}, t(6))  # a tie, no message: the parent's stays
        tx.set_traits(SPACE, "use_c", {"city": "Oslo"}, t(3))
        tx.link(SPACE, "use_a", "acc_x", t(1))
        tx.link(SPACE, "use_b", "acc_x", t(2))
        tx.link(SPACE, "use_b", "acc_y", t(3))
        tx.link(SPACE, "use_c", "acc_y", t(3))
        tx.add_event(SPACE, event("e1", t(1), "use_a", "acc_x"))
        tx.add_event(SPACE, event("e2", t(2), "use_b"))
        tx.add_event(SPACE, event("e3", t(3), "use_c", "acc_y"))
        tx.record_dropped(SPACE, [Dropped(anon("null"), "blocked value")], "e2", t(2), "use_b")
        tx.record_dropped(SPACE, [Dropped(anon("-1"), "blocked value")], "e3", t(3), "use_c")
    with store.transaction() as tx:
        merge(tx, "use_b", t(4), ("use_c", anon("c1")), message_id="m-bc")


def test_merge_repoints_flattens_and_moves_everything(store: Store) -> None:
    _merge_fixture(store)
    assert store.resolve_segment_id(SPACE, "use_c") == "use_b"
    assert store.profile(SPACE, "use_b") == ProfileRecord(
        "use_b", "users", t(2), 1, ("use_c",), "create-use_b"
    )
    assert store.links(SPACE, "use_b") == ["acc_x", "acc_y"]  # use_c's link to acc_y de-duplicated
    with store.transaction() as tx:
        merge(tx, "use_a", t(10), ("use_b", anon("b1")), message_id="m-ab")

    # children repointed, grandchildren flattened, merge_count adds the child's own merges
    assert store.resolve_segment_id(SPACE, "use_b") == "use_a"
    assert store.resolve_segment_id(SPACE, "use_c") == "use_a"
    assert store.profile(SPACE, "use_b") is None
    assert store.profile(SPACE, "use_c") is None
    assert store.profile(SPACE, "use_a") == ProfileRecord(
        "use_a", "users", t(1), 2, ("use_b", "use_c"), "create-use_a"
    )
    parents = {row[0]: row[2] for row in store.dump(SPACE)["profiles"]}
    assert parents == {"use_a": "", "use_b": "use_a", "use_c": "use_a", "acc_x": "", "acc_y": ""}
    assert store.stats(SPACE).profiles == 1
    assert store.stats(SPACE).accounts == 2

    # identifiers live on the root
    assert [record.value for record in store.identifiers(SPACE, "use_a")] == ["u1", "b1", "c1"]
    assert store.identifiers(SPACE, "use_b") == []
    assert store.identifiers(SPACE, "use_c") == []
    for identifier in (uid("u1"), anon("b1"), anon("c1")):
        assert store.find_profile(SPACE, identifier) == "use_a"

    # traits: newest per key wins, the parent keeps ties, a newer removal removes
    assert store.traits(SPACE, "use_a") == {"name": "B", "plan": "team", "color": "red", "city": "Oslo"}
    assert store.traits(SPACE, "use_b") == {}
    assert store.traits(SPACE, "use_c") == {}
    traits = [row for row in store.dump(SPACE)["traits"] if row[0].startswith("use_")]
    assert traits == [
        ["use_a", "age", "null", us(4)],
        ["use_a", "city", '"Oslo"', us(3)],
        ["use_a", "color", '"red"', us(6)],
        ["use_a", "name", '"B"', us(4)],
        ["use_a", "plan", '"team"', us(6)],
    ]

    # links move to the root and are de-duplicated (the root's own link keeps its time)
    assert store.links(SPACE, "use_a") == ["acc_x", "acc_y"]
    assert store.links(SPACE, "use_b") == []
    assert store.links(SPACE, "acc_x") == ["use_a"]
    assert store.links(SPACE, "acc_y") == ["use_a"]
    assert store.dump(SPACE)["links"] == [["use_a", "acc_x"], ["use_a", "acc_y"]]

    # the merge log of the family, oldest first
    assert store.merges(SPACE, "use_a") == [
        MergeRecord("use_b", "use_c", "m-bc", "anonymous_id:c1", t(4)),
        MergeRecord("use_a", "use_b", "m-ab", "anonymous_id:b1", t(10)),
    ]
    assert store.stats(SPACE).merges == 2

    # events and drops follow the family
    assert store.event_count(SPACE, "use_a") == 3
    assert [record.message_id for record in store.events(SPACE, "use_a")] == ["e3", "e2", "e1"]
    assert [record.message_id for record in store.dropped(SPACE, "use_a")] == ["e2", "e3"]


def _family_reads(store: Store, root: str) -> dict[str, Any]:
    """Everything a Profile API response of use_b reads, each read on its own."""
    return {
        "root": store.resolve_segment_id(SPACE, "use_c"),
        "profile": store.profile(SPACE, root),
        "identifiers": [item.value for item in store.identifiers(SPACE, root)],
        "traits": store.traits(SPACE, root),
        "events": store.event_count(SPACE, root),
        "links": store.links(SPACE, root),
        "merges": [item.child_id for item in store.merges(SPACE, root)],
        "stats": store.stats(SPACE),
    }


def test_a_snapshot_sees_one_moment_while_another_thread_merges(store: Store) -> None:
    """A response reads the root an id names and then that root's parts. Before: a merge committed in
    between showed half (use_b no profile, no identifiers, no traits, while the first read named it)."""
    _merge_fixture(store)
    before = _family_reads(store, "use_b")

    def merge_b_into_a() -> None:
        with store.transaction() as tx:
            merge(tx, "use_a", t(10), ("use_b", anon("b1")), message_id="m-ab")

    writer = threading.Thread(target=merge_b_into_a)
    with store.snapshot():
        assert _family_reads(store, "use_b") == before
        writer.start()
        # A store whose snapshot holds writers off (the memory ones) lets it commit after; the bound
        # only keeps this test from waiting for that.
        writer.join(timeout=1)
        assert _family_reads(store, "use_b") == before
        with store.snapshot():  # nested: the same moment
            assert _family_reads(store, "use_b") == before
    writer.join()
    after = _family_reads(store, "use_a")
    assert after["root"] == "use_a" and after["profile"] is not None
    assert after["profile"].merged_segment_ids == ("use_b", "use_c")
    assert store.profile(SPACE, "use_b") is None


def test_event_resolutions_reach_todays_roots_in_ingest_order_and_blocked_values_are_listed(
    store: Store,
) -> None:
    _merge_fixture(store)
    with store.transaction() as tx:
        merge(tx, "use_a", t(10), ("use_b", anon("b1")), message_id="m-ab")
        tx.add_event(SPACE, event("e0", t(0), None, None, ("anonymous_id:null", "group_id:g9")))
        tx.record_dropped(SPACE, [Dropped(email("x"), "cap 1")], "e0", t(0), None)
        tx.record_dropped(SPACE, [Dropped(anon("null"), "blocked value")], "e0", t(0), None)
    assert list(store.iter_event_resolutions(SPACE)) == [
        EventResolution("e1", "use_a", "acc_x", ()),  # its own profile, still a root
        EventResolution("e2", "use_a", None, ()),  # use_b, merged into use_a
        EventResolution("e3", "use_a", "acc_y", ()),  # use_c, merged into use_b then flattened
        EventResolution("e0", None, None, ("anonymous_id:null", "group_id:g9")),  # ingest order, not time
    ]
    assert store.blocked_values(SPACE) == frozenset({"anonymous_id:null", "anonymous_id:-1"})
    store.ensure_space(OTHER)
    assert list(store.iter_event_resolutions(OTHER)) == []
    assert store.blocked_values(OTHER) == frozenset()


def test_every_stored_event_is_read_back_whole_in_ingest_order_page_after_page(store: Store) -> None:
    """What `idstitch copy` replays: each message as stored (payload, source, times), in the order it was
    stored, not by time, over more than one page, and from after a given sequence on."""
    store.ensure_space(OTHER)
    count = 2_345  # past two pages of EVENTS_PAGE
    with store.transaction() as tx:
        for number in range(count):
            at = t(count - number)  # stored newest first: the walk must follow the store's order
            source = None if number % 7 == 0 else "web"
            tx.add_event(SPACE, event(f"m{number}", at, None, None, (f"user_id:u{number}",), source=source))
            if number % 100 == 0:
                tx.add_event(OTHER, event(f"m{number}", at, None, None, ()))
    read = list(store.iter_events(SPACE))
    assert [record.message_id for record in read] == [f"m{number}" for number in range(count)]
    sequences = [record.sequence for record in read]
    assert sequences == sorted(sequences) and len(set(sequences)) == count
    first = read[0]
    assert (first.source, first.identifiers, first.timestamp, first.received_at) == (
        None,
        ("user_id:u0",),
        t(count),
        t(count) + timedelta(milliseconds=250),
    )
    assert json.loads(first.payload) == {"messageId": "m0"} and read[1].source == "web"
    after = list(store.iter_events(SPACE, after_sequence=sequences[1999]))
    assert [record.message_id for record in after] == [f"m{number}" for number in range(2000, count)]
    assert [record.message_id for record in store.iter_events(OTHER)] == [
        f"m{n}" for n in range(0, count, 100)
    ]
    assert list(store.iter_events("never-written")) == []


def test_merge_of_accounts_moves_account_links(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
        create(tx, "use_d", t(1), uid("u4"))
        create(tx, "acc_x", t(1), group("g1"))
        create(tx, "acc_z", t(2), group("g2"))
        tx.link(SPACE, "use_a", "acc_x", t(5))
        tx.link(SPACE, "use_a", "acc_z", t(2))
        tx.link(SPACE, "use_d", "acc_z", t(3))
        tx.set_traits(SPACE, "acc_z", {"plan": "pro"}, t(2))
        tx.add_event(SPACE, event("e1", t(1), "use_a", "acc_z"))
    with store.transaction() as tx:
        merge(tx, "acc_x", t(6), ("acc_z", group("g2")), collection="accounts")
    assert store.resolve_segment_id(SPACE, "acc_z") == "acc_x"
    assert store.find_profile(SPACE, group("g2")) == "acc_x"
    assert store.links(SPACE, "acc_x") == ["use_d", "use_a"]  # by link time: use_d t3, use_a t5
    # Pages of links: the first `limit`, or those after a place (time of the first link, segment id).
    assert store.links(SPACE, "acc_x", limit=1) == ["use_d"]
    assert store.links(SPACE, "acc_x", limit=5) == ["use_d", "use_a"]
    (first, second) = store.link_records(SPACE, "acc_x")
    assert (first.segment_id, second.segment_id) == ("use_d", "use_a")
    assert store.link_records(SPACE, "acc_x", after=(first.at, first.segment_id)) == [second]
    assert store.link_records(SPACE, "acc_x", after=(first.at, "use_c"), limit=1) == [first]
    assert store.link_records(SPACE, "acc_x", after=(second.at, second.segment_id), limit=5) == []
    assert store.link_records(SPACE, "acc_z", after=(first.at, first.segment_id)) == []  # moved to acc_x
    assert [item.segment_id for item in store.link_records(SPACE, "use_a", limit=5)] == ["acc_x"]
    assert store.links(SPACE, "acc_z") == []
    assert store.links(SPACE, "use_a") == ["acc_x"]
    assert store.links(SPACE, "use_d") == ["acc_x"]
    assert store.traits(SPACE, "acc_x") == {"plan": "pro"}
    assert store.event_count(SPACE, "acc_x") == 1  # accounts count the events' account side
    assert store.event_count(SPACE, "use_a") == 1
    assert store.profile(SPACE, "acc_x") == ProfileRecord(
        "acc_x", "accounts", t(1), 1, ("acc_z",), "create-acc_x"
    )
    assert store.stats(SPACE).accounts == 1


def test_retired_identifiers(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("old"), anon("a1"))
    with store.transaction() as tx:
        tx.apply_resolution(
            SPACE,
            resolution("use_a", t(2), added=(uid("new"),), retired=(uid("old"), uid("unknown"))),
            "m2",
        )
    with store.transaction() as tx:  # retiring again changes nothing
        tx.apply_resolution(SPACE, resolution("use_a", t(3), retired=(uid("old"),)), "m3")
    records = {record.value: record for record in store.identifiers(SPACE, "use_a")}
    assert records["old"].retired and not records["new"].retired and not records["a1"].retired
    assert store.find_profile(SPACE, uid("old")) == "use_a"  # still owned, no longer counted
    graph = view(store, [uid("old")])
    assert graph.identifiers[uid("old")].retired
    assert {item.identifier: item.retired for item in graph.profiles["use_a"].identifiers} == {
        uid("old"): True,
        anon("a1"): False,
        uid("new"): False,
    }
    row = next(row for row in store.dump(SPACE)["identifiers"] if row[2] == "old")
    assert row == ["users", "user_id", "old", "use_a", us(1), us(1), 1, ""]


def test_device_owner_newer_wins_older_ignored_and_follows_merges(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), anon("d1"))
        create(tx, "use_b", t(1), uid("ub"))
        create(tx, "use_c", t(1), uid("uc"))
        create(tx, "use_e", t(1), uid("ue"))
    assert view(store, [anon("d1")]).identifiers[anon("d1")].device_owner is None

    def own(owner: str, at: datetime) -> None:
        with store.transaction() as tx:
            tx.apply_resolution(SPACE, resolution(owner, at, device_owned=(anon("d1"), anon("none"))), "m")

    own("use_b", t(10))
    stored = view(store, [anon("d1")]).identifiers[anon("d1")]
    assert (stored.profile_id, stored.device_owner, stored.device_owner_at) == ("use_a", "use_b", t(10))
    own("use_c", t(5))  # older: ignored
    assert view(store, [anon("d1")]).identifiers[anon("d1")].device_owner == "use_b"
    own("use_c", t(10))  # same time: the later write wins
    assert view(store, [anon("d1")]).identifiers[anon("d1")].device_owner == "use_c"
    own("use_b", t(11))
    graph = view(store, [anon("d1")])
    assert graph.identifiers[anon("d1")].device_owner == "use_b"
    assert set(graph.profiles) == {"use_a", "use_b"}  # the owner's profile comes with the view
    with store.transaction() as tx:
        merge(tx, "use_e", t(12), ("use_b", uid("ub")))
    graph = view(store, [anon("d1")])
    assert graph.identifiers[anon("d1")].device_owner == "use_e"  # read through the merge to the root
    assert graph.identifiers[anon("d1")].device_owner_at == t(11)
    assert set(graph.profiles) == {"use_a", "use_e"}
    row = next(row for row in store.dump(SPACE)["identifiers"] if row[2] == "d1")
    assert row[3] == "use_a" and row[7] == "use_b"  # dump shows the stored (pre-merge) owner


def test_evidence_upsert_keeps_the_latest_time(store: Store) -> None:
    def see(at: datetime, *pairs: tuple[Identifier, Identifier]) -> None:
        with store.transaction() as tx:
            tx.apply_resolution(SPACE, resolution("use_a", at, evidence=pairs), f"m{at.timestamp()}")

    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"), anon("a1"))
    see(t(10), (anon("a1"), uid("u1")))
    see(t(5), (anon("a1"), uid("u1")))  # older: the time stays
    assert view(store, [anon("a1")]).evidence == {anon("a1"): {uid("u1"): t(10)}}
    see(t(20), (anon("a1"), uid("u1")), (anon("a1"), uid("u2")), (anon("zz"), uid("u1")))
    graph = view(store, [anon("a1"), anon("zz"), uid("u1")])
    assert graph.evidence == {
        anon("a1"): {uid("u1"): t(20), uid("u2"): t(20)},
        anon("zz"): {uid("u1"): t(20)},  # evidence does not need an owner
    }
    assert view(store, [Identifier("anonymous_id", "a1", "accounts")], "accounts").evidence == {}
    # Non-unique detection off: only the evidence between the identifiers asked for.
    with store.transaction() as tx:
        few = tx.load_view(SPACE, "users", [anon("a1"), anon("zz"), uid("u2")], every_pair=False)
    assert few.evidence == {anon("a1"): {uid("u2"): t(20)}}


def test_suspects_first_mark_wins(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"), anon("a1"))
    with store.transaction() as tx:
        tx.apply_resolution(
            SPACE,
            resolution(
                "use_a",
                t(10),
                suspects=(
                    SuspectMark(anon("a1"), "user_id", ("u1", "u2")),
                    SuspectMark(anon("free"), "declared", ()),
                ),
            ),
            "m1",
        )
    with store.transaction() as tx:
        tx.apply_resolution(
            SPACE, resolution("use_a", t(20), suspects=(SuspectMark(anon("a1"), "email", ("x", "y")),)), "m2"
        )
    assert store.suspects(SPACE) == [
        SuspectRecord("anonymous_id:a1", "users", "user_id", ("u1", "u2"), "m1", t(10)),
        SuspectRecord("anonymous_id:free", "users", "declared", (), "m1", t(10)),
    ]
    assert {record.value: record.suspect for record in store.identifiers(SPACE, "use_a")} == {
        "u1": False,
        "a1": True,
    }
    # The marks of some identifiers, read by key (explain), in the order of the space's list.
    among = [anon("free"), uid("u1"), anon("a1"), anon("free"), Identifier("anonymous_id", "a1", "accounts")]
    assert store.suspects_among(SPACE, among) == store.suspects(SPACE)
    assert store.suspects_among(SPACE, [anon("free")]) == store.suspects(SPACE)[1:]
    assert store.suspects_among(SPACE, []) == []
    assert store.suspects_among(OTHER, among) == []
    # Pages of the list: the first `limit`, or from a mark on (itself included); None when not suspect.
    assert store.suspects(SPACE, limit=1) == store.suspects(SPACE)[:1]
    assert store.suspects_from(SPACE, anon("a1"), limit=5) == store.suspects(SPACE)
    assert store.suspects_from(SPACE, anon("free"), limit=5) == store.suspects(SPACE)[1:]
    assert store.suspects_from(SPACE, anon("a1"), limit=1) == store.suspects(SPACE)[:1]
    assert store.suspects_from(SPACE, uid("u1"), limit=5) is None
    assert store.suspects_from(SPACE, Identifier("anonymous_id", "a1", "accounts"), limit=5) is None
    assert store.suspects_from(OTHER, anon("a1"), limit=5) is None
    assert view(store, [anon("a1"), anon("free"), uid("u1")]).suspects == {anon("a1"), anon("free")}
    assert store.stats(SPACE).suspect == 2
    assert store.dump(SPACE)["suspects"] == [
        ["users", "anonymous_id", "a1", "user_id", '["u1","u2"]'],
        ["users", "anonymous_id", "free", "declared", "[]"],
    ]


def test_unmark_declared_removes_only_declared_marks(store: Store) -> None:
    # A rule change: values no longer declared non-unique lose their mark; a detected mark stays.
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"), anon("a1"), anon("kiosk"))
        tx.apply_resolution(
            SPACE,
            resolution(
                "use_a",
                t(10),
                suspects=(
                    SuspectMark(anon("a1"), "user_id", ("u1", "u2")),
                    SuspectMark(anon("kiosk"), "declared", ()),
                    SuspectMark(anon("other"), "declared", ()),
                ),
            ),
            "m1",
        )
    assert view(store, [anon("kiosk")]).suspects == {anon("kiosk")}  # the view is read (and cached)
    store.unmark_declared(SPACE, [anon("a1"), anon("kiosk"), anon("nobody")])
    assert [record.identifier for record in store.suspects(SPACE)] == [
        "anonymous_id:a1",
        "anonymous_id:other",
    ]
    assert view(store, [anon("a1"), anon("kiosk"), uid("u1")]).suspects == {anon("a1")}
    assert {record.value: record.suspect for record in store.identifiers(SPACE, "use_a")} == {
        "u1": False,
        "a1": True,
        "kiosk": False,
    }
    assert store.stats(SPACE).suspect == 2
    store.unmark_declared(SPACE, [])
    store.unmark_declared("no_such_space", [anon("other")])
    assert store.stats(SPACE).suspect == 2


def test_dropped_identifiers_follow_the_family(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
        tx.apply_resolution(
            SPACE,
            resolution(
                "use_b", t(2), created=True, added=(anon("b1"),), dropped=(Dropped(email("e"), "cap 1"),)
            ),
            "m2",
        )
        tx.record_dropped(SPACE, [Dropped(anon("null"), "blocked value")], "m1", t(1), "use_a")
        tx.record_dropped(
            SPACE,
            [Dropped(anon("undefined"), "blocked value"), Dropped(anon("0"), "blocked value")],
            "m3",
            t(3),
            None,
        )
        tx.record_dropped(SPACE, [], "m4", t(4), "use_a")
    assert store.dropped(SPACE, "use_a") == [
        DroppedRecord("m1", "anonymous_id:null", "blocked value", t(1), "use_a")
    ]
    assert store.dropped(SPACE, "use_b") == [DroppedRecord("m2", "email:e", "cap 1", t(2), "use_b")]
    with store.transaction() as tx:
        merge(tx, "use_a", t(5), ("use_b", anon("b1")))
    assert [record.message_id for record in store.dropped(SPACE, "use_a")] == ["m2", "m1"]  # recording order
    # The drops of some messages (an events page), whichever profile they were recorded on.
    assert store.dropped_in(SPACE, ["m3", "m1", "nope"]) == [
        DroppedRecord("m1", "anonymous_id:null", "blocked value", t(1), "use_a"),
        DroppedRecord("m3", "anonymous_id:undefined", "blocked value", t(3), None),
        DroppedRecord("m3", "anonymous_id:0", "blocked value", t(3), None),
    ]
    assert store.dropped_in(SPACE, ["m2"]) == [DroppedRecord("m2", "email:e", "cap 1", t(2), "use_b")]
    assert store.dropped_in(SPACE, []) == []
    assert store.dropped_in(OTHER, ["m1"]) == []
    assert store.stats(SPACE).dropped == 4
    assert store.dump(SPACE)["dropped"] == [
        ["m1", "anonymous_id:null", "blocked value", "use_a"],
        ["m2", "email:e", "cap 1", "use_b"],
        ["m3", "anonymous_id:0", "blocked value", ""],
        ["m3", "anonymous_id:undefined", "blocked value", ""],
    ]


# -- traits and links -----------------------------------------------------------------------------
def test_set_traits_newer_wins_ties_go_to_the_later_write_and_removals_stick(store: Store) -> None:
    def put(at: float, **updates: Any) -> None:
        with store.transaction() as tx:
            tx.set_traits(SPACE, "use_a", updates, t(at))

    put(10, name="Ann", plan="free", nested={"a": [1, 2.5, None, True]}, count=3)
    put(5, name="Old", city="Oslo")  # older: name stays, a new key lands
    assert store.traits(SPACE, "use_a") == {
        "name": "Ann",
        "plan": "free",
        "nested": {"a": [1, 2.5, None, True]},
        "count": 3,
        "city": "Oslo",
    }
    put(10, plan="pro")  # a tie: the later write wins
    put(20, name=None)  # a removal
    put(15, name="Older")  # older than the removal: stays removed
    traits = store.traits(SPACE, "use_a")
    assert "name" not in traits and traits["plan"] == "pro"
    assert ["use_a", "name", "null", us(20)] in store.dump(SPACE)["traits"]
    put(25, name="Back")
    assert store.traits(SPACE, "use_a")["name"] == "Back"
    assert list(store.traits(SPACE, "use_a")) == sorted(store.traits(SPACE, "use_a"))
    with store.transaction() as tx:
        tx.set_traits(SPACE, "use_a", {}, t(30))
    assert store.traits(SPACE, "use_b") == {}


def test_trait_records_carry_the_source_and_follow_the_not_older_rule(store: Store) -> None:
    def put(at: float, source: str | None, **updates: Any) -> None:
        with store.transaction() as tx:
            tx.set_traits(SPACE, "use_a", updates, t(at), source)

    def records() -> dict[str, tuple[Any, str | None, datetime]]:
        return {
            record.key: (record.value, record.source, record.updated_at)
            for record in store.trait_records(SPACE, "use_a")
        }

    put(10, "web", name="Ann", plan="free", nested={"a": [1, 2.5, None, True]})
    put(5, "app", name="Old", city="Oslo")  # older: name keeps its value and source; a new key lands
    assert store.trait_records(SPACE, "use_a") == [  # sorted by key
        TraitRecord("city", "Oslo", "app", t(5)),
        TraitRecord("name", "Ann", "web", t(10)),
        TraitRecord("nested", {"a": [1, 2.5, None, True]}, "web", t(10)),
        TraitRecord("plan", "free", "web", t(10)),
    ]
    # A page: from a key on (itself included), only the named keys, the first `limit`.
    page = store.trait_records(SPACE, "use_a", after="name", limit=2)
    assert [record.key for record in page] == ["name", "nested"]
    assert [r.key for r in store.trait_records(SPACE, "use_a", after="nb")] == ["nested", "plan"]
    assert [r.key for r in store.trait_records(SPACE, "use_a", include=["plan", "city", "zz"])] == [
        "city",
        "plan",
    ]
    assert [r.key for r in store.trait_records(SPACE, "use_a", after="d", include=["city", "plan"])] == [
        "plan"
    ]
    assert store.trait_records(SPACE, "use_a", after="q") == []
    put(10, "crm", plan="pro")  # a tie: the later write wins, its source with it
    put(20, "app", name=None)  # a removal: left out
    assert [r.key for r in store.trait_records(SPACE, "use_a", after="n", limit=1)] == ["nested"]
    put(15, "web", name="Older")  # older than the removal: stays removed
    assert records() == {
        "city": ("Oslo", "app", t(5)),
        "nested": ({"a": [1, 2.5, None, True]}, "web", t(10)),
        "plan": ("pro", "crm", t(10)),
    }
    put(25, None, name="Back")  # a message without a source clears the old one
    assert records()["name"] == ("Back", None, t(25))
    assert {record.key: record.value for record in store.trait_records(SPACE, "use_a")} == store.traits(
        SPACE, "use_a"
    )
    assert store.trait_records(SPACE, "use_b") == []
    assert store.trait_records(OTHER, "use_a") == []


def test_trait_sources_move_with_their_values_on_merge(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
        create(tx, "use_b", t(1), anon("b1"))
        tx.set_traits(SPACE, "use_a", {"name": "A", "plan": "free", "color": "red", "age": 3}, t(5), "web")
        tx.set_traits(SPACE, "use_b", {"name": "B", "age": None}, t(6), "app")  # newer: wins, with source
        tx.set_traits(SPACE, "use_b", {"plan": "pro"}, t(4), "app")  # older: the parent's stays
        tx.set_traits(SPACE, "use_b", {"color": "blue"}, t(5), "app")  # a tie, no message: parent's stays
        tx.set_traits(SPACE, "use_b", {"city": "Oslo"}, t(2), "crm")  # a key the parent lacks
    with store.transaction() as tx:
        merge(tx, "use_a", t(7), ("use_b", anon("b1")))
    assert store.trait_records(SPACE, "use_a") == [
        TraitRecord("city", "Oslo", "crm", t(2)),
        TraitRecord("color", "red", "web", t(5)),
        TraitRecord("name", "B", "app", t(6)),
        TraitRecord("plan", "free", "web", t(5)),
    ]
    assert store.trait_records(SPACE, "use_b") == []
    with store.transaction() as tx:  # the removal moved too: an older value cannot bring age back
        tx.set_traits(SPACE, "use_a", {"age": 4}, t(5), "web")
    assert "age" not in store.traits(SPACE, "use_a")


@pytest.mark.parametrize("one_transaction", [False, True])
def test_a_tie_on_merge_goes_to_the_message_ingested_later(store: Store, one_transaction: bool) -> None:
    """As on one profile, where a later write at the same time wins: before, the parent's value stayed,
    so the value a user saw depended on which profile happened to be older."""

    def write(tx: StoreTransaction, profile_id: str, message_id: str, updates: dict[str, Any]) -> None:
        tx.set_traits(SPACE, profile_id, updates, t(5), "web", message_id)
        tx.add_event(SPACE, event(message_id, t(5), profile_id))

    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
        create(tx, "use_b", t(2), anon("b1"))
        write(tx, "use_a", "m1", {"plan": "parent", "color": "parent", "zip": "parent"})
        write(tx, "use_b", "m2", {"plan": "child later", "color": None, "city": "child"})
        write(tx, "use_a", "m3", {"city": "parent later"})
    with store.transaction() as tx:  # merged in this one or the next: messages not yet committed count too
        write(tx, "use_b", "m4", {"age": "child", "zip": "child later"})
        write(tx, "use_a", "m5", {"age": "parent later"})
        if one_transaction:
            merge(tx, "use_a", t(7), ("use_b", anon("b1")))
    if not one_transaction:
        with store.transaction() as tx:
            merge(tx, "use_a", t(7), ("use_b", anon("b1")))
    assert store.traits(SPACE, "use_a") == {
        "age": "parent later",
        "city": "parent later",
        "plan": "child later",
        "zip": "child later",
    }


def test_links_are_idempotent_and_ordered_by_first_link(store: Store) -> None:
    with store.transaction() as tx:
        tx.link(SPACE, "use_a", "acc_x", t(5))
        tx.link(SPACE, "use_a", "acc_y", t(3))
        tx.link(SPACE, "use_b", "acc_x", t(1))
    with store.transaction() as tx:
        tx.link(SPACE, "use_a", "acc_x", t(1))  # again, earlier: the first link's time is kept
        tx.link(SPACE, "use_a", "acc_x", t(9))
    assert store.links(SPACE, "use_a") == ["acc_y", "acc_x"]
    assert store.links(SPACE, "use_b") == ["acc_x"]
    assert store.dump(SPACE)["links"] == [["use_a", "acc_x"], ["use_a", "acc_y"], ["use_b", "acc_x"]]
    # with the first link's time (the Profile API pages links by it)
    assert store.link_records(SPACE, "use_a") == [LinkRecord("acc_y", t(3)), LinkRecord("acc_x", t(5))]
    assert store.link_records(SPACE, "use_c") == []


# -- events ---------------------------------------------------------------------------------------
def test_add_event_has_message_and_uniqueness(store: Store) -> None:
    original = event("m1", t(1), "use_a", "acc_x", ("user_id:u1", "group_id:g1"), source=None, name=None)
    with store.transaction() as tx:
        assert not tx.has_message(SPACE, "m1")
        tx.add_event(SPACE, original)
        assert tx.has_message(SPACE, "m1")
        assert not tx.has_message(OTHER, "m1")
    stored = store.events(SPACE, "use_a")
    assert len(stored) == 1 and stored[0].sequence > 0
    assert without_sequence(stored[0]) == original
    assert isinstance(stored[0].identifiers, tuple) and isinstance(stored[0].payload, bytes)
    assert store.events(SPACE, "acc_x") == []  # acc_x has no profile row: read as a users profile
    before = snapshot(store)
    with pytest.raises(Exception), store.transaction() as tx:  # noqa: B017
        tx.add_event(SPACE, event("m2", t(2), "use_a"))
        tx.add_event(SPACE, event("m1", t(3), "use_b"))
    assert snapshot(store) == before
    with store.transaction() as tx:
        tx.add_event(OTHER, event("m1", t(1), "use_a"))  # message ids are unique per space
        assert tx.has_message(OTHER, "m1")
    with store.transaction() as tx:
        tx.add_event(SPACE, event("m2", t(2), "use_a"))
    assert list(store.iter_event_ids(SPACE)) == ["m1", "m2"]
    sequences = [record.sequence for record in store.events(SPACE, "use_a")]
    assert sequences == sorted(sequences, reverse=True) and len(set(sequences)) == 2


def test_events_page_newest_first_and_the_cursor_is_stable(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
        create(tx, "use_b", t(1), anon("b1"))
    with store.transaction() as tx:
        merge(tx, "use_a", t(2), ("use_b", anon("b1")))
    # Timestamps deliberately out of order: pages follow ingest order (the sequence), which is what
    # makes `after_sequence` a stable cursor.
    times = [5, 3, 9, 1, 7, 2, 8]
    with store.transaction() as tx:
        for number, seconds in enumerate(times):
            owner = "use_a" if number % 2 == 0 else "use_b"
            tx.add_event(SPACE, event(f"e{number}", t(seconds), owner))
            tx.add_event(SPACE, event(f"x{number}", t(seconds), "use_x"))  # someone else's
    first = store.events(SPACE, "use_a", limit=3)
    assert [record.message_id for record in first] == ["e6", "e5", "e4"]
    with store.transaction() as tx:  # new events arrive while a reader pages
        tx.add_event(SPACE, event("e7", t(0), "use_b"))
        tx.add_event(SPACE, event("e8", t(99), "use_a"))
    second = store.events(SPACE, "use_a", limit=3, after_sequence=first[-1].sequence)
    assert [record.message_id for record in second] == ["e3", "e2", "e1"]
    third = store.events(SPACE, "use_a", limit=3, after_sequence=second[-1].sequence)
    assert [record.message_id for record in third] == ["e0"]
    assert store.events(SPACE, "use_a", limit=3, after_sequence=third[-1].sequence) == []
    assert [record.message_id for record in store.events(SPACE, "use_a", limit=2)] == ["e8", "e7"]
    everything = store.events(SPACE, "use_a", limit=100)
    assert [record.message_id for record in everything] == [f"e{n}" for n in range(8, -1, -1)]
    assert store.events(SPACE, "use_a", limit=0) == []
    assert store.event_count(SPACE, "use_a") == 9
    assert store.event_count(SPACE, "use_x") == 7


def test_event_count_and_events_of_an_account_family(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "acc_x", t(1), group("g1"))
        create(tx, "acc_z", t(1), group("g2"))
        create(tx, "use_a", t(1), uid("u1"))
        tx.add_event(SPACE, event("e1", t(1), "use_a", "acc_x"))
        tx.add_event(SPACE, event("e2", t(2), None, "acc_z"))
        tx.add_event(SPACE, event("e3", t(3), "use_a", None))
    with store.transaction() as tx:
        merge(tx, "acc_x", t(4), ("acc_z", group("g2")), collection="accounts")
    assert store.event_count(SPACE, "acc_x") == 2
    assert [record.message_id for record in store.events(SPACE, "acc_x")] == ["e2", "e1"]
    assert store.event_count(SPACE, "use_a") == 2
    assert store.unresolved(SPACE) == []  # an event with only an account is resolved


def test_unresolved_newest_first(store: Store) -> None:
    with store.transaction() as tx:
        for number in range(5):
            tx.add_event(SPACE, event(f"u{number}", t(number), None, None, ("anonymous_id:null",)))
            tx.add_event(SPACE, event(f"r{number}", t(number), "use_a"))
    assert [record.message_id for record in store.unresolved(SPACE)] == ["u4", "u3", "u2", "u1", "u0"]
    assert [record.message_id for record in store.unresolved(SPACE, limit=2)] == ["u4", "u3"]
    assert store.unresolved(SPACE)[0].identifiers == ("anonymous_id:null",)
    assert store.unresolved(OTHER) == []
    stats = store.stats(SPACE)
    assert (stats.events, stats.unresolved) == (10, 5)


def received(seconds: float) -> datetime:
    """When `event()` says a message sent at t(seconds) was received."""
    return t(seconds) + timedelta(milliseconds=250)


def test_activity_first_is_the_creating_message_last_the_last_ingested_of_the_family(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"), message_id="m1", source="web")
        create(tx, "use_b", t(2), anon("b1"), message_id="m2", source="app")
        create(tx, "use_c", t(2), anon("c1"), message_id="m-not-stored")
        create(tx, "use_d", t(2), anon("d1"), message_id="m3")
        tx.add_event(SPACE, event("m1", t(1), "use_a", source="web"))
        tx.add_event(SPACE, event("m2", t(2), "use_b", source="app"))
        tx.add_event(SPACE, event("m3", t(2), "use_d", source=None))
        tx.add_event(OTHER, event("m1", t(1), "use_a", source="other"))  # another space's, same ids
        tx.add_event(OTHER, event("m-not-stored", t(1), "use_c", source="other"))
        tx.add_event(OTHER, event("o1", t(50), "use_a", source="other"))
    assert store.activity(SPACE, "use_a") == ProfileActivity("m1", "web", "m1", "web", received(1))
    assert store.activity(SPACE, "use_b") == ProfileActivity("m2", "app", "m2", "app", received(2))
    # a creating message that was not stored has no source; without events nothing is last
    assert store.activity(SPACE, "use_c") == ProfileActivity("m-not-stored", None, None, None, None)
    assert store.activity(SPACE, "use_d") == ProfileActivity("m3", None, "m3", None, received(2))
    assert store.activity(SPACE, "use_nobody") == ProfileActivity(None, None, None, None, None)
    with store.transaction() as tx:
        tx.add_event(SPACE, event("e1", t(9), "use_a", source="web"))
        tx.add_event(SPACE, event("e2", t(3), "use_b", source="ios"))  # older, but ingested last
    assert store.activity(SPACE, "use_a") == ProfileActivity("m1", "web", "e1", "web", received(9))
    assert store.activity(SPACE, "use_b") == ProfileActivity("m2", "app", "e2", "ios", received(3))
    with store.transaction() as tx:
        merge(tx, "use_a", t(10), ("use_b", anon("b1")), message_id="m-merge")
    # last: the merged child's event, ingested after the root's (a merge is no event)
    assert store.activity(SPACE, "use_a") == ProfileActivity("m1", "web", "e2", "ios", received(3))
    with store.transaction() as tx:
        tx.add_event(SPACE, event("e3", t(4), "use_a", source=None))
    assert store.activity(SPACE, "use_a") == ProfileActivity("m1", "web", "e3", None, received(4))


def test_activity_of_an_account_family_reads_the_account_side(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "acc_x", t(1), group("g1"), message_id="m1", source="web")
        create(tx, "acc_z", t(1), group("g2"), message_id="m2", source="app")
        create(tx, "use_a", t(1), uid("u1"), message_id="m1", source="web")
        tx.add_event(SPACE, event("m1", t(1), "use_a", "acc_x", source="web"))
        tx.add_event(SPACE, event("m2", t(2), None, "acc_z", source="app"))
        tx.add_event(SPACE, event("m3", t(3), "use_a", None, source="ios"))  # the user's alone
    assert store.activity(SPACE, "acc_x") == ProfileActivity("m1", "web", "m1", "web", received(1))
    with store.transaction() as tx:
        merge(tx, "acc_x", t(4), ("acc_z", group("g2")), collection="accounts")
    assert store.activity(SPACE, "acc_x") == ProfileActivity("m1", "web", "m2", "app", received(2))
    assert store.activity(SPACE, "use_a") == ProfileActivity("m1", "web", "m3", "ios", received(3))


# (message id, seconds, owner, name), inserted in this order: ingest order is neither time nor id order.
_PAGED = [
    ("e05", 5, "use_a", "Bought"),
    ("e03", 5, "use_b", None),
    ("e08", 9, "use_a", None),
    ("e01", 5, "use_a", "Viewed"),
    ("e07", 3, "use_a", "Signed Up"),
    ("e02", 3, "use_b", "Bought"),
    ("e06", 7, "use_b", "Viewed"),
    ("e04", 1, "use_a", "Viewed"),
]
# By (timestamp, message_id): ties at 3 and at 5 span both family members.
_ASCENDING = ["e04", "e02", "e07", "e01", "e03", "e05", "e06", "e08"]


def _paged_fixture(store: Store) -> None:
    """use_b merged into use_a, then the _PAGED events; others' events at the same times around them."""
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
        create(tx, "use_b", t(1), anon("b1"))
    with store.transaction() as tx:
        merge(tx, "use_a", t(2), ("use_b", anon("b1")))
    with store.transaction() as tx:
        for message_id, seconds, owner, name in _PAGED:
            tx.add_event(SPACE, event(message_id, t(seconds), owner, name=name))
            tx.add_event(SPACE, event(f"x{message_id}", t(seconds), "use_x", name=name))  # someone else's
            tx.add_event(OTHER, event(message_id, t(seconds), "use_a", name=name))  # another space's


def test_event_page_orders_by_timestamp_then_message_id_both_ways(store: Store) -> None:
    _paged_fixture(store)
    assert page(store, "use_a", limit=100, descending=False) == _ASCENDING
    assert page(store, "use_a", limit=100) == _ASCENDING[::-1]  # newest first by default
    assert page(store, "use_a", limit=3) == ["e08", "e06", "e05"]
    assert page(store, "use_a", limit=0) == []
    # the records are the stored events, as events() reads them
    by_sequence = {record.message_id: record for record in store.events(SPACE, "use_a", limit=100)}
    assert store.event_page(SPACE, "use_a", EventQuery(limit=100)) == [
        by_sequence[message_id] for message_id in _ASCENDING[::-1]
    ]
    # ties in timestamp continue on the next page, without repeats or gaps
    assert all_pages(store, "use_a", 2, descending=False) == [
        ["e04", "e02"],
        ["e07", "e01"],
        ["e03", "e05"],
        ["e06", "e08"],
    ]
    assert all_pages(store, "use_a", 2) == [["e08", "e06"], ["e05", "e03"], ["e01", "e07"], ["e02", "e04"]]
    assert all_pages(store, "use_a", 3) == [["e08", "e06", "e05"], ["e03", "e01", "e07"], ["e02", "e04"]]
    # a cursor in the middle of a tie, either way
    assert page(store, "use_a", limit=100, after=(t(5), "e03")) == ["e01", "e07", "e02", "e04"]
    assert page(store, "use_a", limit=100, after=(t(5), "e03"), descending=False) == ["e05", "e06", "e08"]
    # a cursor need not name a stored event
    assert page(store, "use_a", limit=100, after=(t(5), "e02"), descending=False) == _ASCENDING[4:]
    assert page(store, "use_a", limit=100, after=(t(4), "zzz")) == ["e07", "e02", "e04"]
    assert page(store, "use_a", limit=100, after=(t(9), "e08"), descending=False) == []
    # the merged child's id reads its own events only, like events()
    assert page(store, "use_b", limit=100, descending=False) == ["e02", "e03", "e06"]


def test_event_page_cursor_is_stable_while_events_arrive(store: Store) -> None:
    _paged_fixture(store)

    def more(*added: tuple[str, float, str]) -> None:
        with store.transaction() as tx:
            for message_id, seconds, owner in added:
                tx.add_event(SPACE, event(message_id, t(seconds), owner))

    def next_page(after: tuple[datetime, str] | None) -> tuple[list[str], tuple[datetime, str]]:
        records = store.event_page(SPACE, "use_a", EventQuery(limit=2, after=after))
        return ids(records), (records[-1].timestamp, records[-1].message_id)

    seen, cursor = next_page(None)
    assert seen == ["e08", "e06"]  # the cursor is now (7, e06)
    # newer than the cursor (already behind the reader): not shown; older: shown in their place
    more(("e09", 99, "use_a"), ("e11", 7, "use_b"), ("e00", 7, "use_a"), ("e10", 5, "use_b"))
    second, cursor = next_page(cursor)
    assert second == ["e00", "e10"]
    more(("e12", 5, "use_a"), ("e13", 2, "use_b"))  # e12 sorts before the cursor (5, e10): not shown
    pages = [seen, second]
    while len(pages) < 20:  # bounded: a cursor that does not advance fails below instead of hanging
        records = store.event_page(SPACE, "use_a", EventQuery(limit=2, after=cursor))
        if not records:
            break
        pages.append(ids(records))
        cursor = (records[-1].timestamp, records[-1].message_id)
    assert pages == [["e08", "e06"], ["e00", "e10"], ["e05", "e03"], ["e01", "e07"], ["e02", "e13"], ["e04"]]
    walked = [message_id for one in pages for message_id in one]
    assert len(walked) == len(set(walked))  # no repeats
    assert set(_ASCENDING) <= set(walked)  # no gaps: every event there at the start was shown
    assert page(store, "use_a", limit=100)[:3] == ["e09", "e08", "e11"]  # a fresh walk sees them all
    assert len(page(store, "use_a", limit=100)) == len(_PAGED) + 6


def test_event_page_time_range_start_inclusive_end_exclusive(store: Store) -> None:
    _paged_fixture(store)
    assert page(store, "use_a", limit=100, start=t(3), end=t(7), descending=False) == [
        "e02",
        "e07",
        "e01",
        "e03",
        "e05",
    ]
    assert page(store, "use_a", limit=100, start=t(3), end=t(7)) == ["e05", "e03", "e01", "e07", "e02"]
    assert page(store, "use_a", limit=100, end=t(3)) == ["e04"]
    assert page(store, "use_a", limit=100, start=t(9)) == ["e08"]
    assert page(store, "use_a", limit=100, start=t(9), end=t(9)) == []
    assert page(store, "use_a", limit=100, start=t(5), end=t(5) + timedelta(microseconds=1)) == [
        "e05",
        "e03",
        "e01",
    ]
    # with a cursor: the range and the cursor both hold
    assert page(store, "use_a", limit=100, start=t(3), end=t(7), after=(t(5), "e03")) == ["e01", "e07", "e02"]
    assert all_pages(store, "use_a", 2, start=t(3), end=t(7)) == [["e05", "e03"], ["e01", "e07"], ["e02"]]


def test_event_page_include_and_exclude_names(store: Store) -> None:
    _paged_fixture(store)
    assert page(store, "use_a", limit=100, include=frozenset({"Viewed"}), descending=False) == [
        "e04",
        "e01",
        "e06",
    ]
    # only the named ones: events without a name are left out
    both = frozenset({"Viewed", "Bought"})
    assert page(store, "use_a", limit=100, include=both, descending=False) == [
        "e04",
        "e02",
        "e01",
        "e05",
        "e06",
    ]
    # everything but the named ones: events without a name stay
    assert page(store, "use_a", limit=100, exclude=frozenset({"Viewed"}), descending=False) == [
        "e02",
        "e07",
        "e03",
        "e05",
        "e08",
    ]
    assert page(store, "use_a", limit=100, exclude=both | {"Signed Up"}) == ["e08", "e03"]
    assert page(store, "use_a", limit=100, include=both, exclude=frozenset({"Bought"})) == [
        "e06",
        "e01",
        "e04",
    ]
    assert page(store, "use_a", limit=100, include=frozenset({"Nothing"})) == []
    assert page(store, "use_a", limit=100, exclude=frozenset({"Nothing"})) == _ASCENDING[::-1]
    # filters and pages together: a page is full whenever enough events match
    assert all_pages(store, "use_a", 2, include=both) == [["e06", "e05"], ["e01", "e02"], ["e04"]]
    assert all_pages(store, "use_a", 2, include=both, start=t(2), end=t(9), descending=False) == [
        ["e02", "e01"],
        ["e05", "e06"],
    ]


def test_event_page_of_an_account_family_reads_the_account_side(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "acc_x", t(1), group("g1"))
        create(tx, "acc_z", t(1), group("g2"))
        create(tx, "use_a", t(1), uid("u1"))
        tx.add_event(SPACE, event("e1", t(1), "use_a", "acc_x"))
        tx.add_event(SPACE, event("e2", t(2), None, "acc_z"))
        tx.add_event(SPACE, event("e3", t(3), "use_a", None))
        tx.add_event(SPACE, event("e4", t(1), None, "acc_z"))
    with store.transaction() as tx:
        merge(tx, "acc_x", t(4), ("acc_z", group("g2")), collection="accounts")
    assert page(store, "acc_x", limit=100) == ["e2", "e4", "e1"]
    assert all_pages(store, "acc_x", 1, descending=False) == [["e1"], ["e4"], ["e2"]]
    assert page(store, "use_a", limit=100) == ["e3", "e1"]


def test_unresolved_pages_with_a_stable_cursor(store: Store) -> None:
    with store.transaction() as tx:
        for number in range(5):
            tx.add_event(SPACE, event(f"u{number}", t(number), None, None))
            tx.add_event(SPACE, event(f"r{number}", t(number), "use_a"))
            tx.add_event(OTHER, event(f"o{number}", t(number), None, None))
    first = store.unresolved(SPACE, limit=2)
    assert ids(first) == ["u4", "u3"]
    with store.transaction() as tx:  # arriving while a reader pages: newer than any cursor, not shown
        tx.add_event(SPACE, event("u5", t(0), None, None))
    second = store.unresolved(SPACE, limit=2, before_sequence=first[-1].sequence)
    assert ids(second) == ["u2", "u1"]
    third = store.unresolved(SPACE, limit=2, before_sequence=second[-1].sequence)
    assert ids(third) == ["u0"]
    assert store.unresolved(SPACE, limit=2, before_sequence=third[-1].sequence) == []
    assert ids(store.unresolved(SPACE, limit=2)) == ["u5", "u4"]
    assert ids(store.unresolved(SPACE, before_sequence=first[0].sequence)) == ["u3", "u2", "u1", "u0"]
    assert store.unresolved(SPACE, limit=0) == []
    assert ids(store.unresolved(OTHER, limit=2)) == ["o4", "o3"]


# -- whole-space reads ----------------------------------------------------------------------------
def test_stats(store: Store) -> None:
    populate(store)
    assert store.stats(SPACE) == SpaceStats(
        space=SPACE,
        profiles=1,
        accounts=1,
        identifiers=4,
        merges=1,
        events=4,
        unresolved=1,
        suspect=1,
        dropped=2,
    )
    assert store.stats(SPACE).as_dict()["identifiers"] == 4
    assert store.stats(OTHER) == SpaceStats(OTHER)


def test_dump_is_canonical(store: Store) -> None:
    populate(store)
    dump = store.dump(SPACE)
    assert dump == {
        "profiles": [
            ["acc_x", "accounts", "", us(1), 0],
            ["use_a", "users", "", us(1), 1],
            ["use_b", "users", "use_a", us(2), 0],
        ],
        "identifiers": [
            ["accounts", "group_id", "g1", "acc_x", us(1), us(1), 0, ""],
            ["users", "anonymous_id", "a1", "use_a", us(1), us(1), 1, ""],
            ["users", "anonymous_id", "a2", "use_a", us(2), us(3), 0, "use_a"],
            ["users", "user_id", "u1", "use_a", us(1), us(3), 0, ""],
        ],
        "traits": [
            ["use_a", "age", "null", us(1)],
            ["use_a", "name", '"Ann"', us(1)],
        ],
        "links": [["use_a", "acc_x"]],
        "merges": [["use_a", "use_b", "m3", "anonymous_id:a2", us(3)]],
        "events": [
            ["m1", "use_a", "acc_x", '["user_id:u1","anonymous_id:a1","group_id:g1"]'],
            ["m2", "use_b", "", '["anonymous_id:a2","anonymous_id:null"]'],
            ["m3", "use_a", "", '["user_id:u1","anonymous_id:a2"]'],
            ["m4", "", "", '["anonymous_id:undefined"]'],
        ],
        "suspects": [["users", "anonymous_id", "a2", "user_id", '["u1","u9"]']],
        "dropped": [
            ["m2", "anonymous_id:null", "blocked value", "use_b"],
            ["m4", "anonymous_id:undefined", "blocked value", ""],
        ],
    }
    assert json.loads(json.dumps(dump)) == dump  # plain JSON: lists, strings and integers
    assert store.dump(OTHER) == {key: [] for key in dump}


def test_spaces_are_isolated(store: Store) -> None:
    for space, owner, trait in ((SPACE, "use_a", "one"), (OTHER, "use_a", "two")):
        store.ensure_space(space)
        with store.transaction() as tx:
            create(tx, owner, t(1), uid("u1"), message_id="m1", space=space)
            tx.set_traits(space, owner, {"which": trait}, t(1))
            tx.add_event(space, event("m1", t(1), owner))
            tx.learn_types(space, [(f"{trait}_id", "users")])
    with store.transaction() as tx:
        create(tx, "use_b", t(2), anon("a1"), space=OTHER)
        tx.apply_resolution(
            OTHER,
            resolution(
                "use_a",
                t(3),
                merges=(MergeStep("use_b", anon("a1")),),
                suspects=(SuspectMark(uid("u1"), "declared", ()),),
                evidence=((anon("a1"), uid("u1")),),
            ),
            "m3",
        )
    assert store.traits(SPACE, "use_a") == {"which": "one"}
    assert store.traits(OTHER, "use_a") == {"which": "two"}
    assert store.find_profile(SPACE, anon("a1")) is None
    assert store.find_profile(OTHER, anon("a1")) == "use_a"
    assert store.resolve_segment_id(SPACE, "use_b") is None
    assert store.profile(SPACE, "use_a") == ProfileRecord("use_a", "users", t(1), 0, (), "m1")
    assert store.merges(SPACE, "use_a") == []
    assert store.suspects(SPACE) == []
    assert store.learned_types(SPACE) == [("one_id", "users")]
    assert [record.value for record in store.identifiers(SPACE, "use_a")] == ["u1"]
    graph = view(store, [uid("u1"), anon("a1")])
    assert graph.evidence == {} and graph.suspects == frozenset()
    assert set(graph.profiles) == {"use_a"}
    assert graph.profiles["use_a"].merge_count == 0
    assert store.stats(SPACE).merges == 0 and store.stats(OTHER).merges == 1
    assert len(store.dump(SPACE)["identifiers"]) == 1 and len(store.dump(OTHER)["identifiers"]) == 2


# -- load_view ------------------------------------------------------------------------------------
def test_load_view_gives_the_resolver_its_neighbourhood(store: Store) -> None:
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"), anon("a1"))
        create(tx, "use_b", t(2), anon("a2"), email("e2"))
        create(tx, "use_c", t(3), anon("c1"))
        create(tx, "acc_x", t(1), group("g1"))
    with store.transaction() as tx:
        merge(tx, "use_b", t(4), ("use_c", anon("c1")))
        tx.apply_resolution(
            SPACE,
            resolution(
                "use_a",
                t(5),
                touched=(uid("u1"),),
                device_owned=(anon("a2"),),
                evidence=((anon("a1"), uid("u1")),),
                suspects=(SuspectMark(anon("a3"), "user_id", ("u1", "u2")),),
            ),
            "m5",
        )
    wanted = [uid("u1"), anon("a1"), anon("a2"), anon("a3"), anon("nobody")]
    graph = view(store, wanted)
    assert graph.identifiers == {
        uid("u1"): StoredIdentifier(uid("u1"), "use_a", t(1), t(5)),
        anon("a1"): StoredIdentifier(anon("a1"), "use_a", t(1), t(1)),
        anon("a2"): StoredIdentifier(anon("a2"), "use_b", t(2), t(2), False, "use_a", t(5)),
    }
    assert set(graph.profiles) == {"use_a", "use_b"}
    state_a, state_b = graph.profiles["use_a"], graph.profiles["use_b"]
    assert (state_a.segment_id, state_a.collection, state_a.created_at, state_a.merge_count) == (
        "use_a",
        "users",
        t(1),
        0,
    )
    assert members(state_a) == {
        StoredIdentifier(uid("u1"), "use_a", t(1), t(5)),
        StoredIdentifier(anon("a1"), "use_a", t(1), t(1)),
    }
    # a root's state carries its merged children's identifiers
    assert (state_b.created_at, state_b.merge_count) == (t(2), 1)
    assert members(state_b) == {
        StoredIdentifier(anon("a2"), "use_b", t(2), t(2)),
        StoredIdentifier(email("e2"), "use_b", t(2), t(2)),
        StoredIdentifier(anon("c1"), "use_b", t(3), t(3)),
    }
    assert graph.evidence == {anon("a1"): {uid("u1"): t(5)}}
    assert graph.suspects == frozenset({anon("a3")})
    # an identifier owned by a merged child is reported on the root
    assert view(store, [anon("c1")]).identifiers[anon("c1")].profile_id == "use_b"
    # collections are separate key spaces
    accounts = view(store, [group("g1"), Identifier("group_id", "u1", "accounts")], "accounts")
    assert accounts.identifiers == {group("g1"): StoredIdentifier(group("g1"), "acc_x", t(1), t(1))}
    assert accounts.profiles["acc_x"].collection == "accounts"
    assert view(store, []) == GraphView({}, {}, {}, frozenset())


# -- atomicity --------------------------------------------------------------------------------------
def _write_everything(tx: StoreTransaction) -> None:
    """One of every write, touching rows that already exist (see populate)."""
    create(tx, "use_c", t(9), anon("a3"), message_id="m9", source="app")
    tx.apply_resolution(
        SPACE,
        resolution(
            "use_a",
            t(10),
            merges=(MergeStep("use_c", anon("a3")),),
            added=(email("new"),),
            touched=(uid("u1"), anon("a2")),
            retired=(uid("u1"),),
            suspects=(SuspectMark(uid("u1"), "declared", ()),),
            evidence=((anon("a2"), uid("u1")), (anon("a1"), uid("u1"))),
            device_owned=(anon("a1"), anon("a2")),
            dropped=(Dropped(anon("x"), "cap"),),
        ),
        "m10",
        "app",
    )
    tx.apply_resolution(
        SPACE,
        resolution("acc_y", t(10), collection="accounts", created=True, added=(group("g2"),)),
        "m10",
        "app",
    )
    tx.set_traits(SPACE, "use_a", {"name": "Changed", "age": 4, "new": True}, t(10), "app")
    tx.set_traits(SPACE, "acc_x", {"plan": "pro"}, t(10), "app")
    tx.link(SPACE, "use_a", "acc_y", t(10))
    tx.add_event(SPACE, event("m10", t(10), "use_a", "acc_y"))
    tx.add_event(SPACE, event("m11", t(11), None, None))
    tx.record_dropped(SPACE, [Dropped(anon("y"), "blocked")], "m11", t(11), None)
    tx.learn_types(SPACE, [("crm_id", "users"), ("shop_id", "users")])


def test_a_failed_transaction_leaves_nothing(store: Store) -> None:
    populate(store)
    store.upsert_source(SourceRecord(SPACE, "web", "wk"))
    before = snapshot(store)
    with pytest.raises(RuntimeError), store.transaction() as tx:
        _write_everything(tx)
        with tx.savepoint():
            tx.add_event(SPACE, event("m12", t(12), "use_a"))
        raise RuntimeError("boom")
    assert snapshot(store) == before
    # and the store still works: the same writes land when committed
    with store.transaction() as tx:
        _write_everything(tx)
    assert store.resolve_segment_id(SPACE, "use_c") == "use_a"
    assert store.links(SPACE, "use_a") == ["acc_x", "acc_y"]
    assert store.learned_types(SPACE) == [("crm_id", "users"), ("shop_id", "users")]


def test_a_failed_savepoint_undoes_only_its_part(store: Store) -> None:
    populate(store)
    with store.transaction() as tx:
        with tx.savepoint():
            create(tx, "use_d", t(8), anon("a8"), message_id="m8")
            tx.add_event(SPACE, event("m8", t(8), "use_d"))
        # the transaction sees its own writes
        assert tx.has_message(SPACE, "m8")
        assert tx.load_view(SPACE, "users", [anon("a8")]).identifiers[anon("a8")].profile_id == "use_d"
    before = snapshot(store)
    with store.transaction() as tx:
        with pytest.raises(RuntimeError), tx.savepoint():
            _write_everything(tx)
            raise RuntimeError("one bad message")
        assert not tx.has_message(SPACE, "m10")
        with tx.savepoint():
            tx.set_traits(SPACE, "use_d", {"kept": 1}, t(12))
            with pytest.raises(RuntimeError), tx.savepoint():  # nested: the inner one alone rolls back
                tx.set_traits(SPACE, "use_d", {"lost": 1, "kept": 2}, t(12))
                tx.add_event(SPACE, event("m13", t(13), "use_d"))
                raise RuntimeError
            tx.add_event(SPACE, event("m12", t(12), "use_d"))
    after = snapshot(store)
    assert store.traits(SPACE, "use_d") == {"kept": 1}
    assert list(store.iter_event_ids(SPACE)) == ["m1", "m2", "m3", "m4", "m8", "m12"]
    assert store.resolve_segment_id(SPACE, "use_c") is None
    assert store.learned_types(SPACE) == [("crm_id", "users")]
    # apart from the trait and the event, nothing changed
    for key in ("profiles", "identifiers", "links", "merges", "suspects", "dropped"):
        assert after["dump"][key] == before["dump"][key]
    assert after["dump"]["traits"] == [*before["dump"]["traits"], ["use_d", "kept", "1", us(12)]]
    assert after["stats"] == dataclasses.replace(before["stats"], events=before["stats"].events + 1)


def test_a_failed_savepoint_undoes_its_part_even_after_a_read_inside_it(store: Store) -> None:
    """A store that holds writes back must send them before it reads what it has not claimed; a
    savepoint open at that moment must still roll back exactly its own part, nested ones included."""
    populate(store)
    with store.transaction() as tx:
        with tx.savepoint():
            tx.set_traits(SPACE, "use_a", {"kept": 1}, t(12))
            tx.add_event(SPACE, event("m12", t(12), "use_a"))
        with pytest.raises(RuntimeError), tx.savepoint():
            tx.set_traits(SPACE, "use_a", {"lost": 1}, t(13))
            tx.add_event(SPACE, event("m13", t(13), "use_a"))
            with tx.savepoint():  # nested, and it succeeds: still undone with its parent
                create(tx, "use_z", t(13), anon("z1"), message_id="m13")
            graph = tx.load_view(SPACE, "users", [anon("never-seen"), anon("z1")])
            assert graph.identifiers[anon("z1")].profile_id == "use_z"
            tx.set_traits(SPACE, "use_a", {"also lost": 1}, t(13))
            raise RuntimeError("a bad message")
        assert not tx.has_message(SPACE, "m13") and tx.has_message(SPACE, "m12")
        assert anon("z1") not in tx.load_view(SPACE, "users", [anon("z1")]).identifiers
        with tx.savepoint():
            create(tx, "use_y", t(14), anon("y1"), message_id="m14")
            tx.add_event(SPACE, event("m14", t(14), "use_y"))
    assert store.traits(SPACE, "use_a") == {"name": "Ann", "kept": 1}
    assert list(store.iter_event_ids(SPACE))[-2:] == ["m12", "m14"]
    assert store.find_profile(SPACE, anon("z1")) is None and store.profile(SPACE, "use_z") is None
    assert store.find_profile(SPACE, anon("y1")) == "use_y"


def test_claiming_ahead_changes_no_outcome(store: Store) -> None:
    """claim_many is a hint: with it, without it, or with claims that turn out wrong, the same writes."""
    populate(store)
    with store.transaction() as tx:
        tx.claim_many(
            [(SPACE, "m20", [uid("u1"), anon("a9")]), (SPACE, "m21", [anon("a2")]), (SPACE, "m1", [])]
        )
        assert tx.has_message(SPACE, "m1") and not tx.has_message(SPACE, "m20")
        tx.claim(SPACE, "m20", [uid("u1"), anon("a9")])
        graph = tx.load_view(SPACE, "users", [uid("u1"), anon("a9")])
        assert graph.identifiers[uid("u1")].profile_id == "use_a" and anon("a9") not in graph.identifiers
        tx.apply_resolution(
            SPACE, resolution("use_a", t(20), added=(anon("a9"),), touched=(uid("u1"),)), "m20"
        )
        tx.add_event(SPACE, event("m20", t(20), "use_a"))
        tx.claim(SPACE, "m22", [anon("a9"), anon("unclaimed")])  # not claimed ahead: claimed now
        graph = tx.load_view(SPACE, "users", [anon("a9"), anon("unclaimed")])
        assert graph.identifiers[anon("a9")].profile_id == "use_a"
        assert graph.profiles["use_a"].identifiers and anon("unclaimed") not in graph.identifiers
        tx.claim_many([(SPACE, "m23", [anon("a1")])])  # too late in the transaction: ignored, harmless
        assert tx.has_message(SPACE, "m20")
    assert store.find_profile(SPACE, anon("a9")) == "use_a"
    assert store.identifiers(SPACE, "use_a")


def test_suspects_survive_a_failed_savepoint(store: Store) -> None:
    with store.transaction() as tx:
        tx.apply_resolution(
            SPACE,
            resolution(
                "use_a",
                t(1),
                created=True,
                added=(anon("shared"),),
                suspects=(SuspectMark(anon("shared"), "user_id", ("u1", "u2")),),
            ),
            "m1",
        )
    with store.transaction() as tx:
        with pytest.raises(RuntimeError), tx.savepoint():
            create(tx, "use_b", t(2), uid("u9"), message_id="m2")
            raise RuntimeError("a rejected message")
        graph = tx.load_view(SPACE, "users", [anon("shared")])
        assert graph.suspects == frozenset({anon("shared")})
        assert graph.evidence == {}


def test_refreshes_of_earlier_messages_survive_a_later_failed_savepoint(store: Store) -> None:
    """Last-seen, device-owner and evidence refreshes of one transaction, several per row, then a rollback."""
    store.ensure_space(SPACE)
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"), anon("a1"))
        create(tx, "use_b", t(2), uid("u2"))
    with store.transaction() as tx:
        for at, owner, partner in ((t(30), "use_a", uid("u1")), (t(10), "use_b", uid("u2"))):
            with tx.savepoint():
                tx.apply_resolution(
                    SPACE,
                    resolution(
                        owner,
                        at,
                        touched=(anon("a1"),),
                        evidence=((anon("a1"), partner),),
                        device_owned=(anon("a1"),),
                    ),
                    f"m{at.second}",
                )
        with pytest.raises(RuntimeError), tx.savepoint():
            create(tx, "use_c", t(40), anon("a9"), message_id="m40")
            raise RuntimeError("a rejected message")
        # read after the rollback, which may have emptied any cache
        graph = tx.load_view(SPACE, "users", [anon("a1")])
        stored = graph.identifiers[anon("a1")]
        assert (stored.last_seen, stored.device_owner, stored.device_owner_at) == (t(30), "use_a", t(30))
        assert graph.evidence[anon("a1")] == {uid("u1"): t(30), uid("u2"): t(10)}
        with tx.savepoint():  # a later, older message refreshes nothing but first-seen
            tx.apply_resolution(
                SPACE, resolution("use_a", t(0), touched=(anon("a1"),), device_owned=(anon("a1"),)), "m0"
            )
    rows = {(row[1], row[2]): row for row in store.dump(SPACE)["identifiers"]}
    graph = view(store, [anon("a1")])
    stored = graph.identifiers[anon("a1")]
    assert (stored.first_seen, stored.last_seen) == (t(0), t(30))
    assert (stored.device_owner, stored.device_owner_at) == ("use_a", t(30))
    assert graph.evidence[anon("a1")] == {uid("u1"): t(30), uid("u2"): t(10)}
    assert ("anonymous_id", "a9") not in rows


def test_a_failed_outer_savepoint_keeps_the_refreshes_of_the_messages_before_it(store: Store) -> None:
    """A refresh held back from an earlier message goes in when a nested savepoint fails; the outer
    savepoint failing after that must not take it along: only what was written inside it is undone."""
    store.ensure_space(SPACE)
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"), anon("a1"))
    with store.transaction() as tx:
        with tx.savepoint():  # an earlier message, which only refreshes last-seen
            tx.apply_resolution(SPACE, resolution("use_a", t(30), touched=(anon("a1"),)), "m30")
        with pytest.raises(RuntimeError), tx.savepoint():
            tx.set_traits(SPACE, "use_a", {"lost": 1}, t(31))
            with pytest.raises(RuntimeError), tx.savepoint():
                create(tx, "use_z", t(32), anon("z1"), message_id="m32")
                raise RuntimeError("the inner part fails")
            raise RuntimeError("then the outer one")
        assert tx.load_view(SPACE, "users", [anon("a1")]).identifiers[anon("a1")].last_seen == t(30)
    assert view(store, [anon("a1")]).identifiers[anon("a1")].last_seen == t(30)
    assert store.traits(SPACE, "use_a") == {}
    assert store.find_profile(SPACE, anon("z1")) is None


@pytest.mark.parametrize("duplicate", ["an owned identifier", "an existing profile id", "a stored message"])
def test_a_write_that_breaks_a_uniqueness_rule_never_lands(store: Store, duplicate: str) -> None:
    """The engine never writes a second profile, owner or message under one key; a direct caller might.
    SQLite and memory refuse it inside its savepoint (IntegrityError), which rolls back alone while the
    rest of the transaction lands. PostgreSQL sends its writes at COMMIT, so there the whole transaction
    is refused. Either way no second row lands, and nothing stored before is lost or changed."""
    store.ensure_space(SPACE)
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"), message_id="m1")
        tx.add_event(SPACE, event("m1", t(1), "use_a"))

    def write_again(tx: StoreTransaction) -> None:
        if duplicate == "an owned identifier":
            create(tx, "use_b", t(2), uid("u1"), message_id="m2")
        elif duplicate == "an existing profile id":
            create(tx, "use_a", t(2), anon("a2"), message_id="m2")
        else:
            tx.add_event(SPACE, event("m1", t(2), "use_a"))

    refused_at_commit = store.url.startswith("postgresql")
    with contextlib.ExitStack() as refusal:
        if refused_at_commit:
            refusal.enter_context(pytest.raises(psycopg.errors.UniqueViolation))
        with store.transaction() as tx:
            with contextlib.suppress(IntegrityError), tx.savepoint():
                write_again(tx)
            if not refused_at_commit:
                graph = tx.load_view(SPACE, "users", [uid("u1"), anon("a2")])
                assert (
                    graph.identifiers[uid("u1")].profile_id == "use_a" and anon("a2") not in graph.identifiers
                )
                assert {item.identifier for item in graph.profiles["use_a"].identifiers} == {uid("u1")}
            create(tx, "use_c", t(3), anon("c1"), message_id="m3")  # the next message of the batch
    assert store.find_profile(SPACE, anon("c1")) == (None if refused_at_commit else "use_c")
    assert view(store, [uid("u1")]).identifiers[uid("u1")].profile_id == "use_a"
    assert store.find_profile(SPACE, anon("a2")) is None and store.profile(SPACE, "use_b") is None
    assert list(store.iter_event_ids(SPACE)) == ["m1"]


def test_reads_in_a_transaction_see_its_own_writes_after_a_claim(store: Store) -> None:
    """A claim may read ahead; whatever it read must not outlive the transaction's next write."""
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
        create(tx, "use_b", t(2), anon("a1"))
    with store.transaction() as tx:
        tx.claim(SPACE, "m3", [uid("u1"), anon("a1")])
        assert not tx.has_message(SPACE, "m3")
        before = tx.load_view(SPACE, "users", [uid("u1"), anon("a1")])
        assert before.identifiers[anon("a1")].profile_id == "use_b"
        merge(tx, "use_a", t(3), ("use_b", anon("a1")), message_id="m3")
        tx.add_event(SPACE, event("m3", t(3), "use_a", None, ("anonymous_id:a1",)))
        assert tx.has_message(SPACE, "m3")
        after = tx.load_view(SPACE, "users", [uid("u1"), anon("a1")])
        assert after.identifiers[anon("a1")].profile_id == "use_a"
        assert set(after.profiles) == {"use_a"}
        assert {item.identifier for item in after.profiles["use_a"].identifiers} == {uid("u1"), anon("a1")}


def test_a_failed_savepoint_forgets_what_was_read_after_its_undone_writes(store: Store) -> None:
    """Reads inside a savepoint that follow its own writes (here after a decision about a profile the
    transaction never read) describe writes the rollback undoes: they must not be answered again."""
    store.ensure_space(SPACE)
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
    with store.transaction() as tx:
        with pytest.raises(RuntimeError), tx.savepoint():
            create(tx, "use_z", t(2), anon("z1"), message_id="m2")
            tx.apply_resolution(SPACE, resolution("use_a", t(2), touched=(uid("u1"),)), "m2")
            assert tx.load_view(SPACE, "users", [anon("z1")]).identifiers[anon("z1")].profile_id == "use_z"
            raise RuntimeError("a bad message")
        graph = tx.load_view(SPACE, "users", [anon("z1"), uid("u1")])
        assert anon("z1") not in graph.identifiers
        assert set(graph.profiles) == {"use_a"}
    assert store.find_profile(SPACE, anon("z1")) is None


def test_evidence_of_an_identifier_outlives_its_being_attached(store: Store) -> None:
    """Evidence recorded while an identifier had no owner (dropped, or refused by the cap) is still
    read after a later message attaches it, in the same transaction and after it."""
    store.ensure_space(SPACE)
    with store.transaction() as tx:
        create(tx, "use_a", t(1), uid("u1"))
        tx.apply_resolution(SPACE, resolution("use_a", t(2), evidence=((anon("a9"), uid("u1")),)), "m2")
    with store.transaction() as tx:
        tx.claim(SPACE, "m3", [uid("u1"), anon("a9")])
        before = tx.load_view(SPACE, "users", [uid("u1"), anon("a9")])
        assert before.evidence == {anon("a9"): {uid("u1"): t(2)}}
        tx.apply_resolution(SPACE, resolution("use_a", t(3), added=(anon("a9"),), touched=(uid("u1"),)), "m3")
        after = tx.load_view(SPACE, "users", [uid("u1"), anon("a9")])
        assert after.evidence == {anon("a9"): {uid("u1"): t(2)}}
    assert view(store, [anon("a9")]).evidence == {anon("a9"): {uid("u1"): t(2)}}


def test_a_device_login_at_the_stored_time_repoints_a_merged_owner(store: Store) -> None:
    """A login at the very time of the stored one wins (ties go to the later write), also when the
    stored owner has since been merged into the profile that logs in."""
    store.ensure_space(SPACE)
    with store.transaction() as tx:
        create(tx, "use_r", t(1), uid("u1"))
        create(tx, "use_c", t(1), uid("u2"), anon("a1"))
        tx.apply_resolution(SPACE, resolution("use_c", t(5), device_owned=(anon("a1"),)), "m5")
    with store.transaction() as tx:
        merge(tx, "use_r", t(6), ("use_c", uid("u2")), message_id="m6")
    with store.transaction() as tx:
        tx.claim(SPACE, "m7", [uid("u1"), anon("a1")])
        tx.load_view(SPACE, "users", [uid("u1"), anon("a1")])
        tx.apply_resolution(SPACE, resolution("use_r", t(5), device_owned=(anon("a1"),)), "m7")
    rows = {(row[1], row[2]): row for row in store.dump(SPACE)["identifiers"]}
    assert rows[("anonymous_id", "a1")][7] == "use_r"
