"""`idstitch bench profile-api`: the seeded store is what the engine would write, and a small run end to end.

No timing is asserted (the speed target lives in the benchmark's output): only that the figures exist
and are consistent, that every lookup got the right 200, and that the server exited 0.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from idstitch.bench import seed
from idstitch.bench.seed import SOURCE, SPACE, WRITE_KEY, SeededPeople, seed_store
from idstitch.config import Config
from idstitch.core.messages import parse_message
from idstitch.engine import Engine
from idstitch.storage.sqlite import SQLiteStore

# Every table the engine writes, without the columns a store numbers itself.
TABLES = {
    "profiles": "*",
    "identifiers": "*",
    "evidence": "*",
    "suspects": "*",
    "traits": "*",
    "links": "*",
    "merges": "space, parent_id, child_id, message_id, via, at",
    "dropped": "space, profile_id, message_id, identifier, rule, at",
    "events": "space, message_id, type, name, timestamp, received_at, source, profile_id, account_id, "
    "identifiers, payload",
    "sources": "*",
    "learned_types": "*",
}


def _rows(path: Path) -> dict[str, list[tuple[Any, ...]]]:
    connection = sqlite3.connect(path)
    try:
        return {
            table: sorted(connection.execute(f"SELECT {columns} FROM {table}").fetchall(), key=repr)
            for table, columns in TABLES.items()
        }
    finally:
        connection.close()


def test_seeded_rows_are_the_rows_the_engine_writes_for_the_same_messages(tmp_path: Path) -> None:
    people, chunk = 300, 97  # several chunks, the last one short
    seeded = tmp_path / "seeded.db"
    result = seed_store(seeded, people, seed=5, chunk=chunk)
    assert result.profiles == people

    config = Config.from_mapping({"spaces": {SPACE: {"sources": {SOURCE: {"write_key": WRITE_KEY}}}}})
    ingested = tmp_path / "engine.db"
    store = SQLiteStore(ingested)
    try:
        engine = Engine(store, config)
        population = SeededPeople(5)
        received = datetime.now(UTC)  # unused: every message carries its own receivedAt
        messages = 0
        for start in range(0, people, chunk):
            batch = [
                parse_message(item.raw, received_at=received)
                for item in population.chunk(start, min(people, start + chunk))
            ]
            outcome = engine.ingest(batch, space=SPACE, source=SOURCE)
            assert [item.status for item in outcome.outcomes] == ["resolved"] * len(batch)
            assert sum(item.created for item in outcome.outcomes) == len(
                range(start, min(people, start + chunk))
            )
            messages += len(batch)
    finally:
        store.close()
    assert result.messages == messages

    expected, actual = _rows(ingested), _rows(seeded)
    for table in TABLES:
        assert actual[table] == expected[table], table
    assert len(actual["profiles"]) == people
    assert len(actual["traits"]) == 7 * people


def test_seeded_people_have_distinct_ids() -> None:
    population = SeededPeople(1)
    people = range(5_000)
    assert len({population.user_id(index) for index in people}) == len(people)
    assert len({population.email(index) for index in people}) == len(people)
    devices = [(index, device) for index in people for device in range(3)]
    assert len({population.anonymous_id(*pair) for pair in devices}) == len(devices)
    counts = [len({item.device for item in population.messages(index)}) for index in people]
    assert set(counts) == {1, 2, 3}


def test_an_interrupted_seeding_leaves_no_partial_store_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDSTITCH_BENCH_CACHE", str(tmp_path))

    def interrupted(done: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C after the first chunk: a half-seeded file on disk

    with pytest.raises(KeyboardInterrupt):
        seed.ensure_seeded_store(30, 1, chunk=10, progress=interrupted)
    assert list(tmp_path.iterdir()) == []


KEYS = {
    "profiles",
    "lookups",
    "lookups_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "errors",
    "lookup_errors",
    "ingest_messages_per_s",
    "ingest_target_messages_per_s",
    "baseline_lookups_per_s",
    "baseline_p50_ms",
    "baseline_p95_ms",
    "baseline_p99_ms",
    "ratio_to_baseline",
    "ingest_max_messages_per_s",
    "peak_rss_mb",
    "parse_only_ratio",
    "ingest_parse_only_ratio",
    "meets_target",
    "server_exit_code",
    "phases",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small run (a cache dir of its own: the seeded store and workload stay out of /tmp's shared one)."""
    cache = tmp_path_factory.mktemp("bench-cache")
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    env["IDSTITCH_BENCH_CACHE"] = str(cache)
    command = [sys.executable, "-m", "idstitch", "bench", "profile-api", "--profiles", "2000"]
    command += ["--seconds", "2", "--ingest-seconds", "2", "--ingest-messages", "2000", "-c", "4", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cache, timeout=60)
    assert done.returncode == 0, f"bench profile-api exited with {done.returncode}:\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"expected exactly one JSON line on stdout, got:\n{done.stdout}"
    parsed: dict[str, Any] = json.loads(lines[0])
    return parsed


def test_prints_one_json_object_with_the_figures(result: dict[str, Any]) -> None:
    assert result.keys() >= KEYS
    assert result["benchmark"] == "profile-api"
    assert result["profiles"] == 2000
    assert result["parse_only_ratio"] is None  # lookups parse no messages
    assert isinstance(result["meets_target"], bool)
    for key in ("lookups_per_s", "baseline_lookups_per_s", "ingest_max_messages_per_s", "peak_rss_mb"):
        assert result[key] > 0, key
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert 0 < result["baseline_p50_ms"] <= result["baseline_p95_ms"] <= result["baseline_p99_ms"]
    assert result["ingest_target_messages_per_s"] == pytest.approx(
        result["ingest_max_messages_per_s"] / 2, rel=0.01
    )
    assert result["ingest_messages_per_s"] is None or result["ingest_messages_per_s"] > 0


def test_every_lookup_got_the_right_profile(result: dict[str, Any]) -> None:
    phases = result["phases"]
    assert result["errors"] == 0
    assert result["lookup_errors"] == {}
    for name in ("baseline", "lookups"):
        phase = phases[name]
        assert phase["errors"] == {} and phase["error_count"] == 0, name
        assert phase["requests"] == phase["by_user_id"] + phase["by_email"] > 0, name
        assert phase["checked"] > 0, name
    assert result["lookups"] == phases["lookups"]["requests"]


def test_ingest_ran_in_both_ingest_phases_and_the_server_exited_0(result: dict[str, Any]) -> None:
    phases = result["phases"]
    assert phases["ingest"]["messages"] > 0
    assert phases["ingest_during_lookups"]["messages"] > 0
    assert result["ingest_errors"] == 0
    assert result["server_exit_code"] == 0
