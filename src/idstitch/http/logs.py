"""Structured logs: one JSON object per line on stderr (a request line carries its fields in `extra`)."""

from __future__ import annotations

import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

import msgspec

__all__ = ["JsonFormatter", "configure_logging", "request_logger"]

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


def configure_logging(stream: TextIO | None = None, level: int = logging.INFO) -> None:
    """Send idstitch's and uvicorn's logs to `stream` (stderr) as JSON lines."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    for name, logger_level in (("idstitch", level), ("uvicorn.error", logging.WARNING)):
        logger = logging.getLogger(name)
        logger.handlers[:] = [handler]
        logger.setLevel(logger_level)
        logger.propagate = False
