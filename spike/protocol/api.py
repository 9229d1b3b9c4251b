"""Transport-neutral request and response values for the servers' handlers.

A transport parses HTTP and TLS and hands the core an `ApiRequest` with the
peer's already verified SPIFFE ID; the handler returns an `ApiResponse`.
Bodies are excluded from ``repr`` because they may carry shards or secrets.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from .identity import SpiffeId
from .wire import ErrorCode, encode, error_body

JSON = "application/json"


@dataclass(frozen=True, slots=True)
class ApiRequest:
    """One HTTP request as a handler sees it.

    `peer` is the SPIFFE ID of the client's verified certificate (None when
    it has none: see `peer_spiffe_id`); the transport has already enforced
    its body size limit.  `query` is the raw query string without ``?``;
    `headers` are the request's fields, names in lower case (a Vault client's
    token travels in one: they are left out of ``repr``).
    """

    method: str
    path: str
    peer: SpiffeId | None
    body: bytes = field(default=b"", repr=False)
    query: str = ""
    content_type: str = ""
    headers: Mapping[bytes, bytes] = field(default_factory=dict, repr=False)

    def action(self) -> str:
        """The ``action=`` query parameter SPIKE's API uses to pick an operation ("" if none)."""
        for part in self.query.split("&"):
            name, _, value = part.partition("=")
            if name == "action":
                return value
        return ""


@dataclass(frozen=True, slots=True)
class ApiResponse:
    """What to send back: a status, a body (JSON unless `content_type` says otherwise)."""

    status: int
    body: bytes = field(default=b"{}", repr=False)
    content_type: str = JSON

    @classmethod
    def json(cls, value: object, status: int = 200) -> ApiResponse:
        """A JSON response encoding `value` (a wire struct, dict, list, ...)."""
        return cls(status, encode(value))

    @classmethod
    def error(cls, status: int, code: ErrorCode, reason: str = "") -> ApiResponse:
        """An error response: ``{"err": code}``, and ``"reason"`` only when one is given (never internals)."""
        return cls(status, error_body(code, reason))


BAD_REQUEST = ApiResponse.error(400, ErrorCode.BAD_REQUEST)
UNAUTHORIZED = ApiResponse.error(401, ErrorCode.UNAUTHORIZED)
NOT_FOUND = ApiResponse.error(404, ErrorCode.NOT_FOUND)
METHOD_NOT_ALLOWED = ApiResponse.error(405, ErrorCode.BAD_REQUEST)
CONFLICT = ApiResponse.error(409, ErrorCode.CONFLICT)
NOT_READY = ApiResponse.error(503, ErrorCode.NOT_READY)
INTERNAL_ERROR = ApiResponse.error(500, ErrorCode.INTERNAL)
OK_EMPTY = ApiResponse(200, b"{}")
