"""`idstitch bench core|sqlite`: printed figures, or one JSON object with --json."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path
from typing import Annotated

import msgspec
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from idstitch.bench.runner import BenchResult, run_ingest_bench

__all__ = ["app"]

app = typer.Typer(help="Benchmarks: throughput, latency and memory of ingest.", no_args_is_help=True)

Messages = Annotated[int, typer.Option("--messages", "-n", min=1, help="How many generated messages.")]
Json = Annotated[bool, typer.Option("--json", help="Print exactly one JSON object.")]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the generated population.")]
BatchSize = Annotated[
    int, typer.Option("--batch-size", min=1, help="Messages per transaction (group commit).")
]


def _run(name: str, store_url: str, messages: int, seed: int, batch_size: int, as_json: bool) -> None:
    err = Console(stderr=True)
    show = not as_json and sys.stderr.isatty()
    with Progress(
        TextColumn(f"bench {name}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err,
        disable=not show,
    ) as bar:
        task = bar.add_task(name, total=messages)
        result = run_ingest_bench(
            name,
            store_url,
            messages=messages,
            seed=seed,
            batch_size=batch_size,
            progress=lambda done: bar.update(task, completed=done),
        )
    if as_json:
        sys.stdout.write(msgspec.json.encode(result.as_dict()).decode() + "\n")
        return
    _print(result)


def _print(result: BenchResult) -> None:
    console = Console()
    table = Table(title=f"idstitch bench {result.name} ({result.store})", show_header=False)
    table.add_row("messages", f"{result.messages:,}")
    table.add_row("batch size (group commit)", str(result.batch_size))
    table.add_row("messages/s", f"{result.messages_per_s:,.0f}")
    table.add_row(
        "latency receipt→commit P50 / P95 / P99",
        f"{result.p50_ms:.2f} / {result.p95_ms:.2f} / {result.p99_ms:.2f} ms",
    )
    table.add_row("peak RSS", f"{result.peak_rss_mb:,.0f} MB")
    table.add_row("msgspec parse-only messages/s", f"{result.parse_only_messages_per_s:,.0f}")
    table.add_row("ratio to parse-only", f"{result.parse_only_ratio:.3f}")
    for mark in result.rate_by_size:
        table.add_row(
            f"at {int(mark['messages']):,} messages",
            f"{mark['cumulative_messages_per_s']:,.0f}/s overall, {mark['segment_messages_per_s']:,.0f}/s since previous",
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
    path: Annotated[
        Path | None, typer.Option("--path", help="SQLite file to create (default: a fresh temp file).")
    ] = None,
    as_json: Json = False,
) -> None:
    """Ingest a generated realistic stream into a fresh SQLite file (WAL, durable commits)."""
    with tempfile.TemporaryDirectory(prefix="idstitch-bench-") as folder:
        target = path or Path(folder) / "bench.db"
        if target.exists():
            raise typer.BadParameter(
                f"{target} exists; the benchmark needs a fresh file", param_hint="--path"
            )
        _run("sqlite", f"sqlite:///{target}", messages, seed, batch_size, as_json)


@app.command("core")
def bench_core(
    messages: Messages = 1_000_000,
    seed: Seed = 1,
    batch_size: BatchSize = 100,
    as_json: Json = False,
) -> None:
    """The same stream through the core and the in-memory store: the ceiling without a database."""
    _run("core", "memory://", messages, seed, batch_size, as_json)
