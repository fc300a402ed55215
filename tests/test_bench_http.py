"""`idstitch bench http` end to end, small: a real server and load process, one JSON object, a clean exit.

No timing is asserted (speed targets live in the benchmark): only that the figures exist, add up and
are positive, that the server counted every acknowledged message and exited 0, and that nothing is
left running.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

from helpers import wait_for
from idstitch.bench.load import PhaseStats
from idstitch.bench.scratch import remove_abandoned_scratch

KEYS = {
    "messages_per_s",
    "requests_per_s",
    "p50_ms",
    "p95_ms",
    "p99_ms",
    "peak_rss_mb",
    "parse_only_ratio",
    "track_requests_per_s",
    "half_load_p95_ms",
    "rss_start_mb",
    "rss_end_mb",
    "rejected_429",
}


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One small run of the benchmark (a module-scoped cache dir keeps the workload out of /tmp's shared one)."""
    cache = tmp_path_factory.mktemp("bench-cache")
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    env["IDSTITCH_BENCH_CACHE"] = str(cache)
    command = [sys.executable, "-m", "idstitch", "bench", "http", "--messages", "2000"]
    command += ["--track-requests", "200", "--json"]
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=cache, timeout=120)
    assert done.returncode == 0, f"bench http exited with {done.returncode}:\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"expected exactly one JSON line on stdout, got:\n{done.stdout}"
    parsed: dict[str, Any] = json.loads(lines[0])
    return parsed


def test_prints_one_json_object_with_the_figures(result: dict[str, Any]) -> None:
    assert result.keys() >= KEYS
    assert result["benchmark"] == "http"
    for key in KEYS - {"rejected_429"}:
        assert result[key] > 0, key
    assert result["rejected_429"] >= 0
    assert result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["rss_start_mb"] <= result["peak_rss_mb"]
    assert result["rss_end_mb"] <= result["peak_rss_mb"]


def test_every_message_is_acknowledged_and_counted_by_the_server(result: dict[str, Any]) -> None:
    phases = result["phases"]
    assert result["messages"] == phases["main"]["messages"] == 2000
    assert phases["main"]["requests"] == 2000 // 50
    assert phases["half"]["messages"] > 0
    assert phases["track"]["requests"] == phases["track"]["messages"] == 200
    assert result["errors"] == 0
    assert result["rejected_messages"] == 0
    assert result["acknowledged_messages"] == sum(phase["messages"] for phase in phases.values())
    assert result["server_counted_messages"] == result["acknowledged_messages"]
    assert 0 < result["server_commits"] <= result["acknowledged_messages"]


def test_server_exits_0_on_sigterm_and_nothing_is_left_running(result: dict[str, Any]) -> None:
    assert result["server_exit_code"] == 0
    for key in ("server_pid", "load_pid"):
        pid = result[key]
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, key
    # The bench's scratch directory (and its SQLite store) is gone too.
    assert not Path(result["store"].removeprefix("sqlite:///")).parent.exists()


def test_load_client_retries_after_429_and_a_closed_keep_alive_connection() -> None:
    """The load generator's own HTTP client: Retry-After honoured, a connection the server closed is reopened."""
    from idstitch.bench.load import PhaseStats, _Client, _Sender

    def answer(status: str, body: bytes, *headers: str) -> bytes:
        head = "".join(f"{header}\r\n" for header in (*headers, f"Content-Length: {len(body)}"))
        return f"HTTP/1.1 {status}\r\n{head}\r\n".encode() + body

    answers = [
        answer("429 Too Many Requests", b"{}", "Retry-After: 0"),
        answer("200 OK", b'{"success":true}'),
        answer("200 OK", b'{"success":true,"rejected":[{"index":0,"messageId":"m1","error":"x"}]}'),
    ]
    connections = 0

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while answers:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            sent = answers.pop(0)
            writer.write(sent)
            await writer.drain()
            if sent.startswith(b"HTTP/1.1 200") and answers:
                break  # closed after the answer, without saying so: the next request must reconnect
        writer.close()

    async def run() -> PhaseStats:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        stats = PhaseStats("test")
        client = _Client(f"http://127.0.0.1:{port}", "wk", 1)
        sender = _Sender(client, "/v1/batch", stats, time.perf_counter() + 30)
        await sender.send(50, b'{"batch":[]}')
        await sender.send(50, b'{"batch":[]}')
        client.close()
        server.close()
        await server.wait_closed()
        return stats

    stats = asyncio.run(run())
    assert (stats.messages, stats.requests, stats.rejected_429, stats.rejected_messages) == (100, 2, 1, 1)
    assert stats.errors == {}
    assert connections == 2


def test_a_phase_rate_counts_accepted_messages_not_those_rejected_inside_a_200() -> None:
    phase = PhaseStats("main", started=0.0)
    phase.acknowledged(50, 0.01, b'{"success":true}')
    phase.acknowledged(50, 0.01, b'{"success":true,"rejected":[{"index":3},{"index":7}]}')
    phase.finished = 2.0  # two seconds
    figures = phase.as_dict()
    assert (figures["messages"], figures["rejected_messages"]) == (100, 2)
    assert figures["messages_per_s"] == 49.0  # 98 accepted in 2 s


def _bench_children(bench: psutil.Process) -> dict[str, psutil.Process]:
    """The bench's serve and load processes by role, as far as they have started."""
    found: dict[str, psutil.Process] = {}
    for child in bench.children(recursive=True):
        try:
            command = " ".join(child.cmdline())
        except psutil.Error:
            continue
        if " serve " in command:
            found["serve"] = child
        elif "idstitch.bench.load" in command:
            found["load"] = child
    return found


@pytest.mark.parametrize("stop", ["sigterm", "sigkill"])
def test_a_benchmark_stopped_by_a_signal_leaves_no_server_running(stop: str, tmp_path: Path) -> None:
    # A CI timeout or a closed terminal: the server and load process must not outlive the bench on
    # their port. SIGTERM unwinds it (scratch removed, exit 143); even SIGKILL ends its children.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    env |= {"IDSTITCH_BENCH_CACHE": str(tmp_path / "cache"), "TMPDIR": str(scratch)}
    command = [sys.executable, "-m", "idstitch", "bench", "http", "--messages", "20000", "--rate", "500"]
    command += ["--track-requests", "0", "--json"]
    process = subprocess.Popen(command, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        bench = psutil.Process(process.pid)
        wait_for(lambda: len(_bench_children(bench)) == 2, "the server and the load process", process)
        children = _bench_children(bench)
        # The load is running: the server has logged a batch request.
        wait_for(
            lambda: any(b"/v1/batch" in log.read_bytes() for log in scratch.glob("*/serve.log")),
            "a batch request",
            process,
        )
        process.send_signal(signal.SIGTERM if stop == "sigterm" else signal.SIGKILL)
        _, stderr = process.communicate(timeout=60)
        assert process.returncode == (143 if stop == "sigterm" else -signal.SIGKILL), stderr
        assert b"Traceback" not in stderr, stderr
        _, alive = psutil.wait_procs(list(children.values()), timeout=30)
        assert alive == [], [child.cmdline() for child in alive]
        if stop == "sigkill":  # nothing could remove the scratch directory: the next run does
            assert len(remove_abandoned_scratch(scratch)) == 1
        assert list(scratch.iterdir()) == []  # the scratch directory and its store are gone
    finally:
        if process.poll() is None:
            process.kill()
        for child in psutil.Process().children(recursive=True):
            child.kill()
