"""Fixtures shared by test modules: the machine's real PostgreSQL and NATS JetStream.

PostgreSQL (IDSTITCH_TEST_POSTGRES, default postgresql://root@127.0.0.1:5432/test): a database for this
run, a fresh schema per test. NATS (IDSTITCH_TEST_NATS, default nats://127.0.0.1:4222): a stream and
subject prefix per test. `.ci/run` starts either when it is down. A test that needs one and cannot
connect fails: it is never skipped.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote

import nats
import nats.js.errors
import psycopg
import pytest

ADMIN_URL = os.environ.get("IDSTITCH_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/test")
NATS_URL = os.environ.get("IDSTITCH_TEST_NATS", "nats://127.0.0.1:4222")
RUN = secrets.token_hex(4)  # this run's streams and subjects: never another run's
_numbers = itertools.count(1)


def _with_database(url: str, database: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0] + "/" + database
    return f"{base}?{query}" if query else base


def _with_schema(url: str, schema: str) -> str:
    separator = "&" if "?" in url else "?"
    return f"{url}{separator}options={quote(f'-csearch_path={schema}')}"


@pytest.fixture(scope="session")
def postgres_database() -> Iterator[str]:
    """A new database for this test run (dropped afterwards); its URL."""
    name = f"idstitch_test_{secrets.token_hex(4)}"
    try:
        admin = psycopg.connect(ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as error:
        pytest.fail(f"PostgreSQL is needed at {ADMIN_URL} (set IDSTITCH_TEST_POSTGRES): {error}", False)
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
        try:
            yield _with_database(ADMIN_URL, name)
        finally:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def new_schema(database_url: str) -> str:
    """A fresh, empty schema in the run's database; a store URL that uses it."""
    schema = f"t_{secrets.token_hex(6)}"
    with psycopg.connect(database_url, autocommit=True) as db:
        db.execute(f'CREATE SCHEMA "{schema}"')
    return _with_schema(database_url, schema)


@pytest.fixture
def postgres_url(postgres_database: str) -> str:
    """A store URL of a fresh, empty schema."""
    return new_schema(postgres_database)


@pytest.fixture(scope="module")
def nats_url() -> str:
    """The real NATS server; the test fails (it is never skipped) when it cannot be reached."""

    seen: list[Exception] = []

    async def remember(error: Exception) -> None:
        seen.append(error)

    async def probe() -> None:
        client = await nats.connect(NATS_URL, allow_reconnect=False, connect_timeout=3, error_cb=remember)
        try:
            await client.jetstream().account_info()  # JetStream enabled, not just NATS
        finally:
            await client.close()

    try:
        asyncio.run(asyncio.wait_for(probe(), 10))
    except Exception as error:
        cause = seen[-1] if seen else error
        pytest.fail(
            f"NATS JetStream is not reachable at {NATS_URL} ({type(cause).__name__}: {cause}). The queue "
            "mode tests need a running nats-server with JetStream (`nats-server -js`; .ci/run starts one), "
            "or IDSTITCH_TEST_NATS set to one.",
            pytrace=False,
        )
    return NATS_URL


@pytest.fixture
def queue_url(nats_url: str) -> Iterator[str]:
    """A queue URL with a stream and subject prefix of this test alone; the stream is deleted afterwards."""
    number = next(_numbers)
    stream = f"IDSTITCH_TEST_{RUN}_{number}"
    subject = f"idstitch-test-{RUN}-{number}.ingest"
    # A short ack_wait: a killed worker's messages come back to the next one within seconds.
    yield f"{nats_url}?stream={stream}&subject={subject}&ack_wait=2"
    asyncio.run(_delete_stream(nats_url, stream))


async def _delete_stream(url: str, stream: str) -> None:
    client = await nats.connect(url, allow_reconnect=False, connect_timeout=3)
    try:
        await client.jetstream().delete_stream(stream)
    except nats.js.errors.NotFoundError:
        pass  # the test failed before anything created it
    finally:
        await client.close()
