"""Run the Tracking API under uvicorn (uvloop + httptools when installed) until SIGTERM or Ctrl-C.

Shutdown is graceful: the listening socket closes, requests in flight finish (their messages are
committed and answered), the group-commit writer is flushed and closed, and the process exits 0.
With `queue` (a NATS URL), requests are published to JetStream instead of committed here; the
publisher is closed the same way, after every accepted request is persisted there.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import multiprocessing.process
import os
import shutil
import signal
import socket
import tempfile
import threading
from collections.abc import Callable, Generator
from pathlib import Path

import prometheus_client
import uvicorn

from idstitch.config import load_config
from idstitch.core.errors import ConfigError
from idstitch.engine import Engine
from idstitch.group_commit import GroupCommitWriter
from idstitch.http.app import ServeApp
from idstitch.http.logs import configure_logging
from idstitch.http.profiles import ProfileAPI
from idstitch.http.protocol import BoundedHttpToolsProtocol
from idstitch.http.rate_limits import RateLimiter, SharedBuckets
from idstitch.http.source_settings import PublicAddress
from idstitch.http.tracking import IngestWriter, TrackingAPI
from idstitch.storage.urls import open_store

__all__ = ["ProfileWorkers", "bind", "run_server"]

_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_BACKLOG = 2048  # uvicorn's default


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
        # Listening now, not when the server starts: with SO_REUSEADDR, two sockets that are bound but
        # not yet listening may share a port, and only the second listen() would fail, inside uvicorn.
        sock.listen(_BACKLOG)
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
    retry_after: int = 1,
    profile_port: int | None = None,
    profile_workers: int = 0,
    queue: str | None = None,
    public_address: PublicAddress | None = None,
) -> None:
    """Serve until SIGTERM/SIGINT; `announce` gets each URL once the server accepts connections.

    The Tracking API and the Profile API share `port`, unless `profile_port` gives the Profile API its own;
    with `profile_workers`, that port is served by that many read-only processes of their own. With
    `queue`, the Tracking API publishes to that NATS JetStream URL for `idstitch worker`s to resolve.
    """
    if profile_workers and profile_port is None:
        raise ConfigError("--profile-workers needs --profile-port: the workers serve that port")
    if profile_port is not None and profile_port != 0 and profile_port == port:
        raise ConfigError(
            f"--profile-port must differ from --port ({port}): "
            "both APIs are served on --port when --profile-port is not given"
        )
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
    # With its own port, the Profile API answers only there (here or in the workers), never on `port`.
    bound_profile_port = sockets[1].getsockname()[1] if len(sockets) > 1 else None
    workers: ProfileWorkers | None = None
    if profile_workers:
        # Reads leave this process: the writer's thread and the event loop no longer share one GIL
        # with them. The workers open the store read-only (SQLite WAL: readers never block the writer).
        try:
            workers = ProfileWorkers(sockets.pop(), engine, profile_workers)
        except BaseException:
            for item in sockets:
                item.close()
            raise
    try:
        writer = _writer(engine, queue, max_pending_messages)
    except BaseException:
        if workers is not None:
            workers.sock.close()
        for item in sockets:
            item.close()
        raise
    tracking = TrackingAPI(writer, retry_after=retry_after, public_address=public_address)
    if workers is not None:
        tracking.metrics.include_processes(workers.metrics_dir)
    # One registry: /metrics shows both APIs' request latencies beside the ingest counters.
    profiles = ProfileAPI(engine, metrics=tracking.metrics)
    app = ServeApp(tracking, profiles, profile_port=bound_profile_port)
    try:
        config = uvicorn.Config(
            app,
            lifespan="off",  # the writer is owned here, not by the app
            http=BoundedHttpToolsProtocol,  # bounded request heads: size and time to send them
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

        if workers is not None:
            workers.start()
        _Server(config, on_started=on_started).run(sockets=sockets)
    finally:
        if workers is not None:
            workers.stop()
        writer.close()  # everything accepted is committed before the process exits
        for item in sockets:
            item.close()


def _writer(engine: Engine, queue: str | None, max_pending_messages: int) -> IngestWriter:
    """The group-commit writer, or with a queue URL the JetStream publisher (connected, stream ensured)."""
    if queue is None:
        return GroupCommitWriter(engine, max_pending_messages=max_pending_messages)
    from idstitch.queue.publisher import JetStreamPublisher  # nats loads only in queue mode

    return JetStreamPublisher(engine, queue, max_pending_messages=max_pending_messages)


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


_MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
_METRICS_DIR_PREFIX = "idstitch-profile-metrics-"
_environment_lock = threading.Lock()


def _remove_orphaned_metrics_dirs() -> None:
    """Remove the metrics directories of servers that died without stopping (kill -9)."""
    for path in Path(tempfile.gettempdir()).glob(f"{_METRICS_DIR_PREFIX}*"):
        pid = path.name.removeprefix(_METRICS_DIR_PREFIX).split("-", 1)[0]
        if not pid.isdigit():
            continue
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(path, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's


class ProfileWorkers:
    """Processes serving the Profile API on one shared listening socket, each with a read-only store.

    A worker that dies is started again (the socket stays open in this process, so no connection is
    refused meanwhile); `stop()` asks each to finish its requests (SIGTERM) and waits.
    """

    def __init__(self, sock: socket.socket, engine: Engine, count: int) -> None:
        if engine.store.url.startswith("memory") or engine.store.url in ("sqlite://", "sqlite:///:memory:"):
            raise ConfigError(
                "--profile-workers needs a store file: a memory store is private to its process"
            )
        self.sock = sock
        self.count = count
        self._store_url = engine.store.url
        self._config_path = None if engine.config.path is None else str(engine.config.path)
        # The workers count their requests in Prometheus multiprocess files here; /metrics adds them in.
        _remove_orphaned_metrics_dirs()
        self.metrics_dir = tempfile.mkdtemp(prefix=f"{_METRICS_DIR_PREFIX}{os.getpid()}-")
        self._context = multiprocessing.get_context("spawn")  # no fork: this process holds threads and SQLite
        # One set of rate-limit buckets for all: a token's limit is the space's, however many workers.
        self._buckets = SharedBuckets(self._context)
        self._processes: list[multiprocessing.process.BaseProcess] = []
        self._stopping = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="idstitch-profile-workers", daemon=True)

    def _spawn(self) -> multiprocessing.process.BaseProcess:
        process = self._context.Process(
            target=_profile_worker,
            args=(self.sock, self._store_url, self._config_path, self._buckets),
            name="idstitch-profile-worker",
            daemon=True,
        )
        # prometheus_client picks multiprocess mode from the environment when a process imports it, so
        # the variable is set only while the child starts (this process already counts in memory).
        with _environment_lock:
            os.environ[_MULTIPROC_VARIABLE] = self.metrics_dir
            try:
                process.start()
            finally:
                del os.environ[_MULTIPROC_VARIABLE]
        return process

    def start(self) -> None:
        """Start the workers and the watcher that replaces any that dies."""
        self._processes = [self._spawn() for _ in range(self.count)]
        self._watcher.start()

    def _watch(self) -> None:
        log = logging.getLogger("idstitch.http")
        while not self._stopping.wait(0.5):
            for index, process in enumerate(self._processes):
                if not process.is_alive() and not self._stopping.is_set():
                    log.error(
                        "profile worker exited; starting another",
                        extra={"pid": process.pid, "exit_code": process.exitcode},
                    )
                    self._processes[index] = self._spawn()

    @property
    def pids(self) -> list[int]:
        """Process ids of the running workers."""
        return [process.pid for process in self._processes if process.pid is not None]

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every worker, wait for them to finish; kill those that do not."""
        self._stopping.set()
        for process in self._processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)
        for process in self._processes:
            process.join(timeout)
            if process.is_alive():
                process.kill()
                process.join(5)
        self.sock.close()
        shutil.rmtree(self.metrics_dir, ignore_errors=True)


def _profile_worker(
    sock: socket.socket, store_url: str, config_path: str | None, buckets: SharedBuckets
) -> None:
    """A worker process: the Profile API over a read-only store on the shared socket, until SIGTERM."""
    configure_logging()
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped upstream
    store = open_store(store_url, read_only=True)
    try:
        engine = Engine(store, load_config(config_path), read_only=True)
        config = uvicorn.Config(
            ProfileAPI(engine, rate_limiter=RateLimiter(buckets=buckets)),
            lifespan="off",
            http=BoundedHttpToolsProtocol,
            access_log=False,
            log_config=None,
            server_header=False,
            timeout_graceful_shutdown=30,
        )
        _Server(config, on_started=lambda: None).run(sockets=[sock])
    finally:
        store.close()
