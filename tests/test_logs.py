"""The request log's handler: lines written in batches, warnings at once, nothing lost on close."""

from __future__ import annotations

import io
import json
import logging
import time

import pytest

from idstitch.http.logs import BatchingStreamHandler, JsonFormatter


def logger_with(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger(f"idstitch.test.{id(handler)}")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def test_info_lines_are_batched_warnings_flush_everything_at_once_and_close_flushes() -> None:
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval=60)  # no periodic flush during the test
    handler.setFormatter(JsonFormatter())
    log = logger_with(handler)
    log.info("request", extra={"status": 200})
    log.info("request", extra={"status": 404})
    assert stream.getvalue() == ""  # queued, not yet written
    log.warning("slow", extra={"status": 503})
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert [(line["msg"], line["status"]) for line in lines] == [
        ("request", 200),
        ("request", 404),
        ("slow", 503),
    ]
    log.info("request", extra={"status": 201})
    handler.close()
    assert json.loads(stream.getvalue().splitlines()[-1])["status"] == 201


def test_queued_lines_are_written_within_the_interval() -> None:
    stream = io.StringIO()
    handler = BatchingStreamHandler(stream, interval=0.05)
    handler.setFormatter(JsonFormatter())
    logger_with(handler).info("request")
    deadline = time.monotonic() + 10
    while not stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert json.loads(stream.getvalue())["msg"] == "request"
    handler.close()


class FlakyStream(io.StringIO):
    """A stderr whose reader has gone (a pipe to a log shipper that died) until `broken` is cleared."""

    def __init__(self) -> None:
        super().__init__()
        self.broken = True
        self.failed_writes = 0

    def write(self, text: str) -> int:
        if self.broken:
            self.failed_writes += 1
            raise BrokenPipeError(32, "Broken pipe")
        return super().write(text)


def test_a_broken_stream_never_raises_into_the_code_that_logs(monkeypatch: pytest.MonkeyPatch) -> None:
    # Before: emit() let the write's BrokenPipeError out, so a warning or the 1,000th queued line raised
    # in whatever code logged it (a request handler; the profile-worker watcher, which then died and
    # stopped restarting workers), and the periodic flusher thread stopped for good at the first error.
    monkeypatch.setattr(logging, "raiseExceptions", False)  # handleError: no report on the test's stderr
    stream = FlakyStream()
    handler = BatchingStreamHandler(stream, interval=0.02, max_pending=2)
    handler.setFormatter(JsonFormatter())
    log = logger_with(handler)
    log.error("profile worker exited; starting another")  # written at once: fails, must not raise
    log.info("request")
    log.info("request")  # max_pending reached: written inline, fails, must not raise
    log.info("queued for the flusher")
    deadline = time.monotonic() + 10
    while stream.failed_writes < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert stream.failed_writes >= 3  # the flusher met the broken stream too
    stream.broken = False  # the reader is back: the flusher still runs
    log.info("after", extra={"status": 200})
    while "after" not in stream.getvalue() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert json.loads(stream.getvalue().splitlines()[-1])["msg"] == "after"
    handler.close()
