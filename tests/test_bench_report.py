"""`idstitch report`: results of `bench all` → REPORT.md with plots, targets stated as met or missed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from idstitch.bench import all as all_benchmarks
from idstitch.bench.all import AllBenchPlan, postgres_unreachable
from idstitch.bench.report import write_report
from idstitch.bench.runner import ensure_workload, store_floor_rate, workload_lines
from idstitch.core.errors import InvalidEvent
from idstitch.core.messages import decode_message
from idstitch.storage.urls import open_store

PNG = b"\x89PNG\r\n\x1a\n"


def histogram(*counts: int) -> list[list[float | None]]:
    bounds: list[float | None] = [0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, None]
    padded = list(counts) + [0] * (len(bounds) - len(counts))
    return [[bound, count] for bound, count in zip(bounds, padded, strict=True)]


def results() -> dict[str, Any]:
    ingest = {
        "messages": 1_000_000,
        "messages_per_s": 1440.0,
        "p50_ms": 60.0,
        "p95_ms": 79.0,
        "p99_ms": 385.0,
        "peak_rss_mb": 815.0,
        "parse_only_ratio": 0.0072,
        "batch_size": 100,
        "latency_budget_ms": 5.0,
        "mean_batch_size": 18.4,
        "rate_by_size": [
            {"messages": 100_000, "cumulative_messages_per_s": 1676.0, "segment_messages_per_s": 1676.0},
            {"messages": 1_000_000, "cumulative_messages_per_s": 1440.0, "segment_messages_per_s": 1403.0},
        ],
        "latency_histogram_ms": histogram(0, 0, 0, 0, 0, 10, 20, 400, 500, 60, 10),
    }
    return {
        "generated_at": "2026-11-30T06:00:00+00:00",
        "machine": {"cpus": 2, "python": "3.11.9", "processor": "x86_64"},
        "plan": {"accuracy_people": 2000},
        "benchmarks": {
            "core": {
                **ingest,
                "messages_per_s": 60_000.0,
                "p95_ms": 3.0,
                "peak_rss_mb": 300.0,
                "parse_only_messages_per_s": 412_000.0,
            },
            "sqlite": {**ingest, "parse_only_messages_per_s": 455_500.0},
            "http": {"error": "exit code 1", "stderr": "boom"},
            "profile_api": {"profiles": 1_000_000, "lookups_per_s": 5200.0, "p50_ms": 1.0, "p95_ms": 4.5},
            "postgres": {"skipped": "this build has no PostgreSQL store"},
        },
        "accuracy": {
            "accuracy": {
                "idstitch": {
                    "precision": 0.9995,
                    "recall": 0.985,
                    "f1": 0.992,
                    "over_merged": 0,
                    "split": 12,
                    "recall_ceiling": 0.985,
                    "linkable_recall": 1.0,
                    "by_scenario": {
                        "shared_device": {"precision": 1.0, "recall": 0.9, "over_merged": 0},
                        "junk_id": {"precision": 1.0, "recall": 1.0, "over_merged": 0},
                    },
                },
                "targets": [
                    {"name": "recall", "goal": ">= 0.98", "value": 0.985, "met": True, "note": ""},
                    {"name": "precision", "goal": ">= 0.999", "value": 0.9995, "met": True, "note": "x"},
                ],
                "baseline": {
                    "precision": 0.41,
                    "recall": 1.0,
                    "f1": 0.58,
                    "over_merged": 310,
                    "split": 0,
                    "by_scenario": {"shared_device": {"precision": 0.2, "recall": 1.0, "over_merged": 40}},
                },
            }
        },
    }


def test_the_report_states_targets_figures_failures_and_plots(tmp_path: Path) -> None:
    given = results()
    # read from an earlier run: another hour's machine speed, left out of this run's gauge
    given["benchmarks"]["sqlite_scale"] = {"source": "an earlier run", "parse_only_messages_per_s": 700_000.0}
    report = write_report(given, tmp_path)
    text = report.read_text()
    assert report == tmp_path / "REPORT.md"
    assert "| SQLite ingest ≥ 50,000 messages/s | 1,440.0 | missed |" in text
    # how fast the machine was in this run, by msgspec's parse-only rate
    assert "msgspec alone parsed 412,000 to 455,500 messages/s" in text
    assert "| Profile API ≥ 5,000 lookups/s during ingest | 5,200.0 | **met** |" in text
    assert "| Profile API P95 ≤ 7 ms during ingest | 4.5 | **met** |" in text
    # the group commit that gave the latency: its mean size and the budget that sized it
    assert "| sqlite | 1,000,000 | 18.4 (sized to 5 ms) | 1,440.0 |" in text
    # a failed or skipped benchmark is listed with its reason, never dropped
    assert "| HTTP ingest ≥ 30,000 messages/s acknowledged | – | failed: exit code 1 |" in text
    assert "skipped: this build has no PostgreSQL store" in text
    assert "| pairwise precision | 0.99950 | 0.41000 |" in text
    assert "| split people | 12 | 0 |" in text
    assert "| recall >= 0.98 | 0.98500 | **met** |  |" in text
    assert "| shared_device | 1.00000 | 0.90000 | 0 | 0.20000 | 1.00000 | 40 |" in text
    for name in ("throughput_vs_size.png", "latency_histogram.png", "memory.png", "accuracy_by_scenario.png"):
        assert f"]({name})" in text
        assert (tmp_path / name).read_bytes().startswith(PNG), name


def test_the_report_shows_memory_by_store_size_and_each_postgres_worker_count(tmp_path: Path) -> None:
    data = results()
    data["benchmarks"]["sqlite_scale"] = {
        **data["benchmarks"]["sqlite"],
        "messages": 5_000_000,
        "rate_by_size": [
            {
                "messages": 1_000_000,
                "cumulative_messages_per_s": 4000.0,
                "segment_messages_per_s": 3800.0,
                "rss_mb": 612.0,
            },
            {
                "messages": 5_000_000,
                "cumulative_messages_per_s": 3900.0,
                "segment_messages_per_s": 3870.0,
                "rss_mb": 618.4,
            },
        ],
    }
    run = {
        "mode": "direct",
        "messages": 10_000,
        "p95_ms": 271.0,
        "box_cpu_percent": 94.0,
        "parse_only_ratio": 0.0007,
        "verified": True,
    }
    data["benchmarks"]["postgres"] = {
        "runs": [
            {**run, "workers": 1, "messages_per_s": 464.0},
            {**run, "workers": 4, "messages_per_s": 610.0, "verified": False},
        ],
        "messages_per_s": 610.0,
        "source": "a later run",
    }
    text = write_report(data, tmp_path).read_text()
    assert "| 5,000,000 | 3,870.0 | 3,900.0 | 618 |" in text  # the furthest run's checkpoints, with RSS
    assert (tmp_path / "memory_vs_size.png").read_bytes().startswith(PNG)
    assert "| direct | 1 | 10,000 | 464.0 | 0.0007 | 271.00 | 94.0 | – | – | yes |" in text
    assert "| direct | 4 | 10,000 | 610.0 | 0.0007 | 271.00 | 94.0 | – | – | **no** |" in text
    assert "These rows come from a later run." in text
    assert "| PostgreSQL ≥ 20,000 messages/s | 610.0 | missed |" in text


def test_a_report_without_accuracy_or_sizes_says_so(tmp_path: Path) -> None:
    data = results()
    data["accuracy"] = {"simulate": {"error": "exit code 2"}}
    del data["benchmarks"]["sqlite"]["rate_by_size"]
    del data["benchmarks"]["core"]["rate_by_size"]
    text = write_report(data, tmp_path).read_text()
    assert "No figures: simulate: exit code 2." in text
    assert "throughput_vs_size.png" not in text


def test_bench_all_then_report_end_to_end_on_tiny_sizes(tmp_path: Path) -> None:
    """Every benchmark really runs (as its own process) and the report is made from what they printed."""
    results_path = tmp_path / "results.json"
    command = [sys.executable, "-m", "idstitch", "bench", "all", "--messages", "3000", "--http-seconds", "2"]
    command += ["--profiles", "2000", "--profile-seconds", "1", "--people", "300", "--out", str(results_path)]
    command += ["--no-postgres"]  # bench postgres has its own end-to-end tests
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    done = subprocess.run(
        command, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(results_path.read_text())
    benchmarks = data["benchmarks"]
    for name in ("core", "sqlite", "http", "profile_api"):
        assert "error" not in benchmarks[name], (name, benchmarks[name])
        assert benchmarks[name]["p95_ms"] > 0, name
    assert benchmarks["sqlite"]["messages"] == 3000
    for name in ("core", "sqlite"):
        figures = benchmarks[name]
        assert figures["floor_messages_per_s"] > 0, name
        assert figures["floor_ratio"] == pytest.approx(
            figures["messages_per_s"] / figures["floor_messages_per_s"], rel=0.01
        )
    assert benchmarks["postgres"] == {"skipped": "not asked for (--no-postgres)"}
    assert data["accuracy"]["accuracy"]["idstitch"]["precision"] >= 0.999
    report = subprocess.run(
        [
            sys.executable,
            "-m",
            "idstitch",
            "report",
            "--results",
            str(results_path),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert report.returncode == 0, report.stderr
    text = (tmp_path / "out" / "REPORT.md").read_text()
    assert "| SQLite ingest ≥ 50,000 messages/s |" in text and "## Accuracy" in text
    assert (tmp_path / "out" / "accuracy_by_scenario.png").read_bytes().startswith(PNG)


def test_the_accuracy_run_of_bench_all_ignores_the_shell_s_idstitch_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report says the default rules in a fresh store: an IDSTITCH_CONFIG (documented env var) of the
    user's must neither break the run (a relative path, read in the scratch folder) nor change it."""
    config = tmp_path / "mine.toml"
    config.write_text("[spaces.mine]\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    for value in ("mine.toml", str(config)):
        monkeypatch.setenv("IDSTITCH_CONFIG", value)
        scratch = tmp_path / f"scratch-{len(value)}"
        scratch.mkdir()
        run = all_benchmarks._accuracy(AllBenchPlan(accuracy_people=20), lambda line: None, scratch)
        assert "error" not in run["ingest"], run["ingest"]
        assert run["accuracy"]["space"] == "default", value


def test_bench_all_benches_postgres_only_where_it_answers(postgres_url: str) -> None:
    """Reachable: nothing to say; unreachable: the connection error, which the report lists as the skip."""
    assert postgres_unreachable(postgres_url) is None
    why = postgres_unreachable("postgresql://root@127.0.0.1:1/test")
    assert why is not None and "127.0.0.1" in why and "port 1" in why, why


def test_bench_all_never_writes_the_postgres_password(
    tmp_path: Path, postgres_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before: the skip reason in results.json (and REPORT.md) held the whole --postgres URL, and the
    log line of the `bench postgres` run its command line (also in `ps`), password and all."""
    lines: list[str] = []
    down = all_benchmarks._postgres("postgresql://root:S3CRETPW@127.0.0.1:1/test", 1, lines.append, tmp_path)
    assert down["skipped"].startswith("PostgreSQL not reachable at postgresql://root:…@127.0.0.1:1/test: ")
    with_password = postgres_url.replace("://root@", "://root:S3CRETPW@", 1)
    assert "S3CRETPW" in with_password  # trust authentication: any password logs in
    seen = "import json, os, sys; print(json.dumps({'argv': sys.argv, 'url': os.environ['IDSTITCH_BENCH_POSTGRES']}))"
    monkeypatch.setattr(
        all_benchmarks, "_command", lambda *arguments: [sys.executable, "-c", seen, *arguments]
    )
    ran = all_benchmarks._postgres(with_password, 1, lines.append, tmp_path)
    assert ran["url"] == with_password  # the run gets it, from its environment
    assert lines and not [line for line in lines if "S3CRETPW" in line]
    assert "S3CRETPW" not in json.dumps([down, ran["argv"]])


def test_the_floor_stores_every_distinct_valid_message_as_an_event(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The floor does the non-resolving half of ingest for real: each valid message lands once."""
    monkeypatch.setenv("IDSTITCH_BENCH_CACHE", str(tmp_path / "cache"))
    path = ensure_workload(2000, 1)
    url = f"sqlite:///{tmp_path / 'floor.db'}"
    assert store_floor_rate(path, url, 1500, 100) > 0
    expected: set[str] = set()
    for line in list(workload_lines(path))[:1500]:
        try:
            expected.add(decode_message(line, received_at=datetime.now(UTC)).message_id)
        except InvalidEvent:
            continue
    store = open_store(url)
    try:
        assert set(store.iter_event_ids("default")) == expected
        stats = store.stats("default")
        assert (stats.profiles, stats.identifiers) == (0, 0)  # nothing was resolved
    finally:
        store.close()


def test_report_of_a_directory_says_it_is_a_directory(tmp_path: Path) -> None:
    """Before: `idstitch report --results benchmarks` said `benchmarks: no such file`."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "idstitch",
            "report",
            "--results",
            str(tmp_path),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2 and "is a directory" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "o").exists()
