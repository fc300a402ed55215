"""Typed errors of the core; edges turn them into HTTP problems or CLI messages."""

from __future__ import annotations

__all__ = ["ConfigError", "IdstitchError", "InvalidEvent", "RuleViolation"]


class IdstitchError(Exception):
    """Base class of every error idstitch raises on purpose."""


class InvalidEvent(IdstitchError):
    """A message that does not follow the Segment spec; `field` names where, `reason` says why."""

    def __init__(self, field: str, reason: str, message_id: str | None = None) -> None:
        self.field = field
        self.reason = reason
        self.message_id = message_id  # the id the client sent, when known: to tell it which one failed
        super().__init__(f"{field}: {reason}" if field else reason)


class RuleViolation(IdstitchError):
    """Identity rules that cannot be applied as written (a limit below 1, an unknown window, a bad regex)."""


class ConfigError(IdstitchError):
    """A configuration file or environment variable that cannot be used as given."""
