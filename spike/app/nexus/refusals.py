"""Refusals that several of Nexus's APIs give, each with the reason the caller reads (`ErrorBody.reason`).

SPIKE's clients read only ``err``; spike's CLI prints ``reason``.  A reason says what the caller can act
on and nothing it may not know: never a value, never whether a path it may not read exists.
"""

from __future__ import annotations

from spike.app.api.messages import BOOTSTRAP_INIT_PATH, BOOTSTRAP_VERIFY_PATH, RECOVER_PATH, RESTORE_PATH, ROTATE_PATH
from spike.app.store.errors import DatabaseUnavailable
from spike.protocol.api import INTERNAL_ERROR, ApiResponse
from spike.protocol.effects import Phase
from spike.protocol.wire import ErrorCode

WAITING_FOR_SHARDS = ApiResponse.error(503, ErrorCode.NOT_READY, "it is waiting for the shards of its root key")
NOT_INITIALISED = ApiResponse.error(503, ErrorCode.NOT_READY, "it has no root key yet: run `spike bootstrap`")
DATABASE_UNAVAILABLE = ApiResponse.error(503, ErrorCode.NOT_READY, "its database cannot be used right now")
NO_SUCH_ROUTE = ApiResponse.error(404, ErrorCode.NOT_FOUND, "no such API path")
# Under SPIKE's route prefixes an unknown path, an unknown action and any method but POST are SPIKE's
# "fallback": 400 api_bad_request (its Go SDK reports 404 and 405 as a broken peer, not as a refusal).
NO_SUCH_SPIKE_ROUTE = ApiResponse.error(400, ErrorCode.BAD_REQUEST, "no such API path")
UNKNOWN_ACTION = ApiResponse.error(400, ErrorCode.BAD_REQUEST, "no such action for this API path")
POST_ONLY = ApiResponse.error(400, ErrorCode.BAD_REQUEST, "this API takes POST requests only")
REFUSED = ApiResponse.error(401, ErrorCode.UNAUTHORIZED, "no role or policy lets this identity make this request")

# The memory backend (SPIKE_NEXUS_BACKEND_STORE=memory) holds a key drawn at start that nobody keeps: nothing to
# bootstrap, recover, restore or rotate.  SPIKE's memory Nexus answers recover and restore with 400 too.
_MEMORY = "Nexus runs with the memory backend (nothing kept, no keepers)"
MEMORY_CLOSED = {
    BOOTSTRAP_INIT_PATH: ApiResponse.error(400, ErrorCode.BAD_REQUEST, f"{_MEMORY}: there is nothing to bootstrap"),
    BOOTSTRAP_VERIFY_PATH: ApiResponse.error(400, ErrorCode.BAD_REQUEST, f"{_MEMORY}: there is nothing to bootstrap"),
    RECOVER_PATH: ApiResponse.error(
        400, ErrorCode.BAD_REQUEST, f"{_MEMORY}: recovery is not applicable, its data is lost when it stops"
    ),
    RESTORE_PATH: ApiResponse.error(400, ErrorCode.BAD_REQUEST, f"{_MEMORY}: there is nothing to restore"),
    ROTATE_PATH: ApiResponse.error(
        400, ErrorCode.BAD_REQUEST, f"{_MEMORY}: its key lives as long as the process, there is nothing to rotate"
    ),
}


def not_ready(phase: Phase) -> ApiResponse:
    """The 503 of a Nexus without its root key, saying which of the two waits it is in."""
    return NOT_INITIALISED if phase is Phase.UNINITIALISED else WAITING_FOR_SHARDS


def unavailable(exc: BaseException) -> ApiResponse:
    """503 for a database that cannot be reached now (the caller may retry), 500 for any other storage failure."""
    return DATABASE_UNAVAILABLE if isinstance(exc, DatabaseUnavailable) else INTERNAL_ERROR


def bad_request(reason: str) -> ApiResponse:
    return ApiResponse.error(400, ErrorCode.BAD_REQUEST, reason[:500])


def conflict(reason: str) -> ApiResponse:
    return ApiResponse.error(409, ErrorCode.CONFLICT, reason[:500])
