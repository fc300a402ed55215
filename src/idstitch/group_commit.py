"""One writer thread, many callers: concurrent batches are resolved in order and committed together.

A durable commit (fsync) costs milliseconds whatever it holds, so callers that arrive while one commit
is running share the next one. Each caller still gets its own `IngestResult`, and only after the commit
that made its messages durable. The backlog is bounded: past it `submit` raises `WriterBusy` at once
(the HTTP edge turns that into 429 + Retry-After) instead of queueing without limit.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from types import TracebackType

from idstitch.core.errors import IdstitchError, InvalidEvent
from idstitch.core.messages import Message
from idstitch.engine import Engine, IngestBatch, IngestResult
from idstitch.storage.base import StoreConflict, StoreWriteFailed

__all__ = ["GroupCommitWriter", "WriterBusy", "WriterClosed", "admit"]


class WriterBusy(IdstitchError):
    """The writer's backlog is full; the caller should retry later."""


class WriterClosed(IdstitchError):
    """The writer was closed; it accepts nothing more."""


def admit(pending: int, size: int, bound: int, *, closed: bool, waiting: str) -> int:
    """The backlog once `size` more messages are taken, or WriterClosed / WriterBusy (call under a lock).

    An empty backlog always admits one request, however large, so nothing valid can starve. `waiting`
    says what the backlog waits for, for the refusal's text.
    """
    if closed:
        raise WriterClosed("the writer is shut down")
    if pending and pending + size > bound:
        raise WriterBusy(f"{pending} messages are waiting {waiting} (bound {bound})")
    return pending + size


@dataclass(slots=True)
class _Request:
    batch: IngestBatch
    future: Future[IngestResult]
    size: int  # what it counts against the backlog bound: its messages, at least 1


_STOP = object()
# How long a failed commit keeps /healthz at 503 unless a commit lands first: a load balancer that took
# the server out sends it nothing more to commit, so the state must end without one.
_FAILURE_SECONDS = 10.0


class GroupCommitWriter:
    """Runs `Engine.ingest_group` on one thread for batches submitted from any number of threads."""

    def __init__(
        self,
        engine: Engine,
        *,
        max_pending_messages: int = 50_000,
        max_group_messages: int = 5_000,
    ) -> None:
        self.engine = engine
        self.max_pending_messages = max_pending_messages
        self.max_group_messages = max_group_messages
        self.commits = 0
        self.batches = 0
        self._queue: queue.SimpleQueue[_Request | object] = queue.SimpleQueue()
        self._pending = 0
        self._lock = threading.Lock()
        self._closed = False
        # The last commit that failed, when no commit has landed since: (monotonic time, why).
        self._failure: tuple[float, str] | None = None
        self._thread = threading.Thread(target=self._run, name="idstitch-writer", daemon=True)
        self._thread.start()

    @property
    def pending_messages(self) -> int:
        """Messages submitted and not yet committed."""
        return self._pending

    def unhealthy(self) -> str | None:
        """Why requests cannot be committed now (None when they can)."""
        if self._closed:
            return "shutting down"
        if not self._thread.is_alive():
            return "the writer thread has stopped"
        failure = self._failure
        if failure is not None and time.monotonic() - failure[0] < _FAILURE_SECONDS:
            # A full disk, say: every request would be answered 500 until it is fixed.
            return f"the last commit failed: {failure[1]}"
        return None

    def submit(
        self, items: Iterable[Message | InvalidEvent], *, space: str, source: str | None = None
    ) -> Future[IngestResult]:
        """Queue a batch; the future completes once its messages are committed (or fails with why)."""
        batch = IngestBatch(list(items), space, source)
        self.engine.config.space(space)  # unknown space: fail the caller now, not the whole group
        size = max(len(batch.items), 1)
        future: Future[IngestResult] = Future()
        with self._lock:
            self._pending = admit(
                self._pending, size, self.max_pending_messages, closed=self._closed, waiting="to be written"
            )
            # Queued under the lock: a close() in between would put its stop mark first, and this
            # accepted batch would never be written or answered.
            self._queue.put(_Request(batch, future, size))
        return future

    def ingest(
        self, items: Iterable[Message | InvalidEvent], *, space: str, source: str | None = None
    ) -> IngestResult:
        """Submit a batch and wait until it is committed."""
        return self.submit(items, space=space, source=source).result()

    def close(self) -> None:
        """Stop accepting, write everything already accepted, then stop the thread."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def __enter__(self) -> GroupCommitWriter:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

    # -- the writer thread -----------------------------------------------------------------------
    def _run(self) -> None:
        stopping = False
        while not stopping:
            first = self._queue.get()
            if first is _STOP:
                return
            assert isinstance(first, _Request)
            group = [first]
            size = len(first.batch.items)
            while size < self.max_group_messages:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    stopping = True  # finish this group first: everything accepted gets written
                    break
                assert isinstance(more, _Request)
                group.append(more)
                size += len(more.batch.items)
            self._write(group)

    def _write(self, group: list[_Request]) -> None:
        running = []
        for request in group:
            # A caller that cancelled (its client went away) is not written; the others can no longer cancel.
            if request.future.set_running_or_notify_cancel():
                running.append(request)
            else:
                with self._lock:
                    self._pending -= request.size
        if running:
            self._write_running(running)

    def _write_running(self, group: list[_Request]) -> None:
        try:
            results = self.engine.ingest_group([request.batch for request in group])
        except BaseException as error:
            if len(group) == 1 or isinstance(error, StoreConflict | StoreWriteFailed):
                # The kind of error only: /healthz is public, and the text may name the store's file.
                why = (
                    error.what
                    if isinstance(error, StoreWriteFailed)
                    else f"{type(error).__name__}; the server's log has the detail"
                )
                self._failure = (time.monotonic(), why)
                # A conflict the engine gave up on, or a full disk, is the store's (its write lock held
                # elsewhere), not one caller's: every batch alone would fail the same way, one after the other.
                for request in group:
                    self._finish(request, error=error)
                return
            # One caller's failure must not fail the others: write each batch alone.
            for request in group:
                self._write_running([request])
            return
        self._failure = None
        self.commits += 1
        self.batches += len(group)
        for request, result in zip(group, results, strict=True):
            self._finish(request, result=result)

    def _finish(
        self, request: _Request, *, result: IngestResult | None = None, error: BaseException | None = None
    ) -> None:
        with self._lock:
            self._pending -= request.size
        if error is not None:
            request.future.set_exception(error)
        else:
            assert result is not None
            request.future.set_result(result)
