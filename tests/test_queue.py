"""Queue mode (NATS JetStream): `serve --queue` publishes, `idstitch worker` resolves, commits, then acks.

Every test runs against the real NATS server (IDSTITCH_TEST_NATS, default nats://127.0.0.1:4222) on a
stream and subject prefix of its own, random per run, deleted afterwards. Without a reachable NATS
with JetStream the tests fail with a message saying so: never a skip.

- in process: the publisher answers like the direct writer (same rejections, same HTTP answers), the
  worker turns what was published into exactly the graph a direct ingest gives, a group that fails is
  nak'ed and comes back, one that committed but was not acked is delivered again and doubles nothing,
  an undecodable JetStream message, a request that cannot land (unknown space) or one that keeps
  failing is parked in the dead-letter stream, bytes intact, and can be replayed, and
  a stream deleted under a running publisher and worker is recreated by them;
- with real processes: `idstitch serve --queue` and `idstitch worker` on one SQLite file, a batch
  POSTed over HTTP, then a worker killed with SIGKILL mid-stream and another one finishing the job:
  every message stored exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import httpx
import nats
import nats.js.errors
import psycopg
import pytest
from nats.js.api import DiscardPolicy, RawStreamMsg, RetentionPolicy, StorageType

from conftest import NATS_URL, RUN
from helpers import RECEIVED, config_from_toml
from idstitch.config import Config
from idstitch.core.errors import ConfigError, InvalidEvent
from idstitch.core.identifiers import NO_IDENTIFIER, Identifier
from idstitch.core.messages import Message, parse_batch, parse_message
from idstitch.engine import Engine, IngestBatch, IngestResult
from idstitch.group_commit import GroupCommitWriter
from idstitch.http.metrics import Metrics
from idstitch.http.tracking import TrackingAPI
from idstitch.queue import envelope
from idstitch.queue.jetstream import QueueConfig, QueueUnavailable, parse_queue_url
from idstitch.queue.parked import ParkedRequest, parked_requests, replay_parked
from idstitch.queue.publisher import JetStreamPublisher, publish_messages
from idstitch.queue.worker import WorkerSummary, run_worker
from idstitch.storage.base import Store, StoreConflict, StoreFull, StoreUnavailable
from idstitch.storage.urls import open_store
from live_server import ADMIN_TOKEN, PROFILE_TOKEN, WRITE_KEY, Server

CONFIG = """
[spaces.app.sources.web]
write_key = "wk_test"

[spaces.app.sources.crm]
write_key = "wk_crm"
merge = false

[spaces.other.sources.web]
write_key = "wk_other"
"""
SPACE = "app"


# -- the NATS server and a stream per test ---------------------------------------------------------


@pytest.fixture
def queue_url(queue_url: str) -> Iterator[str]:
    """conftest's queue URL; the dead-letter stream a worker may have created is deleted afterwards too."""
    yield queue_url
    delete_stream(queue_url, parse_queue_url(queue_url).dead_stream)


def delete_stream(url: str, stream: str | None = None) -> None:
    """Delete a stream (the queue's own by default), as an operator or a NATS restart without storage does."""
    queue = parse_queue_url(url)

    async def delete() -> None:
        client = await nats.connect(list(queue.servers), allow_reconnect=False, connect_timeout=3)
        try:
            await client.jetstream().delete_stream(stream or queue.stream)
        except nats.js.errors.NotFoundError:
            pass  # never created
        finally:
            await client.close()

    asyncio.run(delete())


def stream_contents(url: str, stream: str) -> list[RawStreamMsg]:
    """Every message a stream holds, oldest first: subject, headers and bytes as stored."""
    queue = parse_queue_url(url)

    async def read() -> list[RawStreamMsg]:
        client = await nats.connect(list(queue.servers), allow_reconnect=False, connect_timeout=3)
        found: list[RawStreamMsg] = []
        try:
            js = client.jetstream()
            sequence = 1
            while True:
                try:
                    raw = await js.get_msg(stream, sequence, subject=">", next=True)
                except nats.js.errors.NotFoundError:
                    return found
                found.append(raw)
                sequence = (raw.seq or sequence) + 1
        finally:
            await client.close()

    return asyncio.run(read())


@dataclass(frozen=True)
class QueueState:
    """What the stream holds and where the workers' consumer stands."""

    stream_messages: int
    pending: int  # not yet delivered
    ack_pending: int  # delivered and neither acked nor terminated (or nak'ed, due again)
    redelivered: int


def queue_state(url: str) -> QueueState:
    """The stream's and the consumer's figures now."""
    queue = parse_queue_url(url)

    async def read() -> QueueState:
        client = await nats.connect(list(queue.servers), allow_reconnect=False, connect_timeout=3)
        try:
            js = client.jetstream()
            stream = await js.stream_info(queue.stream)
            try:
                consumer = await js.consumer_info(queue.stream, queue.consumer)
            except nats.js.errors.NotFoundError:  # no worker yet: nothing delivered
                return QueueState(stream.state.messages, stream.state.messages, 0, 0)
            return QueueState(
                stream.state.messages,
                consumer.num_pending,
                consumer.num_ack_pending,
                consumer.num_redelivered,
            )
        finally:
            await client.close()

    return asyncio.run(read())


def publish_raw(url: str, space: str, *payloads: bytes) -> None:
    """Publish bytes as they are to a space's subject, as a broken or foreign producer would."""
    queue = parse_queue_url(url)

    async def send() -> None:
        client = await nats.connect(list(queue.servers), allow_reconnect=False, connect_timeout=3)
        try:
            js = client.jetstream()
            for payload in payloads:
                await js.publish(queue.subject_for(space), payload, stream=queue.stream)
        finally:
            await client.close()

    asyncio.run(send())


# -- messages ------------------------------------------------------------------------------------


def story() -> dict[str, Any]:
    """A batch request with a shared context: merges, an account, blocked ids, and invalid messages."""
    external = base64.b64encode(b"crm-42").decode()
    return {
        "context": {"library": {"name": "analytics.js", "version": "4.1"}},
        "batch": [
            {
                "type": "page",
                "anonymousId": "a1",
                "name": "Home",
                "messageId": "s1",
                "timestamp": "2026-03-02T09:00:00Z",
            },
            {
                "type": "identify",
                "userId": "u1",
                "anonymousId": "a1",
                "messageId": "s2",
                "traits": {"email": "Jane@Example.com", "plan": "trial"},
                "timestamp": "2026-03-02T09:01:00Z",
            },
            {
                "type": "track",
                "event": "Bought",
                "messageId": "s3",
                "timestamp": "2026-03-02T09:02:00Z",
            },  # no identifier: rejected
            {"type": "track", "userId": "u1", "messageId": "s4"},  # no event: rejected
            {
                "type": "group",
                "userId": "u1",
                "groupId": "acme",
                "traits": {"name": "Acme"},
                "messageId": "s5",
                "timestamp": "2026-03-02T09:03:00Z",
            },
            {
                "type": "page",
                "anonymousId": "null",
                "messageId": "s6",
                "timestamp": "2026-03-02T09:04:00Z",
            },  # only a blocked id: stored, unresolved
            {"type": "page", "anonymousId": "a2", "messageId": "s6b", "timestamp": "2026-03-02T09:04:30Z"},
            {
                "type": "identify",
                "anonymousId": "a2",
                "traits": {"email": "jane@example.com"},
                "messageId": "s7",
                "timestamp": "2026-03-02T09:05:00Z",
            },  # merges a2's profile into u1's
            {"type": "track", "event": "Viewed", "anonymousId": "a3"},  # id generated from receivedAt
            {
                "type": "identify",
                "userId": "u9",
                "messageId": "s9",
                "timestamp": "2026-03-02T09:06:00Z",
                "context": {
                    "externalIds": [
                        {"id": external, "type": "crm_id", "collection": "users", "encoding": "base64"}
                    ]
                },
            },
            {
                "type": "alias",
                "userId": "u9",
                "previousId": "a4",
                "messageId": "s10",
                "timestamp": "2026-03-02T09:07:00Z",
            },
        ],
    }


def parsed_story() -> list[Message | InvalidEvent]:
    """The story as the Tracking API parses it."""
    items, _ = parse_batch(story(), received_at=RECEIVED)
    return items


def people(count: int, per_person: int = 5, prefix: str = "p") -> list[dict[str, Any]]:
    """`count` unrelated people, each with `per_person` messages: their graph does not depend on order."""
    messages = []
    for person in range(count):
        for step in range(per_person):
            kind = "identify" if step == 0 else "track"
            message: dict[str, Any] = {
                "type": kind,
                "userId": f"{prefix}{person}",
                "anonymousId": f"{prefix}-anon-{person}",
                "messageId": f"{prefix}-{person}-{step}",
                "timestamp": f"2026-03-02T10:{step:02d}:00Z",
            }
            if kind == "track":
                message["event"] = f"Step {step}"
            else:
                message["traits"] = {"email": f"{prefix}{person}@example.com"}
            messages.append(message)
    return messages


# -- stores --------------------------------------------------------------------------------------


@contextmanager
def engine_at(
    path: Path, config: Config | None = None, engine_class: type[Engine] = Engine
) -> Iterator[Engine]:
    """An engine of CONFIG's spaces over a SQLite file, closed afterwards."""
    store = open_store(f"sqlite:///{path}")
    try:
        yield engine_class(store, config or config_from_toml(CONFIG))
    finally:
        store.close()


def stored_events(store: Store, space: str) -> dict[str, tuple[bytes, datetime, str | None, str | None]]:
    """message_id → (payload, receivedAt, source, profile) of every stored event of a space."""
    found = {}
    roots = [row[0] for row in store.dump(space)["profiles"] if row[2] == ""]
    for root in roots:
        for event in store.events(space, root, limit=100_000):
            found[event.message_id] = (event.payload, event.received_at, event.source, event.profile_id)
    for event in store.unresolved(space, limit=100_000):
        found[event.message_id] = (event.payload, event.received_at, event.source, None)
    return found


def drain(engine: Engine, url: str, **options: Any) -> WorkerSummary:
    """Run a worker in this process until the queue is empty."""
    return run_worker(engine, url, drain=True, fetch_timeout=0.5, **options)


class Watch(logging.Handler):
    """Keeps a logger's records; a test waits on it for a line instead of sleeping."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.records.append(record)
            self.changed.notify_all()

    def named(self, message: str) -> list[logging.LogRecord]:
        """The records with that message."""
        with self.changed:
            return [record for record in self.records if record.getMessage() == message]

    def wait_for(self, message: str, count: int = 1, seconds: float = 60.0) -> None:
        """Until `count` records with that message have come; fail after `seconds`."""
        with self.changed:
            arrived = self.changed.wait_for(lambda: len(self.named(message)) >= count, seconds)
        assert arrived, f"no {count} log lines {message!r} within {seconds:g} s"


@contextmanager
def watched(logger: str = "idstitch.queue") -> Iterator[Watch]:
    """A Watch on a logger meanwhile."""
    watch = Watch()
    target = logging.getLogger(logger)
    previous = target.level
    target.addHandler(watch)
    target.setLevel(logging.DEBUG)
    try:
        yield watch
    finally:
        target.removeHandler(watch)
        target.setLevel(previous)


@contextmanager
def captured(logger: str = "idstitch.queue") -> Iterator[list[logging.LogRecord]]:
    """The records a logger emits meanwhile (whatever handlers other tests configured)."""
    with watched(logger) as watch:
        yield watch.records


# -- the queue URL and the message format -------------------------------------------------------------


def test_queue_url_defaults_parameters_and_errors() -> None:
    assert parse_queue_url("nats://127.0.0.1:4222") == QueueConfig(("nats://127.0.0.1:4222",))
    queue = parse_queue_url(
        "nats://me:secret@10.0.0.1:4222,nats://10.0.0.2:4222?stream=S1&subject=acme.in&consumer=c-1&ack_wait=30"
    )
    assert (queue.stream, queue.subject, queue.consumer, queue.ack_wait) == ("S1", "acme.in", "c-1", 30.0)
    assert queue.servers == ("nats://me:secret@10.0.0.1:4222", "nats://10.0.0.2:4222")
    assert queue.shown_servers == "nats://10.0.0.1:4222,nats://10.0.0.2:4222"  # no password in logs
    defaults = parse_queue_url("nats://localhost:4222")
    assert (defaults.stream, defaults.consumer, defaults.ack_wait) == ("IDSTITCH", "idstitch-workers", 60.0)
    assert defaults.subject_for("default") == "idstitch.ingest.default"
    assert defaults.filter_subject == "idstitch.ingest.>"
    # A space name is one subject token whatever it holds, and two names never share one.
    assert defaults.subject_for("a.b") == "idstitch.ingest.a%2Eb"
    assert defaults.subject_for("a*>") == "idstitch.ingest.a%2A%3E"
    assert defaults.subject_for("é x") == "idstitch.ingest.%C3%A9%20x"
    assert defaults.subject_for("a%2Eb") == "idstitch.ingest.a%252Eb"
    assert defaults.subject_for("") == "idstitch.ingest.%"
    for bad, needle in [
        ("http://localhost:4222", "expected nats://"),
        ("nats://localhost:4222?strem=X", "unknown parameter 'strem'"),
        ("nats://localhost:4222?stream=a.b", "stream 'a.b'"),
        ("nats://localhost:4222?subject=a..b", "subject"),
        ("nats://localhost:4222?subject=a.*", "subject"),
        ("nats://localhost:4222?ack_wait=0", "ack_wait"),
        ("nats://localhost:4222?stream=A&stream=B", "give stream once"),
        ("nats://localhost:x", "bad port"),
    ]:
        with pytest.raises(ConfigError) as raised:
            parse_queue_url(bad)
        assert needle in str(raised.value), (bad, str(raised.value))


def test_the_format_gives_back_the_very_same_messages_split_when_large() -> None:
    items = parsed_story()
    messages = [item for item in items if isinstance(item, Message)]
    received = datetime(2027, 6, 1, 12, 0, 0, 123000, tzinfo=UTC)
    (whole,) = envelope.encode(SPACE, "web", received, messages, max_bytes=1 << 20)
    decoded = envelope.decode(whole)
    assert (decoded.space, decoded.source) == (SPACE, "web")
    # Equal Messages, generated ids and the shared batch context included: a redelivery repeats them.
    assert decoded.items == messages
    document = json.loads(whole)
    assert document["v"] == 1 and document["received_at"] == "2027-06-01T12:00:00.123000Z"
    assert document["messages"][0]["context"]["library"]["name"] == "analytics.js"

    chunks = envelope.encode(SPACE, None, received, messages, max_bytes=len(whole) // 3)
    assert len(chunks) > 2 and all(len(chunk) <= len(whole) // 3 for chunk in chunks)
    again = [item for chunk in chunks for item in envelope.decode(chunk).items]
    assert again == messages  # in order, none lost, none twice
    with pytest.raises(envelope.RequestTooLarge, match="over the 100 bytes a JetStream message may hold"):
        envelope.encode(SPACE, None, received, messages, max_bytes=100)

    for garbage, reason in [
        (b"not json", "not a queued request"),
        (b'{"v": 1, "space": "app"}', "not a queued request"),
        (
            json.dumps(
                {
                    "v": 2,
                    "space": "app",
                    "source": None,
                    "received_at": "2027-06-01T00:00:00Z",
                    "messages": [],
                }
            ).encode(),
            "format version 2",
        ),
    ]:
        with pytest.raises(envelope.UndecodableMessage, match=reason):
            envelope.decode(garbage)
    # A payload that no longer parses is rejected on its own; the others still land.
    broken = json.dumps(
        {
            "v": 1,
            "space": "app",
            "source": None,
            "received_at": "2027-06-01T00:00:00Z",
            "messages": [{"type": "track", "userId": "u1"}, messages[0].payload],
        }
    ).encode()
    first, second = envelope.decode(broken).items
    assert isinstance(first, InvalidEvent) and str(first) == "event: required for track"
    assert second == messages[0]


def test_bad_queue_urls_are_one_line_and_exit_2(tmp_path: Path) -> None:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    store = f"sqlite:///{tmp_path / 'idstitch.db'}"
    for command, needle in [
        (["worker", "--queue", "nats://127.0.0.1:4222?bogus=1"], "unknown parameter 'bogus'"),
        (["serve", "--port", "0", "--queue", "http://127.0.0.1:4222"], "expected nats://host:port"),
        (["worker"], "Missing option '--queue'"),
    ]:
        done = subprocess.run(
            [sys.executable, "-m", "idstitch", *command, "--store", store],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2, (command, done.stdout, done.stderr)
        assert needle in done.stderr, (command, done.stderr)
    assert not (tmp_path / "idstitch.db").exists()  # refused before the store was touched


# -- publisher and worker in this process -----------------------------------------------------------


def test_published_requests_resolve_into_exactly_the_graph_of_a_direct_ingest(
    tmp_path: Path, queue_url: str
) -> None:
    items = parsed_story()
    with engine_at(tmp_path / "direct.db") as direct:
        expected = direct.ingest(items, space=SPACE, source="web")
        with engine_at(tmp_path / "queued.db") as engine:
            with JetStreamPublisher(engine, queue_url) as publisher:
                result = publisher.ingest(items, space=SPACE, source="web")
                assert (publisher.commits, publisher.batches, publisher.pending_messages) == (1, 1, 0)
            # Rejections exactly as the engine gives them; everything else waits in the queue.
            assert [(o.index, o.message_id, o.error) for o in result.rejected] == [
                (o.index, o.message_id, o.error) for o in expected.rejected
            ]
            assert [o.error for o in result.rejected] == [NO_IDENTIFIER, "event: required for track"]
            assert [o.status for o in result.outcomes].count("queued") == len(items) - 2
            assert stored_events(engine.store, SPACE) == {}  # serve wrote nothing to the store

            with captured() as logs:
                summary = drain(engine, queue_url)
            assert [record.getMessage() for record in logs if record.levelno >= logging.WARNING] == []
            assert (summary.queue_messages, summary.commits, summary.messages) == (1, 1, len(items) - 2)
            assert (summary.accepted, summary.unresolved, summary.rejected, summary.duplicates) == (
                expected.count("resolved"),
                expected.count("unresolved"),
                0,
                0,
            )
            assert summary.merges == sum(len(o.merged) for o in expected.outcomes) == 1
            assert engine.store.dump(SPACE) == direct.store.dump(SPACE)
            assert stored_events(engine.store, SPACE) == stored_events(direct.store, SPACE)
    # Work-queue retention: what the worker acknowledged is gone from the stream.
    assert queue_state(queue_url) == QueueState(0, 0, 0, 0)


def counter() -> Callable[[], str]:
    """Delivery tokens 0, 1, 2, ...: the same run for two apps given the same requests."""
    numbers = itertools.count()
    return lambda: str(next(numbers))


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_the_tracking_api_answers_in_queue_mode_as_it_does_without(
    tmp_path: Path, queue_url: str
) -> None:
    requests: list[tuple[str, str, dict[str, Any]]] = [
        ("/v1/batch", "wk_test", story()),
        ("/v1/track", "wk_test", {"event": "X", "messageId": "t1"}),  # no identifier
        ("/v1/track", "wk_test", {"userId": "u1"}),  # no event
        (
            "/v1/identify",
            "wk_crm",
            {"userId": "u5", "traits": {"email": "u5@example.com"}, "messageId": "t2"},
        ),
        ("/v1/page", "wk_other", {"anonymousId": "o1", "messageId": "t3"}),
        ("/v1/batch", "wk_test", {"batch": [{"type": "track", "event": "Y"}]}),  # nothing valid
        ("/v1/track", "wk_nobody", {"userId": "u1", "event": "X"}),
    ]

    async def answers(app: TrackingAPI) -> list[tuple[int, Any]]:
        transport = httpx.ASGITransport(app=app)
        out = []
        async with httpx.AsyncClient(transport=transport, base_url="http://idstitch") as client:
            for path, key, body in requests:
                auth = "Basic " + base64.b64encode(f"{key}:".encode()).decode()
                response = await client.post(path, json=body, headers={"Authorization": auth})
                out.append((response.status_code, response.json()))
        return out

    with engine_at(tmp_path / "direct.db") as direct, engine_at(tmp_path / "queued.db") as engine:
        writer = GroupCommitWriter(direct)
        publisher = JetStreamPublisher(engine, queue_url)
        try:
            # One clock and one run of delivery tokens for both: messages without a timestamp or
            # messageId take theirs from them.
            queued_app = TrackingAPI(publisher, clock=lambda: RECEIVED, delivery_tokens=counter())
            direct_app = TrackingAPI(writer, clock=lambda: RECEIVED, delivery_tokens=counter())
            assert await answers(queued_app) == await answers(direct_app)
            metrics = queued_app.metrics.exposition().decode()
        finally:
            writer.close()
            publisher.close()
        assert 'idstitch_messages_queued_total{space="app"} 10.0' in metrics
        assert 'idstitch_messages_queued_total{space="other"} 1.0' in metrics
        assert 'idstitch_messages_rejected_total{space="app"} 5.0' in metrics
        assert "idstitch_messages_accepted_total{" not in metrics  # serve resolved nothing itself
        summary = await asyncio.to_thread(drain, engine, queue_url)
        assert summary.queue_messages == 3  # the batch, u5's identify, o1's page
        for space in (SPACE, "other"):
            assert engine.store.dump(space) == direct.store.dump(space)
        # The source travelled with the request: crm's message is stored as crm's.
        assert stored_events(engine.store, SPACE)["t2"][2] == "crm"


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_a_stream_that_refuses_or_a_missing_nats_is_a_429_or_a_clear_error(
    tmp_path: Path, queue_url: str
) -> None:
    queue = parse_queue_url(queue_url)
    # An operator's stream, limited to one waiting message: used as it is, since it holds our subjects.
    client = await nats.connect(list(queue.servers), allow_reconnect=False, connect_timeout=3)
    try:
        await client.jetstream().add_stream(
            name=queue.stream, subjects=[queue.filter_subject], max_msgs=1, discard=DiscardPolicy.NEW
        )
    finally:
        await client.close()
    with engine_at(tmp_path / "queued.db") as engine:
        publisher = JetStreamPublisher(engine, queue_url)
        try:
            transport = httpx.ASGITransport(app=TrackingAPI(publisher))
            auth = {"Authorization": "Basic " + base64.b64encode(b"wk_test:").decode()}
            async with httpx.AsyncClient(transport=transport, base_url="http://idstitch") as api:
                first = await api.post("/v1/identify", json={"userId": "u1"}, headers=auth)
                second = await api.post("/v1/identify", json={"userId": "u2"}, headers=auth)
        finally:
            publisher.close()
        assert (first.status_code, first.json()) == (200, {"success": True})
        assert second.status_code == 429 and second.headers["retry-after"] == "1"
        assert second.json()["code"] == "overloaded"
        assert second.json()["message"] == (
            f"overloaded: JetStream stream {queue.stream} refused the message: maximum messages exceeded; "
            "retry later"
        )
        assert publisher.pending_messages == 0  # a refused request does not stay counted
        started = time.monotonic()
        with pytest.raises(
            QueueUnavailable, match=r"cannot connect to NATS at nats://127.0.0.1:1 within 1 s"
        ):
            JetStreamPublisher(engine, "nats://127.0.0.1:1", connect_timeout=1)
        assert time.monotonic() - started < 5


def test_a_stream_with_a_smaller_max_msg_size_gets_a_request_in_pieces(
    tmp_path: Path, queue_url: str
) -> None:
    queue = parse_queue_url(queue_url)

    async def make() -> None:
        # An operator's stream whose messages may be at most 4 KB: a 14 KB request must still land.
        client = await nats.connect(list(queue.servers), allow_reconnect=False, connect_timeout=3)
        try:
            await client.jetstream().add_stream(
                name=queue.stream, subjects=[queue.filter_subject], max_msg_size=4096
            )
        finally:
            await client.close()

    asyncio.run(make())
    raw = [
        {
            "type": "track",
            "event": "E",
            "userId": f"u{n}",
            "messageId": f"m{n}",
            "properties": {"x": "y" * 500},
        }
        for n in range(24)
    ]
    items = [parse_message(message, received_at=RECEIVED) for message in raw]
    with engine_at(tmp_path / "queued.db") as engine:
        with JetStreamPublisher(engine, queue_url) as publisher:
            result = publisher.ingest(items, space=SPACE, source="web")
            assert publisher.commits > 1  # in pieces, each under the stream's limit
        assert [o.status for o in result.outcomes] == ["queued"] * 24
        summary = drain(engine, queue_url)
        assert (summary.accepted, summary.queue_messages) == (24, publisher.commits)


class PrivateNats:
    """A nats-server of this test's own (JetStream on disk), to stop and start again at will."""

    def __init__(self, directory: Path, *, jetstream: bool = True) -> None:
        from live_server import free_port

        self.port = free_port()
        self.directory = directory
        self.jetstream = jetstream
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}?stream=OUTAGE&subject=outage"

    def start(self) -> None:
        command = ["/usr/sbin/nats-server", "-a", "127.0.0.1", "-p", str(self.port)]
        if self.jetstream:
            command += ["-js", "-sd", str(self.directory)]
        self.process = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("nats-server did not start")

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)


@pytest.mark.anyio
@pytest.mark.parametrize("anyio_backend", ["asyncio"])
async def test_while_nats_is_down_healthz_is_503_and_a_refused_request_is_never_published_later(
    tmp_path: Path,
) -> None:
    nats_server = PrivateNats(tmp_path / "nats")
    nats_server.start()
    try:
        with engine_at(tmp_path / "queued.db") as engine:
            publisher = JetStreamPublisher(engine, nats_server.url, publish_timeout=1.5)
            auth = {"Authorization": "Basic " + base64.b64encode(b"wk_test:").decode()}
            transport = httpx.ASGITransport(app=TrackingAPI(publisher))
            try:
                async with httpx.AsyncClient(transport=transport, base_url="http://idstitch") as api:
                    assert (await api.get("/healthz")).status_code == 200
                    sent = await api.post("/v1/identify", json={"userId": "u1"}, headers=auth)
                    assert sent.status_code == 200
                    nats_server.stop()
                    while publisher.unhealthy() is None:
                        await asyncio.sleep(0.05)
                    health = await api.get("/healthz")
                    assert health.status_code == 503 and health.json()["status"] == "unavailable"
                    refused = await api.post("/v1/identify", json={"userId": "u2"}, headers=auth)
                    assert refused.status_code == 429
                    assert "may still be stored" not in refused.json()["message"]  # it was never sent
                    nats_server.start()
                    deadline = time.monotonic() + 30
                    while publisher.unhealthy() is not None and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    assert (await api.get("/healthz")).status_code == 200
                    again = await api.post("/v1/identify", json={"userId": "u3"}, headers=auth)
                    assert again.status_code == 200
            finally:
                publisher.close()
        client = await nats.connect(f"nats://127.0.0.1:{nats_server.port}", connect_timeout=3)
        try:
            info = await client.jetstream().stream_info("OUTAGE")
        finally:
            await client.close()
        assert info.state.messages == 2  # u1 and u3: the refused request did not go out on reconnect
    finally:
        nats_server.stop()


def test_a_nats_server_without_jetstream_is_one_clear_line_and_exit_2(tmp_path: Path) -> None:
    nats_server = PrivateNats(tmp_path / "nats", jetstream=False)  # `nats-server` without `-js`
    nats_server.start()
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    store = f"sqlite:///{tmp_path / 'idstitch.db'}"
    try:
        commands = (
            ["worker", "--store", store],
            ["serve", "--port", "0", "--store", store],
            ["parked", "list"],
            ["parked", "show", "1"],
            ["parked", "replay", "--all"],
            ["parked", "delete", "1"],
        )
        for command in commands:
            done = subprocess.run(
                [sys.executable, "-m", "idstitch", *command, "--queue", nats_server.url],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert done.returncode == 2, (command, done.stderr)
            assert "Traceback" not in done.stderr, (command, done.stderr)
            assert done.stderr.splitlines()[-1] == (
                f"error: NATS at nats://127.0.0.1:{nats_server.port} does not answer JetStream requests "
                "(ServiceUnavailableError): is JetStream enabled (nats-server -js)?"
            ), command
    finally:
        nats_server.stop()


def test_a_worker_stopped_while_nats_is_down_still_stops_cleanly(tmp_path: Path) -> None:
    nats_server = PrivateNats(tmp_path / "nats")
    nats_server.start()
    try:
        with engine_at(tmp_path / "queued.db") as engine:
            stop = threading.Event()
            started = threading.Event()
            outcome: list[object] = []

            def work() -> None:
                try:
                    outcome.append(
                        run_worker(
                            engine,
                            nats_server.url,
                            stop=stop,
                            fetch_timeout=0.3,
                            on_start=lambda _: started.set(),
                        )
                    )
                except BaseException as error:  # what `idstitch worker` would print as "error: …", exit 2
                    outcome.append(error)

            thread = threading.Thread(target=work)
            thread.start()
            assert started.wait(30)
            nats_server.stop()
            time.sleep(2.5)  # pull requests pile up in the client's reconnect buffer meanwhile
            stop.set()
            thread.join(30)
            assert not thread.is_alive()
            (result,) = outcome
            assert isinstance(result, WorkerSummary), f"{type(result).__name__}: {result}"
    finally:
        nats_server.stop()


class CommitsThenDies(Engine):
    """Commits its first group, then fails as a worker does that dies before it acks."""

    calls = 0

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
        results = super().ingest_group(batches)
        type(self).calls += 1
        if type(self).calls == 1:
            raise ConnectionError("lost before the acks")
        return results


class FailsFirst(Engine):
    """Fails its first group before writing anything, as a store that is briefly unavailable does."""

    calls = 0

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
        type(self).calls += 1
        if type(self).calls == 1:
            raise OSError("database is locked")
        return super().ingest_group(batches)


@pytest.mark.parametrize("engine_class", [CommitsThenDies, FailsFirst])
def test_a_failed_group_comes_back_later_and_every_message_lands_once(
    tmp_path: Path, queue_url: str, engine_class: type[Engine]
) -> None:
    engine_class.calls = 0
    raws = people(8)
    published = publish_messages(queue_url, SPACE, "web", raws, batch_size=5, received_at=RECEIVED)
    assert (published.messages, published.queue_messages, published.rejected) == (40, 8, [])
    with engine_at(tmp_path / "direct.db") as direct:
        direct.ingest([parse_message(raw, received_at=RECEIVED) for raw in raws], space=SPACE, source="web")
        with engine_at(tmp_path / "queued.db", engine_class=engine_class) as engine, captured() as logs:
            summary = drain(engine, queue_url, batch=1, retry_delay=0.2)
            # One JetStream message failed, was nak'ed, and came back after the others.
            assert (summary.retried, summary.queue_messages, summary.commits, summary.messages) == (
                1,
                8,
                8,
                40,
            )
            if engine_class is CommitsThenDies:
                # Its five messages were committed before the failure: their second delivery finds them stored.
                assert (summary.accepted, summary.duplicates) == (35, 5)
            else:
                assert (summary.accepted, summary.duplicates) == (40, 0)
            ids = list(engine.store.iter_event_ids(SPACE))
            assert len(ids) == len(set(ids)) == 40
            assert engine.store.dump(SPACE) == direct.store.dump(SPACE)
    failures = [record for record in logs if record.getMessage().startswith("ingest failed")]
    assert len(failures) == 1 and failures[0].retry_in_s == 0.2
    assert queue_state(queue_url).stream_messages == 0


def test_an_undecodable_message_is_parked_once_and_the_others_land(tmp_path: Path, queue_url: str) -> None:
    publish_messages(queue_url, SPACE, "web", people(1, prefix="first"), received_at=RECEIVED)
    publish_raw(queue_url, SPACE, b"\x00 not json", b'{"v": 7, "space": "app"}')
    publish_messages(queue_url, SPACE, "web", people(2), received_at=RECEIVED)
    with engine_at(tmp_path / "queued.db") as engine, captured() as logs:
        summary = drain(engine, queue_url)
        assert (summary.parked, summary.queue_messages, summary.accepted, summary.retried) == (2, 2, 15, 0)
        assert len(set(engine.store.iter_event_ids(SPACE))) == 15
    parked_lines = [record for record in logs if record.getMessage() == "queue message parked"]
    reasons = [
        "not a queued request: JSON is malformed: invalid character (byte 0)",
        "not a queued request: Object missing required field `source`",
    ]
    assert [record.reason for record in parked_lines] == reasons
    # Parked, bytes unchanged (a newer worker may read them), never delivered again here.
    assert [(item.reason, item.data) for item in parked_requests(queue_url)] == [
        (reasons[0], b"\x00 not json"),
        (reasons[1], b'{"v": 7, "space": "app"}'),
    ]
    assert queue_state(queue_url) == QueueState(0, 0, 0, 0)


def test_a_worker_stops_when_asked_after_acking_what_it_fetched(tmp_path: Path, queue_url: str) -> None:
    publish_messages(queue_url, SPACE, "web", people(4), batch_size=5, received_at=RECEIVED)
    stop = threading.Event()
    stopped_at: list[int] = []

    class StopsAfterFirst(Engine):
        def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
            stop.set()  # the stop request arrives while this group is being resolved
            stopped_at.append(len(batches))
            return super().ingest_group(batches)

    with engine_at(tmp_path / "queued.db", engine_class=StopsAfterFirst) as engine:
        summary = run_worker(engine, queue_url, batch=2, stop=stop, fetch_timeout=0.5)
        assert stopped_at == [2]  # one group of two requests, then it stopped
        assert (summary.queue_messages, summary.accepted) == (2, 10)
        assert len(set(engine.store.iter_event_ids(SPACE))) == 10
    state = queue_state(queue_url)
    assert (state.stream_messages, state.ack_pending) == (2, 0)  # the rest waits, nothing is in flight


def test_a_worker_counts_what_it_committed_and_the_backlog_it_saw(tmp_path: Path, queue_url: str) -> None:
    # In queue mode the resolutions happen in the workers: their metrics carry what serve's carry without
    # a queue (same names, so one dashboard sums both), plus commit latency and the queue's backlog.
    publish_messages(queue_url, SPACE, "web", people(4), batch_size=5, received_at=RECEIVED)  # 4 requests
    summary = WorkerSummary()
    metrics = Metrics(worker=summary)
    backlog_at_commit: list[int | None] = []

    def on_commit(batches: list[IngestBatch], results: list[IngestResult], seconds: float) -> None:
        metrics.count_commit(batches, results, seconds)
        backlog_at_commit.append(summary.consumer_pending)

    with engine_at(tmp_path / "queued.db") as engine:
        # A look long overdue only after the first group: the backlog seen then holds for the others.
        drain(engine, queue_url, batch=1, consumer_check=600, summary=summary, on_commit=on_commit)
    assert backlog_at_commit == [None, 3, 3, 3]  # one request fetched at a time, three left behind it
    assert (summary.consumer_pending, summary.consumer_ack_pending) == (0, 0)  # drained
    sample = metrics.registry.get_sample_value
    assert (
        sample("idstitch_messages_accepted_total", {"space": SPACE})
        == summary.accepted + summary.unresolved
        == 20
    )
    assert (
        sample("idstitch_resolutions_total", {"space": SPACE, "result": "created"})
        == summary.profiles_created
    )
    assert sample("idstitch_worker_queue_messages_total", {}) == 4
    assert sample("idstitch_worker_commits_total", {}) == 4
    assert sample("idstitch_worker_commit_duration_seconds_count", {}) == 4
    assert sample("idstitch_worker_parked_total", {}) == sample("idstitch_worker_retried_total", {}) == 0
    assert sample("idstitch_queue_consumer_pending_messages", {}) == 0
    assert sample("idstitch_queue_consumer_ack_pending_messages", {}) == 0
    assert "idstitch_http_request_duration_seconds_count" not in metrics.exposition().decode()


def test_a_worker_whose_metrics_port_is_taken_says_so_in_one_line_and_exit_2(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "idstitch", "worker", "--queue", NATS_URL, "--metrics-port", str(port)],
            cwd=tmp_path,
            env={key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")},
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2, done.stderr
    assert (
        done.stderr.splitlines()[-1]
        == f"error: cannot serve metrics on 127.0.0.1:{port}: Address already in use"
    )


def test_a_request_for_an_unknown_space_is_parked_at_once_intact_and_can_be_replayed(
    tmp_path: Path, queue_url: str
) -> None:
    queue = parse_queue_url(queue_url)
    publish_messages(queue_url, SPACE, "web", people(1, prefix="before"), received_at=RECEIVED)
    publish_messages(queue_url, "nowhere", "web", people(1, prefix="lost"), received_at=RECEIVED)
    publish_messages(queue_url, SPACE, "web", people(2, prefix="after"), received_at=RECEIVED)
    original = stream_contents(queue_url, queue.stream)[1]
    assert (original.seq, original.subject) == (2, queue.subject_for("nowhere"))
    with engine_at(tmp_path / "queued.db") as engine, captured() as logs:
        # All three in one fetch and one group: the unknown space fails the group, the others land alone.
        summary = drain(engine, queue_url, batch=10)
        assert (summary.parked, summary.retried) == (1, 0)
        assert (summary.queue_messages, summary.accepted) == (2, 15)
        assert not [event for event in engine.store.iter_event_ids(SPACE) if event.startswith("lost")]
    reason = "ConfigError: unknown space 'nowhere' (configured: app, other)"
    errors = [record for record in logs if record.levelno >= logging.ERROR]
    assert [record.getMessage() for record in errors] == ["queue message parked"]  # one line, no retries
    assert (errors[0].reason, errors[0].stream_sequence, errors[0].deliveries) == (reason, 2, 1)
    assert (errors[0].dead_stream, errors[0].dead_sequence) == (queue.dead_stream, 1)
    assert queue_state(queue_url) == QueueState(0, 0, 0, 0)  # terminated: nothing comes back

    # In the dead-letter stream: the very bytes that were queued, with why and whence in headers.
    (dead,) = stream_contents(queue_url, queue.dead_stream)
    assert dead.data == original.data and dead.subject == f"{queue.subject}_dead.nowhere"
    assert {key: value for key, value in (dead.headers or {}).items() if key.startswith("Idstitch-")} == {
        "Idstitch-Parked-Reason": reason,
        "Idstitch-Original-Stream": queue.stream,
        "Idstitch-Original-Subject": queue.subject_for("nowhere"),
        "Idstitch-Original-Sequence": "2",
        "Idstitch-Deliveries": "1",
    }
    (parked,) = parked_requests(queue_url)
    assert parked == ParkedRequest(1, dead.time, reason, queue.subject_for("nowhere"), 2, 1, original.data)

    # The operator adds the space and replays: the request lands as if it had never been parked.
    assert replay_parked(queue_url) == [1]
    assert parked_requests(queue_url) == []
    (again,) = stream_contents(queue_url, queue.stream)
    assert (again.subject, again.data) == (original.subject, original.data)
    config = config_from_toml(CONFIG + '[spaces.nowhere.sources.web]\nwrite_key = "wk_nowhere"\n')
    with engine_at(tmp_path / "queued.db", config) as engine:
        summary = drain(engine, queue_url)
        assert (summary.queue_messages, summary.accepted, summary.parked) == (1, 5, 0)
        assert sorted(engine.store.iter_event_ids("nowhere")) == [f"lost-0-{step}" for step in range(5)]
    dead_info = stream_info(queue_url, queue.dead_stream)
    assert (dead_info.config.storage, dead_info.config.retention) == (
        StorageType.FILE,
        RetentionPolicy.LIMITS,
    )


def parked_command(*arguments: str) -> subprocess.CompletedProcess[bytes]:
    """`idstitch parked …` in a subprocess, as an operator runs it (no IDSTITCH_* of this shell)."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    return subprocess.run(
        [sys.executable, "-m", "idstitch", "parked", *arguments],
        env=env,
        capture_output=True,
        timeout=60,
    )


def test_an_operator_lists_shows_replays_and_deletes_parked_requests_from_the_command_line(
    tmp_path: Path, queue_url: str
) -> None:
    queue = parse_queue_url(queue_url)
    with engine_at(tmp_path / "queued.db") as engine:
        publish_messages(queue_url, "nowhere", "web", people(1, prefix="lost"), received_at=RECEIVED)
        assert drain(engine, queue_url).parked == 1
        publish_raw(queue_url, SPACE, b"\x00 not json")
        assert drain(engine, queue_url).parked == 1

    listed = parked_command("list", "--queue", queue_url, "--json")
    assert listed.returncode == 0, listed.stderr
    document = json.loads(listed.stdout)
    assert document["dead_stream"] == queue.dead_stream
    unknown_space = "ConfigError: unknown space 'nowhere' (configured: app, other)"
    malformed = "not a queued request: JSON is malformed: invalid character (byte 0)"
    assert [
        (
            item["sequence"],
            item["space"],
            item["source"],
            item["messages"],
            item["deliveries"],
            item["reason"],
        )
        for item in document["parked"]
    ] == [(1, "nowhere", "web", 5, 1, unknown_space), (2, SPACE, None, None, 1, malformed)]
    assert [item["subject"] for item in document["parked"]] == [
        queue.subject_for("nowhere"),
        queue.subject_for(SPACE),
    ]
    assert document["parked"][1]["bytes"] == len(b"\x00 not json")

    text = parked_command("list", "--queue", queue_url).stdout.decode().splitlines()
    assert text[0] == f"2 parked requests in {queue.dead_stream} on {NATS_URL}:"
    assert text[1].split() == ["sequence", "parked", "at", "space", "messages", "deliveries", "reason"]
    assert text[2].split()[:1] + text[2].split()[3:6] == ["1", "nowhere", "5", "1"]
    assert text[2].endswith(unknown_space) and text[3].endswith(malformed)

    shown = parked_command("show", "2", "--queue", queue_url)
    assert (shown.returncode, shown.stdout) == (0, b"\x00 not json")  # the bytes as queued, to fix or read

    # A sequence that is not parked: nothing at all is done, and the exit code says "not found".
    refused = parked_command("replay", "1", "3", "--queue", queue_url)
    assert refused.returncode == 1
    assert refused.stderr.decode().strip() == (
        f"error: no parked request 3 in {queue.dead_stream}: nothing was done"
    )
    assert [item.sequence for item in parked_requests(queue_url)] == [1, 2]
    assert parked_command("replay", "--queue", queue_url).returncode == 2  # neither sequences nor --all

    # The junk can never succeed: the operator deletes it; the other is replayed once its space exists.
    deleted = parked_command("delete", "2", "--queue", queue_url)
    assert (deleted.returncode, deleted.stdout.decode()) == (
        0,
        f"deleted 1 parked request from {queue.dead_stream}: 2\n",
    )
    replayed = parked_command("replay", "--all", "--queue", queue_url, "--json")
    assert (replayed.returncode, json.loads(replayed.stdout)) == (0, {"replayed": [1]})
    assert parked_command("show", "1", "--queue", queue_url).returncode == 1
    config = config_from_toml(CONFIG + '[spaces.nowhere.sources.web]\nwrite_key = "wk_nowhere"\n')
    with engine_at(tmp_path / "queued.db", config) as engine:
        assert (drain(engine, queue_url).accepted, parked_requests(queue_url)) == (5, [])
        assert sorted(engine.store.iter_event_ids("nowhere")) == [f"lost-0-{step}" for step in range(5)]


def test_listing_parked_requests_of_a_queue_never_used_creates_no_stream(queue_url: str) -> None:
    listed = parked_command("list", "--queue", queue_url)
    assert (listed.returncode, listed.stdout.decode()) == (
        0,
        f"no parked requests in {parse_queue_url(queue_url).dead_stream} on {NATS_URL}\n",
    )
    with pytest.raises(nats.js.errors.NotFoundError):
        stream_info(queue_url, parse_queue_url(queue_url).stream)


def test_a_request_from_a_source_the_config_no_longer_has_in_its_space_is_parked(
    tmp_path: Path, queue_url: str
) -> None:
    # Queued under a config where crm (merge = false) belonged to app; the workers restart with crm
    # moved to another space. Resolved as an unknown, hence unrestricted, source, the feed that must
    # never fuse people would fuse u1 and the anonymous visitor: it is parked instead, and lands once
    # replayed to a worker whose config has the source again.
    known = [
        {"type": "identify", "userId": "u1", "messageId": "w1", "timestamp": "2026-03-02T10:00:00Z"},
        {"type": "page", "anonymousId": "visitor", "messageId": "w2", "timestamp": "2026-03-02T10:01:00Z"},
    ]
    with engine_at(tmp_path / "queued.db") as engine:
        engine.ingest([parse_message(raw, received_at=RECEIVED) for raw in known], space=SPACE, source="web")
    both = {"userId": "u1", "anonymousId": "visitor", "timestamp": "2026-03-02T11:00:00Z"}
    publish_messages(
        queue_url, SPACE, "crm", [{"type": "identify", "messageId": "crm-1", **both}], received_at=RECEIVED
    )
    publish_messages(queue_url, SPACE, "web", people(1, prefix="fine"), received_at=RECEIVED)
    moved = CONFIG.replace("[spaces.app.sources.crm]", "[spaces.other.sources.crm]")
    person, visitor = Identifier("user_id", "u1"), Identifier("anonymous_id", "visitor")
    with engine_at(tmp_path / "queued.db", config_from_toml(moved)) as engine:
        summary = drain(engine, queue_url, batch=10)
        assert (summary.parked, summary.queue_messages, summary.accepted) == (1, 1, 5)
        assert "crm-1" not in set(engine.store.iter_event_ids(SPACE))
        assert engine.store.find_profile(SPACE, person) != engine.store.find_profile(SPACE, visitor)
    (parked,) = parked_requests(queue_url)
    assert parked.reason == "ConfigError: unknown source 'crm' in space app (configured: web)"
    assert replay_parked(queue_url) == [1]
    with engine_at(tmp_path / "queued.db") as engine:
        summary = drain(engine, queue_url)
        assert (summary.parked, summary.accepted) == (0, 1)
        assert "crm-1" in set(engine.store.iter_event_ids(SPACE))
        assert engine.store.find_profile(SPACE, person) != engine.store.find_profile(SPACE, visitor)


class FailsOnPoison(Engine):
    """Fails every group holding a message of the "poison" person, as a request hitting a bug would."""

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
        for batch in batches:
            if any(
                isinstance(item, Message) and item.message_id.startswith("poison") for item in batch.items
            ):
                raise RuntimeError("a bug on this request")
        return super().ingest_group(batches)


def test_a_request_that_fails_on_every_delivery_is_parked_after_the_bound(
    tmp_path: Path, queue_url: str
) -> None:
    publish_messages(queue_url, SPACE, "web", people(1, prefix="poison"), received_at=RECEIVED)
    publish_messages(queue_url, SPACE, "web", people(2, prefix="fine"), received_at=RECEIVED)
    with engine_at(tmp_path / "queued.db", engine_class=FailsOnPoison) as engine, captured() as logs:
        # The default bound (10 deliveries), with short delays; --drain returns once it is parked.
        summary = drain(engine, queue_url, retry_delay=0.01, max_retry_delay=0.05)
        assert (summary.retried, summary.parked, summary.queue_messages, summary.accepted) == (9, 1, 1, 10)
    failures = [record for record in logs if record.getMessage().startswith("ingest failed")]
    assert [record.deliveries for record in failures] == list(range(1, 10))
    (parked_line,) = [record for record in logs if record.getMessage() == "queue message parked"]
    reason = "failed on each of 10 deliveries, last: RuntimeError: a bug on this request"
    assert (parked_line.reason, parked_line.deliveries) == (reason, 10)
    (parked,) = parked_requests(queue_url)
    assert (parked.reason, parked.deliveries, parked.original_sequence) == (reason, 10, 1)
    assert [raw["messageId"] for raw in json.loads(parked.data)["messages"]] == [
        f"poison-0-{step}" for step in range(5)
    ]
    assert queue_state(queue_url) == QueueState(0, 0, 0, 0)


class StoreDownAWhile(Engine):
    """The database is unreachable for the first 14 groups, past the parking bound, then back."""

    failures = 14

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
        if self.failures:
            self.failures -= 1
            raise psycopg.OperationalError("connection refused")
        return super().ingest_group(batches)


def test_a_store_outage_longer_than_the_bound_parks_nothing(tmp_path: Path, queue_url: str) -> None:
    # Parking after 10 deliveries is for requests that fail on their own; an outage fails them all,
    # and parking them would leave every request of those minutes to be replayed by hand.
    publish_messages(queue_url, SPACE, "web", people(1, prefix="waits"), received_at=RECEIVED)
    with engine_at(tmp_path / "queued.db", engine_class=StoreDownAWhile) as engine:
        summary = drain(engine, queue_url, retry_delay=0.01, max_retry_delay=0.05)
    assert (summary.retried, summary.parked, summary.queue_messages, summary.accepted) == (14, 0, 1, 5)
    assert parked_requests(queue_url) == []


class StoreUnreachableAWhile(Engine):
    """PostgreSQL down (the store raises StoreUnavailable at once), or the disk of a SQLite store full,
    for the first three groups, then back."""

    calls: ClassVar[list[int]] = []
    error: ClassVar[Exception] = StoreUnavailable(
        "store postgresql://app@db:5432/idstitch is unavailable: connection refused"
    )

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
        type(self).calls.append(len(batches))
        if len(type(self).calls) <= 3:
            raise type(self).error
        return super().ingest_group(batches)


@pytest.mark.parametrize(
    "error",
    [
        StoreUnavailable("store postgresql://app@db:5432/idstitch is unavailable: connection refused"),
        StoreFull("store sqlite:///queued.db: the disk is full (database or disk is full)"),
    ],
    ids=["unreachable", "disk-full"],
)
def test_a_worker_waits_out_a_store_outage_per_group_with_one_log_line_per_try(
    tmp_path: Path, queue_url: str, error: Exception, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: each failed group was written again one request at a time, every one failing alike and
    logged with its traceback: a backlog of thousands of requests logged thousands of lines a minute,
    and the worker fetched again at once. A full disk too, which no request can help."""
    monkeypatch.setattr(StoreUnreachableAWhile, "error", error)
    for number in range(3):
        publish_messages(queue_url, SPACE, "web", people(1, prefix=f"r{number}"), received_at=RECEIVED)
    StoreUnreachableAWhile.calls = []
    with engine_at(tmp_path / "queued.db", engine_class=StoreUnreachableAWhile) as engine, captured() as logs:
        summary = drain(engine, queue_url, batch=3, retry_delay=0.01, max_retry_delay=0.05)
    assert StoreUnreachableAWhile.calls == [3, 3, 3, 3]  # the whole group each time, never split
    assert (summary.retried, summary.parked, summary.queue_messages, summary.accepted) == (9, 0, 3, 15)
    lines = [record for record in logs if record.levelno >= logging.WARNING]
    assert [record.getMessage() for record in lines] == [
        "store unavailable; the queue messages will be delivered again"
    ] * 3
    assert [record.retry_in_s for record in lines] == [0.01, 0.02, 0.04]  # and the worker waits as long
    assert all(record.queue_messages == 3 and not record.exc_info for record in lines)


class StoreDownForMinutes(Engine):
    """Each group waits out its retries against an unreachable database (minutes, in a real outage), then fails."""

    calls = 0
    started = threading.Event()

    def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
        type(self).calls += 1
        self.started.set()
        time.sleep(0.5)  # the engine's retries: two minutes per call against a PostgreSQL that is down
        raise StoreConflict("OperationalError: connection refused")


def test_a_worker_stopped_during_a_store_outage_stops_after_the_group_in_hand_not_once_per_request(
    tmp_path: Path, queue_url: str
) -> None:
    for number in range(4):
        publish_messages(queue_url, SPACE, "web", people(1, prefix=f"r{number}"), received_at=RECEIVED)
    StoreDownForMinutes.calls = 0
    StoreDownForMinutes.started = threading.Event()
    stop = threading.Event()
    with engine_at(tmp_path / "queued.db", engine_class=StoreDownForMinutes) as engine:
        outcome: list[WorkerSummary] = []
        thread = threading.Thread(
            target=lambda: outcome.append(
                run_worker(engine, queue_url, batch=4, stop=stop, fetch_timeout=0.3)
            )
        )
        thread.start()
        assert StoreDownForMinutes.started.wait(30)
        stop.set()  # SIGTERM while the group of 4 requests is waiting on the database
        thread.join(30)
        assert not thread.is_alive()
    # Not written again one request at a time (4 more waits of minutes each): given back instead.
    assert StoreDownForMinutes.calls == 1
    (summary,) = outcome
    assert (summary.retried, summary.queue_messages, summary.parked) == (4, 0, 0)
    with engine_at(tmp_path / "queued.db") as engine:
        assert drain(engine, queue_url).accepted == 20  # nothing lost: the next worker stores them all
    assert queue_state(queue_url).stream_messages == 0


def test_a_publisher_recreates_a_deleted_stream_and_publishes_instead_of_refusing(
    tmp_path: Path, queue_url: str
) -> None:
    queue = parse_queue_url(queue_url)
    requests = [
        [parse_message(raw, received_at=RECEIVED) for raw in people(1, prefix=f"r{number}")]
        for number in range(4)
    ]
    with engine_at(tmp_path / "queued.db") as engine:
        with JetStreamPublisher(engine, queue_url) as publisher, captured() as logs:
            publisher.ingest(requests[0], space=SPACE, source="web")
            delete_stream(queue_url)  # the waiting request goes with it
            # Three requests at once find no stream: one of them recreates it, all are published.
            futures = [publisher.submit(request, space=SPACE, source="web") for request in requests[1:]]
            for future in futures:
                assert [outcome.status for outcome in future.result().outcomes] == ["queued"] * 5
        (warning,) = [record for record in logs if record.levelno >= logging.WARNING]
        assert warning.getMessage() == "JetStream stream was missing; recreated it"
        assert (warning.stream, warning.error) == (
            queue.stream,
            "NoStreamResponseError: nats: no response from stream",
        )
        # Recreated as at start-up.
        config = stream_info(queue_url, queue.stream).config
        assert (config.subjects, config.retention, config.storage, config.discard) == (
            [queue.filter_subject],
            RetentionPolicy.WORK_QUEUE,
            StorageType.FILE,
            DiscardPolicy.NEW,
        )
        summary = drain(engine, queue_url)
        assert (summary.queue_messages, summary.accepted) == (3, 15)


def test_a_running_worker_recreates_its_deleted_consumer_and_stream_and_goes_on(
    tmp_path: Path, queue_url: str
) -> None:
    queue = parse_queue_url(queue_url)

    class Landing(Engine):
        """Counts the messages it committed, for the test to wait on."""

        landed = 0
        changed = threading.Condition()

        def ingest_group(self, batches: Sequence[IngestBatch]) -> list[IngestResult]:
            results = super().ingest_group(batches)
            with Landing.changed:
                Landing.landed += sum(len(batch.items) for batch in batches)
                Landing.changed.notify_all()
            return results

    def landed(count: int) -> None:
        with Landing.changed:
            assert Landing.changed.wait_for(lambda: Landing.landed >= count, 60), f"{count} never landed"

    def publish(prefix: str) -> None:
        publish_messages(queue_url, SPACE, "web", people(1, prefix=prefix), received_at=RECEIVED)

    recreated = "JetStream consumer was missing; recreated it and its stream if needed"
    stop = threading.Event()
    started = threading.Event()
    outcome: list[object] = []
    with engine_at(tmp_path / "queued.db", engine_class=Landing) as engine, watched() as logs:

        def work() -> None:
            try:
                outcome.append(
                    run_worker(
                        engine,
                        queue_url,
                        stop=stop,
                        fetch_timeout=0.3,
                        consumer_check=0.3,
                        on_start=lambda _: started.set(),
                    )
                )
            except BaseException as error:
                outcome.append(error)

        thread = threading.Thread(target=work)
        thread.start()
        try:
            assert started.wait(30)
            publish("first")
            landed(5)
            # Deleted, and recreated by someone else (a publisher starting up): the consumer is gone.
            delete_stream(queue_url)
            publish("second")
            landed(10)
            logs.wait_for(recreated)
            # Deleted, and recreated by nobody: the worker recreates the stream itself.
            delete_stream(queue_url)
            logs.wait_for(recreated, count=2)
            assert queue_state(queue_url) == QueueState(0, 0, 0, 0)  # there again, with the consumer
            publish_raw(
                queue_url,
                SPACE,
                *envelope.encode(
                    SPACE,
                    "web",
                    RECEIVED,
                    [parse_message(raw, received_at=RECEIVED) for raw in people(1, prefix="third")],
                    max_bytes=1 << 20,
                ),
            )
            landed(15)
        finally:
            stop.set()
            thread.join(30)
        assert not thread.is_alive()
        (summary,) = outcome
        assert isinstance(summary, WorkerSummary), f"{type(summary).__name__}: {summary}"
        assert (summary.queue_messages, summary.accepted, summary.parked) == (3, 15, 0)
        assert len(logs.named(recreated)) == 2
        assert [record.stream for record in logs.named(recreated)] == [queue.stream] * 2
        assert len(set(engine.store.iter_event_ids(SPACE))) == 15


def stream_info(url: str, stream: str) -> Any:
    """A stream's StreamInfo now."""
    queue = parse_queue_url(url)

    async def read() -> Any:
        client = await nats.connect(list(queue.servers), allow_reconnect=False, connect_timeout=3)
        try:
            return await client.jetstream().stream_info(stream)
        finally:
            await client.close()

    return asyncio.run(read())


# -- real processes --------------------------------------------------------------------------------


class Worker:
    """`idstitch worker` as a subprocess with the environment of tests/live_server.py's Server."""

    START_SECONDS = 30.0

    def __init__(self, directory: Path, queue: str, store_url: str, *args: str) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.command = [
            sys.executable,
            "-m",
            "idstitch",
            "worker",
            "--queue",
            queue,
            "--store",
            store_url,
            "--json",
            *args,
        ]
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
        self.env.update(
            IDSTITCH_WRITE_KEY=WRITE_KEY,
            IDSTITCH_PROFILE_TOKEN=PROFILE_TOKEN,
            IDSTITCH_ADMIN_TOKEN=ADMIN_TOKEN,
        )
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def path(self, kind: str) -> Path:
        return self.directory / f"worker-{self.starts}.{kind}"

    def log(self) -> str:
        return self.path("err").read_text(errors="replace") if self.path("err").exists() else ""

    def start(self) -> None:
        self.starts += 1
        with self.path("out").open("wb") as out, self.path("err").open("wb") as err:
            self.process = subprocess.Popen(
                self.command, cwd=self.directory, env=self.env, stdout=out, stderr=err
            )
        deadline = time.monotonic() + self.START_SECONDS
        while "idstitch worker consuming" not in self.log():
            if self.process.poll() is not None:
                raise AssertionError(f"worker exited with {self.process.returncode}:\n{self.log()}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"worker did not start in {self.START_SECONDS}s:\n{self.log()}")
            time.sleep(0.05)

    def stop(self) -> dict[str, Any]:
        """SIGTERM: exit 0 after the group under way; its summary."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"worker ignored SIGTERM for 30 s:\n{self.log()}") from None
        assert code == 0, f"worker exited with {code} on SIGTERM:\n{self.log()}"
        summary: dict[str, Any] = json.loads(self.path("out").read_text())
        return summary

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


def wait_for(condition: Any, what: str, seconds: float = 60.0) -> None:
    """Poll until `condition()` holds; fail naming `what` after `seconds`."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:g} s waiting for {what}")
        time.sleep(0.05)


def event_ids(store_url: str, space: str = "default") -> list[str]:
    """Every stored message id, read by a store of this process beside the running ones."""
    store = open_store(store_url)
    try:
        return list(store.iter_event_ids(space))
    finally:
        store.close()


def post(url: str, body: object, key: str = WRITE_KEY) -> tuple[int, Any]:
    """POST JSON with the write key; the status and the decoded answer."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{key}:".encode()).decode())
    request.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url: str, token: str) -> tuple[int, Any]:
    """GET with a Profile API token; the status and the decoded answer."""
    request = urllib.request.Request(url)
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{token}:".encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


@pytest.mark.slow
def test_serve_queue_and_a_worker_process_resolve_what_was_posted(tmp_path: Path, queue_url: str) -> None:
    server = Server(tmp_path / "server", args=("--queue", queue_url))
    worker = Worker(tmp_path / "worker", queue_url, server.store_url, "--metrics-port", "0")
    try:
        server.start()
        assert f"(queue mode: JetStream {NATS_URL} stream IDSTITCH_TEST_{RUN}_" in server.log()
        status, answer = post(f"{server.base_url}/v1/batch", story())
        assert status == 200
        assert answer == {
            "success": True,
            "rejected": [
                {"index": 2, "messageId": "s3", "error": NO_IDENTIFIER},
                {"index": 3, "messageId": "s4", "error": "event: required for track"},
            ],
        }
        assert event_ids(server.store_url) == []  # acknowledged once in JetStream, not resolved yet
        assert queue_state(queue_url).stream_messages == 1

        worker.start()
        wait_for(lambda: len(event_ids(server.store_url)) == 9, "the worker to store the 9 valid messages")
        # The serve process reads what the worker wrote: the Profile API sees the merged profile.
        traits_url = f"{server.base_url}/v1/spaces/default/collections/users/profiles/anonymous_id:a2/traits"
        status, traits = get(traits_url, PROFILE_TOKEN)
        assert status == 200 and traits["traits"] == {"email": "jane@example.com", "plan": "trial"}

        status, _ = post(f"{server.base_url}/v1/identify", {"userId": "u1", "messageId": "s2"})  # a retry
        assert status == 200
        wait_for(lambda: queue_state(queue_url).stream_messages == 0, "the worker to ack the retry")
        # The resolutions happened in the worker: its /metrics counts them, under serve's names.
        metrics_url = re.search(r"metrics on (http://\S+/metrics)", worker.log())
        assert metrics_url is not None, worker.log()
        with urllib.request.urlopen(metrics_url[1], timeout=30) as response:
            exposition = response.read().decode()
        for line in (
            'idstitch_messages_accepted_total{space="default"} 9.0',  # the unresolved one is stored too
            'idstitch_messages_duplicate_total{space="default"} 1.0',
            'idstitch_merges_total{space="default"} 1.0',
            "idstitch_worker_queue_messages_total 2.0",
        ):
            assert line in exposition.splitlines(), line
        summary = worker.stop()
        assert "idstitch worker consuming" in worker.log()
        assert {
            key: summary[key]
            for key in (
                "queue_messages",
                "messages",
                "accepted",
                "duplicates",
                "unresolved",
                "rejected",
                "merges",
                "parked",
            )
        } == {
            "queue_messages": 2,
            "messages": 10,
            "accepted": 8,
            "duplicates": 1,
            "unresolved": 1,
            "rejected": 0,
            "merges": 1,
            "parked": 0,
        }
        server.stop()
    finally:
        worker.kill()
        server.kill()
    assert sorted(Counter(event_ids(server.store_url)).values()) == [1] * 9


@pytest.mark.slow
def test_a_worker_killed_mid_stream_loses_nothing_and_its_successor_doubles_nothing(
    tmp_path: Path, queue_url: str
) -> None:
    store_url = f"sqlite:///{tmp_path / 'idstitch.db'}"
    raws = people(600)  # 3,000 messages in 60 JetStream messages of 50
    expected = {raw["messageId"] for raw in raws}
    published = publish_messages(queue_url, "default", "default", raws, batch_size=50)
    assert published.queue_messages == 60

    first = Worker(tmp_path / "first", queue_url, store_url, "--batch", "1")
    second = Worker(tmp_path / "second", queue_url, store_url, "--batch", "4")
    try:
        first.start()
        wait_for(lambda: len(event_ids(store_url)) >= 300, "the first worker to commit some groups")
        assert first.process is not None
        first.process.send_signal(
            signal.SIGKILL
        )  # no clean-up: its fetched message is neither acked nor nak'ed
        first.process.wait(timeout=30)
        stored_by_first = len(event_ids(store_url))
        assert stored_by_first < len(expected), "the first worker finished before it could be killed"

        second.start()
        wait_for(lambda: len(event_ids(store_url)) == len(expected), "the second worker to store the rest")
        wait_for(lambda: queue_state(queue_url).stream_messages == 0, "the second worker to ack everything")
        summary = second.stop()
    finally:
        first.kill()
        second.kill()

    ids = event_ids(store_url)
    assert len(ids) == len(set(ids)) and set(ids) == expected  # nothing lost, nothing twice
    # The second worker stored exactly what the first had not; anything the first had committed but not
    # acknowledged came back to it as duplicates.
    assert summary["accepted"] == len(expected) - stored_by_first
    assert summary["duplicates"] == summary["messages"] - summary["accepted"]
    assert summary["messages"] % 50 == 0 and summary["rejected"] == summary["parked"] == 0
    store = open_store(store_url)
    try:
        stats = store.stats("default")
        assert (stats.profiles, stats.events, stats.merges) == (600, 3000, 0)
    finally:
        store.close()


@pytest.mark.slow
def test_worker_drain_exits_when_only_a_parked_request_is_left(tmp_path: Path, queue_url: str) -> None:
    store_url = f"sqlite:///{tmp_path / 'idstitch.db'}"
    publish_messages(queue_url, "default", "default", people(1, prefix="kept"))
    publish_messages(queue_url, "elsewhere", "default", people(1, prefix="lost"))  # a space it does not know
    worker = Worker(tmp_path / "worker", queue_url, store_url, "--drain")
    done = subprocess.run(
        worker.command, cwd=worker.directory, env=worker.env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout.splitlines()[-1])
    assert {key: summary[key] for key in ("queue_messages", "accepted", "retried", "parked")} == {
        "queue_messages": 1,
        "accepted": 5,
        "retried": 0,
        "parked": 1,
    }
    lines = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    (parked,) = [line for line in lines if line["msg"] == "queue message parked"]
    assert parked["level"] == "error"
    assert parked["reason"] == "ConfigError: unknown space 'elsewhere' (configured: default)"
    assert [request.reason for request in parked_requests(queue_url)] == [parked["reason"]]
    assert sorted(event_ids(store_url)) == [f"kept-0-{step}" for step in range(5)]
