"""`idstitch serve` as an operator runs it: ports, sockets and start-up refusals."""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import uvicorn

from idstitch.core.errors import ConfigError
from idstitch.http.protocol import BoundedHttpToolsProtocol
from idstitch.http.server import bind
from live_server import WRITE_KEY, Server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def test_a_port_this_process_already_bound_is_refused_at_once() -> None:
    # Two sockets of one process on one port would both bind (SO_REUSEADDR) and split the connections
    # between them, or leave one never listening: the second must fail as a port in use does.
    first = bind("127.0.0.1", 0)
    try:
        port = first.getsockname()[1]
        with pytest.raises(ConfigError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            bind("127.0.0.1", port)
    finally:
        first.close()


def test_profile_port_equal_to_port_is_a_one_line_usage_error(tmp_path: Path) -> None:
    # Before: it started, and every request on that port went to the Profile API (401 for the Tracking
    # API's write keys, even on /healthz), so nothing could be ingested.
    port = free_port()
    environment = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
    command = [sys.executable, "-m", "idstitch", "serve", "--port", str(port), "--profile-port", str(port)]
    command += ["--store", f"sqlite:///{tmp_path}/same.db"]
    result = subprocess.run(
        command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.splitlines()[-1] == (
        f"error: --profile-port must differ from --port ({port}): "
        "both APIs are served on --port when --profile-port is not given"
    )
    assert "Traceback" not in result.stderr


def test_the_backlog_bound_and_retry_after_are_the_operators_to_set(tmp_path: Path) -> None:
    """`--max-pending 1 --retry-after 9`: shown in /metrics, and a second big batch behind a first is told 9 s."""
    server = Server(tmp_path / "serve", args=("--max-pending", "1", "--retry-after", "9"))
    server.start()
    try:
        with urllib.request.urlopen(f"{server.base_url}/metrics", timeout=10) as response:
            exposition = response.read().decode()
        assert "\nidstitch_writer_max_pending_messages 1.0\n" in exposition

        def batch(number: int) -> tuple[int, dict[str, str]]:
            # 2,500 messages: the first one admitted takes far longer to resolve than the others take to
            # arrive, and an empty backlog admits one request of any size, so the rest meet a full one
            messages = [
                {
                    "type": "track",
                    "event": "E",
                    "userId": f"u{number}-{index}",
                    "messageId": f"m{number}-{index}",
                }
                for index in range(2500)
            ]
            body = json.dumps({"batch": messages}).encode()
            request = urllib.request.Request(
                f"{server.base_url}/v1/batch",
                data=body,
                headers={"Authorization": basic_auth(WRITE_KEY), "Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=120) as answer:
                    return answer.status, {key.lower(): value for key, value in answer.headers.items()}
            except urllib.error.HTTPError as refused:
                return refused.code, {key.lower(): value for key, value in refused.headers.items()}

        with ThreadPoolExecutor(max_workers=6) as pool:
            answers = list(pool.map(batch, range(6)))
        statuses = sorted(status for status, _ in answers)
        assert statuses[0] == 200 and statuses[-1] == 429, statuses
        for status, headers in answers:
            if status == 429:
                assert (headers["retry-after"], headers["x-ratelimit-reset"]) == ("9", "9")
        server.stop()
    finally:
        server.kill()


def test_public_url_is_what_the_settings_send_clients_to(tmp_path: Path) -> None:
    server = Server(tmp_path / "serve", args=("--public-url", "https://events.shop.example"))
    server.start()
    try:
        url = f"{server.base_url}/v1/projects/{WRITE_KEY}/settings"
        with urllib.request.urlopen(url, timeout=10) as response:
            segment_io = json.loads(response.read())["integrations"]["Segment.io"]
        assert (segment_io["apiHost"], segment_io["protocol"]) == ("events.shop.example/v1", "https")
        server.stop()
    finally:
        server.kill()
    refused = subprocess.run(
        [sys.executable, "-m", "idstitch", "serve", "--public-url", "events.shop.example", "--port", "0"],
        cwd=tmp_path,
        env={key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert refused.stderr.splitlines()[-1] == (
        "error: public URL 'events.shop.example': expected http(s)://host[:port][/path]"
    )


def basic_auth(write_key: str) -> str:
    return "Basic " + base64.b64encode(f"{write_key}:".encode()).decode()


def _exchange(port: int, *parts: bytes, pause: float = 0.0) -> bytes:
    """Send `parts` on one connection (pausing between them), then read until the server closes it."""
    with socket.create_connection(("127.0.0.1", port), timeout=20) as connection:
        try:
            for part in parts:
                connection.sendall(part)
                time.sleep(pause)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before everything was sent: read its answer
        received = b""
        try:
            while chunk := connection.recv(65536):
                received += chunk
        except ConnectionResetError:
            pass
        return received


def test_request_heads_are_bounded_in_size_and_the_server_stays_up(tmp_path: Path) -> None:
    """Before: uvicorn kept every header line of a request, however many: 100 MB of short header lines
    made the server hold ~1.5 GB (a few such requests at once and it is killed for memory)."""
    server = Server(tmp_path / "serve")
    server.start()
    try:
        head = b"POST /v1/track HTTP/1.1\r\nHost: x\r\nAuthorization: " + basic_auth(WRITE_KEY).encode()
        body = b'{"userId": "u1", "event": "E"}'
        ending = b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body

        def send(header: bytes, *more: bytes) -> bytes:
            return _exchange(server.port, head + b"\r\n" + header, *more, ending)

        assert send(b"X-Pad: " + b"a" * 60_000).startswith(b"HTTP/1.1 200 ")  # under 64 KB: served
        for refused in (
            send(b"X-Pad: " + b"a" * 70_000),  # one large header in one read
            send(b"X-Pad: ", *[b"a" * 65536] * 64),  # one header over many reads
            send(b"X-A: b", *[b"\r\nX-A: b" * 8192] * 64),  # many small headers
        ):
            assert refused.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), refused[:200]
            assert refused.endswith(b"Request header fields are over the 64 KB limit.")
        assert send(b"X-Pad: a").startswith(b"HTTP/1.1 200 ")
        server.stop()
    finally:
        server.kill()


def test_a_connection_must_send_its_request_head_in_time(tmp_path: Path) -> None:
    """Before: a connection that sent nothing, or a header line now and then, was kept for ever (each
    one a file descriptor: a few thousand and the server can accept no more connections)."""

    class Quick(BoundedHttpToolsProtocol):
        head_timeout = 0.5

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, http=Quick, lifespan="off", log_config=None, access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.01)
        started = time.monotonic()
        assert _exchange(port) == b""  # silent: closed
        slow = [b"GET / HTTP/1.1\r\n", *[b"X-A: b\r\n"] * 20]  # a line every 0.1 s, never the end
        assert _exchange(port, *slow, pause=0.1) == b""
        assert time.monotonic() - started < 8
        # A request that takes its time, within the bound, and the keep-alive one after it: served.
        answer = _exchange(
            port,
            b"GET / HTTP/1.1\r\n",
            b"Host: x\r\n\r\n",
            b"GET / HTTP/1.1\r\nHost: x\r\n",
            b"Connection: close\r\n\r\n",
            pause=0.3,
        )
        assert answer.count(b"HTTP/1.1 200 OK") == 2, answer
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
