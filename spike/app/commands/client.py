"""The operator's client for Nexus (SPIKE calls it Pilot): one call, one sentence on failure.

Every command-line tool that talks to Nexus goes through `NexusClient`, so
that "unreachable", "refused", "not ready" and "not found" read the same
everywhere and always end in a non-zero exit code.
"""

from __future__ import annotations

from types import TracebackType
from typing import TypeVar

import msgspec

from spike.app.api.messages import CIPHER_MAX_PLAINTEXT as MAX_PLAINTEXT
from spike.app.api.messages import EXTENSIONS_HEADER, STATUS_PATH, StatusBody
from spike.app.errors import CommandError
from spike.app.identity import IdentitySpec, identity_source
from spike.protocol.errors import RemoteProtocolError
from spike.protocol.identity import Role, TrustDomains
from spike.protocol.wire import ErrorBody, decode
from spike.transports.blocking import BlockingConnection, ClientSession
from spike.transports.client import TransportError
from spike.transports.tls import role_check

T = TypeVar("T")

# The largest answer Nexus gives: a 1 MiB cipher plaintext, sealed and base64-encoded in JSON.
MAX_ANSWER_BYTES = MAX_PLAINTEXT * 4 // 3 + 4096

_REFUSED = "Nexus refused this identity"
_REFUSED_HINT = "check the SVID, the trust domain and the policies"
_NOT_READY_CAUSE = "it is waiting for the shards of its root key, or its database cannot be used right now"
_AFTER_NOT_READY = {
    True: "nothing was changed; try again once `spike status` says ready",
    False: "try again once `spike status` says ready",
}


def explain(
    status: int, code: str, reason: str, *, write: bool = False, not_found: str = "", conflict: str = ""
) -> str:
    """One sentence for an error answer: what Nexus said (its `reason`, when it gave one) and what to do.

    `write` says whether the request would have changed something (then "nothing was changed" is news
    worth giving); `not_found` and `conflict` are the caller's own wording for those two answers.
    """
    if code == "access_unauthorized":
        return f"{_REFUSED} ({reason}): {_REFUSED_HINT}" if reason else f"{_REFUSED}: {_REFUSED_HINT}"
    if code == "state_not_ready":
        return f"Nexus is not ready: {reason or _NOT_READY_CAUSE}; {_AFTER_NOT_READY[write]}"
    if code == "api_not_found" and not_found:
        return not_found
    if code == "api_conflict" and conflict:
        return conflict
    if code == "api_bad_request":
        return (
            f"Nexus rejected the request: {reason}" if reason else "Nexus rejected the request as invalid (see its log)"
        )
    if code == "api_internal_error":
        return "Nexus failed to carry out the request (see its log)"
    meaning = {"api_conflict": "the request conflicts with the current state", "api_not_found": "not found"}
    message = meaning.get(code, f"Nexus answered HTTP {status}")
    return f"{message}: {reason}" if reason else message


def nexus_connection(
    session: ClientSession, url: str, trust: TrustDomains, *, retry_stale: bool = False
) -> BlockingConnection:
    """A kept-alive mTLS connection to Nexus, which must present Nexus's SPIFFE ID.

    By default a request is never sent twice: a write may have been carried out before the
    connection broke, so the caller hears that it broke (the write is in doubt) rather than
    "refused". Callers that only read (status) may allow one retry on a stale connection.
    """
    return session.connect(
        url,
        role_check(trust, Role.NEXUS),
        expected_peer=str(trust.id_of(Role.NEXUS)),
        max_response_bytes=MAX_ANSWER_BYTES,
        retry_stale=retry_stale,
        headers=((EXTENSIONS_HEADER, b"1"),),
    )


def fetch_status(nexus: BlockingConnection) -> StatusBody:
    status, body = nexus.post(STATUS_PATH)
    if status == 401:
        raise CommandError("Nexus refused this identity (HTTP 401): check the SVID and trust domain")
    if status != 200:
        raise CommandError(f"Nexus answered HTTP {status} to a status request")
    try:
        return decode(body, StatusBody)
    except RemoteProtocolError as exc:
        raise CommandError(f"Nexus sent an unreadable status: {exc}") from None


class NexusError(CommandError):
    def __init__(self, message: str, status: int, code: str, reason: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.reason = reason


class NexusClient:
    def __init__(self, url: str, svid: IdentitySpec, trust: TrustDomains, *, timeout: float = 10.0) -> None:
        self.url = url
        self._identity = identity_source(svid, trust).start()
        try:
            self._session = ClientSession(self._identity.client_context, timeout=timeout)
        except BaseException:
            self._identity.stop()
            raise
        self._nexus = nexus_connection(self._session, url, trust)

    def call(
        self,
        path: str,
        body: object,
        answer: type[T],
        *,
        action: str = "",
        not_found: str = "",
        conflict: str = "",
        write: bool = False,
    ) -> T:
        """POST `body` as JSON, decode the answer as `answer`; raise `NexusError` on any failure.

        `write`: the request changes something when it succeeds (a refusal then says nothing was changed).
        """
        target = f"{path}?action={action}" if action else path
        payload = body if isinstance(body, bytes) else msgspec.json.encode(body)
        raw = self._post(target, payload, "application/json", not_found=not_found, conflict=conflict, write=write)
        try:
            return decode(raw, answer)
        except RemoteProtocolError as exc:
            raise NexusError(f"Nexus sent an answer this spike cannot read: {exc}", 200, "") from None

    def call_bytes(self, path: str, data: bytes) -> bytes:
        """POST raw bytes (application/octet-stream) and return the raw answer."""
        return self._post(path, data, "application/octet-stream")

    def _post(
        self,
        target: str,
        payload: bytes,
        content_type: str,
        *,
        not_found: str = "",
        conflict: str = "",
        write: bool = False,
    ) -> bytes:
        try:
            status, raw = self._nexus.post(target, payload, content_type=content_type)
        except TransportError as exc:
            raise NexusError(f"Nexus at {self.url} is unreachable: {exc}", 0, "") from None
        if status != 200:
            code, reason = _error_code(raw)
            message = explain(status, code, reason, write=write, not_found=not_found, conflict=conflict)
            raise NexusError(message, status, code, reason)
        return raw

    def close(self) -> None:
        try:
            self._session.close()
        finally:
            self._identity.stop()

    def __enter__(self) -> NexusClient:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def error_reason(raw: bytes) -> str:
    """The reason an error answer gives people ("" if none): for callers that post without `NexusClient`."""
    return _error_code(raw)[1]


def _error_code(raw: bytes) -> tuple[str, str]:
    """The error code of an answer, and the reason Nexus gave (if any), on one line."""
    try:
        body = decode(raw, ErrorBody)
    except RemoteProtocolError:
        return "", ""
    return body.err, " ".join(body.reason.split())[:300]


class Empty(msgspec.Struct):
    """An answer whose body carries nothing we need."""
