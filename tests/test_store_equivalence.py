"""The memory store behaves exactly like the SQLite store: same stream in, same graph and reads out."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from idstitch.config import Config
from idstitch.core.errors import InvalidEvent
from idstitch.core.identifiers import Dropped, Identifier
from idstitch.core.messages import Message, parse_message
from idstitch.core.resolve import MergeStep, Resolution, SuspectMark
from idstitch.engine import Engine
from idstitch.sim.population import WorkloadConfig, generate
from idstitch.storage.base import EventQuery, EventRecord, Store, StoreTransaction
from idstitch.storage.sqlite import SQLiteStore
from idstitch.storage.urls import open_store

RECEIVED = datetime(2026, 6, 1, tzinfo=UTC)
SPACE = "default"


def _messages(count: int, seed: int) -> list[Message | InvalidEvent]:
    parsed: list[Message | InvalidEvent] = []
    for generated in generate(WorkloadConfig(messages=count, seed=seed)):
        try:
            parsed.append(parse_message(generated.message, received_at=RECEIVED))
        except InvalidEvent as error:
            parsed.append(error)
    return parsed


def _event_pages(store: Store, space: str, segment_id: str) -> list[list[EventRecord]]:
    """event_page both ways, filtered, and walked with its cursor from the middle of the history."""
    newest = store.event_page(space, segment_id, EventQuery(limit=5))
    pages = [
        newest,
        store.event_page(space, segment_id, EventQuery(limit=5, descending=False, include=frozenset({"x"}))),
        store.event_page(space, segment_id, EventQuery(limit=5, exclude=frozenset({"x"}), start=T0)),
    ]
    if newest:
        after = (newest[-1].timestamp, newest[-1].message_id)
        pages.append(store.event_page(space, segment_id, EventQuery(limit=5, after=after)))
        pages.append(store.event_page(space, segment_id, EventQuery(limit=5, after=after, descending=False)))
    return pages


def _reads(store: Store, space: str, every: int = 7) -> dict[str, Any]:
    """The dump plus every per-profile read, for every `every`-th profile (merged ones included)."""
    dump = store.dump(space)
    sample = [row[0] for row in dump["profiles"]][::every]
    unresolved = store.unresolved(space, limit=3)
    return {
        "dump": dump,
        "stats": store.stats(space),
        "learned": store.learned_types(space),
        "suspects": store.suspects(space),
        "unresolved": store.unresolved(space, limit=1000),
        "unresolved_page": store.unresolved(space, limit=3, before_sequence=unresolved[-1].sequence)
        if unresolved
        else [],
        "event_ids": list(store.iter_event_ids(space)),
        "find": [
            store.find_profile(space, Identifier(row[1], row[2], row[0])) for row in dump["identifiers"]
        ],
        "profiles": {
            segment_id: (
                store.resolve_segment_id(space, segment_id),
                store.profile(space, segment_id),
                store.identifiers(space, segment_id),
                store.traits(space, segment_id),
                store.trait_records(space, segment_id),
                store.activity(space, segment_id),
                store.event_count(space, segment_id),
                store.events(space, segment_id, limit=5),
                _event_pages(store, space, segment_id),
                store.links(space, segment_id),
                store.merges(space, segment_id),
                store.dropped(space, segment_id),
            )
            for segment_id in sample
        },
    }


@pytest.mark.slow
@pytest.mark.parametrize(("count", "adapters"), [(20_000, ("memory",)), (4_000, ("memory", "postgres"))])
def test_engine_on_every_store_builds_the_same_graph(
    count: int, adapters: tuple[str, ...], request: pytest.FixtureRequest
) -> None:
    """The same stream through the engine on SQLite and on each other adapter: the same graph and reads."""
    messages = _messages(count, seed=3)
    urls = {"memory": "memory://"}
    if "postgres" in adapters:
        urls["postgres"] = request.getfixturevalue("postgres_url")
    others = [urls[name] for name in adapters]
    results: dict[str, dict[str, Any]] = {}
    for url in ("sqlite://", *others):
        store = open_store(url)
        try:
            engine = Engine(store, Config.default())
            for start in range(0, len(messages), 500):
                engine.ingest(messages[start : start + 500], space=SPACE, source="default")
            results[url] = _reads(store, SPACE)
        finally:
            store.close()
    sqlite = results["sqlite://"]
    assert sqlite["stats"].merges > 0 and sqlite["stats"].suspect > 0 and sqlite["stats"].dropped > 0
    for url in others:
        for key in sqlite["dump"]:
            assert results[url]["dump"][key] == sqlite["dump"][key], (url, key)
        assert results[url] == sqlite, url


@pytest.mark.parametrize("per_transaction", [1, 4])
def test_aliases_back_and_forth_retire_and_revive_alike_in_every_store(
    postgres_url: str, per_transaction: int
) -> None:
    """In separate transactions and in one (PostgreSQL sends each identifier's last word only)."""
    raws = [
        {"type": "identify", "userId": "u1", "anonymousId": "a1"},
        {"type": "alias", "userId": "u2", "previousId": "u1"},
        {"type": "alias", "userId": "u1", "previousId": "u2"},
        {"type": "identify", "userId": "u7", "anonymousId": "a1"},
    ]
    messages: list[Message | InvalidEvent] = [
        parse_message(
            {**raw, "messageId": f"m{number}", "timestamp": f"2026-01-0{number + 1}T00:00:00Z"},
            received_at=RECEIVED,
        )
        for number, raw in enumerate(raws)
    ]
    dumps = {}
    for url in ("sqlite://", "memory://", postgres_url):
        store = open_store(url)
        try:
            engine = Engine(store, Config.default())
            for start in range(0, len(messages), per_transaction):
                engine.ingest(messages[start : start + per_transaction], space=SPACE)
            dumps[url] = store.dump(SPACE)
        finally:
            store.close()
    retired = {(row[1], row[2]): row[6] for row in dumps["sqlite://"]["identifiers"]}
    assert retired == {
        ("anonymous_id", "a1"): 0,
        ("user_id", "u1"): 0,
        ("user_id", "u2"): 1,
        ("user_id", "u7"): 0,
    }
    assert dumps["memory://"] == dumps["sqlite://"]
    assert dumps[postgres_url] == dumps["sqlite://"]


def test_the_largest_values_a_message_may_carry_land_alike_in_every_store(postgres_url: str) -> None:
    """Identifiers at 1,000 bytes (4-byte characters), paired in evidence; 64-character types; 1,000-byte
    trait keys: all fit PostgreSQL's index rows. Past the limits, an identifier is dropped (before: an
    8,000-character userId failed every writer's batch after two minutes of retries) and a key refused."""
    wide = "\U0001f600" * 250  # 1,000 bytes in UTF-8
    custom = "t" * 64
    raws: list[dict[str, Any]] = [
        {"type": "identify", "userId": "u-" + wide[:-1], "anonymousId": "a-" + wide[:-1], "messageId": "m1"},
        {
            "type": "identify",
            "anonymousId": "a-" + wide[:-1],
            "traits": {"email": wide[:-1] + "@x", "k" * 1000: 1},
            "context": {
                "externalIds": [{"id": wide, "type": custom, "collection": "users", "encoding": "none"}]
            },
            "messageId": "m2",
        },
        {"type": "identify", "userId": "x" * 8000, "anonymousId": "a3", "messageId": "m3"},
        {"type": "group", "userId": "u3", "groupId": "g" * 1001, "messageId": "m4"},
        {"type": "track", "event": "E", "userId": "y" * 1001, "messageId": "m5"},
        {"type": "identify", "userId": "u6", "traits": {"k" * 1001: 1}, "messageId": "m6"},
    ]
    messages: list[Message | InvalidEvent] = []
    for raw in raws:
        try:
            messages.append(parse_message(raw, received_at=RECEIVED))
        except InvalidEvent as error:
            messages.append(error)
    assert str(messages[5]) == "traits: a key of 1,001 bytes is over the 1,000-byte limit"
    results: dict[str, tuple[list[str], dict[str, Any]]] = {}
    for url in ("sqlite://", "memory://", postgres_url):
        store = open_store(url)
        try:
            outcomes = Engine(store, Config.default()).ingest(messages, space=SPACE).outcomes
            results[url] = ([outcome.status for outcome in outcomes], store.dump(SPACE))
            too_long = [(str(drop.identifier)[:9], drop.rule) for drop in outcomes[2].dropped]
            assert too_long == [("user_id:x", "too long: 8,000 bytes, over the 1,000 an identifier may have")]
        finally:
            store.close()
    statuses, dump = results["sqlite://"]
    assert statuses == ["resolved", "resolved", "resolved", "resolved", "unresolved", "rejected"]
    stored = {row[2] for row in dump["identifiers"]}
    assert {"u-" + wide[:-1], wide[:-1] + "@x", wide, "a3"} <= stored
    assert not any(len(value) > 1000 for value in stored)
    assert results["memory://"] == results["sqlite://"]
    assert results[postgres_url] == results["sqlite://"]


def test_a_nul_in_a_base64_external_id_lands_alike_in_every_store(postgres_url: str) -> None:
    """Found by tests/test_store_differential.py: decoded base64 bypassed decode_document's NUL repair, so
    PostgreSQL failed the whole batch (text cannot hold U+0000) where SQLite and memory stored it."""
    raw = {
        "type": "identify",
        "userId": "u1",
        "messageId": "m1",
        "context": {
            "externalIds": [{"id": "YQBi", "type": "crm_id", "collection": "users", "encoding": "base64"}]
        },
    }
    results = {}
    for url in ("sqlite://", "memory://", postgres_url):
        store = open_store(url)
        try:
            outcomes = Engine(store, Config.default()).ingest(
                [parse_message(raw, received_at=RECEIVED)], space=SPACE
            )
            results[url] = ([(item.status, item.dropped) for item in outcomes.outcomes], store.dump(SPACE))
        finally:
            store.close()
    damaged = Identifier("crm_id", "a\ufffdb")
    assert results["sqlite://"][0] == [
        ("resolved", (Dropped(damaged, "damaged: holds U+FFFD, a character lost in encoding"),))
    ]
    assert results["memory://"] == results["sqlite://"]
    assert results[postgres_url] == results["sqlite://"]


def test_a_sqlite_graph_cache_far_smaller_than_the_graph_stays_bounded_and_changes_nothing(
    tmp_path: Path,
) -> None:
    """A bound of 100 identifiers on a graph of thousands: cleared again and again, same graph as memory."""
    messages = _messages(4_000, seed=5)
    bounded = SQLiteStore(tmp_path / "bounded.db", cache_size=100)
    reference = open_store("memory://")
    largest = 0
    try:
        for store in (bounded, reference):
            engine = Engine(store, Config.default())
            for start in range(0, len(messages), 100):
                engine.ingest(messages[start : start + 100], space=SPACE, source="default")
                if store is bounded:
                    largest = max(largest, len(bounded._cache.identifiers))
        bounded_reads, reference_reads = _reads(bounded, SPACE), _reads(reference, SPACE)
    finally:
        bounded.close()
        reference.close()
    identifiers = bounded_reads["stats"].identifiers
    assert identifiers > 1_500 and bounded_reads["stats"].merges > 0
    # One batch of 100 messages can add what it touches on top of the bound, never the whole graph.
    assert largest < identifiers / 2, (largest, identifiers)
    assert bounded_reads == reference_reads


def _without_sequences(value: Any) -> Any:
    """Reads with every EventRecord's sequence set to 0.

    Sequences are the store's to assign: PostgreSQL's identity column skips the values of rolled-back
    inserts, SQLite's does not. What they must agree on is the order, which the lists keep.
    """
    if isinstance(value, EventRecord):
        return msgspec.structs.replace(value, sequence=0)
    if isinstance(value, dict):
        return {key: _without_sequences(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_without_sequences(item) for item in value)
    return value


# -- random protocol operations, applied to both stores ---------------------------------------------
T0 = datetime(2026, 1, 1, tzinfo=UTC)
Op = Callable[[StoreTransaction], None]


class _Model:
    """Just enough of the graph to generate valid random writes (one owner per identifier, roots only)."""

    def __init__(self, seed: int) -> None:
        self.random = random.Random(seed)
        self.roots: dict[str, str] = {}  # root -> collection
        self.owner: dict[Identifier, str] = {}
        self.messages = 0
        self.profiles = 0

    def save(self) -> tuple[dict[str, str], dict[Identifier, str]]:
        return dict(self.roots), dict(self.owner)

    def restore(self, saved: tuple[dict[str, str], dict[Identifier, str]]) -> None:
        self.roots, self.owner = dict(saved[0]), dict(saved[1])

    def time(self) -> datetime:
        return T0 + timedelta(seconds=self.random.randrange(0, 50))

    def identifier(self, collection: str) -> Identifier:
        kinds = ("group_id",) if collection == "accounts" else ("user_id", "anonymous_id", "email")
        return Identifier(self.random.choice(kinds), f"v{self.random.randrange(40)}", collection)

    def operation(self) -> tuple[str, Op]:
        rnd = self.random
        collection = "accounts" if rnd.random() < 0.25 else "users"
        roots = [root for root, kind in self.roots.items() if kind == collection]
        at = self.time()
        self.messages += 1
        message_id = f"m{self.messages}"
        source = rnd.choice([None, "web", "app"])
        choice = rnd.random()
        if choice < 0.25 or not roots:
            free = {self.identifier(collection) for _ in range(rnd.randrange(1, 4))} - set(self.owner)
            self.profiles += 1
            profile_id = f"{'acc' if collection == 'accounts' else 'use'}_{self.profiles:03d}"
            self.roots[profile_id] = collection
            for item in free:
                self.owner[item] = profile_id
            decision = _resolution(profile_id, at, collection, created=True, added=tuple(sorted(free)))
            return "create", lambda tx: tx.apply_resolution(SPACE, decision, message_id, source)
        target = rnd.choice(roots)
        if choice < 0.4 and len(roots) > 1:
            children = rnd.sample([root for root in roots if root != target], k=min(len(roots) - 1, 2))
            steps = []
            for child in children:
                del self.roots[child]
                mine = [item for item, owner in self.owner.items() if owner == child]
                for item in mine:
                    self.owner[item] = target
                steps.append(MergeStep(child, mine[0] if mine else self.identifier(collection)))
            decision = _resolution(target, at, collection, merges=tuple(steps))
            return "merge", lambda tx: tx.apply_resolution(SPACE, decision, message_id, source)
        if choice < 0.7:
            known = list(self.owner)
            picked = {self.identifier(collection) for _ in range(4)}
            added = tuple(sorted(picked - set(self.owner)))
            for item in added:
                self.owner[item] = target
            sample = rnd.sample(known, k=min(len(known), 3))
            decision = _resolution(
                target,
                at,
                collection,
                added=added,
                touched=tuple(item for item in sample if self.owner[item] == target),
                retired=tuple(sample[:1]) if rnd.random() < 0.2 else (),
                device_owned=tuple(sample) if rnd.random() < 0.5 else (),
                evidence=tuple((a, b) for a in sample for b in sample if a != b),
                suspects=tuple(SuspectMark(item, "user_id", ("x", item.value)) for item in sample[:1])
                if rnd.random() < 0.3
                else (),
                dropped=(Dropped(self.identifier(collection), "cap"),) if rnd.random() < 0.3 else (),
            )
            return "update", lambda tx: tx.apply_resolution(SPACE, decision, message_id, source)
        if choice < 0.8:
            updates = {key: rnd.choice([None, 1, "x", [1, {"a": 2}]]) for key in rnd.sample("abcdef", k=2)}
            return "traits", lambda tx: tx.set_traits(SPACE, target, updates, at, source)
        if choice < 0.87:
            users = [root for root, kind in self.roots.items() if kind == "users"]
            accounts = [root for root, kind in self.roots.items() if kind == "accounts"]
            if users and accounts:
                user, account = rnd.choice(users), rnd.choice(accounts)
                return "link", lambda tx: tx.link(SPACE, user, account, at)
        if choice < 0.95:
            user_side: str | None = target if collection == "users" else None
            account_side: str | None = target if collection == "accounts" else None
            if rnd.random() < 0.1:
                user_side = account_side = None
            name = rnd.choice(["x", "y", None])
            record = EventRecord(
                message_id, "track", name, at, at, source, user_side, account_side, ("a:b",), b"{}"
            )
            return "event", lambda tx: tx.add_event(SPACE, record)
        drops = [Dropped(self.identifier(collection), "blocked")]
        owner = target if rnd.random() < 0.7 else None
        return "dropped", lambda tx: tx.record_dropped(SPACE, drops, message_id, at, owner)


def _resolution(
    profile_id: str, at: datetime, collection: str, *, created: bool = False, **parts: Any
) -> Resolution:
    fields: dict[str, Any] = {
        "merges": (),
        "added": (),
        "touched": (),
        "dropped": (),
        "retired": (),
        "suspects": (),
        "evidence": (),
        "device_owned": (),
    }
    fields.update(parts)
    return Resolution(collection, profile_id, at, created, at, **fields)


class _Boom(Exception):
    pass


def _view(tx: StoreTransaction, model: _Model) -> tuple[Any, ...]:
    """load_view of a few random identifiers, with the order of profile members ignored."""
    collection = model.random.choice(["users", "accounts"])
    wanted = [model.identifier(collection) for _ in range(3)]
    graph = tx.load_view(SPACE, collection, wanted)
    return (
        dict(graph.identifiers),
        {root: (state, set(state.identifiers)) for root, state in graph.profiles.items()},
        graph.evidence,
        graph.suspects,
    )


def _comparable_state(view: tuple[Any, ...]) -> tuple[Any, ...]:
    identifiers, profiles, evidence, suspects = view
    return (
        identifiers,
        {
            root: (msgspec.structs.replace(state, identifiers=()), members)
            for root, (state, members) in profiles.items()
        },
        evidence,
        suspects,
    )


def _planned(model: _Model, fate: random.Random, fail_rate: float) -> tuple[str, Op, bool]:
    """The model's next operation, and whether its savepoint fails (then the model forgets it)."""
    saved = model.save()
    name, op = model.operation()
    fail = fate.random() < fail_rate
    if fail:
        model.restore(saved)
    return name, op, fail


def _in_savepoint(tx: StoreTransaction, op: Op, fail: bool) -> None:
    """One operation in a savepoint of its own, which fails after it when planned."""
    with contextlib.suppress(_Boom), tx.savepoint():
        op(tx)
        if fail:
            raise _Boom


def _nested_savepoints(transactions: list[StoreTransaction], model: _Model, fate: random.Random) -> str:
    """Two operations, each in its own savepoint, inside an outer one; any of the three may fail."""
    saved_outer = model.save()
    steps = [_planned(model, fate, 0.3) for _ in range(2)]
    outer_fails = fate.random() < 0.3
    if outer_fails:
        model.restore(saved_outer)
    for tx in transactions:
        with contextlib.suppress(_Boom), tx.savepoint():
            for _, op, fail in steps:
                _in_savepoint(tx, op, fail)
            if outer_fails:
                raise _Boom
    return f"nested, the last {steps[-1][0]}"


@pytest.mark.parametrize("seed", range(16))
def test_random_writes_give_the_same_reads(seed: int, postgres_url: str) -> None:
    """Random valid writes, some in failing savepoints or transactions, applied to every store in step."""
    stores = [open_store("sqlite://"), open_store("memory://"), open_store(postgres_url)]
    model = _Model(seed)
    fate = random.Random(seed + 1000)
    try:
        for _ in range(40):
            saved_batch = model.save()
            try:
                with contextlib.ExitStack() as stack:
                    transactions = [stack.enter_context(store.transaction()) for store in stores]
                    for _ in range(fate.randrange(1, 12)):
                        if fate.random() < 0.25:
                            name = _nested_savepoints(transactions, model, fate)
                        else:
                            name, op, fail = _planned(model, fate, 0.15)
                            for tx in transactions:
                                _in_savepoint(tx, op, fail)
                        state = model.random.getstate()
                        views = []
                        for tx in transactions:
                            model.random.setstate(state)
                            views.append(_comparable_state(_view(tx, model)))
                        for view in views[1:]:
                            assert view == views[0], name
                    if fate.random() < 0.15:
                        raise _Boom
            except _Boom:
                model.restore(saved_batch)
        first, *others = (_without_sequences(_reads(store, SPACE, every=1)) for store in stores)
        for other in others:
            for key in first["dump"]:
                assert other["dump"][key] == first["dump"][key], key
            assert other == first
    finally:
        for store in stores:
            store.close()


@pytest.mark.parametrize("shared_store", ["sqlite", "postgres"])
def test_a_second_writer_learning_custom_types_is_seen_by_the_first(
    shared_store: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """`idstitch serve` and `idstitch ingest` on one SQLite file, or two workers on one PostgreSQL: types
    learned by one keep their order in the other, so a message decides as it would in a single process
    (custom types rank in first-seen order).

    Before: the serving engine kept its own list, [loyalty, phone], where the store said [phone, loyalty];
    the last message then kept phone:X and dropped loyalty:Y in one process, the reverse in the other.
    """

    def external(kind: str, *values: str) -> list[dict[str, str]]:
        return [{"id": value, "type": kind, "collection": "users", "encoding": "none"} for value in values]

    stream = [
        ("serve", {"messageId": "warm", "anonymousId": "w"}),
        (
            "ingest",
            {
                "messageId": "q",
                "anonymousId": "aq",
                "context": {"externalIds": external("phone", "q1", "q2", "x")},
            },
        ),
        (
            "serve",
            {
                "messageId": "p",
                "anonymousId": "ap",
                "context": {"externalIds": external("loyalty", "y") + external("phone", "p1", "p2", "p3")},
            },
        ),
        # Merging p's and q's profiles would hold 6 phones (limit 5): the lowest-priority type is dropped.
        (
            "serve",
            {
                "messageId": "last",
                "context": {"externalIds": external("phone", "x") + external("loyalty", "y")},
            },
        ),
    ]

    def parsed(fields: dict[str, Any]) -> Message | InvalidEvent:
        return parse_message(
            {"type": "identify", "timestamp": "2026-01-05T09:00:00Z", **fields}, received_at=RECEIVED
        )

    shared = (
        f"sqlite:///{tmp_path / 'shared.db'}"
        if shared_store == "sqlite"
        else request.getfixturevalue("postgres_url")
    )
    served, ingested = open_store(shared), open_store(shared)
    alone = SQLiteStore(tmp_path / "alone.db")
    try:
        engines = {"serve": Engine(served, Config.default()), "ingest": Engine(ingested, Config.default())}
        single = Engine(alone, Config.default())
        for who, fields in stream:
            two = engines[who].ingest([parsed(fields)], space=SPACE).outcomes
            one = single.ingest([parsed(fields)], space=SPACE).outcomes
            assert two == one, fields["messageId"]
        assert engines["serve"].rules(SPACE).learned_types == (("phone", "users"), ("loyalty", "users"))
        assert served.dump(SPACE) == alone.dump(SPACE)
    finally:
        for store in (served, ingested, alone):
            store.close()
