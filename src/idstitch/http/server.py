"""Run the Tracking API under uvicorn (uvloop + httptools when installed) until SIGTERM or Ctrl-C.

Shutdown is graceful: the listening socket closes, requests in flight finish (their messages are
committed and answered), the group-commit writer is flushed and closed, and the process exits 0.
"""

from __future__ import annotations

import contextlib
import signal
import socket
from collections.abc import Callable, Generator

import prometheus_client
import uvicorn

from idstitch.core.errors import ConfigError
from idstitch.engine import Engine
from idstitch.group_commit import GroupCommitWriter
from idstitch.http.logs import configure_logging
from idstitch.http.tracking import TrackingAPI

__all__ = ["bind", "run_server"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def bind(host: str, port: int) -> socket.socket:
    """A socket bound to host:port (port 0 picks a free one); ConfigError when that is impossible."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        family, kind, proto, _, address = infos[0]
        sock = socket.socket(family, kind, proto)
    except OSError as error:
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    try:
        # A restarted server must not wait for the old one's connections to leave TIME_WAIT.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError as error:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port}: {error.strerror or error}") from None
    return sock


def run_server(
    engine: Engine,
    *,
    host: str,
    port: int,
    announce: Callable[[str], None],
    max_pending_messages: int = 50_000,
) -> None:
    """Serve until SIGTERM/SIGINT; `announce` gets the URL once the server accepts connections."""
    sock = bind(host, port)  # first: a port in use fails before anything process-wide is touched
    configure_logging()
    # The `_created` series (a timestamp per labelled counter) double the scrape for no use here.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    bound_port = sock.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    url = f"http://{shown_host}:{bound_port}"
    writer = GroupCommitWriter(engine, max_pending_messages=max_pending_messages)
    try:
        config = uvicorn.Config(
            TrackingAPI(writer),
            lifespan="off",  # the writer is owned here, not by the app
            access_log=False,  # the app logs one structured line per request itself
            log_config=None,
            server_header=False,
            # Past this, requests still running are cancelled; their messages still get committed.
            timeout_graceful_shutdown=30,
        )
        _Server(config, on_started=lambda: announce(url)).run(sockets=[sock])
    finally:
        writer.close()  # everything accepted is committed before the process exits
        sock.close()


class _Server(uvicorn.Server):
    """uvicorn's server, announcing its start, and ending with exit code 0 on SIGTERM."""

    def __init__(self, config: uvicorn.Config, *, on_started: Callable[[], None]) -> None:
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        """Start listening, then announce."""
        await super().startup(sockets=sockets)
        if self.started:
            self._on_started()

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        """Turn SIGTERM / SIGINT into a graceful shutdown.

        uvicorn's own version re-raises the signal after shutting down, so the process would die of
        SIGTERM (exit status 143); a drained, clean shutdown is a success and exits 0.
        """
        previous = {sig: signal.signal(sig, self.handle_exit) for sig in _STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
