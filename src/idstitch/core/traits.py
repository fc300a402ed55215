"""The traits a message sets: on the person (`context.traits`, identify's `traits`) and on the account
(group's `traits`). The stores keep per key the value with the newest timestamp, so a late-arriving old
event never overwrites; on a tie, the later-ingested message's."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from idstitch.core.messages import Message

__all__ = ["account_trait_updates", "user_trait_updates"]


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
