"""Datetimes as integer microseconds since the epoch: how both adapters store time."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["from_micros", "to_micros"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICROSECOND: Final = timedelta(microseconds=1)


def to_micros(value: datetime) -> int:
    """Exact integer microseconds (no float rounding)."""
    return (value - _EPOCH) // _MICROSECOND


# The same few times come back message after message (a returning visitor's last-seen): building a
# datetime costs more than finding it. Bounded by emptying: a miss only costs the building.
_DATETIMES: dict[int, datetime] = {}
_DATETIMES_BOUND: Final = 1 << 16


def from_micros(value: int) -> datetime:
    """The aware UTC datetime of a microsecond count."""
    found = _DATETIMES.get(value)
    if found is None:
        if len(_DATETIMES) >= _DATETIMES_BOUND:
            _DATETIMES.clear()
        found = _DATETIMES[value] = _EPOCH + timedelta(0, 0, value)
    return found
