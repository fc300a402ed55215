"""Identity rules of a space: priority, limits with windows, blocked values, merge flags, source policy."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any, Final

from idstitch.core.defaults import (
    DEFAULT_BLOCKED_EXACT,
    DEFAULT_BLOCKED_REGEX,
    DEFAULT_CUSTOM_RULE,
    DEFAULT_IDENTIFIER_RULES,
    DEFAULT_MAX_IDENTIFIERS,
    DEFAULT_MAX_LEARNED_TYPES,
    DEFAULT_MAX_MERGES,
)
from idstitch.core.errors import RuleViolation
from idstitch.core.messages import MAX_TYPE_LENGTH

__all__ = [
    "COLLECTIONS",
    "NORMALISATIONS",
    "WINDOWS",
    "IdentifierRule",
    "IdentityRules",
    "SourcePolicy",
    "ValueList",
    "check_keys",
    "toml_type",
]

COLLECTIONS: Final = ("users", "accounts")

# A windowed limit counts values last seen inside the window that ends at the message's timestamp.
WINDOWS: Final[Mapping[str, timedelta | None]] = {
    "ever": None,
    "annually": timedelta(days=365),
    "monthly": timedelta(days=30),
    "weekly": timedelta(days=7),
    "daily": timedelta(days=1),
}

NORMALISATIONS: Final = ("exact", "trim", "lower", "trim_lower")

# The keys each table of the rules may hold; anything else is a typo that would silently do nothing.
_SPACE_KEYS: Final = (
    "identifiers",
    "blocked",
    "non_unique",
    "sources",
    "custom_limit",
    "custom_window",
    "max_merges",
    "max_identifiers",
    "max_learned_types",
    "alias",
    "detect_non_unique",
    "email_from_track_properties",
)
_IDENTIFIER_KEYS: Final = ("priority", "limit", "window", "merge", "collection", "trait_keys", "normalise")
_SOURCE_KEYS: Final = ("merge", "identifier_types")
_BLOCKED_KEYS: Final = ("exact", "regex", "replace_defaults")
_NON_UNIQUE_KEYS: Final = ("exact", "regex")


@dataclass(frozen=True, slots=True)
class IdentifierRule:
    """How one identifier type is read, trusted and limited."""

    type: str
    priority: int
    limit: int
    window: str = "ever"
    merge: bool = True
    collection: str = "users"
    trait_keys: tuple[str, ...] = ()
    normalise: str = "exact"

    @property
    def window_length(self) -> timedelta | None:
        """The window as a duration; None means `ever`."""
        return WINDOWS[self.window]

    def describe(self) -> str:
        """The rule as a person would say it, e.g. `user_id limit 1 ever`."""
        return f"{self.type} limit {self.limit} {self.window}"


_REFERS_TO_GROUP: Final = re.compile(r"\\\d|\(\?P=|\(\?\(")


@dataclass(frozen=True, slots=True)
class ValueList:
    """Values matched exactly (case-insensitively) or by regular expression."""

    exact: frozenset[str] = frozenset()
    patterns: tuple[re.Pattern[str], ...] = ()
    # The patterns as one alternation, searched once per value (every identifier of every message
    # is checked against two lists); None when they do not combine (global flags, group references).
    any_pattern: re.Pattern[str] | None = field(default=None, compare=False, repr=False)

    def matches(self, value: str) -> bool:
        """Whether the value is on the list."""
        if value.lower() in self.exact:
            return True
        if self.any_pattern is not None:
            return self.any_pattern.search(value) is not None
        return any(pattern.search(value) for pattern in self.patterns)

    def describe_match(self, value: str) -> str:
        """Which entry matched, for the record of a dropped identifier."""
        entry = value.lower()
        if entry in self.exact:
            return f"exact {entry!r}"  # the entry matched, as the list holds it: NULL and Null match one
        for pattern in self.patterns:
            if pattern.search(value):
                return f"regex {pattern.pattern!r}"
        return "no match"

    @classmethod
    def build(cls, exact: Iterable[str], regex: Iterable[str], where: str) -> ValueList:
        """Compile a list, naming `where` in the error for a bad pattern."""
        compiled: list[re.Pattern[str]] = []
        for pattern in regex:
            try:
                compiled.append(re.compile(pattern))
            except re.error as error:
                raise RuleViolation(f"{where}.regex: invalid regex {pattern!r}: {error}") from None
        combined = None
        if compiled and not any(_REFERS_TO_GROUP.search(pattern.pattern) for pattern in compiled):
            # A pattern with global flags such as (?i) cannot sit inside an alternation, and one that
            # refers to a group by number would see the numbers shift: those lists search each pattern.
            with contextlib.suppress(re.error):
                combined = re.compile("|".join(f"(?:{pattern.pattern})" for pattern in compiled))
        return cls(frozenset(value.lower() for value in exact), tuple(compiled), combined)


@dataclass(frozen=True, slots=True)
class SourcePolicy:
    """What one source may do: contribute which identifier types, and whether it may fuse profiles."""

    name: str
    merge: bool = True
    identifier_types: frozenset[str] | None = None

    def allows(self, identifier_type: str) -> bool:
        """Whether this source may contribute identifiers of this type."""
        return self.identifier_types is None or identifier_type in self.identifier_types


UNRESTRICTED_SOURCE: Final = SourcePolicy(name="")


@dataclass(frozen=True)
class IdentityRules:
    """All identity rules of one space; immutable, so a resolution always sees one consistent set."""

    configured: Mapping[str, IdentifierRule]
    blocked: ValueList
    non_unique: ValueList = field(default_factory=ValueList)
    sources: Mapping[str, SourcePolicy] = field(default_factory=dict)
    learned_types: tuple[tuple[str, str], ...] = ()
    custom_limit: int = 5
    custom_window: str = "ever"
    max_merges: int = DEFAULT_MAX_MERGES
    max_identifiers: int = DEFAULT_MAX_IDENTIFIERS
    max_learned_types: int = DEFAULT_MAX_LEARNED_TYPES
    alias_enabled: bool = True
    detect_non_unique: bool = True
    email_from_track_properties: bool = False
    _all: dict[str, IdentifierRule] = field(init=False, repr=False, compare=False)
    _rank: dict[str, tuple[int, int]] = field(init=False, repr=False, compare=False)
    _trait_key_rules: dict[str | None, tuple[IdentifierRule, ...]] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        ordered = sorted(self.configured.values(), key=lambda rule: rule.priority)
        all_rules = {rule.type: rule for rule in ordered}
        next_priority = max((rule.priority for rule in ordered), default=0) + 1
        for identifier_type, collection in self.learned_types:
            if identifier_type in all_rules:
                continue
            all_rules[identifier_type] = IdentifierRule(
                type=identifier_type,
                priority=next_priority,
                limit=self.custom_limit,
                window=self.custom_window,
                collection=collection,
            )
            next_priority += 1
        object.__setattr__(self, "_all", all_rules)
        # Rank breaks priority ties: "the later type in the rules' order" loses.
        object.__setattr__(
            self,
            "_rank",
            {name: (rule.priority, index) for index, (name, rule) in enumerate(all_rules.items())},
        )
        # Computed once: extract_identifiers asks for these on every message.
        with_keys = tuple(rule for rule in all_rules.values() if rule.trait_keys)
        by_collection: dict[str | None, tuple[IdentifierRule, ...]] = {None: with_keys}
        for collection in COLLECTIONS:
            by_collection[collection] = tuple(rule for rule in with_keys if rule.collection == collection)
        object.__setattr__(self, "_trait_key_rules", by_collection)

    def rule(self, identifier_type: str) -> IdentifierRule:
        """The rule of a type; a type never seen before ranks below every known one."""
        found = self._all.get(identifier_type)
        if found is not None:
            return found
        return IdentifierRule(
            type=identifier_type,
            priority=10_000,
            limit=self.custom_limit,
            window=self.custom_window,
        )

    def rank(self, identifier_type: str) -> tuple[int, int]:
        """Sort key: lower is more trusted (priority, then position in the rules' order)."""
        found = self._rank.get(identifier_type)
        return found if found is not None else (self.rule(identifier_type).priority, len(self._rank))

    @property
    def learned_room(self) -> int:
        """How many more custom types may be learned before `max_learned_types` is reached."""
        # A learned type that is configured since counts as configured, not toward the cap.
        return max(0, self.max_learned_types - (len(self._all) - len(self.configured)))

    def knows(self, identifier_type: str) -> bool:
        """Whether the type is configured or already learned."""
        return identifier_type in self._all

    @property
    def rules(self) -> tuple[IdentifierRule, ...]:
        """Every known rule in priority order."""
        return tuple(self._all.values())

    def trait_key_rules(self, collection: str | None = None) -> tuple[IdentifierRule, ...]:
        """Rules that read identifiers from trait or property keys (of one collection, if named)."""
        return self._trait_key_rules.get(collection, ())

    def source(self, name: str | None) -> SourcePolicy:
        """The policy of a source; unknown or unnamed sources are unrestricted."""
        if name is None:
            return UNRESTRICTED_SOURCE
        return self.sources.get(name, UNRESTRICTED_SOURCE)

    def with_learned(self, types: Iterable[tuple[str, str]]) -> IdentityRules:
        """These rules with custom types (type, collection) appended in first-seen order."""
        new = [item for item in types if not self.knows(item[0])]
        if not new:
            return self
        seen = list(self.learned_types)
        for item in new:
            if item not in seen:
                seen.append(item)
        return replace(self, learned_types=tuple(seen))

    def as_dict(self) -> dict[str, Any]:
        """A JSON-able description (for `GET …/rules` and the CLI)."""
        return {
            "identifiers": [
                {
                    "type": rule.type,
                    "priority": rule.priority,
                    "limit": rule.limit,
                    "window": rule.window,
                    "merge": rule.merge,
                    "collection": rule.collection,
                    "trait_keys": list(rule.trait_keys),
                    "normalise": rule.normalise,
                }
                for rule in self._all.values()
            ],
            "blocked": {
                "exact": sorted(self.blocked.exact),
                "regex": [pattern.pattern for pattern in self.blocked.patterns],
            },
            "non_unique": {
                "exact": sorted(self.non_unique.exact),
                "regex": [pattern.pattern for pattern in self.non_unique.patterns],
            },
            "sources": {
                name: {
                    "merge": policy.merge,
                    "identifier_types": None
                    if policy.identifier_types is None
                    else sorted(policy.identifier_types),
                }
                for name, policy in self.sources.items()
            },
            "custom_limit": self.custom_limit,
            "custom_window": self.custom_window,
            "max_merges": self.max_merges,
            "max_identifiers": self.max_identifiers,
            "max_learned_types": self.max_learned_types,
            "alias": self.alias_enabled,
            "detect_non_unique": self.detect_non_unique,
            "email_from_track_properties": self.email_from_track_properties,
        }

    @classmethod
    def default(cls) -> IdentityRules:
        """The rules of a new space (DEFAULTS.md)."""
        return cls.from_config({})

    @classmethod
    def from_config(
        cls,
        space: Mapping[str, Any],
        where: str = "space",
        *,
        space_keys: Collection[str] = (),
        source_keys: Collection[str] = (),
    ) -> IdentityRules:
        """Rules from one `[spaces.X]` table of the config file, on top of the defaults.

        `space_keys` and `source_keys` are the keys the caller itself reads from the space and source
        tables: accepted here, so that every other key is reported as unknown.
        """
        check_keys(space, (*_SPACE_KEYS, *space_keys), where)
        configured: dict[str, IdentifierRule] = {}
        for row in DEFAULT_IDENTIFIER_RULES:
            configured[row["type"]] = _rule_from_row(row["type"], row, where)
        overrides = _table(space, "identifiers", where)
        next_priority = max(rule.priority for rule in configured.values()) + 1
        named: dict[str, str] = {}
        for name, row in overrides.items():
            here = f"{where}.identifiers.{name}"
            if not isinstance(row, Mapping):
                raise RuleViolation(f"{here}: must be a table")
            identifier_type = str(name).lower()
            if not identifier_type:
                raise RuleViolation(f"{here}: an identifier type cannot be empty")
            if ":" in identifier_type:
                # Identifiers are written `type:value`; a colon in the type could never be found again.
                raise RuleViolation(f"{here}: an identifier type cannot contain ':'")
            if len(identifier_type) > MAX_TYPE_LENGTH:
                raise RuleViolation(f"{here}: an identifier type is at most {MAX_TYPE_LENGTH} characters")
            if identifier_type in named:
                raise RuleViolation(
                    f"{here}: names the same type as {where}.identifiers.{named[identifier_type]} "
                    "(types are lower-case)"
                )
            named[identifier_type] = str(name)
            check_keys(row, _IDENTIFIER_KEYS, here)
            base: dict[str, Any] = {}
            existing = configured.get(identifier_type)
            if existing is not None and row.get("collection", existing.collection) != existing.collection:
                # Built-in types are read from fixed places into a fixed collection (SPEC §2): another
                # collection here would change nothing but where the CLI and the Profile API look.
                raise RuleViolation(
                    f"{here}.collection: {identifier_type} is always in {existing.collection}; "
                    "only a custom type's collection can be set"
                )
            if existing is not None:
                base = {
                    "priority": existing.priority,
                    "limit": existing.limit,
                    "window": existing.window,
                    "merge": existing.merge,
                    "collection": existing.collection,
                    "normalise": existing.normalise,
                    "trait_keys": list(existing.trait_keys),
                }
            else:
                base = dict(DEFAULT_CUSTOM_RULE, priority=next_priority)
                next_priority += 1
            configured[identifier_type] = _rule_from_row(identifier_type, {**base, **row}, here)

        blocked_table = _table(space, "blocked", where)
        check_keys(blocked_table, _BLOCKED_KEYS, f"{where}.blocked")
        replace_defaults = _flag(blocked_table, "replace_defaults", False, f"{where}.blocked")
        exact = [] if replace_defaults else list(DEFAULT_BLOCKED_EXACT)
        regex = [] if replace_defaults else list(DEFAULT_BLOCKED_REGEX)
        exact += _strings(blocked_table.get("exact", []), f"{where}.blocked.exact")
        regex += _strings(blocked_table.get("regex", []), f"{where}.blocked.regex")
        non_unique_table = _table(space, "non_unique", where)
        check_keys(non_unique_table, _NON_UNIQUE_KEYS, f"{where}.non_unique")

        sources: dict[str, SourcePolicy] = {}
        for source_name, source in _table(space, "sources", where).items():
            here = f"{where}.sources.{source_name}"
            if not isinstance(source, Mapping):
                raise RuleViolation(f"{here}: must be a table")
            check_keys(source, (*_SOURCE_KEYS, *source_keys), here)
            types = source.get("identifier_types")
            allowed = None
            if types is not None:
                allowed = frozenset(t.lower() for t in _strings(types, f"{here}.identifier_types"))
                for unknown in sorted(allowed - configured.keys()):
                    # A misspelt type would silently drop that identifier from every message of the source.
                    bare = re.fullmatch(r"[A-Za-z0-9_-]+", unknown) is not None
                    table = f"[{where}.identifiers.{unknown if bare else repr(unknown)}]"
                    raise RuleViolation(
                        f"{here}.identifier_types: unknown identifier type {unknown!r} "
                        f"(known: {', '.join(configured)}; a custom type needs its {table} table)"
                    )
            sources[str(source_name)] = SourcePolicy(
                name=str(source_name), merge=_flag(source, "merge", True, here), identifier_types=allowed
            )
        custom_window = _choice(
            space.get("custom_window", DEFAULT_CUSTOM_RULE["window"]), WINDOWS, f"{where}.custom_window"
        )
        return cls(
            configured=configured,
            blocked=ValueList.build(exact, regex, f"{where}.blocked"),
            non_unique=ValueList.build(
                _strings(non_unique_table.get("exact", []), f"{where}.non_unique.exact"),
                _strings(non_unique_table.get("regex", []), f"{where}.non_unique.regex"),
                f"{where}.non_unique",
            ),
            sources=sources,
            custom_limit=_positive(
                space.get("custom_limit", DEFAULT_CUSTOM_RULE["limit"]), f"{where}.custom_limit"
            ),
            custom_window=custom_window,
            max_merges=_positive(space.get("max_merges", DEFAULT_MAX_MERGES), f"{where}.max_merges"),
            max_identifiers=_positive(
                space.get("max_identifiers", DEFAULT_MAX_IDENTIFIERS), f"{where}.max_identifiers"
            ),
            max_learned_types=_whole(
                space.get("max_learned_types", DEFAULT_MAX_LEARNED_TYPES), f"{where}.max_learned_types"
            ),
            alias_enabled=_flag(space, "alias", True, where),
            detect_non_unique=_flag(space, "detect_non_unique", True, where),
            email_from_track_properties=_flag(space, "email_from_track_properties", False, where),
        )


def toml_type(value: object) -> str:
    """What a config value is, in TOML's words (`a string`, `an integer`, …), for error messages."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a float"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, Mapping):
        return "a table"
    return f"a {type(value).__name__}"


def _typed(value: object) -> str:
    # What was given, as TOML would call it, with the value for a scalar: `a string ('false')`.
    if isinstance(value, bool):
        return f"a boolean ({str(value).lower()})"
    if isinstance(value, int | float | str):
        return f"{toml_type(value)} ({value!r})"
    return toml_type(value)


def check_keys(table: Mapping[str, Any], valid: Collection[str], where: str) -> None:
    """Reject the first key of `table` not in `valid`, naming it and listing the valid ones (RuleViolation).

    `where` is the table's own key path; empty for the top level of the file.
    """
    for key in table:
        if key not in valid:
            full = f"{where}.{key}" if where else key
            raise RuleViolation(f"{full}: unknown key (valid keys: {', '.join(sorted(valid))})")


def _table(space: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = space.get(key, {})
    if not isinstance(value, Mapping):
        raise RuleViolation(f"{where}.{key}: must be a table, got {_typed(value)}")
    return value


def _strings(value: object, where: str) -> list[str]:
    if not isinstance(value, list):
        raise RuleViolation(f"{where}: must be a list of strings, got {toml_type(value)}")
    for item in value:
        if not isinstance(item, str):
            raise RuleViolation(f"{where}: must be a list of strings, but one item is {toml_type(item)}")
    return list(value)


def _positive(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuleViolation(f"{where}: must be a whole number of at least 1, got {_typed(value)}")
    if value < 1:
        raise RuleViolation(f"{where}: must be a whole number of at least 1, got {value}")
    return value


def _whole(value: object, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuleViolation(f"{where}: must be a whole number of at least 0, got {_typed(value)}")
    if value < 0:
        raise RuleViolation(f"{where}: must be a whole number of at least 0, got {value}")
    return value


def _flag(table: Mapping[str, Any], key: str, default: bool, where: str) -> bool:
    # bool("false") is True: only a TOML boolean says what the user meant.
    value = table.get(key, default)
    if not isinstance(value, bool):
        raise RuleViolation(f"{where}.{key}: must be true or false (a TOML boolean), got {_typed(value)}")
    return value


def _choice(value: object, choices: Iterable[str], where: str) -> str:
    names = tuple(choices)
    if not isinstance(value, str) or value not in names:
        got = repr(value) if isinstance(value, str) else _typed(value)
        raise RuleViolation(f"{where}: must be one of {', '.join(names)}, got {got}")
    return value


def _rule_from_row(identifier_type: str, row: Mapping[str, Any], where: str) -> IdentifierRule:
    trait_keys = _strings(row.get("trait_keys", []), f"{where}.trait_keys")
    if "" in trait_keys:
        raise RuleViolation(f"{where}.trait_keys: a trait key cannot be empty")
    return IdentifierRule(
        type=identifier_type,
        priority=_positive(row.get("priority"), f"{where}.priority"),
        limit=_positive(row.get("limit"), f"{where}.limit"),
        window=_choice(row.get("window", "ever"), WINDOWS, f"{where}.window"),
        merge=_flag(row, "merge", True, where),
        collection=_choice(row.get("collection", "users"), COLLECTIONS, f"{where}.collection"),
        trait_keys=tuple(trait_keys),
        normalise=_choice(row.get("normalise", "exact"), NORMALISATIONS, f"{where}.normalise"),
    )
