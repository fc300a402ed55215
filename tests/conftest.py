"""Fixtures shared by test modules: a real PostgreSQL database for this run, a fresh schema per test.

The server is the machine's (IDSTITCH_TEST_POSTGRES, default postgresql://root@127.0.0.1:5432/test);
`.ci/run` starts it when it is down. A test that needs it and cannot connect fails: it is never skipped.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from urllib.parse import quote

import psycopg
import pytest

ADMIN_URL = os.environ.get("IDSTITCH_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/test")


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
