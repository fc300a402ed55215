"""Write keys: where a request's key comes from (Basic auth or body) and which (space, source) it opens."""

from __future__ import annotations

import asyncio
import base64
import binascii
import time
from dataclasses import dataclass

from idstitch.engine import Engine

__all__ = ["Source", "WriteKeys", "basic_user"]


@dataclass(frozen=True, slots=True)
class Source:
    """The space and source a write key belongs to."""

    space: str
    name: str


def basic_user(authorization: str | None) -> str | None:
    """The user name of an HTTP Basic `Authorization` header (the write key), None when there is none."""
    if not authorization:
        return None
    scheme, _, credentials = authorization.strip().partition(" ")
    if scheme.lower() != "basic":
        return None  # e.g. Bearer (OAuth): the write key then comes in the body
    try:
        decoded = base64.b64decode(credentials.strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    # "key:" is the documented form; a bare "key" without the colon is accepted for old clients.
    user = decoded.partition(":")[0]
    return user or None


class WriteKeys:
    """Looks write keys up through the engine and caches the answers, known and unknown.

    Lookups that miss the cache read the store on a worker thread, never on the event loop; unknown
    keys are remembered for a while (in a bounded table) so that a client with a wrong key cannot turn
    every request into a store read.
    """

    def __init__(self, engine: Engine, *, unknown_ttl: float = 10.0, max_unknown: int = 10_000) -> None:
        self._engine = engine
        self._known: dict[str, Source] = {}
        self._unknown: dict[str, float] = {}
        self._unknown_ttl = unknown_ttl
        self._max_unknown = max_unknown

    async def resolve(self, write_key: str) -> Source | None:
        """The source of a write key, or None when no configured source has it."""
        found = self._known.get(write_key)
        if found is not None:
            return found
        expires = self._unknown.get(write_key)
        if expires is not None and expires > time.monotonic():
            return None
        found = await asyncio.to_thread(self._lookup, write_key)
        if found is None:
            if len(self._unknown) >= self._max_unknown:
                self._unknown.clear()
            self._unknown[write_key] = time.monotonic() + self._unknown_ttl
        else:
            self._known[write_key] = found
            self._unknown.pop(write_key, None)
        return found

    def _lookup(self, write_key: str) -> Source | None:
        record = self._engine.source_for_write_key(write_key)
        return None if record is None else Source(record.space, record.name)
