"""Readers for batch files of Segment messages: NDJSON, JSON arrays, batch envelopes, gzip, stdin.

Every reader yields ``(location, item)`` pairs in file order, where ``item`` is a validated
:class:`~idstitch.core.messages.Message` or the :class:`~idstitch.core.errors.InvalidEvent` that says
why that part of the file is not one, and ``location`` is ``file:line`` (``file:line[index]`` for the
elements of a JSON array or of a batch envelope; ``line`` is the line the element starts on).

Formats, detected from the content and not the file name:

* NDJSON: one message per line; a line may also be a whole batch envelope
  ``{"batch": [...], "context": ..., "integrations": ..., "sentAt": ...}`` (Segment's archives).
* A JSON array of messages (possibly pretty-printed), read element by element.
* One batch envelope or one message as the whole (pretty-printed) file, or several of them one after
  another (what ``jq . *.json`` writes).
* Any of these gzip-compressed (recognised by its magic bytes, also when compressed twice, as an
  archive uploaded with ``Content-Encoding: gzip`` may be), and ``-`` for standard input.

Memory stays bounded: NDJSON is read line by line, arrays element by element, and an element or a
line over the limits is skipped without being held. Only a pretty-printed single document is read
whole, up to :data:`MAX_DOCUMENT_BYTES`.
"""

from __future__ import annotations

import heapq
import io
import os
import re
import stat
import sys
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any, Final, TypeVar

import msgspec

from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import (
    MAX_BATCH_MESSAGES,
    MAX_MESSAGE_BYTES,
    UTF8_BOM,
    Message,
    SourceOccurrences,
    decode_document,
    decode_json,
    parse_batch,
    parse_message,
)

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_LINE_BYTES",
    "Batch",
    "InputFile",
    "Item",
    "batched",
    "read_batches",
    "read_groups",
    "read_items",
]

Item = tuple[str, Message | InvalidEvent]
"""One element of a file: where it is (``file:line`` or ``file:line[index]``) and what it is."""

MAX_LINE_BYTES: Final = 64 * 1024 * 1024
"""Longest NDJSON line read (a whole batch envelope may be on one line); longer lines are rejected."""

MAX_DOCUMENT_BYTES: Final = 64 * 1024 * 1024
"""Largest pretty-printed single document (an envelope or a message spread over lines) read whole."""

_GZIP_MAGIC: Final = b"\x1f\x8b"
_GZIP_LAYERS: Final = 3  # gzip within gzip (a .gz uploaded with Content-Encoding: gzip), but not forever
_CHUNK: Final = 1024 * 1024
# Decompressed bytes held per gzip input: a day of an archive may be read from hundreds of files side by side.
_GUNZIP_OUT: Final = 128 * 1024
_BUFFER: Final = 64 * 1024  # read-ahead: small enough for the progress of the bytes on disk to be exact-ish
_GZIP_READ: Final = 64 * 1024
_WHITESPACE: Final = b" \t\r\n"
# The size limit is on a message as stored (compact UTF-8 JSON), as for an envelope's elements: an escape
# takes up to 6 bytes for 1 (json.dumps writes \u00e9 for é), so an array element up to 6 times the limit
# in the file may still fit once decoded.
_MAX_ELEMENT_BYTES: Final = 6 * MAX_MESSAGE_BYTES


def _stored_size_error(value: object) -> InvalidEvent | None:
    """The size error of a decoded message whose file bytes are over the limit, measured as it is stored;
    None when it fits."""
    try:
        size = len(_encode(value))
    except InvalidEvent as error:
        return error
    return _size_error(size) if size > MAX_MESSAGE_BYTES else None


def _size_error(size: int) -> InvalidEvent:
    return InvalidEvent(
        "", f"message is {size} bytes, over the {MAX_MESSAGE_BYTES // 1024} KB per-message limit"
    )


class _CountingReader(io.RawIOBase):
    """A read-only stream that counts the bytes taken from the one below (the bytes on disk)."""

    def __init__(self, raw: IO[bytes]) -> None:
        # read1: return what a pipe has now instead of blocking until a whole chunk arrives
        self._read = getattr(raw, "read1", raw.read)
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        data = self._read(len(view))
        size = len(data)
        view[:size] = data
        self.count += size
        return size


class _GunzipReader(io.RawIOBase):
    """Decompresses gzip (several members too) and hands out everything readable before any damage.

    A truncated or corrupt stream does not raise: it ends early and `error` says what was wrong, so
    that every complete message before the damage is still read (GzipFile would drop a whole chunk).
    """

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._inflate = zlib.decompressobj(wbits=31)
        self._pending = b""
        self._done = False
        self._taken = 0  # bytes read from `raw`
        self.produced = 0  # bytes decompressed
        self._delivered = 0  # bytes handed out
        self.error: str | None = None

    @property
    def decompressed(self) -> int:
        """Bytes of `raw` decompressed so far: those read ahead and waiting in the decompressor are not."""
        inflate = self._inflate
        waiting = len(inflate.unconsumed_tail) + (len(inflate.unused_data) if inflate.eof else 0)
        return self._taken - waiting

    def tell(self) -> int:
        """Bytes handed out so far (a BufferedReader above tells from it what its reader has taken)."""
        return self._delivered

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        while not self._pending and not self._done:
            try:
                self._pending = self._more()
                self.produced += len(self._pending)
            except zlib.error as error:
                self.error = f"is corrupt ({error})"
                self._done = True
        size = min(len(view), len(self._pending))
        view[:size] = self._pending[:size]
        self._pending = self._pending[size:]
        self._delivered += size
        return size

    def _more(self) -> bytes:
        inflate = self._inflate
        if inflate.unconsumed_tail:
            return inflate.decompress(inflate.unconsumed_tail, _GUNZIP_OUT)
        if inflate.eof:
            data = inflate.unused_data or self._read()
            if not data.strip(b"\0"):  # end of the stream (or zero padding after it)
                self._done = True
                return b""
            self._inflate = inflate = zlib.decompressobj(wbits=31)  # the next member
            return inflate.decompress(data, _GUNZIP_OUT)
        data = self._read()
        if not data:
            self.error = "ends before the end of the compressed stream (truncated file?)"
            self._done = True
            return b""
        return inflate.decompress(data, _GUNZIP_OUT)

    def _read(self) -> bytes:
        data = self._raw.read(_GZIP_READ)
        self._taken += len(data)
        return data


class FilePool:
    """Descriptors for the files of a group that has more of them than the process may hold open at once.

    The files take turns: the one read least recently is closed when another needs a descriptor, and
    reopened at the byte where it stopped when its turn comes again (its decompressor keeps its state).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, capacity)
        self._open: dict[_ReopeningFile, None] = {}  # in the order last read: a dict keeps insertion order

    def use(self, file: _ReopeningFile) -> None:
        """Make room for `file` (now the most recently read), closing the least recently read when full."""
        if file in self._open:
            del self._open[file]
        else:
            while len(self._open) >= self.capacity:
                oldest = next(iter(self._open))
                del self._open[oldest]
                oldest.suspend()
        self._open[file] = None

    def release(self, file: _ReopeningFile) -> None:
        """`file` is closed for good."""
        self._open.pop(file, None)


class _ReopeningFile(io.RawIOBase):
    """A regular file read from start to end that may be closed between reads (see FilePool)."""

    def __init__(self, path: str | Path, pool: FilePool) -> None:
        self._path = path
        self._pool = pool
        self._offset = 0
        self._handle: io.FileIO | None = None
        self._resume()

    def _resume(self) -> io.FileIO:
        self._pool.use(self)
        if self._handle is None:
            self._handle = io.FileIO(self._path, "rb")
            self._handle.seek(self._offset)
        return self._handle

    def suspend(self) -> None:
        """Give the descriptor back; the next read reopens the file where this one stopped."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None

    def readable(self) -> bool:
        return True

    def fileno(self) -> int:
        return self._resume().fileno()

    def readinto(self, buffer: Any) -> int:
        size = self._resume().readinto(buffer) or 0
        self._offset += size
        return size

    def close(self) -> None:
        self._pool.release(self)
        self.suspend()
        super().close()

    __hash__ = object.__hash__


def printable_path(path: str) -> str:
    """A path as text that can be printed and hashed: a name's bytes that are not UTF-8 are written `\\xe9`.

    The operating system hands such names to Python as lone surrogates (`caf\\udce9.json`), which no
    UTF-8 output or digest accepts; a name that is UTF-8 comes back unchanged.
    """
    try:
        raw = os.fsencode(path)
    except UnicodeEncodeError:  # a surrogate not made by the file system's decoding: typed as such
        raw = path.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


class InputFile:
    """One input (a path or ``-``): opened, decompressed when gzip, and read as items.

    ``size`` is the number of bytes on disk (None for stdin); ``position`` how many of them have been
    read so far (compressed bytes for a gzip file), for progress bars. ``id_name`` names the input in the
    ids derived for its timeless messages without messageId (default: the file's base name).
    """

    def __init__(
        self,
        path: str | Path,
        *,
        received_at: datetime,
        stdin: IO[bytes] | None = None,
        id_name: str | None = None,
        pool: FilePool | None = None,
    ) -> None:
        self.name = printable_path(str(path))
        if self.name == "-":
            source: IO[bytes] = stdin if stdin is not None else sys.stdin.buffer
            self.size: int | None = None
            self._owned: IO[bytes] | None = None
        else:
            # A file of a group too big for the descriptors there are takes turns at them (FilePool).
            source = (
                open(path, "rb")  # noqa: SIM115 - closed by close()
                if pool is None
                else io.BufferedReader(_ReopeningFile(path, pool))
            )
            self._owned = source
            status = os.fstat(source.fileno())
            regular = stat.S_ISREG(status.st_mode)
            self.size = status.st_size if regular else None  # a pipe's size says nothing
            if regular:
                # A file's messages without a time of their own are stamped with its modification
                # time, not the run's: a run resumed after a crash stamps them as the first run did,
                # and so builds the same graph.
                received_at = datetime.fromtimestamp(status.st_mtime, UTC)
        self.received_at = received_at
        self._parsing = _Parsing(printable_path(id_name) if id_name else Path(self.name).name, received_at)
        self._counter = _CountingReader(source)
        # From a pipe, a peek returns whatever has arrived: wait for the two bytes gzip is known by.
        head, stream = _look_ahead(self._counter, lambda data: len(data) >= 2)
        self._gunzips: list[_GunzipReader] = []
        # JSON never starts with gzip's magic bytes: decompressed data that does is gzip again.
        while head[:2] == _GZIP_MAGIC and len(self._gunzips) < _GZIP_LAYERS:
            gunzip = _GunzipReader(stream)
            self._gunzips.append(gunzip)
            head, stream = _look_ahead(
                io.BufferedReader(gunzip, buffer_size=_BUFFER), lambda data: len(data) >= 2
            )
        self.compressed = bool(self._gunzips)
        self._stream: IO[bytes] = stream
        self._reported = 0

    @property
    def position(self) -> int:
        """Bytes of the input behind what has been parsed so far: of a plain file, those taken from its
        buffer; of a gzip file, its compressed bytes in proportion to the decompressed ones taken. Not the
        bytes read: each file of a day read side by side has its first chunk read the moment it is opened,
        which would show the day as good as done before its first message. Never goes back."""
        self._reported = max(self._reported, self._parsed_bytes())
        return self._reported

    def _parsed_bytes(self) -> int:
        if self.size is None:
            return self._counter.count  # a pipe: nothing is read ahead of what has arrived
        try:
            taken = self._stream.tell()  # by the parser, of the decompressed data (see tell())
        except (OSError, ValueError):
            return self._counter.count
        if not self._gunzips:
            return min(taken, self._counter.count)
        if len(self._gunzips) > 1:
            return self._gunzips[0].decompressed
        gunzip = self._gunzips[0]
        return gunzip.decompressed * taken // gunzip.produced if gunzip.produced else 0

    def close(self) -> None:
        """Close the file (standard input is left open)."""
        if self._owned is not None:
            self._owned.close()

    def __enter__(self) -> InputFile:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __iter__(self) -> Iterator[Item]:
        """Every item of the input, in order; a damaged gzip stream ends with one InvalidEvent saying so."""
        yield from self._items()
        for gunzip in self._gunzips:
            if gunzip.error is not None:
                yield (
                    self.name,
                    InvalidEvent("", f"gzip data {gunzip.error}; the rest of the file is skipped"),
                )
                return

    def _items(self) -> Iterator[Item]:
        start, stream = _look_ahead(self._stream, lambda data: len(data) >= 2)
        encoding = _wide_encoding(start)
        if encoding is not None:
            # Read as UTF-8, every line would be rejected as "invalid character (byte 0)".
            yield (
                f"{self.name}:1",
                InvalidEvent(
                    "",
                    f"the file is {encoding}, not UTF-8 (as JSON must be): convert it, e.g. "
                    f"iconv -f {encoding} -t UTF-8; nothing of this file was read",
                ),
            )
            return
        head, stream = _first_content(stream)
        if head == b"[":
            yield from _array_items(stream, self.name, self._parsing)
            return
        if head == b"{":
            documents, stream = _whole_document(stream)
            if documents is not None:
                for document in documents:
                    yield from _document_items(document, self.name, self._parsing)
                return
        yield from _ndjson_items(stream, self.name, self._parsing)


class _Parsing:
    """Parses the messages of one input; timeless messages without a messageId get ids that a re-run repeats."""

    def __init__(self, name: str, received_at: datetime) -> None:
        self.received_at = received_at
        # Named by the file's base name (its path within a directory given whole): the same file re-run
        # from another directory is the same source.
        self.occurrences = SourceOccurrences(name)

    def message(self, value: object) -> Message:
        """One message of this input."""
        return parse_message(
            value, received_at=self.received_at, occurrences=self.occurrences, estimated_receipt=True
        )

    def batch(self, value: object) -> tuple[list[Message | InvalidEvent], dict[str, Any]]:
        """One batch envelope of this input."""
        return parse_batch(
            value, received_at=self.received_at, occurrences=self.occurrences, estimated_receipt=True
        )


def _wide_encoding(start: bytes) -> str | None:
    """UTF-16 or UTF-32 told by a byte order mark or by the NUL beside the first ASCII character; else None.

    UTF-8 JSON cannot start with a NUL, nor hold one as its second byte (the first is `{`, `[`,
    whitespace or the BOM's first byte, none of which a NUL may follow).
    """
    if start.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if start.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    if len(start) >= 2 and (start[0] == 0) != (start[1] == 0):
        return "UTF-16"
    return None


def _look_ahead(stream: Any, enough: Callable[[bytes], bool]) -> tuple[bytes, IO[bytes]]:
    """The first bytes of a stream, read until `enough` says so (or the end), and a reader from the start.

    A pipe hands over what has arrived so far, so one read (or a peek) may hold a single byte of what
    decides the format; this reads on until the decision can be made.
    """
    if isinstance(stream, io.BufferedReader):
        head = stream.peek(_BUFFER)
        if enough(head):
            return head, stream  # a file, or a pipe that has delivered: no extra layer of buffering
    head = b""
    read = getattr(stream, "read1", stream.read)  # what has arrived, not a whole buffer's worth
    while not enough(head):
        chunk = read(_BUFFER)
        if not chunk:
            break
        head += chunk
    return head, io.BufferedReader(_Concat(head, stream), buffer_size=_BUFFER)


def _first_content(stream: IO[bytes]) -> tuple[bytes, IO[bytes]]:
    """The first byte that is not whitespace (or a UTF-8 BOM), and the stream to read from the start."""

    def content(data: bytes) -> bytes:
        return data.removeprefix(UTF8_BOM).lstrip(_WHITESPACE)[:1]

    head, reader = _look_ahead(stream, lambda data: bool(content(data)) or len(data) > MAX_DOCUMENT_BYTES)
    return content(head), reader


def _stands_alone(line: bytes) -> bool:
    try:
        decode_json(line.strip())
    except InvalidEvent:
        return False
    return True


def _whole_document(stream: IO[bytes]) -> tuple[list[tuple[int, object]] | None, IO[bytes]]:
    """JSON objects spread over several lines (pretty-printed envelopes or messages, one after another
    as `jq . *.json` writes them), if the file holds such.

    Returns the documents (each with the line it starts on) or None, meaning "read it as NDJSON", and
    the stream to go on reading: the first or second non-blank line is a JSON value on its own, or the
    start of the file does not form documents within MAX_DOCUMENT_BYTES.
    """
    # Three non-blank lines decide it (or a whole buffer without them): wait for them on a pipe.
    head, stream = _look_ahead(stream, lambda data: len(_first_lines(data)) >= 3 or len(data) >= _BUFFER)
    lines = _first_lines(head)
    if b"\n" not in head.rstrip():
        return None, stream  # one (long) line: NDJSON, whatever it holds
    if any(_stands_alone(line) for line in lines[:2]):
        return None, stream  # NDJSON, perhaps with a broken line here or there
    # Bounded look-ahead: a BufferedReader cannot peek this far, so read into a side buffer and
    # hand the bytes back through a fresh reader if they turn out not to be one document.
    data = stream.read(MAX_DOCUMENT_BYTES + 1)
    if len(data) <= MAX_DOCUMENT_BYTES:
        start_line = data[: len(data) - len(data.lstrip(_WHITESPACE))].count(b"\n") + 1
        try:
            document = decode_document(data)
        except InvalidEvent as error:
            documents = _one_after_another(data)
            if documents is not None:
                return documents, stream
            if _opens_a_document(lines[0]):
                # A document opened over several lines and broken further on is one error: read line by
                # line, an element here and there would land without its envelope's context.
                return [(start_line, _where_broken(error, data))], stream
            document = None
        if isinstance(document, dict):
            return [(start_line, document)], stream
    return None, io.BufferedReader(_Concat(data, stream), buffer_size=_BUFFER)


def _one_after_another(data: bytes) -> list[tuple[int, object]] | None:
    """Several JSON objects written one after another, each with the line it starts on; None unless the
    first of two or more decodes (else the caller's single-document error stands). What cannot be
    read after a good object ends the list as one InvalidEvent: the objects before it still land."""
    documents: list[tuple[int, object]] = []
    view = memoryview(data)
    position = len(data) - len(data.lstrip(_WHITESPACE + UTF8_BOM))
    line = data[:position].count(b"\n") + 1
    while position < len(data):
        piece = data[position:]
        try:
            msgspec.json.decode(view[position:])
        except RecursionError:
            pass  # nested past msgspec's depth: decode_document says what it can of the whole rest
        except msgspec.DecodeError as error:
            # msgspec names the byte after the first value's end: the next value starts there.
            found = re.fullmatch(r"JSON is malformed: trailing characters \(byte (\d+)\)", str(error))
            if found is not None:
                piece = data[position : position + int(found.group(1)) - 1]
        try:
            if not piece.startswith(b"{"):
                raise InvalidEvent("", "invalid JSON: another object was expected here")
            document: object = decode_document(piece)
        except InvalidEvent as error:
            if not documents:
                return None
            documents.append(
                (line, InvalidEvent(error.field, f"{error.reason}; nothing from here on was read"))
            )
            return documents
        documents.append((line, document))
        end = position + len(piece)
        # A BOM may start the next document: the start of another file concatenated to this one.
        following = len(data) - len(data[end:].lstrip(_WHITESPACE + UTF8_BOM))
        line += data[position:following].count(b"\n")
        position = following
    return documents if len(documents) > 1 else None


def _first_lines(data: bytes) -> list[bytes]:
    """The first three lines of `data` that are not blank (blank lines before a broken one must not hide the next)."""
    return [line for line in data.split(b"\n") if line.strip()][:3]


def _opens_a_document(first_line: bytes) -> bool:
    """Whether a file's first line opens a JSON value that goes on below it (never an NDJSON line)."""
    return first_line.strip().endswith((b"{", b"[", b",", b":"))


def _where_broken(error: InvalidEvent, data: bytes) -> InvalidEvent:
    """The decoding error, with the line of the byte it names."""
    found = re.search(r"\(byte (\d+)\)", error.reason)
    if found is None:
        return error
    line = data[: int(found.group(1))].count(b"\n") + 1
    return InvalidEvent(error.field, f"{error.reason} on line {line}; nothing of this document was ingested")


class _Concat(io.RawIOBase):
    """Bytes already read, followed by the rest of a stream."""

    def __init__(self, head: bytes, rest: Any) -> None:
        self._head = memoryview(head)
        self._rest = rest
        self._delivered = 0

    def readable(self) -> bool:
        return True

    def tell(self) -> int:
        """Bytes handed out so far (a BufferedReader above tells from it what its reader has taken)."""
        return self._delivered

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self._head:
            size = min(len(view), len(self._head))
            view[:size] = self._head[:size]
            self._head = self._head[size:]
        else:
            data = self._rest.read(len(view))
            size = len(data)
            view[:size] = data
        self._delivered += size
        return size


def _document_items(document: tuple[int, object], name: str, parsing: _Parsing) -> Iterator[Item]:
    line, value = document
    if isinstance(value, InvalidEvent):
        yield f"{name}:{line}", value
        return
    if isinstance(value, dict) and _is_envelope(value):
        yield from _envelope_items(value, f"{name}:{line}", parsing)
        return
    where = f"{name}:{line}"
    try:
        size = len(_encode(value))
        if size > MAX_MESSAGE_BYTES:
            raise _size_error(size)
        yield where, parsing.message(value)
    except InvalidEvent as error:
        yield where, error


def _is_envelope(value: dict[str, Any]) -> bool:
    return "batch" in value and value.get("type") in (None, "", "batch")


def _encode(value: object) -> bytes:
    try:
        return msgspec.json.encode(value)
    except (TypeError, ValueError) as exc:
        raise InvalidEvent("", f"message is not JSON-encodable: {exc}") from None


def _envelope_items(envelope: dict[str, Any], where: str, parsing: _Parsing) -> Iterator[Item]:
    """Elements of one batch envelope; an envelope over the per-request message limit is read in slices."""
    batch = envelope.get("batch")
    slices: Iterable[tuple[int, object]]
    if isinstance(batch, list) and len(batch) > MAX_BATCH_MESSAGES:
        # The 2,500-message limit protects the HTTP API; an archived envelope is read in slices.
        slices = (
            (start, {**envelope, "batch": batch[start : start + MAX_BATCH_MESSAGES]})
            for start in range(0, len(batch), MAX_BATCH_MESSAGES)
        )
    else:
        slices = ((0, envelope),)
    for offset, part in slices:
        try:
            results, _rest = parsing.batch(part)
        except InvalidEvent as error:
            yield where, InvalidEvent(error.field, f"batch envelope: {error.reason}")
            return
        for index, item in enumerate(results, offset):
            yield f"{where}[{index}]", item


def _ndjson_items(stream: IO[bytes], name: str, parsing: _Parsing) -> Iterator[Item]:
    number = 0
    while True:
        line = stream.readline(MAX_LINE_BYTES + 1)
        if not line:
            return
        number += 1
        if len(line) > MAX_LINE_BYTES and not line.endswith(b"\n"):
            size = len(line)
            while True:  # skip the rest of the over-long line without holding it
                more = stream.readline(_CHUNK)
                size += len(more)
                if not more or more.endswith(b"\n"):
                    break
            yield (
                f"{name}:{number}",
                InvalidEvent(
                    "", f"line is {size} bytes, over the {MAX_LINE_BYTES // (1024 * 1024)} MB line limit"
                ),
            )
            continue
        if number == 1:
            line = line.removeprefix(UTF8_BOM)
        text = line.strip()
        if not text:
            continue
        yield from _line_items(text, f"{name}:{number}", parsing)


def _line_items(text: bytes, where: str, parsing: _Parsing) -> Iterator[Item]:
    """One NDJSON line: a message, or a batch envelope with several."""
    size = len(text)
    try:
        value = decode_document(text)
    except InvalidEvent as error:
        # Like decode_message: a message over the limit is reported as such, whatever it contains.
        yield where, _size_error(size) if size > MAX_MESSAGE_BYTES else error
        return
    if isinstance(value, dict) and _is_envelope(value):
        yield from _envelope_items(value, where, parsing)
        return
    if size > MAX_MESSAGE_BYTES:
        too_big = _stored_size_error(value)
        if too_big is not None:
            yield where, too_big
            return
    try:
        yield where, parsing.message(value)
    except InvalidEvent as error:
        yield where, error


# -- JSON arrays, element by element --------------------------------------------------------------

_STRUCTURE = re.compile(rb'[\[\]{}",]')
_STRING_END = re.compile(rb'["\\]')


class _ArrayScanner:
    """Splits a stream holding one (or several) top-level JSON arrays into its elements' bytes.

    Tracks strings and nesting only; each element is then decoded and validated on its own, so a
    malformed element is reported and the scanner carries on with the next one. Elements longer
    than _MAX_ELEMENT_BYTES are measured but not kept.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.line = 1  # line of the start of `chunk`
        self.chunk = b""
        self.pos = 0
        self._counted = (0, 1)  # (position in chunk, its line): lines are counted incrementally

    def _fill(self) -> bool:
        """Move to the next chunk; False at the end of the stream."""
        self.line += self.chunk.count(b"\n")
        self.chunk = self.stream.read(_CHUNK)
        self.pos = 0
        self._counted = (0, self.line)
        return bool(self.chunk)

    def _skip_whitespace(self) -> bytes:
        """The next byte that is not whitespace (not consumed), or b"" at the end."""
        while True:
            chunk, pos = self.chunk, self.pos
            while pos < len(chunk) and chunk[pos] in _WHITESPACE:
                pos += 1
            self.pos = pos
            if pos < len(chunk):
                return chunk[pos : pos + 1]
            if not self._fill():
                return b""

    def _skip_bom(self) -> bool:
        """Consume a UTF-8 byte order mark at the current position, if there is one (it may straddle chunks)."""
        if len(self.chunk) - self.pos < len(UTF8_BOM):
            more = self.stream.read(_CHUNK)
            if more:
                # Keep the unread bytes and append the next chunk; the lines before them are counted.
                self.line += self.chunk.count(b"\n", 0, self.pos)
                self.chunk = self.chunk[self.pos :] + more
                self.pos = 0
                self._counted = (0, self.line)
        if not self.chunk.startswith(UTF8_BOM, self.pos):
            return False
        self.pos += len(UTF8_BOM)
        return True

    def _current_line(self) -> int:
        counted, line = self._counted
        if self.pos < counted:
            counted, line = 0, self.line
        line += self.chunk.count(b"\n", counted, self.pos)
        self._counted = (self.pos, line)
        return line

    def elements(self) -> Iterator[tuple[int, int, bytes | int | InvalidEvent]]:
        """(line, index, bytes of the element | its size when too big | a structural error)."""
        if not self.chunk:
            self._fill()
        while True:
            head = self._skip_whitespace()
            if not head:
                return
            if head == UTF8_BOM[:1] and self._skip_bom():
                continue  # the start of the file, or of another one concatenated to it (`cat a.json b.json`)
            if head != b"[":
                yield (
                    self._current_line(),
                    0,
                    InvalidEvent(
                        "", "invalid JSON: expected '[' (a JSON array of messages) or one message per line"
                    ),
                )
                return
            self.pos += 1
            index = 0
            expect_element = True
            while True:
                head = self._skip_whitespace()
                if not head:
                    yield (
                        self._current_line(),
                        index,
                        InvalidEvent("", "invalid JSON: the array is not closed"),
                    )
                    return
                if head == b"]":
                    self.pos += 1
                    break
                if head == b",":
                    self.pos += 1
                    if expect_element:
                        yield self._current_line(), index, InvalidEvent("", "invalid JSON: missing element")
                        index += 1
                    expect_element = True
                    continue
                line = self._current_line()
                element = self._element()
                if not expect_element:
                    element = InvalidEvent("", "invalid JSON: missing ',' between elements")
                yield line, index, element
                index += 1
                expect_element = False

    def _element(self) -> bytes | int | InvalidEvent:
        """Consume one element starting at the current position."""
        pieces: list[bytes] = []
        size = 0
        depth = 0
        in_string = False
        escape = False
        start = self.pos
        while True:
            chunk = self.chunk
            pos = self.pos
            end: int | None = None
            while pos < len(chunk):
                if in_string:
                    if escape:
                        escape = False
                        pos += 1
                        continue
                    match = _STRING_END.search(chunk, pos)
                    if match is None:
                        pos = len(chunk)
                        break
                    pos = match.end()
                    if match.group() == b"\\":
                        escape = True
                    else:
                        in_string = False
                        if depth == 0:
                            end = pos
                            break
                    continue
                match = _STRUCTURE.search(chunk, pos)
                if match is None:
                    pos = len(chunk)
                    break
                token = match.group()
                if token == b'"':
                    in_string = True
                    pos = match.end()
                elif token in (b"{", b"["):
                    depth += 1
                    pos = match.end()
                elif token in (b"}", b"]"):
                    if depth == 0:  # the end of the array: a scalar element ends before it
                        end = match.start()
                        break
                    depth -= 1
                    pos = match.end()
                    if depth == 0:
                        end = pos
                        break
                else:  # ","
                    if depth == 0:
                        end = match.start()
                        break
                    pos = match.end()
            stop = pos if end is None else end
            size += stop - start
            if size <= _MAX_ELEMENT_BYTES:
                pieces.append(chunk[start:stop])
            else:
                pieces.clear()
            if end is not None:
                self.pos = end
                break
            self.pos = len(chunk)
            if not self._fill():
                break
            start = 0
        if size > _MAX_ELEMENT_BYTES:
            return size
        return b"".join(pieces).rstrip(_WHITESPACE)


def _array_items(stream: IO[bytes], name: str, parsing: _Parsing) -> Iterator[Item]:
    for line, index, element in _ArrayScanner(stream).elements():
        where = f"{name}:{line}[{index}]"
        if isinstance(element, InvalidEvent):
            yield where, element
            continue
        if isinstance(element, int):
            yield where, _size_error(element)
            continue
        over = len(element) > MAX_MESSAGE_BYTES
        try:
            value = decode_document(element)
        except InvalidEvent as error:
            # As for an NDJSON line: a message over the limit is reported as such, whatever it contains.
            yield where, _size_error(len(element)) if over else error
            continue
        if isinstance(value, dict) and _is_envelope(value):
            # An array of envelopes: each element's messages are sub-indexed.
            yield from _envelope_items(value, where, parsing)
            continue
        too_big = _stored_size_error(value) if over else None
        try:
            yield where, too_big if too_big is not None else parsing.message(value)
        except InvalidEvent as error:
            yield where, error


# -- convenience -----------------------------------------------------------------------------------


def read_items(path: str | Path, *, received_at: datetime, stdin: IO[bytes] | None = None) -> Iterator[Item]:
    """Every item of one file (or ``-``), in order."""
    with InputFile(path, received_at=received_at, stdin=stdin) as source:
        yield from source


_T = TypeVar("_T")


def batched(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    """Lists of up to `size` consecutive items."""
    if size < 1:
        raise ValueError("batch size must be at least 1")
    batch: list[_T] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


@dataclass(frozen=True, slots=True)
class Batch:
    """Up to N consecutive items (possibly spanning files) with the progress made once it is read."""

    items: list[Item]
    bytes_read: int  # bytes of every input consumed so far (compressed bytes for gzip)
    bytes_total: int | None  # sum of the inputs' sizes; None when one of them is stdin


InputPath = tuple[str, str | None]
"""A file to read (or ``-``) and the name its derived message ids use (None: its base name)."""


def read_batches(
    paths: Sequence[str | Path],
    *,
    batch_size: int,
    received_at: datetime,
    stdin: IO[bytes] | None = None,
    on_open: Callable[[InputFile], None] | None = None,
) -> Iterator[Batch]:
    """Items of every file in order, in batches of `batch_size` (one transaction each: group commit).

    Files are opened one at a time, as they are reached; `on_open` is called with each.
    """
    return read_groups(
        [[(str(path), None)] for path in paths],
        batch_size=batch_size,
        received_at=received_at,
        stdin=stdin,
        on_open=on_open,
    )


def read_groups(
    groups: Sequence[Sequence[InputPath]],
    *,
    batch_size: int,
    received_at: datetime,
    stdin: IO[bytes] | None = None,
    on_open: Callable[[InputFile], None] | None = None,
    max_open: int | None = None,
) -> Iterator[Batch]:
    """Items of every group in turn, in batches of `batch_size`; the files of one group are read side by side
    and their items merged in the order the messages were received (a day of an archive, written as
    several files, replayed as it arrived). A group of more than `max_open` files holds at most that many
    open at once (see FilePool); by default every file of a group is open.

    Each message is placed by its own `receivedAt` (its timestamp when it has none: the file's time says
    nothing of the order within it); an item that is no message keeps its place after the one before it in
    its file. Ties go to the earlier file of the group, then to file order, so the order is the same on
    every run. `on_open` is called with each file as it is opened.
    """
    if batch_size < 1:
        raise ValueError("batch size must be at least 1")
    paths = [path for group in groups for path, _ in group]
    sizes: list[int | None] = [
        Path(path).stat().st_size if path != "-" and Path(path).is_file() else None for path in paths
    ]
    total = None if any(size is None for size in sizes) else sum(size or 0 for size in sizes)
    done_before = 0
    batch: list[Item] = []
    for group in groups:
        with ExitStack() as stack:
            sources: list[InputFile] = []
            pool = FilePool(max_open) if max_open is not None and len(group) > max_open else None
            for path, id_name in group:
                source = stack.enter_context(
                    InputFile(path, received_at=received_at, stdin=stdin, id_name=id_name, pool=pool)
                )
                sources.append(source)
                if on_open is not None:
                    on_open(source)
            items: Iterable[Item] = sources[0] if len(sources) == 1 else _merged(sources)
            for item in items:
                batch.append(item)
                if len(batch) >= batch_size:
                    yield Batch(batch, done_before + sum(source.position for source in sources), total)
                    batch = []
            # Read to its end: a file counts whole (zero padding or a damaged tail was skipped, not unread).
            done_before += sum(source.size or source.position for source in sources)
    if batch:
        yield Batch(batch, done_before, total)


_BEFORE_ANY: Final = datetime.min.replace(tzinfo=UTC)


def _merged(sources: Sequence[InputFile]) -> Iterator[Item]:
    """The items of several inputs, merged by the time each message was received (see read_groups)."""

    def keyed(index: int, source: InputFile) -> Iterator[tuple[datetime, int, int, Item]]:
        last = _BEFORE_ANY
        stamp = source.received_at.astimezone(UTC)
        stamp = stamp.replace(microsecond=stamp.microsecond // 1000 * 1000)  # as messages hold it
        for sequence, item in enumerate(source):
            message = item[1]
            if isinstance(message, Message):
                # A message without a receivedAt of its own is stamped with the file's time, the same for
                # all of them: its timestamp is then the better guess of when it came.
                last = message.received_at if message.received_at != stamp else message.timestamp
            yield last, index, sequence, item

    for _, _, _, item in heapq.merge(*(keyed(index, source) for index, source in enumerate(sources))):
        yield item
