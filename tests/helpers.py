"""A small DSL for tests: build Segment messages, ingest them through the Engine, read the graph back.

    with open_space(tmp_path) as space:
        space.send("identify", userId="u1", anonymousId="a1", traits={"email": "j@x.io"})
        assert space.identifiers_of("user_id:u1") == {"user_id:u1", "anonymous_id:a1", "email:j@x.io"}

Every message gets a messageId (`m1`, `m2`, … per World unless given) and a timestamp (BASE plus one
minute per message unless given as `at=` or `timestamp=`), so runs are deterministic.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from idstitch.config import Config
from idstitch.core.errors import InvalidEvent
from idstitch.core.identifiers import Identifier, parse_identifier
from idstitch.core.messages import Message, format_timestamp, parse_message
from idstitch.core.rules import IdentityRules
from idstitch.engine import Engine, IngestResult, MessageOutcome
from idstitch.storage.base import EventRecord, IdentifierRecord, Store
from idstitch.storage.urls import open_store

__all__ = [
    "BASE",
    "RECEIVED",
    "Space",
    "World",
    "at",
    "clean_env",
    "committed_events",
    "config_from_toml",
    "ident",
    "kill_when",
    "open_space",
    "open_world",
    "wait_for",
]

BASE = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)  # a Monday morning
RECEIVED = datetime(2027, 6, 1, tzinfo=UTC)  # server time: after every message timestamp used in tests


def at(*, days: float = 0, hours: float = 0, minutes: float = 0, seconds: float = 0) -> datetime:
    """BASE plus an offset."""
    return BASE + timedelta(days=days, hours=hours, minutes=minutes, seconds=seconds)


def ident(ref: str | Identifier, collection: str | None = None) -> Identifier:
    """`type:value` → Identifier (group_id → accounts unless `collection` says otherwise)."""
    if isinstance(ref, Identifier):
        return ref
    parsed = parse_identifier(ref)
    return parsed if collection is None else Identifier(parsed.type, parsed.value, collection)


def config_from_toml(text: str) -> Config:
    """A Config from TOML text (the shape of SPEC §8)."""
    return Config.from_mapping(tomllib.loads(text))


class World:
    """One Engine over one store; hands out Space wrappers."""

    def __init__(self, store: Store, config: Config) -> None:
        self.store = store
        self.config = config
        self.engine = Engine(store, config)
        self.sent = 0  # message counter shared by every Space of this world: ids never collide
        # Reopening a store that already holds messages: a prefix keeps the generated ids new.
        stored = sum(store.stats(space).events for space in store.spaces())
        self.id_prefix = f"r{stored}-" if stored else ""

    def space(self, name: str | None = None, source: str | None = None) -> Space:
        """A wrapper for one space (the only / default space when not named)."""
        if name is None:
            name = next(iter(self.config.spaces)) if len(self.config.spaces) == 1 else "default"
        return Space(self, name, source)

    def space_for_write_key(self, write_key: str) -> Space:
        """The space and source a write key authenticates (SPEC §1), as a wrapper."""
        record = self.engine.source_for_write_key(write_key)
        assert record is not None, f"unknown write key {write_key!r}"
        return Space(self, record.space, record.name)

    def restart(self) -> None:
        """A fresh Engine on the same store (as after a process restart)."""
        self.engine = Engine(self.store, self.config)

    def close(self) -> None:
        self.store.close()


class Space:
    """Send messages to one space (optionally as one source) and read its graph."""

    def __init__(self, world: World, name: str, source: str | None = None) -> None:
        self.world = world
        self.name = name
        self.source = source

    # -- context manager: closes the world's store ----------------------------------------------
    def __enter__(self) -> Space:
        return self

    def __exit__(self, *exc: object) -> None:
        self.world.close()

    @property
    def store(self) -> Store:
        return self.world.store

    @property
    def engine(self) -> Engine:
        return self.world.engine

    @property
    def rules(self) -> IdentityRules:
        return self.engine.rules(self.name)

    def as_source(self, source: str | None) -> Space:
        """The same space, sending as another source."""
        return Space(self.world, self.name, source)

    # -- building and sending --------------------------------------------------------------------
    def message(self, type: str, *, at: datetime | None = None, **fields: Any) -> dict[str, Any]:
        """A raw Segment message dict with messageId and timestamp filled in when not given."""
        self.world.sent += 1
        count = self.world.sent
        raw: dict[str, Any] = {"type": type}
        if type == "track":
            raw["event"] = "Something Happened"
        raw.update(fields)
        raw.setdefault("messageId", f"{self.world.id_prefix}m{count}")
        if "timestamp" not in raw:
            when = at if at is not None else BASE + timedelta(minutes=count)
            raw["timestamp"] = format_timestamp(when)
        return raw

    def parse(self, raw: Mapping[str, Any]) -> Message | InvalidEvent:
        try:
            return parse_message(dict(raw), received_at=RECEIVED)
        except InvalidEvent as error:
            return error

    def ingest(self, raws: Iterable[Mapping[str, Any]]) -> IngestResult:
        """Ingest raw messages as one batch (invalid ones are passed on to be rejected)."""
        return self.engine.ingest([self.parse(raw) for raw in raws], space=self.name, source=self.source)

    def send(self, type: str, *, at: datetime | None = None, **fields: Any) -> MessageOutcome:
        """Build, ingest (alone) and return the outcome of one message."""
        result = self.ingest([self.message(type, at=at, **fields)])
        assert len(result.outcomes) == 1
        return result.outcomes[0]

    # -- reading ---------------------------------------------------------------------------------
    def profile_of(self, ref: str | Identifier) -> str | None:
        """The root profile of `type:value`, an Identifier, or a segment id (use_… / acc_…)."""
        if isinstance(ref, str) and ":" not in ref:
            return self.store.resolve_segment_id(self.name, ref)
        return self.store.find_profile(self.name, ident(ref))

    def _root(self, ref: str | Identifier) -> str:
        root = self.profile_of(ref)
        assert root is not None, f"no profile for {ref}"
        return root

    def identifier_records(self, ref: str | Identifier) -> list[IdentifierRecord]:
        return self.store.identifiers(self.name, self._root(ref))

    def identifiers_of(self, ref: str | Identifier) -> set[str]:
        """Every identifier (retired ones included) of the profile, as `type:value`."""
        return {f"{item.type}:{item.value}" for item in self.identifier_records(ref)}

    def retired_of(self, ref: str | Identifier) -> set[str]:
        return {f"{item.type}:{item.value}" for item in self.identifier_records(ref) if item.retired}

    def traits_of(self, ref: str | Identifier) -> dict[str, Any]:
        return self.store.traits(self.name, self._root(ref))

    def event_count_of(self, ref: str | Identifier) -> int:
        return self.store.event_count(self.name, self._root(ref))

    def events_of(self, ref: str | Identifier, limit: int = 1000) -> list[EventRecord]:
        return self.store.events(self.name, self._root(ref), limit=limit)

    def event_ids_of(self, ref: str | Identifier) -> set[str]:
        return {event.message_id for event in self.events_of(ref)}

    def links_of(self, ref: str | Identifier) -> set[str]:
        return set(self.store.links(self.name, self._root(ref)))

    def roots(self, collection: str = "users") -> list[str]:
        """Every root profile of a collection."""
        return [
            row[0] for row in self.store.dump(self.name)["profiles"] if row[1] == collection and row[2] == ""
        ]

    def all_identifier_values(self) -> set[str]:
        return {f"{row[1]}:{row[2]}" for row in self.store.dump(self.name)["identifiers"]}


def open_world(tmp_path: Path | None, toml: str | None = None) -> World:
    """An Engine over a SQLite file in tmp_path (in memory when tmp_path is None)."""
    url = "sqlite://" if tmp_path is None else f"sqlite:///{tmp_path}/idstitch.db"
    config = Config.default() if toml is None else config_from_toml(toml)
    return World(open_store(url), config)


def open_space(tmp_path: Path | None, toml: str | None = None, name: str | None = None) -> Space:
    """A Space over a fresh store; use as a context manager to close the store."""
    return open_world(tmp_path, toml).space(name)


@contextmanager
def world_at(tmp_path: Path | None, toml: str | None = None) -> Iterator[World]:
    world = open_world(tmp_path, toml)
    try:
        yield world
    finally:
        world.close()


def clean_env() -> dict[str, str]:
    """This process's environment without the IDSTITCH_* of the developer's shell, for a CLI subprocess."""
    return {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}


def committed_events(database: Path) -> int:
    """Events committed to a SQLite store so far, read through a read-only connection of its own (0 before
    the file or its schema exists), while another process writes it."""
    if not database.exists():
        return 0
    try:
        connection = sqlite3.connect(f"file:{database}?mode=ro", uri=True, timeout=5)
        try:
            return int(connection.execute("SELECT count(*) FROM events").fetchone()[0])
        finally:
            connection.close()
    except sqlite3.OperationalError:
        return 0


def wait_for(
    condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes], seconds: float = 90.0
) -> None:
    """Poll a condition of another process's doing (bounded) while `process` runs."""
    deadline = time.monotonic() + seconds
    while not condition():
        assert process.poll() is None, f"the process ended (exit {process.returncode}) before {what}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def kill_when(condition: Callable[[], bool], what: str, process: subprocess.Popen[bytes]) -> None:
    """SIGKILL `process` as soon as `condition` holds, as a crash would (no clean-up runs), and reap it."""
    try:
        wait_for(condition, what, process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == -signal.SIGKILL, f"{process.args!r} ended before it could be killed"


class FailsAtCommit:
    """A SQLite store's write connection whose COMMIT fails as on a full or failing disk: SQLite rolls the
    transaction back itself, then raises (SQLITE_FULL by default; SQLITE_IOERR_WRITE for a quota, a file
    size limit or a failing disk). Everything else goes to the real connection."""

    def __init__(
        self,
        db: sqlite3.Connection,
        code: int = sqlite3.SQLITE_FULL,
        message: str = "database or disk is full",
    ) -> None:
        self.db = db
        self.code = code
        self.message = message

    def execute(self, sql: str, *parameters: Any) -> sqlite3.Cursor:
        if sql == "COMMIT":
            self.db.execute("ROLLBACK")
            failure = sqlite3.OperationalError(self.message)
            failure.sqlite_errorcode = self.code
            raise failure
        return self.db.execute(sql, *parameters)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.db, name)


@contextmanager
def counted_steps(connection: sqlite3.Connection) -> Iterator[list[int]]:
    """Count the steps SQLite's virtual machine runs on `connection` inside: how much a read walked,
    measured without a clock (the count is `[0]` of what this yields)."""
    count = [0]

    def step() -> int:
        count[0] += 1
        return 0

    connection.set_progress_handler(step, 1)
    try:
        yield count
    finally:
        connection.set_progress_handler(None, 1)
