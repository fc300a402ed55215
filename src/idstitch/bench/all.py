"""`idstitch bench all`: every benchmark and the accuracy run, one after another, into one results file.

Each benchmark runs as its own `idstitch bench … --json` process, as a user would run it: peak RSS is
then that benchmark's own, and one failing benchmark is recorded (with its exit code and the end of
its stderr) while the others still run. The accuracy run simulates a population, ingests it into a
fresh store and compares the result with the truth. `idstitch report` turns the file into
benchmarks/REPORT.md with plots.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec

from idstitch.bench.children import die_with_parent
from idstitch.storage.urls import redact_url, without_password

__all__ = ["AllBenchPlan", "postgres_unreachable", "run_all"]

_TAIL_CHARS = 2000


@dataclass(frozen=True)
class AllBenchPlan:
    """Sizes of one `bench all` run."""

    messages: int = 1_000_000  # core, sqlite
    scale_messages: int = 0  # a further sqlite run at this size (e.g. 5M) for throughput vs size; 0: none
    seed: int = 1
    http_seconds: float = 60.0
    profiles: int = 1_000_000  # store size of the profile-api benchmark
    profile_seconds: float = 30.0
    profile_workers: int = 0  # also a profile-api run with this many worker processes; 0: none
    accuracy_people: int = 125_000  # 8 messages per person: 1M messages; 0: no accuracy run
    postgres_url: str | None = None  # run `bench postgres` against it when it answers; None: not asked for


def _command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "idstitch", *arguments]


def _environment() -> dict[str, str]:
    """The caller's environment without its idstitch settings (IDSTITCH_CONFIG, _SPACE, _STORE, …): the
    accuracy run is of the default rules in a fresh store, whatever the shell says; IDSTITCH_BENCH_* stay."""
    return {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("IDSTITCH_") or key.startswith("IDSTITCH_BENCH_")
    }


def _run_json(
    arguments: Sequence[str], log: Callable[[str], None], cwd: Path, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Run one `idstitch …` command that prints one JSON object; a failure becomes a recorded error.

    `env` is for what must not be logged or shown by `ps` (a URL's password), as a command line is."""
    log("$ idstitch " + " ".join(arguments))
    started = time.monotonic()
    environment = {**_environment(), **(env or {})}
    done = subprocess.run(
        _command(*arguments),
        capture_output=True,
        cwd=cwd,
        env=environment,
        check=False,
        preexec_fn=die_with_parent(),
    )
    seconds = round(time.monotonic() - started, 1)
    if done.returncode != 0:
        tail = done.stderr.decode(errors="replace")[-_TAIL_CHARS:]
        log(f"  failed with exit code {done.returncode} after {seconds} s")
        return {"error": f"exit code {done.returncode}", "stderr": tail, "wall_s": seconds}
    try:
        result = msgspec.json.decode(done.stdout.strip().splitlines()[-1])
    except (msgspec.DecodeError, IndexError):
        return {"error": "did not print a JSON object", "stdout": done.stdout.decode()[-_TAIL_CHARS:]}
    if isinstance(result, list):
        result = {"runs": result}  # `bench postgres` prints one object per worker count
    if not isinstance(result, dict):
        return {"error": "did not print a JSON object", "stdout": done.stdout.decode()[-_TAIL_CHARS:]}
    result["wall_s"] = seconds
    log(f"  done in {seconds} s")
    return result


def postgres_unreachable(url: str) -> str | None:
    """Why PostgreSQL at `url` cannot be benchmarked (a connection attempt's error), or None."""
    import psycopg

    try:
        with psycopg.connect(url, connect_timeout=3):
            return None
    except psycopg.Error as error:
        text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return without_password(text, url)


def _postgres(url: str, seed: int, log: Callable[[str], None], cwd: Path) -> dict[str, Any]:
    """`bench postgres` (one object per worker count) as one object: the runs, and the best rate for the targets."""
    if (why := postgres_unreachable(url)) is not None:
        log(f"PostgreSQL is not reachable, bench postgres skipped: {why}")
        return {"skipped": f"PostgreSQL not reachable at {redact_url(url)}: {why}"}
    environment = {"IDSTITCH_BENCH_POSTGRES": url}  # the --postgres of `bench postgres`
    result = _run_json(["bench", "postgres", "--seed", str(seed), "--json"], log, cwd, environment)
    runs = result.get("runs")
    if "error" in result or not isinstance(runs, list) or not runs:
        return result
    best = max(runs, key=lambda run: float(run.get("messages_per_s") or 0))
    return {
        "runs": runs,
        "mode": best.get("mode"),
        "messages_per_s": best.get("messages_per_s"),
        "best_workers": best.get("workers"),
        "p95_ms": best.get("p95_ms"),
        "verified": all(run.get("verified") for run in runs),
        "wall_s": result.get("wall_s"),
    }


def _accuracy(plan: AllBenchPlan, log: Callable[[str], None], scratch: Path) -> dict[str, Any]:
    events, truth = scratch / "events.ndjson.gz", scratch / "truth.csv.gz"
    store = f"sqlite:///{scratch / 'accuracy.db'}"
    generated = _run_json(
        [
            "simulate",
            "--people",
            str(plan.accuracy_people),
            "--seed",
            str(plan.seed),
            "--out",
            str(events),
            "--truth",
            str(truth),
            "--json",
        ],
        log,
        scratch,
    )
    if "error" in generated:
        return {"simulate": generated}
    ingested = _run_json(["ingest", str(events), "--store", store, "--json", "--quiet"], log, scratch)
    if "error" in ingested:
        return {"simulate": generated, "ingest": ingested}
    measured = _run_json(["accuracy", "--truth", str(truth), "--store", store, "--json"], log, scratch)
    return {"simulate": generated, "ingest": ingested, "accuracy": measured}


def _machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
    }


def run_all(plan: AllBenchPlan, log: Callable[[str], None]) -> dict[str, Any]:
    """Run every benchmark of the plan, one at a time; the results as one JSON-able object."""
    started = datetime.now(UTC)
    benchmarks: dict[str, Any] = {}
    size = ["--messages", str(plan.messages), "--seed", str(plan.seed), "--json"]
    with tempfile.TemporaryDirectory(prefix="idstitch-bench-all-") as directory:
        scratch = Path(directory)
        benchmarks["core"] = _run_json(["bench", "core", *size], log, scratch)
        benchmarks["sqlite"] = _run_json(["bench", "sqlite", *size], log, scratch)
        if plan.scale_messages:
            scale = ["--messages", str(plan.scale_messages), "--seed", str(plan.seed), "--json"]
            benchmarks["sqlite_scale"] = _run_json(["bench", "sqlite", *scale], log, scratch)
        benchmarks["http"] = _run_json(
            ["bench", "http", "--duration", str(plan.http_seconds), "--json"], log, scratch
        )
        for key, workers in (("profile_api", 0), ("profile_api_workers", plan.profile_workers)):
            if key == "profile_api_workers" and not workers:
                continue
            benchmarks[key] = _run_json(
                [
                    "bench",
                    "profile-api",
                    "--profiles",
                    str(plan.profiles),
                    "--seconds",
                    str(plan.profile_seconds),
                    "--profile-workers",
                    str(workers),
                    "--json",
                ],
                log,
                scratch,
            )
        if plan.postgres_url is None:
            benchmarks["postgres"] = {"skipped": "not asked for (--no-postgres)"}
        else:
            benchmarks["postgres"] = _postgres(plan.postgres_url, plan.seed, log, scratch)
        accuracy = _accuracy(plan, log, scratch) if plan.accuracy_people else {}
    return {
        "generated_at": started.isoformat(timespec="seconds"),
        "seconds": round((datetime.now(UTC) - started).total_seconds(), 1),
        "machine": _machine(),
        "plan": {
            "messages": plan.messages,
            "scale_messages": plan.scale_messages,
            "seed": plan.seed,
            "http_seconds": plan.http_seconds,
            "profiles": plan.profiles,
            "profile_seconds": plan.profile_seconds,
            "profile_workers": plan.profile_workers,
            "accuracy_people": plan.accuracy_people,
        },
        "benchmarks": benchmarks,
        "accuracy": accuracy,
    }
