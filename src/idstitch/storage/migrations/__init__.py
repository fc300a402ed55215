"""Numbered schema migrations, one folder per adapter: NNNN_name.sql, applied in order, each once."""

from __future__ import annotations

from importlib import resources

from idstitch.core.errors import ConfigError

__all__ = ["read_migrations", "refuse_newer_schema", "refuse_older_schema"]


def read_migrations(adapter: str) -> list[tuple[int, str, str]]:
    """An adapter's migrations as (number, name, SQL), in order."""
    found = []
    for entry in resources.files(f"{__name__}.{adapter}").iterdir():
        if entry.name.endswith(".sql"):
            number, _, name = entry.name.removesuffix(".sql").partition("_")
            found.append((int(number), name, entry.read_text(encoding="utf-8")))
    return sorted(found)


def refuse_newer_schema(store: str, version: int, latest: int) -> None:
    """Raise ConfigError for a store a newer idstitch migrated: this build would write what that one does
    not expect, and no older build can migrate it back."""
    if version > latest:
        raise ConfigError(
            f"store {store} is at schema version {version}, newer than this build's {latest}: "
            "it was written by a newer idstitch; upgrade idstitch to open it"
        )


def refuse_older_schema(store: str, version: int, latest: int) -> None:
    """Raise ConfigError for a reader of a store this build's migrations have not reached (it cannot migrate)."""
    if version == 0:
        # No migration at all: a wrong URL or path far more often than an old store.
        raise ConfigError(
            f"store {store} holds no idstitch data yet (schema version 0): "
            "a wrong URL, or run `idstitch ingest FILE` on it first"
        )
    if version < latest:
        raise ConfigError(
            f"store {store} is at schema version {version}, this build reads {latest}: "
            "run `idstitch migrate` on it (or any command that writes) to migrate it"
        )
