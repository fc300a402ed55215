"""Ingest benchmarks: a generated realistic stream through the engine into a store, timed end to end."""

from __future__ import annotations

import bisect
import gc
import hashlib
import itertools
import math
import os
import re
import resource
import tempfile
import time
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import psutil

from idstitch.bench.scratch import scratch_directory
from idstitch.config import Config
from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import Message, decode_message
from idstitch.engine import Engine, event_record
from idstitch.sim import population
from idstitch.sim.population import WorkloadConfig, write_ndjson
from idstitch.storage.base import EventRecord
from idstitch.storage.urls import open_store

__all__ = [
    "BatchSizer",
    "BenchResult",
    "ensure_workload",
    "generator_fingerprint",
    "latency_histogram",
    "parse_only_rate",
    "peak_rss_mb",
    "percentile",
    "run_ingest_bench",
    "store_floor_rate",
    "workload_lines",
]

CHECKPOINTS = (100_000, 250_000, 500_000, 1_000_000, 2_000_000, 5_000_000)


@dataclass
class BenchResult:
    """The figures one ingest benchmark prints."""

    name: str
    store: str
    messages: int
    batch_size: int
    seconds: float
    messages_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    peak_rss_mb: float
    parse_only_messages_per_s: float
    parse_only_ratio: float
    floor_messages_per_s: float
    floor_ratio: float
    rate_by_size: list[dict[str, float]] = field(default_factory=list)
    outcomes: dict[str, int] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    latency_histogram: list[list[float]] = field(default_factory=list)
    latency_budget_ms: float = 0.0
    mean_batch_size: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        """The JSON object `--json` prints."""
        return {
            "benchmark": self.name,
            "store": self.store,
            "messages": self.messages,
            "batch_size": self.batch_size,
            "latency_budget_ms": self.latency_budget_ms,
            "mean_batch_size": round(self.mean_batch_size, 1),
            "seconds": round(self.seconds, 3),
            "messages_per_s": round(self.messages_per_s, 1),
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "parse_only_messages_per_s": round(self.parse_only_messages_per_s, 1),
            "parse_only_ratio": round(self.parse_only_ratio, 4),
            "floor_messages_per_s": round(self.floor_messages_per_s, 1),
            "floor_ratio": round(self.floor_ratio, 4),
            "rate_by_size": self.rate_by_size,
            "outcomes": self.outcomes,
            "stats": self.stats,
            # JSON has no infinity: the open last bucket's bound is written as null
            "latency_histogram_ms": [
                [None if bound == float("inf") else bound, count] for bound, count in self.latency_histogram
            ],
        }


def _cache_dir() -> Path:
    base = os.environ.get("IDSTITCH_BENCH_CACHE") or os.path.join(tempfile.gettempdir(), "idstitch-bench")
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def generator_fingerprint() -> str:
    """A short hash of the simulator's source: a cached stream made by another version is not reused."""
    return hashlib.sha256(Path(population.__file__).read_bytes()).hexdigest()[:12]


def ensure_workload(messages: int, seed: int) -> Path:
    """The generated NDJSON stream for (messages, seed), written once and reused (it is deterministic)."""
    path = _cache_dir() / f"workload-{messages}-{seed}-{generator_fingerprint()}.ndjson"
    if not path.exists():
        partial = path.with_suffix(".partial")
        try:
            write_ndjson(partial, WorkloadConfig(messages=messages, seed=seed))
        except BaseException:  # Ctrl-C or a full disk: no half-written stream is left in the cache
            partial.unlink(missing_ok=True)
            raise
        partial.replace(path)
    return path


def workload_lines(path: Path) -> Iterator[bytes]:
    """The non-blank lines of a workload file (one message each), read as they are used."""
    with path.open("rb") as file:
        for line in file:
            if line.strip():
                yield line


def percentile(values: array[float], fraction: float) -> float:
    """The nearest-rank percentile of sorted values: the smallest value with at least `fraction` of the
    values at or below it, i.e. the value of rank ceil(fraction × n)."""
    if not values:
        return 0.0
    # round() first: 0.07 × 100 is 7.000000000000001 in binary, whose ceiling would be one rank too high.
    rank = math.ceil(round(fraction * len(values), 9))
    return values[min(len(values), max(1, rank)) - 1]


# Upper bounds (ms) of the latency histogram buckets: 1-2-5 steps, the last one open.
HISTOGRAM_BOUNDS_MS = (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, float("inf"))


def latency_histogram(sorted_seconds: array[float]) -> list[list[float]]:
    """Counts of sorted latencies (seconds) per bucket, as `[upper bound in ms, count]` (last bound: inf)."""
    counts: list[list[float]] = []
    start = 0
    for bound in HISTOGRAM_BOUNDS_MS:
        end = bisect.bisect_right(sorted_seconds, bound / 1000, lo=start)
        counts.append([bound, end - start])
        start = end
    return counts


def parse_only_rate(path: Path, limit: int) -> float:
    """msgspec JSON decoding of the same bytes, messages per second: the ceiling for any ingest."""
    decoder = msgspec.json.Decoder()
    count = 0
    started = time.perf_counter()
    for line in workload_lines(path):
        decoder.decode(line)
        count += 1
        if count >= limit:
            break
    elapsed = time.perf_counter() - started
    return count / elapsed if elapsed > 0 else 0.0


def store_floor_rate(path: Path, store_url: str, limit: int, batch_size: int) -> float:
    """Messages/s of what any ingest does besides resolving, into the store at `store_url` (fresh).

    Each message is decoded and validated, checked for a duplicate id and stored as an event; each
    batch commits durably. No identifier is read or written: the gap to the full benchmark is what
    identity resolution costs, and this rate is a ceiling no resolver on this store can pass.
    """
    store = open_store(store_url)
    space = "default"
    store.ensure_space(space)
    received_at = datetime.now(UTC)
    count = 0
    started = time.perf_counter()
    lines = workload_lines(path)
    try:
        while count < limit:
            batch = list(itertools.islice(lines, min(batch_size, limit - count)))
            if not batch:
                break
            with store.transaction() as transaction:
                for line in batch:
                    try:
                        message = decode_message(line, received_at=received_at)
                    except InvalidEvent:
                        continue
                    if transaction.has_message(space, message.message_id):
                        continue
                    transaction.add_event(space, _bare_event(message))
            count += len(batch)
    finally:
        store.close()
    elapsed = time.perf_counter() - started
    return count / elapsed if elapsed > 0 else 0.0


def _bare_event(message: Message) -> EventRecord:
    identifiers = tuple(
        f"{kind}:{value}"
        for kind, value in (("user_id", message.user_id), ("anonymous_id", message.anonymous_id))
        if value is not None
    )
    return event_record(message, source=None, profile_id=None, account_id=None, identifiers=identifiers)


class BatchSizer:
    """How many messages the next transaction takes: as many as commit within a latency budget.

    A message's latency is the time from its receipt to its batch's commit, so the first message of a
    batch waits for the whole batch: a batch must take no longer than the budget. The sizer keeps a moving
    average of what a batch cost per message (its commit included) and sizes the next one to fit. It is
    what a real-time consumer does with a backlog; a budget of 0 gives fixed batches of `limit`.
    """

    def __init__(self, limit: int, budget_ms: float) -> None:
        self.limit = limit
        self.budget_seconds = budget_ms / 1000
        self.size = limit if budget_ms <= 0 else min(limit, 10)
        self._seconds_per_message: float | None = None

    def observe(self, messages: int, seconds: float) -> None:
        """Learn from a committed batch and size the next one."""
        if self.budget_seconds <= 0 or messages <= 0:
            return
        cost = seconds / messages
        average = self._seconds_per_message
        average = cost if average is None else 0.8 * average + 0.2 * cost
        self._seconds_per_message = average
        fits = int(self.budget_seconds / average + 1e-6) if average > 0 else self.limit  # 1e-6: float error
        self.size = max(1, min(self.limit, fits))


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: the kernel's high-water mark of its own memory (VmHWM, Linux).

    Not getrusage()'s ru_maxrss where VmHWM is known: a process started by fork + exec (subprocess,
    multiprocessing's spawn) inherits its parent's ru_maxrss, so a benchmark or worker started by a big
    process would report that process's peak as its own.
    """
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        status = ""
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    if found is not None:
        return int(found.group(1)) / 1024.0
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _current_rss_mb() -> float:
    return float(psutil.Process().memory_info().rss) / 2**20


def run_ingest_bench(
    name: str,
    store_url: str,
    *,
    messages: int,
    seed: int = 1,
    batch_size: int = 100,
    latency_budget_ms: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> BenchResult:
    """Ingest `messages` generated messages into the store; latency is receipt (line read) to commit.

    Each transaction takes at most `batch_size` messages, fewer when `latency_budget_ms` says so.
    """
    path = ensure_workload(messages, seed)
    parse_rate = parse_only_rate(path, messages)
    store = open_store(store_url)
    engine = Engine(store, Config.default())
    space = "default"
    # float32 seconds (sub-microsecond precision here): the bench's own memory stays small at 5M.
    latencies: array[float] = array("f")
    outcomes: dict[str, int] = {}
    checkpoints = [size for size in CHECKPOINTS if size <= messages]
    rate_by_size: list[dict[str, float]] = []
    received_at = datetime.now(UTC)
    batch: list[Message | InvalidEvent] = []
    receipts: list[float] = []
    sizer = BatchSizer(batch_size, latency_budget_ms)
    commits = 0
    done = 0
    clock = time.perf_counter
    gc.freeze()  # the long-lived config and caches need not be scanned on every collection
    started = clock()
    last_mark, last_time = 0, started

    def flush() -> None:
        nonlocal done, last_mark, last_time, commits
        result = engine.ingest(batch, space=space)
        committed = clock()
        sizer.observe(len(batch), committed - receipts[0])
        commits += 1
        latencies.extend(committed - receipt for receipt in receipts)
        for outcome in result.outcomes:
            outcomes[outcome.status] = outcomes.get(outcome.status, 0) + 1
        done += len(batch)
        batch.clear()
        receipts.clear()
        if progress is not None:
            progress(done)
        while checkpoints and done >= checkpoints[0]:
            size = checkpoints.pop(0)
            rate_by_size.append(
                {
                    "messages": size,
                    "cumulative_messages_per_s": round(done / (committed - started), 1),
                    "segment_messages_per_s": round((done - last_mark) / (committed - last_time), 1),
                    "rss_mb": round(_current_rss_mb(), 1),
                }
            )
            last_mark, last_time = done, committed

    for line in workload_lines(path):
        receipts.append(clock())
        try:
            batch.append(decode_message(line, received_at=received_at))
        except InvalidEvent as error:
            batch.append(error)
        # A batch also ends at each size checkpoint, so that the figures at 100,000 are at 100,000.
        if len(batch) >= sizer.size or (checkpoints and done + len(batch) == checkpoints[0]):
            flush()
    if batch:
        flush()
    elapsed = clock() - started
    peak = peak_rss_mb()  # before the percentiles' sort, which is the bench's, not the store's
    stats = store.stats(space).as_dict()
    store.close()
    mean_batch = done / commits if commits else 0.0
    with scratch_directory("floor") as folder:
        # The same kind of store as the benchmark's, fresh (memory for core, a SQLite file otherwise),
        # committing batches of the size the run used on average.
        floor_url = "memory://" if store_url.startswith("memory") else f"sqlite:///{folder / 'floor.db'}"
        floor_rate = store_floor_rate(path, floor_url, messages, max(1, round(mean_batch)))
    latencies = array("f", sorted(latencies))
    rate = done / elapsed if elapsed > 0 else 0.0
    return BenchResult(
        name=name,
        store=store_url,
        messages=done,
        batch_size=batch_size,
        seconds=elapsed,
        messages_per_s=rate,
        p50_ms=percentile(latencies, 0.50) * 1000,
        p95_ms=percentile(latencies, 0.95) * 1000,
        p99_ms=percentile(latencies, 0.99) * 1000,
        peak_rss_mb=peak,
        parse_only_messages_per_s=parse_rate,
        parse_only_ratio=rate / parse_rate if parse_rate else 0.0,
        floor_messages_per_s=floor_rate,
        floor_ratio=rate / floor_rate if floor_rate else 0.0,
        rate_by_size=rate_by_size,
        outcomes=outcomes,
        stats=stats,
        latency_histogram=latency_histogram(latencies),
        latency_budget_ms=latency_budget_ms,
        mean_batch_size=mean_batch,
    )
