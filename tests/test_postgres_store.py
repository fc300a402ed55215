"""What only the PostgreSQL store has: connection errors, migrations raced by many processes, read-only use."""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

import psycopg
import pytest

from idstitch.config import Config
from idstitch.core.errors import ConfigError
from idstitch.core.messages import decode_message
from idstitch.engine import Engine
from idstitch.storage.base import SourceRecord
from idstitch.storage.migrations import read_migrations
from idstitch.storage.postgres import PostgresStore, lock_key
from idstitch.storage.urls import open_store, redact_url


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
        # Before: `error: store: InsufficientPrivilege: permission denied for table spaces`, naming
        # neither the store nor the grant the README's Roles gives for writing processes.
        assert (refused.returncode, refused.stderr) == (
            2,
            f"error: store {redact_url(reader_url)}: role {role} may not write the tables of schema "
            f"{schema} (permission denied for table spaces): grant it once with GRANT SELECT, INSERT, "
            f'UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"\n',
        )
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
    assert versions == [(version,) for version, _, _ in read_migrations("postgres")]


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


def _role_store_url(postgres_url: str, role: str) -> str:
    """`postgres_url` (a schema of its own, made by the admin role) for `role`, owner of that schema."""
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'ALTER SCHEMA "{schema}" OWNER TO "{role}"')
    url = postgres_url.replace("://root@", f"://{role}@", 1).replace("://postgres@", f"://{role}@", 1)
    assert role in url
    return url


def _drop_role(postgres_url: str, role: str) -> None:
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'ALTER ROLE "{role}" LOGIN')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,))
        admin.execute(f'REASSIGN OWNED BY "{role}" TO CURRENT_USER')
        admin.execute(f'DROP OWNED BY "{role}"')
        admin.execute(f'DROP ROLE "{role}"')


def _refuse_logins(postgres_url: str, role: str, *, refused: bool) -> None:
    """An outage of the server as `role` sees it: its connections dropped and new ones refused."""
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'ALTER ROLE "{role}" {"NOLOGIN" if refused else "LOGIN"}')
        if refused:
            admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", (role,)
            )


def test_while_the_server_is_unreachable_reads_and_writes_fail_at_once_and_work_again_when_it_is_back(
    postgres_url: str,
) -> None:
    """A PostgreSQL restart or outage. Before: a read waited out the pool's 30 s and raised PoolTimeout
    (the Profile API answered 500), a write waited 30 s per try for the engine's 2 minutes (a client saw
    its request hang 150 s, then `store_busy`), and once the server was back the pool's reconnection
    backoff (1, 2, 4 … 128 s) kept failing requests for up to a minute more."""
    from idstitch.storage.base import StoreUnavailable

    role = f"outage_{postgres_url.rsplit('search_path%3D', 1)[1]}"
    url = _role_store_url(postgres_url, role)
    try:
        store = open_store(url)
        try:
            engine = Engine(store, Config.default())
            message = decode_message(b'{"type": "identify", "userId": "u1"}', received_at=datetime.now(UTC))
            assert engine.ingest([message], space="default").outcomes[0].status == "resolved"
            _refuse_logins(postgres_url, role, refused=True)
            with pytest.raises(
                StoreUnavailable, match=r"cannot connect to PostgreSQL: .*not permitted to log in"
            ):
                store.sources()
            late = decode_message(b'{"type": "identify", "userId": "u2"}', received_at=datetime.now(UTC))
            with pytest.raises(StoreUnavailable, match=f"store postgresql://{role}@"):
                engine.ingest([late], space="default")
            _refuse_logins(postgres_url, role, refused=False)
            assert len(store.sources()) == 1  # the first read after the outage
            assert engine.ingest([late], space="default").outcomes[0].status == "resolved"
        finally:
            store.close()
    finally:
        _drop_role(postgres_url, role)


def test_an_ingest_rides_out_a_server_restart_within_its_outage_wait(postgres_url: str) -> None:
    """`idstitch ingest` (outage_wait) keeps trying while the server is down, and lands once it is back."""
    role = f"restart_{postgres_url.rsplit('search_path%3D', 1)[1]}"
    url = _role_store_url(postgres_url, role)
    try:
        store = PostgresStore(url)
        try:
            engine = Engine(store, Config.default(), outage_wait=60)
            _refuse_logins(postgres_url, role, refused=True)
            message = decode_message(b'{"type": "identify", "userId": "u1"}', received_at=datetime.now(UTC))
            outcome: list[str] = []
            thread = threading.Thread(
                target=lambda: outcome.append(engine.ingest([message], space="default").outcomes[0].status)
            )
            thread.start()
            deadline = time.monotonic() + 30
            while store._outage is None and time.monotonic() < deadline:  # the ingest has met the outage
                time.sleep(0.01)
            assert store._outage is not None and thread.is_alive()
            _refuse_logins(postgres_url, role, refused=False)
            thread.join(60)
            assert outcome == ["resolved"]
        finally:
            store.close()
    finally:
        _drop_role(postgres_url, role)


def test_an_application_role_with_table_rights_only_runs_on_a_schema_another_role_migrated(
    postgres_url: str,
) -> None:
    """The documented split: an owner migrates, the application role has USAGE on the schema and
    SELECT, INSERT, UPDATE, DELETE on its tables. Before: every process of that role failed at start-up
    with `permission denied for schema` from a CREATE TABLE IF NOT EXISTS run even on an up-to-date schema."""
    PostgresStore(postgres_url).close()  # migrated by the owner
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    role = f"app_{schema}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        admin.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
    app_url = postgres_url.replace("://root@", f"://{role}@", 1).replace("://postgres@", f"://{role}@", 1)
    try:
        store = open_store(app_url)
        try:
            engine = Engine(store, Config.default())
            message = decode_message(b'{"type": "identify", "userId": "u1"}', received_at=datetime.now(UTC))
            assert engine.ingest([message], space="default").outcomes[0].status == "resolved"
        finally:
            store.close()
    finally:
        _drop_role(postgres_url, role)


def test_a_role_that_may_not_create_the_schema_is_told_which_grant_is_missing(postgres_url: str) -> None:
    """Since PostgreSQL 15 no one but its owner may create tables in `public`. Before: `error: store:
    InsufficientPrivilege: permission denied for schema public LINE 1: CREATE TABLE IF NOT EXISTS …`."""
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    role = f"new_{schema}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
    url = postgres_url.replace("://root@", f"://{role}@", 1).replace("://postgres@", f"://{role}@", 1)
    try:
        with pytest.raises(ConfigError) as refused:
            open_store(url)
        assert str(refused.value).endswith(
            f"role {role} may not create the tables in schema {schema} (permission denied): "
            f'grant it once with GRANT CREATE ON SCHEMA "{schema}" TO "{role}", or let a role that may '
            "(the schema's owner) open the store once to create them"
        )
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'GRANT CREATE ON SCHEMA "{schema}" TO "{role}"')
        open_store(url).close()  # the grant the message names is enough
    finally:
        _drop_role(postgres_url, role)


def test_a_role_missing_the_schema_or_table_rights_of_roles_is_told_which_grant_is_missing(
    postgres_url: str,
) -> None:
    """The README's Roles split, with one of its grants forgotten. Before: without USAGE on the schema,
    `the search_path names no existing schema` (it exists: the role may not see it); with USAGE but no
    right on the tables, `error: store: InsufficientPrivilege: permission denied for table
    schema_migrations`, naming neither the store nor a grant."""
    PostgresStore(postgres_url).close()  # migrated by the owner
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    role = f"bare_{schema}"
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
    url = postgres_url.replace("://root@", f"://{role}@", 1).replace("://postgres@", f"://{role}@", 1)
    try:
        for read_only in (False, True):
            with pytest.raises(ConfigError) as refused:
                PostgresStore(url, read_only=read_only)
            assert str(refused.value).endswith(
                f"role {role} may not use schema {schema} (permission denied): "
                f'grant it once with GRANT USAGE ON SCHEMA "{schema}" TO "{role}"'
            )
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        for read_only in (False, True):
            with pytest.raises(ConfigError) as refused:
                PostgresStore(url, read_only=read_only)
            assert str(refused.value).endswith(
                f"role {role} may not read the tables of schema {schema} (permission denied for table "
                f"schema_migrations): grant it once with GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES "
                f'IN SCHEMA "{schema}" TO "{role}" (SELECT alone for reading commands)'
            )
        with psycopg.connect(postgres_url, autocommit=True) as admin:
            admin.execute(
                f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"'
            )
        PostgresStore(url).close()  # the grants the messages name are enough
    finally:
        _drop_role(postgres_url, role)


def _app_role(postgres_url: str, role: str, *, create: bool = False) -> str:
    """A role with the documented application rights on the URL's schema (CREATE too if asked); its URL."""
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute(f'CREATE ROLE "{role}" LOGIN')
        admin.execute(f'GRANT USAGE ON SCHEMA "{schema}" TO "{role}"')
        admin.execute(f'GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA "{schema}" TO "{role}"')
        if create:
            admin.execute(f'GRANT CREATE ON SCHEMA "{schema}" TO "{role}"')
    return postgres_url.replace("://root@", f"://{role}@", 1).replace("://postgres@", f"://{role}@", 1)


def test_an_application_role_on_a_schema_a_newer_idstitch_migrated_is_told_so(postgres_url: str) -> None:
    """An older worker restarted during an upgrade, after the owner migrated. Before: `role … may not
    create the tables … grant it once with GRANT CREATE ON SCHEMA`, a grant that changes nothing."""
    PostgresStore(postgres_url).close()
    latest = read_migrations("postgres")[-1][0]
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        admin.execute("INSERT INTO schema_migrations VALUES (%s, 'from_the_future', now())", (latest + 1,))
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    role = f"old_{schema}"
    app_url = _app_role(postgres_url, role)
    try:
        for read_only in (False, True):
            with pytest.raises(
                ConfigError, match=f"schema version {latest + 1}, newer than this build's {latest}"
            ):
                PostgresStore(app_url, read_only=read_only)
    finally:
        _drop_role(postgres_url, role)


def test_an_application_role_cannot_upgrade_the_schema_and_is_told_who_can(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new version's migration alters the tables, which only their owner may do, whatever the rights
    on the schema. Before: `grant it once with GRANT CREATE ON SCHEMA`, and with that grant the same
    error again."""
    migrations = read_migrations("postgres")
    with monkeypatch.context() as patch:  # the schema as the first release left it
        patch.setattr("idstitch.storage.postgres.read_migrations", lambda adapter: migrations[:1])
        PostgresStore(postgres_url).close()
    schema = postgres_url.rsplit("search_path%3D", 1)[1]
    with psycopg.connect(postgres_url, autocommit=True) as admin:
        owner = admin.execute("SELECT current_user").fetchone()[0]  # type: ignore[index]
    role = f"upg_{schema}"
    app_url = _app_role(postgres_url, role, create=True)
    try:
        with pytest.raises(ConfigError) as refused:
            open_store(app_url)
        assert str(refused.value).endswith(
            f"role {role} may not migrate schema {schema} from version 1 to {migrations[-1][0]}: only the "
            f"owner of its tables, role {owner}, may alter them; let {owner} run "
            "`idstitch migrate` on it once"
        ), str(refused.value)
        # The owner migrates, as the message says.
        env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
        done = subprocess.run(
            [sys.executable, "-m", "idstitch", "migrate", "--store", postgres_url],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert (done.returncode, done.stderr) == (0, ""), done.stderr
        assert done.stdout == (
            f"store {redact_url(postgres_url)} migrated from schema version 1 to {migrations[-1][0]}\n"
        )
        open_store(app_url).close()
    finally:
        _drop_role(postgres_url, role)


def test_a_search_path_naming_no_schema_is_said_so_when_reading_too(postgres_database: str) -> None:
    """Before: a reading command said the store `is at schema version 0` and to open it for writing,
    which then said that the search_path names no existing schema."""
    from conftest import _with_schema

    url = _with_schema(postgres_database, "no_such_schema")
    for read_only in (False, True):
        with pytest.raises(ConfigError, match="the search_path names no existing schema"):
            PostgresStore(url, read_only=read_only)


def test_errors_name_the_store_with_its_schema_as_migrate_does(postgres_database: str) -> None:
    """An error says `a wrong URL`, so it shows the URL's schema. Before: `error: store
    postgresql://root@127.0.0.1:5432/test holds no idstitch data yet …`, its search_path cut off, while
    `idstitch migrate` printed the same store with it; the password stays out of both."""
    from conftest import _with_schema

    url = _with_schema(postgres_database, "no_such_schema")
    for read_only in (False, True):
        with pytest.raises(ConfigError) as refused:
            PostgresStore(url, read_only=read_only)
        assert str(refused.value).startswith(f"store {redact_url(url)}: "), str(refused.value)
    secret = re.sub(r"://([^:@/]+)@", r"://\1:S3CRETPW@", url, count=1)
    assert "S3CRETPW" in secret
    with pytest.raises(ConfigError) as refused:
        PostgresStore(secret)
    assert "S3CRETPW" not in str(refused.value) and "search_path%3Dno_such_schema" in str(refused.value)


def test_a_large_batch_commits_in_transactions_that_fit_the_server_s_lock_table(
    postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: `idstitch ingest --batch-size 12000` took ~18,000 advisory locks in one transaction,
    failed with `out of shared memory` (max_locks_per_transaction), retried that for two minutes and
    gave up. A transaction now stops claiming at its lock budget and the rest goes on in the next one."""
    monkeypatch.setattr("idstitch.storage.postgres_transaction._LOCK_BUDGET", 12, raising=False)
    store = PostgresStore(postgres_url)
    held: list[int] = []
    opened = store.transaction

    @contextmanager
    def counted() -> Iterator[Any]:
        with opened() as transaction:
            yield transaction
            held.append(len(transaction._locks))

    try:
        monkeypatch.setattr(store, "transaction", counted)
        engine = Engine(store, Config.default())
        raws = [
            f'{{"type": "identify", "userId": "u{n}", "anonymousId": "a{n}", "messageId": "m{n}"}}'.encode()
            for n in range(20)
        ]
        messages = [decode_message(raw, received_at=datetime.now(UTC)) for raw in raws]
        outcomes = engine.ingest(messages, space="default").outcomes
        assert [outcome.status for outcome in outcomes] == ["resolved"] * 20
        assert len(held) > 1 and max(held) <= 12 + 4  # the budget, and the one message that crossed it
        assert sorted(store.iter_event_ids("default")) == sorted(f"m{n}" for n in range(20))
    finally:
        monkeypatch.undo()
        store.close()
