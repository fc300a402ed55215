"""`idstitch bench profile-api`: traits lookups on a store of N seeded profiles while ingest runs.

A real `idstitch serve` runs on a copy of a cached seeded store (bench/seed.py: every run starts from the
same file) with a config of one space: a source with a write key, a read token and `rate_limit = 0`
(the benchmark measures the server, not its limiter). Three phases, each from processes of their own
over loopback:

- ``ingest``: `/v1/batch` of `batch_size` generated messages (sim/population.py), closed loop over
  `ingest_concurrency` connections for `ingest_seconds`: the ingest rate this store sustains alone
  (bench/load.py);
- ``baseline``: traits lookups alone for `seconds` (bench/lookups.py): closed loop over `concurrency`
  connections, people chosen uniformly at random, a share by `email:`;
- ``lookups``: the same lookups for `seconds` while a second process ingests the stream's next
  messages open loop at half the ``ingest`` rate. The ingest rate reported for this phase is measured
  over the lookups' window only (from the load process's progress reports).

Every non-200 answer to a lookup is an error; the command reports them and fails. The top-level
figures are those of ``lookups`` (under ingest), as the issue's target reads: P95 <= 7 ms and >= 5,000
lookups/s. `parse_only_ratio` is null: it relates a message rate to msgspec's parse-only rate of the
same stream (as in bench http), which does not apply to lookups; `ingest_parse_only_ratio` gives it
for the ``ingest`` phase.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from idstitch.bench.children import start_reporter
from idstitch.bench.http import HttpBenchError, _high_water_mb, _RssSampler, _run_load, _Server
from idstitch.bench.load import LoadSpec
from idstitch.bench.lookups import LookupSpec
from idstitch.bench.runner import ensure_workload, parse_only_rate
from idstitch.bench.scratch import scratch_directory
from idstitch.bench.seed import SPACE, WRITE_KEY, SeedResult, ensure_seeded_store

__all__ = ["TARGET_LOOKUPS_PER_S", "TARGET_P95_MS", "ProfileApiBenchResult", "run_profile_api_bench"]

READ_TOKEN = "pt_bench"
ADMIN_TOKEN = "at_bench"
TARGET_P95_MS = 7.0
TARGET_LOOKUPS_PER_S = 5_000.0
_LEAD_SECONDS = 2.0  # the ingest of phase `lookups` starts this much earlier and ends this much later
_SETTLE_SECONDS = 1.0  # between phases: answers in flight land, the WAL checkpointer catches up
_CONFIG = f"""\
# Written by `idstitch bench profile-api`.
[spaces.{SPACE}]
profile_tokens = ["{READ_TOKEN}"]
admin_tokens = ["{ADMIN_TOKEN}"]
rate_limit = 0

[spaces.{SPACE}.sources.web]
write_key = "{WRITE_KEY}"
"""

Events = Callable[[dict[str, Any]], None]


@dataclass
class ProfileApiBenchResult:
    """The figures `idstitch bench profile-api` prints."""

    profiles: int
    seed: int
    store: str
    concurrency: int
    ingest_concurrency: int
    batch_size: int
    email_share: float
    profile_workers: int  # 0: lookups served by the ingesting server process itself
    seeded: SeedResult | None  # None: the cached file was reused
    copy_seconds: float
    ingest: dict[str, Any]  # phase `ingest`: closed loop, alone
    baseline: dict[str, Any]  # phase `baseline`: lookups alone
    lookups: dict[str, Any]  # phase `lookups`: lookups under ingest
    ingest_during_lookups: dict[str, Any]  # the load process's figures for its whole phase
    ingest_window_messages_per_s: float | None
    rss_samples_mb: list[float]
    peak_rss_mb: float
    parse_only_messages_per_s: float
    server_exit_code: int | None
    server_cpu_s: float
    lookup_cpu_s: float
    load_cpu_s: float
    server_pid: int
    notes: list[str] = field(default_factory=list)

    @property
    def errors(self) -> int:
        """Lookups that did not get the right 200, over both lookup phases."""
        return int(self.baseline["error_count"]) + int(self.lookups["error_count"])

    @property
    def meets_target(self) -> bool:
        """P95 <= 7 ms and >= 5,000 lookups/s under ingest, without errors."""
        return (
            self.lookups["p95_ms"] <= TARGET_P95_MS
            and self.lookups["requests_per_s"] >= TARGET_LOOKUPS_PER_S
            and self.errors == 0
        )

    def as_dict(self) -> dict[str, Any]:
        """The JSON object `--json` prints (phase `lookups`'s figures at the top level)."""
        lookups, baseline, ingest = self.lookups, self.baseline, self.ingest
        ingest_errors = sum(ingest["errors"].values()) + sum(self.ingest_during_lookups["errors"].values())
        return {
            "benchmark": "profile-api",
            "store": self.store,
            "profiles": self.profiles,
            "seed": self.seed,
            "concurrency": self.concurrency,
            "profile_workers": self.profile_workers,
            "email_share": self.email_share,
            "seconds": lookups["seconds"],
            "lookups": lookups["requests"],
            "lookups_per_s": lookups["requests_per_s"],
            "p50_ms": lookups["p50_ms"],
            "p95_ms": lookups["p95_ms"],
            "p99_ms": lookups["p99_ms"],
            "errors": self.errors,
            "lookup_errors": lookups["errors"],
            "ingest_messages_per_s": self.ingest_window_messages_per_s,
            "ingest_target_messages_per_s": self.ingest_during_lookups["target_rate"],
            "ingest_p95_ms": self.ingest_during_lookups["p95_ms"],
            "baseline_lookups_per_s": baseline["requests_per_s"],
            "baseline_p50_ms": baseline["p50_ms"],
            "baseline_p95_ms": baseline["p95_ms"],
            "baseline_p99_ms": baseline["p99_ms"],
            "baseline_errors": baseline["error_count"],
            "ratio_to_baseline": round(lookups["requests_per_s"] / baseline["requests_per_s"], 4)
            if baseline["requests_per_s"]
            else None,
            "ingest_max_messages_per_s": ingest["messages_per_s"],
            "ingest_max_p95_ms": ingest["p95_ms"],
            "ingest_concurrency": self.ingest_concurrency,
            "batch_size": self.batch_size,
            "ingest_errors": ingest_errors,
            "target_p95_ms": TARGET_P95_MS,
            "target_lookups_per_s": TARGET_LOOKUPS_PER_S,
            "meets_target": self.meets_target,
            "peak_rss_mb": round(self.peak_rss_mb, 1),
            "rss_start_mb": self.rss_samples_mb[0] if self.rss_samples_mb else 0.0,
            "rss_end_mb": self.rss_samples_mb[-1] if self.rss_samples_mb else 0.0,
            "rss_samples_mb": self.rss_samples_mb,
            "parse_only_messages_per_s": round(self.parse_only_messages_per_s, 1),
            "parse_only_ratio": None,
            "ingest_parse_only_ratio": round(ingest["messages_per_s"] / self.parse_only_messages_per_s, 4)
            if self.parse_only_messages_per_s
            else None,
            "seed_seconds": round(self.seeded.seconds, 1) if self.seeded else None,
            "seed_messages": self.seeded.messages if self.seeded else None,
            "copy_seconds": round(self.copy_seconds, 2),
            "server_exit_code": self.server_exit_code,
            "server_pid": self.server_pid,
            "server_cpu_s": round(self.server_cpu_s, 3),
            "lookup_cpu_s": round(self.lookup_cpu_s, 3),
            "load_cpu_s": round(self.load_cpu_s, 3),
            "notes": self.notes,
            "phases": {
                "ingest": ingest,
                "baseline": baseline,
                "lookups": lookups,
                "ingest_during_lookups": self.ingest_during_lookups,
            },
        }


@dataclass
class _Lookups:
    phase: dict[str, Any]
    cpu_s: float
    started: float  # time.monotonic() here when the process reported its start
    finished: float


def _run_lookups(spec: LookupSpec, directory: Path, on_event: Events) -> _Lookups:
    """Run the lookup process to its end, passing on its progress; its figures and window."""
    errors = directory / f"lookups-{spec.phase}.err"
    command = [sys.executable, "-m", "idstitch.bench.lookups", msgspec.json.encode(spec).decode()]
    with errors.open("wb") as stderr:
        process = start_reporter(command, stderr)
    result: dict[str, Any] | None = None
    started = finished = 0.0
    try:
        assert process.stdout is not None
        for line in process.stdout:
            event = msgspec.json.decode(line)
            kind = event.get("event")
            if kind == "phase":
                started = time.monotonic()
                on_event({"event": "phase", "phase": spec.phase, "total": spec.seconds})
            elif kind == "progress":
                on_event({"event": "progress", "phase": spec.phase, "completed": event["elapsed"]})
            elif kind == "result":
                finished = time.monotonic()
                result = event
        code = process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if code != 0 or result is None:
        tail = "\n".join(errors.read_text(errors="replace").splitlines()[-20:])
        raise HttpBenchError(f"the lookup process exited with {code}:\n{tail}")
    return _Lookups(result["phase"], float(result["cpu_s"]), started, finished)


def _window_rate(samples: list[tuple[float, int]], start: float, end: float) -> float | None:
    """Messages/s acknowledged between the first progress sample at or after `start` and the last before `end`."""
    inside = [(at, done) for at, done in samples if start <= at <= end]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        return None
    return round((inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0]), 1)


def _tail_workload(workload: Path, skip: int, limit: int, target: Path) -> int:
    """Lines `skip` .. `skip + limit` of the workload into `target` (so phase `lookups` sends new messages)."""
    written = 0
    with workload.open("rb") as source, target.open("wb") as out:
        seen = 0
        for line in source:
            if not line.strip():
                continue
            seen += 1
            if seen <= skip:
                continue
            out.write(line)
            written += 1
            if written >= limit:
                break
    return written


def run_profile_api_bench(
    *,
    profiles: int,
    seconds: float,
    ingest_seconds: float = 15.0,
    ingest_messages: int = 100_000,
    concurrency: int = 8,
    ingest_concurrency: int = 16,
    batch_size: int = 50,
    email_share: float = 0.1,
    seed: int = 1,
    profile_workers: int = 0,
    on_event: Events | None = None,
) -> ProfileApiBenchResult:
    """Seed (or reuse) the store, serve a copy, run the three phases, stop the server; the figures."""
    emit = on_event or (lambda event: None)
    notes: list[str] = []
    emit({"event": "phase", "phase": "seed", "total": profiles})
    seeded_path, seeded = ensure_seeded_store(
        profiles, seed, progress=lambda done: emit({"event": "progress", "phase": "seed", "completed": done})
    )
    emit({"event": "progress", "phase": "seed", "completed": profiles})
    # Phase `lookups` ingests at most half the `ingest` rate for its seconds plus the lead on both sides;
    # that rate is at most ingest_messages / ingest_seconds unless phase `ingest` ran out of messages.
    later = int(ingest_messages * (seconds + 2 * _LEAD_SECONDS) / (2 * ingest_seconds)) + batch_size
    workload = ensure_workload(ingest_messages + later, seed)
    parse_rate = parse_only_rate(workload, ingest_messages)  # before the server starts: nothing competes
    with scratch_directory("profile-api") as directory:
        started = time.perf_counter()
        shutil.copyfile(seeded_path, directory / "bench.db")  # the file _Server serves
        copy_seconds = time.perf_counter() - started
        # _Server runs `idstitch serve` in this directory without --config: ./idstitch.toml is picked up.
        (directory / "idstitch.toml").write_text(_CONFIG, encoding="utf-8")
        # With workers, the Profile API has a port (and processes) of its own: `serve --profile-workers`.
        workers = (
            ("--profile-port", "0", "--profile-workers", str(profile_workers)) if profile_workers else ()
        )
        server = _Server(directory, args=workers)
        try:
            url = server.wait_ready()
            sampler = _RssSampler(server.process.pid)
            try:
                phases = _phases(
                    url=url,
                    lookup_url=server.profile_url,
                    directory=directory,
                    workload=workload,
                    profiles=profiles,
                    seed=seed,
                    seconds=seconds,
                    ingest_seconds=ingest_seconds,
                    ingest_messages=ingest_messages,
                    later=later,
                    concurrency=concurrency,
                    ingest_concurrency=ingest_concurrency,
                    batch_size=batch_size,
                    email_share=email_share,
                    emit=emit,
                    notes=notes,
                )
            finally:
                samples = sampler.stop()
            peak = max([*samples, _high_water_mb(server.process.pid)])
            server_cpu = server.cpu_seconds()
            exit_code = server.stop()
        finally:
            server.kill()
    return ProfileApiBenchResult(
        profiles=profiles,
        seed=seed,
        store=str(seeded_path),
        concurrency=concurrency,
        ingest_concurrency=ingest_concurrency,
        batch_size=batch_size,
        email_share=email_share,
        profile_workers=profile_workers,
        seeded=seeded,
        copy_seconds=copy_seconds,
        ingest=phases.ingest,
        baseline=phases.baseline.phase,
        lookups=phases.lookups.phase,
        ingest_during_lookups=phases.ingest_during_lookups,
        ingest_window_messages_per_s=phases.window_rate,
        rss_samples_mb=samples,
        peak_rss_mb=peak,
        parse_only_messages_per_s=parse_rate,
        server_exit_code=exit_code,
        server_cpu_s=server_cpu,
        lookup_cpu_s=phases.baseline.cpu_s + phases.lookups.cpu_s,
        load_cpu_s=phases.load_cpu_s,
        server_pid=server.process.pid,
        notes=[
            *notes,
            *(
                [
                    f"the {profile_workers} Profile API worker processes' RSS and CPU are not in the server figures"
                ]
                if profile_workers
                else []
            ),
        ],
    )


@dataclass
class _Phases:
    ingest: dict[str, Any]
    baseline: _Lookups
    lookups: _Lookups
    ingest_during_lookups: dict[str, Any]
    window_rate: float | None
    load_cpu_s: float


def _phases(
    *,
    url: str,
    lookup_url: str,
    directory: Path,
    workload: Path,
    profiles: int,
    seed: int,
    seconds: float,
    ingest_seconds: float,
    ingest_messages: int,
    later: int,
    concurrency: int,
    ingest_concurrency: int,
    batch_size: int,
    email_share: float,
    emit: Events,
    notes: list[str],
) -> _Phases:
    """Phases `ingest`, `baseline` and `lookups` against a running server."""

    def relay(phase: str, samples: list[tuple[float, int]] | None = None) -> Events:
        # load.py's events, renamed to this benchmark's phases (and its progress kept when asked).
        def on_event(event: dict[str, Any]) -> None:
            if event.get("event") == "phase":
                emit({"event": "phase", "phase": phase, "total": int(event["total"])})
            elif event.get("event") == "progress":
                if samples is not None:
                    samples.append((time.monotonic(), int(event["messages"])))
                emit({"event": "progress", "phase": phase, "completed": int(event["messages"])})

        return on_event

    ingest_spec = LoadSpec(
        url=url,
        write_key=WRITE_KEY,
        workload=str(workload),
        messages=ingest_messages,
        duration=ingest_seconds,
        concurrency=ingest_concurrency,
        batch_size=batch_size,
        rate=None,
        half_load_seconds=0.0,
        track_requests=0,
    )
    first = _run_load(ingest_spec, directory, relay("ingest"))
    ingest = first.phases["main"]
    if not ingest["messages"]:
        raise HttpBenchError(f"phase ingest: no message was acknowledged (errors: {ingest['errors']})")
    time.sleep(_SETTLE_SECONDS)

    lookup_spec = LookupSpec(
        url=lookup_url,
        token=READ_TOKEN,
        space=SPACE,
        profiles=profiles,
        seed=seed,
        seconds=seconds,
        concurrency=concurrency,
        email_share=email_share,
        draw_seed=seed,
        phase="baseline",
    )
    baseline = _run_lookups(lookup_spec, directory, emit)
    time.sleep(_SETTLE_SECONDS)

    # Next lines of the same stream: messages the server has not seen (a resent one would be a cheap
    # duplicate). A request that failed in phase `ingest` may have used its lines: skip those too.
    failed_requests = sum(ingest["errors"].values())
    half_rate = float(ingest["messages_per_s"]) / 2
    budget = int(half_rate * (seconds + 2 * _LEAD_SECONDS)) + batch_size
    rest = directory / "ingest-during-lookups.ndjson"
    available = _tail_workload(
        workload, int(ingest["messages"]) + failed_requests * batch_size, min(budget, later), rest
    )
    if available < budget:
        notes.append(
            f"the workload held {available:,} more messages where ingest at {half_rate:,.0f}/s for the"
            f" phase needs {budget:,}: ingest may stop before the lookups do"
        )
    samples: list[tuple[float, int]] = []
    started_ingest = threading.Event()
    outcome: dict[str, Any] = {}

    def ingest_in_background() -> None:
        spec = LoadSpec(
            url=url,
            write_key=WRITE_KEY,
            workload=str(rest),
            messages=available,
            duration=seconds + 2 * _LEAD_SECONDS,
            concurrency=ingest_concurrency,
            batch_size=batch_size,
            rate=half_rate,
            half_load_seconds=0.0,
            track_requests=0,
        )
        relayed = relay("ingest at half rate", samples)

        def on_event(event: dict[str, Any]) -> None:
            relayed(event)
            if event.get("event") == "phase":
                started_ingest.set()

        try:
            outcome["load"] = _run_load(spec, directory, on_event)
        except BaseException as error:  # handed to the main thread, which raises it
            outcome["error"] = error
        finally:
            started_ingest.set()

    thread = threading.Thread(target=ingest_in_background, name="bench-ingest", daemon=True)
    thread.start()
    started_ingest.wait()
    if "error" in outcome:
        thread.join()
        raise outcome["error"]
    time.sleep(_LEAD_SECONDS)  # ingest is at its pace before the first lookup is measured
    # Other people than the baseline's (statistically alike): pages the baseline read are no head start.
    under_ingest = msgspec.structs.replace(lookup_spec, phase="lookups", draw_seed=seed + 1_000_003)
    lookups = _run_lookups(under_ingest, directory, emit)
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    second = outcome["load"]
    during = second.phases["main"]
    window = _window_rate(samples, lookups.started, lookups.finished)
    return _Phases(ingest, baseline, lookups, during, window, first.cpu_s + second.cpu_s)
