"""Request bodies read under a size limit, while they stream in, and gunzipped under the same limit.

Nothing is buffered beyond the limit: a declared Content-Length over it is refused before reading,
a body that grows past it is refused at the chunk that crosses it, and a gzip body is inflated
incrementally with `max_length`, so a small "zip bomb" never expands past the limit in memory.
"""

from __future__ import annotations

import zlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from idstitch.http.problems import HTTPProblem

__all__ = ["BodyLimit", "read_body"]

_GZIP_WBITS = 16 + zlib.MAX_WBITS  # gzip header and trailer, not a raw zlib stream
_IDENTITY = frozenset({"", "identity"})
_GZIP = frozenset({"gzip", "x-gzip"})


@dataclass(frozen=True, slots=True)
class BodyLimit:
    """The most bytes a body may hold (before and after gunzip), and the problem raised past it."""

    max_bytes: int
    status: int
    code: str
    label: str  # "request" or "message": what the limit is per, for the error message
    noun: str  # what the body is called in the error message: "request body" or "message"

    def problem(self, what: str) -> HTTPProblem:
        """The error for a body over the limit; `what` says which size was measured."""
        kb = self.max_bytes // 1024
        return HTTPProblem(self.status, self.code, f"{what} is over the {kb} KB per-{self.label} limit")


async def read_body(
    chunks: AsyncIterator[bytes], *, encoding: str, declared_length: int | None, limit: BodyLimit
) -> bytes:
    """The whole body, gunzipped when `encoding` says gzip; HTTPProblem when too large or bad gzip."""
    coding = encoding.strip().lower()
    gzipped = coding in _GZIP
    if not gzipped and coding not in _IDENTITY:
        raise HTTPProblem(
            415, "unsupported_encoding", f"Content-Encoding {encoding!r} is not supported (use gzip or none)"
        )
    what = f"compressed {limit.noun}" if gzipped else limit.noun
    if declared_length is not None and declared_length > limit.max_bytes:
        raise limit.problem(what)
    received = bytearray()
    async for chunk in chunks:
        received += chunk
        if len(received) > limit.max_bytes:
            raise limit.problem(what)
    if not gzipped:
        return bytes(received)
    return _gunzip(bytes(received), limit)


def _gunzip(data: bytes, limit: BodyLimit) -> bytes:
    what = f"decompressed {limit.noun}"
    out = bytearray()
    inflater = zlib.decompressobj(_GZIP_WBITS)
    pending = data
    try:
        while True:
            out += inflater.decompress(pending, limit.max_bytes - len(out) + 1)
            if len(out) > limit.max_bytes:
                raise limit.problem(what)
            if not inflater.eof:
                # Input all consumed (max_length was not reached) but the stream has not ended.
                raise HTTPProblem(400, "invalid_gzip", "gzip body is truncated")
            rest = inflater.unused_data
            if not rest.strip(b"\0"):
                return bytes(out)  # trailing zero padding is allowed, as the gzip module allows it
            # Another gzip member follows (concatenated gzip files are one valid gzip stream).
            inflater = zlib.decompressobj(_GZIP_WBITS)
            pending = rest
    except zlib.error as error:
        raise HTTPProblem(400, "invalid_gzip", f"body is not valid gzip: {error}") from None
