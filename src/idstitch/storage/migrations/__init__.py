"""Numbered schema migrations, one folder per adapter: NNNN_name.sql, applied in order, each once."""

from __future__ import annotations

from importlib import resources

__all__ = ["read_migrations"]


def read_migrations(adapter: str) -> list[tuple[int, str, str]]:
    """An adapter's migrations as (number, name, SQL), in order."""
    found = []
    for entry in resources.files(f"{__name__}.{adapter}").iterdir():
        if entry.name.endswith(".sql"):
            number, _, name = entry.name.removesuffix(".sql").partition("_")
            found.append((int(number), name, entry.read_text(encoding="utf-8")))
    return sorted(found)
