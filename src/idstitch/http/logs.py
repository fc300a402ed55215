"""Structured logs: one JSON object per line on stderr (a request line carries its fields in `extra`)."""

from __future__ import annotations

import logging
import sys
import threading
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

__all__ = ["BatchingStreamHandler", "JsonFormatter", "configure_logging", "request_logger"]

_encoder = msgspec.json.Encoder(enc_hook=str)  # a field of an odd type is logged as its str(), never lost
# LogRecord attributes that are not fields of ours: everything else passed in `extra` is logged.
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """Formats a record as `{"time", "level", "logger", "msg", ...extra fields, "exception"?}`."""

    def format(self, record: logging.LogRecord) -> str:
        """One JSON line."""
        document: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                document[key] = value
        if record.exc_info:
            document["exception"] = self.formatException(record.exc_info)
        return _encoder.encode(document).decode()


def request_logger() -> logging.Logger:
    """The logger of the HTTP edge."""
    return logging.getLogger("idstitch.http")


class BatchingStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]  # generic only in typeshed
    """A stream handler that writes lines in batches: at most `interval` seconds late, warnings at once.

    At thousands of requests a second, one write and flush per request line cost more CPU than the
    request itself; batching makes that one write per interval. A crash loses at most the last
    interval's info lines, never a warning or error (those flush everything before them at once).
    """

    def __init__(self, stream: TextIO, interval: float = 0.2, max_pending: int = 1000) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        self._max_pending = max_pending
        self._interval = interval
        self._stopping = threading.Event()
        self._flusher = threading.Thread(target=self._flush_periodically, name="idstitch-log", daemon=True)
        self._flusher.start()

    def emit(self, record: logging.LogRecord) -> None:
        """Queue the formatted line; write now for warnings and errors or when many are queued."""
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        with self.lock:  # type: ignore[union-attr]  # created by Handler.__init__
            self._pending.append(line)
            if record.levelno >= logging.WARNING or len(self._pending) >= self._max_pending:
                try:
                    self._write_pending()
                except Exception:
                    # A stream that fails (stderr's reader gone) must not fail the code that logs:
                    # a request, or the watcher that restarts profile workers. Those lines are lost.
                    self.handleError(record)

    def _write_pending(self) -> None:
        if self._pending:
            text = "\n".join(self._pending) + "\n"
            self._pending.clear()
            self.stream.write(text)
            self.stream.flush()

    def flush(self) -> None:
        """Write every queued line."""
        with self.lock:  # type: ignore[union-attr]
            self._write_pending()

    def _flush_periodically(self) -> None:
        while not self._stopping.wait(self._interval):
            try:
                self.flush()
            except ValueError:
                return  # the stream was closed under us (process exit)
            except OSError:
                continue  # the stream failed (its reader gone): those lines are lost, later ones may pass

    def close(self) -> None:
        """Write what is queued and stop the flushing thread."""
        self._stopping.set()
        self.flush()
        super().close()


def configure_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send idstitch's and uvicorn's logs to `stream` (stderr) as JSON lines."""
    handler = BatchingStreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    # psycopg's pool and nats-py log a dropped connection themselves: as JSON lines too, not as the
    # bare multi-line text Python prints for a logger nobody configured.
    libraries = (("uvicorn.error", logging.WARNING), ("psycopg", logging.WARNING), ("nats", logging.WARNING))
    for name, logger_level in (("idstitch", level), *libraries):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logger_level)
        logger.propagate = False
