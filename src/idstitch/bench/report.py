"""`idstitch report`: the results of `idstitch bench all` as benchmarks/REPORT.md with PNG plots.

The report states each target next to the figure measured and says plainly whether it was met; a
benchmark that failed or was skipped is listed with its reason, never left out.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["write_report"]

# (benchmark, field, comparison, target, label): the targets the issues set for this 2-core machine.
_TARGETS: list[tuple[str, str, str, float, str]] = [
    ("sqlite", "messages_per_s", ">=", 50_000, "SQLite ingest ≥ 50,000 messages/s"),
    ("sqlite", "p95_ms", "<=", 7, "SQLite ingest P95 ≤ 7 ms"),
    ("http", "messages_per_s", ">=", 30_000, "HTTP ingest ≥ 30,000 messages/s acknowledged"),
    ("http", "half_load_p95_ms", "<=", 7, "HTTP P95 ≤ 7 ms at half load"),
    ("profile_api", "lookups_per_s", ">=", 5_000, "Profile API ≥ 5,000 lookups/s during ingest"),
    ("profile_api", "p95_ms", "<=", 7, "Profile API P95 ≤ 7 ms during ingest"),
    ("profile_api_workers", "lookups_per_s", ">=", 5_000, "the same, with --profile-workers"),
    ("profile_api_workers", "p95_ms", "<=", 7, "the same P95, with --profile-workers"),
    ("postgres", "messages_per_s", ">=", 20_000, "PostgreSQL ≥ 20,000 messages/s"),
]


def _number(value: Any, digits: int = 1) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def _status(result: dict[str, Any] | None) -> str | None:
    """Why a benchmark has no figures (failed / skipped), or None when it has them."""
    if result is None:
        return "not run"
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    if "error" in result:
        return f"failed: {result['error']}"
    return None


def _table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _targets(benchmarks: dict[str, Any]) -> str:
    rows = []
    for name, field, comparison, target, label in _TARGETS:
        result = benchmarks.get(name)
        if result is None and name.endswith("_workers"):
            continue  # an optional variant that was not asked for
        why = _status(result)
        if why is not None or result is None:
            rows.append([label, "–", why or "not run"])
            continue
        value = result.get(field)
        if value is None:
            rows.append([label, "–", "not measured"])
            continue
        met = value >= target if comparison == ">=" else value <= target
        rows.append([label, _number(float(value)), "**met**" if met else "missed"])
    return _table(["target", "measured", ""], rows)


def _machine_speed(benchmarks: dict[str, Any]) -> str:
    """How fast the machine was during the run: msgspec's parse-only rate, which every benchmark measures."""
    rates = sorted(
        float(result["parse_only_messages_per_s"])
        for name, result in benchmarks.items()
        if isinstance(result, dict)
        and not result.get("source")  # a row read from an earlier run speaks for another hour
        and result.get("parse_only_messages_per_s")
    )
    if not rates:
        return ""
    spread = _number(rates[0], 0) if len(rates) == 1 else f"{_number(rates[0], 0)} to {_number(rates[-1], 0)}"
    return (
        f" As a gauge of the machine's speed in this run, msgspec alone parsed {spread} messages/s "
        "(measured by each benchmark); runs on one machine compare by that."
    )


def _messages_per_commit(result: dict[str, Any]) -> str:
    """The run's group commit: its mean, and the latency budget that sized it (older runs: fixed)."""
    budget = result.get("latency_budget_ms")
    if not budget or result.get("mean_batch_size") is None:
        return _number(result.get("batch_size"))
    return f"{_number(result['mean_batch_size'], 1)} (sized to {budget:g} ms)"


def _ingest_rows(benchmarks: dict[str, Any]) -> str:
    rows = []
    for name in ("core", "sqlite", "sqlite_scale"):
        result = benchmarks.get(name)
        why = _status(result)
        if result is None:
            continue
        if why is not None:
            rows.append([name, why, "", "", "", "", "", "", "", ""])
            continue
        rows.append(
            [
                name,
                _number(result.get("messages")),
                _messages_per_commit(result),
                _number(result.get("messages_per_s")),
                _number(result.get("p50_ms"), 2),
                _number(result.get("p95_ms"), 2),
                _number(result.get("p99_ms"), 2),
                _number(result.get("peak_rss_mb")),
                _number(result.get("parse_only_ratio"), 4),
                _number(result.get("floor_ratio"), 2),
            ]
        )
    header = [
        "benchmark",
        "messages",
        "messages per commit",
        "messages/s",
        "P50 ms",
        "P95 ms",
        "P99 ms",
        "peak RSS MB",
        "÷ parse-only",
        "÷ floor",
    ]
    return _table(header, rows)


def _profile_table(benchmarks: dict[str, Any]) -> str:
    rows = []
    for name in ("profile_api", "profile_api_workers"):
        result = benchmarks.get(name)
        if result is None:
            continue
        workers = result.get("profile_workers") or 0
        served = f"{workers} worker processes" if workers else "the server process"
        why = _status(result)
        if why is not None:
            rows.append([served, why, "", "", "", "", "", ""])
            continue
        rows.append(
            [
                served,
                _number(result.get("profiles")),
                _number(result.get("baseline_lookups_per_s")),
                _number(result.get("baseline_p95_ms"), 2),
                _number(result.get("lookups_per_s")),
                f"{_number(result.get('p50_ms'), 2)} / {_number(result.get('p95_ms'), 2)} / "
                f"{_number(result.get('p99_ms'), 2)}",
                f"{_number(result.get('ingest_messages_per_s'))} of {_number(result.get('ingest_target_messages_per_s'))}",
                _number(result.get("errors")),
            ]
        )
    header = [
        "lookups served by",
        "profiles",
        "alone: lookups/s",
        "alone: P95 ms",
        "during ingest: lookups/s",
        "during ingest: P50 / P95 / P99 ms",
        "ingest msg/s held (of half rate)",
        "errors",
    ]
    return _table(header, rows) if rows else "not run"


def _rate_by_size(benchmarks: dict[str, Any]) -> list[dict[str, Any]]:
    """The sqlite run that went furthest: its throughput at each size checkpoint."""
    best: list[dict[str, Any]] = []
    for name in ("sqlite", "sqlite_scale"):
        result = benchmarks.get(name) or {}
        sizes = result.get("rate_by_size") or []
        if sizes and (not best or sizes[-1]["messages"] > best[-1]["messages"]):
            best = list(sizes)
    return best


def _size_table(benchmarks: dict[str, Any]) -> str | None:
    """Throughput and the process's RSS at each store-size checkpoint of the furthest sqlite run."""
    sizes = _rate_by_size(benchmarks)
    if not sizes:
        return None
    rows = [
        [
            f"{int(item['messages']):,}",
            _number(item.get("segment_messages_per_s")),
            _number(item.get("cumulative_messages_per_s")),
            _number(item.get("rss_mb"), 0),
        ]
        for item in sizes
    ]
    return _table(["messages ingested", "msg/s since previous", "msg/s overall", "RSS MB"], rows)


def _postgres_table(postgres: dict[str, Any]) -> str:
    """One row per worker count of `bench postgres`."""
    rows = [
        [
            str(run.get("mode", "?")),
            _number(run.get("workers")),
            _number(run.get("messages")),
            _number(run.get("messages_per_s")),
            _number(run.get("parse_only_ratio"), 4),
            _number(run.get("p95_ms"), 2),
            _number(run.get("box_cpu_percent")),
            _number(run.get("postgres_cpu_percent")),
            _number(run.get("workers_cpu_percent")),
            "yes" if run.get("verified") else "**no**",
        ]
        for run in postgres.get("runs") or []
        if isinstance(run, dict)
    ]
    header = [
        "mode",
        "workers",
        "messages",
        "messages/s",
        "÷ parse-only",
        "P95 ms",
        "box CPU %",
        "PostgreSQL CPU %",
        "workers CPU %",
        "every message once",
    ]
    return _table(header, rows) if rows else "no runs"


def _plot_by_size(
    out: Path, plt: Any, sizes: list[dict[str, Any]], lines: dict[str, str], label: str, title: str, name: str
) -> str | None:
    """One line per `lines` field (→ its legend) over the store-size checkpoints, log-scaled sizes."""
    sizes = [item for item in sizes if all(item.get(field) is not None for field in lines)]
    if not sizes:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    counts = [item["messages"] for item in sizes]
    for (field, legend), marker in zip(lines.items(), "osd", strict=False):
        axis.plot(counts, [item[field] for item in sizes], marker=marker, label=legend)
    axis.set_xscale("log")
    axis.set_xlabel("messages ingested (store size)")
    axis.set_ylabel(label)
    axis.set_ylim(bottom=0)
    axis.set_title(title)
    axis.grid(True, alpha=0.3)
    if len(lines) > 1:
        axis.legend()
    return _save(figure, out / name, plt)


def _plot_throughput(benchmarks: dict[str, Any], out: Path, plt: Any) -> str | None:
    rates = {"segment_messages_per_s": "since previous size", "cumulative_messages_per_s": "cumulative"}
    title = "SQLite ingest throughput vs store size"
    return _plot_by_size(
        out, plt, _rate_by_size(benchmarks), rates, "messages/s", title, "throughput_vs_size.png"
    )


def _plot_memory_vs_size(benchmarks: dict[str, Any], out: Path, plt: Any) -> str | None:
    title = "SQLite ingest process memory vs store size"
    return _plot_by_size(
        out, plt, _rate_by_size(benchmarks), {"rss_mb": "RSS"}, "RSS (MB)", title, "memory_vs_size.png"
    )


def _plot_latency(benchmarks: dict[str, Any], out: Path, plt: Any) -> str | None:
    series = {
        name: result["latency_histogram_ms"]
        for name in ("core", "sqlite", "sqlite_scale")
        if (result := benchmarks.get(name)) and result.get("latency_histogram_ms")
    }
    if not series:
        return None
    figure, axis = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(series)
    labels: list[str] = []
    for offset, (name, buckets) in enumerate(series.items()):
        total = sum(count for _, count in buckets) or 1
        labels = [f"≤{_number(bound, 1)}" if bound is not None else "more" for bound, _ in buckets]
        positions = [index + offset * width for index in range(len(buckets))]
        axis.bar(positions, [100 * count / total for _, count in buckets], width=width, label=name)
    axis.set_xticks([index + 0.4 - width / 2 for index in range(len(labels))], labels, rotation=45)
    axis.set_xlabel("latency per message, receipt to commit (ms)")
    axis.set_ylabel("% of messages")
    axis.set_title("Ingest latency histogram")
    axis.legend()
    return _save(figure, out / "latency_histogram.png", plt)


def _plot_memory(benchmarks: dict[str, Any], out: Path, plt: Any) -> str | None:
    bars = {
        name: float(result["peak_rss_mb"])
        for name, result in benchmarks.items()
        if isinstance(result, dict) and result.get("peak_rss_mb") is not None and "error" not in result
    }
    if not bars:
        return None
    figure, axis = plt.subplots(figsize=(7, 4))
    axis.bar(list(bars), list(bars.values()), color="tab:purple")
    axis.set_ylabel("peak RSS (MB)")
    axis.set_title("Memory per benchmark")
    for index, value in enumerate(bars.values()):
        axis.annotate(f"{value:,.0f}", (index, value), ha="center", va="bottom")
    return _save(figure, out / "memory.png", plt)


def _scenario_table(
    accuracy: dict[str, Any],
) -> tuple[str, dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
    ours = accuracy.get("idstitch") or {}
    baseline = accuracy.get("baseline") or {}
    ours_by = ours.get("by_scenario") or {}
    base_by = baseline.get("by_scenario") or {}
    rows = []
    for scenario in sorted(set(ours_by) | set(base_by)):
        mine, theirs = ours_by.get(scenario, {}), base_by.get(scenario, {})
        rows.append(
            [
                scenario,
                _number(mine.get("precision"), 5),
                _number(mine.get("recall"), 5),
                _number(mine.get("over_merged")),
                _number(theirs.get("precision"), 5),
                _number(theirs.get("recall"), 5),
                _number(theirs.get("over_merged")),
            ]
        )
    header = [
        "scenario",
        "idstitch precision",
        "idstitch recall",
        "idstitch over-merged",
        "baseline precision",
        "baseline recall",
        "baseline over-merged",
    ]
    return _table(header, rows), ours_by, base_by


def _plot_accuracy(
    ours_by: dict[str, dict[str, Any]], base_by: dict[str, dict[str, Any]], out: Path, plt: Any
) -> str | None:
    scenarios = sorted(set(ours_by) | set(base_by))
    if not scenarios:
        return None
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    positions = range(len(scenarios))
    for axis, metric, title in (
        (left, "precision", "pairwise precision"),
        (right, "recall", "pairwise recall"),
    ):
        axis.bar(
            [p - 0.2 for p in positions],
            [float(ours_by.get(s, {}).get(metric) or 0) for s in scenarios],
            width=0.4,
            label="idstitch",
        )
        axis.bar(
            [p + 0.2 for p in positions],
            [float(base_by.get(s, {}).get(metric) or 0) for s in scenarios],
            width=0.4,
            label="naive baseline",
        )
        axis.set_xticks(list(positions), scenarios, rotation=45, ha="right")
        axis.set_ylim(0, 1.02)
        axis.set_title(f"{title} by scenario")
        axis.legend(loc="lower left")
    figure.tight_layout()
    return _save(figure, out / "accuracy_by_scenario.png", plt)


def _save(figure: Any, path: Path, plt: Any) -> str:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path.name


def _accuracy_section(results: dict[str, Any], out: Path, plt: Any) -> list[str]:
    run = results.get("accuracy") or {}
    accuracy = run.get("accuracy")
    if not isinstance(accuracy, dict) or "error" in accuracy:
        failed = next(
            (f"{step}: {value.get('error')}" for step, value in run.items() if "error" in value), "not run"
        )
        return ["## Accuracy", "", f"No figures: {failed}."]
    ours, baseline = accuracy.get("idstitch") or {}, accuracy.get("baseline") or {}
    summary = _table(
        ["", "idstitch", "naive baseline"],
        [
            [label, _number(ours.get(key), digits), _number(baseline.get(key), digits)]
            for label, key, digits in (
                ("pairwise precision", "precision", 5),
                ("pairwise recall", "recall", 5),
                ("pairwise F1", "f1", 5),
                ("recall ceiling (pairs the messages can link at all)", "recall_ceiling", 5),
                ("recall over those linkable pairs", "linkable_recall", 5),
                ("over-merged profiles", "over_merged", 0),
                ("split people", "split", 0),
            )
        ],
    )
    targets = _table(
        ["accuracy target", "measured", "", "note"],
        [
            [
                str(item.get("name")) + " " + str(item.get("goal")),
                _number(item.get("value"), 5),
                "**met**" if item.get("met") else "missed",
                str(item.get("note") or ""),
            ]
            for item in accuracy.get("targets") or []
        ],
    )
    table, ours_by, base_by = _scenario_table(accuracy)
    plot = _plot_accuracy(ours_by, base_by, out, plt)
    people = ours.get("people") or results.get("plan", {}).get("accuracy_people")
    lines = [
        "## Accuracy",
        "",
        f"The default simulated population ({_number(people)} people, default rules), ingested into a fresh "
        "SQLite store and compared with the simulator's truth (`idstitch accuracy`).",
        "",
        summary,
        "",
        targets,
        "",
        "By scenario (pairs with at least one message of the scenario):",
        "",
        table,
    ]
    if run.get("source"):
        lines += ["", f"These accuracy figures come from {run['source']} (same engine and rules)."]
    if plot:
        lines += ["", f"![accuracy by scenario]({plot})"]
    notes = accuracy.get("notes")
    if notes:
        lines += ["", *[f"- {note}" for note in notes]]
    return lines


def write_report(results: dict[str, Any], out: Path, *, plotting: Callable[[], Any] | None = None) -> Path:
    """Write REPORT.md and its PNG plots into `out`; the path of REPORT.md."""
    out.mkdir(parents=True, exist_ok=True)
    plt = (plotting or _pyplot)()
    benchmarks: dict[str, Any] = results.get("benchmarks") or {}
    machine = results.get("machine") or {}
    lines = [
        "# idstitch benchmark report",
        "",
        f"Generated {results.get('generated_at', '?')} by `idstitch bench all` then `idstitch report`, on "
        f"{machine.get('cpus', '?')} CPUs ({machine.get('processor', '?')}, Python {machine.get('python', '?')}). "
        "The machine is shared: compare figures within one run." + _machine_speed(benchmarks),
        "",
        "## Targets",
        "",
        _targets(benchmarks),
        "",
        "## Ingest",
        "",
        _ingest_rows(benchmarks),
    ]
    scale = benchmarks.get("sqlite_scale") or {}
    if scale.get("source"):
        lines += ["", f"The `sqlite_scale` row comes from {scale['source']}."]
    sizes = _size_table(benchmarks)
    if sizes:
        lines += ["", "### Throughput and memory vs store size", "", sizes]
    for plot in (
        _plot_throughput(benchmarks, out, plt),
        _plot_memory_vs_size(benchmarks, out, plt),
        _plot_latency(benchmarks, out, plt),
    ):
        if plot:
            lines += ["", f"![{plot}]({plot})"]
    http = benchmarks.get("http")
    lines += ["", "## HTTP ingest (`bench http`)", ""]
    why = _status(http)
    if why is not None or http is None:
        lines.append(why or "not run")
    else:
        lines.append(
            _table(
                ["messages/s", "P95 ms", "half-load P95 ms", "/v1/track req/s", "RSS start → end MB"],
                [
                    [
                        _number(http.get("messages_per_s")),
                        _number(http.get("p95_ms"), 2),
                        _number(http.get("half_load_p95_ms"), 2),
                        _number(http.get("track_requests_per_s")),
                        f"{_number(http.get('rss_start_mb'))} → {_number(http.get('rss_end_mb'))}",
                    ]
                ],
            )
        )
    lines += ["", "## Profile API (`bench profile-api`)", "", _profile_table(benchmarks)]
    for name in ("profile_api", "profile_api_workers"):
        source = (benchmarks.get(name) or {}).get("source")
        if source:
            lines += ["", f"The `{name}` row comes from {source}."]
    postgres = benchmarks.get("postgres")
    lines += [
        "",
        "## PostgreSQL (`bench postgres`)",
        "",
        _status(postgres) or _postgres_table(postgres or {}),
    ]
    postgres_source = (postgres or {}).get("source")
    if postgres_source:
        lines += ["", f"These rows come from {postgres_source}."]
    memory = _plot_memory(benchmarks, out, plt)
    if memory:
        lines += ["", "## Memory", "", f"![memory]({memory})"]
    lines += ["", *_accuracy_section(results, out, plt), ""]
    report = out / "REPORT.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    return plt
