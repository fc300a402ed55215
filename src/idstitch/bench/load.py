"""The load generator of `idstitch bench http`, run as its own process so every request crosses loopback.

`python -m idstitch.bench.load SPEC_JSON` reads consecutive lines of a generated workload and sends
them to a running `idstitch serve` in three phases, each bounded in messages and in time:

- ``main``: `/v1/batch` requests of `batch_size` consecutive lines over `concurrency` keep-alive
  connections, closed loop (each connection sends its next request when the previous one is answered:
  the maximum throughput), or open loop at `rate` messages/s when a rate is given;
- ``half``: open loop at half the main phase's measured rate (skipped when a rate was given);
- ``track``: single-message `/v1/track` requests (the workload's track messages), closed loop.

It prints NDJSON events on stdout: ``{"event": "phase", ...}`` when a phase starts, ``{"event":
"progress", ...}`` twice a second, and one ``{"event": "result", "phases": {...}, "cpu_s": ...}`` at the
end (its own CPU time: it shows whether the load generator, not the server, was the limit).

The client is a minimal HTTP/1.1 keep-alive client on asyncio streams (uvloop), not httpx: on this
2-core machine httpx's AsyncClient cost 3.6 ms of CPU per request against /healthz (2.8 ms even with
sniffio installed, see encode/httpcore#1103; most of the rest in its connection pool) where this one
costs under 0.1 ms, and the load generator shares the CPU with the server it measures. It only needs
to understand our own server's answers (Content-Length framed).

Latency is time to acknowledgement: from the request's first attempt (closed loop) or its scheduled
send time (open loop, so a server that falls behind cannot hide the wait: no coordinated omission) to
its 200, including any waits after a 429.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, TypeVar
from urllib.parse import urlsplit

import msgspec

from idstitch.bench.phases import TimedPhase

__all__ = ["LoadSpec", "PhaseStats", "main", "run_load", "run_on_fast_loop"]

T = TypeVar("T")
_SUCCESS = b'{"success":true}'
_PROGRESS_SECONDS = 0.5
_REQUEST_SECONDS = 60.0  # an answer waits for a durable commit: generous, but never forever
_IDLE_SECONDS = 2.0  # uvicorn closes keep-alive connections idle for 5 s: reconnect before that
_clock = time.perf_counter


class LoadSpec(msgspec.Struct, kw_only=True):
    """What the load process is asked to do (passed as one JSON argument)."""

    url: str
    write_key: str
    workload: str
    messages: int
    duration: float
    concurrency: int = 16
    batch_size: int = 50
    rate: float | None = None
    half_load_seconds: float = 20.0
    track_requests: int = 5_000


@dataclass
class PhaseStats(TimedPhase):
    """What one ingest phase measured."""

    target_rate: float | None = None
    messages: int = 0
    requests: int = 0
    rejected_429: int = 0
    rejected_messages: int = 0

    def acknowledged(self, messages: int, latency: float, body: bytes) -> None:
        """Count a 200: its messages and its latency (and any messages the server refused as invalid)."""
        self.messages += messages
        self.requests += 1
        self.latencies.append(latency)
        self.finished = _clock()
        if body != _SUCCESS:
            # {"success": true, "rejected": [...]}: answered, but some messages were invalid
            try:
                answer = msgspec.json.decode(body)
            except msgspec.DecodeError:
                self.error("undecodable_200")
                return
            if isinstance(answer, dict):
                self.rejected_messages += len(answer.get("rejected") or ())

    def as_dict(self) -> dict[str, Any]:
        """The phase's figures (latencies in ms)."""
        return {
            **self.timing(),
            "target_rate": self.target_rate,
            "messages": self.messages,
            "requests": self.requests,
            # accepted: answered 200 and not rejected inside the answer as invalid
            "messages_per_s": self.rate(self.messages - self.rejected_messages),
            "requests_per_s": self.rate(self.requests),
            "rejected_429": self.rejected_429,
            "rejected_messages": self.rejected_messages,
        }


class _Typed(msgspec.Struct):
    type: str = ""


def _lines(file: IO[bytes]) -> Iterator[bytes]:
    for line in file:
        stripped = line.strip()
        if stripped:
            yield stripped


def _batches(lines: Iterator[bytes], size: int, limit: int) -> Iterator[tuple[int, bytes]]:
    """(message count, /v1/batch body) of the next `limit` lines, `size` at a time; lines pass through as is."""
    remaining = limit
    while remaining > 0:
        chunk = list(itertools.islice(lines, min(size, remaining)))
        if not chunk:
            return
        remaining -= len(chunk)
        yield len(chunk), b'{"batch":[' + b",".join(chunk) + b"]}"


def _tracks(lines: Iterator[bytes], limit: int) -> Iterator[tuple[int, bytes]]:
    """The next `limit` track messages, one /v1/track body each."""
    decoder = msgspec.json.Decoder(_Typed)
    found = 0
    if limit <= 0:
        return
    for line in lines:
        if decoder.decode(line).type == "track":
            yield 1, line
            found += 1
            if found >= limit:
                return


class _TransportError(Exception):
    """The connection failed or the answer could not be read; `kind` says how."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.kind = kind


@dataclass(slots=True)
class _Answer:
    status: int
    retry_after: float
    body: bytes


class _Connection:
    """One keep-alive HTTP/1.1 connection, opened on first use and again after a failure."""

    def __init__(self, host: str, port: int) -> None:
        self.host = host
        self.port = port
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._used = 0.0

    async def request(self, head: bytes, body: bytes) -> _Answer:
        """Send one request and read its answer; a reused connection that was closed is retried once."""
        fresh = self._writer is None or _clock() - self._used > _IDLE_SECONDS
        if fresh:
            await self._open()
        try:
            return await self._exchange(head, body)
        except _TransportError as error:
            if fresh or error.kind != "closed":
                raise
        # The server closed the kept-alive connection before reading the request: nothing was done, resend.
        await self._open()
        return await self._exchange(head, body)

    async def _open(self) -> None:
        self.close()
        try:
            self._reader, self._writer = await asyncio.open_connection(self.host, self.port)
        except OSError as error:
            raise _TransportError(type(error).__name__) from None

    async def _exchange(self, head: bytes, body: bytes) -> _Answer:
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        try:
            async with asyncio.timeout(_REQUEST_SECONDS):
                writer.write(head + body)
                raw = await reader.readuntil(b"\r\n\r\n")
                status, length, retry_after, close = _parse_head(raw)
                answer = _Answer(status, retry_after, await reader.readexactly(length))
        except asyncio.IncompleteReadError as error:
            self.close()
            raise _TransportError("closed" if not error.partial else "truncated") from None
        except (OSError, TimeoutError, asyncio.LimitOverrunError, ValueError) as error:
            self.close()
            raise _TransportError(type(error).__name__) from None
        if close:
            self.close()
        self._used = _clock()
        return answer

    def close(self) -> None:
        """Close the socket (the next request opens a new one)."""
        if self._writer is not None:
            self._writer.close()
        self._reader = self._writer = None


def _parse_head(raw: bytes) -> tuple[int, int, float, bool]:
    """(status, content length, Retry-After seconds, connection closes) of a response head; ValueError if odd."""
    lines = raw.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length: int | None = None
    retry_after = 1.0
    close = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"retry-after":
            retry_after = float(value)
        elif name == b"connection":
            close = value.strip().lower() == b"close"
        elif name == b"transfer-encoding":
            raise ValueError("chunked answers are not expected from idstitch serve")
    if length is None:
        raise ValueError("no Content-Length")
    return status, length, retry_after, close


class _Client:
    """At most `size` connections to one server, reused most-recent first."""

    def __init__(self, url: str, write_key: str, size: int) -> None:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        credentials = base64.b64encode(f"{write_key}:".encode()).decode()
        self._prefix = f"HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Basic {credentials}\r\n"
        self._prefix += "Content-Type: application/json\r\n"
        # LIFO: under light load the same few connections stay warm instead of all going idle.
        self._idle: asyncio.LifoQueue[_Connection] = asyncio.LifoQueue()
        for _ in range(size):
            self._idle.put_nowait(_Connection(host, port))

    async def post(self, path: str, body: bytes) -> _Answer:
        """POST `body` to `path` on a free connection (waiting for one if all are busy)."""
        head = f"POST {path} {self._prefix}Content-Length: {len(body)}\r\n\r\n".encode()
        connection = await self._idle.get()
        try:
            return await connection.request(head, body)
        finally:
            self._idle.put_nowait(connection)

    def close(self) -> None:
        """Close every connection."""
        while not self._idle.empty():
            self._idle.get_nowait().close()


class _Sender:
    """Sends one request until it is answered: retries after 429 (honouring Retry-After) until the deadline."""

    def __init__(self, client: _Client, path: str, stats: PhaseStats, deadline: float) -> None:
        self.client = client
        self.path = path
        self.stats = stats
        self.deadline = deadline

    async def send(self, messages: int, body: bytes, since: float | None = None) -> None:
        """POST `body`; latency runs from `since` (the scheduled time) or from the first attempt."""
        started = _clock() if since is None else since
        stats = self.stats
        while True:
            try:
                answer = await self.client.post(self.path, body)
            except _TransportError as error:
                stats.error(error.kind)
                return
            if answer.status == 200:
                stats.acknowledged(messages, _clock() - started, answer.body)
                return
            if answer.status != 429:
                stats.error(str(answer.status))
                return
            stats.rejected_429 += 1
            if _clock() + answer.retry_after >= self.deadline:
                stats.error("429_past_deadline")
                return
            await asyncio.sleep(answer.retry_after)


async def _closed_loop(sender: _Sender, bodies: Iterator[tuple[int, bytes]], concurrency: int) -> None:
    """`concurrency` workers, each sending its next request as soon as its previous one is answered."""

    async def worker() -> None:
        while _clock() < sender.deadline:
            item = next(bodies, None)  # one event loop: no two workers ever take the same item
            if item is None:
                return
            await sender.send(*item)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def _open_loop(
    sender: _Sender, bodies: Iterator[tuple[int, bytes]], rate: float, max_outstanding: int
) -> None:
    """Requests on a fixed schedule of `rate` messages/s, whether or not earlier ones were answered."""
    start = _clock()
    scheduled = 0
    slots = asyncio.Semaphore(max_outstanding)  # bounded: a server far behind cannot make us pile up tasks
    tasks: set[asyncio.Task[None]] = set()

    def done(task: asyncio.Task[None]) -> None:
        tasks.discard(task)
        slots.release()

    while True:
        due = start + scheduled / rate
        if due >= sender.deadline:
            break
        item = next(bodies, None)
        if item is None:
            break
        delay = due - _clock()
        if delay > 0:
            await asyncio.sleep(delay)
        await slots.acquire()
        task = asyncio.create_task(sender.send(item[0], item[1], since=due))
        tasks.add(task)
        task.add_done_callback(done)
        scheduled += item[0]
    await asyncio.gather(*list(tasks))


def _emit(event: dict[str, Any]) -> None:
    sys.stdout.write(msgspec.json.encode(event).decode() + "\n")
    sys.stdout.flush()


async def _phase(
    stats: PhaseStats, total: int, run: Callable[[PhaseStats], Coroutine[Any, Any, None]]
) -> PhaseStats:
    """Run one phase, reporting progress while it runs."""
    _emit({"event": "phase", "phase": stats.name, "total": total, "target_rate": stats.target_rate})

    async def report() -> None:
        while True:
            await asyncio.sleep(_PROGRESS_SECONDS)
            _emit({"event": "progress", "phase": stats.name, "messages": stats.messages})

    reporter = asyncio.create_task(report())
    stats.started = stats.finished = _clock()
    try:
        await run(stats)
    finally:
        reporter.cancel()
    _emit({"event": "progress", "phase": stats.name, "messages": stats.messages})
    return stats


async def run_load(spec: LoadSpec) -> dict[str, Any]:
    """Run the phases against the server; the figures of each."""
    client = _Client(spec.url, spec.write_key, spec.concurrency)
    phases: dict[str, Any] = {}
    try:
        with Path(spec.workload).open("rb") as file:
            lines = _lines(file)  # consecutive phases take consecutive lines: every message is new

            def batches(limit: int) -> Iterator[tuple[int, bytes]]:
                return _batches(lines, spec.batch_size, limit)

            async def main_phase(stats: PhaseStats) -> None:
                sender = _Sender(client, "/v1/batch", stats, _clock() + spec.duration)
                if spec.rate is None:
                    await _closed_loop(sender, batches(spec.messages), spec.concurrency)
                else:
                    await _open_loop(sender, batches(spec.messages), spec.rate, 4 * spec.concurrency)

            main = await _phase(PhaseStats("main", spec.rate), spec.messages, main_phase)
            phases["main"] = main.as_dict()
            main_seconds = main.finished - main.started
            if spec.rate is None and spec.half_load_seconds > 0 and main.messages and main_seconds > 0:
                half_rate = main.messages / main_seconds / 2
                # No longer than the main phase: the stream's next messages/2 lines are always enough.
                seconds = min(spec.half_load_seconds, main_seconds)
                budget = max(spec.batch_size, int(half_rate * seconds) + spec.batch_size)

                async def half_phase(stats: PhaseStats) -> None:
                    sender = _Sender(client, "/v1/batch", stats, _clock() + seconds)
                    await _open_loop(sender, batches(budget), half_rate, 4 * spec.concurrency)

                half = await _phase(PhaseStats("half", round(half_rate, 1)), budget, half_phase)
                phases["half"] = half.as_dict()

            async def track_phase(stats: PhaseStats) -> None:
                sender = _Sender(client, "/v1/track", stats, _clock() + spec.duration)
                await _closed_loop(sender, _tracks(lines, spec.track_requests), spec.concurrency)

            if spec.track_requests > 0:
                track = await _phase(PhaseStats("track"), spec.track_requests, track_phase)
                phases["track"] = track.as_dict()
    finally:
        client.close()
    return phases


def run_on_fast_loop(main: Coroutine[Any, Any, T]) -> T:
    """Run a load generator's coroutine on uvloop when installed, else on asyncio's own loop."""
    try:
        import uvloop  # a cheaper event loop leaves more of the shared CPU to the server
    except ImportError:
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)


def main(argv: list[str] | None = None) -> None:
    """Entry point: `python -m idstitch.bench.load SPEC_JSON`."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.exit("usage: python -m idstitch.bench.load SPEC_JSON")
    spec = msgspec.json.decode(args[0], type=LoadSpec)
    phases = run_on_fast_loop(run_load(spec))
    _emit({"event": "result", "phases": phases, "cpu_s": round(time.process_time(), 3)})


if __name__ == "__main__":
    main()
