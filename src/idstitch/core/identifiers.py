"""Reading identifiers out of a Segment message: sources (SPEC §2), normalisation and blocked values."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import cache
from typing import Any, NamedTuple

import msgspec

from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import Message, decimal_string
from idstitch.core.rules import IdentityRules, SourcePolicy

__all__ = [
    "DAMAGED_CHARACTER",
    "DAMAGED_REASON",
    "MAX_IDENTIFIER_BYTES",
    "NO_IDENTIFIER",
    "Dropped",
    "Extraction",
    "Identifier",
    "drop_rule",
    "extract_identifiers",
    "normalise_value",
    "parse_identifier",
    "require_identifier",
]


class Identifier(NamedTuple):
    """One external id: `type:value` in a collection (`users` or `accounts`)."""

    type: str
    value: str
    collection: str = "users"

    def __str__(self) -> str:
        return f"{self.type}:{self.value}"


class Dropped(NamedTuple):
    """An identifier a message carried that was not used, and the rule that dropped it."""

    identifier: Identifier
    rule: str


class Extraction(msgspec.Struct, frozen=True, gc=False):
    """What a message carries, after normalisation, blocking and source policy."""

    users: tuple[Identifier, ...]
    accounts: tuple[Identifier, ...]
    dropped: tuple[Dropped, ...]
    # alias: what the previousId may be, each normalised as its type is, user_id first (the graph
    # decides: a known user_id, else an anonymous_id; then the source's policy applies)
    alias_previous: tuple[Identifier, ...] = ()

    @property
    def is_empty(self) -> bool:
        """Whether nothing usable is left (the message is unresolved)."""
        return not self.users and not self.accounts and not self.alias_previous


NO_IDENTIFIER = (
    "message carries no identifier: needs userId, anonymousId, traits.email, "
    "context.externalIds or another configured identifier"
)


def require_identifier(extraction: Extraction) -> None:
    """Reject a message that carries no identifier at all, not even a dropped one (InvalidEvent)."""
    if extraction.is_empty and not extraction.dropped:
        raise InvalidEvent("", NO_IDENTIFIER)


def parse_identifier(text: str) -> Identifier:
    """`type:value` → Identifier (type lower-cased; the value may itself contain colons)."""
    identifier_type, separator, value = text.partition(":")
    if not separator or not identifier_type or not value:
        raise ValueError(f"{text!r} is not of the form type:value")
    collection = "accounts" if identifier_type.lower() == "group_id" else "users"
    return Identifier(identifier_type.lower(), value, collection)


def normalise_value(value: str, how: str) -> str:
    """Apply a type's normalisation (`exact`, `trim`, `lower`, `trim_lower`)."""
    if how == "exact":
        return value
    if how == "trim":
        return value.strip()
    if how == "lower":
        return value.lower()
    return value.strip().lower()


def _as_value(raw: object) -> str | None:
    # Values are strings; numbers become their decimal string; null, missing and "" are absent.
    if raw is None or isinstance(raw, bool):
        return None
    if isinstance(raw, str):
        return raw or None
    if isinstance(raw, int | float):
        # The same string as a userId of that number gets: one number, one identifier, wherever sent.
        try:
            return decimal_string(raw)
        except ValueError:
            return None  # no identifier can be infinite or of thousands of digits
    return None


def _dict(container: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = container.get(key)
    return value if isinstance(value, Mapping) else {}


_CAMEL_BOUNDARY = re.compile(r"(?<=[a-z0-9])([A-Z])")


@cache  # keys come from the config, so the cache stays small; the regex would run per message
def _key_variants(key: str) -> tuple[str, ...]:
    snake = _CAMEL_BOUNDARY.sub(r"_\1", key).lower()
    parts = snake.split("_")
    camel = parts[0] + "".join(part.title() for part in parts[1:])
    pascal = "".join(part.title() for part in parts)
    return tuple(dict.fromkeys((key, snake, camel, pascal)))


def _trait_value(keys: tuple[str, ...], containers: Sequence[Mapping[str, Any]]) -> object:
    # The first key that has a value wins; for one key, the first container, then the first spelling.
    for key in keys:
        variants = _key_variants(key)
        for container in containers:
            for variant in variants:
                raw = container.get(variant)
                if _as_value(raw) is not None:
                    return raw
    return None


def _device_platform(context: Mapping[str, Any]) -> str | None:
    device = _dict(context, "device")
    for raw in (device.get("type"), _dict(context, "os").get("name")):
        if isinstance(raw, str):
            lowered = raw.lower()
            if "android" in lowered:
                return "android"
            if lowered in ("ios", "ipados", "iphone os", "ipad", "iphone", "tvos"):
                return "ios"
    return None


# U+FFFD stands where a character was lost (invalid UTF-8, a string cut mid-emoji, a NUL): "Jos\ufffd"
# could have been José or Josè, so an identifier holding one would fuse whoever it stood for.
DAMAGED_CHARACTER = "\ufffd"
DAMAGED_REASON = "damaged: holds U+FFFD, a character lost in encoding"


# Longer values are no one's id (a serialised object, a token pasted whole), and an index row must fit a
# third of a PostgreSQL page: evidence keys hold two values, so 2 × 1,000 bytes plus types stay under it.
MAX_IDENTIFIER_BYTES = 1000


def _too_long(value: str) -> bool:
    # Four bytes per character at most: only a value past a quarter of the limit needs encoding.
    return len(value) * 4 > MAX_IDENTIFIER_BYTES and _utf8_size(value) > MAX_IDENTIFIER_BYTES


def _utf8_size(value: str) -> int:
    return len(value.encode("utf-8", "surrogatepass"))


_TOO_LONG = "too long"


def _too_long_reason(value: str) -> str:
    return (
        f"{_TOO_LONG}: {_utf8_size(value):,} bytes, over the {MAX_IDENTIFIER_BYTES:,} an identifier may have"
    )


def drop_rule(reason: str) -> str:
    """The rule a drop's reason names, without what is particular to the identifier (its size): one
    value per rule, for a metric's label."""
    if reason.startswith(f"{_TOO_LONG}: "):
        return _TOO_LONG
    return reason


def _alias_previous(message: Message, rules: IdentityRules, dropped: list[Dropped]) -> tuple[Identifier, ...]:
    """The identifiers an alias's previousId may be (appending to `dropped` what cannot be one)."""
    raw = _as_value(message.previous_id)
    if raw is None:
        return ()
    as_user = Identifier("user_id", normalise_value(raw, rules.rule("user_id").normalise))
    as_anonymous = Identifier("anonymous_id", normalise_value(raw, rules.rule("anonymous_id").normalise))
    user_id = _as_value(message.user_id)
    if user_id is not None and normalise_value(user_id, rules.rule("user_id").normalise) == as_user.value:
        return ()  # an alias of an id to itself says nothing
    candidates = [item for item in (as_user, as_anonymous) if item.value]
    if not candidates:
        return ()  # only whitespace, which normalisation took away: absent, as "" is
    shown = candidates[-1]
    reason = _refusal(shown.value, rules)
    if reason is not None:
        dropped.append(Dropped(shown, reason))
        return ()
    # The source's policy is applied once the graph has said which one it is: a known user_id that this
    # source may not contribute is dropped, not attached as an anonymous_id of that value instead.
    return tuple(candidates)


def _refusal(value: str, rules: IdentityRules) -> str | None:
    """Why a value can be no identifier of any type (damaged, too long, blocked); None when it can."""
    if DAMAGED_CHARACTER in value:
        return DAMAGED_REASON
    if _too_long(value):
        return _too_long_reason(value)
    if rules.blocked.matches(value):
        return f"blocked {rules.blocked.describe_match(value)}"
    return None


def extract_identifiers(
    message: Message, rules: IdentityRules, source: SourcePolicy | None = None
) -> Extraction:
    """Every identifier a message carries, in a fixed order, normalised, with blocked ones dropped."""
    found: list[Identifier] = []
    context = message.context

    def add(identifier_type: str, raw: object, collection: str = "users") -> None:
        value = _as_value(raw)
        if value is not None:
            found.append(Identifier(identifier_type, value, collection))

    add("user_id", message.user_id)
    add("anonymous_id", message.anonymous_id)
    context_traits = _dict(context, "traits")
    # On a group call, top-level traits describe the account, not the person.
    email = None if message.type == "group" else message.traits.get("email")
    if _as_value(email) is None:
        email = context_traits.get("email")
    if _as_value(email) is None and message.type == "track" and rules.email_from_track_properties:
        email = message.properties.get("email")
    add("email", email)

    platform = _device_platform(context)
    if platform is not None:
        device = _dict(context, "device")
        add(f"{platform}.id", device.get("id"))
        if device.get("adTrackingEnabled") is True:
            add(f"{platform}.idfa", device.get("advertisingId"))
        add(f"{platform}.push_token", device.get("token"))
    add("cross_domain_id", context_traits.get("crossDomainId"))
    for integrations in (message.integrations, _dict(context, "integrations")):
        client_id = _dict(integrations, "Google Analytics").get("clientId")
        if _as_value(client_id) is not None:
            add("ga_client_id", client_id)
            break
    if message.type == "group":
        add("group_id", message.group_id, "accounts")
    for external in message.external_ids:
        add(external.type, external.id, external.collection)

    user_trait_rules = rules.trait_key_rules("users")
    account_trait_rules = rules.trait_key_rules("accounts")
    if user_trait_rules or account_trait_rules:
        everywhere = (message.traits, context_traits, message.properties)
        if message.type == "group":
            # A group call's traits are the account's (Segment spec), so they feed accounts types only;
            # context.traits and properties describe the person acting, so they feed users types only.
            user_sources: Sequence[Mapping[str, Any]] = everywhere[1:]
            account_sources: Sequence[Mapping[str, Any]] = everywhere[:1]
        else:
            user_sources = account_sources = everywhere
        for rule in user_trait_rules:
            add(rule.type, _trait_value(rule.trait_keys, user_sources), rule.collection)
        for rule in account_trait_rules:
            add(rule.type, _trait_value(rule.trait_keys, account_sources), rule.collection)

    policy = source if source is not None else rules.source(None)
    users: list[Identifier] = []
    accounts: list[Identifier] = []
    dropped: list[Dropped] = []
    seen: set[Identifier] = set()
    for identifier in found:
        rule = rules.rule(identifier.type)
        value = normalise_value(identifier.value, rule.normalise)
        normalised = Identifier(identifier.type, value, identifier.collection)
        if normalised in seen:
            continue
        seen.add(normalised)
        reason = _refusal(value, rules)
        if reason is not None:
            dropped.append(Dropped(normalised, reason))
        elif not policy.allows(normalised.type):
            dropped.append(Dropped(normalised, f"source {policy.name} may not contribute {normalised.type}"))
        elif normalised.collection == "accounts":
            accounts.append(normalised)
        else:
            users.append(normalised)

    alias_previous: tuple[Identifier, ...] = ()
    if message.type == "alias" and rules.alias_enabled:
        alias_previous = _alias_previous(message, rules, dropped)
    return Extraction(tuple(users), tuple(accounts), tuple(dropped), alias_previous)
