"""The writer of `idstitch serve --queue`: requests go to JetStream, and are answered once they are on disk.

`JetStreamPublisher` has the interface the Tracking API uses from `GroupCommitWriter` (`submit` → a
future of the request's outcomes, the backlog figures, `close`), so the HTTP edge is the same in both
modes. Its NATS connection lives on an event loop of its own, in a thread of its own: uvicorn's loop
only hands requests over, as it does to the group-commit writer's thread.

Outcomes: an invalid message is rejected with the reason the engine would give (parse errors, and
"carries no identifier", checked here with the space's rules), so clients see exactly what they see
without a queue; every other message is `queued`, and its future resolves after JetStream's publish ack.
Whether it matched a profile, merged or was a duplicate is decided later, by a worker.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import secrets
import threading
from collections.abc import Coroutine, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, TypeVar

from idstitch.core.errors import IdstitchError, InvalidEvent
from idstitch.core.identifiers import extract_identifiers, require_identifier
from idstitch.core.messages import Message, parse_message
from idstitch.engine import Engine, IngestResult, MessageOutcome
from idstitch.group_commit import admit
from idstitch.queue import envelope
from idstitch.queue.jetstream import JetStream, QueueConfig, parse_queue_url

__all__ = ["JetStreamPublisher", "PublishSummary", "publish_messages", "publish_request"]


_T = TypeVar("_T")


class JetStreamPublisher:
    """Publishes each submitted request as a JetStream message from a thread of its own."""

    def __init__(
        self,
        engine: Engine,
        queue: QueueConfig | str,
        *,
        max_pending_messages: int = 50_000,
        publish_timeout: float = 10.0,
        connect_timeout: float = 10.0,
    ) -> None:
        self.engine = engine
        self.queue = parse_queue_url(queue) if isinstance(queue, str) else queue
        self.max_pending_messages = max_pending_messages
        self.publish_timeout = publish_timeout
        self.commits = 0  # JetStream messages acknowledged by the server (persisted)
        self.batches = 0  # requests whose messages are all persisted
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        self._in_flight: set[Future[IngestResult]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="idstitch-publisher", daemon=True)
        self._thread.start()
        try:
            self._jetstream = self._call(
                JetStream.connect(self.queue, name="idstitch serve", timeout=connect_timeout)
            )
        except BaseException:
            self._stop_loop()
            raise

    @property
    def pending_messages(self) -> int:
        """Messages submitted and not yet acknowledged by JetStream."""
        return self._pending

    def unhealthy(self) -> str | None:
        """Why requests cannot be published now (None when they can)."""
        if self._closed:
            return "shutting down"
        if not self._jetstream.client.is_connected:
            return f"not connected to NATS at {self.queue.shown_servers}; reconnecting"
        return None

    def submit(
        self, items: Iterable[Message | InvalidEvent], *, space: str, source: str | None = None
    ) -> Future[IngestResult]:
        """Queue a request; the future completes once JetStream has persisted its valid messages."""
        items = list(items)
        self.engine.config.space(space)  # unknown space: fail the caller now
        received_at = datetime.now(UTC)
        size = max(sum(1 for item in items if isinstance(item, Message)), 1)
        with self._lock:
            self._pending = admit(
                self._pending, size, self.max_pending_messages, closed=self._closed, waiting="for JetStream"
            )
            # Checking and encoding happen on the publisher's thread, not on the caller's event loop.
            future = asyncio.run_coroutine_threadsafe(
                self._publish(items, space, source, received_at, size), self._loop
            )
            self._in_flight.add(future)
        future.add_done_callback(self._done)
        return future

    def ingest(
        self, items: Iterable[Message | InvalidEvent], *, space: str, source: str | None = None
    ) -> IngestResult:
        """Submit a request and wait until JetStream has persisted it."""
        return self.submit(items, space=space, source=source).result()

    def close(self) -> None:
        """Stop accepting, wait for the publishes under way, then close the connection and the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._in_flight)
        # Each ends by itself: acknowledged, or failed once the publish timeout has passed.
        concurrent.futures.wait(waiting)
        try:
            self._call(self._jetstream.close())
        finally:
            self._stop_loop()

    def __enter__(self) -> JetStreamPublisher:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- on the publisher's loop ------------------------------------------------------------------
    async def _publish(
        self,
        items: list[Message | InvalidEvent],
        space: str,
        source: str | None,
        received_at: datetime,
        size: int,
    ) -> IngestResult:
        try:
            outcomes, queued = self._classify(items, space, source)
            if not queued:
                return IngestResult(outcomes)  # nothing to persist
            persisted = await publish_request(
                self._jetstream, space, source, queued, received_at=received_at, timeout=self.publish_timeout
            )
        finally:
            with self._lock:
                self._pending -= size
        with self._lock:
            self.commits += persisted
            self.batches += 1
        return IngestResult(outcomes)

    def _classify(
        self, items: list[Message | InvalidEvent], space: str, source: str | None
    ) -> tuple[list[MessageOutcome], list[Message]]:
        """Each item's outcome (rejected with the engine's reason, or queued) and the messages to publish."""
        rules = self.engine.config.space(space).rules
        policy = rules.source(source)
        outcomes: list[MessageOutcome] = []
        queued: list[Message] = []
        for index, item in enumerate(items):
            if isinstance(item, InvalidEvent):
                outcomes.append(MessageOutcome(index, None, "rejected", error=str(item)))
                continue
            # The engine's first check. Custom types it learns later only change how a value is ranked,
            # never whether a message carries one, so the configured rules decide it here as there.
            try:
                extraction = extract_identifiers(item, rules, policy)
            except IdstitchError:
                # Whether that is a rejection or a retry of a stored message only the store can say.
                extraction = None
            if extraction is not None:
                try:
                    require_identifier(extraction)
                except InvalidEvent as error:
                    outcomes.append(MessageOutcome(index, item.message_id, "rejected", error=str(error)))
                    continue
            outcomes.append(MessageOutcome(index, item.message_id, "queued"))
            queued.append(item)
        return outcomes, queued

    def _done(self, future: Future[IngestResult]) -> None:
        with self._lock:
            self._in_flight.discard(future)

    def _call(self, coroutine: Coroutine[Any, Any, _T]) -> _T:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()


async def publish_request(
    jetstream: JetStream,
    space: str,
    source: str | None,
    messages: Sequence[Message],
    *,
    received_at: datetime,
    timeout: float,
) -> int:
    """Publish one request's messages (one JetStream message, or a few if large); how many were persisted."""
    chunks = envelope.encode(space, source, received_at, messages, max_bytes=jetstream.max_message_bytes)
    request_id = secrets.token_hex(12)
    subject = jetstream.queue.subject_for(space)
    await asyncio.gather(
        *(
            jetstream.publish(subject, chunk, message_id=f"{request_id}-{number}", timeout=timeout)
            for number, chunk in enumerate(chunks)
        )
    )
    return len(chunks)


@dataclass(slots=True)
class PublishSummary:
    """What `publish_messages` did: messages published, JetStream messages written, rejections by index."""

    messages: int = 0
    queue_messages: int = 0
    rejected: list[tuple[int, str]] = field(default_factory=list)


def publish_messages(
    url: str | QueueConfig,
    space: str,
    source: str | None,
    raw_messages: Iterable[object],
    *,
    batch_size: int = 500,
    received_at: datetime | None = None,
    concurrency: int = 16,
    timeout: float = 30.0,
) -> PublishSummary:
    """Publish raw Segment messages as a client of the Tracking API would, `batch_size` per JetStream message.

    No store and no config are needed (benchmarks and tests load the queue with it): a message that
    does not parse is left out and listed in `rejected`; the rules' checks happen in the worker.
    """
    queue = parse_queue_url(url) if isinstance(url, str) else url
    received = received_at or datetime.now(UTC)
    summary = PublishSummary()

    async def run() -> None:
        jetstream = await JetStream.connect(queue, name="idstitch publish")
        # At most `concurrency` requests in flight: the input is read as they complete, never all at once.
        slots = asyncio.Semaphore(concurrency)
        running: set[asyncio.Task[None]] = set()

        async def one(batch: list[Message]) -> None:
            try:
                persisted = await publish_request(
                    jetstream, space, source, batch, received_at=received, timeout=timeout
                )
            finally:
                slots.release()
            summary.queue_messages += persisted

        async def send(batch: list[Message]) -> None:
            await slots.acquire()
            task = asyncio.create_task(one(batch))
            running.add(task)
            task.add_done_callback(running.discard)

        try:
            batch: list[Message] = []
            for index, raw in enumerate(raw_messages):
                try:
                    batch.append(parse_message(raw, received_at=received))
                except InvalidEvent as error:
                    summary.rejected.append((index, str(error)))
                    continue
                summary.messages += 1
                if len(batch) >= batch_size:
                    await send(batch)
                    batch = []
            if batch:
                await send(batch)
            await asyncio.gather(*running)
        finally:
            await jetstream.close()

    asyncio.run(run())
    return summary
