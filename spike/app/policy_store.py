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
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import Future

import msgspec

from .kv import InvalidRequest, NotFound
from .policies import MAX_POLICIES, Permission, Policy
from .sealing import TamperedData, policy_aad
from .secret_store import SecretStore

log = logging.getLogger("spike.nexus.policy")

_SELECT = "SELECT id, name, sealed, created_at, updated_at FROM policy"
# One row for an id or a name, the id first (ids are random; names are chosen by people).
_ONE = f"{_SELECT} WHERE id = ?1 OR name = ?1 ORDER BY id = ?1 DESC LIMIT 1"


class _Sealed(msgspec.Struct):
    spiffe_id_pattern: str
    path_pattern: str
    permissions: list[str]


class NameTaken(InvalidRequest):
    status = 409
    code = "api_conflict"


class PolicyStore:
    def __init__(self, store: SecretStore, new_id: Callable[[], str] = lambda: random_tokens.token_hex(16)) -> None:
        self._store = store
        self._new_id = new_id

    def _decode(self, row: tuple[str, str, bytes, float, float]) -> Policy:
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
        for row in self._store.reader.execute(f"{_SELECT} ORDER BY name").fetchall():
            try:
                policies.append(self._decode(row))
            except TamperedData as exc:
                # A one-line cause, not a bug: no traceback.
                log.error("REFUSED TAMPERED DATA: %s; it grants nothing", exc, extra={"event": "policy_tampered"})  # noqa: TRY400
        return policies

    def get(self, id_or_name: str) -> Policy:
        row = self._store.reader.execute(_ONE, (id_or_name,)).fetchone()
        if row is None:
            raise NotFound("no such policy")
        return self._decode(row)

    def list(self) -> list[tuple[str, str]]:
        return [(i, n) for i, n in self._store.reader.execute("SELECT id, name FROM policy ORDER BY name")]

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

        def op(db: sqlite3.Connection) -> tuple[str, bool]:
            now = time.time()
            row = db.execute("SELECT id FROM policy WHERE name = ?", (name,)).fetchone()
            if row is not None:
                if create_only:
                    raise NameTaken(f"a policy named {name} exists")
                (policy_id,) = row
                db.execute(
                    "UPDATE policy SET sealed = ?, updated_at = ? WHERE id = ?",
                    (sealer.seal(body, policy_aad(policy_id, name)), now, policy_id),
                )
                return policy_id, False
            (count,) = db.execute("SELECT count(*) FROM policy").fetchone()
            if count >= MAX_POLICIES:
                raise InvalidRequest(f"at most {MAX_POLICIES} policies")
            policy_id = self._new_id()
            db.execute(
                "INSERT INTO policy (id, name, sealed, created_at, updated_at) VALUES (?, ?, ?, ?, ?)",
                (policy_id, name, sealer.seal(body, policy_aad(policy_id, name)), now, now),
            )
            return policy_id, True

        return self._store.submit(op)

    def delete(self, id_or_name: str) -> Future[None]:
        def op(db: sqlite3.Connection) -> None:
            row = db.execute(_ONE, (id_or_name,)).fetchone()
            if row is None:
                raise NotFound("no such policy")
            db.execute("DELETE FROM policy WHERE id = ?", (row[0],))

        return self._store.submit(op)
