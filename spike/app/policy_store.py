"""Policies in the Nexus database, sealed like secrets.

The id and name are stored in clear (they are looked up and listed); the
patterns and permissions are sealed under the data key with associated data
naming the policy, so a tampered or swapped row is refused: `get` fails,
and `load_all` leaves it out (it grants nothing) and logs it.  Writes go
through the same group-committing writer as secrets.

`get` and `delete` take an id or a name; an id wins, so a policy whose name
happens to be another policy's id never shadows it.
"""

from __future__ import annotations

import logging
import secrets as random_tokens
from collections.abc import Callable
from concurrent.futures import Future

import msgspec

from .backend import PolicyRow, SecretBackend
from .kv import NotFound
from .policies import Permission, Policy
from .sealing import TamperedData, policy_aad
from .secret_store import PolicyNameTaken

log = logging.getLogger("spike.nexus.policy")

NameTaken = PolicyNameTaken  # 409: a policy with this name exists (create-only)


class _Sealed(msgspec.Struct):
    spiffe_id_pattern: str
    path_pattern: str
    permissions: list[str]


class PolicyStore:
    def __init__(self, store: SecretBackend, new_id: Callable[[], str] = lambda: random_tokens.token_hex(16)) -> None:
        self._store = store
        self._new_id = new_id

    @property
    def backend(self) -> SecretBackend:
        return self._store

    def _decode(self, row: PolicyRow) -> Policy:
        policy_id, name, sealed, created, updated = row
        try:
            plain = self._store.sealer().open(sealed, policy_aad(policy_id, name))
        except TamperedData as exc:
            raise TamperedData(f"policy {name}: {exc} (tampered with, or moved)") from None
        body = msgspec.json.decode(plain, type=_Sealed)
        permissions = frozenset(Permission(p) for p in body.permissions)
        return Policy(policy_id, name, body.spiffe_id_pattern, body.path_pattern, permissions, created, updated)

    def load_all(self) -> list[Policy]:
        """Every policy that opens; a tampered one is logged and left out, so it grants nothing."""
        policies = []
        for row in self._store.policy_rows():
            try:
                policies.append(self._decode(row))
            except TamperedData as exc:
                # A one-line cause, not a bug: no traceback.
                log.error("REFUSED TAMPERED DATA: %s; it grants nothing", exc, extra={"event": "policy_tampered"})  # noqa: TRY400
        return policies

    def get(self, id_or_name: str) -> Policy:
        row = self._store.policy_row(id_or_name)
        if row is None:
            raise NotFound("no such policy")
        return self._decode(row)

    def list(self) -> list[tuple[str, str]]:
        return self._store.policy_names()

    def put(
        self,
        name: str,
        spiffe_id_pattern: str,
        path_pattern: str,
        permissions: frozenset[Permission],
        *,
        create_only: bool,
    ) -> Future[tuple[str, bool]]:
        """Create the policy, or replace the one with this name; (id, created)."""
        sealer = self._store.sealer()
        body = msgspec.json.encode(_Sealed(spiffe_id_pattern, path_pattern, sorted(p.value for p in permissions)))
        return self._store.policy_put(
            name,
            lambda policy_id: sealer.seal(body, policy_aad(policy_id, name)),
            create_only=create_only,
            new_id=self._new_id,
        )

    def delete(self, id_or_name: str) -> Future[None]:
        return self._store.policy_delete(id_or_name)
