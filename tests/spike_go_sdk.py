"""What SPIKE's Go SDK (spiffe/spike-sdk-go) sends to Nexus and what it concludes from the answer.

The request bodies are the bytes Go's `json.Marshal` makes of the SDK's request structs
(api/entity/v1/reqres): compact, fields in declaration order, `omitempty` fields left out.  They are
written here by hand from the SDK's code, not produced by it.  `conclude` follows `net.Post` and
`net.PostAndUnmarshal`: a status other than 200 becomes one of four SDK errors or "unexpected status
code from peer"; a 200 body is decoded as Go's encoding/json does (unknown fields ignored, names
matched exactly first, then case-insensitively), and a non-empty `err` in it is an error too.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

# --- request bodies, as the Go SDK marshals them -------------------------------------------------------

#: `spike secret delete <path>` / `undelete <path>` with default flags: `-v` defaults to "0" (current).
DELETE_CURRENT = b'{"path":"app/db","versions":[0]}'
UNDELETE_CURRENT = b'{"path":"app/db","versions":[0]}'
#: `spike secret list`: reqres.SecretListRequest has no fields.
LIST_ALL = b"{}"
#: `spike policy get <id>`
POLICY_READ = b'{"id":"%s"}'
#: `spike policy create`: name, spiffeidPattern, pathPattern, permissions (in this order).
POLICY_PUT = b'{"name":"%s","spiffeidPattern":"%s","pathPattern":"%s","permissions":["read","write"]}'
#: `spike policy list` with no filters: both fields are sent, empty (no omitempty).
POLICY_LIST = b'{"spiffeidPattern":"","pathPattern":""}'
#: `spike secret put app/db k=v`: Err has omitempty.
SECRET_PUT = b'{"path":"app/db","values":{"k":"v"}}'


def restore_body(shard_id: int, shard: bytes) -> bytes:
    """reqres.RestoreRequest{ID, Shard *[32]byte}: a Go byte *array* marshals as a JSON array of numbers."""
    return b'{"id":%d,"shard":[%s]}' % (shard_id, ",".join(str(b) for b in shard).encode())


# --- what the SDK concludes ----------------------------------------------------------------------------

#: net.Post's mapping of a status other than 200 (sdk errors package codes).
STATUS_ERRORS = {404: "api_not_found", 401: "access_unauthorized", 400: "api_bad_request", 503: "state_not_ready"}
UNEXPECTED = "unexpected status code from peer"


@dataclass(frozen=True)
class Conclusion:
    """Either `error` (an SDK error code, or `UNEXPECTED`) or `body` (the decoded 200 answer)."""

    error: str | None
    body: dict[str, Any]

    def field(self, go_name: str) -> Any:
        """A struct field as encoding/json fills it: the exact key, else a case-insensitive match, else absent."""
        if go_name in self.body:
            return self.body[go_name]
        for key, value in self.body.items():
            if key.lower() == go_name.lower():
                return value
        return None


def conclude(status: int, body: bytes) -> Conclusion:
    if status != 200:
        return Conclusion(STATUS_ERRORS.get(status, UNEXPECTED), {})
    decoded = json.loads(body)
    assert isinstance(decoded, dict), decoded
    err = decoded.get("err") or None
    return Conclusion(err, decoded)
