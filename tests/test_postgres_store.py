"""What only the PostgreSQL store has: connection errors, migrations raced by many processes, read-only use."""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from idstitch.config import Config
from idstitch.core.errors import ConfigError
from idstitch.core.messages import decode_message
from idstitch.engine import Engine
from idstitch.storage.base import SourceRecord
from idstitch.storage.postgres import PostgresStore, lock_key
from idstitch.storage.urls import open_store


def test_an_unreachable_server_or_a_refused_login_is_one_clear_line_and_exit_2() -> None:
    for url, reason in [
        ("postgresql://root@127.0.0.1:1/test", "Connection refused"),
        ("postgresql://nobody@127.0.0.1:5432/test", 'role "nobody" does not exist'),
    ]:
        with pytest.raises(ConfigError, match=reason):
            open_store(url)
        done = subprocess.run(
            [sys.executable, "-m", "idstitch", "stats", "--store", url],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        assert done.stderr.count("\n") == 1 and reason in done.stderr, done.stderr


def test_a_malformed_url_never_echoes_its_password() -> None:
    # libpq quotes a URL it cannot parse in its error, password included.
    with pytest.raises(ConfigError) as refused:
        open_store("postgresql://postgres:S3CRETPW@[::1:5432/a")
    assert "S3CRETPW" not in str(refused.value) and "…" in str(refused.value)


def test_a_bad_connect_timeout_in_the_url_is_refused_at_once() -> None:
    # Before: the check connected with its own timeout, then every pooled connection failed for 30 s.
    with pytest.raises(ConfigError, match="connect_timeout"):
        open_store("postgresql://root@127.0.0.1:5432/test?connect_timeout=abc")


def test_reading_commands_need_only_select_rights_and_say_what_a_missing_right_is(postgres_url: str) -> None:
    """stats, profile and keys open the store read-only (no migration, no CREATE); a write refused is one line."""
    store = open_store(postgres_url)
    try:
        engine = Engine(store, Config.default())
        message = decode_message(b'{"type": "identify", "userId": "u1"}', received_at=datetime.now(UTC))
        engine.ingest([message], space="default")
    finally:
        store.close()
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    role = f"reader_{schema}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        admin.execute(f'GRANT SELECT ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
    reader_url = postgres_url.replace("://root@", f"://{role}@", 1).replace("://postgres@", f"://{role}@", 1)
    assert role in reader_url
    try:

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            command = [sys.executable, "-m", "idstitch", *args, "--store", reader_url]
            return subprocess.run(command, capture_output=True, text=True, timeout=60)

        for args in (["stats", "--json"], ["profile", "user_id:u1", "--json"], ["keys", "--json"]):
            done = run(*args)
            assert done.returncode == 0, (args, done.stderr)
        assert json.loads(run("stats", "--json").stdout)[0]["profiles"] == 1
        refused = run("ingest", "-")
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert refused.stderr.count("\n") == 1 and "permission denied" in refused.stderr, refused.stderr
    finally:
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'DROP OWNED BY "{role}"')
            admin.execute(f'DROP ROLE "{role}"')


def _open_and_close(url: str) -> None:
    open_store(url).close()


def test_processes_that_start_together_migrate_the_schema_once(postgres_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    processes = [context.Process(target=_open_and_close, args=(postgres_url,)) for _ in range(4)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=120)
        assert process.exitcode == 0
    with psycopg.connect(postgres_url) as db:
        versions = db.execute("SELECT version FROM schema_migrations ORDER BY version").fetchall()
    assert versions == [(1,), (2,)]


def _first_run(url: str, ready: Any, created: Any) -> None:
    store = open_store(url)
    try:
        ready.wait()
        engine = Engine(store, Config.default())
        created.put(
            (
                [record.write_key for record in engine.created_write_keys],
                [record.token for record in engine.created_tokens],
            )
        )
    finally:
        store.close()


def test_first_runs_started_together_agree_on_one_generated_write_key_and_tokens(postgres_url: str) -> None:
    context = multiprocessing.get_context("spawn")
    ready, created = context.Event(), context.Queue()
    processes = [context.Process(target=_first_run, args=(postgres_url, ready, created)) for _ in range(4)]
    for process in processes:
        process.start()
    ready.set()
    announced = [created.get(timeout=120) for _ in processes]
    for process in processes:
        process.join(timeout=60)
        assert process.exitcode == 0
    store = open_store(postgres_url)
    try:
        stored = [source.write_key for source in store.sources()]
        tokens = store.tokens()
    finally:
        store.close()
    assert len(stored) == 1
    assert (
        sorted(key for keys, _ in announced for key in keys) == stored
    )  # only the key that counts is printed
    assert sorted(token.kind for token in tokens) == ["admin", "read"]  # one of each, not one per process
    assert sorted(token for _, made in announced for token in made) == sorted(token.token for token in tokens)


def test_read_only_reads_a_migrated_store_and_refuses_writes(
    postgres_url: str, postgres_database: str
) -> None:
    writer = open_store(postgres_url)
    writer.upsert_source(SourceRecord("s", "web", "wk_1"))
    reader = open_store(postgres_url, read_only=True)
    try:
        assert reader.sources() == [SourceRecord("s", "web", "wk_1")]
        with pytest.raises(ConfigError, match="read-only"), reader.transaction():
            pass
        with pytest.raises(ConfigError, match="read-only"):
            reader.upsert_source(SourceRecord("s", "app", "wk_2"))
    finally:
        reader.close()
        writer.close()
    from conftest import new_schema

    with pytest.raises(ConfigError, match=r"holds no idstitch data yet \(schema version 0\)"):
        PostgresStore(new_schema(postgres_database), read_only=True)


def test_lock_keys_differ_by_kind_space_and_parts_and_are_signed_64_bit() -> None:
    keys = {
        lock_key("i", "s", "users", "user_id", "u1"),
        lock_key("i", "s", "users", "user_id", "u2"),
        lock_key("i", "t", "users", "user_id", "u1"),
        lock_key("p", "s", "users", "user_id", "u1"),
        lock_key("i", "s", "users", "user_id:u1"),  # no confusion when a part holds the separator's neighbour
    }
    assert len(keys) == 5
    assert all(-(2**63) <= key < 2**63 for key in keys)


def test_connections_that_died_in_the_pool_are_replaced_not_handed_out(postgres_url: str) -> None:
    """A PostgreSQL restart, failover or pg_terminate_backend between requests costs no request."""
    store = open_store(postgres_url)
    try:
        engine = Engine(store, Config.default())
        assert len(store.sources()) == 1
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            row = admin.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()"
            ).fetchone()
        assert row is not None and row[0] >= 1
        assert len(store.sources()) == 1  # a read
        message = decode_message(b'{"type": "identify", "userId": "u1"}', received_at=datetime.now(UTC))
        assert engine.ingest([message], space="default").outcomes[0].status == "resolved"  # a write
    finally:
        store.close()


def test_a_claim_after_a_rolled_back_savepoint_holds_its_locks_again(postgres_url: str) -> None:
    """ROLLBACK TO SAVEPOINT releases the advisory locks taken since: what they guarded (a message id,
    an identifier) must be locked again by the next claim, not taken as still held."""
    from idstitch.core.identifiers import Identifier

    store = open_store(postgres_url)
    key = Identifier("anonymous_id", "k1")
    locks = [lock_key("m", "s", "m9"), lock_key("i", "s", "users", "anonymous_id", "k1")]
    try:
        with store.transaction() as tx, psycopg.connect(postgres_url, autocommit=True) as other:
            tx.claim("s", "m1", [Identifier("user_id", "u1")])
            try:
                with tx.savepoint():
                    tx.set_traits("s", "use_x", {"a": 1}, datetime(2026, 1, 1, tzinfo=UTC))
                    tx.claim("s", "m9", [key])  # sends the held trait, and so the savepoint, first
                    raise RuntimeError("a bad message")
            except RuntimeError:
                pass
            tx.claim("s", "m9", [key])
            assert not tx.has_message("s", "m9")
            tx.load_view("s", "users", [key])
            free = other.execute(
                "SELECT key FROM unnest(%s::bigint[]) AS key WHERE pg_try_advisory_xact_lock(key)", (locks,)
            ).fetchall()
            assert free == []
    finally:
        store.close()


def test_a_store_a_newer_idstitch_migrated_is_refused_for_writing_and_reading(postgres_url: str) -> None:
    """As on SQLite: before, the writer wrote on as if nothing had changed, and a reader said to open the
    store for writing "to migrate it", which an older build cannot do."""
    PostgresStore(postgres_url).close()
    with psycopg.connect(postgres_url, autocommit=True) as db:
        db.execute("INSERT INTO schema_migrations VALUES (99, 'future', now())")
    for read_only in (False, True):
        with pytest.raises(ConfigError, match=r"schema version 99, newer than this build's \d+: .* upgrade"):
            PostgresStore(postgres_url, read_only=read_only)
    with psycopg.connect(postgres_url) as db:
        assert db.execute("SELECT count(*) FROM spaces").fetchone() == (0,)


def test_a_failed_analyze_after_the_commit_does_not_report_the_commit_as_failed(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ANALYZE runs after the transaction committed; a connection lost then used to raise out of
    `transaction()`, so a client was told its stored messages had failed (and resent them)."""
    store = PostgresStore(postgres_url)
    try:

        def lost(*_args: Any, **_kwargs: Any) -> Any:
            raise psycopg.OperationalError("server closed the connection unexpectedly")

        monkeypatch.setattr(store, "_analyze_at", 1)
        monkeypatch.setattr(store._pool, "connection", lost)
        store._grown(1)  # logged, not raised
        assert store._analyze_at == 4
    finally:
        monkeypatch.undo()
        store.close()
