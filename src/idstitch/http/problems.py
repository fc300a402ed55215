"""The one JSON error shape of the HTTP edges, and the exception that carries it to the response."""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

__all__ = ["HTTPProblem", "problem_body"]

_encoder = msgspec.json.Encoder()


class HTTPProblem(Exception):
    """An error answer: HTTP status, a short machine code and a human message naming the limit or field."""

    def __init__(
        self, status: int, code: str, message: str, headers: Mapping[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> bytes:
        """The JSON body `{"success": false, "error": {"code", "message"}}`."""
        return problem_body(self.code, self.message)


def problem_body(code: str, message: str) -> bytes:
    """Encode the error body; Segment's SDKs read `code` and `message` when the body is JSON."""
    return _encoder.encode({"success": False, "error": {"code": code, "message": message}})
