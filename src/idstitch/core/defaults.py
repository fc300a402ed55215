"""Default identity rules of a new space (DEFAULTS.md), kept as data so a space can override every row."""

from __future__ import annotations

from typing import Any, Final

__all__ = [
    "DEFAULT_BLOCKED_EXACT",
    "DEFAULT_BLOCKED_REGEX",
    "DEFAULT_CUSTOM_RULE",
    "DEFAULT_IDENTIFIER_RULES",
    "DEFAULT_MAX_IDENTIFIERS",
    "DEFAULT_MAX_LEARNED_TYPES",
    "DEFAULT_MAX_MERGES",
]

# One row per identifier type, in priority order; the shape is that of a `[spaces.X.identifiers.T]` table.
DEFAULT_IDENTIFIER_RULES: Final[tuple[dict[str, Any], ...]] = (
    {"type": "user_id", "priority": 1, "limit": 1, "window": "ever", "merge": True},
    {
        "type": "email",
        "priority": 2,
        "limit": 5,
        "window": "annually",
        "merge": True,
        "normalise": "trim_lower",
    },
    {"type": "android.id", "priority": 3, "limit": 5, "window": "annually", "merge": True},
    {"type": "android.idfa", "priority": 4, "limit": 5, "window": "annually", "merge": True},
    {"type": "android.push_token", "priority": 5, "limit": 5, "window": "annually", "merge": False},
    {"type": "anonymous_id", "priority": 6, "limit": 5, "window": "weekly", "merge": True},
    {"type": "cross_domain_id", "priority": 7, "limit": 5, "window": "weekly", "merge": True},
    {"type": "ga_client_id", "priority": 8, "limit": 5, "window": "weekly", "merge": True},
    {"type": "ios.id", "priority": 9, "limit": 5, "window": "annually", "merge": True},
    {"type": "ios.idfa", "priority": 10, "limit": 5, "window": "annually", "merge": True},
    {"type": "ios.push_token", "priority": 11, "limit": 5, "window": "annually", "merge": False},
    {
        "type": "group_id",
        "priority": 1,
        "limit": 1,
        "window": "ever",
        "merge": True,
        "collection": "accounts",
    },
)

# Custom types (context.externalIds, declared trait keys) get these unless configured.
DEFAULT_CUSTOM_RULE: Final[dict[str, Any]] = {"limit": 5, "window": "ever", "merge": True}

DEFAULT_BLOCKED_EXACT: Final[tuple[str, ...]] = (
    "-1",
    "null",
    "undefined",
    "none",
    "nil",
    "anonymous",
    "unknown",
    "[object Object]",
    "",
)
# DEFAULTS.md blocks the empty string; a value of only whitespace is as empty to a person, and kept it
# would fuse everyone whose client sends `" "` (user_ids are kept exactly as sent, untrimmed).
DEFAULT_BLOCKED_REGEX: Final[tuple[str, ...]] = ("^[0-]*$", r"^\s+$")

DEFAULT_MAX_MERGES: Final = 100
DEFAULT_MAX_IDENTIFIERS: Final = 1000
# Beyond DEFAULTS.md: custom types learned from context.externalIds per space. Any client holding a
# public write key can name a new type in every message, and each would become a rule for good.
DEFAULT_MAX_LEARNED_TYPES: Final = 100
