"""Configuration: one TOML file (spaces, sources, tokens, rules) plus IDSTITCH_* environment variables."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from idstitch.core.errors import ConfigError, RuleViolation
from idstitch.core.rules import IdentityRules

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
        """A config from parsed TOML."""
        spaces_table = data.get("spaces")
        if not isinstance(spaces_table, Mapping) or not spaces_table:
            raise ConfigError(f"{path or 'config'}: needs at least one [spaces.NAME] table")
        spaces: dict[str, SpaceConfig] = {}
        write_keys: dict[str, str] = {}
        tokens: dict[str, str] = {}
        for name, table in spaces_table.items():
            where = f"spaces.{name}"
            if not isinstance(table, Mapping):
                raise ConfigError(f"{where}: must be a table")
            try:
                rules = IdentityRules.from_config(table, where)
            except RuleViolation as error:
                raise ConfigError(str(error)) from None
            sources: dict[str, SourceConfig] = {}
            for source_name, source in dict(table.get("sources", {})).items():
                key = source.get("write_key") if isinstance(source, Mapping) else None
                if not isinstance(key, str) or not key:
                    raise ConfigError(f"{where}.sources.{source_name}.write_key: required")
                if key in write_keys:
                    raise ConfigError(
                        f"{where}.sources.{source_name}.write_key: already used by {write_keys[key]}"
                    )
                write_keys[key] = f"{where}.sources.{source_name}"
                sources[source_name] = SourceConfig(source_name, key, bool(source.get("merge", True)))
            profile_tokens = _string_list(table, "profile_tokens", where)
            admin_tokens = _string_list(table, "admin_tokens", where)
            for kind, listed in (("profile_tokens", profile_tokens), ("admin_tokens", admin_tokens)):
                for token in listed:
                    if not token:
                        raise ConfigError(f"{where}.{kind}: a token cannot be empty")
                    if token in tokens:
                        # One token, one space and one kind: otherwise what it may read would be ambiguous.
                        raise ConfigError(f"{where}.{kind}: {token!r} is already used by {tokens[token]}")
                    tokens[token] = f"{where}.{kind}"
            rate_limit = table.get("rate_limit", DEFAULT_RATE_LIMIT)
            if isinstance(rate_limit, bool) or not isinstance(rate_limit, int) or rate_limit < 0:
                raise ConfigError(f"{where}.rate_limit: must be a whole number >= 0 (0: unlimited)")
            spaces[name] = SpaceConfig(
                name=name,
                rules=rules,
                sources=sources,
                profile_tokens=tuple(profile_tokens),
                admin_tokens=tuple(admin_tokens),
                rate_limit=rate_limit,
            )
        return cls(spaces=spaces, path=path)


def _string_list(table: Mapping[str, Any], key: str, where: str) -> list[str]:
    value = table.get(key, [])
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ConfigError(f"{where}.{key}: must be a list of strings")
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
        data = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"config file {file} does not exist") from None
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{file}: invalid TOML: {error}") from None
    return Config.from_mapping(data, file)
