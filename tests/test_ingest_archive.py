"""`idstitch ingest DIR`: a tree of Segment (or RudderStack) archive files, as their S3 / GCS destinations write
it, replayed in time order into the graph its messages would have built live.

Segment's layout: `segment-logs/<source-id>/<received-day>/<file>.gz`, the day a UTC midnight in epoch
milliseconds, each file gzipped NDJSON of processed messages (`messageId`, `receivedAt`, `sentAt`,
`originalTimestamp`, `timestamp`, `projectId`, …). RudderStack's: `rudder-logs/<source-id>/<YYYY-MM-DD or
MM-DD-YYYY>/<unix-seconds>.<source-id>.<uuid>.json.gz`.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from helpers import clean_env, committed_events, kill_when
from idstitch.core.messages import Message, parse_message
from idstitch.ingest.files import read_items
from idstitch.storage.urls import open_store

DAY_1 = datetime(2026, 3, 1, tzinfo=UTC)
DAY_2 = DAY_1 + timedelta(days=1)


def ms(moment: datetime) -> str:
    """Segment's name of a received-day folder: the UTC midnight in epoch milliseconds."""
    return str(int(moment.timestamp() * 1000))


def iso(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def archived(
    n: int,
    kind: str,
    received: datetime,
    *,
    skew: timedelta = timedelta(0),
    segment_timestamp: bool = True,
    source: str = "WEBsrc0001",
    **fields: Any,
) -> dict[str, Any]:
    """A message as Segment archives it: the client's clock is `skew` off, Segment corrected it."""
    sent = received - timedelta(milliseconds=120) + skew  # the client sent it 120 ms before receipt
    original = sent - timedelta(milliseconds=80)
    message: dict[str, Any] = {
        "type": kind,
        "messageId": f"ajs-{n:04d}",
        "projectId": source,
        "channel": "client",
        "version": 2,
        "originalTimestamp": iso(original),
        "sentAt": iso(sent),
        "receivedAt": iso(received),
        "context": {"library": {"name": "analytics.js", "version": "3.8.2"}},
        **fields,
    }
    if segment_timestamp:
        message["timestamp"] = iso(received - (sent - original))
    if kind == "track":
        message.setdefault("event", "Opened")
    return message


def write_gz(path: Path, *lines: dict[str, Any] | bytes, mtime: float | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    body = b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )
    path.write_bytes(gzip.compress(body))
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return path


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = clean_env()
    done = subprocess.run(
        [sys.executable, "-m", "idstitch", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def ok(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    done = run(*args, cwd=cwd)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done


def dump(database: Path) -> dict[str, Any]:
    store = open_store(f"sqlite:///{database}")
    try:
        return store.dump("default")
    finally:
        store.close()


# The story: on day 1 a visitor browses the web site (w1), opens the iOS app on a phone whose clock is an hour
# ahead and logs in there (i1, u1), then logs in on the web too: two profiles, the web one older, merge. On day 2
# Alice and then Bob log in on a shared kiosk, and later anonymous browsing on it lands on Bob.
WEB, IOS = "WEBsrc0001", "IOSsrc0002"
EARLY = DAY_1 + timedelta(hours=10)
STORY = [
    archived(1, "page", EARLY, skew=-timedelta(minutes=5), segment_timestamp=False, anonymousId="w1"),
    archived(
        2,
        "identify",
        EARLY + timedelta(minutes=30),
        skew=timedelta(hours=1),
        source=IOS,
        userId="u1",
        anonymousId="i1",
        traits={"plan": "free"},
    ),
    archived(
        3,
        "identify",
        EARLY + timedelta(minutes=50),
        userId="u1",
        anonymousId="w1",
        traits={"email": "a@x.io", "plan": "pro"},
    ),
    archived(
        4, "track", EARLY + timedelta(minutes=70), skew=timedelta(hours=1), source=IOS, anonymousId="i1"
    ),
    archived(5, "identify", DAY_2 + timedelta(hours=11), userId="alice", anonymousId="kiosk"),
    archived(6, "identify", DAY_2 + timedelta(hours=12), source=IOS, userId="bob", anonymousId="kiosk"),
    archived(7, "page", DAY_2 + timedelta(hours=13), anonymousId="kiosk"),
    archived(8, "group", DAY_2 + timedelta(hours=14), userId="bob", groupId="acme", traits={"name": "Acme"}),
]
LATE = archived(9, "track", DAY_2 + timedelta(days=1, hours=9), userId="alice")


def build_archive(root: Path) -> dict[str, Path]:
    """Segment's tree, written out of time order (day 2 first, the later file of a day first), file times
    scrambled, beside Segment's validation file and a hidden file. The names of the files within a day say
    nothing of their time (they do not, in general: Segment documents only `filename.gz`)."""
    logs = root / "segment-logs"
    day_1, day_2 = ms(DAY_1), ms(DAY_2)
    files = {}
    # day 2 first; its iOS file sits one folder deeper (a re-delivery folder), and its web file is plain
    # NDJSON named .gz, as `aws s3 cp` leaves an object S3 decompressed on the way (Content-Encoding: gzip).
    files["ios-2"] = write_gz(logs / IOS / day_2 / "retry" / "b.gz", STORY[5], mtime=1_000_000_000)
    web_2 = logs / WEB / day_2 / "a.gz"
    web_2.parent.mkdir(parents=True)
    web_2.write_bytes(b"".join(json.dumps(m).encode() + b"\n" for m in (STORY[4], STORY[6], STORY[7])))
    files["web-2"] = web_2
    # day 1: the web file holds the earliest and a later message, the iOS one what came between; the web
    # file also holds a broken line, and the iOS file is gzipped twice (a .gz uploaded with Content-Encoding).
    files["ios-1"] = logs / IOS / day_1 / "a.gz"
    files["ios-1"].parent.mkdir(parents=True)
    files["ios-1"].write_bytes(
        gzip.compress(gzip.compress(b"".join(json.dumps(m).encode() + b"\n" for m in (STORY[1], STORY[3]))))
    )
    files["web-1"] = write_gz(
        logs / WEB / day_1 / "z.gz", STORY[0], STORY[2], b'{"type": "track", "event": ', mtime=4_000_000_000
    )
    (logs / "dummy-object.txt").write_text("Segment's destination check\n")
    (logs / WEB / day_1 / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    return files


def test_a_segment_archive_tree_gives_the_graph_of_its_messages_in_time_order(tmp_path: Path) -> None:
    files = build_archive(tmp_path)
    late = tmp_path / "late.ndjson"
    late.write_text(json.dumps(LATE) + "\n")
    done = ok("ingest", "segment-logs", str(late), "--json", "--store", "sqlite:///archive.db", cwd=tmp_path)
    summary = json.loads(done.stdout)
    assert summary["files"] == 5 and summary["skipped_files"] == 2
    assert (summary["accepted"], summary["rejected"], summary["merges"]) == (9, 1, 1)
    # Each rejection names its file by the path the walk found it at, and its line.
    bad = os.path.join("segment-logs", WEB, ms(DAY_1), "z.gz")
    assert f"{bad}:3: invalid JSON" in done.stderr
    assert files["web-1"].samefile(tmp_path / bad)
    skipped = [line for line in done.stderr.splitlines() if "skipped" in line]
    assert skipped == [
        "segment-logs: 4 files to read; skipped 2 files: 1 hidden, 1 not named as a data file "
        "(.gz, .json, .ndjson, .jsonl, .ldjson): segment-logs/dummy-object.txt"
    ], done.stderr

    # The reference: the same messages as one NDJSON file, in the order Segment received them.
    reference = tmp_path / "history.ndjson"
    ordered = sorted([*STORY, LATE], key=lambda message: str(message["receivedAt"]))
    reference.write_text("".join(json.dumps(message) + "\n" for message in ordered))
    ok("ingest", str(reference), "--store", "sqlite:///reference.db", cwd=tmp_path)
    assert dump(tmp_path / "archive.db") == dump(tmp_path / "reference.db")
    for identifier in ("anonymous_id:w1", "user_id:u1", "anonymous_id:i1", "user_id:alice", "user_id:bob"):
        profiles = [
            json.loads(ok("profile", identifier, "--json", "--store", f"sqlite:///{db}", cwd=tmp_path).stdout)
            for db in ("archive.db", "reference.db")
        ]
        assert profiles[0] == profiles[1], identifier
    web = json.loads(
        ok("profile", "user_id:u1", "--json", "--store", "sqlite:///archive.db", cwd=tmp_path).stdout
    )
    # Replayed in time order across the two sources: the web profile is older and the iOS one merged into it.
    assert len(web["merged_segment_ids"]) == 1 and web["event_count"] == 4
    assert web["traits"]["plan"] == "pro"
    bob = json.loads(
        ok("profile", "user_id:bob", "--json", "--store", "sqlite:///archive.db", cwd=tmp_path).stdout
    )
    assert bob["event_count"] == 3  # the kiosk's later anonymous page view landed on Bob, who logged in last

    # Re-running changes nothing.
    again = json.loads(
        ok(
            "ingest", "segment-logs", str(late), "--json", "--store", "sqlite:///archive.db", cwd=tmp_path
        ).stdout
    )
    assert (again["accepted"], again["duplicates"], again["rejected"]) == (0, 9, 1)
    assert dump(tmp_path / "archive.db") == dump(tmp_path / "reference.db")


def test_archived_times_come_out_as_they_did_live(tmp_path: Path) -> None:
    # The phone's clock was an hour ahead: Segment kept its originalTimestamp and sentAt, stamped its own
    # receivedAt and corrected the time. The web client's clock was 5 minutes behind and the line lost
    # Segment's `timestamp` (an export that keeps only the client's times and the receipt).
    files = build_archive(tmp_path)
    ok("ingest", "segment-logs", "--store", "sqlite:///archive.db", cwd=tmp_path)
    seen = {}
    for identifier in ("anonymous_id:i1", "anonymous_id:w1"):
        profile = json.loads(
            ok("profile", identifier, "--json", "--store", "sqlite:///archive.db", cwd=tmp_path).stdout
        )
        seen.update({item["value"]: item["first_seen"] for item in profile["identifiers"]})
    # receivedAt − (sentAt − originalTimestamp): 80 ms before receipt, not at 09:54:59 on the web client's clock
    assert seen["w1"] == "2026-03-01T09:59:59.920Z"
    assert seen["i1"] == "2026-03-01T10:29:59.920Z"  # not 11:29:59 on the phone's clock
    # What the live endpoint makes of the phone's call, received at the same moment, is the archived time.
    phone = STORY[1]
    live = parse_message(
        {
            key: value
            for key, value in {**phone, "timestamp": phone["originalTimestamp"]}.items()
            if key not in ("originalTimestamp", "receivedAt", "projectId")
        },
        received_at=datetime.fromisoformat(phone["receivedAt"]),
        delivery="request-1",
    )
    archive_items = [
        item for _, item in read_items(files["ios-1"], received_at=DAY_2) if isinstance(item, Message)
    ]
    assert archive_items[0].timestamp == live.timestamp == EARLY + timedelta(minutes=30, milliseconds=-80)
    assert archive_items[0].received_at == live.received_at


def test_a_directory_without_data_files_is_a_usage_error_and_writes_nothing(tmp_path: Path) -> None:
    empty = tmp_path / "segment-logs"
    (empty / "abc").mkdir(parents=True)
    (empty / "dummy-object.txt").write_text("x")
    done = run("ingest", "segment-logs", "--store", "sqlite:///t.db", cwd=tmp_path)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stderr == (
        "error: segment-logs: no data file in it (.gz, .json, .ndjson, .jsonl, .ldjson); skipped 1 file: "
        "1 not named as a data file (.gz, .json, .ndjson, .jsonl, .ldjson): segment-logs/dummy-object.txt\n"
    )
    assert not (tmp_path / "t.db").exists()


@pytest.mark.parametrize("named_by_time", [True, False])
def test_rudderstack_day_folders_are_replayed_in_date_order_whatever_their_spelling(
    tmp_path: Path, named_by_time: bool
) -> None:
    # RudderStack's older MM-DD-YYYY folders sort 01-02-2027 before 12-31-2026 by name; its files are named
    # <unix-seconds>.<source-id>.<uuid>.json.gz, and the folder alone must do when a name says nothing.
    logs = tmp_path / "rudder-logs" / "src1"
    new_year = datetime(2027, 1, 2, 9, tzinfo=UTC)
    before = archived(1, "identify", new_year - timedelta(days=2), userId="u1", anonymousId="d1")
    after = archived(2, "identify", new_year, userId="u2", anonymousId="d1")
    seconds = int(new_year.timestamp())
    write_gz(logs / "01-02-2027" / (f"{seconds}.src1.b4f1.json.gz" if named_by_time else "a.json.gz"), after)
    write_gz(
        logs / "12-31-2026" / (f"{seconds - 172800}.src1.0a9e.json.gz" if named_by_time else "b.json.gz"),
        before,
    )
    ok("ingest", "rudder-logs", "--store", "sqlite:///t.db", cwd=tmp_path)
    # In time order, u1 logged in on device d1 first: d1 stays on u1's profile and u2 gets its own.
    first = json.loads(
        ok("profile", "user_id:u1", "--json", "--store", "sqlite:///t.db", cwd=tmp_path).stdout
    )
    assert {item["value"] for item in first["identifiers"]} == {"u1", "d1"}


# -- kill -9 mid-run -------------------------------------------------------------------------------------------


def big_archive(root: Path, days: int, per_file: int) -> int:
    """Two sources, two files a day each, people moving between web and app and logging in."""
    count = 0
    for day in range(days):
        midnight = DAY_1 + timedelta(days=day)
        for source in (WEB, IOS):
            for part in range(2):
                lines = []
                for k in range(per_file):
                    count += 1
                    received = midnight + timedelta(seconds=20 * (2 * k + part) + (7 if source == IOS else 0))
                    person = (count * 7919) % 400
                    device = f"{source[:3]}-{person}-{day % 3}"
                    if count % 6 == 0:
                        message = archived(
                            count,
                            "identify",
                            received,
                            source=source,
                            userId=f"u{person}",
                            anonymousId=device,
                        )
                    else:
                        message = archived(count, "page", received, source=source, anonymousId=device)
                    message["messageId"] = f"m{count}"
                    lines.append(message)
                write_gz(root / "segment-logs" / source / ms(midnight) / f"part-{1 - part}.gz", *lines)
    return count


def test_kill_9_mid_archive_then_rerun_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    total = big_archive(tmp_path, days=12, per_file=400)
    command = ["ingest", "segment-logs", "--batch-size", "100", "--quiet", "--json"]
    env = clean_env()
    crashed = tmp_path / "crashed.db"
    victim = subprocess.Popen(
        [sys.executable, "-m", "idstitch", *command, "--store", f"sqlite:///{crashed}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    kill_when(lambda: committed_events(crashed) >= 2000, "2,000 committed events", victim)
    assert 2000 <= committed_events(crashed) < total, "the kill must land mid-run"
    resumed = json.loads(ok(*command, "--store", f"sqlite:///{crashed}", cwd=tmp_path).stdout)
    assert resumed["duplicates"] >= 2000 and resumed["rejected"] == 0
    reference = json.loads(ok(*command, "--store", "sqlite:///reference.db", cwd=tmp_path).stdout)
    assert reference["accepted"] == total
    assert dump(crashed) == dump(tmp_path / "reference.db")


def test_same_named_files_of_two_days_are_two_sources_of_timeless_messages(tmp_path: Path) -> None:
    # A hand-made export tree: no messageId, no time, the same file name every day. The ids derived for such
    # messages name the file by its path in the tree, not its base name: the second day's identical page
    # view is an event of its own, and a re-run still stores nothing twice.
    page = {"type": "page", "name": "Home", "anonymousId": "a1"}
    for day in ("2026-03-01", "2026-03-02"):
        folder = tmp_path / "exports" / day
        folder.mkdir(parents=True)
        (folder / "events.json").write_text(json.dumps(page) + "\n")
    first = json.loads(ok("ingest", "exports", "--json", "--store", "sqlite:///t.db", cwd=tmp_path).stdout)
    assert (first["accepted"], first["duplicates"]) == (2, 0)
    again = json.loads(ok("ingest", "exports", "--json", "--store", "sqlite:///t.db", cwd=tmp_path).stdout)
    assert (again["accepted"], again["duplicates"]) == (0, 2)


def test_an_archived_time_after_its_receipt_is_capped_at_the_receipt_as_live(tmp_path: Path) -> None:
    # A server whose clock ran an hour ahead, its library sending no sentAt: nothing to correct with, and
    # Segment archived its time as it came. Live, idstitch dates a call no later than it reached the server
    # (a future time would outrank every later trait); replayed from the archive, the same.
    received = EARLY
    ahead = iso(received + timedelta(hours=1))
    line = {
        "type": "identify",
        "messageId": "srv-1",
        "userId": "u9",
        "traits": {"plan": "gold"},
        "originalTimestamp": ahead,
        "timestamp": ahead,
        "receivedAt": iso(received),
    }
    write_gz(tmp_path / "segment-logs" / "SRVsrc0003" / ms(DAY_1) / "a.gz", line)
    ok("ingest", "segment-logs", "--store", "sqlite:///t.db", cwd=tmp_path)
    profile = json.loads(
        ok("profile", "user_id:u9", "--json", "--store", "sqlite:///t.db", cwd=tmp_path).stdout
    )
    assert [item["first_seen"] for item in profile["identifiers"]] == [iso(received)]
    live = parse_message(
        {key: value for key, value in line.items() if key not in ("originalTimestamp", "receivedAt")},
        received_at=received,
        delivery="request-1",
    )
    assert live.timestamp == received


def test_a_file_name_that_is_not_utf8_is_read_and_named_by_its_bytes(tmp_path: Path) -> None:
    # Archives copied from other systems hold names in Latin-1 (`café` as the byte 0xE9). A message without
    # messageId or time in such a file took its id from the name, which could not be encoded: a traceback,
    # exit 1. Now the name's bytes stand in (undecodable ones written `\xe9`), in the rejections too.
    day = tmp_path / "exports" / "2026-03-01"
    day.mkdir(parents=True)
    name = os.fsdecode(b"caf\xe9.json")
    (day / name).write_text(json.dumps({"type": "page", "name": "Home", "anonymousId": "a1"}) + "\n{bad\n")
    loose = tmp_path / os.fsdecode(b"loose-\xe9.ndjson")
    loose.write_text(json.dumps({"type": "page", "name": "Home", "anonymousId": "a2"}) + "\n")
    command = ("ingest", "exports", str(loose.name), "--json", "--store", "sqlite:///t.db")
    first = run(*command, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    assert (json.loads(first.stdout)["accepted"], json.loads(first.stdout)["rejected"]) == (2, 1)
    assert os.path.join("exports", "2026-03-01", "caf\\xe9.json") + ":2: invalid JSON" in first.stderr
    again = json.loads(ok(*command, cwd=tmp_path).stdout)
    assert (again["accepted"], again["duplicates"]) == (0, 2)


def test_entries_named_as_data_files_but_not_files_are_skipped_as_such(tmp_path: Path) -> None:
    # A dangling link, a link loop and a pipe named `.gz` were said to be "not named as a data file".
    day = tmp_path / "segment-logs" / WEB / ms(DAY_1)
    write_gz(day / "a.gz", STORY[0])
    (day / "gone.gz").symlink_to("nowhere.gz")
    (day / "loop.gz").symlink_to("loop.gz")
    os.mkfifo(day / "pipe.gz")
    (tmp_path / "segment-logs" / "dummy-object.txt").write_text("x")
    done = ok("ingest", "segment-logs", "--json", "--store", "sqlite:///t.db", cwd=tmp_path)
    assert json.loads(done.stdout)["skipped_files"] == 4
    assert (
        "segment-logs: 1 file to read; skipped 4 files: 1 not named as a data file (.gz, .json, .ndjson, "
        ".jsonl, .ldjson): segment-logs/dummy-object.txt, 3 not regular files (a link to a folder, a dangling "
        f"or looping link, a pipe or a socket): {os.path.join('segment-logs', WEB, ms(DAY_1), 'gone.gz')}, …"
    ) in done.stderr.splitlines(), done.stderr


def test_a_file_that_cannot_be_opened_mid_run_stops_with_what_was_kept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Day 2's file vanished (an `aws s3 sync --delete` running beside the backfill) after day 1 was
    # committed. That was exit 2, "a usage error: nothing written", and no word of resuming.
    from typer.testing import CliRunner

    import idstitch.ingest.files as files
    from idstitch.cli import app

    logs = tmp_path / "segment-logs"
    write_gz(logs / WEB / ms(DAY_1) / "a.gz", STORY[0], STORY[2])
    vanishing = write_gz(logs / WEB / ms(DAY_2) / "a.gz", STORY[4])

    def open_file(path: Any, *args: Any, **kwargs: Any) -> Any:
        if Path(path).absolute() == vanishing:
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return open(path, *args, **kwargs)

    monkeypatch.setattr(files, "open", open_file, raising=False)
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(
        app, ["ingest", "segment-logs", "--batch-size", "1", "--store", "sqlite:///t.db"]
    )
    assert result.exit_code == 1, result.output
    assert (
        f"error: {os.path.join('segment-logs', WEB, ms(DAY_2), 'a.gz')}: cannot be read (No such file or "
        "directory); 2 batches (2 messages) committed and kept: run the same command again to resume (stored "
        "messages are skipped)"
    ) in result.output.replace("\n", " ")
    assert committed_events(tmp_path / "t.db") == 2


def test_a_day_of_more_files_than_the_open_file_limit_is_still_merged_in_received_order(
    tmp_path: Path,
) -> None:
    # A busy archive has a day of hundreds of files (several sources, a file per 100 MB or per hour), and a
    # hard limit of open files (`ulimit -Hn`) is often 1024 or 4096, which an unprivileged user cannot raise.
    # That day was refused ("over this process's limit of open files"), and the way out the error offered,
    # one source folder at a time, replays the sources one after the other: another graph. Now the files of
    # such a day take turns at the descriptors there are; the graph is the one the messages give in order.
    people = 40
    messages = []
    for n in range(300):
        source = (WEB, IOS, "SRVsrc0003")[n % 3]
        person = (n * 7) % people
        received = EARLY + timedelta(seconds=n)
        fields: dict[str, Any] = {"anonymousId": f"{source[:3]}-{person}"}
        if n % 4 == 0:
            fields["userId"] = f"u{person % 25}"
        message = archived(n, "identify" if "userId" in fields else "page", received, source=source, **fields)
        messages.append(message)
    # 150 files in one day, each holding two messages received far apart: no file can be read to its end
    # before the others are started.
    for index in range(150):
        first, second = messages[index], messages[index + 150]
        source = str(first["projectId"])
        write_gz(tmp_path / "segment-logs" / source / ms(DAY_1) / f"f{index:03d}.gz", first, second)
    reference = tmp_path / "history.ndjson"
    reference.write_text("".join(json.dumps(message) + "\n" for message in messages))
    ok("ingest", str(reference), "--store", "sqlite:///reference.db", cwd=tmp_path)

    def limited() -> None:
        import resource

        resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))

    env = clean_env()
    done = subprocess.run(
        [sys.executable, "-m", "idstitch", "ingest", "segment-logs", "--json", "--store", "sqlite:///t.db"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=300,
        preexec_fn=limited,
    )
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["accepted"] == 300
    assert dump(tmp_path / "t.db") == dump(tmp_path / "reference.db")


def test_a_soft_limit_that_cannot_be_raised_to_unlimited_leaves_the_files_taking_turns(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # macOS reports an unlimited hard limit of open files but refuses a soft one past kern.maxfilesperproc
    # (setrlimit: EINVAL, in Python a ValueError). A day of more files than that was a traceback.
    import resource

    from idstitch import cli

    def refuse(which: int, limits: tuple[int, int]) -> None:
        raise ValueError("current limit exceeds maximum limit")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (256, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", refuse)
    assert cli._allow_open_files(100) is None  # within the soft limit: nothing to raise
    allowed = cli._allow_open_files(30_000)
    assert allowed is not None and 1 <= allowed <= 256 - 32


def test_a_sub_folder_that_cannot_be_read_is_refused_before_anything_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Root reads every folder, so the refusal of one (EACCES) is played by os.scandir, which os.walk uses.
    from idstitch.ingest.archive import ArchiveError, scan_directory

    write_gz(tmp_path / "segment-logs" / WEB / ms(DAY_1) / "a.gz", STORY[0])
    locked = tmp_path / "segment-logs" / IOS
    locked.mkdir()
    real_scandir = os.scandir

    def scandir(path: Any = ".") -> Any:
        if Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.raises(ArchiveError) as refused:
        scan_directory(str(tmp_path / "segment-logs"))
    assert str(refused.value) == f"{locked}: cannot be read (Permission denied)"


def test_empty_truncated_and_not_gzip_files_of_a_day_leave_the_others_merged(tmp_path: Path) -> None:
    # Interrupted downloads: an empty .gz, a .gz cut short, an HTML error page saved as .gz, beside good files.
    day = tmp_path / "segment-logs" / WEB / ms(DAY_1)
    write_gz(day / "a.gz", STORY[0], STORY[2])
    write_gz(tmp_path / "segment-logs" / IOS / ms(DAY_1) / "a.gz", STORY[1], STORY[3])
    (day / "empty.gz").write_bytes(b"")
    whole = gzip.compress(
        b"".join(
            json.dumps(archived(50 + n, "page", EARLY, anonymousId=f"t{n}")).encode() + b"\n"
            for n in range(400)
        )
    )
    (day / "cut.gz").write_bytes(whole[: len(whole) // 2])
    (day / "error.gz").write_bytes(b"<html><body>403 Forbidden</body></html>\n")
    done = ok("ingest", "segment-logs", "--json", "--store", "sqlite:///t.db", cwd=tmp_path)
    summary = json.loads(done.stdout)
    assert summary["files"] == 5
    cut = os.path.join("segment-logs", WEB, ms(DAY_1), "cut.gz")
    errors = [line for line in done.stderr.splitlines() if line.startswith("segment-logs/")]
    assert (
        errors[-1]
        == f"{cut}: gzip data ends before the end of the compressed stream (truncated file?); the rest of the file is skipped"
    )
    assert any(
        line.startswith(os.path.join("segment-logs", WEB, ms(DAY_1), "error.gz") + ":1: invalid JSON")
        for line in errors
    )
    web = json.loads(ok("profile", "user_id:u1", "--json", "--store", "sqlite:///t.db", cwd=tmp_path).stdout)
    assert web["event_count"] == 4 and len(web["merged_segment_ids"]) == 1
    again = json.loads(
        ok("ingest", "segment-logs", "--json", "--store", "sqlite:///t.db", cwd=tmp_path).stdout
    )
    assert again["accepted"] == 0 and again["rejected"] == summary["rejected"]
