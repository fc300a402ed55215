"""The request log's handler: lines written in batches, warnings at once, nothing lost on close."""

from __future__ import annotations

import io
import json
import logging
import time

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
