"""Store URLs in SQLAlchemy's convention: sqlite:///relative.db, sqlite:////absolute.db, sqlite://."""

from __future__ import annotations

from idstitch.core.errors import ConfigError
from idstitch.storage.base import Store

__all__ = ["open_store"]


def open_store(url: str) -> Store:
    """Open (and migrate) the store a URL names."""
    if url.startswith("sqlite:"):
        from idstitch.storage.sqlite import SQLiteStore

        rest = url.removeprefix("sqlite:")
        if rest in ("", "//", "///:memory:", "//:memory:"):
            return SQLiteStore(":memory:", url)
        if not rest.startswith("///"):
            raise ConfigError(
                f"store URL {url!r}: use sqlite:///relative/path.db or sqlite:////absolute/path.db"
            )
        return SQLiteStore(rest[3:], url)
    if url in ("memory://", "memory:"):
        from idstitch.storage.memory import MemoryStore

        return MemoryStore(url)
    if url.startswith(("postgresql:", "postgres:")):
        raise ConfigError(f"store URL {url!r}: the PostgreSQL store is not part of this build yet")
    raise ConfigError(f"store URL {url!r}: unknown scheme (expected sqlite:///path.db)")
