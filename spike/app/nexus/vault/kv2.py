"""Vault's KV version 2 secrets engine, at one mount, over spike's secret store.

Every path of the engine (``data``, ``metadata``, ``delete``, ``undelete``,
``destroy``, ``subkeys``, ``config``) is answered with Vault's shapes, texts and
status codes.  The secrets are the ones the SPIKE-style API serves (one store),
and the same policies decide: reading a version or its subkeys or metadata needs
``read`` on the secret's path, every change needs ``write``, a listing shows the
paths the caller may ``list``.

Where spike's store cannot do what Vault does, the answer is a 400 saying so,
and nothing is written: values are strings (Vault takes any JSON), paths and
key names use spike's characters, versions never expire by themselves
(``delete_version_after``), and the mount's own settings (``config``) are fixed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from spike.app.model import kv
from spike.app.model.policy import Permission, reserved
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.vault import envelope
from spike.app.nexus.vault.replies import CAS_MISMATCH, Reply, failure, read, settle, timestamp
from spike.app.nexus.vault.request import (
    MERGE_PATCH,
    BadRequest,
    Operation,
    VaultRequest,
    parse_bool,
    parse_duration,
    parse_int,
)
from spike.app.store.backend import SecretBackend
from spike.protocol.api import ApiResponse

# A version's metadata and its values (None when the version is deleted or destroyed).
Found = tuple[kv.SecretMeta, kv.VersionInfo, dict[str, str] | None]


LIST_PAGE = 256
LIST_SCAN_LIMIT = 20_000  # paths one LIST looks at, at most, for a caller that may list only some of them
# Greater than every character a secret path may hold: "<folder>/" + this sorts after all paths under it.
AFTER_FOLDER = "\x7f"
INVALID_PATH = (
    "Invalid path for a versioned K/V secrets engine. See the API docs for the appropriate API endpoints to use. "
    "If using the Vault CLI, use 'vault kv get' for this operation."
)
NOT_STRINGS = "spike keeps string values only: the value of {key!r} is not a string"
FIXED_CONFIG = (
    "spike does not change mount-wide KV settings: set max_versions and cas_required on each secret "
    "(metadata); versions never expire by themselves (delete_version_after 0)"
)

Handler = Callable[[VaultRequest, str], Reply]


def _version_view(meta: kv.SecretMeta, info: kv.VersionInfo) -> dict[str, Any]:
    return {
        "created_time": timestamp(info.created_at),
        "custom_metadata": meta.custom_metadata or None,
        "deletion_time": timestamp(info.deleted_at),
        "destroyed": info.destroyed,
        "version": info.version,
    }


def _secret_path(path: str) -> str:
    path = kv.check_path(path)
    if reserved(path):
        raise kv.InvalidRequest("paths under spike/ are reserved for the system")
    return path


def _versions(body: dict[str, Any], missing: str) -> list[int]:
    raw = body.get("versions")
    if isinstance(raw, str):  # Vault takes "1,2" as well as [1, 2]
        raw = [part for part in raw.split(",") if part.strip()]
    if raw is None or raw == []:
        raise BadRequest(missing)
    if not isinstance(raw, list):
        raw = [raw]
    return kv.check_versions([parse_int(v, "versions") for v in raw])


def _cas(body: dict[str, Any]) -> int | None:
    options = body.get("options")
    if options is not None and not isinstance(options, dict):
        raise BadRequest('error converting input for field "options": expected a map')
    if options is None or "cas" not in options:
        return None
    try:
        cas = parse_int(options["cas"], "cas")
    except BadRequest:
        raise BadRequest("error parsing check-and-set parameter") from None
    if not 0 <= cas <= kv.MAX_VERSION:
        raise BadRequest(CAS_MISMATCH)
    return cas


def _string_values(data: Any) -> dict[str, str]:
    if not isinstance(data, dict):
        raise BadRequest("no data provided")
    for key, value in data.items():
        if not isinstance(value, str):
            raise BadRequest(NOT_STRINGS.format(key=key))
    return kv.check_values(data)


class KvV2:
    """One KV v2 mount: `handle(request, rest)` answers everything under ``<mount>/``."""

    def __init__(self, mount: str, store: SecretBackend, authorizer: Authorizer) -> None:
        self.mount = mount
        self._store = store
        self._authorizer = authorizer
        self._routes: dict[str, dict[Operation, Handler]] = {
            "data": {
                Operation.READ: self.read,
                Operation.UPDATE: self.write,
                Operation.PATCH: self.patch,
                Operation.DELETE: self.delete_latest,
            },
            "metadata": {
                Operation.READ: self.metadata_read,
                Operation.LIST: self.list,
                Operation.UPDATE: self.metadata_write,
                Operation.PATCH: self.metadata_patch,
                Operation.DELETE: self.metadata_delete,
            },
            "delete": {Operation.UPDATE: self.delete_versions},
            "undelete": {Operation.UPDATE: self.undelete_versions},
            "destroy": {Operation.UPDATE: self.destroy_versions},
            "subkeys": {Operation.READ: self.subkeys},
        }

    def info(self) -> dict[str, Any]:
        """What `sys/internal/ui/mounts` says of this mount (the CLIs ask it which KV version it is)."""
        return {
            "path": f"{self.mount}/",
            "type": "kv",
            "description": "spike's secrets (KV version 2)",
            "options": {"version": "2"},
            "config": {"default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": False},
            "local": False,
            "seal_wrap": False,
            "external_entropy_access": False,
            "accessor": f"kv_{self.mount}",
            "uuid": "",
            "plugin_version": "",
            "running_plugin_version": "",
            "running_sha256": "",
        }

    def handle(self, request: VaultRequest, rest: str) -> Reply:
        operation = request.operation
        if rest == "config":
            return self.config(request)
        kind, slash, path = rest.partition("/")
        routes = self._routes.get(kind)
        if routes is None or (not slash and kind != "metadata"):
            return envelope.ok(None, warnings=[INVALID_PATH], status=404)
        if operation is None or operation not in routes:
            return envelope.UNSUPPORTED_OPERATION
        if operation is not Operation.LIST and (path == "" or path.endswith("/")):
            return envelope.NOT_FOUND  # Vault's patterns want a secret name: a folder is no secret
        try:
            if operation is Operation.PATCH and request.raw.content_type != MERGE_PATCH:
                return envelope.errors(
                    415, f"PATCH requires Content-Type of {MERGE_PATCH}, provided {request.raw.content_type}"
                )
            return routes[operation](request, path)
        except (kv.KvError, BadRequest) as exc:
            return failure(exc, f"{kind} {operation.value}")

    def _allowed(self, request: VaultRequest, permission: Permission, path: str) -> bool:
        return self._authorizer.allows(request.peer, permission, path)

    # ------------------------------------------------------------------ data

    def read(self, request: VaultRequest, path: str) -> Reply:
        path = _secret_path(path)
        if not self._allowed(request, Permission.READ, path):
            return envelope.PERMISSION_DENIED
        wanted = parse_int(request.query.get("version", "0") or "0", "version")
        store = self._store

        def find() -> Found:
            return _find_version(store, path, wanted)

        def answer(found: Found) -> ApiResponse:
            meta, info, values = found
            body = {"data": values, "metadata": _version_view(meta, info)}
            return envelope.ok(body, status=404 if values is None else 200)

        return read(store, find, answer, "data read")

    def write(self, request: VaultRequest, path: str) -> Reply:
        path = _secret_path(path)
        if not self._allowed(request, Permission.WRITE, path):
            return envelope.PERMISSION_DENIED
        body = request.body()
        if "data" not in body:
            raise BadRequest("no data provided")
        values = _string_values(body["data"])
        cas = _cas(body)
        return self._put(path, values, cas, "data write")

    def _put(self, path: str, values: dict[str, str], cas: int | None, what: str) -> Reply:
        store = self._store

        def written(version: int) -> Reply:
            def view() -> tuple[kv.SecretMeta, list[kv.VersionInfo]]:
                return store.metadata(path)

            def answer(found: tuple[kv.SecretMeta, list[kv.VersionInfo]]) -> ApiResponse:
                meta, versions = found
                info = next((v for v in versions if v.version == version), None)
                if info is None:  # already pruned or purged by a later write: what was written stands
                    info = kv.VersionInfo(version, time.time())
                return envelope.ok(_version_view(meta, info))

            return read(store, view, answer, what)

        return settle(store.put(path, values, cas), written, what)

    def patch(self, request: VaultRequest, path: str) -> Reply:
        path = _secret_path(path)
        if not self._allowed(request, Permission.WRITE, path):
            return envelope.PERMISSION_DENIED
        body = request.body()
        if "data" not in body or not isinstance(body["data"], dict):
            raise BadRequest("no data provided")
        changes: dict[str, Any] = body["data"]
        for key, value in changes.items():
            if value is not None and not isinstance(value, str):
                raise BadRequest(NOT_STRINGS.format(key=key))
        cas = _cas(body)
        store = self._store

        def current() -> tuple[kv.SecretMeta, kv.VersionInfo, dict[str, str] | None] | None:
            try:
                meta, versions = store.metadata(path)
            except kv.NotFound:
                return None
            info = next((v for v in versions if v.version == meta.current_version), None)
            if info is None:
                return None
            if not info.readable:
                return meta, info, None
            return meta, info, store.get(path, info.version)[1]

        def apply(found: Found | None) -> Reply:
            if found is None:
                return _NOT_FOUND_NO_BODY  # as Vault: a bare 404 for nothing to patch
            meta, info, values = found
            if cas is None and meta.cas_required:
                return envelope.errors(400, "check-and-set parameter required for this call")
            if cas is not None and cas != meta.current_version:
                return envelope.errors(400, CAS_MISMATCH)
            if values is None:
                return envelope.ok(_version_view(meta, info), status=404)
            merged = {k: v for k, v in values.items() if k not in changes}
            merged.update({k: v for k, v in changes.items() if v is not None})
            # The version read is the check-and-set: a write that came in between wins, this one is refused.
            return self._put(path, kv.check_values(merged), meta.current_version, "data patch")

        return read(store, current, apply, "data patch")

    def delete_latest(self, request: VaultRequest, path: str) -> Reply:
        path = _secret_path(path)
        if not self._allowed(request, Permission.WRITE, path):
            return envelope.PERMISSION_DENIED
        return self._mark(self._store.delete, path, [], "data delete")

    def delete_versions(self, request: VaultRequest, path: str) -> Reply:
        return self._versions_op(request, path, self._store.delete, "No version number provided", "delete")

    def undelete_versions(self, request: VaultRequest, path: str) -> Reply:
        return self._versions_op(request, path, self._store.undelete, "No version number provided", "undelete")

    def destroy_versions(self, request: VaultRequest, path: str) -> Reply:
        return self._versions_op(request, path, self._store.destroy, "no version number provided", "destroy")

    def _versions_op(
        self,
        request: VaultRequest,
        path: str,
        action: Callable[[str, list[int]], Future[None]],
        missing: str,
        what: str,
    ) -> Reply:
        path = _secret_path(path)
        if not self._allowed(request, Permission.WRITE, path):
            return envelope.PERMISSION_DENIED
        return self._mark(action, path, _versions(request.body(), missing), what)

    def _mark(
        self, action: Callable[[str, list[int]], Future[None]], path: str, versions: list[int], what: str
    ) -> Reply:
        reply: Future[ApiResponse] = Future()

        def done(source: Future[None]) -> None:
            error = source.exception()
            # As Vault: no such secret (or version) is not an error for these, there is just nothing to do.
            if error is None or isinstance(error, kv.NotFound):
                reply.set_result(envelope.NO_CONTENT)
            else:
                reply.set_result(failure(error, what))

        action(path, versions).add_done_callback(done)
        return reply

    def subkeys(self, request: VaultRequest, path: str) -> Reply:
        path = _secret_path(path)
        if not self._allowed(request, Permission.READ, path):
            return envelope.PERMISSION_DENIED
        wanted = parse_int(request.query.get("version", "0") or "0", "version")
        parse_int(request.query.get("depth", "0") or "0", "depth")  # values are strings: every depth is 1
        store = self._store

        def find() -> Found:
            return _find_version(store, path, wanted)

        def answer(found: Found) -> ApiResponse:
            meta, info, values = found
            subkeys = None if values is None else dict.fromkeys(values)
            body = {"metadata": _version_view(meta, info), "subkeys": subkeys}
            return envelope.ok(body, status=404 if values is None else 200)

        return read(store, find, answer, "subkeys")

    # ------------------------------------------------------------------ metadata

    def metadata_read(self, request: VaultRequest, path: str) -> Reply:
        path = _secret_path(path)
        if not self._allowed(request, Permission.READ, path):
            return envelope.PERMISSION_DENIED
        store = self._store

        def answer(found: tuple[kv.SecretMeta, list[kv.VersionInfo]]) -> ApiResponse:
            meta, versions = found
            return envelope.ok(
                {
                    "cas_required": meta.cas_required,
                    "created_time": timestamp(meta.created_at),
                    "current_version": meta.current_version,
                    "custom_metadata": meta.custom_metadata or None,
                    "delete_version_after": "0s",
                    "max_versions": meta.max_versions,
                    "oldest_version": meta.oldest_version,
                    "updated_time": timestamp(meta.updated_at),
                    "versions": {
                        str(v.version): {
                            "created_time": timestamp(v.created_at),
                            "deletion_time": timestamp(v.deleted_at),
                            "destroyed": v.destroyed,
                        }
                        for v in versions
                    },
                }
            )

        return read(store, lambda: store.metadata(path), answer, "metadata read")

    def _settings(self, body: dict[str, Any]) -> tuple[int | None, bool | None, dict[str, str] | None]:
        max_versions = None
        if "max_versions" in body:
            max_versions = kv.check_max_versions(parse_int(body["max_versions"], "max_versions"))
        cas_required = parse_bool(body["cas_required"], "cas_required") if "cas_required" in body else None
        if "delete_version_after" in body and parse_duration(body["delete_version_after"], "delete_version_after"):
            raise BadRequest("spike does not expire versions by themselves: delete_version_after must be 0")
        custom = None
        if "custom_metadata" in body:
            raw = body["custom_metadata"]
            if raw is not None and not isinstance(raw, dict):
                raise BadRequest("custom_metadata validation failed: it must be a map of strings")
            custom = self._custom(raw or {})
        return max_versions, cas_required, custom

    @staticmethod
    def _custom(raw: dict[str, Any]) -> dict[str, str]:
        custom: dict[str, str] = {}
        for key, value in raw.items():
            if not isinstance(value, str | int | float) or isinstance(value, bool) or value == "":
                raise BadRequest(f"custom_metadata validation failed: the value of {key!r} must be a non-empty string")
            custom[key] = str(value)
        return kv.check_custom_metadata(custom)

    def metadata_write(self, request: VaultRequest, path: str) -> Reply:
        path = _secret_path(path)
        if not self._allowed(request, Permission.WRITE, path):
            return envelope.PERMISSION_DENIED
        body = request.body()
        if not any(k in body for k in ("max_versions", "cas_required", "delete_version_after", "custom_metadata")):
            return envelope.NO_CONTENT  # as Vault: nothing asked, nothing done
        max_versions, cas_required, custom = self._settings(body)
        future = self._store.update_metadata(
            path, max_versions=max_versions, cas_required=cas_required, custom_metadata=custom
        )
        return settle(future, lambda _: envelope.NO_CONTENT, "metadata write")

    def metadata_patch(self, request: VaultRequest, path: str) -> Reply:
        path = _secret_path(path)
        if not self._allowed(request, Permission.WRITE, path):
            return envelope.PERMISSION_DENIED
        body = request.body()
        patch_custom = body.pop("custom_metadata", None)
        if patch_custom is not None and not isinstance(patch_custom, dict):
            raise BadRequest("custom_metadata validation failed: it must be a map of strings")
        max_versions, cas_required, _ = self._settings(body)
        store = self._store

        def apply(found: tuple[kv.SecretMeta, list[kv.VersionInfo]] | None) -> Reply:
            if found is None:
                return _NOT_FOUND_NO_BODY  # as Vault: a bare 404 for nothing to patch
            meta = found[0]
            custom = None
            if patch_custom is not None:
                merged: dict[str, Any] = dict(meta.custom_metadata)
                for key, value in patch_custom.items():
                    if value is None:
                        merged.pop(key, None)
                    else:
                        merged[key] = value
                custom = self._custom(merged)
            future = store.update_metadata(
                path, max_versions=max_versions, cas_required=cas_required, custom_metadata=custom
            )
            return settle(future, lambda _: envelope.NO_CONTENT, "metadata patch")

        def find() -> tuple[kv.SecretMeta, list[kv.VersionInfo]] | None:
            try:
                return store.metadata(path)
            except kv.NotFound:
                return None

        return read(store, find, apply, "metadata patch")

    def metadata_delete(self, request: VaultRequest, path: str) -> Reply:
        path = _secret_path(path)
        if not self._allowed(request, Permission.WRITE, path):
            return envelope.PERMISSION_DENIED
        return self._mark(lambda p, _: self._store.delete_all(p), path, [], "metadata delete")

    def list(self, request: VaultRequest, path: str) -> Reply:
        folder = kv.check_prefix(path)
        if folder and not folder.endswith("/"):
            folder += "/"
        if reserved(folder.rstrip("/")) if folder else False:
            raise kv.InvalidRequest("paths under spike/ are reserved for the system")
        if not self._authorizer.may_ever(request.peer, Permission.LIST):
            return envelope.PERMISSION_DENIED
        visible = self._authorizer.lister(request.peer)
        store = self._store

        def children() -> tuple[list[str], bool]:
            keys: list[str] = []
            after, scanned = "", 0
            while scanned < LIST_SCAN_LIMIT:
                page = store.list_paths(folder, limit=LIST_PAGE, after=after)
                scanned += len(page)
                skipped = False
                for found in page:
                    name, slash, _ = found[len(folder) :].partition("/")
                    after = found
                    if not visible(found):
                        continue
                    if slash:  # a folder: named once, then every path under it is skipped
                        keys.append(name + "/")
                        after = folder + name + "/" + AFTER_FOLDER
                        skipped = True
                        break
                    keys.append(name)
                if not skipped and len(page) < LIST_PAGE:
                    return keys, True
            return keys, False

        def answer(found: tuple[list[str], bool]) -> ApiResponse:
            keys, complete = found
            if not keys:
                return envelope.NOT_FOUND
            warnings = None if complete else [f"the listing stopped after looking at {LIST_SCAN_LIMIT} paths"]
            return envelope.ok({"keys": keys}, warnings=warnings)

        return read(store, children, answer, "metadata list")

    # ------------------------------------------------------------------ config

    def config(self, request: VaultRequest) -> Reply:
        operation = request.operation
        default = self._store.default_max_versions
        shown = 0 if default == kv.DEFAULT_MAX_VERSIONS else default
        if operation is Operation.READ:
            if not self._authorizer.may_ever(request.peer, Permission.READ):
                return envelope.PERMISSION_DENIED
            return envelope.ok({"cas_required": False, "delete_version_after": "0s", "max_versions": shown})
        if operation is not Operation.UPDATE:
            return envelope.UNSUPPORTED_OPERATION
        if not self._authorizer.may_ever(request.peer, Permission.WRITE):
            return envelope.PERMISSION_DENIED
        try:
            body = request.body()
            unchanged = (
                parse_int(body.get("max_versions", shown), "max_versions") in (0, default)
                and not parse_bool(body.get("cas_required", False), "cas_required")
                and parse_duration(body.get("delete_version_after", 0), "delete_version_after") == 0
            )
        except BadRequest as exc:
            return failure(exc, "config write")
        return envelope.NO_CONTENT if unchanged else envelope.errors(400, FIXED_CONFIG)


_NOT_FOUND_NO_BODY = ApiResponse(404, b"")


def _find_version(store: SecretBackend, path: str, wanted: int) -> Found:
    """Version `wanted` of `path` (0: the current one), as `data/` and `subkeys/` read it."""
    meta, versions = store.metadata(path)
    number = wanted if wanted > 0 else meta.current_version
    info = next((v for v in versions if v.version == number), None)
    if info is None:
        raise kv.NotFound("no such version")
    return meta, info, store.get(path, number)[1] if info.readable else None
