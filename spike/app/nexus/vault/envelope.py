"""Vault's response shapes: the envelope of a successful answer and the ``{"errors": [...]}`` body.

Texts and status codes are Vault's (and OpenBao's, which keeps them): clients
such as hvac and the `vault`/`bao` CLIs choose their exceptions and messages by
status code, and some read the texts.
"""

from __future__ import annotations

import uuid
from typing import Any

from spike.protocol.api import ApiResponse
from spike.protocol.wire import encode


def ok(
    data: dict[str, Any] | None,
    *,
    warnings: list[str] | None = None,
    auth: dict[str, Any] | None = None,
    status: int = 200,
) -> ApiResponse:
    """Vault's envelope: a fresh request id, no lease, no response wrapping (``wrap_info`` null)."""
    return ApiResponse.json(
        {
            "request_id": str(uuid.uuid4()),
            "lease_id": "",
            "renewable": False,
            "lease_duration": 0,
            "data": data,
            "wrap_info": None,
            "warnings": warnings,
            "auth": auth,
        },
        status,
    )


def errors(status: int, *messages: str) -> ApiResponse:
    """Vault's error body: ``{"errors": [...]}`` (an empty list for a plain 404)."""
    return ApiResponse(status, encode({"errors": list(messages)}))


def multierror(status: int, message: str) -> ApiResponse:
    """An error as Vault's go-multierror formats one (what its router says for denials and bad methods)."""
    return errors(status, f"1 error occurred:\n\t* {message}\n\n")


NO_CONTENT = ApiResponse(204, b"")
NOT_FOUND = errors(404)
SEALED = errors(503, "Vault is sealed")
# A token that is unknown, expired, revoked or presented by another identity.
BAD_TOKEN = errors(403, "permission denied")
# The caller is known, and no policy grants what it asks.
PERMISSION_DENIED = multierror(403, "permission denied")
UNSUPPORTED_OPERATION = multierror(405, "unsupported operation")
UNSUPPORTED_PATH = multierror(404, "unsupported path")
BAD_CERTIFICATE = errors(400, "invalid certificate or no client certificate supplied")


def no_handler(path: str) -> ApiResponse:
    """Vault's answer for a path no mount serves."""
    return errors(404, f'no handler for route "{path}". route entry not found.')
