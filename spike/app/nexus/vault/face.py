"""The Vault face's dispatcher: which of Vault's paths a request names, after identity, token and seal.

Order, as Vault's: ``sys/health`` and ``sys/seal-status`` answer whatever the
state; everything else answers 503 "Vault is sealed" until Nexus has its key;
a token, when one is sent, must be live and issued to the SPIFFE ID of this
connection's SVID (403 otherwise); then the path picks the engine.  A request
with no token is judged by its SVID alone.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import CipherApi
from spike.app.nexus.vault import envelope
from spike.app.nexus.vault.auth import CertAuth
from spike.app.nexus.vault.kv2 import KvV2
from spike.app.nexus.vault.replies import Reply
from spike.app.nexus.vault.request import Operation, VaultRequest
from spike.app.nexus.vault.sys import SysPaths
from spike.app.nexus.vault.tokens import DEFAULT_TTL, TokenStore
from spike.app.nexus.vault.transit import Transit
from spike.app.store.backend import SecretBackend
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.effects import Phase
from spike.protocol.nexus import NexusCustody

DEFAULT_MOUNT = "secret"
TOKEN_SELF = ("lookup-self", "renew-self", "revoke-self")


class VaultApi:
    """Answers Vault's paths: `(decision, reply)` for the audit log and the client."""

    def __init__(
        self,
        *,
        store: SecretBackend,
        authorizer: Authorizer,
        cipher: CipherApi,
        custody: Callable[[], NexusCustody],
        storage_type: str,
        mount: str = DEFAULT_MOUNT,
        token_ttl: float = DEFAULT_TTL,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._custody = custody
        self.tokens = TokenStore(token_ttl, clock=clock)
        self._kv = KvV2(mount, store, authorizer)
        self._mount = mount
        self._transit = Transit(cipher, authorizer)
        self._auth = CertAuth(self.tokens, authorizer, clock)
        self._sys = SysPaths(
            custody,
            storage_type,
            {f"{mount}/": self._kv.info(), "transit/": _TRANSIT_MOUNT},
        )

    def __call__(self, request: ApiRequest) -> tuple[str, Reply]:
        vault = VaultRequest.of(request)
        path = vault.path
        if path in ("sys/health", "sys/seal-status"):
            if vault.operation is not Operation.READ:
                return "allowed", envelope.UNSUPPORTED_OPERATION
            answer = self._sys.health(vault) if path == "sys/health" else self._sys.seal_status(vault)
            return "allowed", answer
        if request.peer is None:
            return "denied", envelope.PERMISSION_DENIED
        if self._custody().phase is not Phase.READY:
            return "not_ready", envelope.SEALED
        head, _, rest = path.partition("/")
        if head == "auth":
            return self._auth_path(vault, rest)
        if vault.token and self.tokens.check(vault.token, vault.peer) is None:
            return "denied", envelope.BAD_TOKEN
        if head == self._mount:
            return _decided(self._kv.handle(vault, rest))
        if head == "transit":
            return _decided(self._transit.handle(vault, rest))
        if head == "sys":
            if rest == "leader" and vault.operation is Operation.READ:
                return "allowed", self._sys.leader()
            if rest.startswith("internal/ui/mounts/") and vault.operation is Operation.READ:
                return "allowed", self._sys.ui_mount(vault, rest[len("internal/ui/mounts/") :])
            return "no_route", envelope.UNSUPPORTED_PATH
        return "no_route", envelope.no_handler(path)

    def _auth_path(self, vault: VaultRequest, rest: str) -> tuple[str, Reply]:
        if rest == "cert/login":
            # A stale token sent along (clients send the one they hold) does not stand in a login's way.
            return _decided(self._auth.login(vault))
        if rest.startswith("token/") and rest[len("token/") :] in TOKEN_SELF:
            return _decided(self._auth.token_self(vault, rest[len("token/") :]))
        if vault.token and self.tokens.check(vault.token, vault.peer) is None:
            return "denied", envelope.BAD_TOKEN
        return "no_route", envelope.no_handler(vault.path)


def _decided(reply: Reply) -> tuple[str, Reply]:
    if isinstance(reply, ApiResponse) and reply.status == 403:
        return "denied", reply
    return "allowed", reply


_TRANSIT_MOUNT = {
    "path": "transit/",
    "type": "transit",
    "description": "spike's cipher (encrypt and decrypt)",
    "options": None,
    "config": {"default_lease_ttl": 0, "max_lease_ttl": 0, "force_no_cache": False},
    "local": False,
    "seal_wrap": False,
    "external_entropy_access": False,
    "accessor": "transit_spike",
    "uuid": "",
    "plugin_version": "",
    "running_plugin_version": "",
    "running_sha256": "",
}
