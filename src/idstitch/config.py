"""Configuration: one TOML file (spaces, sources, tokens, rules) plus IDSTITCH_* environment variables."""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from idstitch.core.errors import ConfigError, RuleViolation
from idstitch.core.rules import IdentityRules, check_keys, toml_type

__all__ = [
    "DEFAULT_SPACE",
    "DEFAULT_STORE_URL",
    "Config",
    "SourceConfig",
    "SpaceConfig",
    "load_config",
]

DEFAULT_STORE_URL: Final = "sqlite:///./idstitch.db"
DEFAULT_SPACE: Final = "default"
DEFAULT_SOURCE: Final = "default"
# Profile API requests per second per token. Segment allows 100 per space; a self-hosted API that
# support tools and apps read in real time needs more, and 0 turns the limit off.
DEFAULT_RATE_LIMIT: Final = 1000

# Keys this module reads itself; the rest of a space or source table belongs to IdentityRules.
_SPACE_KEYS: Final = ("profile_tokens", "admin_tokens", "rate_limit")
_SOURCE_KEYS: Final = ("write_key",)


@dataclass(frozen=True, slots=True)
class SourceConfig:
    """A source of a space; write_key None means "generate one on first run and keep it in the store"."""

    name: str
    write_key: str | None
    merge: bool = True


@dataclass(frozen=True)
class SpaceConfig:
    """One space: its sources, tokens and identity rules."""

    name: str
    rules: IdentityRules
    sources: Mapping[str, SourceConfig] = field(default_factory=dict)
    profile_tokens: tuple[str, ...] = ()
    admin_tokens: tuple[str, ...] = ()
    rate_limit: int = DEFAULT_RATE_LIMIT  # Profile API requests per second per token; 0: unlimited


@dataclass(frozen=True)
class Config:
    """Every space; `implicit` is True when no file was given and the default space is in use."""

    spaces: Mapping[str, SpaceConfig]
    path: Path | None = None
    implicit: bool = False

    def space(self, name: str) -> SpaceConfig:
        """One space by name, or a ConfigError that lists the known ones."""
        try:
            return self.spaces[name]
        except KeyError:
            known = ", ".join(sorted(self.spaces)) or "none"
            raise ConfigError(f"unknown space {name!r} (configured: {known})") from None

    @property
    def default_space(self) -> str:
        """The space commands use when none is named: IDSTITCH_SPACE, the only space, or `default`."""
        from_env = os.environ.get("IDSTITCH_SPACE")
        if from_env:
            return from_env
        if len(self.spaces) == 1:
            return next(iter(self.spaces))
        return DEFAULT_SPACE

    @classmethod
    def default(cls) -> Config:
        """The zero-configuration set-up: one space `default` with one source `default`."""
        write_key = os.environ.get("IDSTITCH_WRITE_KEY") or None
        # Without these, the first run generates a read and an admin token and keeps them in the store.
        profile_token = os.environ.get("IDSTITCH_PROFILE_TOKEN")
        admin_token = os.environ.get("IDSTITCH_ADMIN_TOKEN")
        for variable, secret in (
            ("IDSTITCH_WRITE_KEY", write_key),
            ("IDSTITCH_PROFILE_TOKEN", profile_token),
            ("IDSTITCH_ADMIN_TOKEN", admin_token),
        ):
            if secret:
                _check_secret(secret, variable)
        for variable, token in (
            ("IDSTITCH_PROFILE_TOKEN", profile_token),
            ("IDSTITCH_ADMIN_TOKEN", admin_token),
        ):
            if token and token == write_key:
                raise ConfigError(f"{variable}: {_PUBLIC_WRITE_KEY.format(where='IDSTITCH_WRITE_KEY')}")
        space = SpaceConfig(
            name=DEFAULT_SPACE,
            rules=IdentityRules.default(),
            sources={DEFAULT_SOURCE: SourceConfig(DEFAULT_SOURCE, write_key)},
            profile_tokens=(profile_token,) if profile_token else (),
            admin_tokens=(admin_token,) if admin_token else (),
        )
        return cls(spaces={DEFAULT_SPACE: space}, implicit=True)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], path: Path | None = None) -> Config:
        """A config from parsed TOML; every error names the file (when given) and the exact key."""
        try:
            return cls(spaces=_spaces(data), path=path)
        except RuleViolation as error:
            raise ConfigError(f"{path}: {error}" if path else str(error)) from None
        except ConfigError as error:
            if path is None:
                raise
            raise ConfigError(f"{path}: {error}") from None


# A write key is public (analytics.js and the mobile libraries carry it to every client) and a token reads
# profiles: one string as both would open the Profile API, of whichever space took it as a token, to anyone.
_PUBLIC_WRITE_KEY: Final = (
    "is also the write key of {where}; a write key is public (clients carry it in web pages and apps), "
    "so a Profile API token must be another secret"
)

_SPACE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def _spaces(data: Mapping[str, Any]) -> dict[str, SpaceConfig]:
    check_keys(data, ("spaces",), "")
    spaces_table = data.get("spaces")
    if not isinstance(spaces_table, Mapping) or not spaces_table:
        raise ConfigError("needs at least one [spaces.NAME] table")
    spaces: dict[str, SpaceConfig] = {}
    write_keys: dict[str, str] = {}
    tokens: dict[str, str] = {}
    for name, table in spaces_table.items():
        where = f"spaces.{name}"
        if not _SPACE_NAME.fullmatch(name):
            # The name is the space's id in Profile API URLs (/v1/spaces/NAME/...) and on the command line.
            raise ConfigError(
                f"spaces.{name!r}: a space name is up to 64 letters, digits, '_', '-' and '.', "
                "starting with a letter or digit"
            )
        if not isinstance(table, Mapping):
            raise ConfigError(f"{where}: must be a table")
        # The rules check the sources' tables (types, merge, unknown keys) before write keys are read.
        rules = IdentityRules.from_config(table, where, space_keys=_SPACE_KEYS, source_keys=_SOURCE_KEYS)
        sources: dict[str, SourceConfig] = {}
        for source_name, source in table.get("sources", {}).items():
            here = f"{where}.sources.{source_name}"
            if not source_name.isprintable():
                # The name is in logs, metrics labels and the CLI's --source; PostgreSQL refuses a NUL.
                raise ConfigError(
                    f"{where}.sources.{source_name!r}: a source name cannot hold control characters"
                )
            key = source.get("write_key")
            if not isinstance(key, str) or not key:
                got = "nothing" if key is None else toml_type(key)
                raise ConfigError(f"{here}.write_key: must be a non-empty string (required), got {got}")
            _check_secret(key, f"{here}.write_key")
            if key in write_keys:
                raise ConfigError(f"{here}.write_key: already used by {write_keys[key]}")
            write_keys[key] = here
            # One reading of `merge`, the rules': the source and its policy cannot disagree.
            sources[source_name] = SourceConfig(source_name, key, rules.source(source_name).merge)
        profile_tokens = _string_list(table, "profile_tokens", where)
        admin_tokens = _string_list(table, "admin_tokens", where)
        for kind, listed in (("profile_tokens", profile_tokens), ("admin_tokens", admin_tokens)):
            for token in listed:
                if not token:
                    raise ConfigError(f"{where}.{kind}: a token cannot be empty")
                _check_secret(token, f"{where}.{kind}")
                if token in tokens:
                    # One token, one space and one kind: otherwise what it may read would be ambiguous.
                    raise ConfigError(f"{where}.{kind}: {token!r} is already used by {tokens[token]}")
                tokens[token] = f"{where}.{kind}"
        rate_limit = table.get("rate_limit", DEFAULT_RATE_LIMIT)
        if isinstance(rate_limit, bool) or not isinstance(rate_limit, int) or rate_limit < 0:
            got = str(rate_limit) if type(rate_limit) is int else toml_type(rate_limit)
            raise ConfigError(f"{where}.rate_limit: must be a whole number >= 0 (0: unlimited), got {got}")
        spaces[name] = SpaceConfig(
            name=name,
            rules=rules,
            sources=sources,
            profile_tokens=tuple(profile_tokens),
            admin_tokens=tuple(admin_tokens),
            rate_limit=rate_limit,
        )
    for token, holder in tokens.items():
        if token in write_keys:
            raise ConfigError(f"{holder}: a token {_PUBLIC_WRITE_KEY.format(where=write_keys[token])}")
    return spaces


def _check_secret(value: str, where: str) -> None:
    """Refuse a write key or token that HTTP Basic cannot carry: a ':' ends its user part, and whitespace or
    control characters do not survive a header (nor, for a NUL, PostgreSQL)."""
    if ":" in value or any(char.isspace() or not char.isprintable() for char in value):
        # A secret: the message says what is wrong, not what was written.
        raise ConfigError(
            f"{where}: cannot hold ':', whitespace or control characters (it is sent as HTTP Basic's user)"
        )


def _string_list(table: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list):
        raise ConfigError(f"{where}.{key}: must be a list of strings, got {toml_type(value)}")
    for item in value:
        if not isinstance(item, str):
            # Tokens are secrets: the message says what is wrong, not what was written.
            raise ConfigError(f"{where}.{key}: must be a list of strings, but one item is {toml_type(item)}")
    return list(value)


def load_config(path: str | Path | None = None) -> Config:
    """The config from `path`, else $IDSTITCH_CONFIG, else ./idstitch.toml if present, else the default."""
    chosen = path or os.environ.get("IDSTITCH_CONFIG")
    if not chosen and Path("idstitch.toml").is_file():
        chosen = "idstitch.toml"
    if not chosen:
        return Config.default()
    file = Path(chosen)
    try:
        # utf-8-sig: an editor's byte order mark is not TOML, but neither is it the user's mistake.
        data = tomllib.loads(file.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist") from None
    except UnicodeDecodeError as error:
        line = error.object[: error.start].count(b"\n") + 1
        raise ConfigError(
            f"{file}: not UTF-8 text (byte 0x{error.object[error.start]:02x} on line {line})"
        ) from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{file}: invalid TOML: {error}") from None
    return Config.from_mapping(data, file)
