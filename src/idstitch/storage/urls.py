"""Store URLs in SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute.db, sqlite://,
and libpq's for PostgreSQL: postgresql://user@host:port/db?options=-csearch_path%3Dschema."""

from __future__ import annotations

import re

from idstitch.core.errors import ConfigError
from idstitch.storage.base import Store

__all__ = ["in_memory", "open_store", "redact_url", "without_password"]

_USER_PASSWORD = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://[^/@:]*):[^/@]*@")
# libpq's `sslpassword` (the client key's passphrase) is as secret as `password`.
_QUERY_PASSWORD = re.compile(r"([?&](?:ssl)?password=)[^&]*")
_PASSWORDS = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/@:]*:([^/@]+)@|[?&](?:ssl)?password=([^&]+)")


def redact_url(url: str) -> str:
    """The URL as messages and reports show it: its password (`user:password@`, `?password=`) as `…`."""
    return _QUERY_PASSWORD.sub(r"\1…", _USER_PASSWORD.sub(r"\1:…@", url))


def without_password(text: str, url: str) -> str:
    """`text` with the URL's password as `…`: libpq quotes a URL it cannot parse, password and all."""
    for found in _PASSWORDS.finditer(url):
        text = text.replace(found.group(1) or found.group(2), "…")
    return text


_SQLITE_IN_MEMORY = ("", "//", "///:memory:", "//:memory:")


def in_memory(url: str) -> bool:
    """Whether the URL names a store in this process's memory, gone when it exits."""
    if url.startswith("sqlite:"):
        return url.removeprefix("sqlite:") in _SQLITE_IN_MEMORY
    return url in ("memory://", "memory:")


def open_store(url: str, *, read_only: bool = False) -> Store:
    """Open (and migrate) the store a URL names; `read_only` opens an existing store for reads only."""
    if url.startswith("sqlite:"):
        from idstitch.storage.sqlite import SQLiteStore

        rest = url.removeprefix("sqlite:")
        if rest in _SQLITE_IN_MEMORY:
            return SQLiteStore(":memory:", url)
        if not rest.startswith("///"):
            raise ConfigError(
                f"store URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        path = rest[3:]
        if not path:
            # sqlite3 would open a private temporary database: everything written would vanish unseen.
            raise ConfigError(
                f"store URL {url!r} names no file: use sqlite:///path.db (or sqlite:// in memory)"
            )
        if "?" in path:
            raise ConfigError(f"store URL {url!r}: query parameters are not supported in SQLite URLs")
        return SQLiteStore(path, url, read_only=read_only)
    if url in ("memory://", "memory:"):
        from idstitch.storage.memory import MemoryStore

        if read_only:
            raise ConfigError("a memory store is private to its process and cannot be opened read-only")
        return MemoryStore(url)
    if url.startswith(("postgresql:", "postgres:")):
        from idstitch.storage.postgres import PostgresStore

        return PostgresStore(url, read_only=read_only)
    raise ConfigError(
        f"store URL {redact_url(url)!r}: unknown scheme (expected sqlite:///path.db or postgresql://user@host/db)"
    )
