"""A store of N realistic profiles for `idstitch bench profile-api`, and the ids to look them up by.

Each seeded person has a user_id, an email, one to three browsers (one anonymous_id each), seven traits
and two to five messages: an identify from the first browser (userId, anonymousId, traits), one
identified page or track from each other browser (which attaches its anonymous_id), and up to two more
identified pages or tracks. Timestamps fall in the 90 days before 2026-01-01, where the generated
ingest workload (sim/population.py) begins. Every id is a function of (seed, index), so the lookup
process derives the user_id or email of any seeded person without reading the store.

How the rows get there, and why (measured on the 2-vCPU bench machine):

- through the engine: ~1,500 messages/s (README), about 30 minutes for the ~2.75M messages of 1M people;
- through the Store's write API (`apply_resolution`, `set_traits`, `add_event` per message, with
  hand-built `Resolution`s, 10,000 people per transaction): 50,000 people in 34 s and slowing as the
  store grows, so over 11 minutes for 1M; most of it one SQL statement per row plus per-call work;
- what this module does: the very rows the engine would write, inserted with one `executemany` per
  table per chunk of people, journaling and fsync off, a 1 GB page cache, into a file that becomes the
  cached store only once complete: 1M people in 5.6-6.2 minutes (a 5.3 GB file), ~60% of it in SQLite
  (a ~1 KB events row and 17 smaller rows per person), ~40% in Python building the rows. Rows sorted by
  primary key, one transaction for all, indexes dropped during the load, or a 4 GB cache gained
  nothing measurable; two shards seeded in parallel were 20% faster but merging them cost more.

This writes SQL to the store's schema directly, so it could drift from the engine when the schema or
the engine changes: tests/test_bench_profile_api.py ingests the same messages through `Engine.ingest`
and requires identical rows in every table. That the rows are known without running the resolver is
sound only because the seeded people share no identifier: a person's first message creates the profile
with all of its identifiers, every later one lands on it (no merge, no drop, no suspect).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Final

import msgspec

from idstitch.bench.runner import _cache_dir
from idstitch.core.segment_ids import new_segment_id
from idstitch.sim.population import FIRST_NAMES, LAST_NAMES, MAIL_DOMAINS, PLANS
from idstitch.storage.base import SourceRecord
from idstitch.storage.sqlite import SQLiteStore

__all__ = [
    "SOURCE",
    "SPACE",
    "SeedResult",
    "SeededMessage",
    "SeededPeople",
    "ensure_seeded_store",
    "seed_store",
]

SPACE: Final = "default"
SOURCE: Final = "web"
WRITE_KEY: Final = "wk_bench"  # the source's write key, as the bench config names it
FORMAT: Final = 2  # bump when what the seeder writes changes: cached stores of older formats are not reused
DEFAULT_CHUNK: Final = 10_000  # people per transaction

_M64: Final = (1 << 64) - 1
_DAY_MS: Final = 86_400_000
_START_MS: Final = int(datetime(2025, 10, 3, tzinfo=UTC).timestamp() * 1000)
_SPAN_MS: Final = 85 * _DAY_MS  # of first messages; later ones follow within days, all before 2026-01-01
_encode = msgspec.json.encode

_FIRST, _LAST, _DOMAINS, _PLANS = FIRST_NAMES, LAST_NAMES, MAIL_DOMAINS, PLANS  # the simulator's vocabulary
_COUNTRIES = ("US", "GB", "DE", "FR", "ES", "JP", "BR", "IN")
_LOCALES = ("en-US", "en-GB", "de-DE", "fr-FR", "es-ES", "ja-JP", "pt-BR", "en-IN")
_USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
)
_SITE = "https://shop.example.com"
_PAGES = (
    ("/", "Home"),
    ("/pricing", "Pricing"),
    ("/docs", "Documentation"),
    ("/products/widget", "Widget"),
    ("/products/gadget", "Gadget"),
    ("/cart", "Cart"),
    ("/account", "Account"),
)
_EVENTS = ("Product Viewed", "Product Added", "Cart Viewed", "Checkout Started")
_LIBRARY = {"name": "analytics.js", "version": "next-1.70.0"}
# Shared between messages (they are only encoded, never changed): building them per message is waste.
_LOGIN_PAGE = {"path": "/login", "title": "Log in", "url": _SITE + "/login"}
_PAGE_CONTEXT = tuple({"path": path, "title": title, "url": _SITE + path} for path, title in _PAGES)
_PAGE_PROPERTIES = tuple(
    {"path": path, "title": title, "url": _SITE + path, "referrer": ""} for path, title in _PAGES
)
_PRODUCTS = tuple({"product_id": f"sku_{n:04d}", "price": round(4.99 + n * 7.5, 2)} for n in range(12))


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a bijection of 64-bit ints, so distinct inputs give distinct outputs."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_day_prefixes: dict[int, str] = {}


def _format_ms(ms: int) -> str:
    """Epoch milliseconds as the core formats timestamps ("2025-10-03T08:15:02.123Z"), ~5x cheaper."""
    day, rest = divmod(ms, _DAY_MS)
    prefix = _day_prefixes.get(day)
    if prefix is None:
        prefix = _day_prefixes[day] = (datetime(1970, 1, 1) + timedelta(days=day)).strftime("%Y-%m-%dT")
    seconds, millis = divmod(rest, 1000)
    minutes, second = divmod(seconds, 60)
    hour, minute = divmod(minutes, 60)
    return f"{prefix}{hour:02d}:{minute:02d}:{second:02d}.{millis:03d}Z"


@dataclass(frozen=True, slots=True)
class SeededMessage:
    """One message of a seeded person: its Segment JSON, and its times in epoch milliseconds."""

    index: int  # the person
    step: int  # 0: the identify that creates the profile
    device: int  # which of the person's browsers sent it
    raw: dict[str, Any]
    timestamp_ms: int
    received_ms: int


class SeededPeople:
    """The deterministic population of one seed: ids and messages of person `index`, in any order."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        base = _mix64(seed & _M64)
        self._salts = tuple(_mix64((base + n * 0x9E3779B97F4A7C15) & _M64) for n in range(6))

    def _hash(self, index: int, salt: int) -> int:
        return _mix64((index ^ self._salts[salt]) & _M64)

    def user_id(self, index: int) -> str:
        """The person's userId (unique: a bijection of the index)."""
        return f"usr_{self._hash(index, 0):016x}"

    def email(self, index: int) -> str:
        """The person's email, lower case as the email rule normalises it (unique: it holds the index)."""
        return self._email(index, self._hash(index, 1))

    def _email(self, index: int, h: int) -> str:
        first, last = _FIRST[h % len(_FIRST)], _LAST[(h >> 8) % len(_LAST)]
        return f"{first.lower()}.{last.lower()}{index}@{_DOMAINS[(h >> 16) % len(_DOMAINS)]}"

    def anonymous_id(self, index: int, device: int) -> str:
        """The anonymousId of one browser, UUID-shaped (unique: its first half is a bijection)."""
        key = (index << 2) | device
        text = f"{self._hash(key, 2):016x}{self._hash(key, 3):016x}"
        return f"{text[:8]}-{text[8:12]}-{text[12:16]}-{text[16:20]}-{text[20:]}"

    def messages(self, index: int) -> list[SeededMessage]:
        """The person's messages, oldest first (strictly increasing timestamps)."""
        names = self._hash(index, 1)
        first, last = _FIRST[names % len(_FIRST)], _LAST[(names >> 8) % len(_LAST)]
        draw = (names >> 24) & 0xFF
        devices = 1 if draw < 115 else 2 if draw < 205 else 3  # 45% / 35% / 20%
        h = self._hash(index, 4)
        extra = (h >> 40) % 3  # identified messages beyond the one per further browser
        at_ms = _START_MS + h % _SPAN_MS
        user_id = self.user_id(index)
        anonymous_ids = [self.anonymous_id(index, device) for device in range(devices)]
        ua = _USER_AGENTS[(h >> 48) % len(_USER_AGENTS)]
        locale = _LOCALES[(h >> 52) % len(_LOCALES)]
        prefix = f"seed{self.seed}-{index:x}-"
        out: list[SeededMessage] = []
        for step in range(devices + extra):
            draw = self._hash((index << 3) | step, 5)
            if step:
                at_ms += 60_000 + draw % (2 * _DAY_MS)  # a minute to two days later
            device = step if step < devices else draw % devices
            received_ms = at_ms + 40 + (draw >> 32) % 2000
            raw: dict[str, Any] = {
                "type": "identify",
                "messageId": f"{prefix}{step}-{draw & 0xFFFFFF:06x}",
                "timestamp": _format_ms(at_ms),
                "receivedAt": _format_ms(received_ms),
                "userId": user_id,
                "anonymousId": anonymous_ids[device],
            }
            if step == 0:
                raw["traits"] = {
                    "email": self._email(index, names),
                    "name": f"{first} {last}",
                    "first_name": first,
                    "last_name": last,
                    "plan": _PLANS[(names >> 32) % len(_PLANS)],
                    "country": _COUNTRIES[(names >> 40) % len(_COUNTRIES)],
                    "created_at": raw["timestamp"],
                }
                page_context = _LOGIN_PAGE
            elif (draw >> 24) & 1:
                page = (draw >> 25) % len(_PAGES)
                raw["type"] = "page"
                raw["name"] = _PAGES[page][1]
                raw["properties"] = _PAGE_PROPERTIES[page]
                page_context = _PAGE_CONTEXT[page]
            else:
                raw["type"] = "track"
                raw["event"] = _EVENTS[(draw >> 25) % len(_EVENTS)]
                raw["properties"] = _PRODUCTS[(draw >> 28) % len(_PRODUCTS)]
                page_context = _PAGE_CONTEXT[(draw >> 28) % len(_PAGE_CONTEXT)]
            raw["context"] = {"library": _LIBRARY, "page": page_context, "userAgent": ua, "locale": locale}
            out.append(SeededMessage(index, step, device, raw, at_ms, received_ms))
        return out

    def chunk(self, start: int, stop: int) -> list[SeededMessage]:
        """The messages of people [start, stop) in timestamp order, as a stream would interleave them."""
        found = [message for index in range(start, stop) for message in self.messages(index)]
        found.sort(key=lambda message: (message.timestamp_ms, message.index, message.step))
        return found


@dataclass(slots=True)
class _Rows:
    """The rows one chunk of people adds, per table."""

    profiles: list[tuple[Any, ...]]
    identifiers: list[tuple[Any, ...]]
    evidence: list[tuple[Any, ...]]
    traits: list[tuple[Any, ...]]
    events: list[tuple[Any, ...]]


def _rows(messages: list[SeededMessage]) -> _Rows:
    """What the engine writes for these messages (the people's first messages come first per person).

    Per person: the identify creates the profile owning user_id, its anonymous_id and the email (the
    latter two "device-owned" by it, each less trusted identifier stored as evidence against each more
    trusted one); every later message touches user_id and its browser's anonymous_id (last seen, and
    the device ownership time), attaching that anonymous_id with its evidence against user_id when new.
    user_id's window is "ever", so a known pair's evidence time is never refreshed.
    """
    rows = _Rows([], [], [], [], [])
    profiles: dict[int, str] = {}
    user_rows: dict[int, list[Any]] = {}
    anonymous_rows: dict[tuple[int, int], list[Any]] = {}
    for message in messages:
        raw = message.raw
        index = message.index
        message_id = raw["messageId"]
        at = message.timestamp_ms * 1000
        user_id, anonymous_id = raw["userId"], raw["anonymousId"]
        if message.step == 0:
            profile = profiles[index] = new_segment_id(SPACE, message_id, "users")
            email = raw["traits"]["email"]
            rows.profiles.append((SPACE, profile, "users", at, message_id))
            user_rows[index] = [SPACE, "users", "user_id", user_id, profile, at, at, None, None, message_id]
            rows.identifiers.append(
                (SPACE, "users", "email", email, profile, at, at, profile, at, message_id)
            )
            rows.evidence += [
                (SPACE, "users", "anonymous_id", anonymous_id, "user_id", user_id, at),
                (SPACE, "users", "anonymous_id", anonymous_id, "email", email, at),
                (SPACE, "users", "email", email, "user_id", user_id, at),
            ]
            rows.traits += [
                (SPACE, profile, key, _encode(value).decode(), at, message_id)
                for key, value in raw["traits"].items()
            ]
            carried = [f"user_id:{user_id}", f"anonymous_id:{anonymous_id}", f"email:{email}"]
        else:
            profile = profiles[index]
            user_rows[index][6] = at  # last_seen
            carried = [f"user_id:{user_id}", f"anonymous_id:{anonymous_id}"]
        device = anonymous_rows.get((index, message.device))
        if device is None:
            device = [SPACE, "users", "anonymous_id", anonymous_id, profile, at, at, profile, at, message_id]
            anonymous_rows[(index, message.device)] = device
            if message.step:
                rows.evidence.append((SPACE, "users", "anonymous_id", anonymous_id, "user_id", user_id, at))
        else:
            device[6] = device[8] = at  # last_seen, device_owner_at
        kind = raw["type"]
        rows.events.append(
            (
                SPACE,
                message_id,
                kind,
                raw.get("event") if kind == "track" else raw.get("name"),
                at,
                message.received_ms * 1000,
                profile,
                _encode(carried).decode(),
                _encode(raw),
            )
        )
    rows.identifiers += [tuple(row) for row in user_rows.values()]
    rows.identifiers += [tuple(row) for row in anonymous_rows.values()]
    return rows


_INSERTS: Final = (
    (
        "profiles",
        "INSERT INTO profiles (space, segment_id, collection, created_at, created_by) VALUES (?, ?, ?, ?, ?)",
    ),
    (
        "identifiers",
        "INSERT INTO identifiers (space, collection, type, value, profile_id, first_seen, last_seen, "
        "device_owner, device_owner_at, first_message_id, source) "
        f"VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, '{SOURCE}')",
    ),
    ("evidence", "INSERT INTO evidence VALUES (?, ?, ?, ?, ?, ?, ?)"),
    (
        "traits",
        "INSERT INTO traits (space, profile_id, key, value, set_at, source, message_id) "
        f"VALUES (?, ?, ?, ?, ?, '{SOURCE}', ?)",
    ),
)
_INSERT_EVENTS: Final = (
    "INSERT INTO events (space, message_id, type, name, timestamp, received_at, source, profile_id, "
    f"account_id, identifiers, payload) VALUES (?, ?, ?, ?, ?, ?, '{SOURCE}', ?, NULL, ?, ?)"
)


def _write(db: sqlite3.Connection, rows: _Rows) -> None:
    """One transaction of a chunk's rows."""
    db.execute("BEGIN")
    try:
        for table, sql in _INSERTS:
            db.executemany(sql, getattr(rows, table))
        db.executemany(_INSERT_EVENTS, rows.events)  # in stream order: `sequence` is ingest order
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


@dataclass(frozen=True, slots=True)
class SeedResult:
    """What seeding wrote and how long it took."""

    profiles: int
    messages: int
    seconds: float


def seed_store(
    path: Path,
    profiles: int,
    seed: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> SeedResult:
    """Write `profiles` seeded people into a new SQLite file at `path` (people done go to `progress`)."""
    if path.exists():
        raise FileExistsError(f"{path} exists; seeding needs a fresh file")
    started = time.perf_counter()
    store = SQLiteStore(path)  # the schema, exactly as the store migrates it
    try:
        store.ensure_space(SPACE)
        store.upsert_source(SourceRecord(SPACE, SOURCE, WRITE_KEY))
    finally:
        store.close()
    people = SeededPeople(seed)
    written = 0
    db = sqlite3.connect(path, isolation_level=None)
    try:
        # A half-written file is never used (the caller renames it once complete): no journal, no fsync.
        db.execute("PRAGMA journal_mode=OFF")
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-1000000")  # 1 GB (4 GB measured no faster at 1M)
        for start in range(0, profiles, chunk):
            messages = people.chunk(start, min(profiles, start + chunk))
            _write(db, _rows(messages))
            written += len(messages)
            if progress is not None:
                progress(min(profiles, start + chunk))
    finally:
        db.close()
    return SeedResult(profiles, written, time.perf_counter() - started)


def _schema_version() -> int:
    folder = resources.files("idstitch.storage.migrations.sqlite")
    numbers = [int(entry.name.partition("_")[0]) for entry in folder.iterdir() if entry.name.endswith(".sql")]
    return max(numbers, default=0)


def ensure_seeded_store(
    profiles: int,
    seed: int,
    *,
    chunk: int = DEFAULT_CHUNK,
    progress: Callable[[int], None] | None = None,
) -> tuple[Path, SeedResult | None]:
    """The cached seeded file for (profiles, seed), written first if missing; the SeedResult when it was."""
    name = f"profiles-{profiles}-{seed}-f{FORMAT}-m{_schema_version()}.db"
    path = _cache_dir() / name
    if path.exists():
        return path, None
    partial = path.with_name(name + ".partial")
    for leftover in _sqlite_files(partial):
        leftover.unlink(missing_ok=True)  # an earlier run was interrupted
    try:
        result = seed_store(partial, profiles, seed, chunk=chunk, progress=progress)
    except BaseException:  # Ctrl-C or a full disk: no half-seeded file (GBs at 1M) is left in the cache
        for leftover in _sqlite_files(partial):
            leftover.unlink(missing_ok=True)
        raise
    partial.replace(path)
    return path, result


def _sqlite_files(path: Path) -> Iterator[Path]:
    yield path
    for suffix in ("-wal", "-shm", "-journal"):
        yield path.with_name(path.name + suffix)
