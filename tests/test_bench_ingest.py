"""`idstitch bench core|sqlite`: the figures they compute and the JSON object they print, on tiny runs.

No speed is asserted: only that each documented figure is there and computed as documented.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from array import array
from pathlib import Path
from typing import Any

import pytest

from idstitch.bench import runner
from idstitch.bench.runner import BatchSizer, percentile

DOCUMENTED = ("messages_per_s", "p50_ms", "p95_ms", "p99_ms", "peak_rss_mb", "parse_only_ratio")


@pytest.mark.parametrize(
    ("count", "fraction", "expected"),
    [
        (30, 0.95, 29),  # rank ceil(28.5) = 29; round() to even gave 28
        (150, 0.99, 149),  # ceil(148.5) = 149; round() gave 148
        (50, 0.95, 48),  # ceil(47.5) = 48
        (30, 0.50, 15),
        (100, 0.95, 95),  # exact ranks stay exact, despite 0.95 * 100 not being 95.0 in binary
        (100, 0.07, 7),  # 0.07 * 100 = 7.000000000000001: still rank 7, not 8
        (20, 0.95, 19),
        (1, 0.99, 1),
    ],
)
def test_percentile_is_the_nearest_rank(count: int, fraction: float, expected: int) -> None:
    """P-th percentile, nearest rank: the smallest value with at least P % of the values at or below it."""
    values = array("d", [float(value) for value in range(1, count + 1)])
    assert percentile(values, fraction) == expected


def test_percentile_of_nothing_is_zero() -> None:
    assert percentile(array("d"), 0.95) == 0.0


def _bench(name: str, cache: Path, *arguments: str) -> subprocess.CompletedProcess[str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    env["IDSTITCH_BENCH_CACHE"] = str(cache)
    command = [sys.executable, "-m", "idstitch", "bench", name, *arguments]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=cache, timeout=120)


@pytest.mark.parametrize("name", ["core", "sqlite"])
def test_json_is_one_object_with_the_documented_figures(name: str, tmp_path: Path) -> None:
    done = _bench(name, tmp_path, "-n", "300", "--batch-size", "40", "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert len(lines) == 1, done.stdout
    figures: dict[str, Any] = json.loads(lines[0])
    for key in DOCUMENTED:
        assert figures[key] > 0, key
    assert figures["benchmark"] == name
    assert figures["messages"] == 300 and figures["batch_size"] == 40
    assert figures["latency_budget_ms"] == 5.0  # the default: batches sized to commit within 5 ms
    assert 1 <= figures["mean_batch_size"] <= 40
    assert figures["p50_ms"] <= figures["p95_ms"] <= figures["p99_ms"]
    # seconds is printed to the millisecond: compare at that precision
    assert figures["messages"] / figures["messages_per_s"] == pytest.approx(figures["seconds"], abs=0.001)
    assert figures["parse_only_ratio"] == pytest.approx(
        figures["messages_per_s"] / figures["parse_only_messages_per_s"], rel=0.01, abs=1e-4
    )
    assert sum(count for _, count in figures["latency_histogram_ms"]) == 300
    assert sum(figures["outcomes"].values()) == 300


def test_a_table_cut_short_by_its_reader_is_no_failure(tmp_path: Path) -> None:
    """`idstitch bench core | head -3`: exit 0; rich's exit 1 would read as a message not landing once."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    env["IDSTITCH_BENCH_CACHE"] = str(tmp_path)
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has gone before the table is printed
    command = [sys.executable, "-m", "idstitch", "bench", "core", "-n", "120"]
    with subprocess.Popen(
        command, stdout=write_end, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path
    ) as done:
        os.close(write_end)
        _, errors = done.communicate(timeout=120)
    assert (done.returncode, errors) == (0, "")


def test_without_a_budget_every_batch_is_the_limit() -> None:
    sizer = BatchSizer(100, 0)
    assert sizer.size == 100
    sizer.observe(100, 2.0)
    assert sizer.size == 100


def test_batches_shrink_and_grow_to_commit_within_the_budget() -> None:
    sizer = BatchSizer(100, 5.0)
    assert sizer.size == 10  # a first guess, learnt from then on
    sizer.observe(10, 0.010)  # 1 ms a message: 5 fit in 5 ms
    assert sizer.size == 5
    for _ in range(100):
        sizer.observe(sizer.size, sizer.size * 0.0001)  # then 0.1 ms a message: 50 fit
    assert sizer.size == 50
    for _ in range(100):
        sizer.observe(sizer.size, sizer.size * 0.00001)  # 0.01 ms a message: 500 would fit, 100 may
    assert sizer.size == 100
    for _ in range(50):
        sizer.observe(sizer.size, sizer.size * 0.1)  # 100 ms a message: never below one
    assert sizer.size == 1


def test_a_fixed_batch_run_reports_its_batch_size(tmp_path: Path) -> None:
    done = _bench("core", tmp_path, "-n", "120", "--batch-size", "40", "--latency-budget-ms", "0", "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout)
    assert (figures["latency_budget_ms"], figures["mean_batch_size"]) == (0.0, 40.0)


def test_size_checkpoints_are_measured_at_exactly_their_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDSTITCH_BENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(runner, "CHECKPOINTS", (100, 250))
    committed: list[int] = []
    result = runner.run_ingest_bench(
        "core", "memory://", messages=300, batch_size=40, latency_budget_ms=0, progress=committed.append
    )
    assert {100, 250} <= set(committed)  # a batch of 40 ends early at each checkpoint
    assert [mark["messages"] for mark in result.rate_by_size] == [100, 250]
    assert committed[-1] == 300


def test_a_cached_stream_is_reused_only_by_the_same_simulator(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDSTITCH_BENCH_CACHE", str(tmp_path))
    first = runner.ensure_workload(50, 1)
    assert runner.ensure_workload(50, 1) == first  # same simulator: the cached file
    monkeypatch.setattr(runner, "generator_fingerprint", lambda: "another-version")
    changed = runner.ensure_workload(50, 1)
    assert changed != first and changed.exists()  # a changed simulator: generated again


def test_peak_rss_is_the_benchmark_own_not_its_parent_s(tmp_path: Path) -> None:
    """A process started by fork + exec inherits its parent's getrusage() ru_maxrss: `bench all` and
    `bench postgres` start benchmarks and workers from bigger processes, whose peak must not show up."""
    ballast = bytearray(400 * 2**20)
    ballast[:: resource.getpagesize()] = b"\x01" * len(range(0, len(ballast), resource.getpagesize()))
    done = _bench("core", tmp_path, "-n", "100", "--json")
    del ballast
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["peak_rss_mb"] < 300


def test_an_interrupted_generation_leaves_no_partial_file_in_the_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IDSTITCH_BENCH_CACHE", str(tmp_path))

    def interrupted(path: Path, config: object, **_: object) -> int:
        Path(path).write_bytes(b"{}\n" * 1000)  # half written when Ctrl-C comes
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "write_ndjson", interrupted)
    with pytest.raises(KeyboardInterrupt):
        runner.ensure_workload(50, 1)
    assert list(tmp_path.iterdir()) == []
