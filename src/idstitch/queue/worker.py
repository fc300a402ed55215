"""The worker of queue mode: fetch requests from JetStream, resolve them, commit, and only then acknowledge.

Any number of workers share one durable pull consumer, so each JetStream message goes to one of them
at a time. A worker fetches up to `batch` messages and resolves them with `Engine.ingest_group`, one
transaction per group, on a thread of its own (the event loop stays free to answer the server and to
report progress on long groups). Only once the transaction is committed is each message acknowledged.

Delivery is at least once: a worker that dies between its commit and its acks has its messages
delivered again (after the consumer's ack_wait) to another worker, which finds their `messageId`s
stored and counts them as duplicates. Each message therefore has exactly one effect on the store.
A group that fails is written again one request at a time, so one bad request does not hold back the
others; a request that still fails is nak'ed with a growing delay and comes back later. A request
that cannot succeed however often it comes back (its space is unknown to this worker's config, say),
or that has failed on `max_deliveries` deliveries for a reason other than the store being unavailable
(an outage is waited out, however long), is *parked*: copied to the dead-letter stream with its
reason, and only then terminated, so that nothing is lost and nothing is retried forever. So is a
JetStream message that is not a queued request at all (or one only a newer worker reads).

A consumer whose stream was deleted (or lost in a NATS restart without persistent storage) answers a
fetch as an empty queue does, with nothing; so an idle worker asks for its consumer now and then, and
recreates stream and consumer when they are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import nats.errors
import nats.js.errors
import psycopg
import psycopg.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from idstitch.core.errors import ConfigError, IdstitchError, InvalidEvent
from idstitch.engine import Engine, IngestBatch, IngestResult, OutcomeCounts
from idstitch.queue import envelope
from idstitch.queue.jetstream import JetStream, QueueConfig, parse_queue_url
from idstitch.storage.base import StoreConflict, StoreUnavailable, StoreWriteFailed

__all__ = ["CommitObserver", "QueueWorker", "WorkerSummary", "run_worker"]

_log = logging.getLogger("idstitch.queue")
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# Told of each committed group: its requests, their outcomes, and the seconds the transaction took.
CommitObserver = Callable[[list[IngestBatch], list[IngestResult], float], None]
# Failures that every delivery would repeat: the worker's config lacks the request's space, the request
# as a whole is invalid. Retrying only delays the request until an operator replays it.
_HOPELESS = (ConfigError, InvalidEvent)


def _store_unavailable(error: Exception) -> bool:
    """Whether the store could not be reached or kept losing to other writers: worth waiting out, however
    long it lasts (a PostgreSQL outage), never a reason to park; a row too big to index is no outage."""
    if isinstance(error, psycopg.errors.ProgramLimitExceeded):
        return False
    return isinstance(
        error,
        StoreConflict
        | StoreWriteFailed
        | psycopg.OperationalError
        | psycopg.InterfaceError
        | sqlite3.OperationalError
        | OSError,
    )


@dataclass(slots=True)
class WorkerSummary(OutcomeCounts):
    """What one worker did, from its start until it stopped."""

    queue_messages: int = 0  # JetStream messages committed and acknowledged
    commits: int = 0
    retried: int = 0  # JetStream messages nak'ed after a failed ingest, to come back later
    parked: int = 0  # JetStream messages copied to the dead-letter stream, then terminated
    seconds: float = 0.0
    # The shared consumer's backlog when last looked at (None before the first look): not yet
    # delivered to any worker, and delivered but not yet acknowledged. What tells an operator to add workers.
    consumer_pending: int | None = None
    consumer_ack_pending: int | None = None

    def add(self, result: IngestResult) -> None:
        """Add one request's outcomes."""
        for outcome in result.outcomes:
            self.count(outcome)

    def as_dict(self) -> dict[str, Any]:
        """The figures of the run as JSON-able values, with the rate (the consumer's backlog is not one)."""
        rate = round(self.messages / self.seconds) if self.seconds > 0 else 0
        return {
            "queue_messages": self.queue_messages,
            **self.counts(),
            "commits": self.commits,
            "retried": self.retried,
            "parked": self.parked,
            "seconds": round(self.seconds, 3),
            "messages_per_second": rate,
        }


class QueueWorker:
    """One worker: a loop that fetches, resolves, commits and acknowledges until asked to stop."""

    def __init__(
        self,
        engine: Engine,
        queue: QueueConfig | str,
        *,
        batch: int = 20,
        max_group_messages: int = 5_000,
        fetch_timeout: float = 1.0,
        retry_delay: float = 1.0,
        max_retry_delay: float = 60.0,
        max_deliveries: int = 10,
        consumer_check: float = 5.0,
        drain: bool = False,
        stop: threading.Event | None = None,
        summary: WorkerSummary | None = None,
        on_commit: CommitObserver | None = None,
    ) -> None:
        if batch < 1:
            raise ValueError("batch must be at least 1")
        if max_deliveries < 1:
            raise ValueError("max_deliveries must be at least 1")
        self.engine = engine
        self.queue = parse_queue_url(queue) if isinstance(queue, str) else queue
        self.batch = batch
        self.max_group_messages = max_group_messages
        # Also how long a stop request may wait while the queue is idle.
        self.fetch_timeout = fetch_timeout
        self.retry_delay = retry_delay
        self.max_retry_delay = max_retry_delay
        self.max_deliveries = max_deliveries
        # Seconds between two looks at the consumer while the queue is idle (with `drain`, at each).
        self.consumer_check = consumer_check
        self._next_check = 0.0
        # While the store cannot be reached: how many tries failed in a row, and when to fetch again.
        self._outage_tries = 0
        self._resume_at = 0.0
        self.drain = drain
        self.stop = stop or threading.Event()
        self.summary = summary or WorkerSummary()
        self.on_commit = on_commit
        self._next_backlog_look = 0.0
        # One thread runs the engine, always the same one, as the group-commit writer does in serve.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="idstitch-worker-engine")

    async def run(
        self, *, on_start: Callable[[str], None] | None = None, handle_signals: bool = False
    ) -> WorkerSummary:
        """Consume until `stop` is set (or SIGTERM / SIGINT with `handle_signals`, or an empty queue with `drain`)."""
        loop = asyncio.get_running_loop()
        if handle_signals:
            for sig in _STOP_SIGNALS:
                loop.add_signal_handler(sig, self.stop.set)
        try:
            jetstream = await JetStream.connect(self.queue, name="idstitch worker")
            started = time.monotonic()
            try:
                await self._consume(jetstream, on_start)
            finally:
                self.summary.seconds = time.monotonic() - started
                await jetstream.close()  # flushes the last acks
        finally:
            self._executor.shutdown(wait=True)
            if handle_signals:
                for sig in _STOP_SIGNALS:
                    loop.remove_signal_handler(sig)
        return self.summary

    async def _consume(self, jetstream: JetStream, on_start: Callable[[str], None] | None) -> None:
        await jetstream.ensure_consumer()
        subscription = await jetstream.js.pull_subscribe_bind(
            durable=self.queue.consumer, stream=self.queue.stream
        )
        if on_start is not None:
            on_start(
                f"idstitch worker consuming {self.queue.shown_servers} stream {self.queue.stream} "
                f"(consumer {self.queue.consumer}, subjects {self.queue.filter_subject}), "
                f"up to {self.batch} queue messages per commit"
            )
        while not self.stop.is_set():
            if self._resume_at > time.monotonic():
                await self._pause()
                continue
            try:
                fetched = await subscription.fetch(self.batch, timeout=self.fetch_timeout)
            except TimeoutError:  # nats' own TimeoutError is one too: nothing came
                if await self._idle(jetstream, subscription):
                    return
                continue
            except (nats.errors.Error, OSError) as error:
                # Disconnected, say: the client reconnects by itself; try again shortly.
                _log.warning("fetch failed; retrying", extra={"error": f"{type(error).__name__}: {error}"})
                self._next_check = 0.0  # and see at the next idle fetch whether the consumer is still there
                await asyncio.sleep(min(self.fetch_timeout, 1.0))
                continue
            # A stop requested meanwhile still lets this group finish: it is committed and acked.
            await self._handle(jetstream, fetched)
            if time.monotonic() >= self._next_backlog_look:
                # A busy worker never idles, and its backlog matters most then: look at it now and then.
                with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                    self._note_backlog(await subscription.consumer_info())

    async def _idle(self, jetstream: JetStream, subscription: JetStreamContext.PullSubscription) -> bool:
        """After a fetch that brought nothing: whether to stop (`drain`, and nothing is left).

        Also where a lost consumer is noticed: a fetch from one that no longer exists only times out.
        """
        now = time.monotonic()
        if not self.drain and now < self._next_check:
            return False
        self._next_check = now + self.consumer_check
        try:
            info = await subscription.consumer_info()
        except nats.js.errors.NotFoundError as error:  # the consumer, or its whole stream
            await self._recover(jetstream, error)
            return False
        except (nats.errors.Error, OSError):
            return False  # disconnected, say: not drained as far as anyone can tell
        self._note_backlog(info)
        # Parked messages count in neither figure: only what may still be delivered does.
        return self.drain and not info.num_pending and not info.num_ack_pending

    def _note_backlog(self, info: Any) -> None:
        """Keep the consumer's backlog from a ConsumerInfo for the metrics."""
        self.summary.consumer_pending = info.num_pending or 0
        self.summary.consumer_ack_pending = info.num_ack_pending or 0
        self._next_backlog_look = time.monotonic() + self.consumer_check

    async def _recover(self, jetstream: JetStream, cause: Exception) -> None:
        """Create the stream (if it is gone) and the consumer again; the subscription fetches from it by name."""
        queue = self.queue
        try:
            await jetstream.ensure_stream()
            await jetstream.ensure_consumer()
        except (IdstitchError, nats.errors.Error, OSError) as error:
            _log.error(
                "JetStream consumer is missing and could not be recreated; trying again",
                extra={
                    "stream": queue.stream,
                    "consumer": queue.consumer,
                    "error": f"{type(error).__name__}: {error}",
                },
            )
            return
        _log.warning(
            "JetStream consumer was missing; recreated it and its stream if needed",
            extra={
                "stream": queue.stream,
                "consumer": queue.consumer,
                "error": f"{type(cause).__name__}: {cause}",
            },
        )

    async def _handle(self, jetstream: JetStream, fetched: list[Msg]) -> None:
        decoded: list[tuple[Msg, IngestBatch]] = []
        for msg in fetched:
            # No parking by delivery count alone here: a store outage naks every request again and
            # again, and all of them would be parked once it ended.
            try:
                decoded.append((msg, envelope.decode(msg.data)))
            except envelope.UndecodableMessage as error:
                # Parked, not dropped: a request from a newer server (a rolling upgrade) is readable
                # by a newer worker, and can be replayed to one.
                await self._park(jetstream, msg, str(error), _deliveries(msg))
        if decoded:
            async with _in_background(self._report_progress([msg for msg, _ in decoded])):
                groups = list(_groups(decoded, self.max_group_messages))
                for number, group in enumerate(groups):
                    if not await self._ingest(jetstream, group) and (
                        self.stop.is_set() or self._outage_tries
                    ):
                        # Stopping after a failure, or the store is down: the groups not tried yet would
                        # wait it out too. They come back, to this worker's successors or to itself.
                        await self._release([item for later in groups[number + 1 :] for item in later])
                        break
        # The acks (and terms) are in the client's buffer: send them now rather than at the next flush.
        with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
            await jetstream.client.flush(timeout=5)

    async def _ingest(self, jetstream: JetStream, group: list[tuple[Msg, IngestBatch]]) -> bool:
        """Resolve, commit and ack a group; whether it all committed (what failed is nak'ed or parked)."""
        loop = asyncio.get_running_loop()
        batches = [batch for _, batch in group]
        started = time.perf_counter()
        try:
            results = await loop.run_in_executor(self._executor, self.engine.ingest_group, batches)
        except (StoreUnavailable, StoreWriteFailed) as error:
            # The server is down, or the disk full: alone, each request would fail the same way (and be
            # logged with its traceback). The group goes back, and this worker waits before fetching again.
            await self._wait_out_outage(group, error)
            return False
        except Exception as error:
            if len(group) > 1 and self.stop.is_set():
                # Asked to stop: writing each alone would wait out a store outage once per request
                # (the engine retries each for minutes), so a SIGTERM would take `batch` times that.
                _log.error(
                    "ingest failed while stopping; the queue messages will be delivered again",
                    extra={"queue_messages": len(group), "error": f"{type(error).__name__}: {error}"},
                )
                await self._release(group)
                return False
            if len(group) > 1:
                # One request's failure must not fail the others: write each alone.
                committed = True
                for item in group:
                    committed = await self._ingest(jetstream, [item]) and committed
                return committed
            await self._failed(jetstream, group[0][0], error)
            return False
        self.summary.commits += 1
        self._outage_tries = 0
        if self.on_commit is not None:
            self.on_commit(batches, results, time.perf_counter() - started)
        for (msg, batch), result in zip(group, results, strict=True):
            self.summary.add(result)
            for outcome in result.rejected:
                _log.warning(
                    "message rejected",
                    extra={
                        **_where(msg),
                        "space": batch.space,
                        "message_id": outcome.message_id,
                        "reason": outcome.error,
                    },
                )
        # Committed: only now may JetStream forget them. An ack lost on the way means a redelivery,
        # which finds every messageId stored and changes nothing.
        for msg, _ in group:
            await _settle(msg.ack())
        self.summary.queue_messages += len(group)
        return True

    async def _wait_out_outage(
        self, group: list[tuple[Msg, IngestBatch]], error: StoreUnavailable | StoreWriteFailed
    ) -> None:
        """Give a group back for later, and fetch nothing until then: one log line per try, however long."""
        self._outage_tries += 1
        delay = self._delay(self._outage_tries)
        _log.error(
            "store unavailable; the queue messages will be delivered again",
            extra={
                "queue_messages": len(group),
                "retry_in_s": delay,
                "error": f"{type(error).__name__}: {error}",
            },
        )
        for msg, _ in group:
            await _settle(msg.nak(delay=delay))
        self.summary.retried += len(group)
        self._resume_at = time.monotonic() + delay

    async def _pause(self) -> None:
        """Wait until the next try after a store outage, or until asked to stop."""
        while not self.stop.is_set() and (left := self._resume_at - time.monotonic()) > 0:
            await asyncio.sleep(min(left, 0.1))

    async def _release(self, group: list[tuple[Msg, IngestBatch]]) -> None:
        """Give fetched requests back uncommitted (nak, no delay): another worker takes them at once."""
        for msg, _ in group:
            await _settle(msg.nak())
        self.summary.retried += len(group)

    async def _failed(self, jetstream: JetStream, msg: Msg, error: Exception) -> None:
        """A request that failed alone: parked if retrying cannot help or has not, else nak'ed to come back."""
        failure = f"{type(error).__name__}: {error}"
        deliveries = _deliveries(msg)
        if isinstance(error, _HOPELESS):
            await self._park(jetstream, msg, failure, deliveries)
            return
        if deliveries >= self.max_deliveries and not _store_unavailable(error):
            await self._park(
                jetstream, msg, f"failed on each of {deliveries} deliveries, last: {failure}", deliveries
            )
            return
        delay = self._delay(deliveries)
        _log.error(
            "ingest failed; the queue message will be delivered again",
            extra={**_where(msg), "retry_in_s": delay, "error": failure},
            exc_info=True,
        )
        await _settle(msg.nak(delay=delay))
        self.summary.retried += 1

    async def _park(self, jetstream: JetStream, msg: Msg, reason: str, deliveries: int) -> None:
        """Copy the message to the dead-letter stream, then terminate it; if the copy fails, nak it instead."""
        try:
            ack = await jetstream.park(msg, reason)
        except (IdstitchError, nats.errors.Error, OSError, ValueError) as error:
            # Not copied, so not terminated: it stays in the queue and is parked on a later delivery.
            delay = self._delay(deliveries)
            _log.error(
                "could not park a queue message; it will be delivered again",
                extra={
                    **_where(msg),
                    "reason": reason,
                    "retry_in_s": delay,
                    "error": f"{type(error).__name__}: {error}",
                },
            )
            await _settle(msg.nak(delay=delay))
            self.summary.retried += 1
            return
        _log.error(
            "queue message parked",
            extra={**_where(msg), "reason": reason, "dead_stream": ack.stream, "dead_sequence": ack.seq},
        )
        # Only now: until the copy was acknowledged, the original was the only one.
        await _settle(msg.term())
        self.summary.parked += 1

    async def _report_progress(self, messages: list[Msg]) -> None:
        """Tell JetStream, well within ack_wait, that messages still waiting for their commit are being worked on."""
        while True:
            await asyncio.sleep(self.queue.ack_wait / 3)
            for msg in messages:
                if not msg.is_acked:
                    await _settle(msg.in_progress())

    def _delay(self, deliveries: int) -> float:
        """Seconds before a failed message comes back: doubling with each delivery, up to a bound."""
        return float(min(self.retry_delay * 2 ** min(deliveries - 1, 16), self.max_retry_delay))


def run_worker(
    engine: Engine,
    queue: QueueConfig | str,
    *,
    batch: int = 20,
    max_group_messages: int = 5_000,
    fetch_timeout: float = 1.0,
    retry_delay: float = 1.0,
    max_retry_delay: float = 60.0,
    max_deliveries: int = 10,
    consumer_check: float = 5.0,
    drain: bool = False,
    stop: threading.Event | None = None,
    on_start: Callable[[str], None] | None = None,
    handle_signals: bool = False,
    summary: WorkerSummary | None = None,
    on_commit: CommitObserver | None = None,
) -> WorkerSummary:
    """Run one worker on its own event loop until it is stopped; what `idstitch worker` runs.

    It stops when `stop` is set, on SIGTERM / SIGINT with `handle_signals` (main thread only), or with
    `drain` once the queue is empty; in each case after committing and acknowledging what it fetched.
    """
    worker = QueueWorker(
        engine,
        queue,
        batch=batch,
        max_group_messages=max_group_messages,
        fetch_timeout=fetch_timeout,
        retry_delay=retry_delay,
        max_retry_delay=max_retry_delay,
        max_deliveries=max_deliveries,
        consumer_check=consumer_check,
        drain=drain,
        stop=stop,
        summary=summary,
        on_commit=on_commit,
    )
    return asyncio.run(worker.run(on_start=on_start, handle_signals=handle_signals))


def _groups(
    decoded: list[tuple[Msg, IngestBatch]], max_messages: int
) -> Iterator[list[tuple[Msg, IngestBatch]]]:
    """Consecutive runs of requests with at most `max_messages` messages (at least one request each)."""
    group: list[tuple[Msg, IngestBatch]] = []
    size = 0
    for item in decoded:
        count = len(item[1].items)
        if group and size + count > max_messages:
            yield group
            group, size = [], 0
        group.append(item)
        size += count
    if group:
        yield group


@contextlib.asynccontextmanager
async def _in_background(work: Coroutine[Any, Any, None]) -> AsyncIterator[None]:
    """Run `work` as a task while the block runs; cancel it after."""
    task = asyncio.create_task(work)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _deliveries(msg: Msg) -> int:
    """How many times JetStream has delivered this message, this time included."""
    try:
        return msg.metadata.num_delivered or 1
    except (nats.errors.Error, ValueError, IndexError):
        return 1


async def _settle(action: Awaitable[None]) -> None:
    """Send an ack, nak or progress report; a failure (connection lost) only means a later redelivery."""
    try:
        await action
    except (nats.errors.Error, OSError) as error:
        _log.warning("could not reach JetStream", extra={"error": f"{type(error).__name__}: {error}"})


def _where(msg: Msg) -> dict[str, Any]:
    """The stream sequence and delivery count of a JetStream message, for logs."""
    try:
        metadata = msg.metadata
    except (nats.errors.Error, ValueError, IndexError):
        return {"subject": msg.subject}
    return {
        "subject": msg.subject,
        "stream_sequence": metadata.sequence.stream,
        "deliveries": metadata.num_delivered,
    }
