"""Prometheus metrics of serve and of queue workers: messages by outcome, resolutions, merges, drops,
request latency (serve), commit latency and the queue's backlog (workers)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from idstitch.core.identifiers import drop_rule
from idstitch.engine import IngestBatch, IngestResult, MessageOutcome

__all__ = ["Metrics", "QueueWorkerFigures", "WriterFigures"]

# Drop rules are texts made from the config (types, limits, blocked entries), so few (`drop_rule` takes
# an identifier's size out of `too long`); this bound keeps a label set finite even so: custom types are
# learned from messages.
_MAX_DROP_RULES = 200


class WriterFigures(Protocol):
    """What /metrics reads from the writer: the group-commit writer, or the JetStream publisher in queue mode."""

    @property
    def pending_messages(self) -> int:
        """Messages accepted and not yet durable."""
        ...

    @property
    def commits(self) -> int:
        """Durable writes: commits, or JetStream messages persisted."""
        ...

    @property
    def max_pending_messages(self) -> int:
        """The backlog bound past which requests are answered 429."""
        ...

    @property
    def batches(self) -> int:
        """Requests made durable."""
        ...


class QueueWorkerFigures(Protocol):
    """What a queue worker's /metrics reads from the worker (its running summary)."""

    @property
    def queue_messages(self) -> int:
        """JetStream messages committed and acknowledged."""
        ...

    @property
    def commits(self) -> int:
        """Transactions committed."""
        ...

    @property
    def retried(self) -> int:
        """JetStream messages given back after a failure, to come again."""
        ...

    @property
    def parked(self) -> int:
        """JetStream messages moved to the dead-letter stream."""
        ...

    @property
    def consumer_pending(self) -> int | None:
        """The shared consumer's messages not yet delivered to any worker, when last looked at."""
        ...

    @property
    def consumer_ack_pending(self) -> int | None:
        """The shared consumer's messages delivered and not yet acknowledged, when last looked at."""
        ...


# Fine below 10 ms, where the latency target (P95 7 ms) is: the library's default buckets jump from 5 to 10 ms.
_LATENCY_BUCKETS = (
    0.001,
    0.002,
    0.003,
    0.005,
    0.007,
    0.01,
    0.015,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
)


class Metrics:
    """The metrics of one server or worker, in a registry of its own (several apps in one test process never clash)."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(
        self, writer: WriterFigures | None = None, *, worker: QueueWorkerFigures | None = None
    ) -> None:
        self.registry = CollectorRegistry()
        ProcessCollector(registry=self.registry)
        if writer is not None:
            self.registry.register(_WriterCollector(writer))
        self.commit_seconds: Histogram | None = None
        if worker is not None:
            self.registry.register(_QueueWorkerCollector(worker))
            self.commit_seconds = Histogram(
                "idstitch_worker_commit_duration_seconds",
                "How long a worker's transactions took, from the first message resolved to the commit.",
                registry=self.registry,
                buckets=_LATENCY_BUCKETS,
            )
        self.accepted = Counter(
            "idstitch_messages_accepted",
            "Messages stored (resolved or unresolved).",
            ["space"],
            registry=self.registry,
        )
        self.duplicate = Counter(
            "idstitch_messages_duplicate",
            "Messages whose messageId was already stored in the space (retries); not stored again.",
            ["space"],
            registry=self.registry,
        )
        self.queued = Counter(
            "idstitch_messages_queued",
            "Messages persisted to the JetStream queue for the workers to resolve (serve --queue).",
            ["space"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "idstitch_messages_rejected",
            "Messages refused as invalid (not stored).",
            ["space"],
            registry=self.registry,
        )
        self.refused_busy = Counter(
            "idstitch_messages_refused_busy",
            "Messages answered 429 because the writer's backlog was full (the client retries them); a request "
            "refused before its body was read counts only as a 429 request.",
            ["space"],
            registry=self.registry,
        )
        self.resolutions = Counter(
            "idstitch_resolutions",
            "Stored messages by how they resolved: matched an existing profile, created one, or unresolved.",
            ["space", "result"],
            registry=self.registry,
        )
        self.merges = Counter(
            "idstitch_merges", "Profiles merged into another one.", ["space"], registry=self.registry
        )
        self.dropped = Counter(
            "idstitch_identifiers_dropped",
            "Identifiers carried by messages but not used, by the rule that dropped them.",
            ["space", "rule"],
            registry=self.registry,
        )
        self._drop_rules: set[str] = set()
        self.request_seconds = Histogram(
            "idstitch_http_request_duration_seconds",
            "HTTP request latency, from the first byte read to the response, by route and status.",
            ["route", "status"],
            registry=self.registry,
            buckets=_LATENCY_BUCKETS,
        )
        self._other_processes: list[Collector] = []

    def include_processes(self, directory: str) -> None:
        """Also show what other processes counted in Prometheus multiprocess files in `directory`."""
        # Not registered: their families share names with this registry's and are merged at scrape.
        self._other_processes.append(MultiProcessCollector(None, path=directory))  # type: ignore[no-untyped-call]

    def count_outcomes(self, space: str, outcomes: Iterable[MessageOutcome]) -> None:
        """Count what happened to each message of a request."""
        accepted = duplicate = queued = rejected = matched = created = unresolved = merges = 0
        dropped: dict[str, int] = {}
        for outcome in outcomes:
            status = outcome.status
            if status == "resolved":
                accepted += 1
                if outcome.created:
                    created += 1
                else:
                    matched += 1
                merges += len(outcome.merged)
            elif status == "unresolved":
                accepted += 1
                unresolved += 1
            elif status == "duplicate":
                duplicate += 1
            elif status == "queued":
                queued += 1
            else:
                rejected += 1
            for drop in outcome.dropped:
                rule = drop_rule(drop.rule)
                dropped[rule] = dropped.get(rule, 0) + 1
        # Only touch the counters that moved: each labels() call takes a lock.
        for counter, amount in (
            (self.accepted, accepted),
            (self.duplicate, duplicate),
            (self.queued, queued),
        ):
            if amount:
                counter.labels(space).inc(amount)
        self.count_rejected(space, rejected)
        for result, amount in (("matched", matched), ("created", created), ("unresolved", unresolved)):
            if amount:
                self.resolutions.labels(space, result).inc(amount)
        if merges:
            self.merges.labels(space).inc(merges)
        for rule, amount in dropped.items():
            if rule not in self._drop_rules:
                if len(self._drop_rules) >= _MAX_DROP_RULES:
                    rule = "other"
                self._drop_rules.add(rule)
            self.dropped.labels(space, rule).inc(amount)

    def count_rejected(self, space: str, amount: int) -> None:
        """Count messages refused before they reached the writer."""
        if amount:
            self.rejected.labels(space).inc(amount)

    def count_refused_busy(self, space: str, amount: int) -> None:
        """Count messages turned away with 429 while the backlog was full."""
        if amount:
            self.refused_busy.labels(space).inc(amount)

    def count_commit(
        self, batches: Sequence[IngestBatch], results: Sequence[IngestResult], seconds: float
    ) -> None:
        """Count what a worker's committed transaction did to each message, and how long it took."""
        for batch, result in zip(batches, results, strict=True):
            self.count_outcomes(batch.space, result.outcomes)
        if self.commit_seconds is not None:
            self.commit_seconds.observe(seconds)

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """Record one request's latency."""
        self.request_seconds.labels(route, str(status)).observe(seconds)

    def exposition(self) -> bytes:
        """The Prometheus text exposition of every metric (other processes' added in)."""
        if not self._other_processes:
            return generate_latest(self.registry)
        return generate_latest(_Merged(self.registry, self._other_processes))


class _Merged(Collector):
    """One registry's families with other collectors' added in: a family of the same name gets their
    samples, summed where the labels are the same (a request count of a route served in many processes)."""

    def __init__(self, registry: CollectorRegistry, others: list[Collector]) -> None:
        self._registry = registry
        self._others = others

    def collect(self) -> Iterator[Metric]:
        families = {metric.name: metric for metric in self._registry.collect()}
        for other in self._others:
            for metric in other.collect():
                mine = families.get(metric.name)
                if mine is None:
                    families[metric.name] = metric
                    continue
                samples = {
                    (sample.name, tuple(sorted(sample.labels.items()))): sample for sample in mine.samples
                }
                for sample in metric.samples:
                    key = (sample.name, tuple(sorted(sample.labels.items())))
                    found = samples.get(key)
                    samples[key] = (
                        sample if found is None else found._replace(value=found.value + sample.value)
                    )
                mine.samples = list(samples.values())
        yield from families.values()


class _WriterCollector(Collector):
    """The group-commit writer's own figures, read when scraped."""

    def __init__(self, writer: WriterFigures) -> None:
        self._writer = writer

    def collect(self) -> Iterator[Metric]:
        writer = self._writer
        yield GaugeMetricFamily(
            "idstitch_writer_pending_messages",
            "Messages accepted by the writer and not yet committed (queue mode: not yet persisted by JetStream).",
            value=writer.pending_messages,
        )
        yield GaugeMetricFamily(
            "idstitch_writer_max_pending_messages",
            "The backlog bound (serve --max-pending): past it, requests are answered 429.",
            value=writer.max_pending_messages,
        )
        yield CounterMetricFamily(
            "idstitch_writer_commits",
            "Durable commits, each may hold many requests (queue mode: JetStream messages persisted).",
            value=writer.commits,
        )
        yield CounterMetricFamily(
            "idstitch_writer_batches", "Requests written by the writer.", value=writer.batches
        )


class _QueueWorkerCollector(Collector):
    """A queue worker's own figures, read when scraped."""

    def __init__(self, worker: QueueWorkerFigures) -> None:
        self._worker = worker

    def collect(self) -> Iterator[Metric]:
        worker = self._worker
        for name, text, value in (
            (
                "queue_messages",
                "JetStream messages (each one request) committed and acknowledged.",
                worker.queue_messages,
            ),
            ("commits", "Transactions committed, each may hold many JetStream messages.", worker.commits),
            (
                "retried",
                "JetStream messages given back after a failure, to be delivered again.",
                worker.retried,
            ),
            (
                "parked",
                "JetStream messages moved to the dead-letter stream, with their reason.",
                worker.parked,
            ),
        ):
            yield CounterMetricFamily(f"idstitch_worker_{name}", text, value=value)
        # Unknown until the worker has first looked at its consumer: absent rather than a made-up zero.
        for name, text, backlog in (
            (
                "pending",
                "The shared consumer's messages not yet delivered to any worker (the queue's backlog).",
                worker.consumer_pending,
            ),
            (
                "ack_pending",
                "The shared consumer's messages delivered to workers and not yet acknowledged.",
                worker.consumer_ack_pending,
            ),
        ):
            if backlog is not None:
                yield GaugeMetricFamily(f"idstitch_queue_consumer_{name}_messages", text, value=backlog)
