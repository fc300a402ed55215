"""`idstitch serve` as a real subprocess on a free local port, for end-to-end tests of both HTTP APIs."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

WRITE_KEY = "wk_test"
PROFILE_TOKEN = "pt_test"  # the zero-configuration space's Profile API read token in these tests
ADMIN_TOKEN = "at_test"
START_SECONDS = 30.0  # generous: two cores shared with the rest of the suite


def free_port() -> int:
    """A port nobody listens on right now (bind port 0 and let the kernel choose)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class Server:
    """`idstitch serve` on a SQLite file of its own; start, stop (SIGTERM), kill (SIGKILL), restart."""

    def __init__(self, directory: Path, *, args: tuple[str, ...] = ()) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.store_url = f"sqlite:///{directory / 'idstitch.db'}"  # absolute path: sqlite:////…
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.args = args  # more `idstitch serve` options
        # IDSTITCH_* from the caller's shell must not leak in: the zero-config space with our write key only.
        self.env = {key: value for key, value in os.environ.items() if not key.startswith("IDSTITCH_")}
        self.env["IDSTITCH_WRITE_KEY"] = WRITE_KEY
        self.env["IDSTITCH_PROFILE_TOKEN"] = PROFILE_TOKEN
        self.env["IDSTITCH_ADMIN_TOKEN"] = ADMIN_TOKEN

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.directory / f"serve-{self.starts}.log"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def start(self) -> None:
        """Start on the same port and store as before, and wait until /healthz answers."""
        assert self.process is None or self.process.poll() is not None, "already running"
        self.starts += 1
        command = [sys.executable, "-m", "idstitch", "serve", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--store", self.store_url, *self.args]
        with self.log_path.open("wb") as log:
            # cwd: the scratch directory, so that no ./idstitch.toml of the developer is picked up
            self.process = subprocess.Popen(
                command, cwd=self.directory, env=self.env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited with {self.process.returncode}:\n{self.log()}")
            if self._healthy():
                assert f"idstitch serving on {self.base_url}" in self.log(), self.log()
                return
            time.sleep(0.05)
        self.kill()
        raise AssertionError(f"serve not healthy after {START_SECONDS}s:\n{self.log()}")

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base_url}/healthz", timeout=2) as response:
                return response.status == 200 and json.loads(response.read()) == {"status": "ok"}
        except (OSError, http.client.HTTPException, ValueError):
            return False

    def stop(self) -> None:
        """SIGTERM: a graceful exit with status 0 (SPEC: everything acknowledged is already committed)."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"serve ignored SIGTERM for 30 s:\n{self.log()}") from None
        assert code == 0, f"serve exited with {code} on SIGTERM:\n{self.log()}"

    def kill(self) -> None:
        """SIGKILL, as a crash or the OOM killer would: no clean-up runs."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=30)

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None
