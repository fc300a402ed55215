"""Directories of batch files: the trees that Segment's and RudderStack's storage destinations write.

Segment's Amazon S3, AWS S3 and Google Cloud Storage destinations write
``segment-logs/<source-id>/<received-day>/<file>.gz``: gzipped NDJSON, one processed message per line
(``messageId``, ``receivedAt``, ``sentAt``, ``originalTimestamp``, ``timestamp``, ``projectId`` = the
source id, …), the day folder a UTC midnight in epoch milliseconds. RudderStack's object-storage
destinations write ``rudder-logs/<source-id>/<YYYY-MM-DD>/<unix-seconds>.<source-id>.<uuid>.json.gz``
(``MM-DD-YYYY`` folders before 2022, and an optional prefix before the date).

A directory given to ``idstitch ingest`` is walked whole. Its data files are those named ``.gz``,
``.json``, ``.ndjson``, ``.jsonl`` or ``.ldjson`` (any case); hidden entries (a name starting with a dot:
``.DS_Store``, ``.git/``) and everything else (Segment's ``dummy-object.txt``, a download tool's temporary
``*.gz.1a2b3c``, a symbolic link to a folder, a pipe) are skipped and counted.

Order, so that history is replayed as it was received: each file gets the received-day of its deepest
folder named like a day (epoch milliseconds, ``YYYY-MM-DD`` with any prefix, ``MM-DD-YYYY``), else of its
own name when that starts with epoch seconds or milliseconds. Days come in date order; the files of one
day, of every source in the tree, form one group, read side by side and merged by ``receivedAt``
(:func:`idstitch.ingest.files.read_groups`). A file without a day is a group of its own, before the dated
ones, in name order. Names compare with their digit runs as numbers (``part-9`` before ``part-10``).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Final

from idstitch.core.errors import IdstitchError
from idstitch.ingest.files import InputPath, printable_path

__all__ = ["DATA_SUFFIXES", "ArchiveError", "Directory", "Plan", "plan_inputs", "scan_directory"]

DATA_SUFFIXES: Final = (".gz", ".json", ".ndjson", ".jsonl", ".ldjson")
"""Endings (any case) of the files taken from a directory; a file named on the command line is read whatever its name."""

_SUFFIX_LIST: Final = ", ".join(DATA_SUFFIXES)
_EPOCH_MS: Final = re.compile(r"\d{13}")
_ISO_DAY: Final = re.compile(r"(?:^|\D)(\d{4})-(\d{2})-(\d{2})")
_US_DAY: Final = re.compile(r"(\d{2})-(\d{2})-(\d{4})")
_LEADING_EPOCH: Final = re.compile(r"(\d{10}|\d{13})(?:\D|$)")
_DIGITS: Final = re.compile(r"(\d+)")
# Epoch values outside these years are not times but numbers that happen to have 10 or 13 digits.
_FIRST_DAY: Final = date(2000, 1, 1)
_LAST_DAY: Final = date(2100, 1, 1)


class ArchiveError(IdstitchError):
    """A directory that cannot be read, or holds no data file (a usage error: nothing is written)."""


@dataclass(frozen=True, slots=True)
class Directory:
    """One directory argument: its data files in groups (see the module's docstring) and what was skipped."""

    path: str
    groups: list[list[InputPath]]
    hidden: int = 0
    others: list[str] = field(default_factory=list)
    irregular: list[str] = field(default_factory=list)  # named like data, but no file: a link, a pipe

    @property
    def files(self) -> int:
        """How many data files the groups hold."""
        return sum(len(group) for group in self.groups)

    @property
    def skipped(self) -> int:
        """How many entries were left out."""
        return self.hidden + len(self.others) + len(self.irregular)

    def skipped_text(self) -> str:
        """What was skipped, in words: `skipped 2 files: 1 hidden, 1 not named as a data file (…): x.txt`."""
        parts = []
        if self.hidden:
            parts.append(f"{self.hidden:,} hidden")
        if self.others:
            parts.append(
                f"{len(self.others):,} not named as a data file ({_SUFFIX_LIST}): {_first(self.others)}"
            )
        if self.irregular:
            what = "not a regular file" if len(self.irregular) == 1 else "not regular files"
            parts.append(
                f"{len(self.irregular):,} {what} (a link to a folder, a dangling or looping link, a pipe or a "
                f"socket): {_first(self.irregular)}"
            )
        noun = "file" if self.skipped == 1 else "files"
        return f"skipped {self.skipped:,} {noun}: {', '.join(parts)}"


def _first(paths: list[str]) -> str:
    """The first of some paths, printable, and `…` when there are more."""
    return printable_path(paths[0]) + (", …" if len(paths) > 1 else "")


@dataclass(frozen=True, slots=True)
class Plan:
    """What an ingest reads: groups in turn (a file argument is a group of its own), and each directory."""

    groups: list[list[InputPath]]
    directories: list[Directory]

    @property
    def files(self) -> int:
        """How many files are read."""
        return sum(len(group) for group in self.groups)

    @property
    def skipped(self) -> int:
        """How many entries of the directories were left out."""
        return sum(directory.skipped for directory in self.directories)


def plan_inputs(arguments: Sequence[str]) -> Plan:
    """The groups to read for the command line's FILE and DIR arguments, in the order given."""
    groups: list[list[InputPath]] = []
    directories: list[Directory] = []
    for argument in arguments:
        if argument != "-" and os.path.isdir(argument):
            directory = scan_directory(argument)
            directories.append(directory)
            groups.extend(directory.groups)
        else:
            groups.append([(argument, None)])
    return Plan(groups, directories)


def scan_directory(path: str) -> Directory:
    """Walk one directory: its data files grouped by received-day in time order, and what was skipped."""
    found: list[tuple[str, str]] = []  # (path, path relative to the directory)
    hidden = 0
    others: list[str] = []
    irregular: list[str] = []

    def refuse(error: OSError) -> None:
        where = printable_path(str(error.filename))
        raise ArchiveError(f"{where}: cannot be read ({error.strerror or error})") from None

    for folder, subfolders, names in os.walk(path, onerror=refuse):
        kept = []
        for name in subfolders:
            if name.startswith("."):
                hidden += 1
            elif os.path.islink(os.path.join(folder, name)):
                irregular.append(os.path.join(folder, name))  # not followed: a link may loop back up the tree
            else:
                kept.append(name)
        subfolders[:] = kept
        for name in names:
            full = os.path.join(folder, name)
            if name.startswith("."):
                hidden += 1
            elif not name.lower().endswith(DATA_SUFFIXES):
                others.append(full)
            elif not _is_regular(full):
                irregular.append(full)
            else:
                found.append((full, os.path.relpath(full, path)))
    others.sort(key=_natural)
    irregular.sort(key=_natural)
    directory = Directory(path, _grouped(found), hidden, others, irregular)
    if not directory.groups:
        skipped = f"; {directory.skipped_text()}" if directory.skipped else ""
        raise ArchiveError(f"{printable_path(path)}: no data file in it ({_SUFFIX_LIST}){skipped}")
    return directory


def _is_regular(path: str) -> bool:
    """A regular file (through a symbolic link too): a pipe or a socket would block or fail the read."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False  # a dangling link


def _grouped(found: list[tuple[str, str]]) -> list[list[InputPath]]:
    """Files grouped by received-day, days in date order, undated files first, each a group of its own."""
    dated: dict[date, list[tuple[str, str]]] = {}
    undated: list[tuple[str, str]] = []
    for full, relative in found:
        day = received_day(relative)
        if day is None:
            undated.append((full, relative))
        else:
            dated.setdefault(day, []).append((full, relative))
    groups: list[list[InputPath]] = [
        [(full, relative)] for full, relative in sorted(undated, key=lambda item: _natural(item[1]))
    ]
    for day in sorted(dated):
        members = sorted(dated[day], key=lambda item: _natural(item[1]))
        groups.append([(full, relative) for full, relative in members])
    return groups


def received_day(relative: str) -> date | None:
    """The received-day a file's path names: its deepest day-named folder, else its own name's epoch prefix."""
    *folders, name = relative.split(os.sep)
    for folder in reversed(folders):
        day = _day_of_folder(folder)
        if day is not None:
            return day
    match = _LEADING_EPOCH.match(name)
    if match is None:
        return None
    digits = match.group(1)
    return _epoch_day(int(digits) / (1000 if len(digits) == 13 else 1))


def _day_of_folder(name: str) -> date | None:
    if _EPOCH_MS.fullmatch(name):
        return _epoch_day(int(name) / 1000)
    iso = _ISO_DAY.search(name)
    if iso is not None and iso.end() == len(name):
        return _valid_day(int(iso.group(1)), int(iso.group(2)), int(iso.group(3)))
    us = _US_DAY.fullmatch(name)
    if us is not None:
        return _valid_day(int(us.group(3)), int(us.group(1)), int(us.group(2)))
    return None


def _epoch_day(seconds: float) -> date | None:
    day = datetime.fromtimestamp(seconds, UTC).date()
    return day if _FIRST_DAY <= day < _LAST_DAY else None


def _valid_day(year: int, month: int, day: int) -> date | None:
    try:
        found = date(year, month, day)
    except ValueError:
        return None
    return found if _FIRST_DAY <= found < _LAST_DAY else None


def _natural(text: str) -> tuple[tuple[int, int, str], ...]:
    """A sort key comparing digit runs as numbers: `part-9` before `part-10`, then the text itself."""
    return tuple(
        (0, int(piece), piece) if index % 2 else (1, 0, piece)
        for index, piece in enumerate(_DIGITS.split(text))
    )
