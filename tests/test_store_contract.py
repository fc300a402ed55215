"""The store contract suite (tests/store_contract.py) run against every adapter of this build."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

pytest.register_assert_rewrite("store_contract")  # plain asserts in the suite report their values

from idstitch.storage.base import Store  # noqa: E402
from idstitch.storage.urls import open_store  # noqa: E402
from store_contract import *  # noqa: E402, F403

ADAPTERS = ["sqlite", "sqlite-memory", "memory", "postgres"]
PERSISTENT = {"sqlite", "postgres"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every adapter for every test; only adapters that persist for tests that reopen the store."""
    if "store_url" in metafunc.fixturenames:
        persistent = "reopen" in metafunc.fixturenames
        adapters = [name for name in ADAPTERS if name in PERSISTENT or not persistent]
        metafunc.parametrize("store_url", adapters, indirect=True)


@pytest.fixture
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "postgres":
        return str(request.getfixturevalue("postgres_url"))
    return {
        "sqlite": f"sqlite:///{tmp_path / 'graph.db'}",
        "sqlite-memory": "sqlite://",
        "memory": "memory://",
    }[request.param]


@pytest.fixture
def store(request: pytest.FixtureRequest, store_url: str) -> Iterator[Store]:
    opened = open_store(store_url)
    yield opened
    opened.close()


@pytest.fixture
def reopen(store: Store, store_url: str) -> Iterator[Callable[[], Store]]:
    opened: list[Store] = [store]

    def again() -> Store:
        opened[-1].close()
        opened.append(open_store(store_url))
        return opened[-1]

    yield again
    for extra in opened[1:]:
        extra.close()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "memory://",
    ],
)
def test_new_in_memory_stores_start_empty(url: str) -> None:
    from datetime import UTC, datetime

    from idstitch.storage.base import EventRecord

    at = datetime(2026, 1, 1, tzinfo=UTC)
    kept: list[object] = []  # transactions outlive their stores, as they can in a traceback or a variable
    try:
        for attempt in range(100):
            store = open_store(url)
            assert list(store.iter_event_ids("s")) == [], f"attempt {attempt}"
            with store.transaction() as tx:
                tx.add_event(
                    "s", EventRecord(f"m{attempt}", "track", None, at, at, None, "use_a", None, (), b"")
                )
            kept.append(tx)
            del store
    finally:
        kept.clear()


def test_sqlite_reads_and_merges_of_one_profile_never_walk_the_whole_space(tmp_path: Path) -> None:
    """Each statement that reads a profile, its links, or merges accounts finds its rows by an index:
    a plan that searches by `space` alone walks every profile or link of the space (was: an account's
    links took 90 ms in a space of a million links, each profile read grew with the space)."""
    from helpers import open_space
    from idstitch.storage.sqlite import SQLiteStore

    with open_space(tmp_path) as space:
        for number in range(5):
            space.send("group", userId=f"u{number}", groupId="acme")
        space.send("alias", previousId="u2", userId="u1")  # a user with a merged child
        store = space.store
        assert isinstance(store, SQLiteStore)
        db = store._writer
        statements: list[str] = []
        db.set_trace_callback(statements.append)
        try:
            # An account with a user merges into an older one (its links move), through a custom type.
            ext = {"id": "S2", "type": "sfid", "collection": "accounts", "encoding": "none"}
            space.send("group", userId="u4", groupId="globex")
            space.send("track", userId="u3", context={"externalIds": [ext]})
            merged = space.send("group", userId="u9", groupId="globex", context={"externalIds": [ext]})
            assert len(merged.merged) == 1
            reader = store._reader()
            reader.set_trace_callback(statements.append)
            for ref in ("group_id:acme", "group_id:globex", "user_id:u1", "user_id:u4"):
                root = space.profile_of(ref)
                assert root is not None
                store.profile(space.name, root)
                store.links(space.name, root)
                store.event_count(space.name, root)
        finally:
            db.set_trace_callback(None)
            store._reader().set_trace_callback(None)
        walks = {}
        for sql in dict.fromkeys(statements):
            if not sql.lstrip().upper().startswith(("SELECT", "INSERT", "UPDATE", "DELETE")):
                continue
            plan = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql)]
            graph = re.compile(r"^(SCAN|SEARCH) (profiles|links|identifiers|traits|events|merges)\b")
            if any(
                graph.match(step) and (step.endswith("(space=?)") or step.startswith("SCAN")) for step in plan
            ):
                walks[sql] = plan
        assert walks == {}


def test_sqlite_profile_api_pages_read_by_an_index_in_page_order(tmp_path: Path) -> None:
    """An events page's drops are found by their messages, an account's links page walks the links index
    in page order from where it starts, explain reads suspects by key. Before: every drop of the profile
    (0.4 s per page for a bot at 100,000 messages), every link of the account sorted (0.16 s with 100,000
    users), every suspect of the space (0.16 s with 50,000)."""
    from helpers import open_space
    from idstitch.core.identifiers import Identifier
    from idstitch.storage.sqlite import SQLiteStore

    with open_space(tmp_path) as space:
        for number in range(5):
            space.send("group", userId=f"u{number}", groupId="acme", anonymousId="null")
        store = space.store
        assert isinstance(store, SQLiteStore)
        acme, user = space.profile_of("group_id:acme"), space.profile_of("user_id:u1")
        assert acme is not None and user is not None
        reader = store._reader()
        statements: list[str] = []
        reader.set_trace_callback(statements.append)
        try:
            assert len(store.dropped_in(space.name, ["m1", "m2"])) == 2
            first = store.links(space.name, acme, limit=2)
            assert len(first) == 2
            (_, last) = store.link_records(space.name, acme, limit=2)
            assert len(store.link_records(space.name, acme, after=(last.at, last.segment_id), limit=2)) == 2
            assert store.links(space.name, user, limit=2) == [acme]
            assert store.suspects_among(space.name, [Identifier("anonymous_id", "a1", "users")]) == []
        finally:
            reader.set_trace_callback(None)
        plans = {
            sql: [row[3] for row in reader.execute("EXPLAIN QUERY PLAN " + sql)]
            for sql in dict.fromkeys(statements)
            if sql.lstrip().upper().startswith("SELECT")
        }
        graph = re.compile(r"^(SCAN|SEARCH) (links|dropped|suspects|profiles)\b")
        walks = {
            sql: plan
            for sql, plan in plans.items()
            if any(
                (graph.match(step) and (step.endswith("(space=?)") or step.startswith("SCAN")))
                or step.startswith("SEARCH dropped USING INDEX dropped_by_profile")
                or ("AND account_id = " in sql and "TEMP B-TREE" in step)  # a user has few links
                for step in plan
            )
        }
        assert walks == {}
        assert any("dropped_by_message" in step for plan in plans.values() for step in plan)


def test_sqlite_a_page_of_suspects_reads_that_page(tmp_path: Path) -> None:
    """Counted in SQLite VM steps: a page of the admin list of suspects (the first, and one from a cursor)
    costs as much in a space of 300 suspects as in one of 5, and walks the suspects_by_time index.
    Before: every page read every suspect of the space (0.3 s per page at 50,000)."""
    from helpers import counted_steps, open_space
    from idstitch.core.identifiers import Identifier
    from idstitch.storage.sqlite import SQLiteStore

    with open_space(tmp_path) as space:
        store = space.store
        assert isinstance(store, SQLiteStore)
        reader = store._reader()

        def grow(first: int, count: int) -> None:
            space.ingest(
                space.message("identify", userId=f"u{number}_{side}", anonymousId=f"a{number}")
                for number in range(first, first + count)
                for side in (0, 1)
            )

        def steps() -> tuple[int, int]:
            counted = []
            for read in (
                lambda: store.suspects(space.name, limit=3),
                lambda: store.suspects_from(space.name, Identifier("anonymous_id", "a2", "users"), limit=3),
            ):
                with counted_steps(reader) as count:
                    assert len(read() or []) == 3
                counted.append(count[0])
            return counted[0], counted[1]

        grow(0, 5)
        small = steps()
        grow(5, 300)
        big = steps()
        assert big[0] < 2 * small[0] and big[1] < 2 * small[1], (small, big)
        statements: list[str] = []
        reader.set_trace_callback(statements.append)
        try:
            store.suspects_from(space.name, Identifier("anonymous_id", "a2", "users"), limit=3)
        finally:
            reader.set_trace_callback(None)
        plan = [row[3] for sql in statements for row in reader.execute("EXPLAIN QUERY PLAN " + sql)]
        assert any("suspects_by_time" in step for step in plan), plan
        assert not any("TEMP B-TREE" in step or step.startswith("SCAN") for step in plan), plan
