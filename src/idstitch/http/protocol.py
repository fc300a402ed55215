"""uvicorn's httptools HTTP/1.1 protocol with the two bounds it lacks on a request's head.

uvicorn (with httptools) keeps every header line of a request, however many, and waits for them for
ever: a client sending megabytes of headers makes the process hold them (100 MB of short header lines
costs ~1.5 GB of Python objects), and a client that connects and sends nothing, or a header line now
and then, holds its connection and file descriptor until it chooses to leave. Here the head (request
line and headers) may be at most `MAX_HEAD_BYTES` (answered 431) and must arrive within
`HEAD_TIMEOUT_SECONDS` of the connection opening or of its first byte (else the connection is closed).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

__all__ = ["HEAD_TIMEOUT_SECONDS", "MAX_HEAD_BYTES", "BoundedHttpToolsProtocol"]

MAX_HEAD_BYTES = 64 * 1024  # nginx's default is 4 buffers of 8 KB, Node's 16 KB
HEAD_TIMEOUT_SECONDS = 30.0


class _HeadTooLarge(Exception):
    """Raised in a parser callback to stop parsing a head over the bound."""


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """One connection: uvicorn's protocol, refusing a head over `max_head_bytes` or slower than `head_timeout`."""

    max_head_bytes = MAX_HEAD_BYTES
    head_timeout = HEAD_TIMEOUT_SECONDS

    _head_bytes = 0  # of the unfinished head, counted by the reads that carried only head bytes
    _parsed_head_bytes = 0  # of the head's request line and header lines the parser has completed
    _reading_head = True
    _began = False
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """Start waiting for the first request's head."""
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        """Stop the head timer with the connection."""
        self._cancel_head_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parse, then count what of `data` belongs to an unfinished head."""
        self._began = False
        super().data_received(data)
        if not self._reading_head or self.transport.is_closing():
            return
        # A read in which a request began may also hold the end of the one before it (pipelining): it is
        # not counted here; the lines of it the parser completed are counted by _count_parsed.
        self._head_bytes = 0 if self._began else self._head_bytes + len(data)
        if self._head_bytes > self.max_head_bytes:
            self._cancel_head_timer()
            self._refuse_head()

    def on_message_begin(self) -> None:
        """A request's first byte: its head starts now, with its own deadline."""
        super().on_message_begin()
        self._began = True
        self._reading_head = True
        self._head_bytes = 0
        self._parsed_head_bytes = 0
        self._arm_head_timer()

    def on_url(self, url: bytes) -> None:
        """Part of the request target."""
        self._count_parsed(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        """One header line."""
        self._count_parsed(len(name) + len(value) + 4)  # ": " and CRLF
        super().on_header(name, value)

    def _count_parsed(self, size: int) -> None:
        self._parsed_head_bytes += size
        if self._parsed_head_bytes > self.max_head_bytes:
            # Stops the parser; uvicorn then answers 400 through send_400_response, which says 431.
            raise _HeadTooLarge

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request the parser refused: 431 when it was for the head's size."""
        if self._parsed_head_bytes > self.max_head_bytes:
            self._cancel_head_timer()
            self._refuse_head()
        else:
            super().send_400_response(msg)

    def on_headers_complete(self) -> None:
        """The head is complete: no more head bound for this request."""
        self._reading_head = False
        self._cancel_head_timer()
        super().on_headers_complete()

    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self._reading_head or self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            return  # a response is still being made on this connection: uvicorn's keep-alive rules apply
        self.transport.close()

    def _refuse_head(self) -> None:
        message = f"Request header fields are over the {self.max_head_bytes // 1024} KB limit."
        content = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
        for name, value in self.server_state.default_headers:
            content.extend([name, b": ", value, b"\r\n"])
        content.extend(
            [
                b"content-type: text/plain; charset=utf-8\r\n",
                b"content-length: " + str(len(message)).encode("ascii") + b"\r\n",
                b"connection: close\r\n",
                b"\r\n",
                message.encode("ascii"),
            ]
        )
        self.transport.write(b"".join(content))
        self.transport.close()
