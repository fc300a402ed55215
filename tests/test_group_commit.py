"""The group-commit writer: many callers, one writer thread, one durable commit per group."""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers import BASE, RECEIVED
from idstitch.config import Config
from idstitch.core.errors import ConfigError
from idstitch.core.messages import Message, parse_message
from idstitch.engine import Engine, IngestBatch, IngestResult
from idstitch.group_commit import GroupCommitWriter, WriterBusy, WriterClosed
from idstitch.storage.base import Store, StoreConflict
from idstitch.storage.urls import open_store

SPACE = "default"


def message(number: int, **fields: Any) -> Message:
    fields.setdefault("userId", f"u{number % 37}")
    fields.setdefault("anonymousId", f"a{number}")
    body = {
        "type": "track",
        "event": "Viewed",
        "messageId": f"m{number}",
        "timestamp": (BASE + timedelta(seconds=number)).isoformat(),
        **fields,
    }
    parsed = parse_message(body, received_at=RECEIVED)
    assert isinstance(parsed, Message)
    return parsed


def batches(count: int, size: int) -> list[list[Message]]:
    return [[message(b * size + i) for i in range(size)] for b in range(count)]


class GatedEngine(Engine):
    """An engine whose first group waits at a gate, so that callers pile up behind it."""

    def __init__(self, store: Store, config: Config) -> None:
        super().__init__(store, config)
        self.gate = threading.Event()
        self.entered = threading.Event()
        self.group_sizes: list[int] = []
        self.fail_message: str | None = None

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
        self.entered.set()
        self.gate.wait(timeout=30)
        if self.fail_message and any(
            isinstance(item, Message) and item.message_id == self.fail_message
            for batch in batches
            for item in batch.items
        ):
            raise OSError("disk full")  # a store failure, as a full disk would raise
        self.group_sizes.append(len(batches))
        return super().ingest_group(batches)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    opened = open_store(f"sqlite:///{tmp_path / 'graph.db'}")
    yield opened
    opened.close()


def test_concurrent_callers_share_commits_and_each_gets_its_own_outcomes(store: Store) -> None:
    engine = GatedEngine(store, Config.default())
    work = batches(21, 10)
    with GroupCommitWriter(engine) as writer:
        first = writer.submit(work[0], space=SPACE)
        assert engine.entered.wait(timeout=30)
        with ThreadPoolExecutor(max_workers=8) as pool:
            submitted = list(pool.map(lambda batch: writer.submit(batch, space=SPACE), work[1:]))
        engine.gate.set()
        results = [first.result(timeout=30), *(future.result(timeout=30) for future in submitted)]
    # The 20 batches that queued behind the first were written in one commit, not twenty.
    assert engine.group_sizes == [1, 20]
    assert writer.commits == 2 and writer.batches == 21
    for batch, result in zip(work, results, strict=True):
        assert [outcome.message_id for outcome in result.outcomes] == [item.message_id for item in batch]
        assert {outcome.status for outcome in result.outcomes} == {"resolved"}
    assert store.stats(SPACE).events == 210


def test_group_commit_gives_the_same_graph_as_one_batch_at_a_time(tmp_path: Path) -> None:
    work = batches(12, 25)
    grouped_store = open_store(f"sqlite:///{tmp_path / 'grouped.db'}")
    plain_store = open_store(f"sqlite:///{tmp_path / 'plain.db'}")
    try:
        grouped = GatedEngine(grouped_store, Config.default())
        with GroupCommitWriter(grouped) as writer:
            futures = [writer.submit(batch, space=SPACE) for batch in work]
            grouped.gate.set()
            grouped_results = [future.result(timeout=30) for future in futures]
        plain = Engine(plain_store, Config.default())
        plain_results = [plain.ingest(batch, space=SPACE) for batch in work]
        assert grouped_results == plain_results
        assert grouped_store.dump(SPACE) == plain_store.dump(SPACE)
        assert sum(grouped.group_sizes) == 12 and len(grouped.group_sizes) <= 2
    finally:
        grouped_store.close()
        plain_store.close()


def test_a_failing_batch_fails_alone_and_its_group_still_lands(store: Store) -> None:
    engine = GatedEngine(store, Config.default())
    engine.fail_message = "m25"
    work = batches(4, 10)  # m25 is in the third batch
    with GroupCommitWriter(engine) as writer:
        futures = [writer.submit(batch, space=SPACE) for batch in work]
        engine.gate.set()
        with pytest.raises(OSError, match="disk full"):
            futures[2].result(timeout=30)
        landed = [futures[index].result(timeout=30) for index in (0, 1, 3)]
    assert all(result.count("resolved") == 10 for result in landed)
    stored = set(store.iter_event_ids(SPACE))
    assert stored == {f"m{number}" for number in range(40)} - {f"m{number}" for number in range(20, 30)}
    assert writer.pending_messages == 0


def test_a_full_backlog_answers_busy_at_once_and_accepts_again_once_written(store: Store) -> None:
    engine = GatedEngine(store, Config.default())
    work = batches(4, 10)
    with GroupCommitWriter(engine, max_pending_messages=25) as writer:
        accepted: list[Future[IngestResult]] = [writer.submit(work[0], space=SPACE)]
        assert engine.entered.wait(timeout=30)
        accepted.append(writer.submit(work[1], space=SPACE))
        with pytest.raises(WriterBusy, match="bound 25"):
            writer.submit(work[2], space=SPACE)
        assert writer.pending_messages == 20
        engine.gate.set()
        for future in accepted:
            future.result(timeout=30)
        assert writer.ingest(work[2], space=SPACE).count("resolved") == 10
    assert store.stats(SPACE).events == 30


def test_an_empty_backlog_admits_a_batch_larger_than_the_bound(store: Store) -> None:
    with GroupCommitWriter(Engine(store, Config.default()), max_pending_messages=5) as writer:
        assert writer.ingest(batches(1, 12)[0], space=SPACE).count("resolved") == 12


def test_close_writes_everything_accepted_then_refuses_more(store: Store) -> None:
    engine = GatedEngine(store, Config.default())
    work = batches(5, 10)
    writer = GroupCommitWriter(engine)
    futures = [writer.submit(batch, space=SPACE) for batch in work]
    engine.gate.set()
    writer.close()
    assert all(future.done() and future.result().count("resolved") == 10 for future in futures)
    assert store.stats(SPACE).events == 50
    with pytest.raises(WriterClosed):
        writer.submit(work[0], space=SPACE)


def test_a_close_racing_a_submit_never_strands_the_batch(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while a batch is being submitted: the batch is refused or written, never left unanswered."""
    import idstitch.group_commit as group_commit

    writer = GroupCommitWriter(Engine(store, Config.default()))
    closing = threading.Thread(target=writer.close)

    def future_while_closing() -> Future[IngestResult]:
        # submit() makes its future somewhere around admission; close() runs as far as it can right then
        closing.start()
        closing.join(timeout=0.5)
        return Future()

    monkeypatch.setattr(group_commit, "Future", future_while_closing)
    try:
        future = writer.submit(batches(1, 3)[0], space=SPACE)
    except WriterClosed:
        future = None
    closing.join(timeout=30)
    assert not closing.is_alive()
    if future is not None:
        assert future.result(timeout=10).count("resolved") == 3
        assert store.stats(SPACE).events == 3


def test_an_unknown_space_fails_the_caller_not_the_group(store: Store) -> None:
    with GroupCommitWriter(Engine(store, Config.default())) as writer:
        with pytest.raises(ConfigError):
            writer.submit(batches(1, 1)[0], space="nowhere")
        assert writer.pending_messages == 0


def test_a_cancelled_caller_is_not_written_and_the_writer_keeps_going(store: Store) -> None:
    engine = GatedEngine(store, Config.default())
    work = batches(3, 10)
    with GroupCommitWriter(engine) as writer:
        first = writer.submit(work[0], space=SPACE)
        assert engine.entered.wait(timeout=30)
        cancelled = writer.submit(work[1], space=SPACE)
        assert cancelled.cancel()
        last = writer.submit(work[2], space=SPACE)
        engine.gate.set()
        assert first.result(timeout=30).count("resolved") == 10
        assert last.result(timeout=30).count("resolved") == 10
    assert cancelled.cancelled() and writer.pending_messages == 0
    assert store.stats(SPACE).events == 20


def test_a_store_locked_by_another_process_fails_the_group_at_once_not_batch_by_batch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process keeps a SQLite store's write lock (an `idstitch ingest --batch-size 100000`):
    the engine waits and retries up to its bound, then every caller of the group gets the conflict.
    Before: a 500-worthy OperationalError, and then each batch of the group waited alone, one after
    the other (N callers: N more waits while the writer thread was stuck)."""
    monkeypatch.setattr("idstitch.engine._CONFLICT_RETRY_SECONDS", 0.3)
    path = tmp_path / "locked.db"
    store = open_store(f"sqlite:///{path}")
    engine = GatedEngine(store, Config.default())
    store._writer.execute("PRAGMA busy_timeout = 50")  # type: ignore[attr-defined]
    other = sqlite3.connect(path, isolation_level=None)
    try:
        with GroupCommitWriter(engine) as writer:
            first = writer.submit([message(1)], space=SPACE)
            assert engine.entered.wait(timeout=30)
            other.execute("BEGIN IMMEDIATE")  # the other process takes the lock
            rest = [writer.submit([message(number)], space=SPACE) for number in (10, 11, 12)]
            engine.gate.set()
            for future in (first, *rest):
                with pytest.raises(StoreConflict, match="is locked: another process"):
                    future.result(timeout=30)
            assert writer.pending_messages == 0
            other.execute("COMMIT")
            assert writer.ingest([message(10)], space=SPACE).count("resolved") == 1
        assert engine.group_sizes == [1, 3, 1]  # the locked group was not tried again batch by batch
    finally:
        other.close()
        store.close()
