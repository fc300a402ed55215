"""The SQLite store's graph cache stays out of the garbage collector's scans (they stop every thread)."""

from __future__ import annotations

import gc
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from idstitch.config import Config
from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import Message, decode_message
from idstitch.engine import Engine
from idstitch.sim.population import WorkloadConfig, generate
from idstitch.storage.graph_cache import IdentifierEntry, ProfileEntry
from idstitch.storage.sqlite import SQLiteStore


def test_a_full_collection_leaves_the_cached_graph_untracked(tmp_path: Path) -> None:
    """After ingest and one full collection, no cached row, member set or cache table is scanned again."""
    store = SQLiteStore(f"sqlite:///{tmp_path / 'gc.db'}")
    try:
        engine = Engine(store, Config.default())
        received_at = datetime.now(UTC)
        items: list[Message | InvalidEvent] = []
        for generated in generate(WorkloadConfig(messages=3000)):
            try:
                items.append(decode_message(msgspec.json.encode(generated.message), received_at=received_at))
            except InvalidEvent as error:
                items.append(error)
        for start in range(0, len(items), 100):
            engine.ingest(items[start : start + 100], space="default")
        cache = store._cache
        merged = [entry for entry in cache.profiles.values() if entry.children]
        assert len(cache.identifiers) > 1000 and merged  # a real graph, with merges, is cached
        gc.collect()
        assert not gc.is_tracked(cache.identifiers)
        assert not gc.is_tracked(cache.profiles)
        for entry in cache.profiles.values():
            assert not gc.is_tracked(entry)
            assert not gc.is_tracked(entry.members)
            assert not gc.is_tracked(entry.children)
        assert not any(gc.is_tracked(entry) for entry in cache.identifiers.values())
        assert not any(isinstance(item, IdentifierEntry | ProfileEntry) for item in gc.get_objects())
    finally:
        store.close()
