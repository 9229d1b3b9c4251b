"""The policy routes (SPIKE's /v1/acl/policy): create or replace, read, list, delete."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any

from spike.app.api.messages import (
    PolicyBody,
    PolicyIdRequest,
    PolicyListItem,
    PolicyListRequest,
    PolicyListResponse,
    PolicyPutRequest,
    PolicyPutResponse,
)
from spike.app.model import kv
from spike.app.model.policy import Policy, check_policy_fields
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.secrets_api import Reply, error_response, read_reply, when_done
from spike.app.store.errors import StorageError
from spike.app.store.policies import PolicyStore
from spike.app.store.sealing import DataKeyGone, TamperedData
from spike.protocol import api
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.errors import RemoteProtocolError
from spike.protocol.wire import decode

log = logging.getLogger("spike.nexus.policy")


def _iso(moment: float) -> str:
    return dt.datetime.fromtimestamp(moment, dt.UTC).isoformat().replace("+00:00", "Z")


def policy_body(policy: Policy) -> PolicyBody:
    return PolicyBody(
        id=policy.id,
        name=policy.name,
        spiffeidPattern=policy.spiffe_id_pattern,
        spiffiedPattern=policy.spiffe_id_pattern,
        pathPattern=policy.path_pattern,
        permissions=sorted(p.value for p in policy.permissions),
        createdAt=_iso(policy.created_at),
        updatedAt=_iso(policy.updated_at),
    )


class PolicyApi:
    def __init__(self, store: PolicyStore, authorizer: Authorizer) -> None:
        self._store = store
        self._authorizer = authorizer

    def handlers(self) -> dict[str, Callable[[ApiRequest], Reply]]:
        return {
            "": self._run(self.put, PolicyPutRequest, "policy put"),
            "get": self._run(self.get, PolicyIdRequest, "policy get"),
            "list": self._run(self.list, PolicyListRequest, "policy list"),
            "delete": self._run(self.delete, PolicyIdRequest, "policy delete"),
        }

    def _run(self, handler: Callable[[Any], Reply], kind: type[Any], what: str) -> Callable[[ApiRequest], Reply]:
        def run(request: ApiRequest) -> Reply:
            try:
                return handler(decode(request.body, kind))
            except (kv.KvError, RemoteProtocolError, TamperedData, DataKeyGone, StorageError) as exc:
                # What is wrong with the policy written (a pattern RE2 refuses, a reserved path reached by
                # substring) is the writer's to fix: said in the answer's reason, as SPIKE says it in its error.
                return error_response(exc, what, log)

        return run

    def _changed(self, future: Future[Any]) -> None:
        # Registered before the reply's callback: the caller's next request sees the change.
        future.add_done_callback(lambda _: self._authorizer.invalidate())

    def put(self, body: PolicyPutRequest) -> Reply:
        permissions = check_policy_fields(body.name, body.spiffeidPattern, body.pathPattern, body.permissions)
        future = self._store.put(
            body.name, body.spiffeidPattern, body.pathPattern, permissions, create_only=body.createOnly
        )
        self._changed(future)

        def answer(result: tuple[str, bool]) -> ApiResponse:
            policy_id, created = result
            log.info("policy %s %s", body.name, "created" if created else "replaced", extra={"event": "policy_put"})
            return ApiResponse.json(PolicyPutResponse(id=policy_id, created=created))

        return when_done(future, answer, "policy put", log)

    def get(self, body: PolicyIdRequest) -> Reply:
        store = self._store
        return read_reply(store.backend, lambda: policy_body(store.get(body.id)), ApiResponse.json, "policy get", log)

    def list(self, body: PolicyListRequest) -> Reply:
        return read_reply(self._store.backend, lambda: self._list(body), ApiResponse.json, "policy list", log)

    def _list(self, body: PolicyListRequest) -> PolicyListResponse:
        if not body.spiffeidPattern and not body.pathPattern:
            # Ids and names are stored in clear: every policy is listed, even one that no longer opens.
            return PolicyListResponse(policies=[PolicyListItem(id=i, name=n) for i, n in self._store.list()])
        items = [
            PolicyListItem(id=p.id, name=p.name)
            for p in self._store.load_all()
            if (not body.spiffeidPattern or p.spiffe_id_pattern == body.spiffeidPattern)
            and (not body.pathPattern or p.path_pattern == body.pathPattern)
        ]
        return PolicyListResponse(policies=items)

    def delete(self, body: PolicyIdRequest) -> Reply:
        future = self._store.delete(body.id)
        self._changed(future)
        return when_done(future, lambda _: api.OK_EMPTY, "policy delete", log)
