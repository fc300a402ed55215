"""Config.from_mapping and load_config: every key typed, unknown keys refused, errors naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import config_from_toml
from idstitch.config import load_config
from idstitch.core.errors import ConfigError

CRM = '[spaces.app_a.sources.crm]\nwrite_key = "wk_crm"\n'


def test_source_merge_must_be_a_toml_boolean() -> None:
    # bool("false") is True: the feed that must never fuse people would have fused them.
    with pytest.raises(ConfigError) as info:
        config_from_toml(CRM + 'merge = "false"\n')
    assert "spaces.app_a.sources.crm.merge: must be true or false" in str(info.value)


def test_source_merge_false_reaches_both_the_source_and_its_policy() -> None:
    space = config_from_toml(CRM + "merge = false\n").space("app_a")
    assert space.sources["crm"].merge is False
    assert space.rules.source("crm").merge is False


@pytest.mark.parametrize(
    "toml, complaint",
    [
        ("[space.app_a]\nrate_limit = 1\n[spaces.app_a]\n", "space: unknown key"),
        ('[spaces.app_a]\nprofile_token = ["pt"]\n', "spaces.app_a.profile_token: unknown key"),
        (CRM + 'writekey = "wk"\n', "spaces.app_a.sources.crm.writekey: unknown key"),
        ("[spaces.app_a]\nrate_limit = 1.5\n", "spaces.app_a.rate_limit: must be a whole number"),
        ('[spaces.app_a]\nrate_limit = "10"\n', "spaces.app_a.rate_limit: must be a whole number"),
        ("[spaces.app_a.sources.crm]\nwrite_key = 7\n", "spaces.app_a.sources.crm.write_key: must be"),
        ('[spaces.app_a.sources.crm]\nwrite_key = ""\n', "spaces.app_a.sources.crm.write_key: must be"),
        ('[spaces.app_a]\nsources = "crm"\n', "spaces.app_a.sources: must be a table"),
        ("spaces = 1\n", "needs at least one [spaces.NAME] table"),
        ('[spaces.""]\n', "spaces.'': a space name is up to 64 letters"),
        ('[spaces."a/b"]\n', "spaces.'a/b': a space name is up to 64 letters"),
        ('[spaces." s"]\n', "spaces.' s': a space name is up to 64 letters"),
        (f"[spaces.{'s' * 65}]\n", "a space name is up to 64 letters"),
        (f"[spaces.s.identifiers.{'t' * 65}]\n", "an identifier type is at most 64 characters"),
    ],
)
def test_config_errors_name_the_key(toml: str, complaint: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_toml(toml)
    assert complaint in str(info.value)


def test_unknown_space_key_lists_every_valid_key() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_toml("[spaces.app_a]\nmax_merge = 3\n")
    message = str(info.value)
    # Keys read by the config (tokens, rate limit) and by the identity rules are all offered.
    for key in ("admin_tokens", "identifiers", "max_merges", "profile_tokens", "rate_limit", "sources"):
        assert key in message


def test_unknown_source_key_lists_write_key_and_the_rule_keys() -> None:
    with pytest.raises(ConfigError) as info:
        config_from_toml(CRM + "merges = false\n")
    assert "valid keys: identifier_types, merge, write_key" in str(info.value)


def test_load_config_names_the_file_and_the_key(tmp_path: Path) -> None:
    file = tmp_path / "idstitch.toml"
    file.write_text(CRM + 'merge = "false"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert str(info.value).startswith(f"{file}: spaces.app_a.sources.crm.merge: must be true or false")


def test_cli_exits_2_on_a_mistyped_setting(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text('[spaces.s.identifiers.phone]\ntrait_keys = "phone"\n', encoding="utf-8")
    events = tmp_path / "e.ndjson"
    events.write_text('{"type":"identify","userId":"u1","messageId":"m1"}\n', encoding="utf-8")
    store = f"sqlite:///{tmp_path}/t.db"
    done = subprocess.run(
        [sys.executable, "-m", "idstitch", "ingest", str(events), "--config", str(config), "--store", store],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")},
    )
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert "spaces.s.identifiers.phone.trait_keys: must be a list of strings, got a string" in done.stderr
