"""Scratch directories of benchmarks: one in use is kept, one whose run was killed is removed by the next."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from idstitch.bench.scratch import OWNER_LOCK, remove_abandoned_scratch, scratch_directory

KILLED_RUN = """
import os, signal, sys, tempfile
tempfile.tempdir = sys.argv[1]
from idstitch.bench.scratch import scratch_directory
run = scratch_directory("killed")  # kept referenced: a collected one would clean up
folder = run.__enter__()
(folder / "bench.db").write_bytes(b"x" * 4096)
print(folder, flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""


def test_the_next_run_removes_a_killed_runs_scratch_and_keeps_one_in_use(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    done = subprocess.run([sys.executable, "-c", KILLED_RUN, str(tmp_path)], capture_output=True, text=True)
    assert done.returncode == -9, done.stderr
    killed = Path(done.stdout.strip())
    assert (killed / "bench.db").exists()  # SIGKILL: nothing could remove it
    unrelated = tmp_path / "idstitch-bench-notes"  # no lock file: not a run's scratch, or still being made
    unrelated.mkdir()
    assert remove_abandoned_scratch() == [killed]
    assert unrelated.is_dir()
    with scratch_directory("live") as live:
        assert (live / OWNER_LOCK).exists()
        assert remove_abandoned_scratch() == []  # held by this living run
        # A run starting sweeps by itself.
        done = subprocess.run(
            [sys.executable, "-c", KILLED_RUN, str(tmp_path)], capture_output=True, text=True
        )
        killed = Path(done.stdout.strip())
        with scratch_directory("next") as following:
            assert following.is_dir() and live.is_dir() and not killed.exists()
    assert sorted(tmp_path.iterdir()) == [unrelated]
