"""What the driver tells the Nexus custody machine about its requests.

The driver performs each `SendRequest` effect and answers with exactly one
of these, carrying the effect's ``request_id``.  The raw status and body are
passed in; decoding (and deciding that garbage is garbage) is the core's job,
so every driver treats peers the same way.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    """An HTTP answer, whatever its status: the raw status code and body bytes."""

    request_id: int
    status: int
    body: bytes = field(repr=False)


@dataclass(frozen=True, slots=True)
class RequestFailed:
    """No HTTP answer: refused, reset, TLS or identity failure, or the deadline passed."""

    request_id: int
    reason: str


Answer = ResponseReceived | RequestFailed
