"""One worker process of `idstitch bench postgres`: ingests its share (or drains the queue) and reports.

The parent starts N of these with the spawn context. Each opens the store and builds its engine, says
it is ready, waits for the common start signal, then ingests: its own share of the stream in batches
(direct mode), or whatever the shared JetStream consumer hands it, through `run_worker` (queue mode).
Every engine call is timed from the moment its batch is handed to the engine until the commit returns,
and every transaction the store opens is counted: committed, or rolled back by a conflict and retried.
After reporting, it keeps its connections open until the parent has sampled the CPU time of their
PostgreSQL backends, then closes them and exits.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from multiprocessing.queues import Queue
from multiprocessing.synchronize import Event
from pathlib import Path
from typing import Any

from idstitch.bench.children import end_with_parent
from idstitch.bench.runner import peak_rss_mb, workload_lines
from idstitch.config import Config
from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import Message, decode_message
from idstitch.engine import Engine, IngestBatch, IngestResult
from idstitch.queue.jetstream import QueueConfig
from idstitch.queue.worker import run_worker
from idstitch.storage.base import LockBusy, StoreConflict
from idstitch.storage.postgres import PostgresStore, PostgresTransaction

__all__ = ["CountingStore", "TimedEngine", "WorkerPlan", "WorkerReport", "worker_main"]

SPACE = "default"
# How often a waiting worker checks that the parent still exists (an orphan must not wait forever).
_PARENT_CHECK_SECONDS = 1.0


@dataclass(frozen=True)
class WorkerPlan:
    """What one worker process does; picklable, sent to the spawned process."""

    index: int
    store_url: str
    batch_size: int
    share_path: str | None = None  # direct mode: this worker's NDJSON lines, in stream order
    queue: QueueConfig | None = None  # queue mode: drain this stream's shared consumer
    fetch: int = 1  # queue mode: JetStream messages (requests) per fetch, resolved as one group
    fetch_timeout: float = 0.2  # queue mode: an idle fetch this long triggers the drain check


@dataclass
class WorkerReport:
    """What one worker did in the timed window, sent back to the parent."""

    index: int
    messages: int = 0
    calls: int = 0  # engine calls (ingest / ingest_group), each one group of batches
    # (seconds from hand-over to commit, messages, time.monotonic() of the commit) per engine call: every
    # message of a call waits as long
    call_latencies: list[tuple[float, int, float]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    rejected_ids: list[str] = field(default_factory=list)
    started: float = 0.0  # time.monotonic() when the start signal was seen (system-wide clock on Linux)
    last_commit: float | None = None  # time.monotonic() when the last engine call returned
    cpu_s: float = 0.0  # this process's user + system CPU in the window, all threads
    peak_rss_mb: float = 0.0
    commits: int = 0  # transactions committed
    conflicts: int = 0  # transactions rolled back by a conflict (deadlock, serialisation, connection)
    lock_busy: int = 0  # transactions rolled back because a lock was held with nothing to commit
    queue: dict[str, Any] | None = None  # queue mode: the worker's WorkerSummary.as_dict()


class CountingStore(PostgresStore):
    """The PostgreSQL store, counting its transactions: committed, or rolled back to be retried."""

    def __init__(self, url: str) -> None:
        super().__init__(url)
        self.commits = 0
        self.conflicts = 0
        self.lock_busy = 0

    @contextlib.contextmanager
    def transaction(self) -> Iterator[PostgresTransaction]:
        """The store's transaction; its end is counted (the engine retries the rolled-back ones)."""
        try:
            with super().transaction() as transaction:
                yield transaction
        except LockBusy:
            self.lock_busy += 1
            raise
        except StoreConflict:
            self.conflicts += 1
            raise
        self.commits += 1


class TimedEngine(Engine):
    """The engine, timing each call from hand-over to commit and keeping the outcomes."""

    def __init__(self, store: CountingStore, config: Config, on_call: Callable[[int], None]) -> None:
        super().__init__(store, config)
        self.counting_store = store
        self.on_call = on_call
        self.messages = 0
        self.call_latencies: list[tuple[float, int, float]] = []
        self.outcomes: dict[str, int] = {}
        self.rejected_ids: list[str] = []
        self.last_commit: float | None = None

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
        """Engine.ingest_group, timed; `ingest` goes through here too."""
        received = time.monotonic()
        results = super().ingest_group(batches)
        committed = time.monotonic()
        size = sum(len(batch.items) for batch in batches)
        self.call_latencies.append((committed - received, size, committed))
        self.last_commit = committed
        self.messages += size
        for result in results:
            for outcome in result.outcomes:
                self.outcomes[outcome.status] = self.outcomes.get(outcome.status, 0) + 1
                if outcome.status == "rejected" and outcome.message_id is not None:
                    self.rejected_ids.append(outcome.message_id)
        self.on_call(self.messages)
        return results


def _wait(event: Event, parent: int) -> bool:
    """Wait for the parent's signal; False when the parent is gone (this process was orphaned)."""
    while not event.wait(_PARENT_CHECK_SECONDS):
        if os.getppid() != parent:
            return False
    return True


def _ingest_share(engine: TimedEngine, path: Path, batch_size: int) -> None:
    """Direct mode: decode the share's lines and hand them to the engine `batch_size` at a time."""
    received_at = datetime.now(UTC)
    batch: list[Message | InvalidEvent] = []
    for line in workload_lines(path):
        try:
            batch.append(decode_message(line, received_at=received_at))
        except InvalidEvent as error:
            batch.append(error)
        if len(batch) >= batch_size:
            engine.ingest(batch, space=SPACE)
            batch = []
    if batch:
        engine.ingest(batch, space=SPACE)


def worker_main(plan: WorkerPlan, channel: Queue[Any], go: Event, finish: Event, parent: int) -> None:
    """The process target: prepare, say ready, wait for `go`, ingest, report, wait for `finish`.

    Messages on `channel`: ("ready", index, None), ("progress", index, messages so far),
    ("report", index, WorkerReport), ("error", index, traceback text).
    """
    # Ctrl-C reaches the whole process group: the parent alone decides how the workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    end_with_parent(parent)
    store: CountingStore | None = None
    try:
        store = CountingStore(plan.store_url)
        engine = TimedEngine(
            store, Config.default(), on_call=lambda done: channel.put(("progress", plan.index, done))
        )
        channel.put(("ready", plan.index, None))
        if not _wait(go, parent):
            return
        report = WorkerReport(plan.index, started=time.monotonic())
        cpu_started = time.process_time()
        if plan.queue is not None:
            summary = run_worker(
                engine, plan.queue, batch=plan.fetch, drain=True, fetch_timeout=plan.fetch_timeout
            )
            report.queue = summary.as_dict()
        elif plan.share_path is not None:
            _ingest_share(engine, Path(plan.share_path), plan.batch_size)
        report.cpu_s = time.process_time() - cpu_started
        report.peak_rss_mb = peak_rss_mb()  # its own, not the parent's it was spawned from
        report.messages = engine.messages
        report.calls = len(engine.call_latencies)
        report.call_latencies = engine.call_latencies
        report.outcomes = engine.outcomes
        report.rejected_ids = engine.rejected_ids
        report.last_commit = engine.last_commit
        report.commits = store.commits
        report.conflicts = store.conflicts
        report.lock_busy = store.lock_busy
        channel.put(("report", plan.index, report))
        # Until the parent has read our backends' CPU time: closing the pool would end them first.
        _wait(finish, parent)
    except BaseException:
        channel.put(("error", plan.index, traceback.format_exc()))
        raise SystemExit(1) from None
    finally:
        if store is not None:
            store.close()
