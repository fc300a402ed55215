"""Who used the box's CPU during a benchmark window: snapshots of every process's CPU time, and deltas.

A process's CPU time here includes that of the children it has reaped: a PostgreSQL backend that ends
during the window has its time added to the postmaster's, so a sum over every `postgres` process loses
nothing when connections come and go.

The kernel reports a process's own user and system time in clock ticks (10 ms), each rounded down: a
PostgreSQL backend that worked 15 ms in a short window can show none. For a single-threaded process
(every PostgreSQL process) its running time in nanoseconds (`/proc/PID/schedstat`) is read instead
where the kernel offers it; that file counts one thread only, so a threaded process keeps the ticks.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import psutil

__all__ = ["CpuSnapshot", "ProcessCpu", "busiest", "snapshot"]


class ProcessCpu(NamedTuple):
    """One process in a snapshot."""

    name: str
    cpu_s: float  # user + system, its reaped children's included
    created: float  # creation time: tells a reused pid from the same process
    title: str  # its command line as shown by ps (PostgreSQL puts the process's role there)


@dataclass(frozen=True)
class CpuSnapshot:
    """Every process's CPU seconds at one moment."""

    at: float  # time.monotonic()
    processes: dict[int, ProcessCpu]

    def total(self, keep: Callable[[int, ProcessCpu], bool]) -> float:
        """CPU seconds of the processes `keep` selects."""
        return sum(process.cpu_s for pid, process in self.processes.items() if keep(pid, process))

    def named(self, name: str) -> float:
        """CPU seconds of every process with this name."""
        return self.total(lambda _, process: process.name == name)

    def since(self, before: CpuSnapshot) -> dict[int, ProcessCpu]:
        """Each process with the CPU seconds it used since `before` (a new process: all of its own)."""
        used: dict[int, ProcessCpu] = {}
        for pid, process in self.processes.items():
            earlier = before.processes.get(pid)
            # Kernel threads change names; the creation time tells a reused pid from the same process.
            start = earlier.cpu_s if earlier is not None and earlier.created == process.created else 0.0
            used[pid] = process._replace(cpu_s=max(0.0, process.cpu_s - start))
        return used


def snapshot() -> CpuSnapshot:
    """The CPU time of every process now (one that ends while it is read is left out)."""
    processes: dict[int, ProcessCpu] = {}
    for process in psutil.process_iter(["name", "cmdline"]):
        with contextlib.suppress(psutil.Error):
            times = process.cpu_times()
            own = _running_seconds(process.pid) if process.num_threads() == 1 else None
            if own is None:
                own = times.user + times.system
            processes[process.pid] = ProcessCpu(
                str(process.info["name"]),
                float(own + times.children_user + times.children_system),
                process.create_time(),
                " ".join(process.info["cmdline"] or ()),
            )
    return CpuSnapshot(time.monotonic(), processes)


def _running_seconds(pid: int) -> float | None:
    """The time on a CPU of the process's main thread, to the nanosecond, or None where the kernel does not say."""
    try:
        with open(f"/proc/{pid}/schedstat", "rb") as stats:
            return int(stats.read().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def busiest(
    before: CpuSnapshot, after: CpuSnapshot, *, exclude: set[int], names: set[str], most: int = 3
) -> list[tuple[str, float]]:
    """The `most` process names that used the most CPU seconds in the window, leaving out these pids and names."""
    by_name: dict[str, float] = {}
    for pid, process in after.since(before).items():
        if pid not in exclude and process.name not in names and process.cpu_s > 0:
            by_name[process.name] = by_name.get(process.name, 0.0) + process.cpu_s
    return sorted(by_name.items(), key=lambda item: -item[1])[:most]
