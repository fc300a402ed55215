"""A benchmark's child processes end with it, and a SIGTERM unwinds it like Ctrl-C.

Without this, `kill` of a benchmark (a CI timeout, a closed terminal) left its `idstitch serve`, load
generator or lookup process running on their port and scratch directory, and SIGTERM skipped every
`finally` that stops them.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from collections.abc import Callable
from types import FrameType
from typing import IO

__all__ = ["BenchTerminated", "die_with_parent", "end_with_parent", "raise_on_sigterm", "start_reporter"]

_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class BenchTerminated(SystemExit):
    """SIGTERM, raised in the main thread: the benchmark's cleanup runs, then the process exits 143."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def end_with_parent(parent: int, signum: int = signal.SIGTERM) -> None:
    """In a child: receive `signum` when `parent` ends (Linux); exit now if it already has."""
    prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
    if prctl is None:  # not Linux: the children's own orphan checks are all there is
        return
    prctl(_PR_SET_PDEATHSIG, signum)
    # The parent may have died between fork and prctl: then nobody will ever send the signal.
    if os.getppid() != parent:
        os._exit(1)


def die_with_parent(signum: int = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn` for Popen: the child receives `signum` when this process ends, even by SIGKILL."""
    parent = os.getpid()
    return lambda: end_with_parent(parent, signum)


def start_reporter(command: list[str], stderr: IO[bytes]) -> subprocess.Popen[bytes]:
    """A child that reports on its stdout (one JSON event per line) and ends with this process."""
    return subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr, preexec_fn=die_with_parent()
    )


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise BenchTerminated


def raise_on_sigterm() -> None:
    """Make SIGTERM raise BenchTerminated in the main thread instead of ending the process at once."""
    signal.signal(signal.SIGTERM, _on_sigterm)
