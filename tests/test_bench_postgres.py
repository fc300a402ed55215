"""`idstitch bench postgres` end to end, small: direct and through JetStream, printed and as JSON, and Ctrl-C.

No speed is asserted (the target lives in the benchmark's output): only that the figures exist and are
positive, that every message of the generated stream landed exactly once, and that each run's schema,
stream, connections and worker processes are gone afterwards, even when the run is interrupted.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import nats.js.errors
import psutil
import psycopg
import psycopg.errors
import pytest

from idstitch.sim.population import WorkloadConfig, generate

NATS_URL = os.environ.get("IDSTITCH_TEST_NATS", "nats://127.0.0.1:4222")
MESSAGES = 300

POSITIVE = (
    "seconds",
    "messages_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "peak_rss_mb",
    "ingest_calls",
    "commits",
    "box_cpu_percent",
    "postgres_cpu_percent",
    "postgres_backends_cpu_percent",
    "workers_cpu_percent",
    "cpu_ms_per_message",
    "cpu_bound_messages_per_s",
    "stored_events",
    "parse_only_messages_per_s",  # every bench prints these (README, Benchmarks)
    "parse_only_ratio",
)


def _environment(cache: Path) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    env["IDSTITCH_BENCH_CACHE"] = str(cache)  # the workload is generated here, not in /tmp's shared cache
    return env


def _command(database: str, *arguments: str) -> list[str]:
    return [sys.executable, "-m", "idstitch", "bench", "postgres", "--postgres", database, *arguments]


def _bench_json(database: str, cache: Path, *arguments: str) -> list[dict[str, Any]]:
    command = _command(database, "-n", str(MESSAGES), "--workers", "1,2", *arguments, "--json")
    done = subprocess.run(
        command, capture_output=True, text=True, env=_environment(cache), cwd=cache, timeout=120
    )
    assert done.returncode == 0, f"bench postgres exited with {done.returncode}:\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"expected exactly one JSON line on stdout, got:\n{done.stdout}"
    parsed: list[dict[str, Any]] = json.loads(lines[0])
    return parsed


def _distinct_ids(messages: int) -> int:
    """The generated stream's distinct messageIds, counted apart from the benchmark (it holds retries)."""
    return len({generated.message["messageId"] for generated in generate(WorkloadConfig(messages=messages))})


def _schemas(database: str) -> list[str]:
    with psycopg.connect(database, autocommit=True) as db:
        rows = db.execute("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'idstitch_bench_%'").fetchall()
    return [str(row[0]) for row in rows]


def _connections(database: str, schema: str) -> int:
    with psycopg.connect(database, autocommit=True) as db:
        row = db.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s", (f"{schema}%",)
        ).fetchone()
    assert row is not None
    return int(row[0])


async def _stream_exists(stream: str) -> bool:
    client = await nats.connect(NATS_URL, allow_reconnect=False, connect_timeout=3)
    try:
        await client.jetstream().stream_info(stream)
    except nats.js.errors.NotFoundError:
        return False
    finally:
        await client.close()
    return True


@pytest.fixture(scope="module")
def direct(postgres_database: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One small direct run with 1 and 2 workers."""
    return _bench_json(postgres_database, tmp_path_factory.mktemp("bench-postgres"))


@pytest.fixture(scope="module")
def queued(postgres_database: str, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The same through the real NATS JetStream server."""
    return _bench_json(
        postgres_database, tmp_path_factory.mktemp("bench-postgres-queue"), "--queue", NATS_URL
    )


def _check_runs(runs: list[dict[str, Any]], mode: str) -> None:
    assert [run["workers"] for run in runs] == [1, 2]
    distinct = _distinct_ids(MESSAGES)
    assert distinct < MESSAGES  # the stream does hold retries, so "landed once" is a real check
    for run in runs:
        assert run["benchmark"] == "postgres"
        assert run["mode"] == mode
        assert run["messages"] == MESSAGES
        for key in POSITIVE:
            assert run[key] > 0, key
        assert run["p50_ms"] <= run["p95_ms"] <= run["p99_ms"]
        assert run["postgres_cpu_percent"] >= run["postgres_backends_cpu_percent"] - 0.2
        assert run["commits"] >= run["ingest_calls"]
        # Every message landed exactly once: the store holds each distinct messageId of the stream once,
        # and the rest were reported as duplicates.
        assert run["verified"] is True, run["problems"]
        assert run["problems"] == []
        assert run["stored_events"] == run["expected_events"] == distinct
        outcomes = run["outcomes"]
        assert outcomes.get("resolved", 0) + outcomes.get("unresolved", 0) == distinct
        assert outcomes.get("duplicate", 0) == MESSAGES - distinct
        assert outcomes.get("rejected", 0) == 0
        assert run["parse_only_ratio"] == pytest.approx(
            run["messages_per_s"] / run["parse_only_messages_per_s"], rel=0.01, abs=1e-4
        )
        assert run["meets_target"] == (run["messages_per_s"] >= run["target_messages_per_s"] == 20_000)
        assert sum(count for _, count in run["latency_histogram_ms"]) == MESSAGES
        assert len(run["rate_by_quarter"]) == 4
        assert all(rate > 0 for rate in run["rate_by_quarter"])
    assert runs[0]["speedup"] == 1.0
    assert runs[1]["speedup"] == pytest.approx(
        runs[1]["messages_per_s"] / runs[0]["messages_per_s"], rel=0.01
    )


def test_direct_runs_land_every_message_once(direct: list[dict[str, Any]]) -> None:
    _check_runs(direct, "direct")
    for run in direct:
        assert run["nats_cpu_percent"] is None
        assert "stream" not in run


def test_queue_runs_land_every_message_once(queued: list[dict[str, Any]]) -> None:
    _check_runs(queued, "queue")
    for run in queued:
        assert run["nats_cpu_percent"] is not None and run["nats_cpu_percent"] >= 0
        assert run["fetch"] == 1
        assert run["queue_messages"] == MESSAGES // 100  # one JetStream message per request of 100
        assert run["publish_seconds"] > 0
        assert run["queue_retried"] == 0


def test_every_run_leaves_nothing_behind(
    postgres_database: str, direct: list[dict[str, Any]], queued: list[dict[str, Any]]
) -> None:
    names = [run["schema"] for run in direct + queued]
    assert len(set(names)) == 4  # a fresh schema per worker count
    assert _schemas(postgres_database) == []
    for name in names:
        assert _connections(postgres_database, name) == 0
    streams = [run["stream"] for run in queued]
    assert len(set(streams)) == 2
    for stream in streams:
        assert not asyncio.run(_stream_exists(stream))


def test_prints_a_table_with_the_target_marked(postgres_database: str, tmp_path: Path) -> None:
    command = _command(postgres_database, "-n", "100", "--workers", "1")
    done = subprocess.run(
        command, capture_output=True, text=True, env=_environment(tmp_path), cwd=tmp_path, timeout=120
    )
    assert done.returncode == 0, done.stderr
    for text in ("messages/s", "latency P50 / P95 / P99", "every message landed once", "box CPU busy"):
        assert text in done.stdout
    # 100 messages cannot reach 20,000 msg/s here: the verdict must say so.
    assert "target ≥ 20,000 msg/s at the best worker count: not met" in done.stdout


@contextlib.contextmanager
def _in_a_session_of_its_own(command: list[str], tmp_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """The benchmark in a session of its own: a signal to its process group reaches every process, as a
    terminal's Ctrl-C does. Killed with the whole group if the test leaves it running."""
    bench = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_environment(tmp_path),
        cwd=tmp_path,
        start_new_session=True,
    )
    try:
        yield bench
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()


def test_ctrl_c_drops_the_schema_and_stops_the_workers(postgres_database: str, tmp_path: Path) -> None:
    command = _command(postgres_database, "-n", "5000", "--workers", "2", "--json")
    with _in_a_session_of_its_own(command, tmp_path) as bench:
        stored = 0
        deadline = time.monotonic() + 60
        while stored == 0 and time.monotonic() < deadline and bench.poll() is None:
            time.sleep(0.2)
            for schema in _schemas(postgres_database):
                with psycopg.connect(postgres_database, autocommit=True) as db:
                    try:
                        row = db.execute(f'SELECT count(*) FROM "{schema}".events').fetchone()
                    except psycopg.errors.UndefinedTable:
                        continue  # not migrated yet
                    stored = int(row[0]) if row is not None else 0
        assert stored > 0, "the workers never stored anything"
        workers = psutil.Process(bench.pid).children(recursive=True)
        assert len(workers) >= 2
        os.killpg(bench.pid, signal.SIGINT)
        _, stderr = bench.communicate(timeout=60)
    assert bench.returncode != 0, "an interrupted benchmark must not report success"
    assert _schemas(postgres_database) == [], stderr.decode(errors="replace")
    # multiprocessing's resource tracker ends when it sees its parent's pipe close: allow it a moment.
    _, alive = psutil.wait_procs(workers, timeout=5)
    assert alive == [], f"{[process.pid for process in alive]} outlived the interrupted benchmark"


def test_ctrl_c_while_the_workers_start_prints_no_traceback(postgres_database: str, tmp_path: Path) -> None:
    """Ctrl-C reaches the workers too: while they import (before they ignore it) it must not kill each one
    with a KeyboardInterrupt traceback on the user's terminal."""
    command = _command(postgres_database, "-n", "300", "--workers", "2", "--json")
    children: list[psutil.Process] = []
    with _in_a_session_of_its_own(command, tmp_path) as bench:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and bench.poll() is None:
            children = psutil.Process(bench.pid).children()
            if any("spawn_main" in " ".join(child.cmdline()) for child in children):
                break  # a worker exists and is still importing: that takes about half a second here
            time.sleep(0.01)
        time.sleep(0.1)  # past the interpreter's start, into the imports
        os.killpg(bench.pid, signal.SIGINT)
        _, stderr = bench.communicate(timeout=60)
    assert bench.returncode != 0, "an interrupted benchmark must not report success"
    assert b"Traceback" not in stderr, stderr.decode(errors="replace")
    assert _schemas(postgres_database) == []
    _, alive = psutil.wait_procs(children, timeout=5)
    assert alive == [], f"{[process.pid for process in alive]} outlived the interrupted benchmark"


def _closed_port() -> int:
    """A local port nobody listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_queue_is_a_clear_error_not_a_hang(postgres_database: str, tmp_path: Path) -> None:
    """nats-py retries a refused connection for minutes by default: the benchmark must give up at once."""
    queue = f"nats://127.0.0.1:{_closed_port()}"
    command = _command(postgres_database, "-n", "100", "--workers", "1", "--queue", queue, "--json")
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, env=_environment(tmp_path), cwd=tmp_path, timeout=60
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"bench postgres --queue {queue} still waiting for NATS after 60 s")
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert "--queue: no NATS JetStream at" in done.stderr and queue.removeprefix("nats://") in done.stderr


def test_fetch_without_queue_is_refused(tmp_path: Path) -> None:
    """--fetch only means something with --queue: a direct run must not silently ignore it."""
    command = _command("postgresql://root@127.0.0.1:1/test", "-n", "100", "--fetch", "10")
    done = subprocess.run(
        command, capture_output=True, text=True, env=_environment(tmp_path), cwd=tmp_path, timeout=60
    )
    assert done.returncode == 2, done.stderr
    assert "--fetch" in done.stderr and "--queue" in done.stderr
