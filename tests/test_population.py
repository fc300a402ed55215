"""Tests of the synthetic workload generator: determinism, shape, scenarios and ground truth."""

from __future__ import annotations

import csv
import gzip
import re
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import msgspec
import pytest

from idstitch.sim.population import (
    JUNK_ANONYMOUS_IDS,
    SCENARIOS,
    GeneratedMessage,
    WorkloadConfig,
    generate,
    write_ndjson,
)

TYPES = {"identify", "track", "page", "screen", "group", "alias"}
TS_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z$")


@pytest.fixture(scope="module")
def stream() -> list[GeneratedMessage]:
    """A 20k-message run shared by the read-only tests."""
    return list(generate(WorkloadConfig(messages=20_000, seed=3)))


def _ms(ts: str) -> int:
    """Parse a generated timestamp to epoch milliseconds."""
    return int(datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC).timestamp() * 1000)


def _has_identifier(msg: dict[str, Any]) -> bool:
    """Whether the message carries one of the identifiers a CRM or client may send."""
    traits = msg.get("traits") or {}
    context = msg.get("context") or {}
    return any(
        (
            "userId" in msg,
            "anonymousId" in msg,
            "email" in traits,
            bool(context.get("externalIds")),
        )
    )


def test_same_seed_gives_identical_bytes_and_other_seed_differs(tmp_path: Path) -> None:
    cfg = WorkloadConfig(messages=3000, seed=7)
    a, b, c = tmp_path / "a.ndjson", tmp_path / "b.ndjson", tmp_path / "c.ndjson"
    assert write_ndjson(a, cfg, truth_path=tmp_path / "a.csv") == 3000
    assert write_ndjson(b, cfg, truth_path=tmp_path / "b.csv") == 3000
    write_ndjson(c, WorkloadConfig(messages=3000, seed=8))
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    assert a.read_bytes() != c.read_bytes()
    # No id of one seed shows up in the other: workloads can be loaded side by side.
    ids_a = {msgspec.json.decode(line)["messageId"] for line in a.read_bytes().splitlines()}
    ids_c = {msgspec.json.decode(line)["messageId"] for line in c.read_bytes().splitlines()}
    assert not ids_a & ids_c


@pytest.mark.parametrize("n", [0, 1, 2, 7, 100, 2500])
def test_count_is_exact(n: int, tmp_path: Path) -> None:
    assert sum(1 for _ in generate(WorkloadConfig(messages=n, seed=n))) == n
    path = tmp_path / "w.ndjson"
    assert write_ndjson(path, WorkloadConfig(messages=n, seed=n)) == n
    assert len(path.read_bytes().splitlines()) == n


def test_every_message_is_well_formed(stream: list[GeneratedMessage]) -> None:
    start = datetime(2026, 1, 1, tzinfo=UTC)
    low = _ms((start - timedelta(days=3)).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
    high = _ms((start + timedelta(days=93)).strftime("%Y-%m-%dT%H:%M:%S.000Z"))
    for gm in stream:
        msg = gm.message
        assert msg["type"] in TYPES
        assert _has_identifier(msg), msg
        assert isinstance(msg["messageId"], str) and 0 < len(msg["messageId"]) <= 100
        assert TS_RE.match(msg["timestamp"]), msg["timestamp"]
        assert low <= _ms(msg["timestamp"]) <= high
        assert gm.scenario in SCENARIOS
        assert gm.person == "" or re.fullmatch(r"p_\d{6,}", gm.person)
        assert gm.account == "" or re.fullmatch(r"a_\d{5,}", gm.account)
        if msg["type"] == "alias":
            assert msg["previousId"] and msg["userId"]
        if msg["type"] == "group":
            assert msg["groupId"] and msg["userId"] and {"name", "plan", "employees"} <= msg["traits"].keys()
        if msg["type"] == "track":
            assert msg["event"]
        # JSON-ready: encodes and decodes to the same value.
        assert msgspec.json.decode(msgspec.json.encode(msg)) == msg


def test_message_ids_unique_except_retries_which_repeat_an_earlier_message(
    stream: list[GeneratedMessage],
) -> None:
    seen: dict[str, tuple[int, GeneratedMessage]] = {}
    retries = 0
    for i, gm in enumerate(stream):
        mid = gm.message["messageId"]
        if gm.scenario == "retry":
            retries += 1
            assert mid in seen, "a retry repeats an earlier message"
            j, original = seen[mid]
            assert original.scenario != "retry"
            assert 0 < i - j <= 250, "retries come a little later"
            assert gm.message == original.message
            assert msgspec.json.encode(gm.message) == msgspec.json.encode(original.message)
            assert (gm.person, gm.account) == (original.person, original.account)
        else:
            assert mid not in seen, f"duplicate messageId {mid}"
            seen[mid] = (i, gm)
    assert 100 <= retries <= 300  # ~1% of 20k


def test_retries_survive_consumer_mutation() -> None:
    originals: dict[str, bytes] = {}
    for gm in generate(WorkloadConfig(messages=5000, seed=11)):
        mid = gm.message["messageId"]
        if gm.scenario == "retry":
            assert msgspec.json.encode(gm.message) == originals[mid]
        else:
            originals[mid] = msgspec.json.encode(gm.message)
        # A consumer that rewrites what it gets (e.g. adds receivedAt) must not change retries.
        gm.message["receivedAt"] = "mutated"
        gm.message["type"] = "mutated"


def test_every_scenario_present_with_a_plausible_mix(stream: list[GeneratedMessage]) -> None:
    counts = Counter(gm.scenario for gm in stream)
    assert set(counts) == set(SCENARIOS)
    share = {k: v / len(stream) for k, v in counts.items()}
    assert 0.45 <= share["anonymous"] <= 0.65
    assert 0.04 <= share["crm"] <= 0.06
    assert 0.005 <= share["junk_id"] <= 0.02
    assert 0.005 <= share["retry"] <= 0.015
    assert 0.01 <= share["out_of_order"] + share["clock_skew"] <= 0.03
    assert share["alias"] <= 0.005
    assert 0.02 <= share["shared_device"] <= 0.04
    assert 0.01 <= share["group"] <= 0.03


def test_user_ids_are_stable_and_one_to_one(stream: list[GeneratedMessage]) -> None:
    uid_to_person: dict[str, str] = {}
    person_to_uid: dict[str, str] = {}
    for gm in stream:
        uid = gm.message.get("userId")
        if uid is None:
            continue
        assert gm.person, "a message with a real userId always has a person"
        assert uid_to_person.setdefault(uid, gm.person) == gm.person
        assert person_to_uid.setdefault(gm.person, uid) == uid


def test_cross_device_people_have_several_anonymous_ids(stream: list[GeneratedMessage]) -> None:
    anons: dict[str, set[str]] = defaultdict(set)
    for gm in stream:
        if gm.scenario in {"login", "cross_device"} and "userId" in gm.message:
            anons[gm.message["userId"]].add(gm.message["anonymousId"])
    assert sum(1 for ids in anons.values() if len(ids) >= 2) >= 50
    mobile = [gm for gm in stream if "device" in gm.message.get("context", {})]
    assert {gm.message["context"]["device"]["type"] for gm in mobile} == {"ios", "android"}
    for gm in mobile[:200]:
        ctx = gm.message["context"]
        assert ctx["device"]["id"] and "adTrackingEnabled" in ctx["device"]
        assert ctx["os"]["name"] in {"iOS", "Android"}


def test_shared_devices_carry_several_users_with_correct_truth(stream: list[GeneratedMessage]) -> None:
    uid_to_person = {gm.message["userId"]: gm.person for gm in stream if "userId" in gm.message and gm.person}
    by_anon: dict[str, list[GeneratedMessage]] = defaultdict(list)
    for gm in stream:
        if gm.scenario == "shared_device":
            by_anon[gm.message["anonymousId"]].append(gm)
    assert by_anon
    multi_user = 0
    for anon, messages in by_anon.items():
        assert messages[0].message["type"] == "identify", "a shared device starts with a login"
        last_login = ""
        users = set()
        for gm in messages:
            msg = gm.message
            if msg["type"] == "identify":
                last_login = uid_to_person[msg["userId"]]
            if "userId" in msg:
                users.add(msg["userId"])
                assert gm.person == uid_to_person[msg["userId"]]
            # Anonymous or not, the device belongs to whoever last logged in on it.
            assert gm.person == last_login, anon
        multi_user += len(users) >= 2
    assert multi_user >= 10
    # Shared anonymous ids never appear in a person's own (non-shared) traffic.
    own = {gm.message.get("anonymousId") for gm in stream if gm.scenario not in {"shared_device", "retry"}}
    assert not own & by_anon.keys()


def test_junk_ids_are_present_with_truth(stream: list[GeneratedMessage]) -> None:
    junk = [gm for gm in stream if gm.scenario == "junk_id"]
    values = {gm.message["anonymousId"] for gm in junk}
    assert len(values) >= 4 and values <= set(JUNK_ANONYMOUS_IDS)
    with_user = [gm for gm in junk if "userId" in gm.message]
    only_junk = [gm for gm in junk if "userId" not in gm.message]
    assert with_user and only_junk
    assert all(gm.person for gm in with_user)
    for gm in only_junk:
        assert gm.person == "" and gm.account == ""
        assert gm.message["anonymousId"] != "", "junk-only messages still carry an identifier"
    # Junk ids only come from the junk scenario (or its retries).
    assert all(
        gm.message.get("anonymousId") not in JUNK_ANONYMOUS_IDS
        for gm in stream
        if gm.scenario not in {"junk_id", "retry"}
    )


def test_crm_email_change_and_accounts(stream: list[GeneratedMessage]) -> None:
    crm = [gm.message for gm in stream if gm.scenario == "crm"]
    email_only = [m for m in crm if m["type"] == "identify"]
    external = [m for m in crm if m["type"] == "track"]
    assert email_only and external
    assert all("userId" not in m and "anonymousId" not in m and m["traits"]["email"] for m in email_only)
    for m in external:
        (ext,) = m["context"]["externalIds"]
        assert ext.keys() == {"id", "type", "collection", "encoding"}
        assert (ext["type"], ext["collection"], ext["encoding"]) == ("crm_id", "users", "none")
    emails: dict[str, set[str]] = defaultdict(set)
    for gm in stream:
        traits = gm.message.get("traits") or {}
        if gm.message["type"] == "identify" and "email" in traits:
            emails[gm.person].add(traits["email"].strip().lower())
    changed = [gm.person for gm in stream if gm.scenario == "email_change"]
    assert changed and all(len(emails[p]) >= 2 for p in changed)
    # One groupId per account, and group calls come from the account's members.
    account_of_group: dict[str, str] = {}
    for gm in stream:
        if gm.message["type"] == "group":
            assert gm.account
            assert account_of_group.setdefault(gm.message["groupId"], gm.account) == gm.account
    assert len(set(account_of_group.values())) == len(account_of_group)


def test_timestamps_mostly_non_decreasing_and_skew_is_consistent(stream: list[GeneratedMessage]) -> None:
    fresh = [gm for gm in stream if gm.scenario != "retry"]
    times = [_ms(gm.message["timestamp"]) for gm in fresh]
    decreases = sum(1 for a, b in pairwise(times) if b < a)
    assert decreases <= 0.04 * len(times)
    late = [gm for gm in fresh if gm.scenario == "out_of_order"]
    assert late
    skewed = [gm.message for gm in fresh if gm.scenario == "clock_skew"]
    assert skewed
    for m in skewed:
        corrected = _ms(m["receivedAt"]) - (_ms(m["sentAt"]) - _ms(m["originalTimestamp"]))
        assert corrected == _ms(m["timestamp"])
    # Out-of-order messages really are earlier than their person's previous message.
    last: dict[str, int] = {}
    earlier = 0
    for gm, t in zip(fresh, times, strict=True):
        if gm.scenario == "out_of_order" and t < last.get(gm.person, -1):
            earlier += 1
        if gm.person:
            last[gm.person] = max(t, last.get(gm.person, t))
    assert earlier == len(late)


def test_gzip_round_trip_and_truth_csv(tmp_path: Path) -> None:
    cfg = WorkloadConfig(messages=4000, seed=5)
    plain, packed = tmp_path / "w.ndjson", tmp_path / "w.ndjson.gz"
    truth = tmp_path / "truth.csv"
    assert write_ndjson(plain, cfg) == 4000
    assert write_ndjson(packed, cfg, truth_path=truth) == 4000
    with gzip.open(packed, "rb") as fh:
        assert fh.read() == plain.read_bytes()
    # Reproducible compressed bytes too (no mtime or file name in the header).
    other = tmp_path / "other.ndjson.gz"
    write_ndjson(other, cfg)
    assert other.read_bytes() == packed.read_bytes()

    lines = plain.read_bytes().splitlines()
    with truth.open(newline="") as fh:
        rows = list(csv.reader(fh))
    assert rows[0] == ["message_id", "person", "account", "scenario"]
    assert len(rows) - 1 == len(lines)
    expected = list(generate(cfg))
    for line, row, gm in zip(lines, rows[1:], expected, strict=True):
        msg = msgspec.json.decode(line)
        assert msg == gm.message
        assert row == [msg["messageId"], gm.person, gm.account, gm.scenario]


def test_config_validation() -> None:
    with pytest.raises(ValueError):
        WorkloadConfig(messages=-1)
    with pytest.raises(ValueError):
        WorkloadConfig(messages=10, days=0)
    with pytest.raises(ValueError):
        WorkloadConfig(messages=10, start=datetime(2026, 1, 1))
    with pytest.raises(ValueError):
        WorkloadConfig(messages=10, crm_rate=1.5)


def test_knobs_change_the_mix() -> None:
    cfg = WorkloadConfig(messages=5000, seed=2, crm_rate=0.0, retry_rate=0.0, shared_message_rate=0.0)
    counts = Counter(gm.scenario for gm in generate(cfg))
    assert counts["crm"] == counts["retry"] == counts["shared_device"] == 0
    assert sum(counts.values()) == 5000
