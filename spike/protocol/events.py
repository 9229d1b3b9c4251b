"""What the driver tells the Nexus custody machine about its requests.

The driver performs each `SendRequest` effect and answers with exactly one
of these, carrying the effect's ``request_id``.  The raw status and body are
passed in; decoding (and deciding that garbage is garbage) is the core's job,
so every driver treats peers the same way.  When there is no HTTP answer,
the driver says why once, at its edge, as a `FailureKind` (the way httpcore
maps socket and TLS exceptions to its own), and the core decides from that.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum


class FailureKind(Enum):
    """Why a request got no HTTP answer.  A driver maps its own exceptions to one of these."""

    REFUSED = "refused"  # nothing listens at the keeper's address (connection refused)
    UNREACHABLE = "unreachable"  # no route to it, its name does not resolve, the network is down
    TIMEOUT = "timeout"  # the deadline passed: while connecting, or while waiting for the answer
    TLS = "tls"  # the TLS handshake failed (a certificate not trusted, no common protocol)
    PEER_IDENTITY = "peer_identity"  # TLS held, but the peer's SPIFFE ID is not this keeper's
    CLOSED = "closed"  # the connection closed or was reset before a whole answer came
    BAD_HTTP = "bad_http"  # the answer was not valid HTTP/1.1, or was too large
    OTHER = "other"  # anything else, and drivers that do not say


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """An HTTP answer, whatever its status: the raw status code and body bytes."""

    request_id: int
    status: int
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """No HTTP answer: `kind` says why (decisions are made on it), `reason` says it in words for humans."""

    request_id: int
    reason: str
    kind: FailureKind = FailureKind.OTHER


Answer = ResponseReceived | RequestFailed
