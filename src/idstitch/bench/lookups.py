"""The lookup load of `idstitch bench profile-api`, run as its own process so every request crosses loopback.

`python -m idstitch.bench.lookups SPEC_JSON` sends `GET /v1/spaces/{space}/collections/users/profiles/
{type:value}/traits` for seeded people chosen uniformly at random (a fixed seed), by `user_id:` or, for
a share of them, by `email:`, closed loop over `concurrency` keep-alive connections for `seconds`.
Latency runs from sending a request to reading its whole answer. Every answer that is not a 200 is an
error, counted by status (or by transport failure); every `check_every`-th 200 is decoded and must
carry the email of the person asked for (else `wrong_profile`), so a server answering fast but wrong
would show.

It prints NDJSON on stdout like bench/load.py: ``{"event": "phase", ...}`` when it starts,
``{"event": "progress", ...}`` twice a second, and one ``{"event": "result", "phase": {...}, "cpu_s":
...}`` at the end. The HTTP client is load.py's (see there for why not httpx).
"""

from __future__ import annotations

import asyncio
import base64
import random
import sys
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

import msgspec

from idstitch.bench.load import _Connection, _TransportError, run_on_fast_loop
from idstitch.bench.phases import TimedPhase
from idstitch.bench.seed import SeededPeople

__all__ = ["LookupSpec", "LookupStats", "main", "run_lookups"]

_PROGRESS_SECONDS = 0.5
_clock = time.perf_counter


class LookupSpec(msgspec.Struct, kw_only=True):
    """What the lookup process is asked to do (passed as one JSON argument)."""

    url: str
    token: str
    space: str
    profiles: int  # seeded people 0 .. profiles-1
    seed: int  # the seeded population's seed: which ids exist
    seconds: float
    concurrency: int = 8
    email_share: float = 0.1  # of lookups by `email:`, the rest by `user_id:`
    draw_seed: int = 1  # which people are looked up, in which order
    check_every: int = 20
    phase: str = "lookups"


class _Traits(msgspec.Struct):
    traits: dict[str, Any]


@dataclass
class LookupStats(TimedPhase):
    """What one lookup phase measured."""

    requests: int = 0  # answered 200
    by_user_id: int = 0
    by_email: int = 0
    checked: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The phase's figures (latencies in ms)."""
        return {
            **self.timing(),
            "requests": self.requests,
            "by_user_id": self.by_user_id,
            "by_email": self.by_email,
            "checked": self.checked,
            "requests_per_s": self.rate(self.requests),
        }


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(msgspec.json.encode(event).decode() + "\n")
    sys.stdout.flush()


async def run_lookups(spec: LookupSpec) -> LookupStats:
    """Look seeded people up for `spec.seconds`, closed loop; the figures."""
    parts = urlsplit(spec.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    credentials = base64.b64encode(f"{spec.token}:".encode()).decode()
    head_tail = f" HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Basic {credentials}\r\n\r\n"
    prefix = f"/v1/spaces/{quote(spec.space, safe='')}/collections/users/profiles/"
    people = SeededPeople(spec.seed)
    draw = random.Random(spec.draw_seed)
    decoder = msgspec.json.Decoder(_Traits)
    stats = LookupStats(spec.phase)

    async def worker(connection: _Connection, deadline: float) -> None:
        while _clock() < deadline:
            # One event loop: the shared generator gives every worker its own draws, in a fixed sequence.
            index = draw.randrange(spec.profiles)
            by_email = draw.random() < spec.email_share
            profile_id = f"email:{people.email(index)}" if by_email else f"user_id:{people.user_id(index)}"
            head = f"GET {prefix}{quote(profile_id, safe='')}/traits{head_tail}".encode()
            started = _clock()
            try:
                answer = await connection.request(head, b"")
            except _TransportError as error:
                stats.error(error.kind)
                continue
            latency = _clock() - started
            if answer.status != 200:
                stats.error(str(answer.status))
                continue
            stats.requests += 1
            stats.latencies.append(latency)
            if by_email:
                stats.by_email += 1
            else:
                stats.by_user_id += 1
            if stats.requests % spec.check_every == 0:
                stats.checked += 1
                try:
                    found = decoder.decode(answer.body).traits.get("email")
                except msgspec.DecodeError:
                    found = None
                if found != people.email(index):
                    stats.error("wrong_profile")

    async def report() -> None:
        while True:
            await asyncio.sleep(_PROGRESS_SECONDS)
            _emit(_progress(stats))

    connections = [_Connection(host, port) for _ in range(spec.concurrency)]
    _emit({"event": "phase", "phase": spec.phase, "total": spec.seconds})
    reporter = asyncio.create_task(report())
    stats.started = stats.finished = _clock()
    try:
        deadline = stats.started + spec.seconds
        await asyncio.gather(*(worker(connection, deadline) for connection in connections))
        stats.finished = _clock()  # the deadline plus the answers still in flight then
    finally:
        reporter.cancel()
        for connection in connections:
            connection.close()
    _emit(_progress(stats))
    return stats


def _progress(stats: LookupStats) -> dict[str, Any]:
    return {
        "event": "progress",
        "phase": stats.name,
        "elapsed": round(_clock() - stats.started, 3),
        "requests": stats.requests,
    }


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m idstitch.bench.lookups SPEC_JSON`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m idstitch.bench.lookups SPEC_JSON")
    spec = msgspec.json.decode(args[0], type=LookupSpec)
    stats = run_on_fast_loop(run_lookups(spec))
    _emit({"event": "result", "phase": stats.as_dict(), "cpu_s": round(time.process_time(), 3)})


if __name__ == "__main__":
    main()
