"""Crash safety of `idstitch ingest`: kill -9 mid-run, run again, and get exactly the uninterrupted graph.

Only whole committed batches survive a kill, and a re-run skips what is stored (duplicates by
messageId), so the resumed store must equal, dump for dump, a store built in one uninterrupted run.
"""

from __future__ import annotations

import json
import os
import resource
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import RECEIVED, FailsAtCommit, clean_env, committed_events, kill_when, wait_for
from idstitch.config import Config
from idstitch.core.messages import Message, parse_message
from idstitch.engine import Engine
from idstitch.storage.base import StoreFull
from idstitch.storage.urls import open_store

MESSAGES = int(os.environ.get("IDSTITCH_CRASH_MESSAGES", "30000"))
BATCH_SIZE = "100"


def write_workload(path: Path, messages: int, seed: int) -> None:
    """The simulator's realistic stream when it is available, else a small deterministic one."""
    try:
        from idstitch.sim.population import WorkloadConfig, write_ndjson
    except ImportError:
        _write_simple_workload(path, messages, seed)
        return
    assert write_ndjson(path, WorkloadConfig(messages=messages, seed=seed)) == messages


def _write_simple_workload(path: Path, messages: int, seed: int) -> None:
    # anonymous browsing, logins joining devices, a shared device, junk ids and retries
    with path.open("w") as out:
        for n in range(messages):
            person = (n * 7919 + seed) % max(messages // 8, 1)
            device = f"anon_{person}_{n % 3}"
            stamp = f"2026-01-{1 + n * 28 // messages:02d}T{n % 24:02d}:00:00.000Z"
            message: dict[str, object] = {
                "type": "page",
                "anonymousId": device,
                "messageId": f"s{seed}-{n}",
                "timestamp": stamp,
            }
            if n % 5 == 0:
                message = {
                    "type": "identify",
                    "userId": f"u{person}",
                    "anonymousId": device,
                    "messageId": f"s{seed}-{n}",
                    "timestamp": stamp,
                    "traits": {"email": f"p{person}@x.io"},
                }
            if n % 97 == 0:
                message["anonymousId"] = "shared_kiosk" if n % 2 else "null"
            if n % 101 == 0 and n > 0:
                message["messageId"] = f"s{seed}-{n - 1}"  # a retry
            out.write(json.dumps(message) + "\n")


def message_ids(path: Path) -> list[str]:
    """Unique message ids in file order."""
    seen: dict[str, None] = {}
    with path.open("rb") as lines:
        for line in lines:
            if line.strip():
                seen.setdefault(json.loads(line)["messageId"], None)
    return list(seen)


def ingest_command(path: Path, url: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "idstitch",
        "ingest",
        str(path),
        "--store",
        url,
        "--batch-size",
        BATCH_SIZE,
        "--quiet",
        "--json",
    ]


def dump_and_ids(url: str) -> tuple[dict[str, object], set[str]]:
    store = open_store(url)
    try:
        return store.dump("default"), set(store.iter_event_ids("default"))
    finally:
        store.close()


def assert_committed_prefix(database: Path, ids: list[str]) -> int:
    """The stored messages are exactly the first k messages of the file: only whole batches landed."""
    connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True)
    try:
        stored = {row[0] for row in connection.execute("SELECT message_id FROM events")}
    finally:
        connection.close()
    assert stored == set(ids[: len(stored)])
    return len(stored)


def start_ingest(workload: Path, database: Path) -> subprocess.Popen[bytes]:
    """`idstitch ingest` of the workload into the database, running in the background."""
    return subprocess.Popen(
        ingest_command(workload, f"sqlite:///{database}"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
    )


def kill_9_once(workload: Path, database: Path, at_least: int) -> None:
    """Run `idstitch ingest` and SIGKILL it as soon as `at_least` events are committed."""
    victim = start_ingest(workload, database)
    kill_when(lambda: committed_events(database) >= at_least, f"{at_least:,} committed events", victim)


def prefix_file(workload: Path, stored: set[str], path: Path) -> Path:
    """The lines of the workload up to the first one whose message was not stored."""
    with workload.open("rb") as lines, path.open("wb") as out:
        for line in lines:
            if line.strip() and json.loads(line)["messageId"] not in stored:
                break
            out.write(line)
    return path


def assert_graph_of_prefix(workload: Path, database: Path, tmp_path: Path, name: str) -> None:
    """What survived a kill is exactly the graph an uninterrupted run of the committed messages builds:
    every batch's resolution (profiles, identifiers, merges, traits, links, drops) landed whole or not at
    all, never only its events or only part of its graph."""
    url = f"sqlite:///{database}"
    killed_dump, killed_ids = dump_and_ids(url)
    prefix = prefix_file(workload, killed_ids, tmp_path / f"{name}.ndjson")
    reference = tmp_path / f"{name}-reference.db"
    done = subprocess.run(
        ingest_command(prefix, f"sqlite:///{reference}"), capture_output=True, env=clean_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr
    reference_dump, reference_ids = dump_and_ids(f"sqlite:///{reference}")
    assert reference_ids == killed_ids
    assert killed_dump == reference_dump


@pytest.mark.slow
def test_kill_9_mid_ingest_then_resume_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    workload = tmp_path / "workload.ndjson"
    write_workload(workload, MESSAGES, seed=20260301)
    ids = message_ids(workload)
    crashed_db, reference_db = tmp_path / "crashed.db", tmp_path / "reference.db"
    crashed_url, reference_url = f"sqlite:///{crashed_db}", f"sqlite:///{reference_db}"

    # The uninterrupted reference runs alongside (two cores): the test takes one ingest's time, not two.
    reference = start_ingest(workload, reference_db)
    # Killed twice: once in a first run, once in the run that resumes it, then resumed to the end.
    kill_9_once(workload, crashed_db, 1000)
    committed = assert_committed_prefix(crashed_db, ids)
    assert 1000 <= committed < len(ids), "the kill must land mid-run"
    assert_graph_of_prefix(workload, crashed_db, tmp_path, "first-kill")

    kill_9_once(workload, crashed_db, committed + len(ids) // 4)
    second = assert_committed_prefix(crashed_db, ids)
    assert committed < second < len(ids), "the second kill must land mid-run too"
    assert_graph_of_prefix(workload, crashed_db, tmp_path, "second-kill")

    resumed = subprocess.run(
        ingest_command(workload, crashed_url), capture_output=True, env=clean_env(), timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["duplicates"] >= second
    assert summary["accepted"] <= len(ids) - second
    assert summary["rejected"] == 0

    out, err = reference.communicate(timeout=300)
    assert reference.returncode == 0, err
    reference_summary = json.loads(out)
    assert reference_summary["messages"] == MESSAGES

    crashed_dump, crashed_ids = dump_and_ids(crashed_url)
    reference_dump, reference_ids = dump_and_ids(reference_url)
    assert crashed_ids == reference_ids == set(ids)
    assert crashed_dump == reference_dump


@pytest.mark.slow
def test_sigterm_stops_cleanly_between_batches(tmp_path: Path) -> None:
    workload = tmp_path / "workload.ndjson"
    write_workload(workload, 8000, seed=7)
    ids = message_ids(workload)
    database = tmp_path / "t.db"
    process = start_ingest(workload, database)
    try:
        wait_for(lambda: committed_events(database) >= 300, "300 committed events", process)
        process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 143
    assert b"interrupted" in err and b"run the same command again to resume" in err
    assert b"Traceback" not in err
    committed = assert_committed_prefix(database, ids)
    assert committed < len(ids)


@pytest.mark.parametrize("where", ["statement", "commit"])
def test_a_full_disk_mid_batch_leaves_the_graph_as_if_the_batch_never_came(
    tmp_path: Path, where: str
) -> None:
    """A batch that fails for a full disk is rolled back by SQLite itself (SQLITE_FULL ends the
    transaction, in a statement or in the COMMIT); the writer, still running (`serve`), must forget what
    it cached of that batch. Before: the cache kept the batch's profiles (and a full disk in a statement
    surfaced as `cannot rollback - no transaction is active`), so that once space was freed later
    messages joined profiles that were never stored: events and traits naming profiles the store lacks."""
    workload = tmp_path / "workload.ndjson"
    write_workload(workload, 600, seed=11)
    with workload.open() as lines:
        parsed = [json.loads(line) for line in lines]
    batches = [parsed[start : start + 200] for start in range(0, 600, 200)]

    def resolve(engine: Engine, batch: list[dict[str, object]]) -> None:
        items = [parse_message(body, received_at=RECEIVED) for body in batch]
        engine.ingest([item for item in items if isinstance(item, Message)], space="default")

    full = open_store(f"sqlite:///{tmp_path / 'full.db'}")
    reference = open_store(f"sqlite:///{tmp_path / 'reference.db'}")
    try:
        engine = Engine(full, Config.default())
        resolve(engine, batches[0])
        writer = full._writer  # type: ignore[attr-defined]
        if where == "statement":
            (pages,) = writer.execute("PRAGMA page_count").fetchone()
            writer.execute(f"PRAGMA max_page_count = {pages}")  # the file may not grow
        else:
            full._writer = FailsAtCommit(writer)  # type: ignore[attr-defined]
        with pytest.raises(StoreFull, match="the disk is full"):
            resolve(engine, batches[1])
        # Space is freed.
        writer.execute("PRAGMA max_page_count = 1073741823")
        full._writer = writer  # type: ignore[attr-defined]
        resolve(engine, batches[1])
        resolve(engine, batches[2])

        plain = Engine(reference, Config.default())
        for batch in batches:
            resolve(plain, batch)
        assert full.dump("default") == reference.dump("default")
    finally:
        full.close()
        reference.close()


def test_ingest_onto_a_full_disk_exits_1_keeping_its_batches_and_resumes_once_space_is_freed(
    tmp_path: Path,
) -> None:
    """The store's file may grow no further (a file size limit here; a full disk alike): one line naming
    the store and what was kept, exit 1, no traceback. Before: `error: store: disk I/O error` (or
    `database or disk is full`) with exit 2, which README keeps for usage errors with nothing written."""
    workload = tmp_path / "workload.ndjson"
    write_workload(workload, 3000, seed=5)
    ids = message_ids(workload)
    database, reference = tmp_path / "full.db", tmp_path / "reference.db"

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 * 1024 * 1024, resource.RLIM_INFINITY))

    full = subprocess.run(
        ingest_command(workload, f"sqlite:///{database}"),
        capture_output=True,
        env=clean_env(),
        timeout=300,
        preexec_fn=small_files,
    )
    assert full.returncode == 1, full.stderr
    (line,) = [line for line in full.stderr.decode().splitlines() if not line.startswith("created ")]
    assert line.startswith(f"error: store sqlite:///{database}: ")
    assert "committed and kept: free space (or mend the disk) and run the same command again" in line
    committed = assert_committed_prefix(database, ids)
    assert 0 < committed < len(ids), "the disk must fill mid-run"
    with sqlite3.connect(database) as connection:
        assert connection.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    resumed = subprocess.run(
        ingest_command(workload, f"sqlite:///{database}"), capture_output=True, env=clean_env(), timeout=300
    )
    assert resumed.returncode == 0, resumed.stderr
    done = subprocess.run(
        ingest_command(workload, f"sqlite:///{reference}"), capture_output=True, env=clean_env(), timeout=300
    )
    assert done.returncode == 0, done.stderr
    resumed_dump, resumed_ids = dump_and_ids(f"sqlite:///{database}")
    reference_dump, reference_ids = dump_and_ids(f"sqlite:///{reference}")
    assert resumed_ids == reference_ids == set(ids)
    assert resumed_dump == reference_dump
