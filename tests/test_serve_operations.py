"""`idstitch serve` as an operator runs it: ports, sockets and start-up refusals."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from idstitch.core.errors import ConfigError
from idstitch.http.server import bind


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
