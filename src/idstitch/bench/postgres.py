"""`idstitch bench postgres`: ingest throughput and latency with N writer processes on one PostgreSQL store.

For each worker count the same generated stream goes into a fresh schema (created, then dropped even on
failure or Ctrl-C), split across N spawned worker processes:

- direct: the stream is cut into chunks of `--batch-size` messages in stream order, dealt round-robin
  (chunk k to worker k mod N), so workers meet the same people and identifiers as real writers would,
  and each worker hands its chunks to `Engine.ingest`;
- queue (`--queue nats://…`): the stream is published to a JetStream stream of its own (random name,
  deleted afterwards) with `publish_messages`, `--batch-size` messages per request, while the workers
  start; then N workers drain it with `run_worker(drain=True)`.

Workers start together on one signal. Throughput is all messages over the time from that signal to the
last commit. Latency is per message, from the moment its batch is handed to the engine to the moment the
commit returns. Over the same window the box's CPU is split between PostgreSQL (every `postgres`
process, and this run's own backends), the workers, NATS and the rest, which shows whether the box or the
code is the limit. Afterwards the stored message ids are compared with the stream's: every message must
have landed exactly once.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.process
import os
import queue as queue_module
import secrets
import signal
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import msgspec
import nats
import nats.errors
import nats.js.errors
import psutil
import psycopg
from nats.aio.client import Client as NatsClient
from psycopg import sql

from idstitch.bench.cpu import ProcessCpu, busiest, snapshot
from idstitch.bench.postgres_result import TARGET_MESSAGES_PER_S, PostgresRun
from idstitch.bench.postgres_worker import SPACE, WorkerPlan, WorkerReport, worker_main
from idstitch.bench.runner import (
    ensure_workload,
    latency_histogram,
    parse_only_rate,
    percentile,
    workload_lines,
)
from idstitch.bench.scratch import scratch_directory
from idstitch.config import Config
from idstitch.core.errors import ConfigError, InvalidEvent
from idstitch.core.messages import decode_message
from idstitch.engine import Engine
from idstitch.queue.jetstream import QueueConfig, QueueUnavailable, parse_queue_url
from idstitch.queue.publisher import publish_messages
from idstitch.storage.urls import open_store, redact_url, without_password

__all__ = [
    "DEFAULT_POSTGRES_URL",
    "TARGET_MESSAGES_PER_S",
    "PostgresBenchError",
    "PostgresBenchPlan",
    "PostgresRun",
    "run_postgres_bench",
]

DEFAULT_POSTGRES_URL = "postgresql://root@127.0.0.1:5432/test"
_READY_SECONDS = 120.0  # spawning, importing, opening the store
_STALL_SECONDS = 300.0  # no progress from any worker for this long: something is stuck
_JOIN_SECONDS = 30.0

OnEvent = Callable[[dict[str, Any]], None]


class PostgresBenchError(Exception):
    """The benchmark could not run (no server, a worker failed or hung)."""


@dataclass(frozen=True)
class PostgresBenchPlan:
    """One `bench postgres` invocation."""

    postgres_url: str = DEFAULT_POSTGRES_URL
    workers: tuple[int, ...] = (1, 2, 4)
    messages: int = 20_000  # ~30-60 s per worker count on the 2-core machine
    batch_size: int = 100
    seed: int = 1
    queue_url: str | None = None
    fetch: int = 1  # queue mode: requests per worker fetch (and commit group)

    @property
    def mode(self) -> str:
        """`direct` or `queue`."""
        return "queue" if self.queue_url else "direct"


# -- the stream -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Stream:
    """The generated workload and what must be stored once it is all ingested."""

    path: Path
    messages: int  # lines
    valid: int  # lines that parse into a message
    ids: frozenset[str]  # distinct message ids of the valid ones


def _read_stream(messages: int, seed: int) -> _Stream:
    path = ensure_workload(messages, seed)
    received_at = datetime.now(UTC)
    count = valid = 0
    ids: set[str] = set()
    for line in workload_lines(path):
        count += 1
        try:
            message = decode_message(line, received_at=received_at)
        except InvalidEvent:
            continue
        valid += 1
        ids.add(message.message_id)
    return _Stream(path, count, valid, frozenset(ids))


def _write_shares(stream: _Stream, workers: int, batch_size: int, folder: Path) -> list[Path]:
    """Chunk k of `batch_size` lines (in stream order) goes to worker k mod N: each gets a file of its own."""
    paths = [folder / f"share-{index}.ndjson" for index in range(workers)]
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(path.open("wb")) for path in paths]
        for number, line in enumerate(workload_lines(stream.path)):
            files[(number // batch_size) % workers].write(line)
    return paths


# -- PostgreSQL: a fresh schema per worker count ----------------------------------------------------


def _url_with(url: str, **parameters: str) -> str:
    """The libpq URL with these query parameters set (replacing any of the same name)."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgresql", "postgres"):
        raise PostgresBenchError(
            f"--postgres {redact_url(url)!r}: expected a postgresql://user@host:port/db URL"
        )
    query = [(key, value) for key, value in parse_qsl(parts.query) if key not in parameters]
    query += list(parameters.items())
    return urlunsplit(parts._replace(query=urlencode(query)))


@dataclass(frozen=True)
class _Schema:
    name: str
    worker_url: str  # tagged with an application_name of its own: its backends can be found
    main_url: str
    worker_tag: str


@contextlib.contextmanager
def _fresh_schema(admin: psycopg.Connection[Any], base_url: str) -> Iterator[_Schema]:
    """A new schema for one run; afterwards its remaining connections are ended and it is dropped."""
    name = f"idstitch_bench_{secrets.token_hex(5)}"
    options = f"-csearch_path={name}"
    schema = _Schema(
        name,
        _url_with(base_url, options=options, application_name=f"{name}_w"),
        _url_with(base_url, options=options, application_name=f"{name}_m"),
        f"{name}_w",
    )
    admin.execute(sql.SQL("CREATE SCHEMA {}").format(sql.Identifier(name)))
    try:
        yield schema
    finally:
        # Workers that were killed may leave a backend in a transaction holding locks on the tables.
        admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name IN (%s, %s)",
            (f"{name}_w", f"{name}_m"),
        )
        admin.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(name)))


def _settings(admin: psycopg.Connection[Any]) -> dict[str, str]:
    names = ("server_version", "synchronous_commit", "fsync", "shared_buffers", "max_connections")
    rows = admin.execute(
        "SELECT name, current_setting(name) FROM pg_settings WHERE name = ANY(%s)", (list(names),)
    ).fetchall()
    return {str(name): str(value) for name, value in rows}


def _is_background(process: ProcessCpu) -> bool:
    """A PostgreSQL process that serves no client: WAL writer, checkpointer, background writer, autovacuum."""
    # Their titles read "postgres: 15/main: walwriter"; a client's names its address, "…(port)" or "[local]".
    title = process.title
    return (
        process.name == "postgres"
        and title.startswith("postgres: ")
        and "(" not in title
        and "[local]" not in title
    )


def _backend_pids(admin: psycopg.Connection[Any], tag: str) -> set[int]:
    rows = admin.execute("SELECT pid FROM pg_stat_activity WHERE application_name = %s", (tag,)).fetchall()
    return {int(row[0]) for row in rows}


# -- NATS: a fresh stream per worker count ---------------------------------------------------------


@contextlib.contextmanager
def _fresh_stream(url: str) -> Iterator[QueueConfig]:
    """A queue config naming a new stream, subject prefix and consumer; the stream is deleted afterwards."""
    token = secrets.token_hex(5)
    config = replace(
        parse_queue_url(url),
        stream=f"IDSTITCH_BENCH_{token}",
        subject=f"idstitch-bench-{token}.ingest",
        consumer=f"idstitch-bench-{token}",
    )
    try:
        yield config
    finally:
        asyncio.run(_delete_stream(config))


async def _ignore(error: Exception) -> None:
    """nats-py prints a traceback per failed attempt by default; the caller reports the failure once."""


_NATS_CONNECT_SECONDS = 10.0  # the whole connection attempt, whatever nats-py's own retries


async def _nats_client(config: QueueConfig) -> NatsClient:
    """A connection for the benchmark's own checks and clean-up; fails within seconds when no server answers.

    `allow_reconnect=False` alone does not do it: nats-py (2.16) still tries a refused server again every
    `reconnect_time_wait` (2 s) up to `max_reconnect_attempts` (60) times before giving up, two minutes.
    """
    return await asyncio.wait_for(
        nats.connect(
            list(config.servers),
            allow_reconnect=False,
            max_reconnect_attempts=1,
            reconnect_time_wait=0.1,
            connect_timeout=5,
            error_cb=_ignore,
        ),
        _NATS_CONNECT_SECONDS,
    )


def _check_nats(url: str) -> None:
    """Fail early, with a clear message, when the queue URL is wrong or no NATS server answers there."""
    try:
        config = parse_queue_url(url)
    except ConfigError as error:
        raise PostgresBenchError(f"--queue: {error}") from None

    async def connect() -> None:
        client = await _nats_client(config)
        try:
            await client.jetstream().account_info()  # JetStream enabled, not just NATS
        finally:
            await client.close()

    try:
        asyncio.run(connect())
    except (nats.errors.Error, OSError, TimeoutError) as error:
        raise PostgresBenchError(
            f"--queue: no NATS JetStream at {config.shown_servers}: {type(error).__name__}: {error}"
        ) from None


async def _delete_stream(config: QueueConfig) -> None:
    client = await _nats_client(config)
    try:
        await client.jetstream().delete_stream(config.stream)
    except nats.js.errors.NotFoundError:
        pass  # the run failed before anything created it
    finally:
        await client.close()


# -- the worker processes --------------------------------------------------------------------------


class _Workers:
    """N spawned worker processes, their channel and the start / finish signals."""

    def __init__(self, plans: Sequence[WorkerPlan]) -> None:
        context = multiprocessing.get_context("spawn")
        self.channel: Queue[Any] = context.Queue()
        self.go = context.Event()
        self.finish = context.Event()
        self.processes: list[multiprocessing.process.BaseProcess] = [
            context.Process(
                target=worker_main,
                args=(plan, self.channel, self.go, self.finish, os.getpid()),
                name=f"idstitch-bench-worker-{plan.index}",
                daemon=True,
            )
            for plan in plans
        ]
        self._stopped = False
        # Ctrl-C reaches the whole process group. A worker ignores it from worker_main on, but dies of it
        # with a KeyboardInterrupt traceback while it still imports: started with SIGINT blocked, each
        # worker inherits the block; a Ctrl-C meanwhile waits here and is raised once they are started.
        blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
        try:
            try:
                for process in self.processes:
                    process.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)  # a waiting Ctrl-C is raised here
        except BaseException:
            self.abort()  # the caller never gets this pool to stop
            raise

    def wait_for(
        self, kind: str, seconds: float, on_progress: Callable[[int], None] | None = None
    ) -> dict[int, Any]:
        """Each worker's `kind` message; fails on a worker's error, its death, or `seconds` without news."""
        received: dict[int, Any] = {}
        progress: dict[int, int] = {}
        quiet_since = time.monotonic()
        while len(received) < len(self.processes):
            try:
                got, index, payload = self.channel.get(timeout=0.5)
            except queue_module.Empty:
                for index, process in enumerate(self.processes):
                    if index not in received and not process.is_alive():
                        raise PostgresBenchError(
                            f"worker {index} exited with code {process.exitcode} without reporting"
                        ) from None
                if time.monotonic() - quiet_since > seconds:
                    raise PostgresBenchError(f"no word from the workers for {seconds:.0f} s") from None
                continue
            quiet_since = time.monotonic()
            if got == "error":
                raise PostgresBenchError(f"worker {index} failed:\n{payload}")
            if got == "progress":
                progress[index] = int(payload)
                if on_progress is not None:
                    on_progress(sum(progress.values()))
            elif got == kind:
                received[index] = payload
        return received

    def stop(self, seconds: float = _JOIN_SECONDS) -> None:
        """Let the workers close and exit; any still running after `seconds` is terminated (then killed)."""
        if self._stopped:
            return
        self._stopped = True
        self.finish.set()
        deadline = time.monotonic() + seconds
        started = [process for process in self.processes if process.pid is not None]
        for process in started:
            process.join(max(0.0, deadline - time.monotonic()))
        for process in started:
            if process.is_alive():
                process.terminate()
                process.join(5)
            if process.is_alive():
                process.kill()
                process.join(5)
        self.channel.close()
        self.channel.cancel_join_thread()  # undelivered progress messages must not block our exit

    def abort(self) -> None:
        """Terminate the workers now (a failure or Ctrl-C): their transactions roll back."""
        self.stop(seconds=0.0)


# -- one worker count ------------------------------------------------------------------------------


def _bootstrap(url: str) -> None:
    """Migrate the schema and create the space once, before N workers open it at the same time."""
    store = open_store(url)
    try:
        Engine(store, Config.default())
    finally:
        store.close()


def _verify(
    admin: psycopg.Connection[Any],
    schema: _Schema,
    stream: _Stream,
    reports: Sequence[WorkerReport],
    rejected: set[str],
) -> tuple[int, int, list[str]]:
    """(stored, expected, problems): every valid message stored exactly once, nothing else stored."""
    store = open_store(schema.main_url, read_only=True)
    try:
        ids = list(store.iter_event_ids(SPACE))
        events = store.stats(SPACE).events
    finally:
        store.close()
    stored = set(ids)
    expected = stream.ids - rejected
    problems: list[str] = []
    # Counted again by naming the schema, apart from the store and its search_path: both must agree.
    row = admin.execute(
        sql.SQL("SELECT count(*) FROM {}.events WHERE space = %s").format(sql.Identifier(schema.name)),
        (SPACE,),
    ).fetchone()
    in_schema = int(row[0]) if row is not None else 0
    if in_schema != len(ids):
        problems.append(f"the store reads {len(ids):,} events, schema {schema.name} holds {in_schema:,}")
    if len(ids) != len(stored):
        problems.append(f"{len(ids) - len(stored):,} message ids are stored more than once")
    if events != len(ids):
        problems.append(f"stats counts {events:,} events, iter_event_ids gives {len(ids):,}")
    missing = expected - stored
    if missing:
        problems.append(f"{len(missing):,} messages never landed (e.g. {min(missing)})")
    unexpected = stored - stream.ids
    if unexpected:
        problems.append(f"{len(unexpected):,} stored ids are not in the stream (e.g. {min(unexpected)})")
    handled = sum(sum(report.outcomes.values()) for report in reports)
    if handled < stream.valid:
        problems.append(f"only {handled:,} of {stream.valid:,} messages got an outcome")
    landed = sum(
        report.outcomes.get(status, 0) for report in reports for status in ("resolved", "unresolved")
    )
    if landed != len(ids):
        problems.append(f"the workers report {landed:,} messages landed, the store holds {len(ids):,}")
    return len(ids), len(expected), problems


def _publish(config: QueueConfig, stream: _Stream, batch_size: int) -> tuple[float, int]:
    """Publish the stream, `batch_size` messages per request; (seconds, JetStream messages)."""
    started = time.monotonic()
    summary = publish_messages(
        config,
        SPACE,
        None,
        (msgspec.json.decode(line) for line in workload_lines(stream.path)),
        batch_size=batch_size,
    )
    if summary.messages != stream.valid:
        raise PostgresBenchError(f"published {summary.messages:,} messages, the stream has {stream.valid:,}")
    return time.monotonic() - started, summary.queue_messages


def _run_one(
    plan: PostgresBenchPlan,
    workers: int,
    stream: _Stream,
    admin: psycopg.Connection[Any],
    on_event: OnEvent,
) -> tuple[PostgresRun, set[str]]:
    label = f"{workers} worker{'s' if workers != 1 else ''}"
    with contextlib.ExitStack() as stack:
        schema = stack.enter_context(_fresh_schema(admin, plan.postgres_url))
        queue = stack.enter_context(_fresh_stream(plan.queue_url)) if plan.queue_url else None
        folder = stack.enter_context(scratch_directory("postgres"))
        _bootstrap(schema.main_url)
        if queue is None:
            shares = _write_shares(stream, workers, plan.batch_size, folder)
            plans = [
                WorkerPlan(index, schema.worker_url, plan.batch_size, share_path=str(path))
                for index, path in enumerate(shares)
            ]
        else:
            plans = [
                WorkerPlan(index, schema.worker_url, plan.batch_size, queue=queue, fetch=plan.fetch)
                for index in range(workers)
            ]
        pool = _Workers(plans)
        stack.callback(pool.abort)  # after a normal end pool.stop() has run: then a no-op
        publish_seconds, queue_messages = _publish(queue, stream, plan.batch_size) if queue else (None, None)
        pool.wait_for("ready", _READY_SECONDS)
        on_event({"event": "phase", "phase": label, "total": stream.valid})
        backends = _backend_pids(admin, schema.worker_tag)
        psutil.cpu_percent(None)  # the box's CPU is measured from here
        before = snapshot()
        started = time.monotonic()
        pool.go.set()
        reports: list[WorkerReport] = list(
            pool.wait_for(
                "report",
                _STALL_SECONDS,
                on_progress=lambda done: on_event({"event": "progress", "phase": label, "messages": done}),
            ).values()
        )
        box_percent = psutil.cpu_percent(None)
        backends |= _backend_pids(admin, schema.worker_tag)
        after = snapshot()
        worker_pids = {process.pid for process in pool.processes if process.pid is not None}
        pool.stop()
        rejected = {message_id for report in reports for message_id in report.rejected_ids}
        stored, expected, problems = _verify(admin, schema, stream, reports, rejected)
        settings = _settings(admin)
    finished = [report.last_commit for report in reports if report.last_commit is not None]
    seconds = (max(finished) - started) if finished else 0.0
    messages = sum(report.messages for report in reports)
    latencies = array(
        "d",
        sorted(value for report in reports for value, size, _ in report.call_latencies for _ in range(size)),
    )
    used = after.since(before)
    backend_cpu = sum(used[pid].cpu_s for pid in backends if pid in used)
    background_cpu = sum(process.cpu_s for process in used.values() if _is_background(process))
    outcomes: dict[str, int] = {}
    for report in reports:
        for status, count in report.outcomes.items():
            outcomes[status] = outcomes.get(status, 0) + count
    run = PostgresRun(
        mode=plan.mode,
        workers=workers,
        messages=messages,
        batch_size=plan.batch_size,
        seconds=seconds,
        messages_per_s=messages / seconds if seconds > 0 else 0.0,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p95_ms=percentile(latencies, 0.95) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        peak_rss_mb=max((report.peak_rss_mb for report in reports), default=0.0),
        ingest_calls=sum(report.calls for report in reports),
        commits=sum(report.commits for report in reports),
        conflicts=sum(report.conflicts for report in reports),
        lock_busy=sum(report.lock_busy for report in reports),
        outcomes=outcomes,
        stored_events=stored,
        expected_events=expected,
        problems=problems,
        cpus=psutil.cpu_count() or 1,
        window_s=after.at - before.at,
        box_cpu_percent=box_percent,
        postgres_cpu_s=after.named("postgres") - before.named("postgres"),
        postgres_backends_cpu_s=backend_cpu,
        postgres_background_cpu_s=background_cpu,
        workers_cpu_s=sum(report.cpu_s for report in reports),
        nats_cpu_s=after.named("nats-server") - before.named("nats-server") if queue is not None else None,
        other_processes=busiest(before, after, exclude=worker_pids, names={"postgres", "nats-server"}),
        schema=schema.name,
        postgres_settings=settings,
        fetch=plan.fetch if queue is not None else None,
        stream=queue.stream if queue is not None else None,
        publish_seconds=publish_seconds,
        queue_messages=queue_messages,
        queue_retried=(
            sum(int((report.queue or {}).get("retried", 0)) for report in reports) if queue else None
        ),
        latency_histogram=latency_histogram(latencies),
        rate_by_quarter=_rate_by_quarter(
            [(at, size) for report in reports for _, size, at in report.call_latencies], started, messages
        ),
    )
    return run, rejected


def _rate_by_quarter(commits: list[tuple[float, int]], started: float, total: int) -> list[float]:
    """Messages/s over each quarter of the messages in commit order: a falling rate means a growing cost."""
    marks = [total * quarter / 4 for quarter in (1, 2, 3, 4)]
    rates: list[float] = []
    done = last_done = 0
    last_at = started
    for at, size in sorted(commits):
        done += size
        if not marks or done < marks[0]:
            continue
        rate = (done - last_done) / (at - last_at) if at > last_at else 0.0
        while marks and done >= marks[0]:
            marks.pop(0)
            rates.append(rate)  # one commit may pass several marks (small runs): they share its segment
        last_done, last_at = done, at
    return rates


def run_postgres_bench(plan: PostgresBenchPlan, on_event: OnEvent | None = None) -> list[PostgresRun]:
    """One run per worker count, in the order given; each run's schema (and stream) is gone afterwards."""
    emit = on_event or (lambda event: None)
    if not plan.workers or min(plan.workers) < 1:
        raise PostgresBenchError("--workers: give one or more worker counts of at least 1")
    if plan.queue_url is not None:
        _check_nats(plan.queue_url)
    stream = _read_stream(plan.messages, plan.seed)
    parse_rate = parse_only_rate(stream.path, plan.messages)  # before any worker competes for the CPU
    try:
        admin = psycopg.connect(
            _url_with(plan.postgres_url, application_name="idstitch_bench_admin"),
            autocommit=True,
            connect_timeout=10,
        )
    except psycopg.Error as error:
        reason = without_password(str(error), plan.postgres_url)
        raise PostgresBenchError(f"cannot connect to PostgreSQL at --postgres: {reason}") from None
    runs: list[PostgresRun] = []
    first_rejected: set[str] | None = None
    with admin:
        for workers in plan.workers:
            try:
                run, rejected = _run_one(plan, workers, stream, admin, emit)
            except (ConfigError, QueueUnavailable, psycopg.Error, nats.errors.Error, OSError) as error:
                raise PostgresBenchError(
                    f"with {workers} workers: {type(error).__name__}: {error}"
                ) from error
            # The rules reject the same messages whatever the order: a difference is a bug, not noise.
            if first_rejected is not None and rejected != first_rejected:
                run.problems.append(
                    f"{len(rejected ^ first_rejected):,} messages were rejected in one run and not in another"
                )
            first_rejected = rejected if first_rejected is None else first_rejected
            runs.append(run)
    baseline = min(runs, key=lambda run: run.workers)
    for run in runs:
        run.speedup = run.messages_per_s / baseline.messages_per_s if baseline.messages_per_s else None
        run.parse_only_messages_per_s = parse_rate
    return runs
