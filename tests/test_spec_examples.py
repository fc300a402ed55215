"""SPEC worked examples E1–E11 and the rest of §2–§4, through the Engine and a SQLite file store."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

import idstitch.engine as engine_module
from helpers import Space, at, ident, open_space, open_world, world_at
from idstitch.core.identifiers import DAMAGED_REASON, Identifier

ZEROS = "00000000-0000-0000-0000-000000000000"


@pytest.fixture
def space(tmp_path: Path) -> Iterator[Space]:
    with open_space(tmp_path) as opened:
        yield opened


def ext(id: Any, type: str, collection: str = "users", encoding: str = "none") -> dict[str, Any]:
    return {"id": id, "type": type, "collection": collection, "encoding": encoding}


def space_toml(body: str, name: str = "s") -> str:
    """A config with one space `name`; `body` is the rest of its tables (with their own headers)."""
    return f"[spaces.{name}]\n{body}\n"


# =============================================================================================
# Worked examples
# =============================================================================================


def test_e1_seed_example_anonymous_then_user_then_phone(space: Space) -> None:
    first = space.send("page", name="Pricing", anonymousId="anon_123", at=at(minutes=0))
    assert first.status == "resolved" and first.created
    profile = first.profile_id
    assert profile is not None and profile.startswith("use_")
    assert space.identifiers_of(profile) == {"anonymous_id:anon_123"}

    second = space.send(
        "track", event="User Signup", userId="use_123", anonymousId="anon_123", at=at(minutes=1)
    )
    assert second.profile_id == profile and not second.created
    assert space.identifiers_of(profile) == {"anonymous_id:anon_123", "user_id:use_123"}

    third = space.send(
        "track",
        event="Subscription Upgraded",
        userId="use_123",
        context={"externalIds": [ext("123-456-7890", "phone")]},
        at=at(minutes=2),
    )
    assert third.profile_id == profile
    assert space.identifiers_of(profile) == {
        "anonymous_id:anon_123",
        "user_id:use_123",
        "phone:123-456-7890",
    }
    for ref in ("phone:123-456-7890", "user_id:use_123", "anonymous_id:anon_123", profile):
        assert space.profile_of(ref) == profile, ref
    assert space.store.profile(space.name, profile) is not None
    assert space.event_count_of(profile) == 3
    assert {event.name for event in space.events_of(profile)} == {
        "Pricing",
        "User Signup",
        "Subscription Upgraded",
    }
    assert space.store.stats(space.name).profiles == 1


def test_e2_anonymous_to_known(space: Space) -> None:
    for minute in range(3):
        space.send("page", anonymousId="a1", name=f"Page {minute}", at=at(minutes=minute))
    outcome = space.send(
        "identify", userId="u1", anonymousId="a1", traits={"email": "j@x.io"}, at=at(minutes=5)
    )
    assert outcome.status == "resolved" and not outcome.created and outcome.merged == ()
    assert space.roots() == [outcome.profile_id]
    assert space.identifiers_of("user_id:u1") == {"anonymous_id:a1", "user_id:u1", "email:j@x.io"}
    for ref in ("anonymous_id:a1", "user_id:u1", "email:j@x.io"):
        assert space.profile_of(ref) == outcome.profile_id
    assert space.event_count_of("user_id:u1") == 4
    assert space.traits_of("user_id:u1") == {"email": "j@x.io"}


def test_e3_cross_device(space: Space) -> None:
    cart = space.send("track", event="Added to Cart", anonymousId="i1", userId="u1", at=at(minutes=1))
    order = space.send("track", event="Order Completed", anonymousId="d7", userId="u1", at=at(minutes=2))
    assert cart.profile_id == order.profile_id
    assert space.roots() == [cart.profile_id]
    assert space.identifiers_of("user_id:u1") == {"user_id:u1", "anonymous_id:i1", "anonymous_id:d7"}
    assert space.event_count_of("user_id:u1") == 2
    # The iPhone's anonymous id shows the order completed on Android.
    assert "Order Completed" in {event.name for event in space.events_of("anonymous_id:i1")}
    assert space.profile_of("anonymous_id:d7") == space.profile_of("anonymous_id:i1")


# The README's "Untrusted clients" config: public sources (page, apps) may contribute anonymous ids
# only; the backend, whose write key stays secret, says which person an anonymous id belongs to.
UNTRUSTED_CLIENTS = """
[spaces.s.sources.web]
write_key = "wk_web"
identifier_types = ["anonymous_id"]

[spaces.s.sources.ios]
write_key = "wk_ios"
identifier_types = ["anonymous_id"]

[spaces.s.sources.android]
write_key = "wk_android"
identifier_types = ["anonymous_id"]

[spaces.s.sources.backend]
write_key = "wk_backend"
"""


def test_e2_with_untrusted_clients_the_backend_identifies_the_pages_anonymous_id(tmp_path: Path) -> None:
    with world_at(tmp_path, UNTRUSTED_CLIENTS) as world:
        web = world.space_for_write_key("wk_web")
        backend = world.space_for_write_key("wk_backend")
        for minute in range(3):
            web.send("page", anonymousId="a1", name=f"Page {minute}", at=at(minutes=minute))
        # analytics.js repeats the userId on each call once identify ran in the page: dropped, explained.
        page = web.send("identify", userId="u1", anonymousId="a1", at=at(minutes=4))
        assert [(str(item.identifier), item.rule) for item in page.dropped] == [
            ("user_id:u1", "source web may not contribute user_id")
        ]
        known = backend.send(
            "identify", userId="u1", anonymousId="a1", traits={"email": "j@x.io"}, at=at(minutes=5)
        )
        assert known.profile_id == page.profile_id and known.merged == ()
        assert backend.roots() == [known.profile_id]
        assert backend.identifiers_of("user_id:u1") == {"anonymous_id:a1", "user_id:u1", "email:j@x.io"}
        assert backend.event_count_of("user_id:u1") == 5


def test_e3_with_untrusted_clients_each_device_is_joined_by_the_backend(tmp_path: Path) -> None:
    with world_at(tmp_path, UNTRUSTED_CLIENTS) as world:
        ios = world.space_for_write_key("wk_ios")
        android = world.space_for_write_key("wk_android")
        backend = world.space_for_write_key("wk_backend")
        cart = ios.send("track", event="Added to Cart", anonymousId="i1", userId="u1", at=at(minutes=1))
        order = android.send(
            "track", event="Order Completed", anonymousId="d7", userId="u1", at=at(minutes=2)
        )
        assert cart.profile_id != order.profile_id  # the apps' userId is not believed
        # Each app's login goes through the backend, which sends the device's anonymousId with the user.
        backend.send("track", event="Logged In", userId="u1", anonymousId="i1", at=at(minutes=3))
        backend.send("track", event="Logged In", userId="u1", anonymousId="d7", at=at(minutes=4))
        assert backend.roots() == [cart.profile_id]
        assert backend.identifiers_of("user_id:u1") == {"user_id:u1", "anonymous_id:i1", "anonymous_id:d7"}
        assert "Order Completed" in {event.name for event in backend.events_of("anonymous_id:i1")}


def test_with_untrusted_clients_a_forged_email_cannot_squat_the_victims(tmp_path: Path) -> None:
    # With a source that may contribute user_id and email, Mallory's `identify(userId=mallory,
    # traits.email=victim's)` before the victim signs up keeps that email on Mallory's profile, and the
    # user_id limit then drops the victim's email and the victim's own anonymous id at every login
    # (SPEC §4 step 5 drops the least trusted first). A public source limited to anonymous ids cannot.
    toml = UNTRUSTED_CLIENTS.replace('identifier_types = ["anonymous_id"]', "", 1)
    with world_at(tmp_path, toml) as world:
        web = world.space_for_write_key("wk_web")
        web.send("identify", userId="mallory", traits={"email": "new@x.io"}, at=at(minutes=1))
        signup = world.space_for_write_key("wk_backend").send(
            "identify", userId="newbie", anonymousId="n1", traits={"email": "new@x.io"}, at=at(minutes=2)
        )
        assert sorted(str(item.identifier) for item in signup.dropped) == [
            "anonymous_id:n1",
            "email:new@x.io",
        ]
        assert web.identifiers_of("email:new@x.io") == {"user_id:mallory", "email:new@x.io"}
    with world_at(tmp_path / "limited", UNTRUSTED_CLIENTS) as world:
        web = world.space_for_write_key("wk_web")
        web.send("identify", userId="mallory", traits={"email": "new@x.io"}, at=at(minutes=1))
        signup = world.space_for_write_key("wk_backend").send(
            "identify", userId="newbie", anonymousId="n1", traits={"email": "new@x.io"}, at=at(minutes=2)
        )
        assert signup.dropped == ()
        assert web.identifiers_of("email:new@x.io") == {"user_id:newbie", "anonymous_id:n1", "email:new@x.io"}


def test_with_untrusted_clients_an_email_claimed_without_a_user_id_takes_the_owners_signup(
    tmp_path: Path,
) -> None:
    # README (Untrusted clients): a public source that may contribute email but not user_id lets a
    # visitor claim an email with no userId; the owner's signup then lands on the visitor's profile,
    # so the visitor's own anonymous id reads the owner's profile. Limited to anonymous ids, it cannot.
    toml = UNTRUSTED_CLIENTS.replace(
        'identifier_types = ["anonymous_id"]', 'identifier_types = ["anonymous_id", "email"]', 1
    )
    with world_at(tmp_path, toml) as world:
        web = world.space_for_write_key("wk_web")
        claim = web.send("identify", anonymousId="m1", traits={"email": "new@x.io"}, at=at(minutes=1))
        signup = world.space_for_write_key("wk_backend").send(
            "identify", userId="newbie", anonymousId="n1", traits={"email": "new@x.io"}, at=at(minutes=2)
        )
        assert signup.dropped == ()
        assert signup.profile_id == claim.profile_id
        assert "user_id:newbie" in web.identifiers_of("anonymous_id:m1")
    with world_at(tmp_path / "limited", UNTRUSTED_CLIENTS) as world:
        web = world.space_for_write_key("wk_web")
        claim = web.send("identify", anonymousId="m1", traits={"email": "new@x.io"}, at=at(minutes=1))
        signup = world.space_for_write_key("wk_backend").send(
            "identify", userId="newbie", anonymousId="n1", traits={"email": "new@x.io"}, at=at(minutes=2)
        )
        assert signup.profile_id != claim.profile_id
        assert web.identifiers_of("anonymous_id:m1") == {"anonymous_id:m1"}


def test_e4_merge_of_two_existing_profiles(space: Space) -> None:
    a = space.send("page", anonymousId="a1", at=at(minutes=1)).profile_id
    b = space.send("identify", traits={"email": "j@x.io"}, at=at(minutes=2)).profile_id
    assert a is not None and b is not None and a != b
    merge = space.send(
        "identify", anonymousId="a1", traits={"email": "j@x.io"}, messageId="merge-1", at=at(minutes=3)
    )
    assert merge.status == "resolved"
    assert merge.profile_id == a
    assert merge.merged == (b,)
    # A's segment id survives, B's resolves to A.
    assert space.store.resolve_segment_id(space.name, a) == a
    assert space.store.resolve_segment_id(space.name, b) == a
    assert space.profile_of(b) == a
    assert space.roots() == [a]
    record = space.store.profile(space.name, a)
    assert record is not None and b in record.merged_segment_ids and record.merge_count == 1
    assert space.identifiers_of(a) == {"anonymous_id:a1", "email:j@x.io"}
    assert space.event_count_of(a) == 3  # both histories and the merging message
    assert space.event_count_of(b) == 3
    log = space.store.merges(space.name, a)
    assert len(log) == 1
    assert (log[0].parent_id, log[0].child_id, log[0].message_id) == (a, b, "merge-1")
    assert log[0].via == "email:j@x.io"
    assert log[0].at == at(minutes=3)


def test_e5_uniqueness_protects(space: Space) -> None:
    p = space.send("identify", userId="abc123", traits={"email": "jane@example.com"}, at=at(minutes=1))
    assert p.profile_id is not None
    before = (space.identifiers_of(p.profile_id), space.traits_of(p.profile_id))
    outcome = space.send(
        "identify", userId="abc456", traits={"email": "jane@example.com"}, messageId="m-abc456"
    )
    assert outcome.status == "resolved" and outcome.created
    new = outcome.profile_id
    assert new is not None and new != p.profile_id
    assert space.identifiers_of(new) == {"user_id:abc456"}
    assert space.profile_of("email:jane@example.com") == p.profile_id
    assert (space.identifiers_of(p.profile_id), space.traits_of(p.profile_id)) == before
    assert space.event_count_of(p.profile_id) == 1
    assert sorted(space.roots()) == sorted([p.profile_id, new])
    # The email was dropped by the user_id limit, and that is on record.
    assert [(str(d.identifier), d.rule) for d in outcome.dropped] == [
        ("email:jane@example.com", "user_id limit 1 ever")
    ]
    dropped = space.store.dropped(space.name, new)
    assert [(d.message_id, d.identifier) for d in dropped] == [("m-abc456", "email:jane@example.com")]
    assert "user_id" in dropped[0].rule and "limit" in dropped[0].rule
    # §5: the email has now been seen with two user_ids (dropped ones count): it is suspect.
    assert "email:jane@example.com" in {s.identifier for s in space.store.suspects(space.name)}


def test_e6_shared_device(space: Space) -> None:
    alice = space.send("identify", userId="alice", anonymousId="lib1", at=at(minutes=1))
    bob = space.send("identify", userId="bob", anonymousId="lib1", at=at(minutes=30), messageId="bob-login")
    assert alice.profile_id is not None and bob.profile_id is not None
    assert bob.profile_id != alice.profile_id and bob.created
    assert [(str(d.identifier), d.rule) for d in bob.dropped] == [
        ("anonymous_id:lib1", "user_id limit 1 ever")
    ]
    assert space.identifiers_of(alice.profile_id) == {"user_id:alice", "anonymous_id:lib1"}
    assert space.identifiers_of(bob.profile_id) == {"user_id:bob"}
    assert [d.identifier for d in space.store.dropped(space.name, bob.profile_id)] == ["anonymous_id:lib1"]

    # lib1 is now suspect, with the evidence.
    suspects = {s.identifier: s for s in space.store.suspects(space.name)}
    assert set(suspects) == {"anonymous_id:lib1"}
    assert suspects["anonymous_id:lib1"].evidence_type == "user_id"
    assert set(suspects["anonymous_id:lib1"].evidence_values) == {"alice", "bob"}
    assert [r.suspect for r in space.identifier_records(alice.profile_id) if r.type == "anonymous_id"] == [
        True
    ]

    # Bob's later anonymous browsing lands on Bob, not on Alice.
    later = space.send("page", anonymousId="lib1", at=at(minutes=40))
    assert later.profile_id == bob.profile_id
    assert space.event_count_of(alice.profile_id) == 1
    assert space.event_count_of(bob.profile_id) == 2

    # lib1 never merges anyone again: not Bob, not a third person found by another identifier.
    carol = space.send("identify", traits={"email": "carol@x.io"}, at=at(minutes=50)).profile_id
    with_email = space.send("identify", anonymousId="lib1", traits={"email": "carol@x.io"}, at=at(minutes=51))
    assert with_email.merged == ()
    assert with_email.profile_id == carol
    roots = set(space.roots())
    assert {alice.profile_id, bob.profile_id, carol} <= roots and len(roots) == 3

    # When Alice logs in again on the device, the device is hers again.
    space.send("identify", userId="alice", anonymousId="lib1", at=at(minutes=60))
    assert space.send("page", anonymousId="lib1", at=at(minutes=61)).profile_id == alice.profile_id
    assert len(set(space.roots())) == 3


def test_e7_junk_ids(space: Space) -> None:
    senders = [("u1", ZEROS), ("u2", ZEROS), ("u3", "null"), ("u4", "null")]
    outcomes = [
        space.send("identify", userId=user, anonymousId=value, at=at(minutes=n))
        for n, (user, value) in enumerate(senders)
    ]
    assert all(outcome.status == "resolved" for outcome in outcomes)
    profiles = [str(outcome.profile_id) for outcome in outcomes]
    assert len(set(profiles)) == 4
    assert sorted(space.roots()) == sorted(profiles)
    for (user, junk), profile in zip(senders, profiles, strict=True):
        assert space.identifiers_of(profile) == {f"user_id:{user}"}
        # the message is stored, with its other identifiers
        (event,) = space.events_of(profile)
        assert f"user_id:{user}" in event.identifiers
        (record,) = space.store.dropped(space.name, profile)
        assert record.identifier == f"anonymous_id:{junk}"
        assert record.rule.startswith("blocked") and ("regex" if junk == ZEROS else "exact") in record.rule
    for junk in (ZEROS, "null"):
        assert space.store.find_profile(space.name, Identifier("anonymous_id", junk)) is None
        assert not any(value.endswith(":" + junk) for value in space.all_identifier_values())
    assert space.store.stats(space.name).unresolved == 0
    assert space.store.suspects(space.name) == []  # blocked values are not evidence either


def test_e8_accounts(space: Space) -> None:
    first = space.send(
        "group", userId="u1", groupId="acme", traits={"name": "Acme", "plan": "enterprise"}, at=at(minutes=1)
    )
    account = first.account_id
    user1 = first.profile_id
    assert account is not None and account.startswith("acc_")
    assert user1 is not None and user1.startswith("use_")
    assert space.profile_of("group_id:acme") == account
    record = space.store.profile(space.name, account)
    assert record is not None and record.collection == "accounts"
    assert space.identifiers_of(account) == {"group_id:acme"}
    assert space.traits_of(account) == {"name": "Acme", "plan": "enterprise"}
    # group traits describe the account, not the person
    assert "name" not in space.traits_of(user1) and "plan" not in space.traits_of(user1)
    assert space.identifiers_of(user1) == {"user_id:u1"}
    assert space.links_of(account) == {user1}
    assert space.links_of(user1) == {account}

    second = space.send("group", userId="u2", groupId="acme", at=at(minutes=2))
    user2 = second.profile_id
    assert second.account_id == account and user2 is not None and user2 != user1
    assert space.links_of(account) == {user1, user2}
    assert space.links_of(user1) == {account}
    assert space.links_of(user2) == {account}
    assert space.roots("accounts") == [account]
    assert space.traits_of(account) == {"name": "Acme", "plan": "enterprise"}


E9_CONFIG = """
[spaces.app_a]
profile_tokens = ["pt_app_a_read"]
[spaces.app_a.sources.web]
write_key = "wk_app_a_web"
[spaces.app_b]
profile_tokens = ["pt_app_b_read"]
[spaces.app_b.sources.web]
write_key = "wk_app_b_web"
"""


def test_e9_spaces_are_isolated(tmp_path: Path) -> None:
    world = open_world(tmp_path, E9_CONFIG)
    try:
        a = world.space_for_write_key("wk_app_a_web")
        b = world.space_for_write_key("wk_app_b_web")
        assert (a.name, a.source, b.name, b.source) == ("app_a", "web", "app_b", "web")
        messages = [
            {"type": "identify", "userId": "u1", "anonymousId": "a1", "traits": {"email": "j@x.io"}},
            {"type": "track", "event": "Order Completed", "userId": "u1"},
        ]
        for n, raw in enumerate(messages):
            stamped = {**raw, "messageId": f"same-{n}", "timestamp": at(minutes=n).isoformat()}
            assert a.ingest([stamped]).outcomes[0].status == "resolved"
            assert b.ingest([stamped]).outcomes[0].status == "resolved"  # not a duplicate across spaces
        pa, pb = a.profile_of("user_id:u1"), b.profile_of("user_id:u1")
        assert pa is not None and pb is not None and pa != pb
        for ref in ("anonymous_id:a1", "email:j@x.io"):
            assert a.profile_of(ref) == pa and b.profile_of(ref) == pb
        # Neither space can see the other's profile.
        for mine, other, theirs in ((a, b, pb), (b, a, pa)):
            assert mine.store.resolve_segment_id(mine.name, theirs) is None
            assert mine.store.profile(mine.name, theirs) is None
            assert mine.store.identifiers(mine.name, theirs) == []
            assert mine.store.event_count(mine.name, theirs) == 0
            assert other.event_count_of(theirs) == 2
            assert mine.store.stats(mine.name).profiles == 1
        # Something sent to app_a only does not exist in app_b.
        a.send("identify", userId="only_a", at=at(minutes=9))
        assert a.profile_of("user_id:only_a") is not None
        assert b.profile_of("user_id:only_a") is None
        assert b.store.stats("app_b").profiles == 1
    finally:
        world.close()


def test_a_write_key_of_a_source_no_longer_configured_opens_nothing(tmp_path: Path) -> None:
    open_world(tmp_path, E9_CONFIG).close()  # the store now remembers app_b's source
    world = open_world(tmp_path, E9_CONFIG.split("[spaces.app_b]")[0])
    try:
        assert world.engine.source_for_write_key("wk_app_b_web") is None
        found = world.engine.source_for_write_key("wk_app_a_web")
        assert found is not None and (found.space, found.name) == ("app_a", "web")
        assert world.engine.source_for_write_key("wk_nobody") is None
    finally:
        world.close()


@pytest.mark.parametrize("via", ["traits", "context"])
def test_e10_order_independence_of_traits(space: Space, via: str) -> None:
    def identify(plan: str, when: int) -> None:
        payload: dict[str, Any] = (
            {"traits": {"plan": plan}} if via == "traits" else {"context": {"traits": {"plan": plan}}}
        )
        space.send("identify", userId="u1", at=at(days=when), **payload)

    identify("pro", 2)  # T2 first
    identify("free", 1)  # then the older T1
    assert space.traits_of("user_id:u1")["plan"] == "pro"
    identify("team", 3)  # a newer one still wins
    assert space.traits_of("user_id:u1")["plan"] == "team"


def test_e10_reverse_order_gives_the_same_traits(space: Space) -> None:
    space.send("identify", userId="u1", traits={"plan": "free"}, at=at(days=1))
    space.send("identify", userId="u1", traits={"plan": "pro"}, at=at(days=2))
    assert space.traits_of("user_id:u1") == {"plan": "pro"}


def test_e11_alias_of_an_anonymous_id(space: Space) -> None:
    anonymous = space.send("page", anonymousId="a1", at=at(minutes=1)).profile_id
    alias = space.send("alias", previousId="a1", userId="u1", at=at(minutes=2))
    assert alias.status == "resolved" and alias.profile_id == anonymous
    assert space.identifiers_of("user_id:u1") == {"anonymous_id:a1", "user_id:u1"}
    assert space.roots() == [anonymous]
    assert space.event_count_of("user_id:u1") == 2


def test_e11_alias_of_an_unknown_previous_id_is_an_anonymous_id(space: Space) -> None:
    alias = space.send("alias", previousId="distinct_9", userId="u1", at=at(minutes=1))
    assert alias.status == "resolved" and alias.created
    assert space.identifiers_of("user_id:u1") == {"user_id:u1", "anonymous_id:distinct_9"}
    assert space.profile_of("user_id:distinct_9") is None
    # Mixpanel-style: later events with the old distinct id land on the same person.
    assert space.send("track", anonymousId="distinct_9", at=at(minutes=2)).profile_id == alias.profile_id


def test_e11_alias_merges_anonymous_profile_into_known_user(space: Space) -> None:
    known = space.send("identify", userId="u1", at=at(minutes=1)).profile_id
    anonymous = space.send("page", anonymousId="a1", at=at(minutes=2)).profile_id
    alias = space.send("alias", previousId="a1", userId="u1", at=at(minutes=3))
    assert alias.profile_id == known and alias.merged == (anonymous,)
    assert space.profile_of(str(anonymous)) == known


def test_e11_alias_migrates_a_user_id(space: Space) -> None:
    profile = space.send("identify", userId="old_id", anonymousId="a1", at=at(minutes=1)).profile_id
    alias = space.send("alias", previousId="old_id", userId="new_id", at=at(minutes=2))
    assert alias.status == "resolved"
    assert alias.profile_id == profile and not alias.created and alias.dropped == ()
    assert space.roots() == [profile]
    assert space.identifiers_of(str(profile)) == {"user_id:old_id", "user_id:new_id", "anonymous_id:a1"}
    assert space.retired_of(str(profile)) == {"user_id:old_id"}
    # The old id still resolves, the new one too.
    assert space.profile_of("user_id:old_id") == profile
    assert space.profile_of("user_id:new_id") == profile
    assert space.send("track", userId="new_id", at=at(minutes=3)).profile_id == profile
    assert space.send("track", userId="old_id", at=at(minutes=4)).profile_id == profile
    assert space.retired_of(str(profile)) == {"user_id:old_id"}
    assert space.event_count_of(str(profile)) == 4
    assert space.roots() == [profile]


NORMALISED_IDS = """
[spaces.s.identifiers.user_id]
normalise = "trim_lower"
[spaces.s.identifiers.anonymous_id]
normalise = "trim"
"""


def test_e11_previous_id_is_normalised_as_its_type_is(tmp_path: Path) -> None:
    with open_space(tmp_path, NORMALISED_IDS) as space:
        profile = space.send("identify", userId="U1", at=at(minutes=1)).profile_id
        alias = space.send("alias", previousId=" U1 ", userId="u9", at=at(minutes=2))
        assert alias.profile_id == profile and not alias.created
        assert space.retired_of(str(profile)) == {"user_id:u1"}
        # Only whitespace, which normalisation takes away: absent, as "" is; an alias to itself, nothing.
        blank = space.send("alias", previousId="   ", userId="u9", at=at(minutes=3))
        itself = space.send("alias", previousId="U9", userId="u9", at=at(minutes=4))
        assert blank.profile_id == itself.profile_id == profile
        assert space.identifiers_of(str(profile)) == {"user_id:u1", "user_id:u9"}


def test_e11_previous_id_obeys_the_sources_identifier_types(tmp_path: Path) -> None:
    toml = """
[spaces.s.sources.feed]
write_key = "wk_feed"
identifier_types = ["email", "user_id"]
"""
    world = open_world(tmp_path, toml)
    try:
        feed = world.space_for_write_key("wk_feed")
        alias = feed.send("alias", previousId="a1", userId="u5", at=at(minutes=1))
        assert [(str(d.identifier), d.rule) for d in alias.dropped] == [
            ("anonymous_id:a1", "source feed may not contribute anonymous_id")
        ]
        assert feed.identifiers_of("user_id:u5") == {"user_id:u5"}
        # A known user_id it may name: the migration goes ahead.
        feed.send("identify", userId="u6", at=at(minutes=2))
        migrated = feed.send("alias", previousId="u6", userId="u7", at=at(minutes=3))
        assert migrated.dropped == () and feed.retired_of("user_id:u7") == {"user_id:u6"}
    finally:
        world.close()


def test_e11_a_known_user_id_as_previous_id_is_no_anonymous_id_for_a_source_without_user_ids(
    tmp_path: Path,
) -> None:
    # previousId is whichever identifier it already is: a known user_id stays one, and a source that
    # may not contribute user_ids drops it; it never becomes an anonymous_id of a new, fake profile.
    toml = """
[spaces.s.sources.web]
write_key = "wk_web"
[spaces.s.sources.devices]
write_key = "wk_devices"
identifier_types = ["anonymous_id"]
"""
    world = open_world(tmp_path, toml)
    try:
        web = world.space_for_write_key("wk_web")
        devices = world.space_for_write_key("wk_devices")
        profile = web.send("identify", userId="old_id", at=at(minutes=1)).profile_id
        alias = devices.send("alias", previousId="old_id", userId="new_id", at=at(minutes=2))
        assert alias.status == "unresolved" and not alias.created
        assert sorted((str(d.identifier), d.rule) for d in alias.dropped) == [
            ("user_id:new_id", "source devices may not contribute user_id"),
            ("user_id:old_id", "source devices may not contribute user_id"),
        ]
        assert devices.profile_of("anonymous_id:old_id") is None
        assert devices.roots() == [profile]
        assert devices.identifiers_of(str(profile)) == {"user_id:old_id"}
        # An unknown previousId is an anonymous_id, which this source may contribute.
        fresh = devices.send("alias", previousId="distinct_9", userId="u9", at=at(minutes=3))
        assert fresh.created and devices.identifiers_of(str(fresh.profile_id)) == {"anonymous_id:distinct_9"}
    finally:
        world.close()


def test_e11_an_alias_whose_merge_is_refused_retires_nothing(tmp_path: Path) -> None:
    # The old and the new user_id are on two profiles and the source may not fuse them (merge = false):
    # the message lands on one of them and the profiles stay apart. Retiring the old id anyway left its
    # profile with no current user_id, so the next person on that device joined it.
    toml = """
[spaces.s.sources.web]
write_key = "wk_web"
[spaces.s.sources.crm]
write_key = "wk_crm"
merge = false
"""
    world = open_world(tmp_path, toml)
    try:
        web = world.space_for_write_key("wk_web")
        crm = world.space_for_write_key("wk_crm")
        alice = web.send("identify", userId="alice", anonymousId="a1", at=at(minutes=1)).profile_id
        bob = web.send("identify", userId="bob", at=at(minutes=2)).profile_id
        alias = crm.send("alias", previousId="alice", userId="bob", at=at(minutes=3))
        assert alias.merged == ()
        assert sorted(web.roots()) == sorted([alice, bob])
        assert web.retired_of(str(alice)) == web.retired_of(str(bob)) == set()
        # The user_id limit still protects Alice's profile from the next person on her device.
        stranger = web.send("identify", userId="stranger", anonymousId="a1", at=at(minutes=4))
        assert stranger.profile_id not in (alice, bob)
        assert web.identifiers_of(str(alice)) == {"user_id:alice", "anonymous_id:a1"}
    finally:
        world.close()


def test_a_number_is_one_identifier_wherever_it_is_sent(tmp_path: Path) -> None:
    toml = """
[spaces.s.identifiers.phone]
trait_keys = ["phone"]
"""
    with open_space(tmp_path, toml) as space:
        first = space.send("identify", userId="u1", traits={"phone": 1e-7}, at=at(minutes=1))
        second = space.send("identify", context={"externalIds": [ext(1e-7, "phone")]}, at=at(minutes=2))
        assert second.profile_id == first.profile_id
        assert space.identifiers_of("user_id:u1") == {"user_id:u1", "phone:0.0000001"}


def test_e11_aliasing_back_makes_the_retired_id_current_again(space: Space) -> None:
    profile = space.send("identify", userId="u1", anonymousId="a1", at=at(minutes=1)).profile_id
    space.send("alias", previousId="u1", userId="u2", at=at(minutes=2))
    assert space.retired_of(str(profile)) == {"user_id:u1"}
    back = space.send("alias", previousId="u2", userId="u1", at=at(minutes=3))
    assert back.profile_id == profile and back.dropped == ()
    assert space.retired_of(str(profile)) == {"user_id:u2"}
    # u1 counts again: another user on the same device is someone else (user_id limit 1), as before
    # the aliases; with both ids retired, u7 would have joined this profile.
    other = space.send("identify", userId="u7", anonymousId="a1", at=at(minutes=4))
    assert other.profile_id != profile
    assert space.identifiers_of(str(profile)) == {"user_id:u1", "user_id:u2", "anonymous_id:a1"}


def test_e11_aliasing_back_never_leaves_two_current_user_ids(space: Space) -> None:
    # Found by hypothesis: u1 was retired for u4, then named as u2's new id. Making u1 current again
    # would leave u1 and u4 both current on one profile, over the user_id limit of 1.
    space.send("alias", previousId="u1", userId="u2", at=at(minutes=1))  # u1 unknown: an anonymous_id
    profile = space.send("identify", userId="u1", at=at(minutes=2)).profile_id
    space.send("alias", previousId="u1", userId="u4", at=at(minutes=3))
    assert space.retired_of(str(profile)) == {"user_id:u1"}
    back = space.send("alias", previousId="u2", userId="u1", at=at(minutes=4))
    root = space.profile_of("user_id:u1")
    current = {item for item in space.identifiers_of(str(root)) if item.startswith("user_id:")}
    current -= space.retired_of(str(root))
    assert len(current) == 1, (current, back.dropped)


def test_e11_retired_user_id_no_longer_counts_toward_the_limit(space: Space) -> None:
    profile = space.send("identify", userId="old_id", at=at(minutes=1)).profile_id
    space.send("alias", previousId="old_id", userId="new_id", at=at(minutes=2))
    # A message with the retired id and a new anonymous id: user_id count is 1 (new_id), no limit hit.
    outcome = space.send("identify", userId="old_id", anonymousId="a9", at=at(minutes=3))
    assert outcome.profile_id == profile
    assert outcome.dropped == ()
    assert space.profile_of("anonymous_id:a9") == profile


def test_e11_alias_off_gives_strict_segment_behaviour(tmp_path: Path) -> None:
    with open_space(tmp_path, space_toml("alias = false")) as space:
        assert space.rules.alias_enabled is False
        anonymous = space.send("page", anonymousId="a1", at=at(minutes=1)).profile_id
        alias = space.send("alias", previousId="a1", userId="u1", at=at(minutes=2))
        assert alias.status == "resolved"
        assert alias.profile_id != anonymous and alias.merged == ()
        assert space.identifiers_of("user_id:u1") == {"user_id:u1"}
        assert space.identifiers_of("anonymous_id:a1") == {"anonymous_id:a1"}

        old = space.send("identify", userId="old_id", at=at(minutes=3)).profile_id
        migrate = space.send("alias", previousId="old_id", userId="new_id", at=at(minutes=4))
        assert migrate.profile_id != old
        assert space.identifiers_of(str(old)) == {"user_id:old_id"}
        assert space.retired_of(str(old)) == set()
        assert space.identifiers_of("user_id:new_id") == {"user_id:new_id"}
        assert space.profile_of("anonymous_id:old_id") is None


# =============================================================================================
# §2 Reading identifiers out of a message
# =============================================================================================


@pytest.mark.parametrize(
    "context, expected",
    [
        ({"device": {"id": "dev1", "type": "android"}}, "android.id:dev1"),
        ({"device": {"id": "dev1", "type": "ios"}}, "ios.id:dev1"),
        ({"device": {"id": "dev1"}, "os": {"name": "Android"}}, "android.id:dev1"),
        ({"device": {"id": "dev1"}, "os": {"name": "iOS"}}, "ios.id:dev1"),
    ],
)
def test_device_id_by_device_type_or_os_name(space: Space, context: dict[str, Any], expected: str) -> None:
    space.send("track", userId="u1", context=context)
    assert space.identifiers_of("user_id:u1") == {"user_id:u1", expected}


def test_device_id_without_a_platform_is_not_an_identifier(space: Space) -> None:
    space.send("track", userId="u1", context={"device": {"id": "dev1"}})
    assert space.identifiers_of("user_id:u1") == {"user_id:u1"}


def test_device_id_alone_identifies(space: Space) -> None:
    first = space.send("screen", context={"device": {"id": "dev1", "type": "ios"}})
    second = space.send("screen", context={"device": {"id": "dev1", "type": "ios"}})
    assert first.status == second.status == "resolved"
    assert first.profile_id == second.profile_id == space.profile_of("ios.id:dev1")


@pytest.mark.parametrize("platform", ["android", "ios"])
@pytest.mark.parametrize("enabled", [True, False, None])
def test_advertising_id_only_when_ad_tracking_enabled(
    space: Space, platform: str, enabled: bool | None
) -> None:
    device: dict[str, Any] = {"id": "dev1", "type": platform, "advertisingId": "ad-1"}
    if enabled is not None:
        device["adTrackingEnabled"] = enabled
    space.send("track", userId="u1", context={"device": device})
    expected = {"user_id:u1", f"{platform}.id:dev1"}
    if enabled:
        expected.add(f"{platform}.idfa:ad-1")
    assert space.identifiers_of("user_id:u1") == expected


def test_push_tokens_cross_domain_and_ga_client_ids(space: Space) -> None:
    space.send(
        "track",
        userId="u1",
        context={
            "device": {"id": "dev1", "type": "android", "token": "tok-1"},
            "traits": {"crossDomainId": "xd-1"},
        },
        integrations={"Google Analytics": {"clientId": "ga-1"}},
    )
    assert space.identifiers_of("user_id:u1") == {
        "user_id:u1",
        "android.id:dev1",
        "android.push_token:tok-1",
        "cross_domain_id:xd-1",
        "ga_client_id:ga-1",
    }


def test_email_from_traits_else_context_traits(space: Space) -> None:
    space.send("identify", userId="u1", traits={"email": "a@x.io"}, context={"traits": {"email": "b@x.io"}})
    assert space.identifiers_of("user_id:u1") == {"user_id:u1", "email:a@x.io"}
    space.send("track", userId="u2", context={"traits": {"email": "c@x.io"}})
    assert space.identifiers_of("user_id:u2") == {"user_id:u2", "email:c@x.io"}


def test_email_from_track_properties_only_when_configured(tmp_path: Path) -> None:
    with open_space(tmp_path / "off") as off:
        off.send("track", userId="u1", properties={"email": "p@x.io"})
        assert off.identifiers_of("user_id:u1") == {"user_id:u1"}
    with open_space(tmp_path / "on", space_toml("email_from_track_properties = true")) as on:
        on.send("track", userId="u1", properties={"email": "p@x.io"})
        assert on.identifiers_of("user_id:u1") == {"user_id:u1", "email:p@x.io"}
        on.send("page", userId="u2", properties={"email": "q@x.io"})  # track only
        assert on.identifiers_of("user_id:u2") == {"user_id:u2"}


def test_group_id_only_from_group_calls(space: Space) -> None:
    outcome = space.send("track", userId="u1", groupId="acme")
    assert outcome.account_id is None
    assert space.profile_of("group_id:acme") is None
    assert space.roots("accounts") == []


def test_group_call_with_only_a_group_id_creates_just_the_account(space: Space) -> None:
    outcome = space.send("group", groupId="acme", traits={"name": "Acme"})
    assert outcome.status == "resolved"
    assert outcome.profile_id is None and outcome.account_id == space.profile_of("group_id:acme")
    assert space.roots("users") == []
    assert space.traits_of("group_id:acme") == {"name": "Acme"}


def test_external_ids_custom_type_lowercased(space: Space) -> None:
    space.send("track", userId="u1", context={"externalIds": [ext("C-77", "CRM_Id")]})
    assert space.identifiers_of("user_id:u1") == {"user_id:u1", "crm_id:C-77"}
    assert space.profile_of("crm_id:C-77") == space.profile_of("user_id:u1")


def test_external_ids_base64_is_decoded(space: Space) -> None:
    encoded = base64.b64encode(b"jane@example.com:42").decode()
    space.send("track", userId="u1", context={"externalIds": [ext(encoded, "crm_key", encoding="base64")]})
    assert space.identifiers_of("user_id:u1") == {"user_id:u1", "crm_key:jane@example.com:42"}


@pytest.mark.parametrize("missing", ["id", "type", "collection", "encoding"])
def test_external_ids_need_all_four_fields(space: Space, missing: str) -> None:
    item = ext("C-77", "crm_id")
    del item[missing]
    outcome = space.send("track", userId="u1", context={"externalIds": [item]})
    assert outcome.status == "rejected"
    assert outcome.error is not None and f"context.externalIds[0].{missing}" in outcome.error
    assert space.profile_of("user_id:u1") is None
    assert space.store.stats(space.name).events == 0


@pytest.mark.parametrize(
    "field, value", [("collection", "people"), ("encoding", "hex"), ("encoding", "base64")]
)
def test_external_ids_bad_collection_or_encoding_rejected(space: Space, field: str, value: str) -> None:
    item = ext("not base64 !!", "crm_id")
    item[field] = value
    outcome = space.send("track", userId="u1", context={"externalIds": [item]})
    assert outcome.status == "rejected"
    assert outcome.error is not None and "context.externalIds[0]" in outcome.error


def test_accounts_external_id_on_a_track_links_user_and_account(space: Space) -> None:
    group = space.send("group", userId="u2", groupId="acme", traits={"name": "Acme"}, at=at(minutes=1))
    outcome = space.send(
        "track",
        event="Report Run",
        userId="u1",
        context={"externalIds": [ext("acme", "group_id", collection="accounts")]},
        properties={"name": "not the account's"},
        at=at(minutes=2),
    )
    assert outcome.account_id == group.account_id
    user = space.profile_of("user_id:u1")
    assert user is not None and outcome.profile_id == user
    assert space.links_of(user) == {group.account_id}
    assert space.links_of("group_id:acme") == {user, group.profile_id}
    assert space.identifiers_of(user) == {"user_id:u1"}  # the account id is not the person's
    assert space.traits_of("group_id:acme") == {"name": "Acme"}


def test_accounts_custom_external_id_creates_an_account(space: Space) -> None:
    outcome = space.send(
        "identify",
        userId="u1",
        traits={"plan": "pro"},
        context={"externalIds": [ext("SF-1", "sfdc_account", collection="accounts")]},
    )
    account = space.store.find_profile(space.name, Identifier("sfdc_account", "SF-1", "accounts"))
    assert account is not None and account.startswith("acc_") and outcome.account_id == account
    assert space.store.find_profile(space.name, Identifier("sfdc_account", "SF-1", "users")) is None
    assert space.links_of(account) == {outcome.profile_id}
    assert space.traits_of(account) == {}  # as a group call without traits
    assert space.traits_of("user_id:u1") == {"plan": "pro"}


TRAIT_KEYS = """
[spaces.s.identifiers.phone]
priority = 3
limit = 2
window = "ever"
trait_keys = ["phone"]
[spaces.s.identifiers.loyalty_card]
trait_keys = ["loyalty_card"]
"""


@pytest.mark.parametrize(
    "message",
    [
        {"type": "identify", "traits": {"phone": "+15550100"}},
        {"type": "identify", "traits": {"Phone": "+15550100"}},
        {"type": "track", "context": {"traits": {"phone": "+15550100"}}},
        {"type": "track", "properties": {"phone": "+15550100"}},
        {"type": "identify", "traits": {"phone": 15550100}},
    ],
)
def test_custom_trait_key_identifier(tmp_path: Path, message: dict[str, Any]) -> None:
    with open_space(tmp_path, TRAIT_KEYS) as space:
        message = dict(message)
        kind = message.pop("type")
        outcome = space.send(kind, userId="u1", **message)
        value = "15550100" if isinstance(message.get("traits", {}).get("phone"), int) else "+15550100"
        assert space.identifiers_of("user_id:u1") == {"user_id:u1", f"phone:{value}"}
        assert space.profile_of(f"phone:{value}") == outcome.profile_id


@pytest.mark.parametrize("key", ["loyaltyCard", "loyalty_card", "LoyaltyCard"])
def test_custom_trait_key_camel_and_snake_case(tmp_path: Path, key: str) -> None:
    with open_space(tmp_path, TRAIT_KEYS) as space:
        space.send("identify", userId="u1", traits={key: "LC-9"})
        assert space.identifiers_of("user_id:u1") == {"user_id:u1", "loyalty_card:LC-9"}
        # A later message carrying only the card finds the person.
        assert space.send("identify", traits={key: "LC-9"}).profile_id == space.profile_of("user_id:u1")


def test_custom_trait_key_rule_is_configured(tmp_path: Path) -> None:
    with open_space(tmp_path, TRAIT_KEYS) as space:
        rule = space.rules.rule("phone")
        assert (rule.priority, rule.limit, rule.window, rule.trait_keys) == (3, 2, "ever", ("phone",))
        for n in range(3):
            space.send("identify", userId="u1", traits={"phone": f"+1555000{n}"})
        assert space.identifiers_of("user_id:u1") == {"user_id:u1", "phone:+15550000", "phone:+15550001"}


def test_email_normalisation_trims_and_lowercases(space: Space) -> None:
    first = space.send("identify", traits={"email": "  Jane@Example.COM "})
    assert space.identifiers_of(str(first.profile_id)) == {"email:jane@example.com"}
    second = space.send("identify", userId="u1", traits={"email": "jane@example.com"})
    assert second.profile_id == first.profile_id


def test_other_types_are_kept_exactly(space: Space) -> None:
    upper = space.send("identify", userId="U1").profile_id
    lower = space.send("identify", userId="u1").profile_id
    assert upper != lower
    spaced = space.send("page", anonymousId=" a1").profile_id
    plain = space.send("page", anonymousId="a1").profile_id
    assert spaced != plain
    assert space.identifiers_of(str(spaced)) == {"anonymous_id: a1"}
    cased = space.send("track", userId="u9", context={"externalIds": [ext("AbC", "crm_id")]}).profile_id
    assert space.identifiers_of(str(cased)) == {"user_id:u9", "crm_id:AbC"}


def test_numbers_become_decimal_strings(space: Space) -> None:
    outcome = space.send(
        "identify", userId=12345, anonymousId=987, context={"externalIds": [ext(42, "crm_id")]}
    )
    assert space.identifiers_of(str(outcome.profile_id)) == {"user_id:12345", "anonymous_id:987", "crm_id:42"}
    assert space.send("track", userId="12345").profile_id == outcome.profile_id


def test_null_missing_and_empty_values_are_absent(space: Space) -> None:
    outcome = space.send("identify", userId="", anonymousId="a1", traits={"email": None})
    assert space.identifiers_of(str(outcome.profile_id)) == {"anonymous_id:a1"}
    outcome = space.send("identify", userId=None, anonymousId="a2", traits={"email": ""})
    assert space.identifiers_of(str(outcome.profile_id)) == {"anonymous_id:a2"}


def test_message_without_identifiers_is_rejected_with_a_clear_error(space: Space) -> None:
    outcome = space.send("track", event="Nobody", properties={"x": 1})
    assert outcome.status == "rejected"
    assert outcome.error is not None and "identifier" in outcome.error
    stats = space.store.stats(space.name)
    assert (stats.events, stats.profiles, stats.unresolved) == (0, 0, 0)
    # The rest of a batch still lands.
    result = space.ingest(
        [space.message("track", event="Nobody"), space.message("track", event="Somebody", userId="u1")]
    )
    assert [o.status for o in result.outcomes] == ["rejected", "resolved"]


# =============================================================================================
# §3 Blocked values
# =============================================================================================

DEFAULT_BLOCKED = ["-1", "null", "undefined", "none", "nil", "anonymous", "unknown", "[object Object]"]


@pytest.mark.parametrize("value", [*DEFAULT_BLOCKED, "0", "000-000", ZEROS])
def test_default_blocked_values_are_never_identifiers(space: Space, value: str) -> None:
    outcome = space.send("identify", userId="u1", anonymousId=value, traits={"email": value})
    assert outcome.status == "resolved"
    assert space.identifiers_of("user_id:u1") == {"user_id:u1"}
    assert {str(d.identifier) for d in outcome.dropped} >= {f"anonymous_id:{value}"}
    assert all(d.rule.startswith("blocked") for d in outcome.dropped)


WHITESPACE = r"^\s+$"


def test_a_user_id_of_only_whitespace_fuses_no_one(space: Space) -> None:
    # user_ids are kept exactly as sent (untrimmed): `" "` was an identifier like any other, so every
    # client that sent it joined one profile, past the user_id limit of the first.
    first = space.send("identify", userId=" ", anonymousId="a1", at=at(minutes=0))
    second = space.send("identify", userId=" ", anonymousId="a2", at=at(minutes=1))
    assert first.profile_id != second.profile_id
    for outcome in (first, second):
        assert [(str(d.identifier), d.rule) for d in outcome.dropped] == [
            ("user_id: ", f"blocked regex {WHITESPACE!r}")
        ]
    assert space.store.find_profile(space.name, Identifier("user_id", " ")) is None


def test_default_blocked_regex_does_not_block_real_values(space: Space) -> None:
    space.send("identify", userId="u1", anonymousId="0a-1")
    assert space.identifiers_of("user_id:u1") == {"user_id:u1", "anonymous_id:0a-1"}


BLOCKED = """
[spaces.s.blocked]
exact = ["void", "abc123"]
regex = ["^test-.*$"]
"""


@pytest.mark.parametrize("value", ["void", "abc123", "test-user", "null", ZEROS])
def test_configured_blocked_values_add_to_the_defaults(tmp_path: Path, value: str) -> None:
    with open_space(tmp_path, BLOCKED) as space:
        outcome = space.send("identify", userId="u1", anonymousId=value)
        assert space.identifiers_of("user_id:u1") == {"user_id:u1"}
        assert [str(d.identifier) for d in outcome.dropped] == [f"anonymous_id:{value}"]
        dropped = space.store.dropped(space.name, str(outcome.profile_id))
        assert [d.identifier for d in dropped] == [f"anonymous_id:{value}"] and "blocked" in dropped[0].rule
        # not blocked: a value that merely contains the pattern
        space.send("identify", userId="u2", anonymousId="my-test-user")
        assert space.identifiers_of("user_id:u2") == {"user_id:u2", "anonymous_id:my-test-user"}


def test_an_identifier_with_a_lost_character_never_matches(space: Space) -> None:
    # "Jos\ufffd" may have been José or Josè (Latin-1 bytes, a string cut mid-emoji, a NUL): matching on
    # it would fuse both. It is dropped and named; the message still lands on what else it carries.
    first = space.send("identify", userId="u1", anonymousId="jos\ufffd", traits={"email": "a\ufffd@x.io"})
    assert first.status == "resolved"
    assert space.identifiers_of("user_id:u1") == {"user_id:u1"}
    assert {(str(d.identifier), d.rule) for d in first.dropped} == {
        ("anonymous_id:jos\ufffd", DAMAGED_REASON),
        ("email:a\ufffd@x.io", DAMAGED_REASON),
    }
    space.send("identify", userId="u2", anonymousId="jos\ufffd")
    assert space.profile_of("user_id:u1") != space.profile_of("user_id:u2")
    alone = space.send("track", event="E", userId="\ufffd", messageId="damaged-only")
    assert alone.status == "unresolved"
    alias = space.send("alias", userId="u3", previousId="\ufffdx")
    assert [(str(d.identifier), d.rule) for d in alias.dropped] == [("anonymous_id:\ufffdx", DAMAGED_REASON)]
    assert space.identifiers_of("user_id:u3") == {"user_id:u3"}


@pytest.mark.parametrize(
    "stamp",
    ["0001-01-01T00:00:00Z", "0001-01-03T00:00:00Z", "9999-12-31T23:59:59.999Z", "9999-12-25T00:00:00Z"],
)
def test_windows_at_the_ends_of_time_still_count_limits(space: Space, stamp: str) -> None:
    # Go's zero time (year 1) is a timestamp real clients send; a week before it, or after 9999, is not a
    # date: each window reaching past the ends holds everything up to them instead of failing the batch.
    messages = [
        space.message("identify", userId="u1", anonymousId=f"a{number}", timestamp=stamp)
        for number in range(7)
    ]
    messages += [
        space.message("identify", anonymousId="shared", traits={"email": f"p{number}@x.io"}, timestamp=stamp)
        for number in range(7)
    ]
    result = space.ingest(messages)
    assert [outcome.status for outcome in result.outcomes] == ["resolved"] * 14
    assert len(space.identifiers_of("user_id:u1")) == 6  # user_id + the weekly limit of 5 anonymous_ids
    assert [d.rule for d in result.outcomes[5].dropped] == ["anonymous_id limit 5 weekly"]
    assert space.store.stats(space.name).suspect == 1  # "shared" was seen with more emails than allowed


def test_a_fault_in_the_core_refuses_only_its_message(space: Space, monkeypatch: pytest.MonkeyPatch) -> None:
    # Were it to fail the transaction, every message grouped with it would fail on each retry too.
    real = engine_module.resolve_message

    def faulty(message: Any, *args: Any, **kwargs: Any) -> Any:
        if message.message_id == "poison":
            raise OverflowError("date value out of range")
        return real(message, *args, **kwargs)

    monkeypatch.setattr(engine_module, "resolve_message", faulty)
    result = space.ingest(
        [
            space.message("identify", userId="u1", anonymousId="a1"),
            space.message("identify", userId="u1", anonymousId="a2", messageId="poison"),
            space.message("track", event="E", anonymousId="a1", messageId="after"),
        ]
    )
    assert [outcome.status for outcome in result.outcomes] == ["resolved", "rejected", "resolved"]
    assert (
        result.outcomes[1].error == "internal error while resolving: OverflowError: date value out of range"
    )
    assert space.identifiers_of("user_id:u1") == {"user_id:u1", "anonymous_id:a1"}
    assert "poison" not in space.event_ids_of("user_id:u1") and "after" in space.event_ids_of("user_id:u1")


def test_all_blocked_message_is_unresolved(space: Space) -> None:
    outcome = space.send("page", anonymousId="null", userId="undefined", messageId="junk-1")
    assert outcome.status == "unresolved"
    assert outcome.profile_id is None and outcome.account_id is None
    stats = space.store.stats(space.name)
    assert (stats.profiles, stats.accounts, stats.identifiers, stats.unresolved, stats.events) == (
        0,
        0,
        0,
        1,
        1,
    )
    assert [event.message_id for event in space.store.unresolved(space.name)] == ["junk-1"]
    space.send("track", userId="-1", context={"traits": {"email": "none"}})
    assert space.store.stats(space.name).unresolved == 2
    assert space.roots() == []


# =============================================================================================
# §3 Merge flags and source policy
# =============================================================================================

EMAIL_NO_MERGE = """
[spaces.s.identifiers.email]
merge = false
"""


def test_merge_false_type_never_fuses_profiles(tmp_path: Path) -> None:
    with open_space(tmp_path, EMAIL_NO_MERGE) as space:
        p1 = space.send("page", anonymousId="a1", at=at(minutes=1)).profile_id
        p2 = space.send("identify", traits={"email": "e@x.io"}, at=at(minutes=2)).profile_id
        outcome = space.send(
            "identify",
            anonymousId="a1",
            traits={"email": "e@x.io"},
            context={"externalIds": [ext("C-1", "crm_id")]},
            at=at(minutes=3),
        )
        assert outcome.merged == ()
        assert sorted(space.roots()) == sorted([str(p1), str(p2)])
        # The message goes to the profile of its highest-priority match: email (2) over anonymous_id (6).
        assert outcome.profile_id == p2
        # Identifiers owned by other profiles stay where they are; new ones join the chosen profile.
        assert space.identifiers_of(str(p1)) == {"anonymous_id:a1"}
        assert space.identifiers_of(str(p2)) == {"email:e@x.io", "crm_id:C-1"}


def test_merge_false_type_is_attached_to_the_profile_found(tmp_path: Path) -> None:
    with open_space(tmp_path, EMAIL_NO_MERGE) as space:
        p1 = space.send("page", anonymousId="a1", at=at(minutes=1)).profile_id
        outcome = space.send("identify", anonymousId="a1", traits={"email": "e@x.io"}, at=at(minutes=2))
        assert outcome.profile_id == p1
        assert space.identifiers_of(str(p1)) == {"anonymous_id:a1", "email:e@x.io"}


def test_default_push_tokens_do_not_merge(space: Space) -> None:
    p1 = space.send("page", anonymousId="a1", at=at(minutes=1)).profile_id
    p2 = space.send("screen", anonymousId="a2", context={"device": {"type": "ios", "token": "t1"}}).profile_id
    outcome = space.send(
        "screen", anonymousId="a1", context={"device": {"type": "ios", "token": "t1"}}, at=at(minutes=3)
    )
    assert outcome.merged == () and outcome.profile_id == p1  # anonymous_id (6) over ios.push_token (11)
    assert sorted(space.roots()) == sorted([str(p1), str(p2)])
    assert space.profile_of("ios.push_token:t1") == p2


def test_a_merge_false_identifier_seen_elsewhere_does_not_stop_others_fusing(space: Space) -> None:
    # The push token (merge: false by default) is on an anonymous profile; user_id and email still fuse
    # their two profiles, and the token's profile stays apart.
    p1 = space.send("identify", userId="u1", at=at(minutes=1)).profile_id
    p2 = space.send("identify", traits={"email": "e@x.io"}, at=at(minutes=2)).profile_id
    device = {"device": {"type": "android", "token": "tok1"}}
    p3 = space.send("track", event="E", anonymousId="a9", context=device, at=at(minutes=3)).profile_id
    outcome = space.send(
        "identify", userId="u1", traits={"email": "e@x.io"}, context=device, at=at(minutes=4)
    )
    assert outcome.profile_id == p1 and outcome.merged == (p2,)
    assert sorted(space.roots()) == sorted([str(p1), str(p3)])
    assert space.identifiers_of(str(p1)) == {"user_id:u1", "email:e@x.io"}
    assert space.identifiers_of(str(p3)) == {"anonymous_id:a9", "android.push_token:tok1"}


CRM_NO_MERGE = """
[spaces.s.sources.web]
write_key = "wk_web"
[spaces.s.sources.crm]
write_key = "wk_crm"
merge = false
"""


def test_source_without_merge_never_fuses_people(tmp_path: Path) -> None:
    world = open_world(tmp_path, CRM_NO_MERGE)
    try:
        web = world.space_for_write_key("wk_web")
        crm = world.space_for_write_key("wk_crm")
        assert crm.source == "crm"
        p1 = web.send("identify", userId="u1", at=at(minutes=1)).profile_id
        p2 = web.send("identify", traits={"email": "e@x.io"}, at=at(minutes=2)).profile_id
        outcome = crm.send(
            "identify",
            userId="u1",
            traits={"email": "e@x.io", "tier": "gold"},
            context={"externalIds": [ext("C-1", "crm_id")]},
            at=at(minutes=3),
        )
        assert outcome.status == "resolved" and outcome.merged == ()
        assert outcome.profile_id == p1  # user_id is the highest-priority match
        assert sorted(web.roots()) == sorted([str(p1), str(p2)])
        assert web.identifiers_of(str(p1)) == {"user_id:u1", "crm_id:C-1"}
        assert web.identifiers_of(str(p2)) == {"email:e@x.io"}
        assert web.traits_of(str(p1))["tier"] == "gold"  # may add traits
        # The same message from a merging source fuses them.
        fused = web.send("identify", userId="u1", traits={"email": "e@x.io"}, at=at(minutes=4))
        assert fused.merged == (p2,) and web.roots() == [p1]
    finally:
        world.close()


def test_source_without_merge_ties_go_to_the_oldest(tmp_path: Path) -> None:
    world = open_world(tmp_path, CRM_NO_MERGE)
    try:
        web = world.space_for_write_key("wk_web")
        crm = world.space_for_write_key("wk_crm")
        newer = web.send("identify", traits={"email": "b@x.io"}, at=at(minutes=5)).profile_id
        older = web.send("identify", traits={"email": "a@x.io"}, at=at(minutes=1)).profile_id
        outcome = crm.send(
            "track",
            context={"externalIds": [ext("a@x.io", "email"), ext("b@x.io", "email")]},
            at=at(minutes=6),
        )
        assert outcome.merged == () and outcome.profile_id == older != newer
    finally:
        world.close()


def test_source_may_be_limited_to_some_identifier_types(tmp_path: Path) -> None:
    toml = """
[spaces.s.sources.enrich]
write_key = "wk_enrich"
identifier_types = ["email"]
"""
    world = open_world(tmp_path, toml)
    try:
        enrich = world.space_for_write_key("wk_enrich")
        outcome = enrich.send("identify", userId="u1", traits={"email": "e@x.io"})
        assert enrich.profile_of("user_id:u1") is None
        assert enrich.identifiers_of("email:e@x.io") == {"email:e@x.io"}
        assert [str(d.identifier) for d in outcome.dropped] == ["user_id:u1"]
    finally:
        world.close()


# =============================================================================================
# §3 Limits and windows, §4 caps
# =============================================================================================


def test_anonymous_id_limit_is_five_a_week(space: Space) -> None:
    profile = space.send("identify", userId="u1", at=at(days=0)).profile_id
    for n in range(1, 6):
        outcome = space.send("identify", userId="u1", anonymousId=f"a{n}", at=at(days=n - 1, hours=1))
        assert outcome.profile_id == profile and outcome.dropped == ()
    sixth = space.send("identify", userId="u1", anonymousId="a6", at=at(days=5), messageId="sixth")
    assert sixth.profile_id == profile
    assert [(str(d.identifier), d.rule) for d in sixth.dropped] == [
        ("anonymous_id:a6", "anonymous_id limit 5 weekly")
    ]
    assert "anonymous_id:a6" not in space.identifiers_of(str(profile))
    assert space.profile_of("anonymous_id:a6") is None
    assert [(d.message_id, d.identifier) for d in space.store.dropped(space.name, str(profile))] == [
        ("sixth", "anonymous_id:a6")
    ]
    # A week after the first five were last seen, a new one is fine.
    later = space.send("identify", userId="u1", anonymousId="a7", at=at(days=12))
    assert later.profile_id == profile and later.dropped == ()
    assert "anonymous_id:a7" in space.identifiers_of(str(profile))


def test_anonymous_only_sixth_device_in_a_week_is_not_merged(space: Space) -> None:
    profile = space.send("identify", userId="u1", at=at(days=0)).profile_id
    for n in range(1, 6):
        space.send("identify", userId="u1", anonymousId=f"a{n}", at=at(hours=n))
    lone = space.send("page", anonymousId="a6", at=at(hours=6)).profile_id
    login = space.send("identify", userId="u1", anonymousId="a6", at=at(hours=7))
    assert login.profile_id == profile and login.merged == ()
    assert space.profile_of("anonymous_id:a6") == lone != profile


ANONYMOUS_TWO_A_WEEK = """
[spaces.s.identifiers.anonymous_id]
limit = 2
window = "weekly"
"""


def test_windowed_limit_counts_an_old_value_seen_again(tmp_path: Path) -> None:
    with open_space(tmp_path, ANONYMOUS_TWO_A_WEEK) as space:
        profile = space.send("identify", userId="u1", anonymousId="a1", at=at(days=0)).profile_id
        space.send("identify", userId="u1", anonymousId="a2", at=at(days=0, hours=1))
        assert space.send("identify", userId="u1", anonymousId="a3", at=at(days=8)).dropped == ()
        assert space.send("identify", userId="u1", anonymousId="a1", at=at(days=8, hours=1)).dropped == ()
        # a1 and a3 were seen this week: a2 coming back would make three in one week.
        third = space.send("identify", userId="u1", anonymousId="a2", at=at(days=8, hours=2))
        assert third.profile_id == profile
        assert [(str(d.identifier), d.rule) for d in third.dropped] == [
            ("anonymous_id:a2", "anonymous_id limit 2 weekly")
        ]
        week = at(days=8, hours=2) - timedelta(days=7)
        recent = {
            r.value
            for r in space.identifier_records(str(profile))
            if r.type == "anonymous_id" and r.last_seen > week
        }
        assert len(recent) <= 2


def test_windowed_limit_ignores_values_last_seen_after_the_message(tmp_path: Path) -> None:
    # Backfill: an old message is processed after newer ones; the window ends at ITS timestamp.
    with open_space(tmp_path, ANONYMOUS_TWO_A_WEEK) as space:
        profile = space.send("identify", userId="u1", anonymousId="a1", at=at(days=20)).profile_id
        space.send("identify", userId="u1", anonymousId="a2", at=at(days=20, hours=1))
        old = space.send("identify", userId="u1", anonymousId="a0", at=at(days=1))
        assert old.profile_id == profile and old.dropped == ()
        assert space.identifiers_of(str(profile)) == {
            "user_id:u1",
            "anonymous_id:a0",
            "anonymous_id:a1",
            "anonymous_id:a2",
        }
    # ... which is what the same messages give in time order.
    with open_space(tmp_path / "ordered", ANONYMOUS_TWO_A_WEEK) as ordered:
        ordered.send("identify", userId="u1", anonymousId="a0", at=at(days=1))
        ordered.send("identify", userId="u1", anonymousId="a1", at=at(days=20))
        last = ordered.send("identify", userId="u1", anonymousId="a2", at=at(days=20, hours=1))
        assert last.dropped == ()
        assert len(ordered.identifiers_of("user_id:u1")) == 4


def test_a_late_message_with_one_identifier_lands_without_pushing_a_week_over_the_limit(
    tmp_path: Path,
) -> None:
    # Found by hypothesis: a4 last seen just outside a2's week; a late page with a4 alone must not
    # refresh a4 into that week (three anonymous ids in it), yet it still belongs to the profile.
    with open_space(tmp_path, ANONYMOUS_TWO_A_WEEK) as space:
        profile = space.send("identify", userId="u1", anonymousId="a1", at=at()).profile_id
        space.send("identify", userId="u1", anonymousId="a4", at=at())
        space.send("identify", userId="u1", anonymousId="a1", at=at(hours=1))
        space.send("identify", userId="u1", anonymousId="a2", at=at(days=7))
        late = space.send("page", anonymousId="a4", at=at(hours=1))
        assert late.profile_id == profile and late.dropped == ()
        seen = {
            r.value: r.last_seen for r in space.identifier_records(str(profile)) if r.type == "anonymous_id"
        }
        assert seen["a4"] == at()
        week = at(days=7) - timedelta(days=7)
        assert sorted(value for value, last in seen.items() if last > week) == ["a1", "a2"]


def test_configured_daily_window(tmp_path: Path) -> None:
    toml = """
[spaces.s.identifiers.email]
limit = 1
window = "daily"
"""
    with open_space(tmp_path, toml) as space:
        profile = space.send("identify", userId="u1", traits={"email": "a@x.io"}, at=at(hours=0)).profile_id
        same_day = space.send("identify", userId="u1", traits={"email": "b@x.io"}, at=at(hours=5))
        assert [str(d.identifier) for d in same_day.dropped] == ["email:b@x.io"]
        next_day = space.send("identify", userId="u1", traits={"email": "c@x.io"}, at=at(hours=30))
        assert next_day.dropped == () and next_day.profile_id == profile
        assert space.identifiers_of(str(profile)) == {"user_id:u1", "email:a@x.io", "email:c@x.io"}


def test_a_value_last_seen_exactly_one_window_ago_is_outside_the_window(space: Space) -> None:
    # The window ending at the message's timestamp is (timestamp - window, timestamp]: five anonymous ids
    # last seen exactly a week before no longer count, one millisecond less and they all do.
    profile = space.send("identify", userId="u1", at=at()).profile_id
    for n in range(1, 6):
        space.send("identify", userId="u1", anonymousId=f"a{n}", at=at())
    inside = space.send("identify", userId="u1", anonymousId="a6", at=at(days=7) - timedelta(milliseconds=1))
    assert [str(d.identifier) for d in inside.dropped] == ["anonymous_id:a6"]
    boundary = space.send("identify", userId="u1", anonymousId="a7", at=at(days=7))
    assert boundary.profile_id == profile and boundary.dropped == ()
    assert "anonymous_id:a7" in space.identifiers_of(str(profile))


def test_two_values_of_one_type_keep_the_first_sent_under_a_limit_and_under_the_cap(tmp_path: Path) -> None:
    # Step 5 drops, among identifiers of equal rank (one type), the later one sent; so does the cap.
    with open_space(tmp_path / "limit", "[spaces.s.identifiers.phone]\nlimit = 1\n") as limited:
        phones = [ext("p1", "phone"), ext("p2", "phone")]
        outcome = limited.send("track", userId="u1", context={"externalIds": phones})
        assert [str(d.identifier) for d in outcome.dropped] == ["phone:p2"]
        assert limited.identifiers_of("user_id:u1") == {"user_id:u1", "phone:p1"}
    with open_space(tmp_path / "cap", space_toml("max_identifiers = 2")) as capped:
        capped.send("identify", userId="u1")
        outcome = capped.send("track", userId="u1", context={"externalIds": phones})
        assert [str(d.identifier) for d in outcome.dropped] == ["phone:p2"]
        assert "identifier" in outcome.dropped[0].rule
        assert capped.identifiers_of("user_id:u1") == {"user_id:u1", "phone:p1"}


def test_user_id_limit_one_ever(space: Space) -> None:
    first = space.send("identify", userId="u1", anonymousId="a1", at=at(days=0)).profile_id
    second = space.send("identify", userId="u2", anonymousId="a1", at=at(days=400)).profile_id
    assert first != second
    assert space.identifiers_of(str(second)) == {"user_id:u2"}


def test_merge_cap(tmp_path: Path) -> None:
    with open_space(tmp_path, space_toml("max_merges = 2")) as space:
        root = space.send("identify", userId="u1", at=at(minutes=0)).profile_id
        others = [space.send("page", anonymousId=f"a{n}", at=at(minutes=n)).profile_id for n in (1, 2, 3)]
        assert space.send("identify", userId="u1", anonymousId="a1", at=at(minutes=10)).merged == (others[0],)
        assert space.send("identify", userId="u1", anonymousId="a2", at=at(minutes=11)).merged == (others[1],)
        third = space.send("identify", userId="u1", anonymousId="a3", at=at(minutes=12))
        assert third.merged == () and third.profile_id == root  # still resolves to the profile
        assert any("merge" in d.rule for d in third.dropped)
        assert space.profile_of("anonymous_id:a3") == others[2]
        record = space.store.profile(space.name, str(root))
        assert record is not None and record.merge_count == 2
        assert sorted(space.roots()) == sorted([str(root), str(others[2])])


def test_identifier_cap(tmp_path: Path) -> None:
    with open_space(tmp_path, space_toml("max_identifiers = 3")) as space:
        profile = space.send("identify", userId="u1", anonymousId="a1", traits={"email": "e@x.io"}).profile_id
        outcome = space.send("identify", userId="u1", anonymousId="a2")
        assert outcome.profile_id == profile
        assert [str(d.identifier) for d in outcome.dropped] == ["anonymous_id:a2"]
        assert "identifier" in outcome.dropped[0].rule
        assert space.identifiers_of(str(profile)) == {"user_id:u1", "anonymous_id:a1", "email:e@x.io"}
        # A merge that would take the profile past the cap is refused too.
        other = space.send("page", anonymousId="a3").profile_id
        refused = space.send("identify", userId="u1", anonymousId="a3")
        assert refused.merged == () and refused.profile_id == profile
        assert sorted(space.roots()) == sorted([str(profile), str(other)])
        assert space.event_count_of(str(profile)) == 3


# =============================================================================================
# §4 Oldest parent, merges, traits
# =============================================================================================


def test_oldest_by_message_timestamp_is_the_parent(space: Space) -> None:
    late = space.send("identify", traits={"email": "e@x.io"}, at=at(days=2)).profile_id
    early = space.send("page", anonymousId="a1", at=at(days=1)).profile_id  # processed later, older
    merge = space.send("identify", anonymousId="a1", traits={"email": "e@x.io"}, at=at(days=3))
    assert merge.profile_id == early and merge.merged == (late,)
    assert space.profile_of(str(late)) == early


def test_oldest_ties_go_to_the_smaller_segment_id(space: Space) -> None:
    first = space.send("page", anonymousId="a1", at=at(days=1)).profile_id
    second = space.send("identify", traits={"email": "e@x.io"}, at=at(days=1)).profile_id
    assert first is not None and second is not None
    merge = space.send("identify", anonymousId="a1", traits={"email": "e@x.io"}, at=at(days=2))
    parent, child = sorted([first, second])
    assert merge.profile_id == parent and merge.merged == (child,)


def test_child_ids_resolve_to_the_root_forever(space: Space) -> None:
    a = space.send("page", anonymousId="a1", at=at(days=2)).profile_id
    b = space.send("page", anonymousId="a2", at=at(days=3)).profile_id
    space.send("identify", userId="u1", anonymousId="a1", at=at(days=4))
    space.send("identify", userId="u1", anonymousId="a2", at=at(days=5))
    assert space.profile_of(str(b)) == a
    z = space.send("identify", traits={"email": "z@x.io"}, at=at(days=1)).profile_id  # the oldest of all
    merge = space.send("identify", userId="u1", traits={"email": "z@x.io"}, at=at(days=6))
    assert merge.profile_id == z and merge.merged == (a,)
    for child in (a, b, z):
        assert space.store.resolve_segment_id(space.name, str(child)) == z
    assert space.identifiers_of(str(z)) == {
        "anonymous_id:a1",
        "anonymous_id:a2",
        "user_id:u1",
        "email:z@x.io",
    }
    assert space.event_count_of(str(z)) == 6
    assert [(m.parent_id, m.child_id) for m in space.store.merges(space.name, str(z))][-1] == (z, a)


def test_merge_moves_account_links(space: Space) -> None:
    a = space.send("page", anonymousId="a1", at=at(minutes=1)).profile_id
    b = space.send("group", userId="u1", groupId="acme", at=at(minutes=2)).profile_id
    space.send("identify", userId="u1", anonymousId="a1", at=at(minutes=3))
    assert space.profile_of(str(b)) == a
    assert space.links_of(str(a)) == {space.profile_of("group_id:acme")}
    assert space.links_of("group_id:acme") == {a}


def test_null_trait_removes_and_older_message_does_not_resurrect(space: Space) -> None:
    space.send("identify", userId="u1", traits={"plan": "pro", "name": "Jo"}, at=at(days=1))
    space.send("identify", userId="u1", traits={"plan": None}, at=at(days=2))
    assert space.traits_of("user_id:u1") == {"name": "Jo"}
    space.send("identify", userId="u1", traits={"plan": "free"}, at=at(days=1, hours=12))
    assert "plan" not in space.traits_of("user_id:u1")
    space.send("identify", userId="u1", traits={"plan": "team"}, at=at(days=3))
    assert space.traits_of("user_id:u1")["plan"] == "team"


def test_traits_merge_newest_per_key_wins(space: Space) -> None:
    a = space.send(
        "identify", anonymousId="a1", traits={"plan": "free", "color": "red"}, at=at(days=1)
    ).profile_id
    b = space.send(
        "identify", traits={"email": "e@x.io", "plan": "pro", "color": "green", "size": "L"}, at=at(days=2)
    ).profile_id
    space.send("identify", anonymousId="a1", traits={"color": "blue"}, at=at(days=3))
    merge = space.send("page", anonymousId="a1", context={"traits": {"email": "e@x.io"}}, at=at(days=4))
    assert merge.profile_id == a and merge.merged == (b,)
    assert space.traits_of(str(a)) == {"plan": "pro", "color": "blue", "size": "L", "email": "e@x.io"}
    # A late old value does not overwrite after the merge either.
    space.send("identify", anonymousId="a1", traits={"plan": "legacy"}, at=at(days=1, hours=1))
    assert space.traits_of(str(a))["plan"] == "pro"


def test_trait_removal_survives_a_merge_when_newer(space: Space) -> None:
    a = space.send(
        "identify", anonymousId="a1", traits={"plan": "free", "color": "red"}, at=at(days=1)
    ).profile_id
    space.send("identify", anonymousId="a1", traits={"plan": None}, at=at(days=3))
    b = space.send(
        "identify", traits={"email": "e@x.io", "plan": "pro", "color": "green"}, at=at(days=2)
    ).profile_id
    space.send("identify", traits={"email": "e@x.io", "color": None}, at=at(days=4))
    merge = space.send("page", anonymousId="a1", context={"traits": {"email": "e@x.io"}}, at=at(days=5))
    assert merge.profile_id == a and merge.merged == (b,)
    traits = space.traits_of(str(a))
    assert "plan" not in traits  # the parent's removal (day 3) is newer than the child's value (day 2)
    assert "color" not in traits  # the child's removal (day 4) is newer than the parent's value (day 1)


def test_context_traits_set_profile_traits_on_any_call(space: Space) -> None:
    space.send("track", userId="u1", context={"traits": {"plan": "pro"}}, at=at(days=1))
    space.send("page", userId="u1", context={"traits": {"company": "Acme"}}, at=at(days=2))
    assert space.traits_of("user_id:u1") == {"plan": "pro", "company": "Acme"}
    # track properties are not traits
    space.send("track", userId="u1", properties={"plan": "free"}, at=at(days=3))
    assert space.traits_of("user_id:u1")["plan"] == "pro"


def test_group_traits_are_the_accounts_not_the_persons(space: Space) -> None:
    outcome = space.send(
        "group", userId="u1", groupId="acme", traits={"email": "billing@acme.io", "plan": "enterprise"}
    )
    assert space.identifiers_of("user_id:u1") == {"user_id:u1"}
    assert space.profile_of("email:billing@acme.io") is None
    assert space.traits_of("user_id:u1") == {}
    assert space.traits_of(str(outcome.account_id)) == {"email": "billing@acme.io", "plan": "enterprise"}


def test_message_id_deduplicates(space: Space) -> None:
    first = space.send("track", event="Order Completed", userId="u1", messageId="dup-1")
    again = space.send("track", event="Order Completed", userId="u1", messageId="dup-1")
    different = space.send("identify", userId="u2", messageId="dup-1")  # same id, other content
    assert first.status == "resolved"
    assert again.status == different.status == "duplicate"
    assert space.event_count_of("user_id:u1") == 1
    assert space.profile_of("user_id:u2") is None
    assert list(space.store.iter_event_ids(space.name)) == ["dup-1"]
    # also within one batch
    result = space.ingest([space.message("page", anonymousId="a1", messageId="dup-2")] * 2)
    assert [o.status for o in result.outcomes] == ["resolved", "duplicate"]
    assert space.store.stats(space.name).events == 2


# =============================================================================================
# §5 (rules side) pre-declared non-unique values
# =============================================================================================

NON_UNIQUE = """
[spaces.s.non_unique]
exact = ["info@shop.io"]
regex = ["^kiosk-"]
"""


def test_pre_declared_non_unique_values_never_merge(tmp_path: Path) -> None:
    with open_space(tmp_path, NON_UNIQUE) as space:
        p1 = space.send("page", anonymousId="a1", at=at(minutes=1)).profile_id
        p2 = space.send("page", anonymousId="a2", at=at(minutes=2)).profile_id
        space.send("identify", anonymousId="a1", traits={"email": "INFO@shop.io"}, at=at(minutes=3))
        assert space.profile_of("email:info@shop.io") == p1
        second = space.send("identify", anonymousId="a2", traits={"email": "info@shop.io"}, at=at(minutes=4))
        assert second.merged == () and second.profile_id == p2
        assert sorted(space.roots()) == sorted([str(p1), str(p2)])

        k1 = space.send(
            "identify", userId="u1", context={"externalIds": [ext("kiosk-7", "terminal")]}
        ).profile_id
        k2 = space.send("page", anonymousId="z2").profile_id
        joined = space.send("track", anonymousId="z2", context={"externalIds": [ext("kiosk-7", "terminal")]})
        assert joined.merged == () and joined.profile_id == k2 != k1
        assert space.profile_of("terminal:kiosk-7") == k1


def test_non_unique_detection_counts_within_the_higher_types_window(space: Space) -> None:
    # email is limited to 5 a year: one anonymous id seen with six emails within a year is suspect ...
    for n in range(6):
        space.send("identify", anonymousId="shared", traits={"email": f"e{n}@x.io"}, at=at(days=n))
    assert [s.identifier for s in space.store.suspects(space.name)] == ["anonymous_id:shared"]
    assert space.store.suspects(space.name)[0].evidence_type == "email"
    # ... one seen with six emails spread over three years is not.
    for n in range(6):
        space.send("identify", anonymousId="spread", traits={"email": f"s{n}@x.io"}, at=at(days=200 * n))
    assert [s.identifier for s in space.store.suspects(space.name)] == ["anonymous_id:shared"]


def test_non_unique_detection_does_not_depend_on_the_order_messages_arrive_in(space: Space) -> None:
    # Six emails within a year, the last-stamped one arriving first: the others come in late.
    order = [5, 0, 1, 2, 3, 4]
    for n in order:
        space.send("identify", anonymousId="late", traits={"email": f"l{n}@x.io"}, at=at(days=n))
    (suspect,) = space.store.suspects(space.name)
    assert (suspect.identifier, suspect.evidence_type) == ("anonymous_id:late", "email")
    # Spread over three years they stay apart whatever the order.
    for n in reversed(range(6)):
        space.send("identify", anonymousId="apart", traits={"email": f"a{n}@x.io"}, at=at(days=200 * n))
    assert [s.identifier for s in space.store.suspects(space.name)] == ["anonymous_id:late"]


def test_non_unique_detection_marks_only_past_the_limit_and_inside_the_window(space: Space) -> None:
    # email allows 5 a year: five emails with one anonymous id are not evidence of sharing, a sixth is.
    for n in range(5):
        space.send("identify", anonymousId="shared", traits={"email": f"e{n}@x.io"}, at=at())
    assert space.store.suspects(space.name) == []
    # a sixth exactly a year after the first five is outside their window ...
    space.send("identify", anonymousId="shared", traits={"email": "late@x.io"}, at=at(days=365))
    assert space.store.suspects(space.name) == []
    # ... one a millisecond inside it makes six in one year
    space.send(
        "identify",
        anonymousId="shared",
        traits={"email": "inside@x.io"},
        at=at(days=365) - timedelta(milliseconds=1),
    )
    assert [s.identifier for s in space.store.suspects(space.name)] == ["anonymous_id:shared"]


def test_non_unique_detection_off_keeps_segments_shared_device_behaviour(tmp_path: Path) -> None:
    # DEFAULTS.md: detection is on by default; a space that turns it off gets Segment's behaviour (E6):
    # lib1 is never marked, and later anonymous browsing on it lands on the profile that owns it.
    with open_space(tmp_path, space_toml("detect_non_unique = false")) as space:
        alice = space.send("identify", userId="alice", anonymousId="lib1", at=at(minutes=1)).profile_id
        bob = space.send("identify", userId="bob", anonymousId="lib1", at=at(minutes=2))
        assert bob.profile_id != alice and [str(d.identifier) for d in bob.dropped] == ["anonymous_id:lib1"]
        assert space.store.suspects(space.name) == []
        assert space.send("page", anonymousId="lib1", at=at(minutes=3)).profile_id == alice
        # Pre-declared non-unique values are still honoured.
    with open_space(
        tmp_path / "declared",
        space_toml("detect_non_unique = false\n[spaces.s.non_unique]\nexact = ['kiosk']"),
    ) as declared:
        first = declared.send("page", anonymousId="kiosk", at=at(minutes=1)).profile_id
        other = declared.send("identify", userId="u2", at=at(minutes=2)).profile_id
        joined = declared.send("identify", userId="u2", anonymousId="kiosk", at=at(minutes=3))
        assert joined.merged == () and joined.profile_id == other != first


def test_without_detection_a_junk_value_shared_by_many_is_not_read_in_full_by_each_message(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Detection off, one anonymousId sent with every user: each message read its evidence of every user
    seen with it (500 messages took 0.44 s at 1,000 users, 9.75 s at 30,000, RSS 45 → 106 MB). The
    resolver needs only whether this message's pairs are stored: the pairs it is given stay at one."""

    seen: list[int] = []
    resolve = engine_module.resolve_message

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append(sum(len(pairs) for pairs in kwargs["users_view"].evidence.values()))
        return resolve(*args, **kwargs)

    monkeypatch.setattr(engine_module, "resolve_message", counting)
    with open_space(tmp_path, space_toml("detect_non_unique = false")) as space:
        space.ingest(space.message("track", userId=f"u{number}", anonymousId="junk") for number in range(60))
        again = space.send("track", userId="u7", anonymousId="junk")
        assert again.profile_id == space.profile_of("user_id:u7")
        assert space.store.suspects(space.name) == []
        junk = ident("anonymous_id:junk")
        with space.store.transaction() as transaction:  # all of it is still stored
            assert len(transaction.load_view(space.name, "users", [junk]).evidence[junk]) == 60
    assert max(seen) <= 1 and seen[-1] == 1  # u7's pair with junk, not the other 59


def test_identifier_reference_helper() -> None:
    assert ident("group_id:acme").collection == "accounts"
    assert ident("email:a:b") == Identifier("email", "a:b", "users")
