"""Many writers, one PostgreSQL graph: concurrent worker processes, killed workers and connections.

Every test checks the graph's invariants afterwards (`assert_valid_graph`): one root per identifier, no
limit broken, no user_id on two profiles, every message stored once. The people the graph joins by
unique identifiers (user_id, email) must be those of a single process running the same stream.
"""

from __future__ import annotations

import bisect
import multiprocessing
import random
import threading
import time
from collections import Counter, defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from conftest import new_schema
from helpers import RECEIVED
from idstitch.config import Config
from idstitch.core.errors import InvalidEvent
from idstitch.core.identifiers import Identifier
from idstitch.core.messages import Message, parse_message
from idstitch.core.rules import IdentityRules
from idstitch.engine import Engine
from idstitch.queue.publisher import publish_messages
from idstitch.sim.population import WorkloadConfig, generate
from idstitch.storage.base import Store
from idstitch.storage.times import from_micros
from idstitch.storage.urls import open_store
from live_server import PROFILE_TOKEN, Server, free_port
from test_queue import Worker, get, post, queue_state, wait_for

SPACE = "default"
UNIQUE_TYPES = ("user_id", "email")


def stream(count: int, seed: int) -> list[dict[str, Any]]:
    """A generated stream with heavy overlap: few people, many shared devices."""
    workload = WorkloadConfig(
        messages=count,
        seed=seed,
        people=max(1, count // 20),
        shared_device_rate=0.15,
        shared_message_rate=0.08,
        alias_rate=0.01,
    )
    return [generated.message for generated in generate(workload)]


def parse(raws: list[dict[str, Any]]) -> list[Message | InvalidEvent]:
    """The stream as the engine receives it (a fixed receipt time, so every run parses alike)."""
    parsed: list[Message | InvalidEvent] = []
    for raw in raws:
        try:
            parsed.append(parse_message(raw, received_at=RECEIVED))
        except InvalidEvent as error:
            parsed.append(error)
    return parsed


def ingest_share(
    url: str, raws: list[dict[str, Any]], batch: int, ready: Any, spans: Any, number: int
) -> None:
    """One worker process: its share of the stream, in order, `batch` messages per transaction.

    It records when it committed its first and its last transaction (`spans[2n]`, `spans[2n + 1]`, on the
    machine's monotonic clock), so that the test can show the workers really wrote at the same time.
    """
    store = open_store(url)
    try:
        engine = Engine(store, Config.default())
        messages = parse(raws)
        ready.wait()  # a barrier: no worker writes before every one of them is ready to
        for start in range(0, len(messages), batch):
            engine.ingest(messages[start : start + batch], space=SPACE, source="default")
            if start == 0:
                spans[2 * number] = time.monotonic()
        spans[2 * number + 1] = time.monotonic()
    finally:
        store.close()


def single_process(raws: list[dict[str, Any]], url: str = "sqlite://") -> Store:
    """The reference: the same stream, in stream order, through one engine."""
    store = open_store(url)
    engine = Engine(store, Config.default())
    messages = parse(raws)
    for start in range(0, len(messages), 200):
        engine.ingest(messages[start : start + 200], space=SPACE, source="default")
    return store


def people(store: Store) -> set[frozenset[str]]:
    """Each root profile's unique identifiers (user_id, email): the people the graph joined."""
    joined: dict[str, set[str]] = defaultdict(set)
    for collection, kind, value, profile_id, *_ in store.dump(SPACE)["identifiers"]:
        if collection == "users" and kind in UNIQUE_TYPES:
            joined[profile_id].add(f"{kind}:{value}")
    return {frozenset(group) for group in joined.values()}


def assert_valid_graph(store: Store, expected_ids: set[str], rules: IdentityRules) -> None:
    """The invariants every run must leave, whatever the interleaving of its writers."""
    dump = store.dump(SPACE)
    parents = {row[0]: row[2] for row in dump["profiles"]}
    event_ids = list(store.iter_event_ids(SPACE))
    duplicates = [key for key, count in Counter(event_ids).items() if count > 1]
    assert not duplicates, f"messages stored twice: {duplicates[:5]}"
    assert set(event_ids) == expected_ids, (
        f"missing {sorted(expected_ids - set(event_ids))[:5]}, unexpected {sorted(set(event_ids) - expected_ids)[:5]}"
    )
    # One root per identifier: the identifier's profile exists and is a root (chains are flat).
    values: dict[tuple[str, str], dict[str, list[datetime]]] = defaultdict(lambda: defaultdict(list))
    owners: dict[tuple[str, str, str], str] = {}
    for collection, kind, value, profile_id, _first, last_seen, retired, _device in dump["identifiers"]:
        assert parents.get(profile_id) == "", f"{kind}:{value} points at {profile_id}, not a root"
        assert (collection, kind, value) not in owners
        owners[(collection, kind, value)] = profile_id
        if not retired:
            values[(profile_id, collection)][kind].append(from_micros(last_seen))
    for (profile_id, _), by_type in values.items():
        for kind, times in by_type.items():
            rule = rules.rule(kind)
            assert _most_in_a_window(sorted(times), rule.window_length) <= rule.limit, (
                f"{profile_id} holds more {kind} than {rule.describe()}"
            )
    # No user_id on two profiles (the owners check above), and no profile with two user_ids in force (a
    # user_id retired by an alias migration, SPEC E11, still resolves but no longer counts).
    for (profile_id, _), by_type in values.items():
        assert len(by_type.get("user_id", [])) <= 1, f"{profile_id} has two user_ids in force"
    for profile_id, parent in parents.items():
        if parent:
            assert parents[parent] == "", f"{profile_id}'s parent {parent} is not a root"
    # The caps (SPEC §4.6): identifiers per profile and profiles merged into one.
    held = Counter(owners.values())
    assert max(held.values(), default=0) <= rules.max_identifiers
    merged_into = Counter(parent for parent in parents.values() if parent)
    for segment_id, _collection, parent, _created, merge_count in dump["profiles"]:
        if parent == "":
            assert merge_count == merged_into[segment_id] <= rules.max_merges, (segment_id, merge_count)


def _most_in_a_window(times: list[datetime], window: timedelta | None) -> int:
    """The most values whose last-seen times fall in one window ending at a last-seen time."""
    if window is None:
        return len(times)
    return max(
        (bisect.bisect_right(times, end) - bisect.bisect_right(times, end - window) for end in times),
        default=0,
    )


def valid_ids(raws: list[dict[str, Any]]) -> set[str]:
    """The message ids the engine stores from a stream: the parsed ones that carry an identifier."""
    reference = single_process(raws)
    try:
        return set(reference.iter_event_ids(SPACE))
    finally:
        reference.close()


@pytest.mark.slow
def test_four_worker_processes_on_one_space_keep_the_invariants_and_join_the_same_people(
    postgres_database: str,
) -> None:
    raws = stream(2_400, seed=21)
    order = random.Random(5)
    shares: list[list[dict[str, Any]]] = [[] for _ in range(4)]
    for raw in raws:
        shares[order.randrange(4)].append(raw)  # shuffled across workers, stream order within each
    url = new_schema(postgres_database)
    setup = open_store(url)
    Engine(setup, Config.default())  # the space and its source exist before the workers race
    context = multiprocessing.get_context("spawn")
    ready = context.Barrier(len(shares))
    spans = context.Array("d", 2 * len(shares))
    workers = [
        context.Process(target=ingest_share, args=(url, share, 10, ready, spans, number))
        for number, share in enumerate(shares)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=600)
        assert worker.exitcode == 0, f"worker exited with {worker.exitcode}"
    # Four writers at once, not one after another: each committed its first transaction before any of them
    # committed its last (60 transactions each).
    firsts, lasts = spans[0::2], spans[1::2]
    assert all(firsts) and all(lasts), list(spans)
    assert max(firsts) < min(lasts), f"the workers did not overlap: {list(spans)}"

    reference = single_process(raws)
    try:
        rules = Config.default().space(SPACE).rules
        assert_valid_graph(setup, set(reference.iter_event_ids(SPACE)), rules)
        assert_valid_graph(reference, set(reference.iter_event_ids(SPACE)), rules)  # the checks are sound
        concurrent, alone = people(setup), people(reference)
        assert len(alone) > 50
        assert concurrent == alone, (
            f"{len(concurrent - alone)} groups differ, e.g. {sorted(map(sorted, concurrent - alone))[:3]} "
            f"vs {sorted(map(sorted, alone - concurrent))[:3]}"
        )
        stats = setup.stats(SPACE)
        assert stats.merges > 0 and stats.suspect > 0, (
            stats
        )  # the stream did exercise merges and shared devices
    finally:
        reference.close()
        setup.close()


WORKER_APPLICATION = "idstitch_test_worker"  # the worker processes' connections, and only theirs


def worker_url(url: str) -> str:
    """The store URL with an application_name by which the workers' backends can be found."""
    return f"{url}{'&' if '?' in url else '?'}application_name={WORKER_APPLICATION}"


def terminate_writers(database_url: str, stop: threading.Event, killed: list[int]) -> None:
    """Now and then, pg_terminate_backend a worker's connection in the middle of its transaction.

    Only a worker's backend (not this test's reader) that is inside a transaction and holds the
    transaction-scoped advisory locks of the message it is resolving: killed mid-resolution, every time.
    """
    database = psycopg.conninfo.conninfo_to_dict(database_url)["dbname"]
    with psycopg.connect(database_url, autocommit=True) as admin:
        while not stop.wait(0.7):
            row = admin.execute(
                "SELECT a.pid FROM pg_stat_activity a WHERE a.datname = %s AND a.application_name = %s "
                "AND a.state IN ('active', 'idle in transaction') AND a.xact_start IS NOT NULL "
                "AND EXISTS (SELECT FROM pg_locks l WHERE l.pid = a.pid AND l.locktype = 'advisory' "
                "AND l.granted) ORDER BY random() LIMIT 1",
                (database, WORKER_APPLICATION),
            ).fetchone()
            if row is not None and admin.execute("SELECT pg_terminate_backend(%s)", (row[0],)).fetchone():
                killed.append(row[0])


@pytest.mark.slow
def test_killed_workers_and_killed_connections_lose_nothing_and_double_nothing(
    tmp_path: Path, postgres_database: str, queue_url: str
) -> None:
    # Long enough that the workers are still at it when one is killed, with connections killed meanwhile.
    raws = stream(8_000, seed=33)
    url = new_schema(postgres_database)
    expected = valid_ids(raws)
    published = publish_messages(queue_url, SPACE, "default", raws, batch_size=20, received_at=RECEIVED)
    assert published.queue_messages == 400
    workers = [
        Worker(tmp_path / f"w{number}", queue_url, worker_url(url), "--batch", "3") for number in range(3)
    ]
    stop, killed = threading.Event(), list[int]()
    terminator = threading.Thread(target=terminate_writers, args=(postgres_database, stop, killed))
    store = open_store(url)
    try:
        for worker in workers:
            worker.start()
        terminator.start()
        wait_for(lambda: store.stats(SPACE).events >= 400, "the workers to commit some groups", 120)
        victim = workers[0].process
        assert victim is not None
        victim.kill()  # SIGKILL: what it fetched is neither acked nor nak'ed; JetStream redelivers it
        victim.wait(timeout=30)
        assert store.stats(SPACE).events < len(expected), "the stream was done before the kill"
        successor = Worker(tmp_path / "successor", queue_url, worker_url(url), "--batch", "3")
        workers.append(successor)
        successor.start()
        wait_for(lambda: store.stats(SPACE).events >= len(expected), "every message to be stored", 300)
        wait_for(lambda: queue_state(queue_url).stream_messages == 0, "every request to be acked", 60)
        stop.set()
        terminator.join(timeout=30)
        for worker in workers[1:]:
            worker.stop()
        assert killed, "no worker connection was terminated mid-transaction: the test proved nothing"
        assert_valid_graph(store, expected, Config.default().space(SPACE).rules)
        reference = single_process(raws)
        try:
            assert people(store) == people(reference)
        finally:
            reference.close()
    finally:
        stop.set()
        for worker in workers:
            worker.kill()
        store.close()


@pytest.mark.slow
def test_one_worker_through_the_queue_builds_the_embedded_engines_graph_ids_included(
    tmp_path: Path, postgres_database: str, queue_url: str
) -> None:
    raws = stream(1_500, seed=44)
    url = new_schema(postgres_database)
    publish_messages(queue_url, SPACE, "default", raws, batch_size=25, received_at=RECEIVED, concurrency=1)
    worker = Worker(tmp_path / "one", queue_url, url, "--batch", "4")
    store = open_store(url)
    reference = single_process(raws)
    try:
        worker.start()
        expected = len(list(reference.iter_event_ids(SPACE)))
        wait_for(lambda: store.stats(SPACE).events >= expected, "the worker to store the stream", 300)
        worker.stop()
        streamed, embedded = store.dump(SPACE), reference.dump(SPACE)
        for key in embedded:
            assert streamed[key] == embedded[key], key
    finally:
        worker.kill()
        reference.close()
        store.close()


def _message(**fields: Any) -> Message:
    parsed = parse_message(fields, received_at=RECEIVED)
    assert isinstance(parsed, Message)
    return parsed


def test_a_message_whose_root_another_writer_holds_waits_while_the_rest_of_its_batch_commits(
    postgres_url: str,
) -> None:
    store, other = open_store(postgres_url), open_store(postgres_url)
    try:
        engine, second = Engine(store, Config.default()), Engine(other, Config.default())
        engine.ingest([_message(type="identify", userId="u1", anonymousId="a1", messageId="m1")], space=SPACE)
        u1 = Identifier("user_id", "u1")
        with store.transaction() as holder:
            # A writer in the middle of a message on u1: it holds u1 and u1's profile until it commits.
            holder.claim(SPACE, "elsewhere", [u1])
            holder.load_view(SPACE, "users", [u1])
            outcomes: list[Any] = []
            batch = [
                _message(type="track", event="x", anonymousId="a9", messageId="m2"),  # touches nothing held
                _message(type="track", event="y", anonymousId="a1", messageId="m3"),  # a1 is on u1's profile
            ]
            thread = threading.Thread(
                target=lambda: outcomes.extend(second.ingest(batch, space=SPACE).outcomes), daemon=True
            )
            thread.start()
            wait_for(
                lambda: store.find_profile(SPACE, Identifier("anonymous_id", "a9")) is not None, "m2", 30
            )
            time.sleep(0.5)
            assert thread.is_alive() and store.stats(SPACE).events == 2  # m3 waits for the holder
        thread.join(timeout=30)
        assert [outcome.status for outcome in outcomes] == ["resolved", "resolved"]
        assert outcomes[1].profile_id == store.find_profile(SPACE, u1)
    finally:
        store.close()
        other.close()


@pytest.mark.slow
def test_serve_on_postgres_ingests_and_its_profile_workers_read_the_same_graph(
    tmp_path: Path, postgres_url: str
) -> None:
    """The Tracking API writes to PostgreSQL; read-only Profile API worker processes answer from it."""
    profile_port = free_port()
    server = Server(tmp_path, args=("--profile-port", str(profile_port), "--profile-workers", "2"))
    server.store_url = postgres_url
    batch = {
        "batch": [
            {
                "type": "identify",
                "userId": "u1",
                "anonymousId": "a1",
                "traits": {"plan": "pro"},
                "messageId": "p1",
            },
            {"type": "track", "event": "Signed Up", "anonymousId": "a1", "messageId": "p2"},
            {"type": "identify", "anonymousId": "a2", "traits": {"email": "x@y.io"}, "messageId": "p3"},
        ]
    }
    try:
        server.start()
        assert post(f"{server.base_url}/v1/batch", batch)[0] == 200  # answered once committed
        profiles = f"http://127.0.0.1:{profile_port}/v1/spaces/{SPACE}/collections/users/profiles"
        status, traits = get(f"{profiles}/user_id:u1/traits", PROFILE_TOKEN)
        assert (status, traits["traits"]) == (200, {"plan": "pro"})
        status, events = get(f"{profiles}/anonymous_id:a1/events", PROFILE_TOKEN)
        assert status == 200 and sorted(event["message_id"] for event in events["data"]) == ["p1", "p2"]
        assert get(f"{profiles}/email:x@y.io/traits", PROFILE_TOKEN)[1]["traits"] == {"email": "x@y.io"}
        server.stop()
    finally:
        server.kill()
    store = open_store(postgres_url)
    try:
        assert sorted(store.iter_event_ids(SPACE)) == ["p1", "p2", "p3"]
    finally:
        store.close()
