"""Per-token rate limits of the Profile API: token buckets, in one process or shared by several."""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from hashlib import blake2b
from multiprocessing.context import BaseContext
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Protocol

__all__ = ["BucketTable", "LocalBuckets", "RateLimiter", "SharedBuckets"]


class BucketTable(Protocol):
    """Where the buckets live: (allowance, last refill) per token, read and written under `locked()`."""

    def locked(self) -> contextlib.AbstractContextManager[None]:
        """Hold the table for one read-modify-write."""
        ...

    def get(self, token: str) -> tuple[float, float] | None:
        """The bucket of a token, None if it has none yet."""
        ...

    def put(self, token: str, allowance: float, last: float) -> None:
        """Store the bucket of a token."""
        ...


class LocalBuckets:
    """Buckets in this process's memory (one event loop: no lock needed)."""

    def __init__(self, max_tokens: int = 100_000) -> None:
        self._buckets: dict[str, tuple[float, float]] = {}
        self._max_tokens = max_tokens

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Nothing to hold: one thread uses this table."""
        yield

    def get(self, token: str) -> tuple[float, float] | None:
        """The bucket of a token, None if it has none yet."""
        return self._buckets.get(token)

    def put(self, token: str, allowance: float, last: float) -> None:
        """Store the bucket of a token."""
        if len(self._buckets) >= self._max_tokens and token not in self._buckets:
            self._buckets.clear()  # only configured tokens get here, so this is a safety bound only
        self._buckets[token] = (allowance, last)


class SharedBuckets:
    """Buckets in shared memory, so that N Profile API worker processes enforce one limit, not N.

    An open-addressed table of (fingerprint, allowance, last refill) triples of doubles. Fingerprints
    are 52-bit hashes of the token (exact in a double; never 0, which marks a free slot). Pass the
    object to the worker processes when they are created (it cannot be pickled later).
    """

    def __init__(self, context: BaseContext, slots: int = 1024) -> None:
        self._slots = slots
        self._array: SynchronizedArray[float] = context.Array("d", slots * 3)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the table's lock (shared by every process) for one read-modify-write."""
        with self._array.get_lock():
            yield

    def _slot(self, token: str, claim: bool) -> int | None:
        digest = int.from_bytes(blake2b(token.encode(), digest_size=8).digest(), "big")
        fingerprint = float((digest >> 12) | 1)
        array = self._array  # its lock is re-entrant: indexing under locked() is safe
        start = digest % self._slots
        for step in range(self._slots):
            slot = (start + step) % self._slots
            held = array[slot * 3]
            if held == fingerprint:
                return slot
            if held == 0.0:
                if not claim:
                    return None
                array[slot * 3] = fingerprint
                return slot
        if not claim:
            return None
        # Full (more tokens than slots): start again; a bucket refilled early only lets a burst through.
        for index in range(len(array)):
            array[index] = 0.0
        return self._slot(token, claim)

    def get(self, token: str) -> tuple[float, float] | None:
        """The bucket of a token, None if it has none yet (call under `locked()`)."""
        slot = self._slot(token, claim=False)
        if slot is None:
            return None
        array = self._array
        return array[slot * 3 + 1], array[slot * 3 + 2]

    def put(self, token: str, allowance: float, last: float) -> None:
        """Store the bucket of a token (call under `locked()`)."""
        slot = self._slot(token, claim=True)
        assert slot is not None
        array = self._array
        array[slot * 3 + 1] = allowance
        array[slot * 3 + 2] = last


class RateLimiter:
    """A token bucket per Profile API token: `rate` requests a second, bursts up to one second's worth.

    The clock must be one every process sharing the buckets reads alike: time.monotonic is
    CLOCK_MONOTONIC, system-wide on Linux.
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, buckets: BucketTable | None = None
    ) -> None:
        self._clock = clock
        self._buckets: BucketTable = buckets if buckets is not None else LocalBuckets()

    def retry_after(self, token: str, rate: int) -> int:
        """0 when the request may go ahead (and is counted), else whole seconds to wait."""
        if rate <= 0:
            return 0
        with self._buckets.locked():
            now = self._clock()
            allowance, last = self._buckets.get(token) or (float(rate), now)
            allowance = min(float(rate), allowance + max(0.0, now - last) * rate)
            if allowance < 1.0:
                self._buckets.put(token, allowance, now)
                return max(1, math.ceil((1.0 - allowance) / rate))
            self._buckets.put(token, allowance - 1.0, now)
            return 0
