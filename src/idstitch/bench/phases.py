"""One timed phase of a load generator (bench http's ingest load, bench profile-api's lookups).

A phase counts its problems by kind, keeps every answered request's latency, and turns them into the
figures every load benchmark prints the same way: seconds, P50 / P95 / P99 / max in ms, errors.
"""

from __future__ import annotations

from array import array
from dataclasses import dataclass, field
from typing import Any

from idstitch.bench.runner import percentile

__all__ = ["TimedPhase"]


@dataclass
class TimedPhase:
    """What one phase measured: latencies (seconds) of its answered requests and its errors by kind."""

    name: str
    # Keyword-only, so a subclass's own fields follow `name` positionally.
    errors: dict[str, int] = field(default_factory=dict, kw_only=True)
    latencies: array[float] = field(default_factory=lambda: array("d"), kw_only=True)
    started: float = field(default=0.0, kw_only=True)
    finished: float = field(default=0.0, kw_only=True)

    def error(self, kind: str) -> None:
        """Count a problem of this kind (a request without the right answer, or an odd answer)."""
        self.errors[kind] = self.errors.get(kind, 0) + 1

    @property
    def seconds(self) -> float:
        """How long the phase ran, from its start to its last answer."""
        return max(self.finished - self.started, 0.0)

    def rate(self, count: int) -> float:
        """`count` per second of the phase, 0 for a phase that did not run."""
        seconds = self.seconds
        return round(count / seconds, 1) if seconds > 0 else 0.0

    def timing(self) -> dict[str, Any]:
        """The phase's name, its seconds, latency percentiles and maximum in ms, and its errors."""
        latencies = array("d", sorted(self.latencies))
        return {
            "name": self.name,
            "seconds": round(self.seconds, 3),
            "p50_ms": round(percentile(latencies, 0.50) * 1000, 3),
            "p95_ms": round(percentile(latencies, 0.95) * 1000, 3),
            "p99_ms": round(percentile(latencies, 0.99) * 1000, 3),
            "max_ms": round(latencies[-1] * 1000, 3) if latencies else 0.0,
            "errors": self.errors,
            "error_count": sum(self.errors.values()),
        }
