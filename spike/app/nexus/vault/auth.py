"""Vault's cert auth method and the token's own routes.

`POST auth/cert/login`: the client certificate (the caller's X.509 SVID, already
verified by TLS) is the credential; the answer is a short-lived token bound to
its SPIFFE ID (tokens.py).  spike has no cert roles: the policies whose SPIFFE
ID pattern matches the caller are its policies, and an identity that no policy
names (or one of spike's own components) is refused as Vault refuses a
certificate no role accepts.  `auth/token/lookup-self`, `renew-self` and
`revoke-self` act on the token sent, on a connection of the identity it was
issued to.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from spike.app.model.policy import Permission
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.vault import envelope
from spike.app.nexus.vault.replies import timestamp
from spike.app.nexus.vault.request import BadRequest, Operation, VaultRequest, parse_duration
from spike.app.nexus.vault.tokens import Token, TokenStore, TooManyTokens
from spike.app.store.errors import DatabaseUnavailable, StorageError
from spike.protocol.api import ApiResponse
from spike.protocol.identity import SpiffeId

SUPERUSER_POLICY = "spike-pilot-superuser"
ANY_PERMISSION = (Permission.READ, Permission.WRITE, Permission.LIST, Permission.EXECUTE)
NO_ROLES = 'spike has no cert roles: "name" is ignored, the policies matching the caller\'s SPIFFE ID apply'


class CertAuth:
    def __init__(self, tokens: TokenStore, authorizer: Authorizer, clock: Callable[[], float]) -> None:
        self._tokens = tokens
        self._authorizer = authorizer
        self._clock = clock

    def _policies(self, caller: SpiffeId | None) -> list[str] | None:
        """The names of the caller's policies; None if it may do nothing at all (refused)."""
        authorizer = self._authorizer
        if authorizer.is_superuser(caller):
            return [SUPERUSER_POLICY]
        if caller is None or not any(authorizer.may_ever(caller, p) for p in ANY_PERMISSION):
            return None
        return sorted({policy.name for policy in authorizer.policies.applicable(caller).policies})

    def login(self, request: VaultRequest) -> ApiResponse:
        if request.operation is not Operation.UPDATE:
            return envelope.UNSUPPORTED_OPERATION
        try:
            body = request.body()
            policies = self._policies(request.peer)
        except BadRequest as exc:
            return envelope.errors(400, str(exc))
        except StorageError as exc:
            status = 503 if isinstance(exc, DatabaseUnavailable) else 500
            return envelope.errors(status, "the policies cannot be read now: try again")
        if policies is None or request.peer is None:
            return envelope.BAD_CERTIFICATE
        try:
            token, entry = self._tokens.issue(request.peer)
        except TooManyTokens:
            return envelope.errors(429, "too many live tokens: send requests without one (the certificate is enough)")
        warnings = [NO_ROLES] if body.get("name") else None
        return envelope.ok(None, warnings=warnings, auth=self._auth(token, entry, policies))

    def _auth(self, token: str, entry: Token, policies: list[str]) -> dict[str, Any]:
        return {
            "client_token": token,
            "accessor": entry.accessor,
            "policies": policies,
            "token_policies": policies,
            "metadata": {"spiffe_id": str(entry.spiffe_id)},
            "lease_duration": int(entry.remaining(self._clock())),
            "renewable": True,
            "entity_id": "",
            "token_type": "service",
            "orphan": True,
            "mfa_requirement": None,
            "num_uses": 0,
        }

    def token_self(self, request: VaultRequest, action: str) -> ApiResponse:
        token = request.token
        if action == "lookup-self":
            if request.operation not in (Operation.READ, Operation.UPDATE):
                return envelope.UNSUPPORTED_OPERATION
            entry = self._tokens.check(token, request.peer) if token else None
            if entry is None:
                return envelope.BAD_TOKEN
            return envelope.ok(self._lookup(token, entry))
        if request.operation is not Operation.UPDATE:
            return envelope.UNSUPPORTED_OPERATION
        if action == "revoke-self":
            if not token or not self._tokens.revoke(token, request.peer):
                return envelope.BAD_TOKEN
            return envelope.NO_CONTENT
        try:
            body = request.body()
            increment = parse_duration(body["increment"], "increment") if "increment" in body else None
            policies = self._policies(request.peer)
        except BadRequest as exc:
            return envelope.errors(400, str(exc))
        except StorageError:
            return envelope.errors(503, "the policies cannot be read now: try again")
        entry = self._tokens.renew(token, request.peer, increment) if token else None
        if entry is None:
            return envelope.BAD_TOKEN
        return envelope.ok(None, auth=self._auth(token, entry, policies or []))

    def _lookup(self, token: str, entry: Token) -> dict[str, Any]:
        try:
            policies = self._policies(entry.spiffe_id) or []
        except StorageError:
            policies = []
        return {
            "accessor": entry.accessor,
            "creation_time": int(entry.issued_at),
            "creation_ttl": int(self._tokens.ttl),
            "display_name": f"cert-{entry.spiffe_id}",
            "entity_id": "",
            "expire_time": timestamp(entry.expires_at),
            "explicit_max_ttl": 0,
            "id": token,
            "issue_time": timestamp(entry.issued_at),
            "meta": {"spiffe_id": str(entry.spiffe_id)},
            "num_uses": 0,
            "orphan": True,
            "path": "auth/cert/login",
            "policies": policies,
            "renewable": True,
            "ttl": int(entry.remaining(self._clock())),
            "type": "service",
        }
