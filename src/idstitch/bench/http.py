"""`idstitch bench http`: a real `idstitch serve` over a fresh SQLite file, loaded over loopback by another process.

The server runs as `python -m idstitch serve --port 0` and is sampled for RSS every second with psutil;
the load comes from `python -m idstitch.bench.load` (see there for the phases and how latency is
measured). At the end the server's own message count is read from /metrics, and it is stopped with
SIGTERM, which must end it with exit status 0.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import psutil

from idstitch.bench.children import die_with_parent, start_reporter
from idstitch.bench.load import LoadSpec
from idstitch.bench.runner import ensure_workload, parse_only_rate
from idstitch.bench.scratch import scratch_directory

__all__ = ["HttpBenchError", "HttpBenchResult", "run_http_bench"]

WRITE_KEY = "wk_bench"
START_SECONDS = 60.0  # a loaded machine can be slow to import and open the store
STOP_SECONDS = 60.0  # SIGTERM waits for requests in flight and the last commit
TRACK_SHARE = 0.25  # at least this share of the generated stream is track calls (measured: ~38%)
_ANNOUNCE = re.compile(rb"idstitch serving on (http://\S+)")
_PROFILE_ANNOUNCE = re.compile(rb"(http://\S+) \(Profile API\)")
_MB = 1024.0 * 1024.0
# Server-side message counters (every message of an answered request lands in exactly one of them).
_COUNTED = (
    "idstitch_messages_accepted_total",
    "idstitch_messages_duplicate_total",
    "idstitch_messages_rejected_total",
)


class HttpBenchError(Exception):
    """The benchmark could not run (the server did not start, the load process failed, ...)."""


@dataclass
class HttpBenchResult:
    """The figures `idstitch bench http` prints."""

    store: str
    concurrency: int
    batch_size: int
    rate: float | None
    phases: dict[str, dict[str, Any]]
    rss_samples_mb: list[float]
    peak_rss_mb: float
    parse_only_messages_per_s: float
    server_counted_messages: int
    server_commits: int
    server_exit_code: int | None
    server_pid: int
    load_pid: int
    server_cpu_s: float
    load_cpu_s: float

    @property
    def acknowledged_messages(self) -> int:
        """Messages answered 200 over all phases."""
        return sum(int(phase["messages"]) for phase in self.phases.values())

    def as_dict(self) -> dict[str, Any]:
        """The JSON object `--json` prints (main-phase figures at the top level, as in the other benchmarks)."""
        main = self.phases["main"]
        half = self.phases.get("half")
        track = self.phases.get("track")
        rate = float(main["messages_per_s"])
        return {
            "benchmark": "http",
            "store": self.store,
            "concurrency": self.concurrency,
            "batch_size": self.batch_size,
            "rate": self.rate,
            "messages": main["messages"],
            "requests": main["requests"],
            "seconds": main["seconds"],
            "messages_per_s": main["messages_per_s"],
            "requests_per_s": main["requests_per_s"],
            "p50_ms": main["p50_ms"],
            "p95_ms": main["p95_ms"],
            "p99_ms": main["p99_ms"],
            "rejected_429": sum(int(phase["rejected_429"]) for phase in self.phases.values()),
            "rejected_messages": sum(int(phase["rejected_messages"]) for phase in self.phases.values()),
            "errors": sum(sum(phase["errors"].values()) for phase in self.phases.values()),
            "half_load_rate": half["target_rate"] if half else None,
            "half_load_messages_per_s": half["messages_per_s"] if half else None,
            "half_load_p50_ms": half["p50_ms"] if half else None,
            "half_load_p95_ms": half["p95_ms"] if half else None,
            "half_load_p99_ms": half["p99_ms"] if half else None,
            "track_requests": track["requests"] if track else 0,
            "track_requests_per_s": track["requests_per_s"] if track else 0.0,
            "track_p50_ms": track["p50_ms"] if track else None,
            "track_p95_ms": track["p95_ms"] if track else None,
            "track_p99_ms": track["p99_ms"] if track else None,
            "rss_start_mb": self.rss_samples_mb[0] if self.rss_samples_mb else 0.0,
            "rss_end_mb": self.rss_samples_mb[-1] if self.rss_samples_mb else 0.0,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "rss_samples_mb": self.rss_samples_mb,
            "parse_only_messages_per_s": round(self.parse_only_messages_per_s, 1),
            "parse_only_ratio": round(rate / self.parse_only_messages_per_s, 4)
            if self.parse_only_messages_per_s
            else 0.0,
            "acknowledged_messages": self.acknowledged_messages,
            "server_counted_messages": self.server_counted_messages,
            "server_commits": self.server_commits,
            "server_exit_code": self.server_exit_code,
            "server_pid": self.server_pid,
            "load_pid": self.load_pid,
            "server_cpu_s": round(self.server_cpu_s, 3),
            "load_cpu_s": round(self.load_cpu_s, 3),
            "phases": self.phases,
        }


class _Server:
    """`python -m idstitch serve` on a fresh SQLite file in `directory`, its log in a file there."""

    def __init__(self, directory: Path, *, args: tuple[str, ...] = ()) -> None:
        self.directory = directory
        self.store_url = f"sqlite:///{directory / 'bench.db'}"  # absolute path: sqlite:////…
        self.log_path = directory / "serve.log"
        # IDSTITCH_* of the caller's shell must not leak in: the zero-config space with our write key only.
        env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
        env["IDSTITCH_WRITE_KEY"] = WRITE_KEY
        command = [sys.executable, "-m", "idstitch", "serve", "--host", "127.0.0.1", "--port", "0"]
        command += ["--store", self.store_url, *args]
        with self.log_path.open("wb") as log:
            # A file, not a pipe: nobody reads the request log while the load runs, and a full pipe
            # would block the server. cwd: no ./idstitch.toml of the developer is picked up.
            self.process = subprocess.Popen(
                command,
                cwd=directory,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                preexec_fn=die_with_parent(),
            )
        self.url = ""
        self.profile_url = ""  # with --profile-port: the Profile API's own URL

    def cpu_seconds(self) -> float:
        """User plus system CPU time the server has used so far."""
        times = psutil.Process(self.process.pid).cpu_times()
        return float(times.user + times.system)

    def log_tail(self, lines: int = 20) -> str:
        """The end of the server's log, for error messages."""
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def wait_ready(self) -> str:
        """Wait for the announced URL and a 200 from /healthz; the base URL."""
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise HttpBenchError(f"serve exited with {self.process.returncode}:\n{self.log_tail()}")
            if not self.url:
                announced = self.log_path.read_bytes()
                found = _ANNOUNCE.search(announced)
                self.url = found.group(1).decode() if found else ""
                profile = _PROFILE_ANNOUNCE.search(announced)
                self.profile_url = profile.group(1).decode() if profile else self.url
            if self.url and self._healthy():
                return self.url
            time.sleep(0.05)
        raise HttpBenchError(f"serve not ready after {START_SECONDS:.0f} s:\n{self.log_tail()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/healthz", timeout=2) as response:
                status: int = response.status
                return status == 200
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        """Sums of the server's Prometheus series by metric name (labels added up)."""
        with urllib.request.urlopen(f"{self.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        sums: dict[str, float] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            name, _, value = line.rpartition(" ")
            name = name.split("{", 1)[0]
            with contextlib.suppress(ValueError):
                sums[name] = sums.get(name, 0.0) + float(value)
        return sums

    def stop(self) -> int | None:
        """SIGTERM and wait: the exit status (None if it had to be killed)."""
        if self.process.poll() is not None:
            return self.process.returncode
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=STOP_SECONDS)
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        """SIGKILL if still running (the benchmark failed or was interrupted)."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)


class _RssSampler:
    """The server's RSS every `interval` seconds, on a thread of its own until stopped."""

    def __init__(self, pid: int, interval: float = 1.0) -> None:
        self._process = psutil.Process(pid)
        self._interval = interval
        self._stop = threading.Event()
        self.samples: list[float] = []
        self.sample()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()

    def sample(self) -> None:
        """Take one sample now."""
        with contextlib.suppress(psutil.Error):
            self.samples.append(round(self._process.memory_info().rss / _MB, 1))

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def stop(self) -> list[float]:
        """Stop sampling, take a last sample; every sample in MB."""
        self._stop.set()
        self._thread.join()
        self.sample()
        return self.samples


def _high_water_mb(pid: int) -> float:
    """The kernel's peak RSS of the process (VmHWM, Linux), which catches spikes between samples; 0 elsewhere."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    found = re.search(r"^VmHWM:\s+(\d+) kB", status, re.MULTILINE)
    return int(found.group(1)) / 1024.0 if found else 0.0


@dataclass
class _LoadOutcome:
    phases: dict[str, dict[str, Any]]
    pid: int
    cpu_s: float


def _run_load(spec: LoadSpec, directory: Path, on_event: Callable[[dict[str, Any]], None]) -> _LoadOutcome:
    """Run the load process to its end, passing on its events; its phases' figures, pid and CPU time."""
    errors = directory / "load.err"
    command = [sys.executable, "-m", "idstitch.bench.load", msgspec.json.encode(spec).decode()]
    with errors.open("wb") as stderr:
        process = start_reporter(command, stderr)
    result: dict[str, Any] | None = None
    try:
        assert process.stdout is not None
        for line in process.stdout:
            event = msgspec.json.decode(line)
            if event.get("event") == "result":
                result = event
            else:
                on_event(event)
        code = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if code != 0 or result is None:
        tail = "\n".join(errors.read_text(errors="replace").splitlines()[-20:])
        raise HttpBenchError(f"the load process exited with {code}:\n{tail}")
    return _LoadOutcome(result["phases"], process.pid, float(result["cpu_s"]))


def run_http_bench(
    *,
    messages: int,
    duration: float,
    concurrency: int = 16,
    batch_size: int = 50,
    rate: float | None = None,
    half_load_seconds: float = 20.0,
    track_requests: int = 5_000,
    seed: int = 1,
    on_event: Callable[[dict[str, Any]], None] | None = None,
) -> HttpBenchResult:
    """Start a server, load it from another process, sample its RSS, stop it; the figures."""
    # One stream for all phases, long enough for each: the half-load phase needs at most messages/2
    # lines, the track phase its requests at the stream's share of track calls.
    lines = messages + messages // 2 + int(track_requests / TRACK_SHARE) + batch_size
    workload = ensure_workload(lines, seed)
    parse_rate = parse_only_rate(workload, messages)  # before the server starts: nothing competes
    with scratch_directory("http") as directory:
        server = _Server(directory)
        try:
            url = server.wait_ready()
            sampler = _RssSampler(server.process.pid)
            try:
                spec = LoadSpec(
                    url=url,
                    write_key=WRITE_KEY,
                    workload=str(workload),
                    messages=messages,
                    duration=duration,
                    concurrency=concurrency,
                    batch_size=batch_size,
                    rate=rate,
                    half_load_seconds=half_load_seconds,
                    track_requests=track_requests,
                )
                load = _run_load(spec, directory, on_event or (lambda event: None))
            finally:
                samples = sampler.stop()
            peak = max([*samples, _high_water_mb(server.process.pid)])
            counters = server.metrics()
            server_cpu = server.cpu_seconds()
            exit_code = server.stop()
        finally:
            server.kill()
    return HttpBenchResult(
        store=server.store_url,
        concurrency=concurrency,
        batch_size=batch_size,
        rate=rate,
        phases=load.phases,
        rss_samples_mb=samples,
        peak_rss_mb=peak,
        parse_only_messages_per_s=parse_rate,
        server_counted_messages=int(sum(counters.get(name, 0.0) for name in _COUNTED)),
        server_commits=int(counters.get("idstitch_writer_commits_total", 0.0)),
        server_exit_code=exit_code,
        server_pid=server.process.pid,
        load_pid=load.pid,
        server_cpu_s=server_cpu,
        load_cpu_s=load.cpu_s,
    )
