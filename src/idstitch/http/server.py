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
from idstitch.http.app import ServeApp
from idstitch.http.logs import configure_logging
from idstitch.http.profiles import ProfileAPI
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
    profile_port: int | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT; `announce` gets each URL once the server accepts connections.

    The Tracking API and the Profile API share `port`, unless `profile_port` gives the Profile API its own.
    """
    sock = bind(host, port)  # first: a port in use fails before anything process-wide is touched
    sockets = [sock]
    if profile_port is not None:
        try:
            sockets.append(bind(host, profile_port))
        except ConfigError:
            sock.close()
            raise
    configure_logging()
    # The `_created` series (a timestamp per labelled counter) double the scrape for no use here.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    shown_host = f"[{host}]" if ":" in host else host
    urls = [f"http://{shown_host}:{item.getsockname()[1]}" for item in sockets]
    writer = GroupCommitWriter(engine, max_pending_messages=max_pending_messages)
    bound_profile_port = sockets[1].getsockname()[1] if profile_port is not None else None
    tracking = TrackingAPI(writer)
    # One registry: /metrics shows both APIs' request latencies beside the ingest counters.
    profiles = ProfileAPI(engine, metrics=tracking.metrics)
    app = ServeApp(tracking, profiles, profile_port=bound_profile_port)
    try:
        config = uvicorn.Config(
            app,
            lifespan="off",  # the writer is owned here, not by the app
            access_log=False,  # the app logs one structured line per request itself
            log_config=None,
            server_header=False,
            # Past this, requests still running are cancelled; their messages still get committed.
            timeout_graceful_shutdown=30,
        )

        def on_started() -> None:
            if len(urls) == 1:
                announce(urls[0])
            else:
                announce(f"{urls[0]} (Tracking API), {urls[1]} (Profile API)")

        _Server(config, on_started=on_started).run(sockets=sockets)
    finally:
        writer.close()  # everything accepted is committed before the process exits
        for item in sockets:
            item.close()


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
