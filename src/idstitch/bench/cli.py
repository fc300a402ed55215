"""`idstitch bench core|sqlite|http|profile-api|postgres|all`: printed figures, or JSON with --json."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import msgspec
import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeRemainingColumn
from rich.table import Table

from idstitch.bench.all import AllBenchPlan, run_all
from idstitch.bench.children import raise_on_sigterm
from idstitch.bench.http import HttpBenchError, HttpBenchResult, run_http_bench
from idstitch.bench.postgres import (
    DEFAULT_POSTGRES_URL,
    TARGET_MESSAGES_PER_S,
    PostgresBenchError,
    PostgresBenchPlan,
    PostgresRun,
    run_postgres_bench,
)
from idstitch.bench.profile_api import ProfileApiBenchResult, run_profile_api_bench
from idstitch.bench.runner import BenchResult, run_ingest_bench
from idstitch.bench.scratch import scratch_directory
from idstitch.cli import OutputConsole

__all__ = ["app"]

app = typer.Typer(
    help="Benchmarks: throughput, latency and memory of ingest (embedded, over HTTP, on PostgreSQL) and of the Profile API.",
    no_args_is_help=True,
)

Messages = Annotated[int, typer.Option("--messages", "-n", min=1, help="How many generated messages.")]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the generated population.")]
BatchSize = Annotated[
    int, typer.Option("--batch-size", min=1, help="Most messages per transaction (group commit).")
]
LatencyBudget = Annotated[
    float,
    typer.Option(
        "--latency-budget-ms",
        min=0.0,
        help="Size each transaction to commit within this many ms of its first message's receipt "
        "(0: always --batch-size messages).",
    ),
]
DEFAULT_LATENCY_BUDGET_MS = 5.0


_stderr = OutputConsole(stderr=True)


@app.callback()
def _unwind_on_sigterm() -> None:
    """Before any benchmark: a SIGTERM stops its servers and load processes, then exits 143."""
    raise_on_sigterm()


def _progress(label: str, as_json: bool) -> Progress:
    """A progress bar on stderr, shown only to a person watching (never with --json)."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=_stderr,
        disable=as_json or not sys.stderr.isatty(),
    )


def _phase_bars(bar: Progress, done_field: str = "messages") -> Callable[[dict[str, Any]], None]:
    """A benchmark's `on_event`: a bar per phase (`{"event": "phase", "phase", "total"}`), moved by its
    progress events' `done_field`."""
    tasks: dict[str, TaskID] = {}

    def on_event(event: dict[str, Any]) -> None:
        phase = str(event.get("phase"))
        if event.get("event") == "phase" and phase not in tasks:
            tasks[phase] = bar.add_task(phase, total=float(event["total"]))
        elif event.get("event") == "progress" and phase in tasks:
            bar.update(tasks[phase], completed=float(event[done_field]))

    return on_event


def _run(
    name: str,
    store_url: str,
    messages: int,
    seed: int,
    batch_size: int,
    latency_budget_ms: float,
    as_json: bool,
) -> None:
    with _progress(f"bench {name}", as_json) as bar:
        task = bar.add_task(name, total=messages)
        result = run_ingest_bench(
            name,
            store_url,
            messages=messages,
            seed=seed,
            batch_size=batch_size,
            latency_budget_ms=latency_budget_ms,
            progress=lambda done: bar.update(task, completed=done),
        )
    if as_json:
        sys.stdout.write(msgspec.json.encode(result.as_dict()).decode() + "\n")
        return
    _print(result)


def _print(result: BenchResult) -> None:
    console = OutputConsole()
    table = Table(title=f"idstitch bench {result.name} ({result.store})", show_header=False)
    table.add_row("messages", f"{result.messages:,}")
    budget = f"latency budget {result.latency_budget_ms:g} ms" if result.latency_budget_ms else "fixed"
    table.add_row(
        "batch size (group commit)",
        f"{result.mean_batch_size:,.1f} on average, at most {result.batch_size} ({budget})",
    )
    table.add_row("messages/s", f"{result.messages_per_s:,.0f}")
    table.add_row(
        "latency receipt→commit P50 / P95 / P99",
        f"{result.p50_ms:.2f} / {result.p95_ms:.2f} / {result.p99_ms:.2f} ms",
    )
    table.add_row("peak RSS", f"{result.peak_rss_mb:,.0f} MB")
    table.add_row("msgspec parse-only messages/s", f"{result.parse_only_messages_per_s:,.0f}")
    table.add_row("ratio to parse-only", f"{result.parse_only_ratio:.3f}")
    table.add_row(
        "floor: decode + de-dup + store the event, no resolution",
        f"{result.floor_messages_per_s:,.0f}/s (this run at {result.floor_ratio:.2f} of it)",
    )
    for mark in result.rate_by_size:
        table.add_row(
            f"at {int(mark['messages']):,} messages",
            f"{mark['cumulative_messages_per_s']:,.0f}/s overall, {mark['segment_messages_per_s']:,.0f}/s since previous, "
            f"RSS {mark['rss_mb']:,.0f} MB",
        )
    table.add_row("outcomes", ", ".join(f"{key} {value:,}" for key, value in sorted(result.outcomes.items())))
    table.add_row(
        "graph",
        ", ".join(f"{key} {value:,}" for key, value in result.stats.items() if key != "space"),
    )
    console.print(table)


@app.command("sqlite")
def bench_sqlite(
    messages: Messages = 1_000_000,
    seed: Seed = 1,
    batch_size: BatchSize = 100,
    latency_budget_ms: LatencyBudget = DEFAULT_LATENCY_BUDGET_MS,
    path: Annotated[
        Path | None, typer.Option("--path", help="SQLite file to create (default: a fresh temp file).")
    ] = None,
    as_json: Json = False,
) -> None:
    """Ingest a generated realistic stream into a fresh SQLite file (WAL, durable commits)."""
    with scratch_directory("sqlite") as folder:
        target = path or folder / "bench.db"
        if target.exists():
            raise typer.BadParameter(
                f"{target} exists; the benchmark needs a fresh file", param_hint="--path"
            )
        _run("sqlite", f"sqlite:///{target}", messages, seed, batch_size, latency_budget_ms, as_json)


@app.command("core")
def bench_core(
    messages: Messages = 1_000_000,
    seed: Seed = 1,
    batch_size: BatchSize = 100,
    latency_budget_ms: LatencyBudget = DEFAULT_LATENCY_BUDGET_MS,
    as_json: Json = False,
) -> None:
    """The same stream through the core and the in-memory store: the ceiling without a database."""
    _run("core", "memory://", messages, seed, batch_size, latency_budget_ms, as_json)


def _print_http(result: HttpBenchResult) -> None:
    figures = result.as_dict()
    phases = result.phases
    console = OutputConsole()
    main = phases["main"]
    how = f"open loop at {result.rate:,.0f} msg/s" if result.rate else "closed loop: maximum throughput"
    table = Table(
        title=f"idstitch bench http ({result.concurrency} connections, {result.batch_size} messages per batch)",
        show_header=False,
    )
    table.add_row("/v1/batch", how)
    table.add_row("messages acknowledged", f"{main['messages']:,} in {main['seconds']:.1f} s")
    table.add_row("messages/s", f"{main['messages_per_s']:,.0f}")
    table.add_row("requests/s", f"{main['requests_per_s']:,.1f}")
    table.add_row("latency P50 / P95 / P99", _latencies(main))
    if "half" in phases:
        half = phases["half"]
        table.add_row(
            f"half load: open loop at {half['target_rate']:,.0f} msg/s",
            f"{half['messages']:,} messages in {half['seconds']:.1f} s, {half['messages_per_s']:,.0f}/s achieved",
        )
        table.add_row("half load latency P50 / P95 / P99", _latencies(half))
    if "track" in phases:
        track = phases["track"]
        table.add_row(
            "/v1/track requests/s", f"{track['requests_per_s']:,.0f} ({track['requests']:,} requests)"
        )
        table.add_row("/v1/track latency P50 / P95 / P99", _latencies(track))
    table.add_row("429 answers", f"{figures['rejected_429']:,}")
    if figures["errors"] or figures["rejected_messages"]:
        table.add_row(
            "errors / messages refused", f"{figures['errors']:,} / {figures['rejected_messages']:,}"
        )
    table.add_row(
        "server RSS start / peak / end",
        f"{figures['rss_start_mb']:,.0f} / {figures['peak_rss_mb']:,.0f} / {figures['rss_end_mb']:,.0f} MB",
    )
    table.add_row("server RSS every second", _sparse(result.rss_samples_mb))
    table.add_row("msgspec parse-only messages/s", f"{result.parse_only_messages_per_s:,.0f}")
    table.add_row("ratio to parse-only", f"{figures['parse_only_ratio']:.4f}")
    table.add_row(
        "server counted / acknowledged",
        f"{result.server_counted_messages:,} / {result.acknowledged_messages:,} messages"
        f" in {result.server_commits:,} commits",
    )
    table.add_row(
        "CPU seconds: server / load generator", f"{result.server_cpu_s:,.1f} / {result.load_cpu_s:,.1f}"
    )
    table.add_row("server exit status after SIGTERM", str(result.server_exit_code))
    console.print(table)


def _latencies(phase: dict[str, Any]) -> str:
    return f"{phase['p50_ms']:.1f} / {phase['p95_ms']:.1f} / {phase['p99_ms']:.1f} ms"


def _sparse(samples: list[float], most: int = 16) -> str:
    """At most `most` evenly spaced samples (first and last always), enough to see whether RSS is flat."""
    if len(samples) <= most:
        picked = samples
    else:
        step = (len(samples) - 1) / (most - 1)
        picked = [samples[round(index * step)] for index in range(most)]
    return " ".join(f"{value:,.0f}" for value in picked) + " MB"


@app.command("http")
def bench_http(
    messages: Annotated[
        int, typer.Option("--messages", "-n", min=1, help="Messages to have acknowledged via /v1/batch.")
    ] = 100_000,
    duration: Annotated[
        float, typer.Option("--duration", min=0.1, help="Upper bound in seconds of the /v1/batch phase.")
    ] = 60.0,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, max=512, help="Concurrent keep-alive connections.")
    ] = 16,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=500, help="Messages per /v1/batch request.")
    ] = 50,
    rate: Annotated[
        float | None,
        typer.Option(
            "--rate", min=1.0, help="Open loop at this many messages/s instead of maximum throughput."
        ),
    ] = None,
    half_load_seconds: Annotated[
        float,
        typer.Option(
            "--half-load-seconds",
            min=0.0,
            help="Seconds at half the maximum rate after it, at most as long as that phase (0: skip).",
        ),
    ] = 20.0,
    track_requests: Annotated[
        int, typer.Option("--track-requests", min=0, help="Single-message /v1/track requests (0: skip).")
    ] = 5_000,
    seed: Seed = 1,
    as_json: Json = False,
) -> None:
    """A real `idstitch serve` over a fresh SQLite file, loaded over loopback from another process."""
    with _progress("bench http {task.description}", as_json) as bar:
        on_event = _phase_bars(bar)

        try:
            result = run_http_bench(
                messages=messages,
                duration=duration,
                concurrency=concurrency,
                batch_size=batch_size,
                rate=rate,
                half_load_seconds=0.0 if rate is not None else half_load_seconds,
                track_requests=track_requests,
                seed=seed,
                on_event=on_event,
            )
        except HttpBenchError as error:
            _stderr.print(f"bench http: {error}", markup=False, highlight=False)
            raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(msgspec.json.encode(result.as_dict()).decode() + "\n")
    else:
        _print_http(result)
    if result.server_exit_code != 0:
        _stderr.print(f"bench http: the server exited with {result.server_exit_code} on SIGTERM, not 0")
        raise typer.Exit(1)


def _print_profile_api(result: ProfileApiBenchResult) -> None:
    figures = result.as_dict()
    lookups, baseline, ingest = result.lookups, result.baseline, result.ingest
    during = result.ingest_during_lookups
    console = OutputConsole()
    table = Table(
        title=f"idstitch bench profile-api ({result.profiles:,} profiles, {result.concurrency} connections)",
        show_header=False,
    )
    if result.seeded is not None:
        table.add_row(
            "seeded store",
            f"{result.seeded.profiles:,} profiles, {result.seeded.messages:,} messages"
            f" in {result.seeded.seconds:,.1f} s",
        )
    else:
        table.add_row("seeded store", "cached")
    table.add_row("copied for this run", f"{result.copy_seconds:.1f} s")
    table.add_row(
        "ingest alone: /v1/batch closed loop",
        f"{ingest['messages_per_s']:,.0f} msg/s, request P95 {ingest['p95_ms']:.1f} ms"
        f" ({result.ingest_concurrency} connections)",
    )
    table.add_row(
        "lookups alone (baseline)",
        f"{baseline['requests_per_s']:,.0f}/s, P50 / P95 / P99 {_latencies(baseline)}",
    )
    window = figures["ingest_messages_per_s"]
    table.add_row(
        f"ingest during lookups (target {during['target_rate']:,.0f} msg/s)",
        (f"{window:,.0f} msg/s" if window is not None else "not measured")
        + f", request P95 {during['p95_ms']:.1f} ms",
    )
    table.add_row("lookups under ingest", f"{lookups['requests_per_s']:,.0f}/s ({lookups['requests']:,})")
    table.add_row("latency P50 / P95 / P99", _latencies(lookups))
    if figures["ratio_to_baseline"] is not None:
        table.add_row("lookups/s, ratio to baseline", f"{figures['ratio_to_baseline']:.3f}")
    table.add_row(
        "lookup errors (non-200 or wrong profile)",
        f"{result.errors:,}"
        + (f" {baseline['errors']} / {lookups['errors']}" if result.errors else "")
        + f"; {baseline['checked'] + lookups['checked']:,} answers checked",
    )
    if figures["ingest_errors"]:
        table.add_row("ingest requests failed", f"{figures['ingest_errors']:,}")
    table.add_row(
        f"target: P95 <= {figures['target_p95_ms']:.0f} ms, >= {figures['target_lookups_per_s']:,.0f}/s",
        "met" if result.meets_target else "not met",
    )
    table.add_row(
        "server RSS start / peak / end",
        f"{figures['rss_start_mb']:,.0f} / {figures['peak_rss_mb']:,.0f} / {figures['rss_end_mb']:,.0f} MB",
    )
    table.add_row("server RSS every second", _sparse(result.rss_samples_mb))
    table.add_row(
        "CPU seconds: server / lookups / ingest load",
        f"{result.server_cpu_s:,.1f} / {result.lookup_cpu_s:,.1f} / {result.load_cpu_s:,.1f}",
    )
    table.add_row("server exit status after SIGTERM", str(result.server_exit_code))
    for note in result.notes:
        table.add_row("note", note)
    console.print(table)


@app.command("profile-api")
def bench_profile_api(
    profiles: Annotated[
        int,
        typer.Option("--profiles", min=1, help="Seeded profiles in the store (cached per size and seed)."),
    ] = 1_000_000,
    seconds: Annotated[
        float, typer.Option("--seconds", min=0.5, help="Seconds of lookups, alone and under ingest.")
    ] = 30.0,
    ingest_seconds: Annotated[
        float, typer.Option("--ingest-seconds", min=0.5, help="Seconds of the ingest-alone phase.")
    ] = 15.0,
    ingest_messages: Annotated[
        int, typer.Option("--ingest-messages", min=1, help="At most this many messages in that phase.")
    ] = 100_000,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, max=512, help="Keep-alive connections doing lookups.")
    ] = 8,
    ingest_concurrency: Annotated[
        int, typer.Option("--ingest-concurrency", min=1, max=512, help="Connections of the ingest load.")
    ] = 16,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, max=500, help="Messages per /v1/batch request.")
    ] = 50,
    email_share: Annotated[
        float,
        typer.Option("--email-share", min=0.0, max=1.0, help="Share of lookups by email: (else user_id:)."),
    ] = 0.1,
    profile_workers: Annotated[
        int,
        typer.Option(
            "--profile-workers",
            min=0,
            max=64,
            help="Serve the Profile API from N processes of its own (`serve --profile-workers`); 0: in the server.",
        ),
    ] = 0,
    seed: Seed = 1,
    as_json: Json = False,
) -> None:
    """Traits lookups by type:value on a seeded store over loopback, alone and while ingest runs at half rate."""
    with _progress("bench profile-api {task.description}", as_json) as bar:
        on_event = _phase_bars(bar, "completed")

        try:
            result = run_profile_api_bench(
                profiles=profiles,
                seconds=seconds,
                ingest_seconds=ingest_seconds,
                ingest_messages=ingest_messages,
                concurrency=concurrency,
                ingest_concurrency=ingest_concurrency,
                batch_size=batch_size,
                email_share=email_share,
                seed=seed,
                profile_workers=profile_workers,
                on_event=on_event,
            )
        except HttpBenchError as error:
            _stderr.print(f"bench profile-api: {error}", markup=False, highlight=False)
            raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(msgspec.json.encode(result.as_dict()).decode() + "\n")
    else:
        _print_profile_api(result)
    if result.errors:
        _stderr.print(f"bench profile-api: {result.errors:,} lookups failed (see lookup_errors)")
        raise typer.Exit(1)
    if result.server_exit_code != 0:
        _stderr.print(
            f"bench profile-api: the server exited with {result.server_exit_code} on SIGTERM, not 0"
        )
        raise typer.Exit(1)


def _parse_workers(text: str) -> tuple[int, ...]:
    """`1,2,4` → (1, 2, 4): worker counts of at least 1, in the order given."""
    try:
        counts = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise typer.BadParameter(
            f"{text!r}: expected worker counts such as 1,2,4", param_hint="--workers"
        ) from None
    if not counts or min(counts) < 1:
        raise typer.BadParameter(f"{text!r}: expected worker counts of at least 1", param_hint="--workers")
    return counts


def _print_postgres(runs: list[PostgresRun]) -> None:
    console = OutputConsole()
    first = runs[0]
    how = "through JetStream" if first.mode == "queue" else "direct"
    title = (
        f"idstitch bench postgres ({how}, {first.messages:,} messages, {first.batch_size} per batch"
        + (f", {first.fetch} per worker fetch" if first.mode == "queue" else "")
        + f", {first.cpus} CPUs)"
    )
    # One column per worker count, one row per figure: fits a terminal for a few worker counts.
    table = Table(title=title)
    table.add_column("workers")
    for run in runs:
        table.add_column(str(run.workers), justify="right")
    figures = [run.as_dict() for run in runs]
    shares = [run.cpu_percent() for run in runs]

    def row(label: str, cells: list[str]) -> None:
        table.add_row(label, *cells)

    row("messages/s", [f"{run.messages_per_s:,.0f}" for run in runs])
    row("speedup", [f"{run.speedup:.2f}×" if run.speedup is not None else "–" for run in runs])
    row("seconds", [f"{run.seconds:,.1f}" for run in runs])
    row(
        "msg/s by quarter of the stream",
        [" / ".join(f"{rate:,.0f}" for rate in run.rate_by_quarter) for run in runs],
    )
    row("latency P50 / P95 / P99 ms", [f"{r.p50_ms:,.0f} / {r.p95_ms:,.0f} / {r.p99_ms:,.0f}" for r in runs])
    row("box CPU busy", [f"{share['box']:.0f}%" for share in shares])
    row("  PostgreSQL, all processes", [f"{share['postgres']:.0f}%" for share in shares])
    row("  of which this run's backends", [f"{share['postgres_backends']:.0f}%" for share in shares])
    row("  of which background processes", [f"{share['postgres_background']:.0f}%" for share in shares])
    row("  worker processes", [f"{share['workers']:.0f}%" for share in shares])
    if first.mode == "queue":
        row("  nats-server", [f"{share['nats']:.0f}%" for share in shares])
    row("  everything else", [f"{share['other']:.0f}%" for share in shares])
    row(
        "  busiest other processes",
        [
            ", ".join(f"{item['name']} {item['cpu_percent']:.0f}%" for item in fig["other_processes"]) or "–"
            for fig in figures
        ],
    )
    row("msgspec parse-only msg/s", [f"{run.parse_only_messages_per_s:,.0f}" for run in runs])
    row("  ratio to parse-only", [f"{run.parse_only_ratio:.4f}" for run in runs])
    row("CPU ms per message", [f"{run.cpu_ms_per_message:.2f}" for run in runs])
    row("msg/s that would fill every CPU", [f"{run.cpu_bound_messages_per_s:,.0f}" for run in runs])
    row(
        "commits (lock splits)",
        [f"{run.commits:,} ({fig['lock_splits']:,})" for run, fig in zip(runs, figures, strict=True)],
    )
    row("transactions retried", [f"{run.conflicts:,} + {run.lock_busy:,} lock busy" for run in runs])
    row("peak RSS per worker", [f"{run.peak_rss_mb:,.0f} MB" for run in runs])
    if first.mode == "queue":
        row(
            "published before the start",
            [f"{run.publish_seconds or 0:.1f} s, {run.queue_messages or 0:,} requests" for run in runs],
        )
        row("requests nak'ed and retried", [f"{run.queue_retried or 0:,}" for run in runs])
    row(
        "every message landed once",
        [f"yes, {run.stored_events:,}" if run.verified else "[bold red]NO[/bold red]" for run in runs],
    )
    console.print(table)
    best = max(runs, key=lambda run: run.messages_per_s)
    verdict = "met" if best.meets_target else "not met"
    console.print(
        f"target ≥ {TARGET_MESSAGES_PER_S:,.0f} msg/s at the best worker count: {verdict} "
        f"(best {best.messages_per_s:,.0f} msg/s with {best.workers} worker{'s' if best.workers != 1 else ''}, "
        f"{best.messages_per_s / TARGET_MESSAGES_PER_S:.1%} of the target)",
        highlight=False,
    )
    console.print(
        "CPU shares: of the whole box (every CPU) from the start signal to the last report. PostgreSQL:"
        " every postgres process: this run's connections (backends), the background processes (WAL"
        " writer, checkpointer, autovacuum) and any other client's.",
        highlight=False,
    )


@app.command("postgres")
def bench_postgres(
    workers: Annotated[
        str, typer.Option("--workers", help="Worker process counts to run, one after another (e.g. 1,2,4).")
    ] = "1,2,4",
    messages: Annotated[
        int,
        typer.Option("--messages", "-n", min=1, help="Generated messages, the same stream for every run."),
    ] = 20_000,
    batch_size: Annotated[
        int, typer.Option("--batch-size", min=1, help="Messages per engine call (per request with --queue).")
    ] = 100,
    postgres: Annotated[
        str,
        typer.Option(
            "--postgres",
            metavar="URL",
            envvar="IDSTITCH_BENCH_POSTGRES",
            help="Database to use; each run creates a schema of its own there and drops it afterwards.",
        ),
    ] = DEFAULT_POSTGRES_URL,
    queue: Annotated[
        str | None,
        typer.Option(
            "--queue",
            metavar="nats://HOST:PORT",
            help="Go through NATS JetStream: publish to a fresh stream, N `run_worker` processes drain it.",
        ),
    ] = None,
    fetch: Annotated[
        int | None,
        typer.Option(
            "--fetch",
            min=1,
            help="With --queue: requests per worker fetch, resolved as one group (default 1).",
        ),
    ] = None,
    seed: Seed = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON list: an object per worker count, with its mode.")
    ] = False,
) -> None:
    """Ingest on PostgreSQL with N worker processes at once: msg/s, latency, CPU by process, per worker count."""
    if fetch is not None and queue is None:
        raise typer.BadParameter("only means something with --queue nats://…", param_hint="--fetch")
    plan = PostgresBenchPlan(
        postgres_url=postgres,
        workers=_parse_workers(workers),
        messages=messages,
        batch_size=batch_size,
        seed=seed,
        queue_url=queue,
        fetch=fetch or 1,
    )
    with _progress("bench postgres {task.description}", as_json) as bar:
        on_event = _phase_bars(bar)

        try:
            runs = run_postgres_bench(plan, on_event=on_event)
        except PostgresBenchError as error:
            _stderr.print(f"bench postgres: {error}", markup=False, highlight=False)
            raise typer.Exit(1) from None
    if as_json:
        sys.stdout.write(msgspec.json.encode([run.as_dict() for run in runs]).decode() + "\n")
    else:
        _print_postgres(runs)
    failed = [run for run in runs if not run.verified]
    for run in failed:
        _stderr.print(
            f"bench postgres: with {run.workers} workers NOT every message landed exactly once: "
            + "; ".join(run.problems),
            style="bold red",
            markup=False,
            highlight=False,
        )
    if failed:
        raise typer.Exit(1)


@app.command("all")
def bench_all(
    messages: Annotated[
        int, typer.Option("--messages", "-n", min=1, help="Messages of the core and sqlite benchmarks.")
    ] = 1_000_000,
    scale: Annotated[
        int,
        typer.Option(
            "--scale", min=0, help="Also a sqlite run of this many messages (e.g. 5000000); 0: none."
        ),
    ] = 0,
    scale_from: Annotated[
        Path | None,
        typer.Option(
            "--scale-from",
            exists=True,
            dir_okay=False,
            help="Use this earlier `bench sqlite --json` output as the scale run instead of running it.",
        ),
    ] = None,
    http_seconds: Annotated[
        float, typer.Option("--http-seconds", min=1, help="Duration of bench http.")
    ] = 60.0,
    profiles: Annotated[
        int, typer.Option("--profiles", min=1, help="Store size of bench profile-api.")
    ] = 1_000_000,
    profile_seconds: Annotated[
        float, typer.Option("--profile-seconds", min=0.5, help="Seconds of lookups in bench profile-api.")
    ] = 30.0,
    profile_workers: Annotated[
        int, typer.Option("--profile-workers", min=0, max=64, help="bench profile-api --profile-workers.")
    ] = 0,
    people: Annotated[
        int, typer.Option("--people", min=1, help="Simulated people of the accuracy run (8 messages each).")
    ] = 125_000,
    accuracy_from: Annotated[
        Path | None,
        typer.Option(
            "--accuracy-from",
            exists=True,
            dir_okay=False,
            help="Use this earlier `idstitch accuracy --json` output instead of an accuracy run.",
        ),
    ] = None,
    postgres: Annotated[
        str,
        typer.Option(
            "--postgres",
            metavar="URL",
            envvar="IDSTITCH_BENCH_POSTGRES",
            help="bench postgres against this URL, when it answers (else listed as skipped, with why).",
        ),
    ] = DEFAULT_POSTGRES_URL,
    no_postgres: Annotated[bool, typer.Option("--no-postgres", help="Leave bench postgres out.")] = False,
    out: Annotated[
        Path, typer.Option("--out", help="Where to write the results (read by `idstitch report`).")
    ] = Path("benchmarks/results.json"),
    seed: Seed = 1,
    as_json: Json = False,
) -> None:
    """Every benchmark and the accuracy run, one at a time, into one results file for `idstitch report`."""
    plan = AllBenchPlan(
        messages=messages,
        scale_messages=0 if scale_from is not None else scale,
        seed=seed,
        http_seconds=http_seconds,
        profiles=profiles,
        profile_seconds=profile_seconds,
        profile_workers=profile_workers,
        accuracy_people=0 if accuracy_from is not None else people,
        postgres_url=None if no_postgres else postgres,
    )
    results = run_all(plan, log=lambda line: _stderr.print(line, markup=False, highlight=False))
    if accuracy_from is not None:
        earlier_accuracy = msgspec.json.decode(accuracy_from.read_bytes())
        results["accuracy"] = {
            "accuracy": earlier_accuracy,
            "source": f"an earlier run, {accuracy_from.name}",
        }
    if scale_from is not None:
        earlier = msgspec.json.decode(scale_from.read_bytes())
        earlier["source"] = f"an earlier run, read from {scale_from.name}"
        results["benchmarks"]["sqlite_scale"] = earlier
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(msgspec.json.format(msgspec.json.encode(results), indent=2) + b"\n")
    if as_json:
        sys.stdout.write(msgspec.json.encode(results).decode() + "\n")
    else:
        _stderr.print(
            f"results written to {out}; `idstitch report --results {out}` makes the report", markup=False
        )
