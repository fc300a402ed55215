"""Config.from_mapping and load_config: every key typed, unknown keys refused, errors naming the key."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import World, config_from_toml
from idstitch import config
from idstitch.config import Config, load_config
from idstitch.core import rules
from idstitch.core.errors import ConfigError
from idstitch.engine import Engine
from idstitch.profiles import explain_document, find_root
from idstitch.storage.base import TokenRecord
from idstitch.storage.urls import open_store

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
        # A key or token travels as the user of HTTP Basic: it ends at the first ':' and cannot hold controls.
        (
            '[spaces.app_a.sources.crm]\nwrite_key = "wk:1"\n',
            "spaces.app_a.sources.crm.write_key: cannot hold",
        ),
        (
            '[spaces.app_a.sources.crm]\nwrite_key = "wk 1"\n',
            "spaces.app_a.sources.crm.write_key: cannot hold",
        ),
        (
            '[spaces.app_a.sources.crm]\nwrite_key = "wk\\u0000"\n',
            "spaces.app_a.sources.crm.write_key: cannot hold",
        ),
        ('[spaces.app_a]\nprofile_tokens = ["pt\\n"]\n', "spaces.app_a.profile_tokens: cannot hold"),
        ('[spaces.app_a]\nadmin_tokens = ["a:b"]\n', "spaces.app_a.admin_tokens: cannot hold"),
        (
            '[spaces.app_a.sources."web\\u0000"]\nwrite_key = "wk"\n',
            "spaces.app_a.sources.'web\\x00': a source name",
        ),
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


# -- the file itself --------------------------------------------------------------------------------


def test_a_config_that_is_not_utf8_is_one_error_naming_the_file(tmp_path: Path) -> None:
    file = tmp_path / "idstitch.toml"
    file.write_bytes(CRM.replace("wk_crm", "wk_cr\xe9").encode("latin-1"))
    with pytest.raises(ConfigError) as info:
        load_config(file)
    assert str(info.value) == f"{file}: not UTF-8 text (byte 0xe9 on line 2)"


def test_a_byte_order_mark_is_not_a_toml_error(tmp_path: Path) -> None:
    # Windows editors start UTF-8 files with one; tomllib would call line 1 an invalid statement.
    file = tmp_path / "idstitch.toml"
    file.write_bytes(b"\xef\xbb\xbf" + CRM.encode())
    assert load_config(file).space("app_a").sources["crm"].write_key == "wk_crm"


# -- config changes on an existing store ----------------------------------------------------------


def _write_keys(tmp_path: Path, toml: str) -> dict[str, str]:
    """Open the store under a config as `ingest` or `serve` would; the write keys that authenticate."""
    world = World(open_store(f"sqlite:///{tmp_path}/idstitch.db"), config_from_toml(toml))
    try:
        keys = {}
        for source in world.store.sources():
            found = world.engine.source_for_write_key(source.write_key)
            if found is not None:
                keys[source.write_key] = f"{found.space}.{found.name}"
        return keys
    finally:
        world.close()


@pytest.mark.parametrize(
    "after, expected",
    [
        # a source renamed, keeping the key its clients send
        ('[spaces.a.sources.site]\nwrite_key = "wk1"\n', {"wk1": "a.site"}),
        # a source moved to another space
        ('[spaces.b.sources.web]\nwrite_key = "wk1"\n', {"wk1": "b.web"}),
        # two sources swapping keys
        (
            '[spaces.a.sources.web]\nwrite_key = "wk2"\n[spaces.a.sources.app]\nwrite_key = "wk1"\n',
            {"wk1": "a.app", "wk2": "a.web"},
        ),
    ],
)
def test_a_write_key_can_move_to_another_source(tmp_path: Path, after: str, expected: dict[str, str]) -> None:
    before = '[spaces.a.sources.web]\nwrite_key = "wk1"\n[spaces.a.sources.app]\nwrite_key = "wk2"\n'
    assert _write_keys(tmp_path, before) == {"wk1": "a.web", "wk2": "a.app"}
    assert _write_keys(tmp_path, after) == expected


def test_a_running_process_opens_its_write_keys_as_its_own_config_says_whatever_a_later_one_wrote(
    tmp_path: Path,
) -> None:
    # A rolling config change: `serve` still runs the old config (wk_prod_crm: prod's merge = false
    # feed) when a process with the new one (that key moved to staging) starts on the same store and
    # rewrites its sources. Until restarted, serve must keep writing that key into prod, as its config
    # says: it wrote it into staging, under staging's policy, and refused staging's own key with 401.
    before = (
        '[spaces.prod.sources.crm]\nwrite_key = "wk_prod_crm"\nmerge = false\n'
        '[spaces.staging.sources.crm]\nwrite_key = "wk_staging_crm"\n'
    )
    after = '[spaces.prod]\n[spaces.staging.sources.crm]\nwrite_key = "wk_prod_crm"\n'
    url = f"sqlite:///{tmp_path}/idstitch.db"
    running = World(open_store(url), config_from_toml(before))
    started = World(open_store(url), config_from_toml(after))
    try:
        for world, key, expected in (
            (running, "wk_prod_crm", ("prod", "crm")),
            (running, "wk_staging_crm", ("staging", "crm")),
            (started, "wk_prod_crm", ("staging", "crm")),
            (started, "wk_staging_crm", None),
        ):
            found = world.engine.source_for_write_key(key)
            assert (None if found is None else (found.space, found.name)) == expected, (key, expected)
    finally:
        running.close()
        started.close()


def test_token_variables_replace_the_generated_tokens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("IDSTITCH_WRITE_KEY", "IDSTITCH_PROFILE_TOKEN", "IDSTITCH_ADMIN_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    url = f"sqlite:///{tmp_path}/idstitch.db"
    first = Engine(open_store(url), Config.default())
    generated = {record.kind: record.token for record in first.created_tokens}
    first.store.close()
    assert set(generated) == {"read", "admin"}
    # The generated read token leaked: the operator sets their own instead of it.
    monkeypatch.setenv("IDSTITCH_PROFILE_TOKEN", "pt_mine")
    second = Engine(open_store(url), Config.default())
    try:
        assert second.token("pt_mine") == TokenRecord("default", "pt_mine", "read")
        assert second.token(generated["read"]) is None
        assert second.token(generated["admin"]) is not None  # the admin one was not replaced
        assert not second.created_tokens
    finally:
        second.store.close()


def test_the_readme_names_every_config_key() -> None:
    # "Every key is checked" is only useful when every key can be found without reading the source.
    readme = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")
    section = readme.split("\n## Configuration\n", 1)[1].split("\n## ", 1)[0]
    keys = {*config._SPACE_KEYS, *config._SOURCE_KEYS, *rules._SPACE_KEYS, *rules._IDENTIFIER_KEYS}
    keys |= {*rules._SOURCE_KEYS, *rules._BLOCKED_KEYS, *rules._NON_UNIQUE_KEYS}
    # Tables are named by their header: `[spaces.NAME.blocked]`.
    missing = sorted(key for key in keys if f"`{key}`" not in section and f"NAME.{key}" not in section)
    assert not missing, f"README's Configuration section does not name: {', '.join(missing)}"


def test_a_new_sqlite_store_holding_the_secrets_is_private(tmp_path: Path) -> None:
    # The first run keeps the generated write key and tokens in the store (README: "These are secrets").
    engine = Engine(open_store(f"sqlite:///{tmp_path}/idstitch.db"), Config.default())
    try:
        assert engine.created_write_keys
        for file in tmp_path.glob("idstitch.db*"):
            assert file.stat().st_mode & 0o777 == 0o600, file
    finally:
        engine.store.close()


@pytest.mark.parametrize("variable", ["IDSTITCH_WRITE_KEY", "IDSTITCH_PROFILE_TOKEN", "IDSTITCH_ADMIN_TOKEN"])
def test_a_key_or_token_variable_http_basic_cannot_carry_is_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str
) -> None:
    monkeypatch.setenv(variable, "wk:with colon")
    with pytest.raises(ConfigError, match=f"^{variable}: cannot hold ':', whitespace or control characters"):
        Config.default()


def _reopened(tmp_path: Path, toml: str) -> World:
    """The store of tmp_path under a config, as after editing the TOML and restarting."""
    return World(open_store(f"sqlite:///{tmp_path}/idstitch.db"), config_from_toml(toml))


def test_stored_identifiers_stay_findable_after_their_types_collection_or_normalisation_changes(
    tmp_path: Path,
) -> None:
    # Stored identifiers keep the collection and spelling they were stored with; the rules of now
    # must not make `profile` or the Profile API answer "no profile" for what a profile holds.
    before = (
        "[spaces.s.identifiers.company_id]\ncollection = 'accounts'\n"
        "[spaces.s.identifiers.crm_id]\nnormalise = 'exact'\n"
    )
    world = _reopened(tmp_path, "[spaces.s]\n" + before)
    space = world.space("s")
    external = [
        {"id": "CO-1", "type": "company_id", "collection": "accounts", "encoding": "none"},
        {"id": "AbC", "type": "crm_id", "collection": "users", "encoding": "none"},
    ]
    outcome = space.send("track", userId="u1", context={"externalIds": external})
    world.close()
    # company_id is no longer configured (a removed custom type), crm_id is now lower-cased, and a
    # type learned in users is now declared for accounts.
    after = "[spaces.s]\n[spaces.s.identifiers.crm_id]\nnormalise = 'lower'\n"
    after += "[spaces.s.identifiers.loyalty]\ncollection = 'accounts'\n"
    world = _reopened(tmp_path, after)
    space = world.space("s")
    loyalty = space.send(
        "track",
        userId="u2",
        context={"externalIds": [{"id": "L1", "type": "loyalty", "collection": "users", "encoding": "none"}]},
    )
    try:
        rules = space.rules
        assert find_root(world.store, rules, "s", "company_id:CO-1") == outcome.account_id
        assert find_root(world.store, rules, "s", "crm_id:AbC") == outcome.profile_id
        assert find_root(world.store, rules, "s", "crm_id:AbC", "users") == outcome.profile_id
        assert find_root(world.store, rules, "s", "loyalty:L1") == loyalty.profile_id
        # A forced collection is still only that collection.
        assert find_root(world.store, rules, "s", "company_id:CO-1", "users") is None
    finally:
        world.close()


def test_declaring_a_stored_value_non_unique_shows_it_and_undeclaring_it_lets_it_merge_again(
    tmp_path: Path,
) -> None:
    world = _reopened(tmp_path, "[spaces.s]\n")
    space = world.space("s")
    alice = space.send("identify", userId="alice", anonymousId="kiosk").profile_id
    bob = space.send("identify", traits={"email": "bo@x.io"}).profile_id
    assert alice is not None and bob is not None
    world.close()

    # The kiosk's id is declared non-unique after it was stored: it never joins the two, and what acts
    # as a suspect is listed as one (admin API, stats, explain), not silently kept from merging.
    world = _reopened(tmp_path, "[spaces.s]\n[spaces.s.non_unique]\nexact = ['kiosk']\n")
    space = world.space("s")
    joined = space.send("identify", anonymousId="kiosk", traits={"email": "bo@x.io"})
    assert joined.profile_id == bob and joined.merged == ()
    assert [(item.identifier, item.evidence_type) for item in world.store.suspects("s")] == [
        ("anonymous_id:kiosk", "declared")
    ]
    assert world.store.stats("s").suspect == 1
    document = explain_document(world.store, "s", alice)
    assert document is not None and [item["identifier"] for item in document["suspects"]] == [
        "anonymous_id:kiosk"
    ]
    world.close()

    # The declaration was a mistake and is removed: the id is an ordinary anonymous id again. Explain
    # no longer says the space's rules declare it, and it joins the profiles it links.
    world = _reopened(tmp_path, "[spaces.s]\n")
    space = world.space("s")
    assert world.store.suspects("s") == [] and world.store.stats("s").suspect == 0
    document = explain_document(world.store, "s", alice)
    assert document is not None and document["suspects"] == []
    assert not any(record.suspect for record in world.store.identifiers("s", alice))
    merged = space.send("identify", anonymousId="kiosk", traits={"email": "bo@x.io"})
    assert merged.profile_id == alice and merged.merged == (bob,)
    world.close()
