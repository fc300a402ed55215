"""Deterministic synthetic Segment workloads with ground truth for benchmarks, crash tests and accuracy.

`generate(WorkloadConfig(messages=n, seed=s))` streams exactly ``n`` Segment-spec messages, each
with the person and account that truly sent it and the scenario that produced it. The same
``(config)`` always gives the same messages, byte for byte: all randomness comes from one
``random.Random(seed)`` and every id is derived from the seed and a counter, never from the clock.

Population (defaults): ``messages // 8`` people arriving over the whole span; 62% are registered
(they have a userId and log in after a few anonymous pages; the rest only ever browse
anonymously); 20% of people (all registered) belong to one of ``people // 20`` B2B accounts. Each
person has 1 (45%), 2 (35%) or 3 (20%) devices: web (50%: analytics.js, anonymousId only,
``context.page`` / ``userAgent``), iOS (25%) or Android (25%) apps (anonymousId plus
``context.device`` {id, type, advertisingId, adTrackingEnabled} and ``context.os.name``; with
tracking off the advertisingId is the zero UUID, as real SDKs send). Another 2% of all devices are
shared (library / family computers) on which 2–5 registered people log in over time. 3% of people
are due to change their email; those who log in do so once (~1.4% of people in a 1M run).

Message mix of a 1M-message run with the defaults (measured):

=================  ======  ==================================================================
scenario           share   what
=================  ======  ==================================================================
``anonymous``      55.6%   page / screen / track with the device's anonymousId only, before
                           the first login and after logouts
``login``          25.9%   identify (userId + anonymousId + traits {email, name, plan}) and
                           identified events (userId + anonymousId) on the person's first
                           logged-in device
``cross_device``    4.4%   the same on the person's other devices (several anonymousIds join
                           through one userId)
``crm``             5.0%   server side: identify with only ``traits.email`` (10% with stray
                           case / spaces), or a track with only ``context.externalIds``
                           [crm_id] (plus the userId the first time, then 30% of the time)
``shared_device``   3.0%   logins, identified and anonymous events on shared devices; the truth
                           of any message there is the person who last logged in on it
``group``           2.0%   group(userId, groupId, traits {name, plan, employees, industry})
``junk_id``         1.0%   a real userId with a junk anonymousId ("null", "undefined", zeros,
                           "[object Object]", "-1", ""); 0.05% of messages carry only a junk
                           anonymousId (never "") and have truth person ""
``retry``           1.0%   an earlier message again, same messageId and bytes, 1–200 later
``clock_skew``      1.0%   ``originalTimestamp`` / ``sentAt`` from a device clock off by up to
                           ±2 days, plus ``receivedAt``; ``timestamp`` is the corrected time
                           (receivedAt − (sentAt − originalTimestamp))
``out_of_order``    0.8%   timestamp 1 s – 10 min before the person's previous message
``alias``           0.2%   alias(previousId = one of the person's anonymousIds, userId)
``email_change``    0.2%   identify(userId + anonymousId, traits.email = a new address)
=================  ======  ==================================================================

Timestamps ("2026-01-01T00:00:00.000Z") put message *i* in slot *i* of ``days`` evenly divided, so
the stream is non-decreasing apart from the out-of-order messages and retries. People are
interleaved: each step samples one of up to 512 active sessions, and a session ends after each
message with probability 0.2.

Memory is O(people) in compact arrays (about 20 bytes per person; a 1M-message run peaks near
35 MB RSS) plus a bounded cache of recent visitors; strings (ids, emails, contexts) are derived
from the seed whenever a person becomes active. To keep generation fast, constant nested dicts
(``context.library``, ``context.device``, page properties, ...) are shared between messages:
treat generated messages as read-only below the top level and ``context``, or copy them.
"""

from __future__ import annotations

import gzip
import heapq
import random
from array import array
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, NamedTuple

import msgspec

__all__ = [
    "FIRST_NAMES",
    "LAST_NAMES",
    "MAIL_DOMAINS",
    "PLANS",
    "SCENARIOS",
    "GeneratedMessage",
    "WorkloadConfig",
    "generate",
    "write_ndjson",
]

SCENARIOS: tuple[str, ...] = (
    "anonymous",
    "login",
    "cross_device",
    "shared_device",
    "junk_id",
    "group",
    "crm",
    "retry",
    "email_change",
    "alias",
    "out_of_order",
    "clock_skew",
)

# Values buggy SDKs really send as anonymousId; all are on the default block list (DEFAULTS.md).
JUNK_ANONYMOUS_IDS: tuple[str, ...] = (
    "null",
    "undefined",
    "00000000-0000-0000-0000-000000000000",
    "[object Object]",
    "-1",
    "",
)
# A message whose *only* identifier is junk must still carry one, and "" would make it invalid
# (no identifier at all) rather than unresolved, so junk-only messages never use "".
_JUNK_ONLY_IDS = JUNK_ANONYMOUS_IDS[:-1]
_ZERO_AD_ID = "00000000-0000-0000-0000-000000000000"


@dataclass(frozen=True)
class WorkloadConfig:
    """Size, seed, time span and mix of a synthetic workload (rates are fractions)."""

    messages: int
    seed: int = 1
    start: datetime = datetime(2026, 1, 1, tzinfo=UTC)
    days: int = 90
    people: int | None = None  # default messages // 8 (at least 1)
    accounts: int | None = None  # default people // 20 (at least 1)
    registered_rate: float = 0.62  # of people: have a userId and log in
    b2b_rate: float = 0.20  # of people: belong to an account
    shared_device_rate: float = 0.02  # of devices
    shared_message_rate: float = 0.03  # of messages, on shared devices
    email_change_rate: float = 0.03  # of people
    junk_rate: float = 0.01  # of messages: real userId + junk anonymousId
    junk_only_rate: float = 0.0005  # of messages: only a junk anonymousId
    crm_rate: float = 0.05  # of messages
    group_rate: float = 0.02  # of messages
    alias_rate: float = 0.002  # of messages
    retry_rate: float = 0.01  # of messages
    out_of_order_rate: float = 0.01  # of messages
    clock_skew_rate: float = 0.01  # of messages

    def __post_init__(self) -> None:
        """Reject sizes and rates that cannot describe a workload."""
        if self.messages < 0:
            raise ValueError("messages must be >= 0")
        if self.days < 1:
            raise ValueError("days must be >= 1")
        if self.start.tzinfo is None:
            raise ValueError("start must be timezone-aware")
        if self.people is not None and self.people < 1:
            raise ValueError("people must be >= 1")
        if self.accounts is not None and self.accounts < 1:
            raise ValueError("accounts must be >= 1")
        rates = {
            name: getattr(self, name)
            for name in (
                "registered_rate",
                "b2b_rate",
                "shared_device_rate",
                "shared_message_rate",
                "email_change_rate",
                "junk_rate",
                "junk_only_rate",
                "crm_rate",
                "group_rate",
                "alias_rate",
                "retry_rate",
                "out_of_order_rate",
                "clock_skew_rate",
            )
        }
        for name, value in rates.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1]")
        if self.shared_device_rate >= 1.0:
            raise ValueError("shared_device_rate must be < 1")
        special = (
            self.junk_rate
            + self.junk_only_rate
            + self.crm_rate
            + self.group_rate
            + self.alias_rate
            + self.shared_message_rate
        )
        if special > 0.9:
            raise ValueError("the non-browsing scenario rates leave too little room for browsing")


class GeneratedMessage(NamedTuple):
    """One synthetic message and its ground truth."""

    message: dict[str, Any]
    person: str
    account: str
    scenario: str


# --- deterministic id derivation ------------------------------------------------------------------

_M64 = (1 << 64) - 1
# messageIds step a Weyl sequence (x += odd constant mod 2**64): it visits every 64-bit value once
# per cycle, so ids are unique and look scattered for the cost of one addition. userIds use the
# same odd constant as a multiplier, also a bijection mod 2**64.
_MID_MULT = 0x9E3779B97F4A7C15


def _mix64(x: int) -> int:
    """Scramble a 64-bit int bijectively (splitmix64 finaliser), so distinct inputs give distinct ids."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _M64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _M64
    return x ^ (x >> 31)


_M128 = (1 << 128) - 1
_MULT128 = 0x9E3779B97F4A7C15F39CC0605CEDC835


def _scramble(x: int, salt: int) -> int:
    """Scramble a 128-bit int bijectively and cheaply (xor, odd multiply, fold the high bits down)."""
    x = ((x ^ salt) * _MULT128) & _M128
    return x ^ (x >> 67)


def _uuid(x: int) -> str:
    """Format a 128-bit int as a UUID-shaped string (every bit kept, so distinct ints stay distinct)."""
    h = f"{x:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


# --- static vocabulary ----------------------------------------------------------------------------

FIRST_NAMES = (
    "Ada", "Alan", "Alice", "Amir", "Ana", "Ben", "Bob", "Carla", "Chen", "Dana", "David", "Elena",
    "Emma", "Farah", "Grace", "Hiro", "Ines", "Ivan", "Jane", "Jin", "Jonas", "Kai", "Lara", "Leo",
    "Lina", "Marco", "Maria", "Mei", "Nina", "Noah", "Olga", "Omar", "Paul", "Priya", "Rosa", "Sam",
    "Sara", "Tom", "Uma", "Yuki",
)  # fmt: skip
LAST_NAMES = (
    "Adams", "Baker", "Costa", "Diaz", "Evans", "Fischer", "Garcia", "Haddad", "Ito", "Jensen",
    "Kim", "Lopez", "Martin", "Nakamura", "Novak", "Okafor", "Patel", "Quinn", "Rossi", "Silva",
    "Smith", "Tanaka", "Usman", "Varga", "Wang", "Weber", "Xu", "Yilmaz", "Young", "Zhang",
)  # fmt: skip
MAIL_DOMAINS = ("gmail.com", "yahoo.com", "outlook.com", "icloud.com", "proton.me", "hotmail.com")
_NEW_MAIL_DOMAINS = ("fastmail.com", "gmx.net", "hey.com", "mail.com")
PLANS = ("free", "free", "starter", "pro", "enterprise")
_COMPANY_A = ("Blue", "North", "Bright", "Iron", "Silver", "Green", "Rapid", "Clear", "Bold", "Prime")
_COMPANY_B = ("Harbor", "Peak", "Forge", "Labs", "Works", "Systems", "Analytics", "Cloud", "Logic", "Ware")
_INDUSTRIES = ("software", "retail", "finance", "healthcare", "education", "logistics", "media")
_PAGES = (
    ("/", "Home"),
    ("/pricing", "Pricing"),
    ("/docs", "Documentation"),
    ("/blog/identity-resolution", "Identity resolution explained"),
    ("/products/widget", "Widget"),
    ("/products/gadget", "Gadget"),
    ("/cart", "Cart"),
    ("/checkout", "Checkout"),
    ("/signup", "Sign up"),
    ("/login", "Log in"),
)
_SITE = "https://shop.example.com"
_REFERRERS = ("", "", "https://www.google.com/", "https://news.ycombinator.com/", "https://t.co/")
_CART_PAGE, _SIGNUP_PAGE, _LOGIN_PAGE = 6, 8, 9
# Constant sub-dicts are shared between messages (building them per message halves the speed), so
# consumers must treat nested dicts of generated messages as read-only; top levels are fresh.
_PAGE_PROPERTIES: tuple[dict[str, Any], ...] = tuple(
    {"path": path, "title": title, "url": _SITE + path, "referrer": _REFERRERS[n % len(_REFERRERS)]}
    for n, (path, title) in enumerate(_PAGES)
)
_PAGE_CONTEXT: tuple[dict[str, Any], ...] = tuple(
    {"path": path, "title": title, "url": _SITE + path} for path, title in _PAGES
)
_SCREENS = ("Home", "Search", "Product", "Cart", "Checkout", "Orders", "Settings", "Profile")
_EVENTS = ("Products Searched", "Product Viewed", "Product Added", "Cart Viewed", "Checkout Started")
_SKUS = tuple((f"sku_{n:04d}", round(4.99 + n * 7.5, 2)) for n in range(12))
_SKU_PROPERTIES: tuple[dict[str, Any], ...] = tuple(
    {"product_id": sku, "price": price} for sku, price in _SKUS
)
_USER_AGENTS = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/124.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_4) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.4 Safari/605.1.15",
    "Mozilla/5.0 (X11; Linux x86_64; rv:125.0) Gecko/20100101 Firefox/125.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_4 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
)
_LOCALES = ("en-US", "en-GB", "de-DE", "fr-FR", "es-ES", "ja-JP", "pt-BR")
_IOS_MODELS = ("iPhone14,2", "iPhone15,3", "iPhone16,1", "iPad13,4")
_IOS_VERSIONS = ("16.7", "17.4", "17.5")
_ANDROID_MODELS = (("samsung", "SM-S918B"), ("Google", "Pixel 8"), ("Xiaomi", "2201117TG"))
_ANDROID_VERSIONS = ("12", "13", "14")
_LIB_WEB = ("analytics.js", "next-1.70.0")
_LIB_IOS = ("analytics-ios", "4.1.8")
_LIB_ANDROID = ("analytics-android", "4.11.3")
_LIB_SERVER = ("analytics-node", "6.2.0")
_LIB_CRM = ("analytics-python", "2.3.2")
_LIB_BUGGY = ("analytics-react-native", "2.1.0-beta.3")
_APP = ("Shop", "5.2.0", "520")

_WEB, _IOS, _ANDROID = 0, 1, 2
_NO_DICT: dict[str, Any] = {}  # placeholder for the app / device / os of browsers, never emitted
_REGISTERED, _EMAIL_CHANGED, _CRM_LINKED, _EMAIL_PENDING = 1, 2, 4, 8

# Behaviour inside the browsing flow (not configurable: they shape sessions, not the mix).
_SESSION_END = 0.2  # chance a session ends after each message
_DEVICE_SWITCH = 0.15  # chance to move to another own device mid-session
_LOGIN = 0.3  # chance to log in on a logged-out device, per message, once the first login happened
_LOGOUT = 0.15  # chance a logged-in message is the last one before logging out
_EMAIL_CHANGE = 0.5  # chance a logged-in message of a person due to change email is the change
_RECENT = 4096  # recent visitors kept with their derived strings
_RETURN_RECENT = 0.7  # of returning sessions, the share by a recent visitor
_SHARED_RELOGIN = 0.3  # chance the next message on a shared device is someone logging in


class _Device:
    """The derived, constant parts of one device, including its read-only context sub-dicts."""

    __slots__ = ("anon", "app", "dev", "kind", "lib", "locale", "os", "ua")

    def __init__(self, kind: int, key: int, keys: tuple[int, ...]) -> None:
        self.kind = kind
        a = _scramble(key, keys[0])
        self.anon = _uuid(a)
        # Spare bits of the derived ids choose the cosmetic attributes, so no rng draw is needed
        # and a device looks the same in every session.
        self.locale = _LOCALES[(a >> 8) % len(_LOCALES)]
        self.ua = _USER_AGENTS[(a >> 16) % len(_USER_AGENTS)]
        self.app = self.dev = self.os = _NO_DICT
        if kind == _WEB:
            self.lib = {"name": _LIB_WEB[0], "version": _LIB_WEB[1]}
            return  # browsers only have the anonymousId
        d = _scramble(key, keys[1])
        f = _scramble(key, keys[2])
        if kind == _IOS:
            lib, os_name, dtype, maker = _LIB_IOS, "iOS", "ios", "Apple"
            device_id = _uuid(d).upper()
            model = _IOS_MODELS[(d >> 24) % len(_IOS_MODELS)]
            os_version = _IOS_VERSIONS[(d >> 32) % len(_IOS_VERSIONS)]
            ad_on = (f & 0xFF) < 77  # ~30% allow tracking under ATT
        else:
            lib, os_name, dtype = _LIB_ANDROID, "Android", "android"
            device_id = f"{_mix64(key ^ (keys[1] & _M64)):016x}"  # ANDROID_ID: 64 bits, still unique
            maker, model = _ANDROID_MODELS[(d >> 24) % len(_ANDROID_MODELS)]
            os_version = _ANDROID_VERSIONS[(d >> 32) % len(_ANDROID_VERSIONS)]
            ad_on = (f & 0xFF) < 180
        self.lib = {"name": lib[0], "version": lib[1]}
        self.app = {"name": _APP[0], "version": _APP[1], "build": _APP[2]}
        self.dev = {
            "id": device_id,
            "type": dtype,
            # Phones with tracking off send the zero advertising id, as real SDKs do.
            "advertisingId": _uuid(f).upper() if ad_on else _ZERO_AD_ID,
            "adTrackingEnabled": ad_on,
            "manufacturer": maker,
            "model": model,
        }
        self.os = {"name": os_name, "version": os_version}

    def context(self, page: int) -> dict[str, Any]:
        """Build the `context` the SDK on this device sends (web pages name the page shown)."""
        if self.kind == _WEB:
            return {
                "library": self.lib,
                "page": _PAGE_CONTEXT[page],
                "userAgent": self.ua,
                "locale": self.locale,
            }
        return {
            "library": self.lib,
            "app": self.app,
            "device": self.dev,
            "os": self.os,
            "locale": self.locale,
        }


class _Person:
    """The derived strings of one person, built when the person becomes active."""

    __slots__ = ("account", "codes", "cur", "devices", "idx", "keys", "ndev", "pid", "pop", "user_id")

    def __init__(self, pop: _Population, idx: int) -> None:
        # Only what almost every message needs is derived here; names and emails wait for an identify.
        self.pop = pop
        self.keys = pop.keys
        self.idx = idx
        self.pid = f"p_{idx:06d}"
        acc = pop.p_account[idx]
        self.account = pop.account_info(acc)[0] if acc >= 0 else ""
        # One odd multiply is a bijection mod 2**64: unique userIds at a fraction of a full mix.
        self.user_id = f"usr_{(idx * _MID_MULT + self.keys[4]) & _M64:016x}"
        code = pop.p_dev[idx]
        self.ndev = code & 3
        self.codes = code
        self.devices: list[_Device | None] = [None, None, None]
        self.cur = 0

    def device(self, d: int) -> _Device:
        """Return device `d`, deriving it on first use (most sessions touch one device)."""
        dev = self.devices[d]
        if dev is None:
            kind = (self.codes >> (2 + 2 * d)) & 3
            dev = _Device(kind, (self.idx << 2) | d, self.keys)
            self.devices[d] = dev
        return dev

    def names(self) -> tuple[str, str, str]:
        """Return (first name, last name, plan)."""
        h = _mix64(self.idx ^ (self.keys[5] & _M64))
        return (
            FIRST_NAMES[h % len(FIRST_NAMES)],
            LAST_NAMES[(h >> 16) % len(LAST_NAMES)],
            PLANS[(h >> 32) % len(PLANS)],
        )

    def email(self, new: bool) -> str:
        """Return the original address, or the one the person changes to when `new`."""
        idx = self.idx
        h = _mix64(idx ^ (self.keys[5] & _M64))
        first = FIRST_NAMES[h % len(FIRST_NAMES)].lower()
        if new:
            # No dot in the local part: it can never equal anyone's original address.
            return f"{first}{idx}@{_NEW_MAIL_DOMAINS[(h >> 48) % len(_NEW_MAIL_DOMAINS)]}"
        acc = self.pop.p_account[idx]
        domain = self.pop.account_domain(acc) if acc >= 0 else MAIL_DOMAINS[(h >> 40) % len(MAIL_DOMAINS)]
        # The person index keeps addresses unique across people (names hold no digits).
        return f"{first}.{LAST_NAMES[(h >> 16) % len(LAST_NAMES)].lower()}{idx}@{domain}"


_SECOND_MILLIS: list[str] = []  # "SS.mmmZ" for every millisecond of a minute, built on first use


class _Clock:
    """Formats epoch milliseconds as Segment timestamps ("2026-01-01T00:00:00.000Z"), caching the minute."""

    __slots__ = ("_days", "_minute", "_prefix", "_tail")

    def __init__(self) -> None:
        # A 60,000-entry table (~4 MB, shared) turns the per-message formatting into one lookup
        # and one concatenation; the stream is nearly monotonic, so the minute prefix is cached.
        if not _SECOND_MILLIS:
            _SECOND_MILLIS.extend(f"{n // 1000:02d}.{n % 1000:03d}Z" for n in range(60_000))
        self._tail = _SECOND_MILLIS
        self._days: dict[int, str] = {}
        self._minute = -1
        self._prefix = ""

    def fmt(self, ms: int) -> str:
        """Return the ISO-8601 UTC string of `ms` milliseconds since the epoch."""
        minute = ms // 60_000
        if minute != self._minute:
            day, minute_of_day = divmod(minute, 1440)
            day_prefix = self._days.get(day)
            if day_prefix is None:
                day_prefix = (datetime(1970, 1, 1) + timedelta(days=day)).strftime("%Y-%m-%dT")
                self._days[day] = day_prefix
            hour, mm = divmod(minute_of_day, 60)
            self._prefix = f"{day_prefix}{hour:02d}:{mm:02d}:"
            self._minute = minute
        return self._prefix + self._tail[ms - minute * 60_000]


_Out = tuple[dict[str, Any], str, str, str]


class _Population:
    """The whole simulated world: compact per-person state, accounts, shared devices, the stream."""

    def __init__(self, cfg: WorkloadConfig) -> None:
        self.cfg = cfg
        rng = random.Random(cfg.seed)
        self.rng = rng
        self.rnd = rng.random  # bound once: it is called ~10 times per message
        # 128-bit salts for the derived ids (the 64-bit uses mask them down).
        self.keys: tuple[int, ...] = tuple(rng.getrandbits(128) for _ in range(8))
        n_people = cfg.people if cfg.people is not None else max(1, cfg.messages // 8)
        n_accounts = cfg.accounts if cfg.accounts is not None else max(1, n_people // 20)
        self.n_people = n_people
        self.n_accounts = n_accounts
        # Compact per-person state: a few bytes each, so 10M messages stay well under 100 MB.
        self.p_dev = array("B", bytes(n_people))  # device count (2 bits) + 2 bits of kind per device
        self.p_flags = array("B", bytes(n_people))
        self.p_logged = array("B", bytes(n_people))  # bit d: logged in on device d
        self.p_first_dev = array("b", [-1]) * n_people  # device of the first login, -1 before
        self.p_budget = array("B", bytes(n_people))  # anonymous messages before the first login
        self.p_account = array("i", [-1]) * n_people
        self.p_last = array("q", [-1]) * n_people  # last timestamp (ms) of the person
        registered = array("i")
        b2b = array("i")
        reg_rate = cfg.registered_rate
        # B2B users are always registered, so scale the account share to the registered ones.
        b2b_given_reg = min(1.0, cfg.b2b_rate / reg_rate) if reg_rate > 0 else 0.0
        change_given_reg = min(1.0, cfg.email_change_rate / reg_rate) if reg_rate > 0 else 0.0
        rnd = rng.random
        total_devices = 0
        for i in range(n_people):
            r = rnd()
            ndev = 1 if r < 0.45 else 2 if r < 0.80 else 3
            total_devices += ndev
            code = ndev
            for d in range(ndev):
                r = rnd()
                kind = _WEB if r < 0.5 else _IOS if r < 0.75 else _ANDROID
                code |= kind << (2 + 2 * d)
            self.p_dev[i] = code
            if rnd() < reg_rate:
                self.p_flags[i] = _REGISTERED
                registered.append(i)
                self.p_budget[i] = int(rnd() * 6)
                if rnd() < b2b_given_reg:
                    self.p_account[i] = int(rnd() * n_accounts)
                    b2b.append(i)
                if rnd() < change_given_reg:
                    self.p_flags[i] |= _EMAIL_PENDING
        self.registered = registered
        self.b2b = b2b
        # Shared devices: a share of all devices, each used by 2-5 registered people.
        n_shared = 0
        if len(registered) >= 2 and cfg.shared_device_rate > 0 and cfg.shared_message_rate > 0:
            rate = cfg.shared_device_rate
            n_shared = max(1, round(total_devices * rate / (1.0 - rate)))
        self.shared_members: list[tuple[int, ...]] = []
        self.shared_devices: list[_Device] = []
        for j in range(n_shared):
            size = min(len(registered), 2 + int(rnd() * 4))
            members = tuple(registered[k] for k in rng.sample(range(len(registered)), size))
            self.shared_members.append(members)
            # Shared ids live above every person's id space, so they never collide with one.
            self.shared_devices.append(_Device(_WEB, (n_people + j) << 2, self.keys))
        self.shared_last = array("i", [-1]) * n_shared
        self.slots: list[_Person | None] = [None] * max(1, min(512, n_people // 8))
        # Session starts: new people arrive in index order, spread over the whole span; the rest
        # are returning visitors, mostly recent ones whose derived strings are still cached.
        sessions = max(1.0, cfg.messages * (1.0 - self.special_rate()) * _SESSION_END)
        self.new_share = min(1.0, 1.05 * n_people / sessions)
        self.arrived = 0
        self.recent: list[_Person] = []
        self.recent_next = 0
        self.fmt = _Clock().fmt
        self.start_ms = int(cfg.start.timestamp() * 1000)
        self.span_ms = cfg.days * 86_400_000
        # Per-seed messageId prefix, so two workloads never share ids.
        self.mid_prefix = f"{rng.getrandbits(32):08x}-{rng.getrandbits(16):04x}-"
        self.mid_state = rng.getrandbits(64)
        self.disorder_rate = cfg.out_of_order_rate + cfg.clock_skew_rate
        self.counter = 0  # fresh messages so far (order ids use it too)
        self.accounts_cache: dict[int, tuple[str, str, str, str, int, str]] = {}

    # --- helpers ----------------------------------------------------------------------------------

    def account_info(self, acc: int) -> tuple[str, str, str, str, int, str]:
        """Return (truth id, groupId, name, plan, employees, industry) of account `acc`."""
        info = self.accounts_cache.get(acc)
        if info is None:
            h = _mix64(acc ^ (self.keys[6] & _M64))
            a = _COMPANY_A[h % len(_COMPANY_A)]
            b = _COMPANY_B[(h >> 8) % len(_COMPANY_B)]
            info = (
                f"a_{acc:05d}",
                f"grp_{_mix64(acc ^ (self.keys[7] & _M64)):016x}",
                f"{a} {b}",
                PLANS[(h >> 16) % len(PLANS)],
                5 + (h >> 24) % 5000,
                _INDUSTRIES[(h >> 40) % len(_INDUSTRIES)],
            )
            self.accounts_cache[acc] = info
        return info

    def account_domain(self, acc: int) -> str:
        """Return the email domain of account `acc` (unique per account)."""
        name = self.account_info(acc)[2]
        return f"{name.replace(' ', '').lower()}{acc}.com"

    def message_id(self) -> str:
        """Return a fresh unique messageId: a per-seed prefix and the next value of a Weyl sequence."""
        self.counter += 1
        x = self.mid_state = (self.mid_state + _MID_MULT) & _M64
        return f"{self.mid_prefix}{x:016x}"

    def email_of(self, p: _Person) -> str:
        """Return the person's current email."""
        return p.email(bool(self.p_flags[p.idx] & _EMAIL_CHANGED))

    def event(self, dev: _Device, mid: str, ts: str) -> dict[str, Any]:
        """Build an anonymous browsing message: a page on web, a screen in apps, or a track."""
        # One dict literal per message and the context inlined: this runs for most messages.
        rnd = self.rnd
        r = rnd()
        if dev.kind == _WEB:
            if r < 0.6:
                page = int(rnd() * len(_PAGES))
                return {
                    "type": "page",
                    "messageId": mid,
                    "timestamp": ts,
                    "anonymousId": dev.anon,
                    "name": _PAGES[page][1],
                    "properties": _PAGE_PROPERTIES[page],
                    "context": {
                        "library": dev.lib,
                        "page": _PAGE_CONTEXT[page],
                        "userAgent": dev.ua,
                        "locale": dev.locale,
                    },
                }
            ctx = {
                "library": dev.lib,
                "page": _PAGE_CONTEXT[_CART_PAGE],
                "userAgent": dev.ua,
                "locale": dev.locale,
            }
        else:
            ctx = {"library": dev.lib, "app": dev.app, "device": dev.dev, "os": dev.os, "locale": dev.locale}
            if r < 0.6:
                return {
                    "type": "screen",
                    "messageId": mid,
                    "timestamp": ts,
                    "anonymousId": dev.anon,
                    "name": _SCREENS[int(rnd() * len(_SCREENS))],
                    "properties": {},
                    "context": ctx,
                }
        sku = int(rnd() * len(_SKUS))
        if r < 0.95:
            name = _EVENTS[int(rnd() * len(_EVENTS))]
            props: dict[str, Any] = _SKU_PROPERTIES[sku]
        else:
            name = "Order Completed"
            props = {"order_id": f"o_{self.counter}", "revenue": _SKUS[sku][1], "currency": "USD"}
        return {
            "type": "track",
            "messageId": mid,
            "timestamp": ts,
            "anonymousId": dev.anon,
            "event": name,
            "properties": props,
            "context": ctx,
        }

    def identify(self, p: _Person, dev: _Device | None, email: str) -> dict[str, Any]:
        """Build an identify of person `p` (from device `dev`, or server-side when None)."""
        msg: dict[str, Any] = {"type": "identify", "userId": p.user_id}
        if dev is not None:
            msg["anonymousId"] = dev.anon
        first, last, plan = p.names()
        msg["traits"] = {"email": email, "name": f"{first} {last}", "plan": plan}
        msg["context"] = dev.context(_LOGIN_PAGE) if dev is not None else _server_context(_LIB_SERVER)
        return msg

    def person(self, idx: int) -> _Person:
        """Return the derived strings of person `idx` (all mutable state lives in the arrays)."""
        return _Person(self, idx)

    def pick(self, pool: array[int]) -> int:
        """Return a uniformly random element of a non-empty array of person indices."""
        return int(pool[int(self.rnd() * len(pool))])

    # --- scenarios --------------------------------------------------------------------------------

    def browse(self, now: int) -> _Out:
        """One message of an active session on a personal device: anonymous, login, or identified."""
        # The hot path (~87% of messages): locals instead of repeated attribute lookups.
        rnd = self.rnd
        slots = self.slots
        k = int(rnd() * len(slots))
        p = slots[k]
        if p is None:
            p = slots[k] = self.session()
        if rnd() < _SESSION_END:
            slots[k] = None
        idx = p.idx
        ndev = p.ndev
        if ndev > 1 and rnd() < _DEVICE_SWITCH:
            p.cur = (p.cur + 1 + int(rnd() * (ndev - 1))) % ndev
        d = p.cur
        dev = p.devices[d] or p.device(d)

        self.counter += 1
        x = self.mid_state = (self.mid_state + _MID_MULT) & _M64
        mid = f"{self.mid_prefix}{x:016x}"
        scenario = ""
        last = self.p_last[idx]
        r = rnd()
        if r >= self.disorder_rate:
            ts = self.fmt(now)
        elif r < self.cfg.out_of_order_rate and last > self.start_ms:
            # Delivered late: it happened shortly before the person's previous message (and so
            # leaves the person's latest timestamp alone).
            ts = self.fmt(max(self.start_ms, last - 1000 - int(rnd() * 599_000)))
            scenario = "out_of_order"
            now = last
        else:
            ts = self.fmt(now)
            scenario = "clock_skew"
        if now > last:
            self.p_last[idx] = now

        bit = 1 << d
        p_logged = self.p_logged
        logged = p_logged[idx] & bit
        msg: dict[str, Any]
        if logged:
            flags = self.p_flags[idx]
            if flags & _EMAIL_PENDING and rnd() < _EMAIL_CHANGE:
                self.p_flags[idx] = (flags & ~_EMAIL_PENDING) | _EMAIL_CHANGED
                msg = self.identify(p, dev, p.email(True))
                msg["messageId"] = mid
                msg["timestamp"] = ts
            elif rnd() < _LOGOUT:
                p_logged[idx] &= ~bit
                msg = {"type": "track", "messageId": mid, "timestamp": ts}
                msg["anonymousId"] = dev.anon
                msg["event"] = "Signed Out"
                msg["properties"] = {}
                msg["context"] = dev.context(0)
            else:
                msg = self.event(dev, mid, ts)
            msg["userId"] = p.user_id
            if msg["type"] == "identify":
                kind = "email_change"
            else:
                kind = "login" if self.p_first_dev[idx] == d else "cross_device"
        elif self.p_flags[idx] & _REGISTERED:
            budget = self.p_budget[idx]
            kind = "anonymous"
            if budget:
                self.p_budget[idx] = budget - 1
                msg = self.event(dev, mid, ts)
            elif rnd() < _LOGIN or self.p_first_dev[idx] < 0:
                p_logged[idx] |= bit
                first_dev = self.p_first_dev[idx]
                if first_dev < 0:
                    self.p_first_dev[idx] = first_dev = d
                msg = self.identify(p, dev, self.email_of(p))
                msg["messageId"] = mid
                msg["timestamp"] = ts
                kind = "login" if first_dev == d else "cross_device"
            else:
                msg = self.event(dev, mid, ts)
        else:
            msg = self.event(dev, mid, ts)
            kind = "anonymous"
        if scenario == "clock_skew":
            # A device clock off by up to two days: the server corrects it as
            # timestamp = receivedAt - (sentAt - originalTimestamp), and we emit all four.
            fmt = self.fmt
            skew = int((rnd() * 2.0 - 1.0) * 172_800_000)
            delay = 50 + int(rnd() * 5000)
            msg["originalTimestamp"] = fmt(now + skew)
            msg["sentAt"] = fmt(now + skew + delay)
            msg["receivedAt"] = fmt(now + delay)
        return msg, p.pid, p.account, scenario or kind

    def stamp(self, msg: dict[str, Any], idx: int, now: int) -> dict[str, Any]:
        """Give a non-browsing message its id and timestamp."""
        msg["messageId"] = self.message_id()
        msg["timestamp"] = self.fmt(now)
        if idx >= 0 and now > self.p_last[idx]:
            self.p_last[idx] = now
        return msg

    def shared(self, now: int) -> _Out:
        """One message on a shared device: someone logs in, or the last one to log in browses."""
        rnd = self.rnd
        j = int(rnd() * len(self.shared_devices))
        dev = self.shared_devices[j]
        members = self.shared_members[j]
        last = self.shared_last[j]
        if last < 0 or rnd() < _SHARED_RELOGIN:
            pos = int(rnd() * len(members))
            who = members[pos]
            if who == last:
                who = members[(pos + 1) % len(members)]
            self.shared_last[j] = who
            p = self.person(who)
            msg = self.identify(p, dev, self.email_of(p))
        else:
            p = self.person(last)
            msg = self.event(dev, "", "")  # stamp() fills messageId and timestamp in place
            # Half the time the person logged out and browses anonymously; the device still
            # belongs to them in the ground truth until someone else logs in.
            if rnd() < 0.5:
                msg["userId"] = p.user_id
        return self.stamp(msg, p.idx, now), p.pid, p.account, "shared_device"

    def junk(self, now: int) -> _Out:
        """A buggy SDK: a real userId with a junk anonymousId."""
        rnd = self.rnd
        p = self.person(self.pick(self.registered))
        junk = JUNK_ANONYMOUS_IDS[int(rnd() * len(JUNK_ANONYMOUS_IDS))]
        r = rnd()
        msg: dict[str, Any]
        if r < 0.25:
            msg = {"type": "identify", "userId": p.user_id, "anonymousId": junk}
            msg["traits"] = {"email": self.email_of(p), "plan": p.names()[2]}
        else:
            msg = {"type": "track", "userId": p.user_id, "anonymousId": junk}
            msg["event"] = _EVENTS[int(rnd() * len(_EVENTS))]
            msg["properties"] = {}
        msg["context"] = _server_context(_LIB_BUGGY)
        return self.stamp(msg, p.idx, now), p.pid, p.account, "junk_id"

    def junk_only(self, now: int) -> _Out:
        """A message whose only identifier is junk: it belongs to nobody."""
        junk = _JUNK_ONLY_IDS[int(self.rnd() * len(_JUNK_ONLY_IDS))]
        msg: dict[str, Any] = {
            "type": "track",
            "anonymousId": junk,
            "event": "Application Opened",
            "properties": {},
            "context": _server_context(_LIB_BUGGY),
        }
        return self.stamp(msg, -1, now), "", "", "junk_id"

    def crm(self, now: int) -> _Out:
        """A server-side CRM sync: identify by email only, or a track keyed by the CRM id."""
        rnd = self.rnd
        p = self.person(self.pick(self.registered))
        idx = p.idx
        msg: dict[str, Any]
        if rnd() < 0.5:
            email = self.email_of(p)
            # CRMs often keep the address as typed; normalisation must fold it.
            if rnd() < 0.1:
                email = f"  {email.title()} "
            first, last, _plan = p.names()
            msg = {
                "type": "identify",
                "traits": {"email": email, "firstName": first, "lastName": last, "lifecycleStage": "lead"},
            }
        else:
            msg = {"type": "track"}
            flags = self.p_flags[idx]
            # The first CRM event of a person carries the userId so the CRM id can join the profile.
            if not flags & _CRM_LINKED or rnd() < 0.3:
                msg["userId"] = p.user_id
                self.p_flags[idx] = flags | _CRM_LINKED
            msg["event"] = "Deal Stage Changed"
            msg["properties"] = {"stage": "negotiation" if rnd() < 0.5 else "closed_won"}
        ctx = _server_context(_LIB_CRM)
        if msg["type"] == "track":
            ctx["externalIds"] = [
                {"id": f"003{idx:012d}", "type": "crm_id", "collection": "users", "encoding": "none"}
            ]
        msg["context"] = ctx
        return self.stamp(msg, idx, now), p.pid, p.account, "crm"

    def group(self, now: int) -> _Out:
        """A B2B user's group call naming the account."""
        p = self.person(self.pick(self.b2b))
        _truth, group_id, name, plan, employees, industry = self.account_info(self.p_account[p.idx])
        msg: dict[str, Any] = {
            "type": "group",
            "userId": p.user_id,
            "groupId": group_id,
            "traits": {"name": name, "plan": plan, "employees": employees, "industry": industry},
            "context": _server_context(_LIB_SERVER),
        }
        return self.stamp(msg, p.idx, now), p.pid, p.account, "group"

    def alias(self, now: int) -> _Out:
        """alias(previousId = one of the person's anonymousIds, userId), Mixpanel style."""
        p = self.person(self.pick(self.registered))
        dev = p.device(int(self.rnd() * p.ndev))
        msg: dict[str, Any] = {
            "type": "alias",
            "previousId": dev.anon,
            "userId": p.user_id,
            "context": dev.context(_SIGNUP_PAGE),
        }
        return self.stamp(msg, p.idx, now), p.pid, p.account, "alias"

    def special_rate(self) -> float:
        """Return the share of messages outside personal-device browsing (before retries)."""
        cfg = self.cfg
        rates = (cfg.junk_only_rate, cfg.junk_rate, cfg.crm_rate, cfg.group_rate, cfg.alias_rate)
        return sum(rates) + cfg.shared_message_rate + cfg.retry_rate

    def session(self) -> _Person:
        """Start a session: a newly arriving person, a recent visitor, or any earlier one."""
        rnd = self.rnd
        r = rnd()
        recent = self.recent
        if self.arrived < self.n_people and (r < self.new_share or not recent):
            p = _Person(self, self.arrived)
            self.arrived += 1
        elif r < self.new_share + (1.0 - self.new_share) * _RETURN_RECENT:
            p = recent[int(rnd() * len(recent))]
            p.cur = int(rnd() * p.ndev)
            return p
        else:
            p = _Person(self, int(rnd() * self.arrived))
        # A FIFO of recent visitors bounds the cache; returning visitors skip re-deriving ids.
        # (A person may sit in it twice; harmless, as all mutable state lives in the arrays.)
        if len(recent) < _RECENT:
            recent.append(p)
        else:
            recent[self.recent_next] = p
            self.recent_next = (self.recent_next + 1) % _RECENT
        p.cur = int(rnd() * p.ndev)
        return p

    # --- the stream -------------------------------------------------------------------------------

    def run(self) -> Iterator[GeneratedMessage]:
        """Yield exactly `cfg.messages` messages."""
        cfg = self.cfg
        n = cfg.messages
        rnd = self.rnd
        encode = msgspec.json.encode
        decode = msgspec.json.decode
        has_reg = len(self.registered) > 0
        # Cumulative thresholds of the non-browsing scenarios; scenarios with no possible actor
        # get a zero-width band so their share falls back to browsing.
        t_junk_only = cfg.junk_only_rate
        t_junk = t_junk_only + (cfg.junk_rate if has_reg else 0.0)
        t_crm = t_junk + (cfg.crm_rate if has_reg else 0.0)
        t_group = t_crm + (cfg.group_rate if len(self.b2b) else 0.0)
        t_alias = t_group + (cfg.alias_rate if has_reg else 0.0)
        t_shared = t_alias + (cfg.shared_message_rate if self.shared_devices else 0.0)
        retry_rate = cfg.retry_rate
        retries: list[tuple[int, int, bytes, str, str]] = []
        start_ms, span_ms = self.start_ms, self.span_ms
        slot_ms = span_ms // n if n else 0
        # tuple.__new__ skips the NamedTuple's Python-level __new__, a quarter of a microsecond each.
        new = tuple.__new__
        gm = GeneratedMessage
        browse = self.browse
        for i in range(n):
            if retries and retries[0][0] <= i:
                _due, _seq, raw, person, account = heapq.heappop(retries)
                yield new(gm, (decode(raw), person, account, "retry"))
                continue
            now = start_ms + (i * span_ms) // n + int(rnd() * slot_ms)
            r = rnd()
            out: _Out
            if r >= t_shared:
                out = browse(now)
            elif r < t_junk_only:
                out = self.junk_only(now)
            elif r < t_junk:
                out = self.junk(now)
            elif r < t_crm:
                out = self.crm(now)
            elif r < t_group:
                out = self.group(now)
            elif r < t_alias:
                out = self.alias(now)
            else:
                out = self.shared(now)
            if rnd() < retry_rate:
                # Keep the encoded bytes, not the dict: the consumer may mutate what we yield.
                due = i + 1 + int(rnd() * 200)
                heapq.heappush(retries, (due, i, encode(out[0]), out[1], out[2]))
            yield new(gm, out)


def _server_context(lib: tuple[str, str]) -> dict[str, Any]:
    """Return the minimal context of a server-side library."""
    return {"library": {"name": lib[0], "version": lib[1]}}


def generate(config: WorkloadConfig) -> Iterator[GeneratedMessage]:
    """Stream `config.messages` synthetic messages with ground truth, deterministically from the seed."""
    return _Population(config).run()


def _open_binary(path: Path, stack: ExitStack) -> IO[bytes] | gzip.GzipFile:
    """Open `path` for writing, gzip-compressed when it ends in .gz, with a reproducible header."""
    raw = stack.enter_context(path.open("wb"))
    if path.suffix != ".gz":
        return raw
    # mtime=0 and no file name keep the .gz byte-identical across runs and paths. Level 3 is the
    # fastest zlib strategy: about twice the speed of level 6 on this NDJSON for ~15% more bytes.
    gz = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=3)
    stack.callback(gz.close)  # registered after the raw file, so it is closed (flushed) first
    return gz


def write_ndjson(path: Path | str, config: WorkloadConfig, *, truth_path: Path | str | None = None) -> int:
    """Write the workload as NDJSON (gzip if .gz) and optionally a truth CSV; return the message count."""
    encoder = msgspec.json.Encoder()
    count = 0
    flush_at = 1 << 20
    with ExitStack() as stack:
        out = _open_binary(Path(path), stack)
        truth = _open_binary(Path(truth_path), stack) if truth_path is not None else None
        buf = bytearray()
        rows: list[str] = ["message_id,person,account,scenario\n"]
        for gm in generate(config):
            encoder.encode_into(gm.message, buf, -1)
            buf += b"\n"
            count += 1
            if truth is not None:
                rows.append(f"{gm.message['messageId']},{gm.person},{gm.account},{gm.scenario}\n")
            if len(buf) >= flush_at:
                out.write(buf)
                buf.clear()
                if truth is not None:
                    truth.write("".join(rows).encode())
                    rows.clear()
        out.write(buf)
        if truth is not None:
            truth.write("".join(rows).encode())
    return count
