"""The figures of one worker count of `idstitch bench postgres`, and its JSON object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["TARGET_MESSAGES_PER_S", "PostgresRun"]

TARGET_MESSAGES_PER_S = 20_000.0  # issue 6: at the best worker count, on the 2-core machine


@dataclass
class PostgresRun:
    """The figures of one worker count."""

    mode: str
    workers: int
    messages: int
    batch_size: int
    seconds: float
    messages_per_s: float
    p50_ms: float
    p95_ms: float
    p99_ms: float
    peak_rss_mb: float
    ingest_calls: int
    commits: int
    conflicts: int
    lock_busy: int
    outcomes: dict[str, int]
    stored_events: int
    expected_events: int
    problems: list[str]
    cpus: int
    window_s: float
    box_cpu_percent: float
    postgres_cpu_s: float
    postgres_backends_cpu_s: float
    postgres_background_cpu_s: float
    workers_cpu_s: float
    nats_cpu_s: float | None
    schema: str
    postgres_settings: dict[str, str]
    speedup: float | None = None  # over the run with the fewest workers (1 when asked for)
    parse_only_messages_per_s: float = 0.0  # msgspec decoding the same stream's bytes, one process
    fetch: int | None = None
    stream: str | None = None
    publish_seconds: float | None = None
    queue_messages: int | None = None
    queue_retried: int | None = None
    other_processes: list[tuple[str, float]] = field(default_factory=list)  # (name, CPU s), busiest first
    rate_by_quarter: list[float] = field(default_factory=list)
    latency_histogram: list[list[float]] = field(default_factory=list)

    @property
    def verified(self) -> bool:
        """Whether every message landed exactly once."""
        return not self.problems

    @property
    def meets_target(self) -> bool:
        """Whether this worker count reached the issue's target rate."""
        return self.messages_per_s >= TARGET_MESSAGES_PER_S

    def _share(self, cpu_s: float | None) -> float | None:
        """CPU seconds as a percentage of the whole box (every CPU) over the window."""
        if cpu_s is None:
            return None
        capacity = self.cpus * self.window_s
        return 100.0 * cpu_s / capacity if capacity > 0 else 0.0

    @property
    def other_cpu_percent(self) -> float:
        """The box's busy share that neither PostgreSQL, the workers nor NATS account for."""
        known = self.postgres_cpu_s + self.workers_cpu_s + (self.nats_cpu_s or 0.0)
        return max(0.0, self.box_cpu_percent - (self._share(known) or 0.0))

    @property
    def parse_only_ratio(self) -> float:
        """This run's throughput over msgspec's parse-only throughput of the same bytes (as every bench)."""
        rate = self.parse_only_messages_per_s
        return self.messages_per_s / rate if rate > 0 else 0.0

    @property
    def cpu_ms_per_message(self) -> float:
        """CPU time of PostgreSQL, the workers and NATS together, per message."""
        total = self.postgres_cpu_s + self.workers_cpu_s + (self.nats_cpu_s or 0.0)
        return 1000.0 * total / self.messages if self.messages else 0.0

    @property
    def cpu_bound_messages_per_s(self) -> float:
        """The rate at which this CPU cost per message would keep every CPU of the box busy."""
        per_message = self.cpu_ms_per_message / 1000.0
        return self.cpus / per_message if per_message > 0 else 0.0

    def cpu_percent(self) -> dict[str, float | None]:
        """Shares of the box's CPU capacity over the window, by who used it."""
        return {
            "box": round(self.box_cpu_percent, 1),
            "postgres": _round(self._share(self.postgres_cpu_s), 1),
            "postgres_backends": _round(self._share(self.postgres_backends_cpu_s), 1),
            "postgres_background": _round(self._share(self.postgres_background_cpu_s), 1),
            "workers": _round(self._share(self.workers_cpu_s), 1),
            "nats": _round(self._share(self.nats_cpu_s), 1),
            "other": round(self.other_cpu_percent, 1),
        }

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of this worker count in `--json`'s list."""
        shares = self.cpu_percent()
        figures: dict[str, Any] = {
            "benchmark": "postgres",
            "mode": self.mode,
            "workers": self.workers,
            "messages": self.messages,
            "batch_size": self.batch_size,
            "seconds": round(self.seconds, 3),
            "messages_per_s": round(self.messages_per_s, 1),
            "speedup": _round(self.speedup, 3),
            "rate_by_quarter": [round(rate, 1) for rate in self.rate_by_quarter],
            "p50_ms": round(self.p50_ms, 3),
            "p95_ms": round(self.p95_ms, 3),
            "p99_ms": round(self.p99_ms, 3),
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "parse_only_messages_per_s": round(self.parse_only_messages_per_s, 1),
            "parse_only_ratio": round(self.parse_only_ratio, 4),
            "ingest_calls": self.ingest_calls,
            "commits": self.commits,
            "lock_splits": max(0, self.commits - self.ingest_calls),
            "conflicts_retried": self.conflicts,
            "lock_busy_retried": self.lock_busy,
            "outcomes": self.outcomes,
            "stored_events": self.stored_events,
            "expected_events": self.expected_events,
            "verified": self.verified,
            "problems": self.problems,
            "cpus": self.cpus,
            "cpu_window_s": round(self.window_s, 3),
            "box_cpu_percent": shares["box"],
            "postgres_cpu_percent": shares["postgres"],
            "postgres_backends_cpu_percent": shares["postgres_backends"],
            "postgres_background_cpu_percent": shares["postgres_background"],
            "workers_cpu_percent": shares["workers"],
            "nats_cpu_percent": shares["nats"],
            "other_cpu_percent": shares["other"],
            "other_processes": [
                {"name": name, "cpu_percent": _round(self._share(cpu), 1)}
                for name, cpu in self.other_processes
            ],
            "postgres_cpu_s": round(self.postgres_cpu_s, 3),
            "postgres_backends_cpu_s": round(self.postgres_backends_cpu_s, 3),
            "postgres_background_cpu_s": round(self.postgres_background_cpu_s, 3),
            "workers_cpu_s": round(self.workers_cpu_s, 3),
            "nats_cpu_s": _round(self.nats_cpu_s, 3),
            "cpu_ms_per_message": round(self.cpu_ms_per_message, 4),
            "cpu_bound_messages_per_s": round(self.cpu_bound_messages_per_s, 1),
            "target_messages_per_s": TARGET_MESSAGES_PER_S,
            "meets_target": self.meets_target,
            "schema": self.schema,
            "postgres_settings": self.postgres_settings,
            # JSON has no infinity: the open last bucket's bound is written as null
            "latency_histogram_ms": [
                [None if bound == float("inf") else bound, count] for bound, count in self.latency_histogram
            ],
        }
        if self.mode == "queue":
            figures["fetch"] = self.fetch
            figures["stream"] = self.stream
            figures["publish_seconds"] = _round(self.publish_seconds, 3)
            figures["publish_messages_per_s"] = (
                round(self.messages / self.publish_seconds, 1) if self.publish_seconds else None
            )
            figures["queue_messages"] = self.queue_messages
            figures["queue_retried"] = self.queue_retried
        return figures


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)
