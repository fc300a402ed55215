"""The one JSON error shape of the HTTP edges, and the exception that carries it to the response."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

__all__ = ["HTTPProblem", "problem_body"]

_encoder = msgspec.json.Encoder()


class HTTPProblem(Exception):
    """An error answer: HTTP status, a short machine code and a human message naming the limit or field."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})
        # What the server's log says instead of `message`: internals (file paths, database errors) that
        # the operator needs and a client on the internet must not be shown.
        self.detail = detail

    @property
    def reason(self) -> str:
        """The reason for the log: the detail when there is one, else the message the client got."""
        return self.detail or self.message

    def body(self) -> bytes:
        """The JSON body `{"success": false, "code", "message", "error": {"code", "message"}}`."""
        return problem_body(self.code, self.message)


def problem_body(code: str, message: str) -> bytes:
    """Encode the error body: `error` is the shape of every idstitch API, and the same two fields at the
    top level are where Segment's client libraries (analytics-python's APIError) read the reason."""
    return _encoder.encode(
        {"success": False, "code": code, "message": message, "error": {"code": code, "message": message}}
    )
