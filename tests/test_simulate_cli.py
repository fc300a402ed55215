"""`idstitch simulate` and `idstitch accuracy` run as real processes: output, determinism, errors."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest


def run(directory: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """`python -m idstitch ARGS` in `directory`, with no IDSTITCH_* variables of the caller."""
    clean = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    done = subprocess.run(
        [sys.executable, "-m", "idstitch", *args],
        capture_output=True,
        text=True,
        cwd=directory,
        env={**clean, **(env or {})},
        timeout=120,
    )
    assert "Traceback" not in done.stderr, done.stderr
    return done


def ok(directory: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    done = run(directory, *args, env=env)
    assert done.returncode == 0, (done.stdout, done.stderr)
    return done


@pytest.fixture(scope="module")
def scored(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """300 simulated people, ingested, and `accuracy --json` of them."""
    folder = tmp_path_factory.mktemp("simulate")
    summary = json.loads(
        ok(
            folder,
            "simulate",
            "--people",
            "300",
            "--seed",
            "5",
            "--out",
            "e.ndjson.gz",
            "--truth",
            "t.csv.gz",
            "--json",
        ).stdout
    )
    assert summary["messages"] == 2400 and summary["people"] == 300 and summary["seed"] == 5
    ok(folder, "ingest", "e.ndjson.gz", "--store", "sqlite:///s.db", "-q")
    report = json.loads(
        ok(folder, "accuracy", "--truth", "t.csv.gz", "--store", "sqlite:///s.db", "--json").stdout
    )
    return folder, report


def test_simulate_is_deterministic_and_writes_truth_for_every_message(tmp_path: Path) -> None:
    args = ("simulate", "--people", "50", "--seed", "9")
    ok(tmp_path, *args, "--out", "a.ndjson", "--truth", "a.csv")
    ok(tmp_path, *args, "--out", "b.ndjson", "--truth", "b.csv")
    assert (tmp_path / "a.ndjson").read_bytes() == (tmp_path / "b.ndjson").read_bytes()
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    lines = (tmp_path / "a.ndjson").read_text().splitlines()
    rows = (tmp_path / "a.csv").read_text().splitlines()
    assert len(lines) == 400 and rows[0] == "message_id,person,account,scenario" and len(rows) == 401
    assert [json.loads(line)["messageId"] for line in lines] == [row.split(",")[0] for row in rows[1:]]
    # --messages overrides the 8-per-person default; gzip by suffix; text summary on stdout.
    text = ok(tmp_path, "simulate", "--messages", "120", "--people", "10", "--out", "c.ndjson.gz").stdout
    assert "simulated 120 messages of 10 people" in text
    assert len(gzip.decompress((tmp_path / "c.ndjson.gz").read_bytes()).splitlines()) == 120


def test_accuracy_json_is_one_object_with_both_sides(scored: tuple[Path, dict[str, Any]]) -> None:
    _, report = scored
    assert report["space"] == "default" and report["truth"] == "t.csv.gz"
    for side in ("idstitch", "baseline"):
        figures = report[side]
        assert figures["messages"] > 2000
        assert 0.0 <= figures["precision"] <= 1.0 and 0.0 <= figures["recall"] <= 1.0
        assert figures["recall"] <= figures["recall_ceiling"] + 1e-12
        assert {"shared_device", "junk_id", "login", "crm"} <= figures["by_scenario"].keys()
        assert {"over_merged", "split", "split_unlinkable", "over_merge_causes", "foreign"} <= figures.keys()
    assert report["idstitch"]["precision"] >= 0.999
    assert report["baseline"]["over_merged"] > 0
    assert {target["name"] for target in report["targets"]} >= {"precision", "recall"}
    assert report["accounts"]["idstitch"]["items"] > 0


def test_accuracy_text_shows_idstitch_beside_the_baseline(scored: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = scored
    text = ok(folder, "accuracy", "--truth", "t.csv.gz", "--store", "sqlite:///s.db").stdout
    for needle in (
        "idstitch",
        "baseline",
        "pairwise precision",
        "recall ceiling",
        "over-merged profiles",
        "by scenario",
        "shared_device",
        "junk_id",
        "targets",
        "definitions",
        "0 not in the store",
    ):
        assert needle in text, needle
    assert "(rejected)" not in text


@pytest.mark.parametrize("columns", ["80", "40"])
def test_accuracy_text_in_a_narrow_terminal_cuts_no_figure(
    scored: tuple[Path, dict[str, Any]], columns: str
) -> None:
    """An 80-column terminal showed `cross_de…` and `1… / 0…`: figures fold onto more lines instead."""
    folder, report = scored
    arguments = ("accuracy", "--truth", "t.csv.gz", "--store", "sqlite:///s.db")
    text = ok(folder, *arguments, env={"COLUMNS": columns}).stdout
    assert "…" not in text
    for scenario in report["idstitch"]["by_scenario"]:
        assert f"│ {scenario} " in text, scenario


def test_accuracy_refuses_a_truth_that_does_not_match_the_store(scored: tuple[Path, dict[str, Any]]) -> None:
    folder, _ = scored
    lines = gzip.decompress((folder / "e.ndjson.gz").read_bytes()).decode().splitlines()
    assert len(lines) == 2400
    # Most of the truth's messages stored: scored, the others named as not in the store.
    (folder / "most.ndjson").write_text("\n".join(lines[:2000]) + "\n")
    ok(folder, "ingest", "most.ndjson", "--store", "sqlite:///most.db", "-q")
    report = json.loads(
        ok(folder, "accuracy", "--truth", "t.csv.gz", "--store", "sqlite:///most.db", "--json").stdout
    )
    assert report["idstitch"]["missing"] >= 390
    text = ok(folder, "accuracy", "--truth", "t.csv.gz", "--store", "sqlite:///most.db").stdout
    assert f"{report['idstitch']['missing']} not in the store" in text
    # Under half of them, or none: another store's truth, an error rather than a perfect precision.
    (folder / "few.ndjson").write_text("\n".join(lines[:1000]) + "\n")
    ok(folder, "ingest", "few.ndjson", "--store", "sqlite:///few.db", "-q")
    (folder / "other.ndjson").write_text(json.dumps({"type": "page", "messageId": "x1", "anonymousId": "a"}))
    ok(folder, "ingest", "other.ndjson", "--store", "sqlite:///other.db", "-q")
    for name in ("few", "other"):
        done = run(folder, "accuracy", "--truth", "t.csv.gz", "--store", f"sqlite:///{name}.db")
        assert done.returncode == 2, (done.stdout, done.stderr)
        assert done.stdout == "" and done.stderr.count("\n") == 1
        assert "error: t.csv.gz: the truth does not match the store" in done.stderr, done.stderr


def test_simulate_summary_counts_of_one_are_singular(tmp_path: Path) -> None:
    text = ok(tmp_path, "simulate", "--messages", "1", "--days", "1", "--out", "one.ndjson").stdout
    assert text.startswith("simulated 1 message of 1 person over 1 day (seed 1)"), text


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["simulate", "--out", "x.ndjson"], "--people"),
        (["simulate", "--people", "0", "--out", "x.ndjson"], "--people"),
        (["simulate", "--people", "5"], "--out"),
        (["simulate", "--people", "5", "--out", "same.csv", "--truth", "same.csv"], "different files"),
        (["simulate", "--people", "5", "--out", "no/such/dir/x.ndjson"], "x.ndjson"),
        # Before: a file named "-" appeared, where `ingest -` reads standard input.
        (["simulate", "--people", "5", "--out", "-"], "--out -: simulate writes a file"),
        (
            ["simulate", "--people", "5", "--out", "x.ndjson", "--truth", "-"],
            "--truth -: simulate writes a file",
        ),
        (["accuracy", "--truth", "missing.csv", "--store", "sqlite:///s.db"], "missing.csv: no such file"),
        (
            ["accuracy", "--truth", "e.ndjson.gz", "--store", "sqlite:///s.db"],
            "e.ndjson.gz: not a truth file",
        ),
        (["accuracy", "--truth", "t.csv.gz", "--store", "sqlite:///nothing.db"], "does not exist"),
        (
            ["accuracy", "--truth", "t.csv.gz", "--store", "sqlite:///s.db", "--space", "nope"],
            "unknown space",
        ),
        (["accuracy", "--store", "sqlite:///s.db"], "--truth"),
    ],
)
def test_usage_errors_exit_2(scored: tuple[Path, dict[str, Any]], args: list[str], needle: str) -> None:
    folder, _ = scored
    done = run(folder, *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert needle in done.stderr, done.stderr
    assert not (folder / "-").exists()


def test_help_lists_the_new_commands(tmp_path: Path) -> None:
    text = ok(tmp_path, "--help").stdout
    assert "simulate" in text and "accuracy" in text
    assert "--people" in ok(tmp_path, "simulate", "--help").stdout
    assert "--truth" in ok(tmp_path, "accuracy", "--help").stdout
