"""The batch-file readers: every format, gzip, stdin, locations, bad lines, oversize messages."""

from __future__ import annotations

import gzip
import io
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

import idstitch.ingest.files as files_module
from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import MAX_MESSAGE_BYTES, Message
from idstitch.ingest.files import InputFile, batched, read_batches, read_items

RECEIVED = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


def message(n: int, **extra: object) -> dict[str, object]:
    return {
        "type": "track",
        "event": "Viewed",
        "anonymousId": f"anon_{n}",
        "messageId": f"m{n}",
        "timestamp": "2026-03-01T10:00:00.000Z",
        **extra,
    }


def items(path: Path | str, **kwargs: object) -> list[tuple[str, Message | InvalidEvent]]:
    return list(read_items(path, received_at=RECEIVED, **kwargs))  # type: ignore[arg-type]


def summary(found: list[tuple[str, Message | InvalidEvent]]) -> list[tuple[str, str]]:
    """(location, message id or error text) pairs."""
    return [(where, item.message_id if isinstance(item, Message) else f"! {item}") for where, item in found]


def ndjson(*lines: object) -> bytes:
    return b"".join(
        (line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n" for line in lines
    )


def test_ndjson_lines_with_locations_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "events.ndjson"
    path.write_bytes(ndjson(message(1), b"", b"   ", message(2)) + json.dumps(message(3)).encode())
    assert summary(items(path)) == [
        (f"{path}:1", "m1"),
        (f"{path}:4", "m2"),
        (f"{path}:5", "m3"),  # last line without a newline
    ]


def test_invalid_json_and_invalid_messages_are_located_and_the_rest_is_read(tmp_path: Path) -> None:
    path = tmp_path / "mixed.ndjson"
    path.write_bytes(ndjson(message(1), b'{"type": "track", "event": ', [1, 2], {"type": "nope"}, message(5)))
    found = summary(items(path))
    assert found[0] == (f"{path}:1", "m1")
    assert found[1][0] == f"{path}:2" and found[1][1].startswith("! invalid JSON")
    assert found[2] == (f"{path}:3", "! message must be a JSON object")
    assert found[3][0] == f"{path}:4" and "type" in found[3][1]
    assert found[4] == (f"{path}:5", "m5")


def test_oversize_message_names_the_32_kb_limit(tmp_path: Path) -> None:
    path = tmp_path / "big.ndjson"
    big = message(2, properties={"blob": "x" * (40 * 1024)})
    broken_big = b'{"type": "track", "blob": "' + b"y" * (40 * 1024)
    path.write_bytes(ndjson(message(1), big, broken_big, message(4)))
    found = items(path)
    assert [where for where, _ in found] == [f"{path}:{n}" for n in (1, 2, 3, 4)]
    for _, item in found[1:3]:
        assert isinstance(item, InvalidEvent)
        assert "32 KB" in str(item) and "limit" in str(item)
    assert isinstance(found[3][1], Message)


def test_message_just_under_the_limit_is_accepted(tmp_path: Path) -> None:
    base = json.dumps(message(1, properties={"blob": ""}), separators=(",", ":"))
    body = json.dumps(
        message(1, properties={"blob": "x" * (MAX_MESSAGE_BYTES - len(base))}), separators=(",", ":")
    )
    assert len(body) == MAX_MESSAGE_BYTES
    path = tmp_path / "edge.ndjson"
    path.write_text(body + "\n")
    assert summary(items(path)) == [(f"{path}:1", "m1")]


@pytest.mark.parametrize("layout", ["ndjson", "array", "envelope", "document"])
def test_the_size_limit_is_the_stored_messages_whatever_escapes_the_file_wrote(
    tmp_path: Path, layout: str
) -> None:
    # Python's json.dumps writes "汉" as \u6c49: 6 bytes for 3. 6,000 of them are 36 KB in the file and 18 KB
    # stored; the same message was accepted in an envelope or a pretty-printed document but rejected as an
    # NDJSON line or an array element. 12,000 are 36 KB stored: over the limit in every layout alike.
    fits = message(1, properties={"text": "汉" * 6000})
    over = message(2, properties={"text": "汉" * 12000})
    assert len(json.dumps(fits).encode()) > MAX_MESSAGE_BYTES
    assert len(json.dumps(fits, ensure_ascii=False).encode()) < MAX_MESSAGE_BYTES
    stored = len(json.dumps(over, ensure_ascii=False, separators=(",", ":")).encode())
    if layout == "ndjson":
        text = ndjson(fits, over)
    elif layout == "array":
        text = json.dumps([fits, over]).encode()
    elif layout == "envelope":
        text = json.dumps({"batch": [fits, over]}).encode()
    else:
        text = (json.dumps(fits, indent=2) + "\n" + json.dumps(over, indent=2)).encode()
    path = tmp_path / "escaped.json"
    path.write_bytes(text)
    found = [text for _, text in summary(items(path))]
    assert found == ["m1", f"! message is {stored} bytes, over the 32 KB per-message limit"]


def test_json_array_pretty_printed_is_read_element_by_element(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    tricky = message(2, properties={"text": 'brackets ] } [ { and "quotes", commas \\ too'})
    text = json.dumps([message(1), tricky, {"type": "nope"}, 7, message(5)], indent=2)
    path.write_text(text)
    starts = [n for n, line in enumerate(text.split("\n"), 1) if line.startswith(("  {", "  7"))]
    found = summary(items(path))
    assert [where.rsplit(":", 1)[1] for where, _ in found] == [f"{n}[{i}]" for i, n in enumerate(starts)]
    assert [text for _, text in found][:2] == ["m1", "m2"]
    assert found[2][1].startswith("! type")
    assert found[3][1] == "! message must be a JSON object"
    assert found[4][1] == "m5"
    [(_, parsed)] = [entry for entry in items(path) if entry[0].endswith("[1]")]
    assert isinstance(parsed, Message)
    assert parsed.properties["text"] == tricky["properties"]["text"]  # type: ignore[index]


def test_json_array_with_a_broken_element_and_an_oversize_one(tmp_path: Path) -> None:
    path = tmp_path / "events.json"
    big = json.dumps(message(3, properties={"blob": "z" * (40 * 1024)}))
    path.write_text(f'[{json.dumps(message(1))},\n{{"type": }},\n{big},\n{json.dumps(message(4))}]\n')
    found = summary(items(path))
    assert found[0] == (f"{path}:1[0]", "m1")
    assert found[1][0] == f"{path}:2[1]" and found[1][1].startswith("! invalid JSON")
    assert found[2][0] == f"{path}:3[2]" and "32 KB" in found[2][1]
    assert found[3] == (f"{path}:4[3]", "m4")


def test_unclosed_array_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "cut.json"
    path.write_text(f"[{json.dumps(message(1))},\n")
    found = summary(items(path))
    assert found[0] == (f"{path}:1[0]", "m1")
    assert "not closed" in found[-1][1]


def test_batch_envelopes_one_per_line_apply_the_batch_context(tmp_path: Path) -> None:
    path = tmp_path / "archive.ndjson"
    envelope = {
        "batch": [message(1), {"type": "track"}, message(3)],
        "context": {"library": {"name": "analytics-node"}},
        "sentAt": "2026-03-01T10:00:05.000Z",
        "writeKey": "wk_secret",
    }
    path.write_bytes(ndjson(message(0), envelope))
    found = items(path)
    assert [where for where, _ in found] == [f"{path}:1", f"{path}:2[0]", f"{path}:2[1]", f"{path}:2[2]"]
    first = found[1][1]
    assert isinstance(first, Message)
    assert first.context["library"] == {"name": "analytics-node"}
    assert "writeKey" not in first.payload
    assert isinstance(found[2][1], InvalidEvent) and "event" in str(found[2][1])


def test_a_whole_file_envelope_pretty_printed(tmp_path: Path) -> None:
    path = tmp_path / "batch.json"
    path.write_text(json.dumps({"batch": [message(1), message(2)], "context": {"ip": "10.0.0.1"}}, indent=2))
    found = items(path)
    assert summary(found) == [(f"{path}:1[0]", "m1"), (f"{path}:1[1]", "m2")]
    assert isinstance(found[0][1], Message) and found[0][1].context["ip"] == "10.0.0.1"


def test_a_pretty_printed_envelope_with_a_syntax_error_is_one_error_and_lands_nothing(tmp_path: Path) -> None:
    # One comma missing between two elements. Read line by line, the last element (a whole JSON object
    # on its own line) used to land without the envelope's context.
    path = tmp_path / "batch.json"
    first, second = json.dumps(message(1)), json.dumps(message(2))
    path.write_text(
        f'{{\n  "context": {{"ip": "10.0.0.1"}},\n  "batch": [\n    {first}\n    {second}\n  ]\n}}\n'
    )
    found = items(path)
    assert len(found) == 1
    where, error = found[0]
    assert where == f"{path}:1" and isinstance(error, InvalidEvent)
    assert str(error).startswith("invalid JSON: JSON is malformed: expected ',' or ']'")
    assert str(error).endswith("on line 5; nothing of this document was ingested")


def test_ndjson_whose_first_lines_are_broken_is_still_read_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "events.ndjson"
    path.write_bytes(b'{"type": "track", "anonymousId": "a1"\n' + b'{"type": \n' + ndjson(message(3)))
    assert [item for _, item in summary(items(path))][2:] == ["m3"]


def test_blank_lines_before_a_broken_first_line_leave_the_file_ndjson(tmp_path: Path) -> None:
    # The first line was cut after a comma (a crash mid-write); blank lines above it hid the good
    # line below it from the format check, and the whole file became one "document" error.
    path = tmp_path / "events.ndjson"
    path.write_bytes(b"\n\n" + b'{"type": "track", "anonymousId": "a1",\n' + ndjson(message(2), message(3)))
    found = summary(items(path))
    assert found[0][0] == f"{path}:3" and found[0][1].startswith("! invalid JSON")
    assert found[1:] == [(f"{path}:4", "m2"), (f"{path}:5", "m3")]


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32"])
def test_a_utf16_file_is_one_error_naming_its_encoding(tmp_path: Path, encoding: str) -> None:
    # Windows PowerShell writes UTF-16 by default; read as UTF-8, each of its lines used to be
    # rejected alone as "invalid character (byte 0)", which says nothing of the cause.
    path = tmp_path / "export.ndjson"
    path.write_bytes(ndjson(message(1), message(2)).decode().encode(encoding))
    found = summary(items(path))
    assert len(found) == 1 and found[0][0] == f"{path}:1"
    expected = "UTF-32" if encoding == "utf-32" else "UTF-16"
    assert found[0][1].startswith(f"! the file is {expected}, not UTF-8"), found


def test_a_single_pretty_printed_message(tmp_path: Path) -> None:
    path = tmp_path / "one.json"
    path.write_text("\n" + json.dumps(message(1), indent=2))
    assert summary(items(path)) == [(f"{path}:2", "m1")]


def test_pretty_printed_documents_one_after_another_are_each_read(tmp_path: Path) -> None:
    # What `jq . a.json b.json > all.json` writes; it used to be one "trailing characters" error, and
    # nothing of the file landed.
    path = tmp_path / "all.json"
    envelope = {"batch": [message(3), message(4)], "context": {"ip": "10.0.0.1"}}
    path.write_text(
        "\n".join(json.dumps(value, indent=2) for value in (message(1), message(2)))
        + "\n\n"
        + json.dumps(envelope, indent=2)
        + "\n"
    )
    found = items(path)
    lines = len(json.dumps(message(1), indent=2).splitlines())
    assert summary(found) == [
        (f"{path}:1", "m1"),
        (f"{path}:{lines + 1}", "m2"),
        (f"{path}:{2 * lines + 2}[0]", "m3"),  # after a blank line
        (f"{path}:{2 * lines + 2}[1]", "m4"),
    ]
    assert isinstance(found[2][1], Message) and found[2][1].context["ip"] == "10.0.0.1"


def test_what_cannot_be_read_after_good_documents_is_one_error_and_they_land(tmp_path: Path) -> None:
    path = tmp_path / "all.json"
    first = json.dumps(message(1), indent=2)
    path.write_text(first + "\n" + json.dumps(message(2), indent=2) + '\n{\n  "type": \n')
    found = summary(items(path))
    lines = len(first.splitlines())
    assert found[:2] == [(f"{path}:1", "m1"), (f"{path}:{lines + 1}", "m2")]
    assert found[2][0] == f"{path}:{2 * lines + 1}"
    assert found[2][1].startswith("! invalid JSON") and found[2][1].endswith("nothing from here on was read")
    assert len(found) == 3


@pytest.mark.parametrize("layout", ["arrays", "documents", "ndjson"])
def test_files_with_a_bom_each_concatenated_are_read_whole(tmp_path: Path, layout: str) -> None:
    # `cat a.json b.json` of files a Windows editor saved: a BOM starts the second one too. NDJSON lines
    # skipped it; arrays said "expected '['" and pretty-printed documents "another object was expected",
    # and nothing of the second file landed.
    bom = b"\xef\xbb\xbf"
    if layout == "arrays":
        parts = [json.dumps([message(n)], indent=2).encode() + b"\n" for n in (1, 2)]
    elif layout == "documents":
        parts = [json.dumps(message(n), indent=2).encode() + b"\n" for n in (1, 2)]
    else:
        parts = [ndjson(message(n)) for n in (1, 2)]
    path = tmp_path / "both.json"
    path.write_bytes(b"".join(bom + part for part in parts))
    found = summary(items(path))
    assert [text for _, text in found] == ["m1", "m2"], found
    second = len(parts[0].splitlines()) + (2 if layout == "arrays" else 1)  # an element is on the next line
    assert found[1][0].startswith(f"{path}:{second}"), found


def test_a_bom_split_across_the_array_readers_chunks_is_skipped(tmp_path: Path) -> None:
    first = json.dumps([message(1)]).encode() + b"\n"
    # Blank lines after the first file, so that the second one's BOM starts 2 bytes before a chunk ends.
    first += b"\n" * (files_module._CHUNK - 2 - len(first))
    path = tmp_path / "both.json"
    path.write_bytes(first + b"\xef\xbb\xbf" + json.dumps([message(2)]).encode())
    second = first.count(b"\n") + 1
    assert summary(items(path)) == [(f"{path}:1[0]", "m1"), (f"{path}:{second}[0]", "m2")]


def _nested(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


def test_ndjson_lines_nested_too_deep_are_each_an_error_not_a_crash(tmp_path: Path) -> None:
    # Two such lines first: neither "stands alone", so the file was tried as pretty-printed documents one
    # after another, and msgspec's RecursionError there crashed `idstitch ingest` with a traceback.
    path = tmp_path / "deep.ndjson"
    deep = [json.dumps(message(n, properties={"deep": "@"})).replace('"@"', _nested(995)) for n in (1, 2)]
    path.write_text("\n".join([*deep, json.dumps(message(3))]) + "\n")
    found = summary(items(path))
    assert [where for where, _ in found] == [f"{path}:{n}" for n in (1, 2, 3)]
    assert [text for _, text in found][:2] == [
        "! invalid JSON: nested deeper than the decoder goes (about 1,000 levels)"
    ] * 2
    assert found[2][1] == "m3"


def test_pretty_printed_documents_nested_too_deep_are_an_error_not_a_crash(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    deep = json.dumps(message(1, properties={"deep": "@"}), indent=2).replace('"@"', _nested(1200))
    path.write_text(deep + "\n" + deep + "\n")
    found = summary(items(path))
    assert found and all(text.startswith("! invalid JSON") for _, text in found), found


def test_an_envelope_over_the_http_batch_limit_is_read_in_slices(tmp_path: Path) -> None:
    path = tmp_path / "huge.ndjson"
    path.write_bytes(ndjson({"batch": [message(n) for n in range(2600)]}))
    found = items(path)
    assert len(found) == 2600
    assert found[-1][0] == f"{path}:1[2599]"
    assert all(isinstance(item, Message) for _, item in found)


@pytest.mark.parametrize("layout", ["ndjson", "array", "envelope"])
def test_gzip_is_detected_by_magic_bytes_not_the_name(tmp_path: Path, layout: str) -> None:
    messages = [message(n) for n in range(3)]
    if layout == "ndjson":
        raw = ndjson(*messages)
    elif layout == "array":
        raw = json.dumps(messages, indent=1).encode()
    else:
        raw = json.dumps({"batch": messages}).encode()
    plain = tmp_path / "plain.txt"
    plain.write_bytes(raw)
    packed = tmp_path / "packed.data"  # no .gz suffix
    packed.write_bytes(gzip.compress(raw))
    with InputFile(packed, received_at=RECEIVED) as source:
        assert source.compressed
        found = list(source)
    expected = summary(items(plain))
    assert summary(found) == [(where.replace(str(plain), str(packed)), text) for where, text in expected]
    assert [text for _, text in expected] == ["m0", "m1", "m2"]


def test_truncated_gzip_reports_the_damage_after_the_good_part(tmp_path: Path) -> None:
    raw = ndjson(*(message(n) for n in range(2000)))
    path = tmp_path / "cut.ndjson.gz"
    packed = gzip.compress(raw)
    path.write_bytes(packed[: len(packed) // 2])
    found = items(path)
    assert isinstance(found[0][1], Message)
    assert isinstance(found[-1][1], InvalidEvent) and "gzip" in str(found[-1][1])


def test_stdin_dash_reads_the_given_stream() -> None:
    stream = io.BytesIO(gzip.compress(ndjson(message(1), message(2))))
    assert summary(items("-", stdin=stream)) == [("-:1", "m1"), ("-:2", "m2")]


def test_stdin_dash_in_a_real_process() -> None:
    code = (
        "import sys\n"
        "from datetime import UTC, datetime\n"
        "from idstitch.ingest.files import read_items\n"
        "for where, item in read_items('-', received_at=datetime.now(UTC)):\n"
        "    print(where, getattr(item, 'message_id', None))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=json.dumps([message(1), message(2)]).encode(),
        capture_output=True,
        check=True,
    )
    assert done.stdout.decode().split("\n") == ["-:1[0] m1", "-:1[1] m2", ""]


def test_received_at_is_the_files_time_unless_the_message_has_its_own(tmp_path: Path) -> None:
    path = tmp_path / "events.ndjson"
    path.write_bytes(ndjson(message(1), message(2, receivedAt="2026-02-01T00:00:00.000Z")))
    os.utime(path, (1_767_225_600.25, 1_767_225_600.25))
    first, second = (item for _, item in items(path))
    assert isinstance(first, Message) and isinstance(second, Message)
    # The file's modification time, not the run's: a resumed run stamps as the first did.
    assert first.received_at == datetime(2026, 1, 1, 0, 0, 0, 250000, tzinfo=UTC)
    assert second.received_at == datetime(2026, 2, 1, tzinfo=UTC)
    # Standard input has no such time: the run's is used.
    (only,) = (
        item for _, item in read_items("-", received_at=RECEIVED, stdin=io.BytesIO(ndjson(message(3))))
    )
    assert isinstance(only, Message) and only.received_at == RECEIVED


def test_read_batches_groups_items_across_files_and_reports_bytes(tmp_path: Path) -> None:
    first = tmp_path / "a.ndjson"
    first.write_bytes(ndjson(*(message(n) for n in range(5))))
    second = tmp_path / "b.ndjson.gz"
    second.write_bytes(gzip.compress(ndjson(*(message(n) for n in range(5, 8)))))
    total = first.stat().st_size + second.stat().st_size
    batches = list(read_batches([first, second], batch_size=3, received_at=RECEIVED))
    assert [len(batch.items) for batch in batches] == [3, 3, 2]
    assert [where for batch in batches for where, _ in batch.items][3:6] == [
        f"{first}:4",
        f"{first}:5",
        f"{second}:1",
    ]
    assert all(batch.bytes_total == total for batch in batches)
    assert batches[-1].bytes_read == total
    assert [batch.bytes_read for batch in batches] == sorted(batch.bytes_read for batch in batches)


@pytest.mark.parametrize("compressed", [True, False])
def test_the_bytes_read_of_a_day_of_many_files_follow_the_messages_read(
    tmp_path: Path, compressed: bool
) -> None:
    # A day of an archive: 60 files read side by side. Each file's first chunk is read ahead when it
    # is opened, and the progress counted those bytes as read: after 1% of the messages the bar showed 61%
    # (a real run: 300 files, 19.7 of 32.5 MB after the first batch), then stood still for the whole day.
    import random

    from idstitch.ingest.files import read_groups

    generator = random.Random(7)
    group: list[tuple[str, str | None]] = []
    for index in range(60):
        path = tmp_path / f"f{index:02d}.{'gz' if compressed else 'ndjson'}"
        lines = [
            {
                "type": "track",
                "event": "e",
                "userId": f"u{generator.randrange(10**6)}",
                "messageId": f"{index}-{k}",
                "receivedAt": f"2026-03-01T{k // 60 % 24:02d}:{k % 60:02d}:{index:02d}.000Z",
                "context": {"page": {"url": f"https://shop.example/p/{generator.randrange(5000)}"}},
                "properties": {"price": generator.randrange(10_000) / 100, "currency": "EUR"},
            }
            for k in range(1200)
        ]
        data = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
        path.write_bytes(gzip.compress(data) if compressed else data)
        group.append((str(path), None))
    total = sum(Path(path).stat().st_size for path, _ in group)
    batches = list(read_groups([group], batch_size=720, received_at=RECEIVED))
    assert len(batches) == 100  # 72,000 messages
    share_read = batches[0].bytes_read / total
    assert share_read < 0.05, share_read  # 1% of the messages
    middle = batches[49].bytes_read / total
    assert 0.4 < middle < 0.6, middle
    assert batches[-1].bytes_read == total
    assert [batch.bytes_read for batch in batches] == sorted(batch.bytes_read for batch in batches)


def test_the_bytes_read_of_a_gzip_file_never_go_back_when_its_compression_changes(tmp_path: Path) -> None:
    # Counted in proportion to the data decompressed so far, a stretch that compresses far better than what
    # came before would move the count back.
    import random

    from idstitch.ingest.files import read_groups

    generator = random.Random(3)
    noisy = [
        {"type": "track", "event": "e", "userId": "u1", "properties": {"n": generator.randbytes(300).hex()}}
        for _ in range(300)
    ]
    plain = [
        {"type": "track", "event": "e", "userId": "u1", "properties": {"n": "a" * 600}} for _ in range(3000)
    ]
    group = []
    for index in range(2):
        path = tmp_path / f"{index}.gz"
        path.write_bytes(gzip.compress(b"".join(json.dumps(line).encode() + b"\n" for line in noisy + plain)))
        group.append((str(path), None))
    batches = list(read_groups([group], batch_size=25, received_at=RECEIVED))
    read = [batch.bytes_read for batch in batches]
    assert read == sorted(read)
    assert read[-1] == sum(Path(path).stat().st_size for path, _ in group)


def test_batched() -> None:
    assert list(batched(range(7), 3)) == [[0, 1, 2], [3, 4, 5], [6]]
    with pytest.raises(ValueError):
        list(batched([], 0))


def test_memory_stays_bounded_on_a_large_file(tmp_path: Path) -> None:
    """NDJSON is streamed: reading a file much larger than the read-ahead never holds it whole."""
    import tracemalloc

    path = tmp_path / "large.ndjson"
    line = json.dumps(message(0, properties={"pad": "p" * 2000})).encode()
    with path.open("wb") as out:
        for n in range(12_000):
            out.write(line.replace(b'"m0"', f'"m{n}"'.encode()) + b"\n")
    assert path.stat().st_size > 24_000_000
    tracemalloc.start()
    count = sum(1 for _ in read_items(path, received_at=RECEIVED))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 12_000
    assert peak < 8_000_000


def test_a_captured_client_request_keeps_its_client_times_not_the_files(tmp_path: Path) -> None:
    # RudderStack's libraries send originalTimestamp and sentAt, no timestamp and no receivedAt. The
    # file's modification time is no receivedAt: correcting against it dated a year of history at it.
    path = tmp_path / "captured.ndjson"
    calls = [
        {**message(1, originalTimestamp="2023-05-01T10:00:00.000Z"), "timestamp": None},
        {**message(2, originalTimestamp="2023-05-01T10:00:02.000Z"), "timestamp": None},
    ]
    single = {**message(3, originalTimestamp="2023-04-01T08:00:00.000Z", sentAt="2023-04-01T08:00:01Z")}
    single["timestamp"] = None
    sent_only = {**message(4, sentAt="2023-03-01T07:00:00.000Z"), "timestamp": None}
    archived = {
        **message(5, originalTimestamp="2023-02-01T00:00:00Z", sentAt="2023-02-01T00:00:10Z"),
        "timestamp": None,
        "receivedAt": "2023-02-01T00:00:05Z",
    }
    path.write_bytes(
        ndjson({"batch": calls, "sentAt": "2023-05-01T10:00:05.000Z"}, single, sent_only, archived)
    )
    os.utime(path, (1_717_243_200, 1_717_243_200))  # 2024-06-01T12:00:00Z
    found = [item for _, item in items(path)]
    assert all(isinstance(item, Message) for item in found)
    assert [item.payload["timestamp"] for item in found if isinstance(item, Message)] == [
        "2023-05-01T10:00:00.000Z",
        "2023-05-01T10:00:02.000Z",
        "2023-04-01T08:00:00.000Z",
        "2023-03-01T07:00:00.000Z",  # the client's clock when it sent, not the file's time
        "2023-01-31T23:59:55.000Z",  # its own receivedAt is a real one: corrected against it
    ]


def test_gzip_within_gzip_is_read_and_its_damage_reported(tmp_path: Path) -> None:
    # A .gz uploaded to a bucket with Content-Encoding: gzip comes back compressed twice by some clients.
    raw = ndjson(message(1), message(2))
    twice = tmp_path / "twice.gz"
    twice.write_bytes(gzip.compress(gzip.compress(raw)))
    with InputFile(twice, received_at=RECEIVED) as source:
        assert source.compressed
        assert summary(list(source)) == [(f"{twice}:1", "m1"), (f"{twice}:2", "m2")]
    inner = gzip.compress(ndjson(*(message(n) for n in range(2000))))
    cut = tmp_path / "cut-inside.gz"
    cut.write_bytes(gzip.compress(inner[: len(inner) // 2]))
    found = items(cut)
    assert isinstance(found[0][1], Message)
    assert found[-1][0] == str(cut) and "gzip data ends before the end" in str(found[-1][1])


def test_read_groups_merges_the_files_of_a_group_by_received_time(tmp_path: Path) -> None:
    def at(minute: int, n: int) -> dict[str, object]:
        return message(n, receivedAt=f"2026-03-01T10:{minute:02d}:00.000Z")

    first, second, alone = tmp_path / "a.ndjson", tmp_path / "b.ndjson", tmp_path / "c.ndjson"
    first.write_bytes(ndjson(at(1, 1), b"{broken", at(5, 3), at(9, 5)))
    second.write_bytes(ndjson(at(2, 2), at(5, 4), at(7, 6)))
    alone.write_bytes(ndjson(at(0, 7)))
    groups = [[(str(first), None), (str(second), None)], [(str(alone), None)]]
    batches = list(files_module.read_groups(groups, batch_size=3, received_at=RECEIVED))
    where = [location.replace(f"{tmp_path}/", "") for batch in batches for location, _ in batch.items]
    # A broken line keeps its place after the line before it; a tie goes to the group's earlier file; the
    # next group comes after the whole first one, whatever its times.
    assert where == [
        *("a.ndjson:1", "a.ndjson:2", "b.ndjson:1", "a.ndjson:3", "b.ndjson:2", "b.ndjson:3"),
        *("a.ndjson:4", "c.ndjson:1"),
    ]
    assert [len(batch.items) for batch in batches] == [3, 3, 2]
    total = sum(path.stat().st_size for path in (first, second, alone))
    assert batches[-1].bytes_read == batches[-1].bytes_total == total
