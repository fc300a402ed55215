"""The command line, run as a real process: ingest, profile, explain, stats, errors and exit codes."""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from idstitch.storage.migrations import read_migrations
from idstitch.storage.urls import open_store

ROOT = Path(__file__).resolve().parents[1]
WALKTHROUGH = ROOT / "examples" / "walkthrough.ndjson"


class CLI:
    """Runs `python -m idstitch` against one store in a scratch directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.url = f"sqlite:///{directory}/t.db"
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}

    def run(
        self, *args: str, input: bytes | None = None, env: dict[str, str] | None = None, store: bool = True
    ) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "idstitch", *args]
        if store and "--store" not in args:
            command += ["--store", self.url]
        done = subprocess.run(
            command,
            input=input.decode() if input is not None else None,
            capture_output=True,
            text=True,
            cwd=self.directory,
            env={**self.env, **(env or {})},
            timeout=120,
        )
        assert "Traceback" not in done.stderr, done.stderr
        return done

    def run_redirected(self, redirection: str, *args: str) -> subprocess.CompletedProcess[str]:
        """The command started by sh after a redirection (`>&-`: with its stdout closed)."""
        command = [sys.executable, "-m", "idstitch", *args, "--store", self.url]
        return subprocess.run(
            ["sh", "-c", f'exec "$@" {redirection}', "sh", *command],
            capture_output=True,
            text=True,
            cwd=self.directory,
            env=self.env,
            timeout=120,
        )

    def ok(self, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        done = self.run(*args, **kwargs)
        assert done.returncode == 0, (done.returncode, done.stdout, done.stderr)
        return done

    def json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    def write(self, name: str, *messages: dict[str, Any] | str) -> Path:
        path = self.directory / name
        lines = [item if isinstance(item, str) else json.dumps(item) for item in messages]
        path.write_text("\n".join(lines) + "\n")
        return path


@pytest.fixture
def cli(tmp_path: Path) -> CLI:
    return CLI(tmp_path)


def at(minute: int) -> str:
    return f"2026-03-02T09:{minute:02d}:00.000Z"


def msg(n: int, kind: str = "page", **fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"type": kind, "messageId": f"m{n}", "timestamp": at(n)}
    if kind == "track":
        base["event"] = "Clicked"
    return {**base, **fields}


IDENTIFIER_KEYS = {"type", "value", "first_seen", "last_seen", "suspect", "retired"}
PROFILE_KEYS = {
    "segment_id",
    "collection",
    "identifiers",
    "traits",
    "event_count",
    "merged_segment_ids",
    "links",
}


def test_anonymous_to_known_profile_json_has_the_exact_shape(cli: CLI) -> None:
    path = cli.write(
        "e2.ndjson",
        msg(1, anonymousId="a1", name="Home"),
        msg(2, anonymousId="a1", name="Pricing"),
        msg(3, anonymousId="a1", name="Signup"),
        msg(4, "identify", userId="u1", anonymousId="a1", traits={"email": "j@x.io", "plan": "pro"}),
    )
    done = cli.ok("ingest", str(path))
    assert "created space default with source default, write key wk_" in done.stderr
    assert "created Profile API read token pt_" in done.stderr
    assert "created Profile API admin token at_" in done.stderr
    assert "accepted" in done.stdout and "messages/s" in done.stdout

    document = cli.json("profile", "user_id:u1")
    assert set(document) == PROFILE_KEYS
    assert document["segment_id"].startswith("use_") and len(document["segment_id"]) == 31
    assert document["collection"] == "users"
    assert document["traits"] == {"email": "j@x.io", "plan": "pro"}
    assert document["event_count"] == 4
    assert document["merged_segment_ids"] == []
    assert document["links"] == []
    assert all(set(item) == IDENTIFIER_KEYS for item in document["identifiers"])
    by_type = {item["type"]: item for item in document["identifiers"]}
    assert set(by_type) == {"anonymous_id", "user_id", "email"}
    assert by_type["anonymous_id"] == {
        "type": "anonymous_id",
        "value": "a1",
        "first_seen": at(1),
        "last_seen": at(4),
        "suspect": False,
        "retired": False,
    }
    assert by_type["user_id"] == {
        "type": "user_id",
        "value": "u1",
        "first_seen": at(4),
        "last_seen": at(4),
        "suspect": False,
        "retired": False,
    }
    assert by_type["email"]["value"] == "j@x.io"

    # Every identifier and the segment id find the same profile; email lookups are normalised.
    for key in ("anonymous_id:a1", "email:J@X.io", document["segment_id"]):
        assert cli.json("profile", key)["segment_id"] == document["segment_id"]

    # The second run prints no new write key (it is kept in the store).
    again = cli.ok("ingest", str(path))
    assert "write key" not in again.stderr


def test_a_merged_childs_segment_id_resolves_to_the_parent_and_explain_shows_the_merge(cli: CLI) -> None:
    cli.ok(
        "ingest",
        str(
            cli.write("one.ndjson", msg(1, anonymousId="a1"), msg(2, "identify", traits={"email": "j@x.io"}))
        ),
    )
    parent = cli.json("profile", "anonymous_id:a1")["segment_id"]
    child = cli.json("profile", "email:j@x.io")["segment_id"]
    assert parent != child

    cli.ok(
        "ingest",
        str(cli.write("two.ndjson", msg(3, "identify", anonymousId="a1", traits={"email": "j@x.io"}))),
    )
    merged = cli.json("profile", child)
    assert merged["segment_id"] == parent
    assert merged["merged_segment_ids"] == [child]
    assert merged["event_count"] == 3
    assert {(item["type"], item["value"]) for item in merged["identifiers"]} == {
        ("anonymous_id", "a1"),
        ("email", "j@x.io"),
    }

    explained = cli.json("explain", child)
    assert explained["segment_id"] == parent
    assert explained["merges"] == [
        {"parent": parent, "child": child, "message_id": "m3", "via": "email:j@x.io", "at": at(3)}
    ]
    text = cli.ok("explain", "email:j@x.io").stdout
    assert f"{child} merged into {parent} via email:j@x.io (message m3)" in text

    stats = cli.json("stats", "--space", "default")
    assert stats["merges"] == 1 and stats["profiles"] == 1


@pytest.mark.parametrize("command", ["profile", "explain"])
def test_a_merge_ingested_while_profile_reads_is_not_half_in_what_it_shows(cli: CLI, command: str) -> None:
    """`ingest` merges the profile into an older one right after `profile` found its root (a hook in
    the reading process runs it there). Before: `error: profile use_… vanished while reading it`, exit 2."""
    cli.ok(
        "ingest",
        str(
            cli.write(
                "one.ndjson",
                msg(10, "identify", traits={"email": "j@x.io", "name": "Jane"}),
                msg(1, anonymousId="o1"),  # older: it takes the email's profile in when they meet
            )
        ),
    )
    before = cli.json(command, "email:j@x.io")
    merge = cli.write("two.ndjson", msg(20, "identify", anonymousId="o1", traits={"email": "j@x.io"}))
    probe = (
        "import subprocess, sys\n"
        "from idstitch.storage.sqlite import SQLiteStore\n"
        "found = SQLiteStore.find_profile\n"
        "def find_then_merge(self, *args):\n"
        "    root = found(self, *args)\n"
        "    SQLiteStore.find_profile = found\n"
        f"    subprocess.run([sys.executable, '-m', 'idstitch', 'ingest', {str(merge)!r}, '--store', "
        f"{cli.url!r}], check=True, capture_output=True)\n"
        "    return root\n"
        "SQLiteStore.find_profile = find_then_merge\n"
        f"sys.argv = ['idstitch', {command!r}, 'email:j@x.io', '--json', '--store', {cli.url!r}]\n"
        "from idstitch.cli import main\n"
        "main()\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=cli.directory,
        env=cli.env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == before  # the moment it started reading, whole
    after = cli.json(command, "email:j@x.io")
    assert after["segment_id"] != before["segment_id"]
    assert after["merged_segment_ids"] == [before["segment_id"]]


def test_unknown_id_exits_1_with_one_line_on_stderr(cli: CLI) -> None:
    cli.ok("ingest", str(cli.write("a.ndjson", msg(1, anonymousId="a1"))))
    for unknown in ("user_id:nobody", "use_000000000000000000000000000", "acc_000000000000000000000000000"):
        done = cli.run("profile", unknown, "--json")
        assert done.returncode == 1
        assert done.stdout == ""
        assert done.stderr.count("\n") == 1 and unknown in done.stderr
    done = cli.run("explain", "email:nobody@x.io")
    assert done.returncode == 1 and done.stderr.count("\n") == 1
    # The anonymous id exists, but not in the accounts collection.
    assert cli.run("profile", "anonymous_id:a1", "--collection", "accounts").returncode == 1
    # Neither type:value nor a segment id: a usage error.
    done = cli.run("profile", "justtext")
    assert done.returncode == 2 and "type:value" in done.stderr


def test_profile_text_shows_brackets_and_colons_as_sent(cli: CLI) -> None:
    # Rich would read "[test]" as markup (and raise on "[/docs]"), and ":smile:" as an emoji code.
    cli.ok(
        "ingest",
        str(
            cli.write(
                "odd.ndjson",
                msg(
                    1,
                    "identify",
                    userId="urn:smile:1",
                    anonymousId="[bold]anon[/bold]",
                    traits={"x": "[x] done"},
                ),
                msg(2, "track", userId="urn:smile:1", event="Viewed [/docs] page", messageId="[b]m2"),
            )
        ),
    )
    shown = cli.ok("profile", "user_id:urn:smile:1").stdout
    for text in ("urn:smile:1", "[bold]anon[/bold]", '"[x] done"', "Viewed [/docs] page", "[b]m2"):
        assert text in shown, (text, shown)
    done = cli.run("profile", "a:b:smile:x")
    assert done.returncode == 1 and "a:b:smile:x" in done.stderr


def test_profile_and_explain_text_show_control_and_invisible_characters_as_escapes(cli: CLI) -> None:
    # Whoever sends events must not be able to drive the operator's terminal (ESC clears the screen, OSC
    # sets its title), fake a table row with a newline, or hide a character: text output escapes them.
    user = "u\x1b[2J\x1b[31m1"
    shared = "a1\nuser_id │ admin"
    cli.ok(
        "ingest",
        str(
            cli.write(
                "escapes.ndjson",
                msg(1, "identify", userId=user, anonymousId=shared, traits={"k\u202eey": "v\x9b1m"}),
                msg(2, "track", userId=user, event="E\x1b]0;pwned\x07", messageId="m\u200b2"),
                msg(3, "identify", userId="u2", anonymousId=shared),  # a second user_id: shared is dropped
            )
        ),
    )
    shown = cli.ok("profile", f"user_id:{user}").stdout
    explained = cli.ok("explain", "user_id:u2").stdout
    for output in (shown, explained):
        hidden = [char for char in output if not char.isprintable() and char != "\n"]
        assert hidden == [], output
    escaped = (
        "u\\x1b[2J\\x1b[31m1",
        "a1\\nuser_id │ admin",
        "k\\u202eey",
        '"v\\x9b1m"',
        "E\\x1b]0;pwned\\x07",
    )
    for text in (*escaped, "m\\u200b2"):
        assert text in shown, (text, shown)
    assert "anonymous_id:a1\\nuser_id │ admin  rule: user_id limit 1 ever" in explained, explained
    assert "(u\\x1b[2J\\x1b[31m1, u2)" in explained, explained
    # --json carries the exact values.
    document = cli.json("profile", f"user_id:{user}")
    assert {item["value"] for item in document["identifiers"]} == {user, shared}
    assert document["traits"] == {"k\u202eey": "v\x9b1m"}


def test_profile_text_shows_the_most_recent_events_by_timestamp(cli: CLI) -> None:
    # The newest event arrives first, then ten older ones: "the 10 most recent" must still show it, in
    # the order the Profile API's `events` gives (newest timestamp first), not in ingest order.
    newest = {**msg(1, "track", userId="u1", event="Newest"), "timestamp": "2026-04-01T00:00:00.000Z"}
    older = [msg(n, "track", userId="u1", event=f"Old {n}") for n in range(2, 12)]
    cli.ok("ingest", str(cli.write("late.ndjson", newest, *older)))
    shown = cli.ok("profile", "user_id:u1").stdout
    assert "events: 11 (10 most recent)" in shown
    rows = [line for line in shown.splitlines() if "│ track" in line]
    assert len(rows) == 10
    assert "Newest" in rows[0] and "2026-04-01 00:00:00" in rows[0]
    assert "Old 11" in rows[1] and "Old 3" in rows[-1]
    assert "Old 2 " not in shown


def test_profile_json_carries_the_suspect_and_retired_flags_the_text_shows(cli: CLI) -> None:
    cli.ok(
        "ingest",
        str(
            cli.write(
                "flags.ndjson",
                msg(1, "identify", userId="alice", anonymousId="lib1"),
                msg(2, "identify", userId="bob", anonymousId="lib1"),
                msg(3, "identify", userId="old_id", anonymousId="a3"),
                msg(4, "alias", previousId="old_id", userId="new_id"),
            )
        ),
    )
    flags = {
        (item["type"], item["value"]): (item["suspect"], item["retired"])
        for key in ("user_id:alice", "user_id:new_id")
        for item in cli.json("profile", key)["identifiers"]
    }
    assert flags == {
        ("user_id", "alice"): (False, False),
        ("anonymous_id", "lib1"): (True, False),
        ("user_id", "old_id"): (False, True),
        ("user_id", "new_id"): (False, False),
        ("anonymous_id", "a3"): (False, False),
    }
    text = cli.ok("profile", "user_id:new_id").stdout
    assert re.search(r"│ user_id +│ old_id +│.*│ retired │", text), text
    assert re.search(r"│ anonymous_id +│ lib1 +│.*│ suspect │", cli.ok("profile", "user_id:alice").stdout)


def test_shared_device_junk_ids_explain_and_stats(cli: CLI) -> None:
    cli.ok(
        "ingest",
        str(
            cli.write(
                "library.ndjson",
                msg(1, "identify", userId="alice", anonymousId="lib1"),
                msg(2, "identify", userId="bob", anonymousId="lib1"),
                msg(3, anonymousId="lib1", name="Later"),
                msg(4, "identify", userId="kim", anonymousId="null"),
                msg(5, "identify", userId="lee", anonymousId="null"),
            )
        ),
    )
    alice = cli.json("profile", "user_id:alice")
    bob = cli.json("profile", "user_id:bob")
    assert alice["segment_id"] != bob["segment_id"]
    assert bob["event_count"] == 2  # the later anonymous page lands on the last user of the device
    assert {(i["type"], i["value"]) for i in bob["identifiers"]} == {("user_id", "bob")}

    explained = cli.json("explain", "user_id:bob")
    assert explained["merges"] == []
    assert [(d["identifier"], d["rule"], d["message_id"]) for d in explained["dropped"]] == [
        ("anonymous_id:lib1", "user_id limit 1 ever", "m2")
    ]
    assert [s["identifier"] for s in explained["suspects"]] == ["anonymous_id:lib1"]
    assert set(explained["suspects"][0]["evidence_values"]) == {"alice", "bob"}
    text = cli.ok("explain", "user_id:bob").stdout
    assert "anonymous_id:lib1" in text and "rule: user_id limit 1 ever" in text

    # "null" is blocked: never an identifier, and the two users stay apart.
    assert cli.run("profile", "anonymous_id:null").returncode == 1
    kim = cli.json("explain", "user_id:kim")
    assert [d["identifier"] for d in kim["dropped"]] == ["anonymous_id:null"]
    assert kim["dropped"][0]["rule"].startswith("blocked")

    stats = cli.json("stats", "--space", "default")
    assert stats == {
        "space": "default",
        "profiles": 4,
        "accounts": 0,
        "identifiers": 5,
        "merges": 0,
        "events": 5,
        "unresolved": 0,
        "suspect": 1,
        "dropped": 3,
    }
    assert cli.json("stats") == [stats]
    assert "suspect" in cli.ok("stats").stdout


def test_explain_text_gives_one_line_per_identifier_and_rule_however_often_it_was_dropped(cli: CLI) -> None:
    """A page of a public source (README: Untrusted clients) that may not send user_id goes on naming the
    logged-in user: every call drops it again. The JSON keeps each drop; the text says it once, counted."""
    config = cli.directory / "public.toml"
    config.write_text(
        '[spaces.default.sources.web]\nwrite_key = "wk_web"\nidentifier_types = ["anonymous_id"]\n'
    )
    pages = [msg(n, anonymousId="a1", userId="u1") for n in range(1, 5)]
    path = cli.write(
        "pages.ndjson", *pages, msg(5, anonymousId="a1", userId="u1", traits={"email": "j@x.io"})
    )
    cli.ok("ingest", str(path), "--config", str(config))
    explained = cli.json("explain", "anonymous_id:a1", "--config", str(config))
    assert [d["message_id"] for d in explained["dropped"] if d["identifier"] == "user_id:u1"] == [
        "m1", "m2", "m3", "m4", "m5"
    ]  # fmt: skip
    text = cli.ok("explain", "anonymous_id:a1", "--config", str(config)).stdout
    assert "dropped identifiers: 6\n" in text
    assert (
        f"  {at(1)}  user_id:u1  rule: source web may not contribute user_id  "
        f"(5 messages, the last ingested m5 at {at(5)})\n"
    ) in text
    assert f"  {at(5)}  email:j@x.io  rule: source web may not contribute email  (message m5)\n" in text
    assert text.count("user_id:u1") == 1


def test_bad_input_is_reported_per_line_and_every_good_line_lands(cli: CLI) -> None:
    big = msg(6, "track", userId="u6", properties={"blob": "x" * (40 * 1024)})
    path = cli.write(
        "bad.ndjson",
        msg(1, "identify", userId="u1", traits={"email": "one@x.io"}),
        '{"type": "track", "userId": "u2", "event": "Broken"',
        msg(3, "track", userId="u3"),
        msg(4, "track", properties={"note": "no identifier at all"}),
        msg(
            5,
            "track",
            userId="u5",
            context={"externalIds": [{"id": "c1", "type": "crm_id", "encoding": "none"}]},
        ),
        json.dumps(big),
        "",
        msg(8, "track", userId="u8"),
    )
    done = cli.ok("ingest", str(path), "--json")
    errors = [line for line in done.stderr.strip().split("\n") if not line.startswith("created ")]
    assert len(errors) == 4, done.stderr
    assert errors[0].startswith(f"{path}:2: invalid JSON")
    assert errors[1].startswith(f"{path}:4: ") and "no identifier" in errors[1]
    assert errors[2] == f"{path}:5: context.externalIds[0].collection: required"
    assert errors[3].startswith(f"{path}:6: ") and "32 KB" in errors[3] and "limit" in errors[3]
    summary = json.loads(done.stdout)
    assert summary["messages"] == 7 and summary["accepted"] == 3 and summary["rejected"] == 4

    for user in ("u1", "u3", "u8"):
        assert cli.json("profile", f"user_id:{user}")["event_count"] == 1
    assert cli.json("profile", "email:one@x.io")["traits"] == {"email": "one@x.io"}
    for user in ("u2", "u5", "u6"):
        assert cli.run("profile", f"user_id:{user}").returncode == 1
    assert cli.json("stats", "--space", "default")["events"] == 3


def test_ingest_counts_the_accounts_it_creates(cli: CLI) -> None:
    # A CRM feed of group calls makes accounts: "profiles created 1" alone said nothing of the three
    # accounts (while "merges" counts the accounts' merges too).
    path = cli.write(
        "accounts.ndjson",
        msg(1, "group", userId="rep1", groupId="acme", traits={"name": "Acme"}),
        msg(2, "group", userId="rep1", groupId="globex"),
        msg(3, "group", userId="null", groupId="initech"),  # the user side blocked: an account alone
        msg(4, "group", userId="rep1", groupId="acme"),
    )
    summary = json.loads(cli.ok("ingest", str(path), "--json").stdout)
    assert (summary["profiles_created"], summary["accounts_created"]) == (1, 3)
    assert cli.json("stats", "--space", "default")["accounts"] == 3
    text = cli.ok("ingest", str(cli.write("more.ndjson", msg(5, "group", userId="rep2", groupId="hooli"))))
    assert "  profiles created           1\n  accounts created           1\n" in text.stdout


def test_rerunning_the_same_file_changes_nothing(cli: CLI) -> None:
    first = json.loads(cli.ok("ingest", str(WALKTHROUGH), "--json").stdout)
    assert first["rejected"] == 0 and first["accepted"] > 0
    stats = cli.json("stats")
    store = open_store(cli.url)
    try:
        dump = store.dump("default")
    finally:
        store.close()

    again = json.loads(cli.ok("ingest", str(WALKTHROUGH), "--json", "--batch-size", "3").stdout)
    assert again["duplicates"] == first["messages"]
    assert again["accepted"] == again["profiles_created"] == again["merges"] == 0
    assert cli.json("stats") == stats
    store = open_store(cli.url)
    try:
        assert store.dump("default") == dump
    finally:
        store.close()


def test_the_walkthrough_tells_the_story_of_the_readme(cli: CLI) -> None:
    cli.ok("ingest", str(WALKTHROUGH))
    jane = cli.json("profile", "anonymous_id:anon_5f2a")
    assert {(i["type"], i["value"]) for i in jane["identifiers"]} == {
        ("anonymous_id", "anon_5f2a"),
        ("user_id", "u_jane"),
        ("email", "jane@example.com"),
    }
    assert jane["event_count"] == 5
    assert [link["identifiers"][0]["value"] for link in jane["links"]] == ["acme"]

    mark = cli.json("profile", "anonymous_id:ios_7c1e")
    assert {"ios_7c1e", "andr_3b9d"} <= {i["value"] for i in mark["identifiers"]}
    assert mark["event_count"] == 3

    bob = cli.json("explain", "user_id:u_bob")
    assert [(d["identifier"], d["rule"]) for d in bob["dropped"]] == [
        ("anonymous_id:lib_pc_1", "user_id limit 1 ever")
    ]
    stats = cli.json("stats", "--space", "default")
    assert stats["suspect"] == 1 and stats["merges"] == 1 and stats["accounts"] == 1
    assert cli.run("profile", "anonymous_id:null").returncode == 1

    acme = cli.json("profile", "group_id:acme")
    assert acme["collection"] == "accounts" and acme["traits"]["plan"] == "enterprise"
    assert acme["links"][0]["collection"] == "users"
    # Without --json: a readable rendering with the same facts.
    text = cli.ok("profile", "user_id:u_jane").stdout
    assert "anon_5f2a" in text and "jane@example.com" in text and "acme" in text


def test_an_account_of_many_users_shows_the_first_links_and_their_count_and_json_all(cli: CLI) -> None:
    # Before: the text view printed every link with its identifiers (20,000 rows for a big account).
    users = [msg(n, "group", userId=f"u{n:02}", groupId="acme") for n in range(1, 26)]
    cli.ok("ingest", str(cli.write("groups.ndjson", *users)))
    text = cli.ok("profile", "group_id:acme").stdout
    assert "links: 25 (first 20; --json lists them all)" in text
    assert "user_id:u20" in text and "user_id:u21" not in text
    document = cli.json("profile", "group_id:acme")
    assert len(document["links"]) == 25
    assert "links: 1 (all)" in cli.ok("profile", "user_id:u21").stdout


def test_version_names_the_release_and_the_store_schema_it_reads(cli: CLI) -> None:
    from importlib.metadata import version

    done = cli.run("--version", store=False)
    sqlite, postgres = read_migrations("sqlite")[-1][0], read_migrations("postgres")[-1][0]
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"idstitch {version('idstitch')} (store schema: SQLite {sqlite}, PostgreSQL {postgres})\n",
        "",
    )
    assert not (cli.directory / "t.db").exists()


def test_stdin_and_gzip_inputs(cli: CLI) -> None:
    import gzip

    data = (json.dumps(msg(1, anonymousId="a1")) + "\n").encode()
    done = cli.ok("ingest", "-", "--json", input=data)
    assert json.loads(done.stdout)["accepted"] == 1
    packed = cli.directory / "events.bin"
    packed.write_bytes(gzip.compress((json.dumps(msg(2, anonymousId="a1")) + "\n").encode()))
    assert json.loads(cli.ok("ingest", str(packed), "--json").stdout)["accepted"] == 1
    assert cli.json("profile", "anonymous_id:a1")["event_count"] == 2


def test_config_file_spaces_sources_and_account_types(cli: CLI) -> None:
    config = cli.directory / "idstitch-test.toml"
    config.write_text(TWO_SPACES)
    external = {"id": "sf_1", "type": "salesforce_id", "collection": "accounts", "encoding": "none"}
    path = cli.write("a.ndjson", msg(1, "track", userId="u1", context={"externalIds": [external]}))
    done = cli.ok("ingest", str(path), "--config", str(config), "--space", "app_a", "--source", "web")
    assert "write key" not in done.stderr
    env = {"IDSTITCH_CONFIG": str(config)}
    account = json.loads(
        cli.ok("profile", "salesforce_id:sf_1", "--space", "app_a", "--json", env=env).stdout
    )
    assert account["collection"] == "accounts"
    assert account["links"][0]["identifiers"][0]["value"] == "u1"
    # Spaces are separate; IDSTITCH_SPACE picks one.
    assert cli.run("profile", "user_id:u1", env={**env, "IDSTITCH_SPACE": "app_b"}).returncode == 1
    assert cli.run("profile", "user_id:u1", env={**env, "IDSTITCH_SPACE": "app_a"}).returncode == 0
    listed = json.loads(cli.ok("stats", "--json", env=env).stdout)
    assert [item["space"] for item in listed] == ["app_a", "app_b"]
    assert [item["events"] for item in listed] == [1, 0]

    # Unknown space or source, and two spaces with no --space: usage errors naming the problem.
    for args, needle in (
        (["--space", "nope"], "unknown space"),
        (["--space", "app_a", "--source", "nope"], "unknown source"),
        ([], "2 spaces are configured (app_a, app_b): name one with --space"),
    ):
        done = cli.run("ingest", str(path), *args, env=env)
        assert done.returncode == 2 and needle in done.stderr and done.stderr.count("\n") == 1


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["ingest", "missing.ndjson"], "missing.ndjson: no such file"),
        (["ingest", "{file}", "--store", "mysql://x"], "unknown scheme"),
        (["ingest", "{file}", "--store", "sqlite:relative.db"], "sqlite:///"),
        (["ingest", "{file}", "--config", "nowhere.toml"], "does not exist"),
        (["ingest", "{file}", "--config", "{bad_config}"], "invalid TOML"),
        (["stats", "--store", "sqlite:///never-created.db"], "does not exist"),
        (["stats", "--space", "nope"], "unknown space"),
        (["profile", "user_id:u1", "--collection", "people"], "--collection"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(cli: CLI, args: list[str], needle: str) -> None:
    good = cli.write("good.ndjson", msg(1, anonymousId="a1"))
    cli.ok("ingest", str(good))
    bad_config = cli.directory / "bad.toml"
    bad_config.write_text("[spaces.x\n")
    filled = [arg.format(file=good, bad_config=bad_config) for arg in args]
    done = cli.run(*filled)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert needle in done.stderr
    assert done.stderr.strip().count("\n") == 0


def test_help_lists_every_command(cli: CLI) -> None:
    text = cli.ok("--help", store=False).stdout
    for command in ("ingest", "profile", "explain", "stats"):
        assert command in text
    assert "--batch-size" in cli.ok("ingest", "--help", store=False).stdout


def test_rerunning_a_file_without_message_ids_or_timestamps_changes_nothing(cli: CLI) -> None:
    # A hand-written export: no messageId, no time. Two identical page views are two events, and a
    # re-run (with a later receivedAt) recognises all of them, in a file of any shape.
    page = {"type": "page", "name": "Home", "anonymousId": "a1"}
    ndjson = cli.write("plain.ndjson", page, page, {"type": "identify", "userId": "u1", "anonymousId": "a1"})
    envelope = cli.directory / "envelope.json"
    envelope.write_text(json.dumps({"batch": [page, {"type": "track", "event": "X", "userId": "u2"}]}))
    first = json.loads(cli.ok("ingest", str(ndjson), str(envelope), "--json").stdout)
    assert first["accepted"] == 5 and first["duplicates"] == 0
    again = json.loads(cli.ok("ingest", str(envelope), str(ndjson), "--json").stdout)
    assert again["accepted"] == 0 and again["duplicates"] == 5
    assert cli.json("profile", "anonymous_id:a1")["event_count"] == 4
    assert cli.json("stats")[0]["events"] == 5


TWO_SPACES = """
[spaces.app_a]
profile_tokens = ["pt_a"]
admin_tokens = ["at_a"]
[spaces.app_a.sources.web]
write_key = "wk_a_web"
[spaces.app_a.sources.crm]
write_key = "wk_a_crm"
merge = false

[spaces.app_b.sources.web]
write_key = "wk_b_web"
"""


def test_a_failed_ingest_writes_nothing_not_even_the_store_file(cli: CLI) -> None:
    path = cli.write("a.ndjson", msg(1, anonymousId="a1"))
    config = cli.directory / "two.toml"
    config.write_text(TWO_SPACES)
    fresh = cli.directory / "fresh.db"
    for args, needle in (
        (["--space", "nope"], "unknown space 'nope'"),
        (["--source", "nope"], "unknown source 'nope'"),
        (["--config", str(config), "--space", "app_a", "--source", "nope"], "unknown source 'nope'"),
    ):
        done = cli.run("ingest", str(path), "--store", f"sqlite:///{fresh}", *args)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert needle in done.stderr and done.stderr.count("\n") == 1, done.stderr
        assert "created" not in done.stderr and done.stdout == ""
        assert not fresh.exists(), args


def test_a_space_with_several_sources_needs_source(cli: CLI) -> None:
    # Without --source the events would be stored with no source, bypassing crm's merge = false.
    path = cli.write("a.ndjson", msg(1, anonymousId="a1"))
    config = cli.directory / "two.toml"
    config.write_text(TWO_SPACES)
    done = cli.run("ingest", str(path), "--config", str(config), "--space", "app_a")
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr == "error: space app_a has several sources (crm, web): name one with --source\n"
    assert not Path(cli.url.removeprefix("sqlite:///")).exists()
    done = cli.ok("ingest", str(path), "--config", str(config), "--space", "app_a", "--source", "crm")
    assert "accepted" in done.stdout
    assert "required when the space has several" in " ".join(
        cli.ok("ingest", "--help", store=False).stdout.split()
    )


def test_ingest_of_a_directory_without_data_files_says_so(cli: CLI) -> None:
    # A directory is walked (tests/test_ingest_archive.py); one with nothing to read is a usage error.
    done = cli.run("ingest", ".")
    assert done.returncode == 2 and "error: .: no data file in it (.gz, .json" in done.stderr
    assert "no such file" not in done.stderr
    assert not (cli.directory / "t.db").exists()


def test_ingest_of_a_file_that_cannot_be_read_fails_before_writing_anything(cli: CLI) -> None:
    # A socket exists but cannot be opened, even by root (as a file without read permission cannot
    # by anyone else): refused up front like a missing file, not after the store was created and
    # the good files before it were half read.
    good = cli.write("good.ndjson", msg(1, anonymousId="a1"))
    sock_path = cli.directory / "events.sock"
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(sock_path))
    try:
        done = cli.run("ingest", str(good), str(sock_path))
    finally:
        server.close()
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr == f"error: {sock_path}: cannot be read (No such device or address)\n"
    assert not Path(cli.url.removeprefix("sqlite:///")).exists()


def test_not_found_with_a_forced_collection_names_the_collection(cli: CLI) -> None:
    cli.ok("ingest", str(cli.write("a.ndjson", msg(1, anonymousId="a1"))))
    user = cli.json("profile", "anonymous_id:a1")["segment_id"]
    for command in ("profile", "explain"):
        done = cli.run(command, user, "--collection", "accounts")
        assert done.returncode == 1
        assert done.stderr == f"error: no accounts profile {user} in space default\n"
    done = cli.run("profile", "user_id:nobody")
    assert done.stderr == "error: no profile user_id:nobody in space default\n"


def test_read_commands_on_a_configured_space_the_store_lacks(cli: CLI) -> None:
    # The store was written with a config of space app_a; read without it (space `default`) and with a
    # config naming a space the store never held.
    config = cli.directory / "one.toml"
    config.write_text('[spaces.app_a.sources.web]\nwrite_key = "wk_a"\n')
    cli.ok("ingest", str(cli.write("a.ndjson", msg(1, "identify", userId="u1"))), "--config", str(config))
    other = cli.directory / "other.toml"
    other.write_text(
        '[spaces.app_a.sources.web]\nwrite_key = "wk_a"\n[spaces.app_z.sources.web]\nwrite_key = "wk_z"\n'
    )
    for extra in ([], ["--config", str(other), "--space", "app_z"]):
        name = "default" if not extra else "app_z"
        expected = f"error: space {name} is not in the store (it holds: app_a)\n"
        for command in ("profile", "explain"):
            done = cli.run(command, "user_id:u1", *extra)
            assert (done.returncode, done.stderr) == (1, expected), (command, extra, done.stderr)
        done = cli.run("stats", "--space", name, *extra)
        assert (done.returncode, done.stderr, done.stdout) == (2, expected, ""), (extra, done.stderr)
    store = open_store(cli.url)
    try:
        assert store.spaces() == ["app_a"]  # reading created nothing
    finally:
        store.close()
    assert cli.json("profile", "user_id:u1", "--config", str(config))["traits"] == {}


def test_a_renamed_space_is_a_new_one_and_ingest_says_where_the_old_profiles_are(cli: CLI) -> None:
    # Renaming [spaces.app] to [spaces.shop] (or adding a config to a store built without one) starts an
    # empty graph; the profiles stay under the old name, which the writer now says instead of going quiet.
    before = cli.directory / "before.toml"
    before.write_text('[spaces.app.sources.web]\nwrite_key = "wk_web"\n')
    cli.ok("ingest", str(cli.write("a.ndjson", msg(1, "identify", userId="u1"))), "--config", str(before))
    after = cli.directory / "after.toml"
    after.write_text('[spaces.shop.sources.web]\nwrite_key = "wk_web"\n')
    done = cli.ok(
        "ingest", str(cli.write("b.ndjson", msg(2, "identify", userId="u1"))), "--config", str(after)
    )
    assert done.stderr == (
        "warning: the store holds space app, which the config does not name: its profiles are neither "
        "served nor added to (a renamed space starts empty; read it with --space app)\n"
    )
    assert cli.json("profile", "user_id:u1", "--config", str(after), "--space", "app")["event_count"] == 1
    # Naming it again: it is written to again; now the space the run before made is the one named.
    done = cli.ok(
        "ingest", str(cli.write("c.ndjson", msg(3, "identify", userId="u1"))), "--config", str(before)
    )
    assert "space app," not in done.stderr and "space shop," in done.stderr
    assert cli.json("profile", "user_id:u1", "--config", str(before))["event_count"] == 2


def test_keys_lists_write_keys_and_tokens_again(cli: CLI) -> None:
    done = cli.ok("ingest", str(cli.write("a.ndjson", msg(1, anonymousId="a1"))))
    printed = set(re.findall(r"\b(?:wk|pt|at)_\S+", done.stderr))
    assert len(printed) == 3
    listed = cli.json("keys")
    assert len(listed) == 1 and listed[0]["space"] == "default"
    (source,) = listed[0]["sources"]
    assert source["name"] == "default" and source["write_key"].startswith("wk_")
    assert [token["kind"] for token in listed[0]["tokens"]] == ["read", "admin"]
    assert {source["write_key"], *(token["token"] for token in listed[0]["tokens"])} == printed
    assert cli.json("keys", "--space", "default") == listed[0]
    text = cli.ok("keys").stdout
    for value in printed:
        assert value in text
    assert "read token" in text and "admin token" in text and "write key" in text

    # With a config: its keys and tokens (the generated ones of the implicit space are not valid there).
    config = cli.directory / "two.toml"
    config.write_text(TWO_SPACES)
    documents = json.loads(cli.ok("keys", "--config", str(config), "--json").stdout)
    assert documents == [
        {
            "space": "app_a",
            "sources": [
                {"name": "crm", "write_key": "wk_a_crm", "merge": False},
                {"name": "web", "write_key": "wk_a_web", "merge": True},
            ],
            "tokens": [{"kind": "read", "token": "pt_a"}, {"kind": "admin", "token": "at_a"}],
        },
        {
            "space": "app_b",
            "sources": [{"name": "web", "write_key": "wk_b_web", "merge": True}],
            "tokens": [],
        },
    ]
    done = cli.run("keys", "--config", str(config), "--space", "nope")
    assert done.returncode == 2 and "unknown space 'nope'" in done.stderr
    done = cli.run("keys", "--store", "sqlite:///never.db")
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not (cli.directory / "never.db").exists()


def test_keys_after_a_first_run_killed_before_its_tokens_were_made(cli: CLI) -> None:
    # A first ingest killed after migrating the store (before its keys): nothing to point a client at
    # yet, and the config is not what is missing, so keys says which command makes them.
    open_store(cli.url).close()
    text = cli.ok("keys").stdout
    assert "write key (none yet: the next `idstitch ingest` or `serve` makes it)" in text
    tokens_line = next(line for line in text.splitlines() if line.lstrip().startswith("tokens "))
    assert tokens_line.split(None, 1)[1] == "none yet: the next `idstitch ingest` or `serve` makes them"
    assert cli.json("keys") == [
        {"space": "default", "sources": [{"name": "default", "write_key": None, "merge": True}], "tokens": []}
    ]
    done = cli.ok("ingest", str(cli.write("a.ndjson", msg(1, anonymousId="a1"))))
    made = set(re.findall(r"\b(?:wk|pt|at)_\S+", done.stderr))
    assert len(made) == 3 and made <= set(re.findall(r"\b(?:wk|pt|at)_\S+", cli.ok("keys").stdout))


def test_help_and_usage_lines(cli: CLI) -> None:
    ingest_help = cli.ok("ingest", "--help", store=False).stdout
    # The program name is `python -m idstitch` here, `idstitch` when installed.
    assert ingest_help.splitlines()[0].endswith(" idstitch ingest [OPTIONS] FILE|DIR...")
    assert "postgresql://" in ingest_help
    for command in ("profile", "explain"):
        usage = cli.ok(command, "--help", store=False).stdout.splitlines()[0]
        assert usage.endswith(f" idstitch {command} [OPTIONS] ID")
    assert "keys" in cli.ok("--help", store=False).stdout


def test_counts_of_one_are_singular(cli: CLI) -> None:
    done = cli.ok("ingest", str(cli.write("a.ndjson", msg(1, anonymousId="a1"))))
    assert done.stdout.startswith("ingested 1 message from 1 file in ")
    two = cli.ok("ingest", str(cli.write("b.ndjson", msg(2, anonymousId="a1"), msg(3, anonymousId="a1"))))
    assert two.stdout.startswith("ingested 2 messages from 1 file in ")


def test_worker_summary_counts_of_one_are_singular(capsys: pytest.CaptureFixture[str]) -> None:
    from idstitch.cli import _print_worker_summary

    counts = dict.fromkeys(
        (
            "accepted",
            "duplicates",
            "unresolved",
            "rejected",
            "profiles_created",
            "accounts_created",
            "merges",
            "commits",
        ),
        0,
    )
    summary = {**counts, "retried": 0, "parked": 0, "seconds": 1.0, "messages_per_second": 1}
    _print_worker_summary({**summary, "queue_messages": 1, "messages": 1}, as_json=False)
    assert "1 queue message, 1 message (" in capsys.readouterr().out
    _print_worker_summary({**summary, "queue_messages": 2, "messages": 3}, as_json=False)
    assert "2 queue messages, 3 messages (" in capsys.readouterr().out


def test_messages_without_a_time_get_the_files_and_a_second_run_builds_the_same_graph(cli: CLI) -> None:
    """What makes a run resumed after kill -9 equal an uninterrupted one, ids included."""
    path = cli.write(
        "timeless.ndjson",
        {"type": "page", "name": "p", "anonymousId": "a", "messageId": "t1"},
        {"type": "identify", "traits": {"email": "e@x.io"}, "messageId": "t2"},
        {"type": "identify", "anonymousId": "a", "traits": {"email": "e@x.io"}, "messageId": "t3"},
    )
    os.utime(path, (1_767_225_600, 1_767_225_600))  # 2026-01-01T00:00:00Z
    dumps = []
    for name in ("first.db", "second.db"):
        url = f"sqlite:///{cli.directory / name}"
        cli.ok("ingest", str(path), "--batch-size", "1", "--store", url)
        store = open_store(url)
        try:
            dumps.append(store.dump("default"))
        finally:
            store.close()
    assert dumps[0] == dumps[1]
    assert cli.json("profile", "email:e@x.io", "--store", f"sqlite:///{cli.directory / 'first.db'}")[
        "identifiers"
    ][0]["first_seen"].startswith("2026-01-01T00:00:00")


def test_a_pipe_whose_first_bytes_arrive_late_is_read_by_its_real_format(cli: CLI) -> None:
    """`curl … | idstitch ingest -` hands over what has arrived: the format waits for enough of it."""
    array = json.dumps([msg(1, anonymousId="p1"), msg(2, anonymousId="p1")], indent=2).encode()
    packed = gzip.compress(b"\n".join(json.dumps(msg(n, anonymousId="p2")).encode() for n in (3, 4)) + b"\n")
    for name, data in (("array", b"  " + array), ("gzip", packed)):
        fifo = cli.directory / f"{name}.fifo"
        os.mkfifo(fifo)

        def feed(target: Path = fifo, payload: bytes = data) -> None:
            with target.open("wb") as pipe:
                pipe.write(payload[:1])
                pipe.flush()
                time.sleep(0.5)  # the rest arrives late: what a slow producer on a pipe does
                pipe.write(payload[1:])

        writer = threading.Thread(target=feed, daemon=True)  # never holds pytest if ingest fails
        writer.start()
        done = cli.ok("ingest", str(fifo), "--json")
        writer.join()
        summary = json.loads(done.stdout)
        assert (summary["accepted"], summary["rejected"]) == (2, 0), (name, summary)
    assert cli.json("profile", "anonymous_id:p1")["event_count"] == 2
    assert cli.json("profile", "anonymous_id:p2")["event_count"] == 2


@pytest.mark.parametrize(("arguments", "loaded"), [(["stats", "--help"], False), (["--help"], True)])
def test_the_benchmarks_are_imported_only_when_asked_for_or_listed(
    arguments: list[str], loaded: bool
) -> None:
    # They import the PostgreSQL, NATS and HTTP clients: ~0.3 s before every `idstitch profile`.
    probe = (
        "import sys\n"
        f"sys.argv = ['idstitch', *{arguments!r}]\n"
        "from idstitch.cli import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('idstitch.bench.cli' in sys.modules, 'psycopg' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert done.stdout.splitlines()[-1] == f"{loaded} {loaded}"


def run_to_a_reader_gone(cli: CLI, *args: str, stream: str = "stdout") -> subprocess.CompletedProcess[str]:
    """Run with stdout (or stderr) a pipe whose reader has already exited, as `idstitch … | head -1` ends."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    command = [sys.executable, "-m", "idstitch", *args]
    if args and not args[-1].startswith("--help"):
        command += ["--store", cli.url]
    stdout = write_end if stream == "stdout" else subprocess.PIPE
    stderr = write_end if stream == "stderr" else subprocess.PIPE
    with subprocess.Popen(
        command, stdout=stdout, stderr=stderr, text=True, cwd=cli.directory, env=cli.env
    ) as process:
        os.close(write_end)
        out, err = process.communicate(timeout=120)
    return subprocess.CompletedProcess(command, process.returncode, out or "", err or "")


@pytest.mark.parametrize(
    "args",
    [
        ["profile", "anonymous_id:anon_5f2a"],
        ["profile", "anonymous_id:anon_5f2a", "--json"],
        ["explain", "user_id:u_bob"],
        ["stats"],
        ["keys", "--json"],
        ["--help"],
        ["ingest", "--help"],
    ],
)
def test_output_cut_short_by_its_reader_is_no_error(cli: CLI, args: list[str]) -> None:
    """`idstitch profile … | head -1`: exit 0 as for the whole output (1 would read as "not found")."""
    cli.ok("ingest", str(WALKTHROUGH))
    done = run_to_a_reader_gone(cli, *args)
    assert (done.returncode, done.stderr) == (0, "")


def test_a_profile_not_found_is_still_exit_1_when_stdout_is_gone(cli: CLI) -> None:
    cli.ok("ingest", str(WALKTHROUGH))
    done = run_to_a_reader_gone(cli, "profile", "user_id:nobody")
    assert done.returncode == 1 and done.stderr == "error: no profile user_id:nobody in space default\n"


def test_an_ingest_whose_stderr_reader_has_gone_completes(cli: CLI) -> None:
    """`idstitch ingest big.ndjson 2>&1 | head`: the rejections cannot be shown, but every batch lands."""
    good = [{**msg(n % 60, anonymousId=f"a{n}"), "messageId": f"m{n}"} for n in range(100)]
    lines = [line for item in good for line in (json.dumps(item), "{broken")]
    path = cli.write("half-bad.ndjson", *lines)
    done = run_to_a_reader_gone(cli, "ingest", str(path), "--batch-size", "10", "--json", stream="stderr")
    assert done.returncode == 0
    summary = json.loads(done.stdout)
    assert (summary["accepted"], summary["rejected"]) == (100, 100)
    assert cli.json("stats", "--space", "default")["events"] == 100


@pytest.mark.parametrize("args", [["stats"], ["profile", "user_id:u_bob"], ["ingest", str(WALKTHROUGH)]])
def test_a_closed_stdout_is_no_crash(cli: CLI, args: list[str]) -> None:
    """A supervisor may start idstitch with stdout closed (`>&-`): the command still does its work."""
    cli.ok("ingest", str(WALKTHROUGH))
    done = cli.run_redirected(">&-", *args)
    assert (done.returncode, done.stderr) == (0, "")


def test_ingest_of_standard_input_when_it_is_closed_is_a_usage_error(cli: CLI) -> None:
    """`idstitch ingest - <&-` (a cron job or supervisor without stdin): before, a traceback and exit 1."""
    done = cli.run_redirected("<&-", "ingest", "-")
    assert (done.returncode, done.stderr) == (2, "error: -: standard input is closed\n")
    assert not (cli.directory / "t.db").exists()


@pytest.mark.parametrize("variable", ["FORCE_COLOR", "TTY_COMPATIBLE"])
def test_no_progress_bar_in_a_log_file_even_when_colour_is_forced(cli: CLI, variable: str) -> None:
    """CI sets FORCE_COLOR: rich then takes any file for a terminal, and redrew its bar into the log."""
    path = cli.write(
        "many.ndjson", *(msg(n % 60, anonymousId=f"a{n}", messageId=f"f{n}") for n in range(300))
    )
    done = cli.ok("ingest", str(path), "--batch-size", "10", env={variable: "1"})
    assert "\x1b" not in done.stderr and "\r" not in done.stderr, done.stderr[:300]


def test_stats_of_a_store_without_spaces_is_one_line(cli: CLI) -> None:
    open_store(cli.url).close()
    assert cli.ok("stats").stdout == "no spaces yet (run `idstitch ingest FILE`)\n"
    assert cli.json("stats") == []


def test_reading_an_empty_store_file_says_nothing_was_written_to_it(cli: CLI) -> None:
    """`touch x.db` or a wrong path: before, "open it once for writing to migrate it", as if it were old."""
    (cli.directory / "t.db").touch()
    done = cli.run("stats")
    assert done.returncode == 2
    assert done.stderr == (
        f"error: store {cli.url} holds no idstitch data yet (schema version 0): "
        "a wrong URL, or run `idstitch ingest FILE` on it first\n"
    )


def test_a_store_the_first_release_wrote_is_migrated_once_and_answers_as_a_fresh_one(cli: CLI) -> None:
    """tests/fixtures/store_schema1.sql: seven walkthrough messages as the first release stored them.
    Reading commands refuse it until a writer migrates it and name one that does and exits (before:
    `idstitch serve`, a server that keeps running); it keeps its data, its messages stay de-duplicated,
    and the rest of the walkthrough makes what a fresh store makes of the same messages, down to the
    first attachment of each identifier and the source of each trait (before: null for its rows)."""
    rows = (ROOT / "tests" / "fixtures" / "store_schema1.sql").read_text()
    with closing(sqlite3.connect(cli.directory / "t.db")) as db:
        db.execute(
            "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
        )
        db.executescript(read_migrations("sqlite")[0][2])
        db.executescript(rows)
    latest = read_migrations("sqlite")[-1][0]
    for command in (["stats"], ["profile", "user_id:u_jane"], ["keys"]):
        refused = cli.run(*command)
        assert (refused.returncode, refused.stderr) == (
            2,
            f"error: store {cli.url} is at schema version 1, this build reads {latest}: run `idstitch "
            "migrate` on it (or any command that writes) to migrate it\n",
        )
    migrated = cli.ok("migrate")
    assert migrated.stdout == f"store {cli.url} migrated from schema version 1 to {latest}\n"
    assert cli.ok("migrate").stdout == (
        f"store {cli.url} is at schema version {latest}, this build's: nothing to migrate\n"
    )
    stats = cli.json("stats")[0]
    assert (stats["profiles"], stats["accounts"], stats["events"], stats["suspect"]) == (4, 1, 7, 1)
    old = [
        line for line in WALKTHROUGH.read_text().splitlines() if json.loads(line)["messageId"] in _FIRST_SEVEN
    ]
    again = cli.json("ingest", str(cli.write("again.ndjson", *old)))
    assert (again["accepted"], again["duplicates"]) == (0, 7)
    cli.ok("ingest", str(WALKTHROUGH))
    fresh = CLI(cli.directory / "fresh")
    fresh.directory.mkdir()
    fresh.ok("ingest", str(cli.directory / "again.ndjson"))
    fresh.ok("ingest", str(WALKTHROUGH))
    migrated, made = open_store(cli.url, read_only=True), open_store(fresh.url, read_only=True)
    try:
        assert migrated.dump("default") == made.dump("default")
        # What the first release never recorded, read back from its events: the message and source that
        # first attached each identifier (Profile API external_ids, graph), the source of each trait.
        for row in made.dump("default")["profiles"]:
            root = row[0]
            assert migrated.identifiers("default", root) == made.identifiers("default", root)
            assert [(item.key, item.source) for item in migrated.trait_records("default", root)] == [
                (item.key, item.source) for item in made.trait_records("default", root)
            ]
    finally:
        migrated.close()
        made.close()


def test_migrate_on_a_new_store_creates_it_and_on_a_memory_store_says_there_is_nothing_to_migrate(
    cli: CLI,
) -> None:
    latest = read_migrations("sqlite")[-1][0]
    assert cli.ok("migrate").stdout == f"store {cli.url} created at schema version {latest}\n"
    assert cli.json("stats") == []  # made the schema and nothing else: no space, no source, no key
    for url in ("memory://", "sqlite:///:memory:"):
        refused = cli.run("migrate", "--store", url)
        assert (refused.returncode, refused.stdout, refused.stderr) == (
            2,
            "",
            f"error: store {url} lives in this process only: it has no schema to migrate\n",
        )


_FIRST_SEVEN = {"wt-01", "wt-04", "wt-05", "wt-09", "wt-11", "wt-16", "wt-17"}
