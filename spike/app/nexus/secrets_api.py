"""The secrets routes of Nexus: SPIKE's shapes, with Vault KV v2's extras.

Reads are answered inline on a local database (a primary key lookup and one
decryption) and through a future on a remote one; writes return a future that
resolves once the commit holding them is durable.  Every failure is a code in
the body and a sentence in the log, never a value.  A database that cannot be
reached is 503 `state_not_ready` (its outage is logged once, by the backend).
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from spike.app.api.messages import (
    MetadataContent,
    SecretGetRequest,
    SecretGetResponse,
    SecretListRequest,
    SecretListResponse,
    SecretMetadataResponse,
    SecretMetadataUpdate,
    SecretPathRequest,
    SecretPutRequest,
    SecretPutResponse,
    SecretVersionsRequest,
    VersionMetadata,
)
from spike.app.model import kv
from spike.app.model.policy import Permission, reserved
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.list_cursor import CursorError, ListCursors
from spike.app.nexus.refusals import DATABASE_UNAVAILABLE
from spike.app.store.backend import SecretBackend
from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.app.store.sealing import DataKeyGone, TamperedData
from spike.protocol import api
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.errors import RemoteProtocolError
from spike.protocol.identity import SpiffeId
from spike.protocol.wire import ErrorCode, decode

log = logging.getLogger("spike.nexus.secrets")

MAX_LIST_LIMIT = 10_000
DEFAULT_LIST_LIMIT = 1000  # a page when `after` comes without `limit`
# Paths one list request looks at, at most (or `limit` + 1 if more): a caller that may see few of many
# paths gets a page that may be short, and a cursor that continues past the ones it may not see.
LIST_SCAN = 4096
# A caller that does not page (SPIKE's Go SDK sends `{}`) gets every key it may list in one answer, as from
# SPIKE, up to these bounds; beyond them a 400 tells it to page with `limit` and `after`.
UNPAGED_MAX_KEYS = 100_000
UNPAGED_MAX_SCAN = 1_000_000
CAS_MISMATCH = "check-and-set failed: the secret is not at the version given (cas)"
T = TypeVar("T")
Reply = ApiResponse | Future[ApiResponse]


def _iso(moment: float | None) -> str | None:
    if moment is None:
        return None
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat().replace("+00:00", "Z")


def error_response(exc: BaseException, what: str, logger: logging.Logger = log) -> ApiResponse:
    """Map a failure to its API answer, with a reason for the caller where the cause is the request itself.

    A reason names only what the caller sent or may already know (the path it asked for, after its
    permission on that path was checked): never a value, never internals.  What the caller is not
    told goes to `logger` (each API logs under its own name).
    """
    if isinstance(exc, kv.CasMismatch):
        logger.info("%s: %s", what, exc)
        # The current version stays in the log: a writer may not be a reader.
        return ApiResponse.error(exc.status, ErrorCode(exc.code), reason=CAS_MISMATCH)
    if isinstance(exc, kv.KvError):
        logger.info("%s: %s", what, exc)
        return ApiResponse.error(exc.status, ErrorCode(exc.code), reason=str(exc)[:500])
    if isinstance(exc, RemoteProtocolError):
        logger.info("%s: %s", what, exc)
        return ApiResponse.error(400, ErrorCode.BAD_REQUEST, reason=str(exc)[:500])
    if isinstance(exc, TamperedData):
        logger.error("%s: REFUSED TAMPERED DATA: %s", what, exc)
        return api.INTERNAL_ERROR
    if isinstance(exc, DataKeyGone):
        # Not tampering: the value is stored under a key that no longer exists.  The caller asked for it by
        # name, so the reason names nothing it does not know.
        logger.warning("%s: %s", what, exc)
        return ApiResponse.error(409, ErrorCode.CONFLICT, reason=str(exc)[:500])
    if isinstance(exc, DatabaseUnavailable):
        logger.debug("%s: %s", what, exc)  # the outage itself is logged once, when it starts
        return DATABASE_UNAVAILABLE
    if isinstance(exc, StorageError):
        logger.error("%s: %s", what, exc)
        return api.INTERNAL_ERROR
    logger.error("%s: unexpected %s", what, exc.__class__.__name__, exc_info=exc)
    return api.INTERNAL_ERROR


def when_done(
    future: Future[T], answer: Callable[[T], ApiResponse], what: str, logger: logging.Logger = log
) -> Future[ApiResponse]:
    """A future of the API answer for a future store result."""
    reply: Future[ApiResponse] = Future()

    def done(source: Future[T]) -> None:
        failure = source.exception()
        reply.set_result(answer(source.result()) if failure is None else error_response(failure, what, logger))

    future.add_done_callback(done)
    return reply


def read_reply(
    store: SecretBackend,
    call: Callable[[], T],
    answer: Callable[[T], ApiResponse],
    what: str,
    logger: logging.Logger = log,
    *,
    at_once: Callable[[], T | None] | None = None,
) -> Reply:
    """Answer from a read: inline on a local database, through a future on a remote one (unless `at_once`
    answers from memory first: the read cache)."""
    if store.inline_reads:
        return answer(call())
    if at_once is not None and (found := at_once()) is not None:
        return answer(found)
    return when_done(store.read(call), answer, what, logger)


class Forbidden(kv.KvError):
    status = 401
    code = "access_unauthorized"


Handler = Callable[[ApiRequest], Reply]


class SecretsApi:
    """Each handler decodes its body, checks the caller's permission on that path, then acts."""

    def __init__(self, store: SecretBackend, authorizer: Authorizer) -> None:
        self._store = store
        self._authorizer = authorizer
        self._cursors = ListCursors(store)

    def _guarded(
        self, handler: Callable[..., Reply], kind: type[Any], what: str, permission: Permission
    ) -> tuple[Handler, Permission]:
        authorizer = self._authorizer

        def run(request: ApiRequest) -> Reply:
            try:
                body = decode(request.body, kind)
                path = getattr(body, "path", None)
                if path is not None:
                    path = kv.check_spike_path(path)
                    if reserved(path):
                        raise kv.InvalidRequest("paths under spike/ are reserved for the system")
                    if not authorizer.allows(request.peer, permission, path):
                        raise Forbidden(f"{request.peer} may not {permission.value} {path}")
                    return handler(body)
                return handler(body, request.peer)
            except (kv.KvError, RemoteProtocolError, TamperedData, DataKeyGone, StorageError) as exc:
                return error_response(exc, what)

        return run, permission

    def handlers(self) -> dict[str, tuple[Handler, Permission]]:
        """action -> (handler, permission it needs) for SECRETS_PATH ('' is put, as in SPIKE)."""
        return {
            "": self._guarded(self.put, SecretPutRequest, "put", Permission.WRITE),
            "get": self._guarded(self.get, SecretGetRequest, "get", Permission.READ),
            "delete": self._guarded(self.delete, SecretVersionsRequest, "delete", Permission.WRITE),
            "undelete": self._guarded(self.undelete, SecretVersionsRequest, "undelete", Permission.WRITE),
            "destroy": self._guarded(self.destroy, SecretVersionsRequest, "destroy", Permission.WRITE),
            "list": self._guarded(self.list, SecretListRequest, "list", Permission.LIST),
        }

    def metadata_handlers(self) -> dict[str, tuple[Handler, Permission]]:
        """action -> (handler, permission it needs) for SECRETS_METADATA_PATH."""
        return {
            "get": self._guarded(self.metadata_get, SecretGetRequest, "metadata get", Permission.READ),
            "put": self._guarded(self.metadata_put, SecretMetadataUpdate, "metadata put", Permission.WRITE),
            "delete": self._guarded(self.metadata_delete, SecretPathRequest, "metadata delete", Permission.WRITE),
        }

    # ------------------------------------------------------------------ data

    def put(self, body: SecretPutRequest) -> Reply:
        path = kv.check_spike_path(body.path)
        values = kv.check_values(body.values)
        if body.cas is not None:
            kv.check_version(body.cas)
        future = self._store.put(path, values, body.cas)
        return when_done(future, lambda version: ApiResponse.json(SecretPutResponse(version=version)), "put")

    def get(self, body: SecretGetRequest) -> Reply:
        path, version = kv.check_spike_path(body.path), kv.check_version(body.version)

        def answer(found: tuple[int, dict[str, str]]) -> ApiResponse:
            return ApiResponse.json(SecretGetResponse(data=found[1], version=found[0]))

        store = self._store
        return read_reply(
            store, lambda: store.get(path, version), answer, "get", at_once=lambda: store.cached_get(path, version)
        )

    def delete(self, body: SecretVersionsRequest) -> Reply:
        return self._versions(self._store.delete, body, "delete")

    def undelete(self, body: SecretVersionsRequest) -> Reply:
        return self._versions(self._store.undelete, body, "undelete")

    def destroy(self, body: SecretVersionsRequest) -> Reply:
        return self._versions(self._store.destroy, body, "destroy")

    def _versions(
        self, action: Callable[[str, list[int]], Future[None]], body: SecretVersionsRequest, what: str
    ) -> Reply:
        future = action(kv.check_spike_path(body.path), kv.check_versions(body.versions, zero_is_current=True))
        return when_done(future, lambda _: api.OK_EMPTY, what)

    def list(self, body: SecretListRequest, caller: SpiffeId | None) -> Reply:
        """A page of the paths under `prefix` that `caller` may list, and a cursor that reveals nothing else.

        The cursor (`next_after`) is the last path of the page when the page is
        full; when the scan of `LIST_SCAN` paths ended first, it is an opaque
        token (`list_cursor`) standing for where the scan stopped, so paging
        always moves forward without naming a path the caller may not see.
        """
        prefix = kv.check_spike_prefix(body.prefix)
        if body.limit is None and not body.after:
            return self._list_all(prefix, caller)
        limit = DEFAULT_LIST_LIMIT if body.limit is None else body.limit
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise kv.InvalidRequest(f"limit must be between 1 and {MAX_LIST_LIMIT}")
        visible = self._authorizer.lister(caller)  # bound to the policies in force now, on this thread
        if body.after and not self._cursors.is_token(body.after):
            kv.check_spike_path(body.after)
        try:
            after = self._cursors.open(body.after, caller, prefix) if body.after else ""
        except CursorError as exc:
            raise kv.InvalidRequest(str(exc)) from None
        scan = limit + 1 if visible.everything else max(limit + 1, LIST_SCAN)

        def page() -> SecretListResponse:
            scanned = self._store.list_paths(prefix, limit=scan, after=after)
            keys = scanned if visible.everything else [k for k in scanned if visible(k)]
            if len(keys) > limit:
                return SecretListResponse(keys=keys[:limit], next_after=keys[limit - 1])
            if len(scanned) < scan:
                return SecretListResponse(keys=keys, next_after=None)  # the end of the prefix
            # The scan ended before the page filled: continue from where it stopped, without naming it.
            return SecretListResponse(keys=keys, next_after=self._cursors.token(scanned[-1], caller, prefix))

        return read_reply(self._store, page, ApiResponse.json, "list")

    def _list_all(self, prefix: str, caller: SpiffeId | None) -> Reply:
        """Every path under `prefix` that `caller` may list, in one answer with no cursor (SPIKE's `list`).

        Read in scans of `LIST_SCAN` paths; more than `UNPAGED_MAX_KEYS` keys to answer, or more than
        `UNPAGED_MAX_SCAN` paths to look at, is refused (400, nothing is half answered): page instead.
        """
        visible = self._authorizer.lister(caller)

        def everything() -> SecretListResponse:
            keys: list[str] = []
            after, scanned = "", 0
            while True:
                batch = self._store.list_paths(prefix, limit=LIST_SCAN, after=after)
                scanned += len(batch)
                keys.extend(batch if visible.everything else (k for k in batch if visible(k)))
                if len(keys) > UNPAGED_MAX_KEYS or (scanned >= UNPAGED_MAX_SCAN and len(batch) == LIST_SCAN):
                    raise kv.InvalidRequest(
                        f"more than {UNPAGED_MAX_KEYS} keys (or {UNPAGED_MAX_SCAN} paths) to list at once: "
                        "page with `limit` and `after` (spike secret list --limit N --after PATH)"
                    )
                if len(batch) < LIST_SCAN:
                    return SecretListResponse(keys=keys)
                after = batch[-1]

        return read_reply(self._store, everything, ApiResponse.json, "list")

    # ------------------------------------------------------------------ metadata

    def metadata_get(self, body: SecretGetRequest) -> Reply:
        path, version = kv.check_spike_path(body.path), kv.check_version(body.version)
        return read_reply(self._store, lambda: self._metadata(path, version), ApiResponse.json, "metadata get")

    def _metadata(self, path: str, version: int) -> SecretMetadataResponse:
        meta, versions = self._store.metadata(path)
        wanted = [v for v in versions if version in (0, v.version)]
        if version and not wanted:
            raise kv.NotFound("no such version")
        return SecretMetadataResponse(
            versions={
                v.version: VersionMetadata(
                    createdTime=_iso(v.created_at) or "",
                    version=v.version,
                    deletedTime=_iso(v.deleted_at),
                    destroyed=v.destroyed,
                    unreadable=v.unreadable,
                )
                for v in wanted
            },
            metadata=MetadataContent(
                currentVersion=meta.current_version,
                oldestVersion=meta.oldest_version,
                createdTime=_iso(meta.created_at) or "",
                updatedTime=_iso(meta.updated_at) or "",
                maxVersions=meta.effective_max_versions(self._store.default_max_versions),
                casRequired=meta.cas_required,
                customMetadata=meta.custom_metadata,
                customMetadataUnreadable=meta.custom_unreadable,
            ),
        )

    def metadata_put(self, body: SecretMetadataUpdate) -> Reply:
        path = kv.check_spike_path(body.path)
        if body.max_versions is not None:
            kv.check_max_versions(body.max_versions)
        if body.custom_metadata is not None:
            kv.check_custom_metadata(body.custom_metadata)
        future = self._store.update_metadata(
            path,
            max_versions=body.max_versions,
            cas_required=body.cas_required,
            custom_metadata=body.custom_metadata,
        )
        return when_done(future, lambda _: api.OK_EMPTY, "metadata put")

    def metadata_delete(self, body: SecretPathRequest) -> Reply:
        future = self._store.delete_all(kv.check_spike_path(body.path))
        return when_done(future, lambda _: api.OK_EMPTY, "metadata delete")
