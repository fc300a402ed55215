"""The store contract suite (tests/store_contract.py) run against every adapter of this build."""

from __future__ import annotations

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
