"""Store results and failures as Vault answers them, inline or through a future."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from spike.app.model import kv
from spike.app.nexus.vault import envelope
from spike.app.nexus.vault.request import BadRequest
from spike.app.store.backend import SecretBackend
from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.app.store.sealing import TamperedData
from spike.protocol.api import ApiResponse

log = logging.getLogger("spike.nexus.vault")

T = TypeVar("T")
Reply = ApiResponse | Future[ApiResponse]

CAS_MISMATCH = "check-and-set parameter did not match the current version"
CAS_REQUIRED = "check-and-set parameter required for this call"
INTERNAL = envelope.errors(500, "internal error")
UNAVAILABLE = envelope.errors(503, "the database cannot be used now; nothing was written: try again")


def timestamp(moment: float | None) -> str:
    """Vault's RFC 3339 time ("" for none), in UTC with microseconds."""
    if moment is None:
        return ""
    return dt.datetime.fromtimestamp(moment, dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def failure(exc: BaseException, what: str) -> ApiResponse:
    """The Vault answer for a refusal or a failure; what the caller is not told goes to the log."""
    if isinstance(exc, kv.CasMismatch):
        return envelope.errors(400, CAS_MISMATCH)
    if isinstance(exc, kv.CasRequired):
        return envelope.errors(400, CAS_REQUIRED)
    if isinstance(exc, kv.NotFound):
        return envelope.NOT_FOUND
    if isinstance(exc, kv.KvError | BadRequest):
        return envelope.errors(400, str(exc))
    if isinstance(exc, TamperedData):
        log.error("%s: REFUSED TAMPERED DATA: %s", what, exc)
        return INTERNAL
    if isinstance(exc, DatabaseUnavailable):
        log.debug("%s: %s", what, exc)  # the outage itself is logged once, by the backend
        return UNAVAILABLE
    if isinstance(exc, StorageError):
        log.error("%s: %s", what, exc)
        return INTERNAL
    log.error("%s: unexpected %s", what, exc.__class__.__name__, exc_info=exc)
    return INTERNAL


def settle(future: Future[T], answer: Callable[[T], Reply], what: str) -> Future[ApiResponse]:
    """A future answer from a future result; `answer` may itself answer with a future (a read after a write)."""
    reply: Future[ApiResponse] = Future()

    def done(source: Future[T]) -> None:
        error = source.exception()
        if error is not None:
            reply.set_result(failure(error, what))
            return
        try:
            then = answer(source.result())
        except Exception as exc:
            reply.set_result(failure(exc, what))
            return
        if isinstance(then, ApiResponse):
            reply.set_result(then)
        else:
            then.add_done_callback(lambda nested: reply.set_result(nested.result()))

    future.add_done_callback(done)
    return reply


def read(store: SecretBackend, call: Callable[[], T], answer: Callable[[T], Reply], what: str) -> Reply:
    """Answer from a read: inline on a local database, through a future on a remote one."""
    if store.inline_reads:
        try:
            found = call()
        except Exception as exc:
            return failure(exc, what)
        try:
            return answer(found)
        except Exception as exc:
            return failure(exc, what)
    return settle(store.read(call), answer, what)
