"""Profile traits merged by timestamp: a newer value wins, so late-arriving old events never overwrite."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any, NamedTuple

from idstitch.core.messages import Message

__all__ = ["TraitValue", "account_trait_updates", "apply_trait_updates", "merge_traits", "user_trait_updates"]


class TraitValue(NamedTuple):
    """A trait's value and the message timestamp that set it; value None is a removal (kept as a tombstone)."""

    value: Any
    set_at: datetime


def user_trait_updates(message: Message) -> dict[str, Any]:
    """Traits a message sets on the person: `context.traits`, then identify's own `traits` on top."""
    context_traits = message.context.get("traits")
    updates: dict[str, Any] = dict(context_traits) if isinstance(context_traits, Mapping) else {}
    if message.type == "identify":
        updates.update(message.traits)
    return updates


def account_trait_updates(message: Message) -> dict[str, Any]:
    """Traits a `group` call sets on the account."""
    return dict(message.traits) if message.type == "group" else {}


def newer(candidate: TraitValue, current: TraitValue | None) -> bool:
    """Whether `candidate` replaces `current` (ties go to the later-processed message)."""
    return current is None or candidate.set_at >= current.set_at


def apply_trait_updates(
    current: Mapping[str, TraitValue], updates: Mapping[str, Any], at: datetime
) -> dict[str, TraitValue]:
    """The trait rows that change when `updates` arrive with timestamp `at`."""
    changed: dict[str, TraitValue] = {}
    for key, value in updates.items():
        candidate = TraitValue(value, at)
        if newer(candidate, current.get(key)):
            changed[key] = candidate
    return changed


def merge_traits(parent: Mapping[str, TraitValue], child: Mapping[str, TraitValue]) -> dict[str, TraitValue]:
    """Traits after a merge: per key the newest value wins (the parent's on a tie)."""
    merged = dict(parent)
    for key, value in child.items():
        existing = merged.get(key)
        if existing is None or value.set_at > existing.set_at:
            merged[key] = value
    return merged
