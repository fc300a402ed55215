"""`idstitch copy`: a store moved to another (SQLite to PostgreSQL) holds the same graph, ids included,
and answers the same write keys and tokens; each message keeps its source's policy; a killed copy resumes.

Every test runs the real command in a subprocess against real stores (PostgreSQL at 127.0.0.1).
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import sqlite3
import subprocess
import sys
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import msgspec
import pytest

from helpers import clean_env, committed_events, kill_when
from idstitch.config import load_config
from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import Message, format_timestamp, parse_message, parse_stored
from idstitch.engine import Engine
from idstitch.sim.population import WorkloadConfig, generate
from idstitch.storage.urls import open_store
from live_server import ADMIN_TOKEN, PROFILE_TOKEN, WRITE_KEY, Server

SPACE = "default"
RECEIVED = datetime(2026, 6, 1, tzinfo=UTC)
TWO_SOURCES = """
[spaces.default]
profile_tokens = ["pt_read"]

[spaces.default.sources.web]
write_key = "wk_web"

[spaces.default.sources.crm]
write_key = "wk_crm"
merge = false
"""


def _idstitch(
    *args: str, cwd: Path, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """The CLI in a subprocess, with no IDSTITCH_* of the caller's shell (only those of `env`)."""
    env = clean_env() | (env or {})
    done = subprocess.run(
        [sys.executable, "-m", "idstitch", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check:
        assert done.returncode == 0, done.stderr
    return done


def _graph(url: str, space: str = SPACE) -> dict[str, Any]:
    """Everything a copy must carry: the dump (ids included), each stored message whole, keys and tokens."""
    store = open_store(url, read_only=True)
    try:
        # Whole, payload bytes included; only the sequence is the copy's own.
        events = [msgspec.structs.replace(event, sequence=0) for event in store.iter_events(space)]
        return {
            "dump": store.dump(space),
            "events": events,
            "sources": sorted(store.sources(), key=repr),
            "tokens": sorted(store.tokens(), key=repr),
        }
    finally:
        store.close()


def _simulated(count: int, seed: int) -> list[dict[str, Any]]:
    return [item.message for item in generate(WorkloadConfig(messages=count, seed=seed))]


def _post(
    base_url: str,
    path: str,
    body: dict[str, Any] | None,
    write_key: str = WRITE_KEY,
    raw: bytes | None = None,
) -> dict[str, Any]:
    data = gzip.compress(raw if raw is not None else json.dumps(body).encode())
    request = urllib.request.Request(f"{base_url}{path}", data=data, method="POST")
    request.add_header("Authorization", "Basic " + base64.b64encode(f"{write_key}:".encode()).decode())
    request.add_header("Content-Encoding", "gzip")
    with urllib.request.urlopen(request, timeout=60) as response:
        answer: dict[str, Any] = json.loads(response.read())
        return answer


def test_a_served_sqlite_store_copied_to_postgresql_is_the_same_graph_with_the_same_keys(
    tmp_path: Path, postgres_url: str
) -> None:
    """The move issue 6 promises: a company that ran `serve` on SQLite has no event files to ingest again.
    Live requests are the hard case: clock skew corrected against the server's receipt, batch-level
    context, messages without an id (generated from the request), a client's `timestamp` made its
    originalTimestamp. The copy must resolve each as it was, so every segment id matches."""
    server = Server(tmp_path / "serve")
    server.start()
    try:
        messages = _simulated(1_200, seed=11)
        for start in range(0, len(messages), 40):
            batch = [dict(item) for item in messages[start : start + 40]]
            for offset, item in enumerate(batch):
                if offset % 9 == 0:
                    item.pop("messageId", None)
                if offset % 5 == 0:
                    # A client clock 3 minutes fast, corrected by sentAt against the server's receipt.
                    stamp = datetime.fromisoformat(item.pop("timestamp").replace("Z", "+00:00"))
                    item["originalTimestamp"] = format_timestamp(stamp + timedelta(minutes=3))
            sent = format_timestamp(datetime.now(UTC) + timedelta(minutes=3))
            body = {"batch": batch, "context": {"library": {"name": "test"}}, "sentAt": sent}
            assert _post(server.base_url, "/v1/batch", body)["success"] is True
        _post(
            server.base_url,
            "/v1/track",
            {"userId": "solo", "event": "Late", "timestamp": "2030-01-01T00:00:00Z"},
        )
    finally:
        server.stop()

    # The same environment as the server's: its key and tokens came from IDSTITCH_*, as an operator's would.
    served_env = {key: value for key, value in server.env.items() if key.startswith("IDSTITCH_")}
    done = _idstitch(
        "copy", "--store", server.store_url, "--to", postgres_url, "--json", cwd=tmp_path, env=served_env
    )
    assert "created" not in done.stderr  # nothing new was made: the copy answers what the source answered
    summary = json.loads(done.stdout)
    (space,) = summary["spaces"]
    assert space["same"] is True and space["differences"] == [], done.stderr
    assert space["rejected"] == 0 and space["duplicates"] == 0
    assert space["accepted"] + space["unresolved"] == space["source"]["events"] > 1_100
    source, copied = _graph(server.store_url), _graph(postgres_url)
    assert copied == source
    assert [record.write_key for record in copied["sources"]] == [WRITE_KEY]
    keys = [
        _idstitch("keys", "--store", url, "--json", cwd=tmp_path, env=served_env).stdout
        for url in (server.store_url, postgres_url)
    ]
    assert keys[0] == keys[1] and PROFILE_TOKEN in keys[1] and ADMIN_TOKEN in keys[1]

    # Run again: everything is already there, nothing changes.
    again = json.loads(
        _idstitch(
            "copy", "--store", server.store_url, "--to", postgres_url, "--json", cwd=tmp_path, env=served_env
        ).stdout
    )
    assert again["spaces"][0]["duplicates"] == space["messages"] and again["spaces"][0]["same"] is True
    assert _graph(postgres_url) == source


def _ingest_two_sources(url: str, config_path: Path, count: int) -> None:
    """A stream whose sources interleave in runs of 1 to 30 messages, as two feeds arriving together."""
    store = open_store(url)
    try:
        engine = Engine(store, load_config(config_path))
        parsed: list[Message | InvalidEvent] = []
        for raw in _simulated(count, seed=5):
            try:
                parsed.append(parse_message(raw, received_at=RECEIVED))
            except InvalidEvent as error:
                parsed.append(error)
        chooser = random.Random(3)
        position = 0
        while position < len(parsed):
            size = chooser.randint(1, 30)
            source = chooser.choice(["web", "crm"])
            engine.ingest(parsed[position : position + size], space=SPACE, source=source)
            position += size
    finally:
        store.close()


def test_a_copy_keeps_each_messages_source_policy_and_a_killed_copy_resumes_to_the_same_graph(
    tmp_path: Path,
) -> None:
    config = tmp_path / "idstitch.toml"
    config.write_text(TWO_SOURCES)
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    _ingest_two_sources(source_url, config, 6_000)
    target = tmp_path / "copy.db"
    target_url = f"sqlite:///{target}"
    command = [sys.executable, "-m", "idstitch", "copy", "--store", source_url, "--to", target_url]
    command += ["--config", str(config), "--batch-size", "50", "--quiet"]
    copying = subprocess.Popen(
        command, cwd=tmp_path, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    kill_when(lambda: committed_events(target) >= 500, "the copy's first batches", copying)
    killed_at = committed_events(target)
    assert 0 < killed_at < 6_000

    done = _idstitch(
        "copy", "--store", source_url, "--to", target_url, "--config", str(config), "--json", cwd=tmp_path
    )
    (space,) = json.loads(done.stdout)["spaces"]
    assert space["same"] is True, done.stderr
    assert space["duplicates"] == killed_at  # what the killed run committed was kept, not copied twice
    assert _graph(target_url) == _graph(source_url)

    # The policy mattered: the same messages with every source's policy lifted build another graph.
    crm_free = tmp_path / "crm-free.toml"
    crm_free.write_text(TWO_SOURCES.replace("merge = false\n", ""))
    lifted_url = f"sqlite:///{tmp_path / 'lifted.db'}"
    _idstitch("copy", "--store", source_url, "--to", lifted_url, "--config", str(crm_free), cwd=tmp_path)
    assert _graph(lifted_url)["dump"]["merges"] != _graph(source_url)["dump"]["merges"]


def _walkthrough_store(tmp_path: Path) -> str:
    url = f"sqlite:///{tmp_path / 'walk.db'}"
    example = Path(__file__).resolve().parents[1] / "examples" / "walkthrough.ndjson"
    _idstitch("ingest", str(example), "--store", url, "--quiet", cwd=tmp_path)
    return url


def test_copy_refuses_what_it_cannot_copy_faithfully_before_writing_anything(tmp_path: Path) -> None:
    url = _walkthrough_store(tmp_path)
    target = tmp_path / "copy.db"

    def refused(*args: str) -> str:
        done = _idstitch("copy", "--store", url, *args, cwd=tmp_path, check=False)
        assert done.returncode == 2, done
        assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
        return done.stderr

    spelled_again = f"sqlite:///{tmp_path / '.' / 'walk.db'}"
    assert "names the store copied from" in refused("--to", spelled_again)
    assert "space nowhere is not in the store (it holds: default)" in refused(
        "--to", f"sqlite:///{target}", "--space", "nowhere"
    )
    other = tmp_path / "other.toml"
    other.write_text('[spaces.brand]\n[spaces.brand.sources.web]\nwrite_key = "wk_b"\n')
    assert "space default is in the store but not in the config" in refused(
        "--to", f"sqlite:///{target}", "--config", str(other)
    )
    assert not target.exists()
    empty = _idstitch(
        "copy",
        "--store",
        f"sqlite:///{tmp_path / 'none.db'}",
        "--to",
        f"sqlite:///{target}",
        cwd=tmp_path,
        check=False,
    )
    assert empty.returncode == 2 and "does not exist yet" in empty.stderr


def test_a_message_from_a_source_the_config_no_longer_has_stops_the_copy_with_its_name(
    tmp_path: Path,
) -> None:
    config = tmp_path / "two.toml"
    config.write_text(TWO_SOURCES)
    source_url = f"sqlite:///{tmp_path / 'source.db'}"
    _ingest_two_sources(source_url, config, 300)
    web_only = tmp_path / "web-only.toml"
    web_only.write_text(TWO_SOURCES.split("[spaces.default.sources.crm]")[0])
    done = _idstitch(
        "copy", "--store", source_url, "--to", f"sqlite:///{tmp_path / 'copy.db'}", "--config", str(web_only),
        cwd=tmp_path, check=False,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unknown source 'crm' in space default" in done.stderr
    assert "configure it so that its policy applies in the copy" in done.stderr


def test_a_rules_change_since_the_messages_arrived_is_said_and_the_copy_follows_todays_rules(
    tmp_path: Path,
) -> None:
    url = _walkthrough_store(tmp_path)
    stricter = tmp_path / "stricter.toml"
    # Emails of example.net are blocked now: Sam's two devices, joined by one, no longer meet.
    stricter.write_text(
        '[spaces.default]\n[spaces.default.sources.default]\nwrite_key = "wk_walk"\n'
        "[spaces.default.blocked]\nregex = ['@example\\.net$']\n"
    )
    target_url = f"sqlite:///{tmp_path / 'copy.db'}"
    done = _idstitch(
        "copy", "--store", url, "--to", target_url, "--config", str(stricter), "--json", cwd=tmp_path
    )
    (space,) = json.loads(done.stdout)["spaces"]
    assert space["same"] is False and "identifiers" in space["differences"]
    text = _idstitch("copy", "--store", url, "--to", target_url, "--config", str(stricter), cwd=tmp_path)
    assert "warning: space default: the copy differs from the source (" in text.stderr
    assert "under the rules configured now" in text.stderr


def test_a_stored_message_that_no_longer_parses_is_rejected_by_id_and_the_rest_is_copied(
    tmp_path: Path,
) -> None:
    url = _walkthrough_store(tmp_path)
    path = url.removeprefix("sqlite:///")
    with sqlite3.connect(path) as db:
        (message_id, sequence) = db.execute(
            "SELECT message_id, sequence FROM events ORDER BY sequence LIMIT 1 OFFSET 3"
        ).fetchone()
        db.execute(
            "UPDATE events SET payload = ? WHERE sequence = ?",
            (b'{"type": "track", "userId": "u"}', sequence),
        )
    target_url = f"sqlite:///{tmp_path / 'copy.db'}"
    done = _idstitch("copy", "--store", url, "--to", target_url, "--json", cwd=tmp_path)
    (space,) = json.loads(done.stdout)["spaces"]
    assert space["rejected"] == 1 and space["messages"] == space["source"]["events"]
    assert f"default: {message_id} (sequence {sequence}): event: required" in done.stderr, done.stderr
    assert space["copy"]["events"] == space["source"]["events"] - 1 and space["same"] is False


# -- reading the source: a PostgreSQL source restarting mid-copy -------------------------------------


class _OutagesWhileReading:
    """A store whose walk of the stored messages fails now and then, as a PostgreSQL source restarting
    mid-copy does (StoreUnavailable) or one whose connection an admin ended mid-read (StoreConflict)."""

    def __init__(self, store: Any, failures: list[tuple[int, Exception]]) -> None:
        self.store = store
        self.failures = failures  # (after how many events of a walk, what is raised), each used once
        self.walks: list[int] = []  # the after_sequence each walk started from

    def iter_events(self, space: str, *, after_sequence: int = 0) -> Any:
        self.walks.append(after_sequence)
        for number, event in enumerate(self.store.iter_events(space, after_sequence=after_sequence)):
            if self.failures and number == self.failures[0][0]:
                raise self.failures.pop(0)[1]
            yield event


def _memory_store_with(count: int) -> Any:
    from idstitch.storage.memory import MemoryStore

    store = MemoryStore("memory://")
    engine = Engine(store, load_config(None))
    engine.ingest(
        [parse_message(raw, received_at=RECEIVED) for raw in _simulated(count, seed=2)], space=SPACE
    )
    return store


def test_the_stored_messages_are_read_through_a_source_outage_each_once_in_order() -> None:
    from idstitch.ingest.stored import read_stored_groups
    from idstitch.storage.base import StoreConflict, StoreUnavailable

    store = _memory_store_with(300)
    expected = [event.message_id for event in store.iter_events(SPACE)]
    flaky = _OutagesWhileReading(
        store,
        [
            (40, StoreUnavailable("store postgresql://db is unavailable: the server is restarting")),
            (70, StoreConflict("store postgresql://db: the connection was lost while reading")),
        ],
    )
    groups = list(read_stored_groups(flaky, SPACE, group_size=25, outage_wait=60.0, pause=0.0))
    read = [item.message_id for group in groups for batch in group.batches for item in batch.items]
    assert read == expected
    assert flaky.walks[0] == 0 and len(flaky.walks) == 3  # each retry went on after the last event read
    assert flaky.walks[1] > 0 and flaky.walks[2] > flaky.walks[1]


def test_a_source_outage_longer_than_the_wait_stops_the_read() -> None:
    from idstitch.ingest.stored import read_stored_groups
    from idstitch.storage.base import StoreUnavailable

    flaky = _OutagesWhileReading(
        _memory_store_with(50), [(10, StoreUnavailable("down")), (0, StoreUnavailable("still down"))]
    )
    try:
        list(read_stored_groups(flaky, SPACE, group_size=25, outage_wait=0.0, pause=0.0))
    except StoreUnavailable as error:
        assert str(error) == "down"
    else:
        raise AssertionError("an outage past the wait must stop the copy")


def test_a_copy_into_a_store_in_memory_is_refused_as_it_would_vanish_at_exit(tmp_path: Path) -> None:
    url = _walkthrough_store(tmp_path)
    for memory in ("sqlite://", "sqlite:///:memory:", "sqlite:", "memory://"):
        done = _idstitch("copy", "--store", url, "--to", memory, cwd=tmp_path, check=False)
        assert done.returncode == 2, (memory, done)
        assert done.stdout == "", memory
        assert f"--to {memory} is a store in memory" in done.stderr, done.stderr


# -- a target that already holds the space -------------------------------------------------------------


def test_a_space_the_target_holds_with_messages_of_its_own_is_refused_and_left_as_it_was(
    tmp_path: Path,
) -> None:
    """An operator who tried PostgreSQL first (the walkthrough, a bench) and then copies the real store
    into it: the copy would mix two graphs into one space, replace the write key its clients use, and then
    blame a rules change. Refused before anything is written."""
    trial = _walkthrough_store(tmp_path)
    keys_before = _idstitch("keys", "--store", trial, "--json", cwd=tmp_path).stdout
    graph_before = _graph(trial)
    real = f"sqlite:///{tmp_path / 'real.db'}"
    store = open_store(real)
    try:
        Engine(store, load_config(None)).ingest(
            [parse_message(raw, received_at=RECEIVED) for raw in _simulated(200, seed=4)], space=SPACE
        )
    finally:
        store.close()
    done = _idstitch("copy", "--store", real, "--to", trial, cwd=tmp_path, check=False)
    assert done.returncode == 2, done
    assert done.stdout == "" and len(done.stderr.strip().splitlines()) == 1, done.stderr
    held = graph_before["dump"]["events"]
    assert f"space default of {trial} already holds {len(held)} messages that the store copied from" in (
        done.stderr
    )
    assert _graph(trial) == graph_before
    assert _idstitch("keys", "--store", trial, "--json", cwd=tmp_path).stdout == keys_before


def _copy_in_process(source: Any, target: Any, count: int | None = None) -> None:
    """The first `count` stored messages of the source resolved into the target, as a copy does."""
    from idstitch.ingest.stored import read_stored_groups

    engine = Engine(target, load_config(None))
    done = 0
    for group in read_stored_groups(source, SPACE, group_size=1):
        if count is not None and done >= count:
            return
        engine.ingest_group(group.batches)
        done += group.messages


def test_what_a_target_holds_of_a_space_is_found_as_the_sources_first_messages_or_as_foreign() -> None:
    from idstitch.ingest.stored import copied_before
    from idstitch.storage.memory import MemoryStore

    source = _memory_store_with(300)
    events = list(source.iter_events(SPACE))

    empty = MemoryStore("memory://")
    assert copied_before(source, empty, SPACE).messages == 0

    partial = MemoryStore("memory://")
    _copy_in_process(source, partial, 120)
    found = copied_before(source, partial, SPACE)
    assert (found.messages, found.after_sequence, found.foreign) == (120, events[119].sequence, 0)

    whole = MemoryStore("memory://")
    _copy_in_process(source, whole)
    assert copied_before(source, whole, SPACE).messages == len(events)

    # A message the target holds out of the source's order (a PostgreSQL source whose concurrent writers
    # committed it late): the copy goes on from before it, skipping it as already there.
    late = MemoryStore("memory://")
    _copy_in_process(source, late, 50)
    engine = Engine(late, load_config(None))
    engine.ingest([parse_stored(events[80].payload, received_at=events[80].received_at)], space=SPACE)
    found = copied_before(source, late, SPACE)
    assert (found.messages, found.after_sequence, found.foreign) == (50, events[49].sequence, 0)

    foreign = MemoryStore("memory://")
    _copy_in_process(source, foreign, 10)
    stray = parse_message({"type": "track", "event": "Trial", "userId": "t1", "messageId": "trial-1"},
                          received_at=RECEIVED)  # fmt: skip
    Engine(foreign, load_config(None)).ingest([stray], space=SPACE)
    found = copied_before(source, foreign, SPACE)
    assert (found.foreign, found.first_foreign) == (1, "trial-1")


def test_each_space_of_the_summary_says_the_time_it_took_not_the_whole_copys(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from idstitch.cli import _copy_report, _print_copy_summary, _Tally
    from idstitch.storage.base import SpaceStats

    report = []
    for name, seconds in (("blog", 1.25), ("shop", 20.5)):
        tally = _Tally(messages=3, accepted=3)
        tally.seconds = seconds
        report.append(_copy_report(name, tally, SpaceStats(name, events=3), SpaceStats(name, events=3)))
    _print_copy_summary(report, "sqlite:///copy.db", 21.9, as_json=False)
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith(" in 1.25 s") and lines[2].endswith(" in 20.50 s"), lines
    _print_copy_summary(report, "sqlite:///copy.db", 21.9, as_json=True)
    document = json.loads(capsys.readouterr().out)
    assert document["seconds"] == 21.9
    assert [space["seconds"] for space in document["spaces"]] == [1.25, 20.5]


# -- every row, for a store as a company's is -------------------------------------------------------------

TWO_SPACES = """
[spaces.shop]
profile_tokens = ["pt_shop"]
admin_tokens = ["at_shop"]
email_from_track_properties = true

[spaces.shop.sources.web]
write_key = "wk_shop_web"

[spaces.shop.sources.crm]
write_key = "wk_shop_crm"
merge = false

[spaces.shop.sources.partner]
write_key = "wk_shop_partner"
identifier_types = ["email", "phone", "anonymous_id"]

[spaces.shop.sources.archive]
write_key = "wk_shop_archive"

[spaces.shop.identifiers.phone]
priority = 3
limit = 2
window = "ever"
trait_keys = ["phone"]

[spaces.shop.identifiers.anonymous_id]
limit = 2
window = "daily"

[spaces.shop.identifiers.crm_id]
collection = "accounts"
trait_keys = ["crmId"]

[spaces.shop.blocked]
exact = ["void"]
regex = ["^test-.*$"]

[spaces.shop.non_unique]
exact = ["shared-kiosk"]

[spaces.blog]
profile_tokens = ["pt_blog"]
alias = false
custom_limit = 2
custom_window = "monthly"

[spaces.blog.sources.web]
write_key = "wk_blog_web"

[spaces.blog.identifiers.user_id]
limit = 2
window = "monthly"
"""
_TABLES = ("sources", "tokens", "learned_types", "profiles", "identifiers", "evidence", "suspects", "events")
_TABLES += ("traits", "links", "merges", "dropped")


def _rows(url: str, space: str) -> dict[str, list[str]]:
    """Every row of every table of a space, each column by name but the store's own sequences, sorted."""
    if url.startswith("sqlite:///"):
        db: Any = sqlite3.connect(f"file:{url.removeprefix('sqlite:///')}?mode=ro", uri=True)
        columns = "SELECT name FROM pragma_table_info(?)"
        mark = "?"
    else:
        import psycopg

        db = psycopg.connect(url)
        columns = (
            "SELECT column_name FROM information_schema.columns "
            "WHERE table_name = %s AND table_schema = current_schema()"
        )
        mark = "%s"
    try:
        found = {}
        for table in _TABLES:
            names = sorted(row[0] for row in db.execute(columns, (table,)) if row[0] != "sequence")
            rows = db.execute(f"SELECT {', '.join(names)} FROM {table} WHERE space = {mark}", (space,))
            found[table] = sorted(repr(dict(zip(names, map(_plain, row), strict=True))) for row in rows)
        return found
    finally:
        db.close()


def _plain(value: Any) -> Any:
    """A column's value as both stores give it: PostgreSQL's booleans and bytea as SQLite's."""
    if isinstance(value, bool):
        return int(value)
    return bytes(value) if isinstance(value, memoryview) else value


def _calls(prefix: str) -> list[dict[str, Any]]:
    """Client calls of a dozen people: merges, traits set and removed, accounts, custom ids, aliases,
    a shared device, a declared kiosk and junk ids that leave messages unresolved."""
    calls: list[dict[str, Any]] = []
    for person in range(12):
        anonymous, user = f"{prefix}anon{person}", f"{prefix}user{person}"
        external = [
            {"id": f"loy{person}", "type": f"{prefix}Loyalty", "collection": "users", "encoding": "none"},
            {"id": base64.b64encode(f"b{person}".encode()).decode(), "type": "b64id", "collection": "users",
             "encoding": "base64"},
            {"id": f"acct{person % 4}", "type": "erp_account", "collection": "accounts", "encoding": "none"},
        ]  # fmt: skip
        traits = {"email": f"{prefix}p{person}@example.com", "plan": "pro", "phone": f"+1555{person:04d}"}
        calls += [
            {"method": "page", "anonymous_id": anonymous, "name": "Home", "properties": {"path": "/"}},
            {"method": "track", "anonymous_id": anonymous, "event": "Viewed",
             "properties": {"email": f" {prefix}P{person}@Example.com "}},
            {"method": "identify", "user_id": user, "anonymous_id": anonymous, "traits": traits},
            {"method": "identify", "user_id": user, "traits": {"plan": None, "nick": "😀\u202eRTL"}},
            {"method": "group", "user_id": user, "group_id": f"{prefix}org{person % 3}",
             "traits": {"name": f"Org {person % 3}", "crmId": f"crm{person % 3}"}},
            {"method": "track", "user_id": user, "event": "Bought", "context": {"externalIds": external}},
            {"method": "alias", "previous_id": f"{prefix}old{person}", "user_id": user},
            # Two profiles, then a message that joins them (a merge, unless the source may not merge).
            {"method": "page", "anonymous_id": f"{prefix}later{person}", "name": "Pricing"},
            {"method": "track", "user_id": f"{prefix}other{person}", "event": "Signed In"},
            {"method": "identify", "user_id": f"{prefix}other{person}", "anonymous_id": f"{prefix}later{person}"},
        ]  # fmt: skip
    for user, anonymous in (
        ("alice", "lib1"),
        ("bob", "lib1"),
        ("carol", "shared-kiosk"),
        ("dave", "shared-kiosk"),
    ):
        calls.append({"method": "identify", "user_id": f"{prefix}{user}", "anonymous_id": anonymous})
    calls += [
        {"method": "page", "anonymous_id": "lib1", "name": "Catalogue"},
        {"method": "track", "user_id": "null", "anonymous_id": "00000000-0000-0000-0000-000000000000",
         "event": "Junk"},
        {"method": "track", "user_id": "test-123", "anonymous_id": "void", "event": "Junk"},
    ]  # fmt: skip
    return calls


def _send(client_class: Any, write_key: str, host: str, calls: list[dict[str, Any]]) -> None:
    errors: list[str] = []
    client = client_class(write_key=write_key, host=host, gzip=True, upload_size=17, upload_interval=0.05,
                          max_retries=3, on_error=lambda error, batch: errors.append(repr(error)))  # fmt: skip
    for call in calls:
        fields = dict(call)
        getattr(client, fields.pop("method"))(**fields)
    client.flush()
    client.shutdown()
    assert errors == []


HOSTILE = [
    {"type": "identify", "userId": "nul\u0000user", "traits": {"k\u0000": "v\u0000"}},
    {"type": "identify", "userId": "\u202egnp.live", "traits": {"name": "עברית", "e": "👩‍👩‍👧‍👦"}},
    {"type": "track", "userId": "big", "event": "Big", "properties": {"blob": "x" * 31_000}},
    {"type": "Identify", "user_id": 12345, "traits": {"email": "  MiXeD@Example.COM "}},
    {"type": "identify", "userId": 123456789012345678901234567890, "anonymousId": 1.5},
    {"type": "track", "userId": "skew", "event": "S", "originalTimestamp": "2026-05-01T00:05:00Z",
     "sentAt": "2026-05-01T00:07:00Z"},
    {"type": "track", "userId": "future", "event": "F", "timestamp": "2099-01-01T00:00:00Z"},
    {"type": "track", "userId": "leap", "event": "L", "timestamp": "2016-12-31T23:59:60Z"},
    {"type": "track", "userId": "lower", "event": "L", "timestamp": "2026-05-01t00:00:00.123456z"},
    {"type": "track", "userId": "numeric-id", "event": "N", "messageId": 987654321},
    {"type": "identify", "userId": "no-context-traits", "context": {"traits": None}},
    {"type": "identify", "userId": "e5a", "traits": {"email": "jane@example.com"}},
    {"type": "identify", "userId": "e5b", "traits": {"email": "jane@example.com"}},
    {"type": "alias", "previousId": "e5a", "userId": "e5a_new"},
    {"type": "alias", "previousId": "e5a_new", "userId": "e5a_newer"},
    {"type": "group", "anonymousId": "grp-anon", "groupId": 42, "traits": {"name": None}},
]  # fmt: skip


def test_a_store_of_two_spaces_from_client_libraries_archives_and_hostile_strings_is_copied_row_for_row(
    tmp_path: Path, postgres_url: str
) -> None:
    """Beyond the dump: every column of every table (the non-unique evidence, learned types in first-seen
    order, suspects' evidence, traits' message and source, ...) is the source's, through PostgreSQL and
    back, for a store built as a company's is: two spaces with their own rules, sources with their own
    policies, real client libraries through `serve`, hostile strings, and archives without messageIds."""
    from rudderstack.analytics import Client as RudderClient
    from segment.analytics import Client as SegmentClient

    config = tmp_path / "idstitch.toml"
    config.write_text(TWO_SPACES)
    server = Server(tmp_path / "serve", args=("--config", str(config)))
    server.env = {key: value for key, value in server.env.items() if not key.startswith("IDSTITCH_")}
    server.start()
    try:
        _send(SegmentClient, "wk_shop_web", server.base_url, _calls("sp_"))
        _send(RudderClient, "wk_shop_crm", server.base_url, _calls("rp_"))
        _send(SegmentClient, "wk_blog_web", server.base_url, _calls("bl_"))
        for key in ("wk_shop_partner", "wk_blog_web"):
            body = {
                "batch": HOSTILE,
                "context": {"ip": "10.0.0.1"},
                "sentAt": format_timestamp(datetime.now(UTC)),
            }
            assert _post(server.base_url, "/v1/batch", body, write_key=key)["success"] is True
        # An unpaired surrogate and a NUL (read leniently, as a browser's JSON.stringify writes them).
        raw = b'{"type":"identify","userId":"surr\\ud800x","traits":{"t":"\\udc00\\u0000","n":12345678901234567890123}}'
        assert (
            _post(server.base_url, "/v1/identify", None, write_key="wk_shop_web", raw=raw)["success"] is True
        )
    finally:
        server.stop()
    archive = tmp_path / "archive-2026-05.ndjson"
    lines = []
    for number in range(120):
        message: dict[str, Any] = {"type": "track", "event": "Archived", "userId": f"arch{number % 15}",
                                   "anonymousId": f"archanon{number % 21}"}  # fmt: skip
        if number % 4:
            message["timestamp"] = f"2026-05-01T00:{number % 60:02d}:00Z"
        lines += [
            json.dumps(message),
            json.dumps({"type": "track", "event": "Same", "anonymousId": "timeless"}),
        ]
    archive.write_text("\n".join(lines) + "\n")
    _idstitch("ingest", str(archive), "--store", server.store_url, "--config", str(config),
              "--space", "shop", "--source", "archive", "--quiet", cwd=tmp_path)  # fmt: skip

    back = f"sqlite:///{tmp_path / 'back.db'}"
    for source, target in ((server.store_url, postgres_url), (postgres_url, back)):
        done = _idstitch("copy", "--store", source, "--to", target, "--config", str(config), "--json",
                         cwd=tmp_path)  # fmt: skip
        assert all(space["same"] and not space["rejected"] for space in json.loads(done.stdout)["spaces"])
    for space in ("shop", "blog"):
        rows = _rows(server.store_url, space)
        assert rows["merges"] and rows["learned_types"] and rows["links"], space
        assert space == "blog" or (rows["suspects"] and rows["dropped"])  # the shop's stricter rules
        assert _rows(postgres_url, space) == rows
        assert _rows(back, space) == rows


def test_a_rules_change_that_keeps_every_count_is_said_by_the_messages_it_changed(tmp_path: Path) -> None:
    """The counts alone miss a change that moves or drops as many as before: a window widened (the same
    identifiers dropped, by another rule, which `explain` names), or a priority that sends a message to
    another of its profiles. Each message the copy resolves is checked against where the source put it
    and what the source dropped from it."""
    rules = "[spaces.default]\n[spaces.default.sources.web]\nwrite_key = 'wk_web'\n"
    rules += "[spaces.default.identifiers.anonymous_id]\nlimit = 1\nwindow = '{window}'\n"
    daily, weekly = tmp_path / "daily.toml", tmp_path / "weekly.toml"
    daily.write_text(rules.format(window="daily"))
    weekly.write_text(rules.format(window="weekly"))
    messages = tmp_path / "messages.ndjson"
    stream = [
        {"type": "identify", "userId": "u1", "anonymousId": "a1", "messageId": "m1", "timestamp": "2026-05-01T10:00:00Z"},
        {"type": "identify", "userId": "u1", "anonymousId": "a2", "messageId": "m2", "timestamp": "2026-05-01T11:00:00Z"},
    ]  # fmt: skip
    messages.write_text("".join(json.dumps(item) + "\n" for item in stream))
    url = f"sqlite:///{tmp_path / 'source.db'}"
    _idstitch("ingest", str(messages), "--store", url, "--config", str(daily), "--quiet", cwd=tmp_path)
    target = f"sqlite:///{tmp_path / 'copy.db'}"
    done = _idstitch("copy", "--store", url, "--to", target, "--config", str(weekly), "--json", cwd=tmp_path)
    (space,) = json.loads(done.stdout)["spaces"]
    assert space["source"] == space["copy"]  # every count the same: a2 is dropped either way
    assert space["same"] is False and space["drops_differ"] == 1 and space["moved"] == 0, space
    text = _idstitch("copy", "--store", url, "--to", f"sqlite:///{tmp_path / 'again.db'}", "--config",
                     str(weekly), cwd=tmp_path)  # fmt: skip
    assert "warning: space default: the copy differs from the source (1 message dropped other " in text.stderr
    assert "the copy holds what the source holds" not in text.stdout
    same = _idstitch("copy", "--store", url, "--to", f"sqlite:///{tmp_path / 'same.db'}", "--config",
                     str(daily), "--json", cwd=tmp_path)  # fmt: skip
    (space,) = json.loads(same.stdout)["spaces"]
    assert space["same"] is True and space["drops_differ"] == 0 and space["moved"] == 0
