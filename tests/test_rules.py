"""IdentityRules: parsing a space's config, the DEFAULTS.md rows, errors, learned custom types."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from helpers import World, at, config_from_toml, open_space, open_world
from idstitch.config import DEFAULT_RATE_LIMIT, Config
from idstitch.core.errors import ConfigError, RuleViolation
from idstitch.core.rules import IdentityRules, ValueList

# DEFAULTS.md, row by row: priority, type, limit, window, merge.
DEFAULT_ROWS = [
    (1, "user_id", 1, "ever", True),
    (2, "email", 5, "annually", True),
    (3, "android.id", 5, "annually", True),
    (4, "android.idfa", 5, "annually", True),
    (5, "android.push_token", 5, "annually", False),
    (6, "anonymous_id", 5, "weekly", True),
    (7, "cross_domain_id", 5, "weekly", True),
    (8, "ga_client_id", 5, "weekly", True),
    (9, "ios.id", 5, "annually", True),
    (10, "ios.idfa", 5, "annually", True),
    (11, "ios.push_token", 5, "annually", False),
]
DEFAULT_BLOCKED_EXACT = {
    "-1",
    "null",
    "undefined",
    "none",
    "nil",
    "anonymous",
    "unknown",
    "[object Object]",
    "",
}


def ext(id: str, type: str, collection: str = "users") -> dict[str, Any]:
    return {"id": id, "type": type, "collection": collection, "encoding": "none"}


# --- defaults -----------------------------------------------------------------------------------


@pytest.mark.parametrize("priority, kind, limit, window, merge", DEFAULT_ROWS)
def test_default_row(priority: int, kind: str, limit: int, window: str, merge: bool) -> None:
    rule = IdentityRules.default().rule(kind)
    assert (rule.priority, rule.type, rule.limit, rule.window, rule.merge, rule.collection) == (
        priority,
        kind,
        limit,
        window,
        merge,
        "users",
    )
    assert rule.normalise == ("trim_lower" if kind == "email" else "exact")


def test_default_users_rules_are_exactly_the_table_in_priority_order() -> None:
    rules = IdentityRules.default()
    users = [rule for rule in rules.rules if rule.collection == "users"]
    assert [(rule.priority, rule.type) for rule in users] == [(row[0], row[1]) for row in DEFAULT_ROWS]
    ranked = sorted((row[1] for row in DEFAULT_ROWS), key=rules.rank)
    assert ranked == [row[1] for row in DEFAULT_ROWS]


def test_default_accounts_rule() -> None:
    rule = IdentityRules.default().rule("group_id")
    assert (rule.collection, rule.limit, rule.window, rule.merge) == ("accounts", 1, "ever", True)


def test_default_custom_types_rank_below_every_default() -> None:
    rules = IdentityRules.default().with_learned([("crm_id", "users")])
    rule = rules.rule("crm_id")
    assert (rule.priority, rule.limit, rule.window, rule.merge) == (12, 5, "ever", True)
    assert all(rules.rank("crm_id") > rules.rank(row[1]) for row in DEFAULT_ROWS)


def test_default_caps_blocked_and_switches() -> None:
    rules = IdentityRules.default()
    assert (rules.max_merges, rules.max_identifiers) == (100, 1000)
    for value in DEFAULT_BLOCKED_EXACT:
        assert rules.blocked.matches(value), value
    assert [pattern.pattern for pattern in rules.blocked.patterns] == ["^[0-]*$", r"^\s+$"]
    for value in ("0", "0000", "00000000-0000-0000-0000-000000000000", "-", " ", "\t \n", "\u3000"):
        assert rules.blocked.matches(value)
    for value in ("u1", "10", "0-1-a", "nullable", "anonymous_1", " u1 "):
        assert not rules.blocked.matches(value), value
    assert rules.alias_enabled is True
    assert rules.detect_non_unique is True
    assert rules.sources == {}


def test_defaults_are_independent_per_space() -> None:
    config = config_from_toml('[spaces.a]\n[spaces.a.blocked]\nexact = ["void"]\n[spaces.b]\n')
    assert config.space("a").rules.blocked.matches("void")
    assert not config.space("b").rules.blocked.matches("void")
    assert config.space("b").rules == IdentityRules.default()


# --- parsing ------------------------------------------------------------------------------------


def test_override_one_row_keeps_the_rest() -> None:
    rules = IdentityRules.from_config({"identifiers": {"email": {"limit": 2}}})
    email = rules.rule("email")
    assert (email.priority, email.limit, email.window, email.merge, email.normalise) == (
        2,
        2,
        "annually",
        True,
        "trim_lower",
    )
    assert rules.rule("user_id") == IdentityRules.default().rule("user_id")


def test_spec_config_file_shape_is_accepted() -> None:
    config = config_from_toml(
        """
[spaces.app_a]
profile_tokens = ["pt_app_a_read"]
admin_tokens = ["at_app_a"]
[spaces.app_a.sources.web]
write_key = "wk_app_a_web"
[spaces.app_a.sources.crm]
write_key = "wk_app_a_crm"
merge = false
[spaces.app_a.identifiers.user_id]
priority = 1
limit = 1
window = "ever"
[spaces.app_a.identifiers.phone]
priority = 3
limit = 2
window = "ever"
trait_keys = ["phone"]
[spaces.app_a.blocked]
exact = ["void", "abc123"]
regex = ["^test-.*$"]
"""
    )
    space = config.space("app_a")
    rules = space.rules
    assert space.profile_tokens == ("pt_app_a_read",) and space.admin_tokens == ("at_app_a",)
    assert {name: source.write_key for name, source in space.sources.items()} == {
        "web": "wk_app_a_web",
        "crm": "wk_app_a_crm",
    }
    assert rules.source("crm").merge is False and rules.source("web").merge is True
    phone = rules.rule("phone")
    assert (phone.priority, phone.limit, phone.window, phone.trait_keys) == (3, 2, "ever", ("phone",))
    assert rules.knows("phone")
    assert (
        rules.blocked.matches("void") and rules.blocked.matches("abc123") and rules.blocked.matches("test-1")
    )
    assert rules.blocked.matches("null")  # added to the defaults, not instead of them


def test_profile_api_tokens_and_rate_limit_are_checked() -> None:
    config = config_from_toml("[spaces.a]\nprofile_tokens = ['pt']\nrate_limit = 0\n[spaces.b]\n")
    assert config.space("a").rate_limit == 0 and config.space("b").rate_limit == DEFAULT_RATE_LIMIT
    for body, complaint in [
        ("[spaces.a]\nprofile_tokens = ['t']\n[spaces.b]\nadmin_tokens = ['t']", "already used by spaces.a"),
        ("[spaces.a]\nprofile_tokens = ['t']\nadmin_tokens = ['t']", "already used by spaces.a"),
        ("[spaces.a]\nprofile_tokens = ['']", "cannot be empty"),
        ("[spaces.a]\nadmin_tokens = 'at'", "must be a list of strings"),
        ("[spaces.a]\nrate_limit = -1", "rate_limit"),
        ("[spaces.a]\nrate_limit = 'fast'", "rate_limit"),
    ]:
        with pytest.raises(ConfigError, match=complaint):
            config_from_toml(body)


@pytest.mark.parametrize(
    "body",
    [
        # prod's write key, which every visitor of prod's site can read in its page, was staging's admin token
        "[spaces.prod.sources.web]\nwrite_key = 'k'\n[spaces.staging]\nadmin_tokens = ['k']\n",
        # the same, the token's space first
        "[spaces.staging]\nprofile_tokens = ['k']\n[spaces.prod.sources.web]\nwrite_key = 'k'\n",
        # within one space
        "[spaces.prod]\nprofile_tokens = ['k']\n[spaces.prod.sources.web]\nwrite_key = 'k'\n",
    ],
)
def test_a_write_key_is_never_also_a_profile_api_token(body: str) -> None:
    # A write key is public (analytics.js and the mobile libraries carry it to every client); a token
    # reads profiles. One string as both gave anyone holding a space's write key the Profile API of
    # whichever space took it as a token.
    with pytest.raises(ConfigError) as info:
        config_from_toml(body)
    assert "is also the write key of spaces.prod.sources.web" in str(info.value)
    assert "'k'" not in str(info.value)  # secrets are not repeated


def test_a_write_key_variable_is_never_also_a_token_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IDSTITCH_WRITE_KEY", "wk_same")
    monkeypatch.setenv("IDSTITCH_ADMIN_TOKEN", "wk_same")
    monkeypatch.delenv("IDSTITCH_PROFILE_TOKEN", raising=False)
    with pytest.raises(
        ConfigError, match=r"^IDSTITCH_ADMIN_TOKEN: is also the write key of IDSTITCH_WRITE_KEY"
    ):
        Config.default()


def test_configured_custom_type_without_priority_follows_the_defaults() -> None:
    rules = IdentityRules.from_config({"identifiers": {"Loyalty_Card": {"trait_keys": ["loyalty_card"]}}})
    rule = rules.rule("loyalty_card")  # types are lower-case
    assert (rule.priority, rule.limit, rule.window, rule.merge) == (12, 5, "ever", True)


def test_same_priority_ties_go_to_the_rules_order() -> None:
    rules = IdentityRules.from_config({"identifiers": {"phone": {"priority": 2}}})
    assert rules.rule("phone").priority == rules.rule("email").priority == 2
    assert rules.rank("email") < rules.rank("phone") < rules.rank("android.id")


def test_priority_tie_drops_the_later_type_first(tmp_path: Path) -> None:
    toml = "[spaces.s.identifiers.phone]\npriority = 2\ntrait_keys = ['phone']\n"
    with open_space(tmp_path, toml) as space:
        first = space.send(
            "identify", userId="abc", traits={"email": "e@x.io", "phone": "+1"}, at=at(minutes=1)
        )
        second = space.send(
            "identify", userId="new", traits={"email": "e@x.io", "phone": "+1"}, at=at(minutes=2)
        )
        assert second.created and second.profile_id != first.profile_id
        assert [str(d.identifier) for d in second.dropped] == ["phone:+1", "email:e@x.io"]


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "table, field",
    [
        ({"identifiers": {"email": {"window": "fortnightly"}}}, "identifiers.email.window"),
        ({"identifiers": {"email": {"limit": 0}}}, "identifiers.email.limit"),
        ({"identifiers": {"email": {"limit": -3}}}, "identifiers.email.limit"),
        ({"identifiers": {"email": {"limit": "5"}}}, "identifiers.email.limit"),
        ({"identifiers": {"email": {"limit": True}}}, "identifiers.email.limit"),
        ({"identifiers": {"phone": {"priority": "high"}}}, "identifiers.phone.priority"),
        ({"identifiers": {"phone": {"collection": "people"}}}, "identifiers.phone.collection"),
        ({"identifiers": {"phone": {"normalise": "soundex"}}}, "identifiers.phone.normalise"),
        ({"identifiers": {"phone": {"trait_keys": [1]}}}, "identifiers.phone.trait_keys"),
        ({"identifiers": {"phone": 3}}, "identifiers.phone"),
        ({"identifiers": []}, "identifiers"),
        ({"blocked": {"regex": ["("]}}, "blocked"),
        ({"blocked": {"regex": "^x$"}}, "blocked.regex"),
        ({"blocked": {"exact": [1]}}, "blocked.exact"),
        ({"non_unique": {"regex": ["[a-"]}}, "non_unique"),
        ({"max_merges": 0}, "max_merges"),
        ({"max_identifiers": 0}, "max_identifiers"),
        ({"custom_limit": 0}, "custom_limit"),
        ({"custom_window": "hourly"}, "custom_window"),
        ({"sources": {"crm": "no"}}, "sources.crm"),
    ],
)
def test_bad_rules_name_the_field(table: dict[str, Any], field: str) -> None:
    with pytest.raises(RuleViolation) as info:
        IdentityRules.from_config(table, "spaces.app_a")
    assert f"spaces.app_a.{field}" in str(info.value)


@pytest.mark.parametrize(
    "table, field, complaint",
    [
        # A string is not split into one-character keys.
        ({"identifiers": {"phone": {"trait_keys": "phone"}}}, "identifiers.phone.trait_keys", "got a string"),
        ({"identifiers": {"phone": {"trait_keys": [""]}}}, "identifiers.phone.trait_keys", "empty"),
        # Booleans must be TOML booleans: bool("false") is True.
        ({"identifiers": {"phone": {"merge": "false"}}}, "identifiers.phone.merge", "true or false"),
        ({"identifiers": {"email": {"merge": 0}}}, "identifiers.email.merge", "true or false"),
        ({"sources": {"crm": {"merge": "false"}}}, "sources.crm.merge", "true or false"),
        ({"alias": "false"}, "alias", "true or false"),
        ({"detect_non_unique": "no"}, "detect_non_unique", "true or false"),
        ({"email_from_track_properties": 1}, "email_from_track_properties", "true or false"),
        ({"blocked": {"replace_defaults": "false"}}, "blocked.replace_defaults", "true or false"),
        # Whole numbers: no strings, no floats, and priority 1 is the most trusted.
        ({"identifiers": {"phone": {"priority": 0}}}, "identifiers.phone.priority", "at least 1"),
        ({"identifiers": {"phone": {"priority": 2.5}}}, "identifiers.phone.priority", "a float"),
        ({"identifiers": {"phone": {"priority": "3"}}}, "identifiers.phone.priority", "a string"),
        ({"identifiers": {"email": {"limit": 2.0}}}, "identifiers.email.limit", "a float"),
        ({"max_merges": "100"}, "max_merges", "a string"),
        ({"custom_limit": 1.5}, "custom_limit", "a float"),
        # Strings stay strings: 7 is not turned into "7".
        ({"identifiers": {"email": {"window": 7}}}, "identifiers.email.window", "an integer"),
        ({"custom_window": True}, "custom_window", "a boolean"),
        ({"sources": {"crm": {"identifier_types": "email"}}}, "sources.crm.identifier_types", "got a string"),
        # Unknown keys are typos, not settings to ignore.
        ({"identifers": {}}, "identifers", "valid keys"),
        ({"identifiers": {"phone": {"trait_key": ["phone"]}}}, "identifiers.phone.trait_key", "trait_keys"),
        ({"identifiers": {"email": {"normalize": "lower"}}}, "identifiers.email.normalize", "normalise"),
        ({"sources": {"crm": {"merges": False}}}, "sources.crm.merges", "merge"),
        ({"blocked": {"exacts": ["x"]}}, "blocked.exacts", "exact"),
        ({"non_unique": {"replace_defaults": True}}, "non_unique.replace_defaults", "regex"),
        # One type, one table: `Phone` and `phone` would silently overwrite each other.
        ({"identifiers": {"Phone": {"limit": 1}, "phone": {"limit": 2}}}, "identifiers.phone", "same type"),
        ({"identifiers": {"": {"limit": 1}}}, "identifiers.", "empty"),
        ({"identifiers": {"a:b": {"limit": 1}}}, "identifiers.a:b", "':'"),
        # A misspelt type in a source's policy would drop that identifier from every message it sends.
        ({"sources": {"crm": {"identifier_types": ["emial"]}}}, "sources.crm.identifier_types", "'emial'"),
        ({"sources": {"crm": {"identifier_types": ["phone"]}}}, "sources.crm.identifier_types", "phone]"),
        # Built-in types are read into a fixed collection: the setting would only mislead lookups.
        ({"identifiers": {"email": {"collection": "accounts"}}}, "identifiers.email.collection", "users"),
        ({"identifiers": {"group_id": {"collection": "users"}}}, "identifiers.group_id.collection", "only"),
        ({"blocked": {"regex": ["^ok$", "(x"]}}, "blocked.regex", "'(x'"),
        ({"non_unique": {"regex": ["[a-"]}}, "non_unique.regex", "invalid regex"),
    ],
)
def test_bad_setting_types_name_the_key(table: dict[str, Any], field: str, complaint: str) -> None:
    with pytest.raises(RuleViolation) as info:
        IdentityRules.from_config(table, "spaces.app_a")
    assert f"spaces.app_a.{field}" in str(info.value)
    assert complaint in str(info.value)


def test_source_identifier_types_name_configured_or_declared_types() -> None:
    rules = IdentityRules.from_config(
        {
            "identifiers": {"Phone": {"trait_keys": ["phone"]}, "email": {"collection": "users"}},
            "sources": {"crm": {"identifier_types": ["Email", "phone", "group_id", "ios.id"]}},
        }
    )
    assert rules.source("crm").identifier_types == {"email", "phone", "group_id", "ios.id"}


def test_unknown_source_identifier_type_error_is_one_line_with_the_fix() -> None:
    with pytest.raises(RuleViolation) as info:
        IdentityRules.from_config(
            {"sources": {"crm": {"identifier_types": ["email", "loyalty.card"]}}}, "spaces.a"
        )
    message = str(info.value)
    assert message.startswith("spaces.a.sources.crm.identifier_types: unknown identifier type 'loyalty.card'")
    assert "known: user_id, email," in message
    assert "[spaces.a.identifiers.'loyalty.card'] table" in message and "\n" not in message


def test_trait_keys_error_reads_as_the_audit_asked() -> None:
    with pytest.raises(RuleViolation) as info:
        IdentityRules.from_config({"identifiers": {"phone": {"trait_keys": "phone"}}}, "spaces.a")
    expected = "spaces.a.identifiers.phone.trait_keys: must be a list of strings, got a string"
    assert str(info.value).startswith(expected)


def test_unknown_key_error_lists_the_valid_ones() -> None:
    with pytest.raises(RuleViolation) as info:
        IdentityRules.from_config({"identifiers": {"phone": {"limits": 2}}}, "spaces.a")
    message = str(info.value)
    assert message.startswith("spaces.a.identifiers.phone.limits: unknown key")
    for key in ("collection", "limit", "merge", "normalise", "priority", "trait_keys", "window"):
        assert key in message


def test_booleans_given_as_booleans_are_kept() -> None:
    rules = IdentityRules.from_config(
        {
            "identifiers": {"phone": {"merge": False, "trait_keys": ["phone"]}},
            "sources": {"crm": {"merge": False}},
            "blocked": {"replace_defaults": True},
            "alias": False,
            "detect_non_unique": False,
            "email_from_track_properties": True,
        }
    )
    assert rules.rule("phone").merge is False and rules.source("crm").merge is False
    assert not rules.blocked.matches("null")
    assert (rules.alias_enabled, rules.detect_non_unique, rules.email_from_track_properties) == (
        False,
        False,
        True,
    )


def test_string_trait_keys_no_longer_match_single_characters(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"spaces\.s\.identifiers\.phone\.trait_keys"):
        config_from_toml('[spaces.s.identifiers.phone]\ntrait_keys = "phone"\n')


def test_bad_regex_error_names_the_pattern() -> None:
    with pytest.raises(RuleViolation) as info:
        IdentityRules.from_config({"blocked": {"regex": ["^ok$", "(unclosed"]}})
    assert "regex" in str(info.value) and "(unclosed" in str(info.value)


@pytest.mark.parametrize(
    "toml, field",
    [
        ('[spaces.app_a.identifiers.email]\nwindow = "biweekly"\n', "spaces.app_a.identifiers.email.window"),
        ("[spaces.app_a.identifiers.email]\nlimit = 0\n", "spaces.app_a.identifiers.email.limit"),
        ('[spaces.app_a.blocked]\nregex = ["*x"]\n', "spaces.app_a.blocked"),
    ],
)
def test_config_errors_name_the_field(toml: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        config_from_toml(toml)
    assert field in str(info.value)


# --- learned custom types -----------------------------------------------------------------------


def test_with_learned_appends_in_first_seen_order() -> None:
    rules = IdentityRules.default()
    learned = rules.with_learned([("zeta", "users"), ("alpha", "users"), ("email", "users")])
    learned = learned.with_learned([("alpha", "users"), ("beta", "accounts")])
    assert [rule.type for rule in learned.rules][-3:] == ["zeta", "alpha", "beta"]
    assert [learned.rule(t).priority for t in ("zeta", "alpha", "beta")] == [12, 13, 14]
    assert learned.rule("beta").collection == "accounts"
    assert learned.rule("email") == rules.rule("email")
    assert rules.with_learned([("email", "users")]) is rules


def _learned(world: World, space: str) -> list[tuple[str, int, int, str, bool, str]]:
    rules = world.engine.rules(space)
    configured = {rule.type for rule in IdentityRules.default().rules} | {"phone"}
    return [
        (rule.type, rule.priority, rule.limit, rule.window, rule.merge, rule.collection)
        for rule in rules.rules
        if rule.type not in configured
    ]


def test_learned_types_get_the_lowest_priority_and_persist_across_restarts(tmp_path: Path) -> None:
    toml = "[spaces.s]\n[spaces.s.identifiers.phone]\ntrait_keys = ['phone']\n"
    world = open_world(tmp_path, toml)
    try:
        space = world.space()
        assert space.rules.rule("phone").priority == 12  # configured custom type first
        space.send("track", userId="u1", context={"externalIds": [ext("z1", "Zeta"), ext("a1", "alpha")]})
        space.send("track", userId="u1", context={"externalIds": [ext("b1", "beta", "accounts")]})
        space.send("track", userId="u2", context={"externalIds": [ext("z2", "zeta")]})
        expected = [
            ("zeta", 13, 5, "ever", True, "users"),
            ("alpha", 14, 5, "ever", True, "users"),
            ("beta", 15, 5, "ever", True, "accounts"),
        ]
        assert _learned(world, "s") == expected
        assert world.store.learned_types("s") == [("zeta", "users"), ("alpha", "users"), ("beta", "accounts")]
    finally:
        world.close()

    # A new process on the same file: the same rules, and new types go after the old ones.
    world = open_world(tmp_path, toml)
    try:
        assert _learned(world, "s") == expected
        world.space().send("track", userId="u3", context={"externalIds": [ext("g1", "gamma")]})
        assert _learned(world, "s") == [*expected, ("gamma", 16, 5, "ever", True, "users")]
        # the learned types resolve as before the restart
        assert world.space().profile_of("zeta:z1") == world.space().profile_of("user_id:u1")
    finally:
        world.close()
    world = open_world(tmp_path, toml)
    try:
        assert [row[0] for row in _learned(world, "s")] == ["zeta", "alpha", "beta", "gamma"]
    finally:
        world.close()


def test_learned_types_are_per_space(tmp_path: Path) -> None:
    world = open_world(tmp_path, "[spaces.a]\n[spaces.b]\n")
    try:
        world.space("a").send("track", userId="u1", context={"externalIds": [ext("x", "only_a")]})
        world.space("b").send("track", userId="u1", context={"externalIds": [ext("x", "only_b")]})
        assert [row[0] for row in _learned(world, "a")] == ["only_a"]
        assert [row[0] for row in _learned(world, "b")] == ["only_b"]
    finally:
        world.close()


def test_rejected_message_learns_no_type(tmp_path: Path) -> None:
    world = open_world(tmp_path)
    try:
        space = world.space()
        space.send("track", userId="u1", context={"externalIds": [ext("x", "kept")]})
        # a rejected message (no valid externalIds entry) learns nothing
        space.send("track", userId="u1", context={"externalIds": [{"id": "x", "type": "lost"}]})
        assert [row[0] for row in _learned(world, "default")] == ["kept"]
        assert world.store.learned_types("default") == [("kept", "users")]
    finally:
        world.close()


def test_learned_types_stop_at_the_spaces_cap_and_the_rest_are_dropped_explained(tmp_path: Path) -> None:
    # Anyone holding a public write key can send a new externalIds type with every message; each was
    # added to the rules for good, and learning the next one read and rebuilt them all (10,000 types
    # took over a minute per request of 50 messages, holding up every other client's writes).
    world = open_world(tmp_path, "[spaces.s]\nmax_learned_types = 3\n")
    try:
        space = world.space()
        outcomes = [
            space.send("track", userId=f"u{n}", context={"externalIds": [ext("x", f"t{n}")]})
            for n in range(5)
        ]
        assert [row[0] for row in _learned(world, "s")] == ["t0", "t1", "t2"]
        assert [outcome.dropped for outcome in outcomes[:3]] == [(), (), ()]
        for n in (3, 4):
            assert outcomes[n].status == "resolved"
            assert [(str(item.identifier), item.rule) for item in outcomes[n].dropped] == [
                (f"t{n}:x", "cap 3 learned identifier types per space")
            ]
            assert space.identifiers_of(f"user_id:u{n}") == {f"user_id:u{n}"}
        # A type learned before the cap goes on being read; a message with only a refused type is
        # unresolved, as one whose identifiers are all blocked.
        again = space.send("track", userId="u9", context={"externalIds": [ext("y", "t1")]})
        assert again.dropped == () and space.identifiers_of("user_id:u9") == {"user_id:u9", "t1:y"}
        alone = space.send("track", context={"externalIds": [ext("x", "t7")]})
        assert alone.status == "unresolved"
        assert world.store.learned_types("s") == [("t0", "users"), ("t1", "users"), ("t2", "users")]
    finally:
        world.close()


def test_a_configured_custom_type_is_no_learned_one_and_a_cap_of_0_learns_none(tmp_path: Path) -> None:
    toml = "[spaces.s]\nmax_learned_types = 0\n[spaces.s.identifiers.phone]\n"
    world = open_world(tmp_path, toml)
    try:
        space = world.space()
        sent = space.send("track", userId="u1", context={"externalIds": [ext("1", "phone"), ext("x", "new")]})
        assert [str(item.identifier) for item in sent.dropped] == ["new:x"]
        assert space.identifiers_of("user_id:u1") == {"user_id:u1", "phone:1"}
        assert world.store.learned_types("s") == []
    finally:
        world.close()


def test_the_default_cap_of_learned_types_is_100() -> None:
    assert IdentityRules.default().max_learned_types == 100


@pytest.mark.parametrize("value", [-1, 2.5, "10", True])
def test_a_bad_learned_type_cap_names_the_field(value: object) -> None:
    with pytest.raises(RuleViolation, match=r"spaces\.app_a\.max_learned_types"):
        IdentityRules.from_config({"max_learned_types": value}, "spaces.app_a")


# --- trait-key identifiers by collection ----------------------------------------------------------

ACCOUNT_TRAIT_KEYS = """
[spaces.s.identifiers.domain]
collection = "accounts"
trait_keys = ["domain"]
[spaces.s.identifiers.phone]
trait_keys = ["phone"]
"""


def test_group_traits_give_the_account_its_trait_key_identifiers(tmp_path: Path) -> None:
    with open_space(tmp_path, ACCOUNT_TRAIT_KEYS) as space:
        group = space.send("group", userId="u1", groupId="acme", traits={"domain": "acme.com"})
        account = space.profile_of("group_id:acme")
        assert account is not None and group.account_id == account
        assert space.identifiers_of(account) == {"group_id:acme", "domain:acme.com"}
        assert space.identifiers_of("user_id:u1") == {"user_id:u1"}
        # A later identify carrying the domain finds that account instead of making a second one.
        later = space.send("identify", userId="u2", traits={"domain": "acme.com"})
        assert later.account_id == account
        assert space.roots("accounts") == [account]
        assert space.links_of("user_id:u2") == {account}


def test_group_traits_are_read_in_camel_or_snake_case_for_accounts(tmp_path: Path) -> None:
    toml = '[spaces.s.identifiers.sfdc_account]\ncollection = "accounts"\ntrait_keys = ["sfdc_account"]\n'
    with open_space(tmp_path, toml) as space:
        space.send("group", userId="u1", groupId="acme", traits={"sfdcAccount": "SF-1"})
        assert space.identifiers_of("group_id:acme") == {"group_id:acme", "sfdc_account:SF-1"}


def test_group_traits_do_not_feed_users_trait_key_identifiers(tmp_path: Path) -> None:
    with open_space(tmp_path, ACCOUNT_TRAIT_KEYS) as space:
        space.send("group", userId="u1", groupId="acme", traits={"phone": "+15550100"})
        assert space.identifiers_of("user_id:u1") == {"user_id:u1"}
        assert space.identifiers_of("group_id:acme") == {"group_id:acme"}
        assert space.profile_of("phone:+15550100") is None


def test_persons_traits_on_a_group_call_do_not_feed_the_account(tmp_path: Path) -> None:
    # context.traits and properties describe the person acting, not the group being joined.
    with open_space(tmp_path, ACCOUNT_TRAIT_KEYS) as space:
        space.send(
            "group",
            userId="u1",
            groupId="acme",
            context={"traits": {"domain": "gmail.com", "phone": "+15550100"}},
        )
        assert space.identifiers_of("group_id:acme") == {"group_id:acme"}
        assert space.identifiers_of("user_id:u1") == {"user_id:u1", "phone:+15550100"}
        assert space.roots("accounts") == [space.profile_of("group_id:acme")]


@pytest.mark.parametrize(
    ("regex", "combined"),
    [
        (["^null$", "^(test|demo)-", "0{8}"], True),
        (["^null$", "(?i)^unknown$"], False),  # global flags: each pattern is searched alone
        (["^(.)\\1+$", "^none$"], False),  # a numbered back-reference would shift in an alternation
    ],
)
def test_value_list_patterns_match_alone_and_combined_alike(regex: list[str], combined: bool) -> None:
    values = ValueList.build(["Anonymous"], regex, "blocked_values")
    assert (values.any_pattern is not None) is combined
    for value in [
        "null",
        "test-1",
        "demo-x",
        "000000001",
        "UNKNOWN",
        "unknown",
        "aaaa",
        "none",
        "user-7",
        "ab",
    ]:
        alone = value.lower() in values.exact or any(pattern.search(value) for pattern in values.patterns)
        assert values.matches(value) is alone, value
    assert values.matches("anonymous") and not values.matches("nul")


def test_rules_document_shows_every_space_setting() -> None:
    # GET …/rules is "the rules in effect": settings that change what is read or learned belong in it.
    table = {
        "custom_limit": 2,
        "custom_window": "daily",
        "email_from_track_properties": True,
        "alias": False,
        "max_learned_types": 7,
    }
    document = IdentityRules.from_config(table).as_dict()
    assert {key: document[key] for key in table} == table
