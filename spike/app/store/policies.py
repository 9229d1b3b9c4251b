"""Policies in the Nexus database, sealed like secrets.

The id and name are stored in clear (they are looked up and listed); the
patterns and permissions are sealed under the keyring's data key with
associated data naming the policy, so a tampered or swapped row is refused:
`get` fails, and `load_all` leaves it out (it grants nothing) and logs it.
A policy sealed under a data key that no longer exists (`bootstrap --force`)
is left out the same way, with its own line: it is not tampering.  Writes go
through the same group-committing writer as secrets.

`get` and `delete` take an id or a name; an id wins, so a policy whose name
happens to be another policy's id never shadows it.

A sealed body says which dialect its patterns are in.  Bodies written by an
earlier spike (no ``dialect``) are read through `policy_legacy.upgrade`, which
gives them the same meaning under RE2 and SPIKE's rules, and are rewritten in
that form the first time they are read with the key (one conditional write
each: a policy replaced meanwhile is left alone).
"""

from __future__ import annotations

import logging
import secrets as random_tokens
from collections.abc import Callable
from concurrent.futures import Future

import msgspec

from spike.app.model.kv import NotFound
from spike.app.model.policy import Permission, Policy
from spike.app.store.backend import PolicyRow, SecretBackend
from spike.app.store.policy_legacy import DIALECT, LEGACY_DIALECT, upgrade
from spike.app.store.sealing import DataKeyGone, TamperedData, policy_aad
from spike.app.store.sql_store import PolicyNameTaken

log = logging.getLogger("spike.nexus.policy")

NameTaken = PolicyNameTaken  # 409: a policy with this name exists (create-only)


class _Upgrade(msgspec.Struct, forbid_unknown_fields=True):
    """How a policy stored by an earlier spike was upgraded (see `policy_legacy`)."""

    spiffe_id_pattern: str  # as it was stored
    path_pattern: str
    system_paths: list[str] | None = None
    disabled: str | None = None


class _Sealed(msgspec.Struct, forbid_unknown_fields=True):
    spiffe_id_pattern: str
    path_pattern: str
    permissions: list[str]
    dialect: int = LEGACY_DIALECT  # absent from bodies written before RE2
    upgraded: _Upgrade | None = None


class UnreadablePolicy(TamperedData):
    """A sealed body that opened but does not hold a policy this spike can read."""


class PolicyStore:
    def __init__(self, store: SecretBackend, new_id: Callable[[], str] = lambda: random_tokens.token_hex(16)) -> None:
        self._store = store
        self._new_id = new_id
        self._rewriting: set[str] = set()  # ids of old-dialect policies whose upgrade is being stored

    @property
    def backend(self) -> SecretBackend:
        return self._store

    def _open(self, row: PolicyRow) -> _Sealed:
        policy_id, name, sealed, _, _ = row
        try:
            plain = self._store.open_value(sealed, policy_aad(policy_id, name))
        except TamperedData as exc:
            raise TamperedData(f"policy {name}: {exc} (tampered with, or moved)") from None
        except DataKeyGone as exc:
            raise DataKeyGone(f"policy {name} was {exc}; write it again") from None
        try:
            body = msgspec.json.decode(plain, type=_Sealed)
            frozenset(Permission(p) for p in body.permissions)
        except (msgspec.DecodeError, ValueError) as exc:
            raise UnreadablePolicy(f"policy {name}: its body cannot be read ({exc})") from None
        if body.dialect not in (LEGACY_DIALECT, DIALECT):
            raise UnreadablePolicy(f"policy {name}: written in dialect {body.dialect}, which this spike does not know")
        return body

    def _decode(self, row: PolicyRow, opened: _Sealed | None = None) -> Policy:
        policy_id, name, _, created, updated = row
        body = self._open(row) if opened is None else opened
        if body.dialect == LEGACY_DIALECT:
            body = _upgraded(body)
        upgraded = body.upgraded
        return Policy(
            policy_id,
            name,
            body.spiffe_id_pattern,
            body.path_pattern,
            frozenset(Permission(p) for p in body.permissions),
            created,
            updated,
            system_paths=_system_paths(upgraded),
            disabled=None if upgraded is None else upgraded.disabled,
        )

    def load_all(self) -> list[Policy]:
        """Every policy that opens; a tampered one is logged and left out, so it grants nothing.

        Policies still in the old dialect are upgraded here (in memory at once,
        in the store by a write each).
        """
        policies = []
        for row in self._store.policy_rows():
            try:
                body = self._open(row)
                if body.dialect == LEGACY_DIALECT:
                    self._rewrite(row, body)
                policies.append(self._decode(row, body))
            except TamperedData as exc:
                # A one-line cause, not a bug: no traceback.
                log.error("REFUSED TAMPERED DATA: %s; it grants nothing", exc, extra={"event": "policy_tampered"})  # noqa: TRY400
            except DataKeyGone as exc:
                log.warning("%s; it grants nothing", exc, extra={"event": "policy_unreadable"})
        return policies

    def snapshot(self) -> tuple[int, list[Policy]]:
        """The change counter, read first, and every policy: the policies are at least as new as the counter."""
        version = self._store.policy_version()
        return version, self.load_all()

    def version(self) -> int:
        return self._store.policy_version()

    def _rewrite(self, row: PolicyRow, legacy: _Sealed) -> None:
        """Store an old-dialect policy in today's, once, unless it was replaced meanwhile."""
        policy_id, name, sealed, _, _ = row
        if policy_id in self._rewriting:
            return
        self._rewriting.add(policy_id)
        new = _upgraded(legacy)
        assert new.upgraded is not None
        for note in _notes(legacy):
            log.warning("policy %s, upgraded to RE2 and SPIKE's rules: %s", name, note, extra={"event": "upgrade"})
        log.info(
            "policy %s upgraded to RE2 and SPIKE's rules: SPIFFE ID pattern %r -> %r, path pattern %r -> %r",
            name,
            legacy.spiffe_id_pattern,
            new.spiffe_id_pattern,
            legacy.path_pattern,
            new.path_pattern,
            extra={"event": "policy_upgraded"},
        )
        plain = msgspec.json.encode(new)
        future = self._store.policy_reseal(
            policy_id, sealed, self._store.seal_value(plain, policy_aad(policy_id, name))
        )

        def done(finished: Future[bool]) -> None:
            self._rewriting.discard(policy_id)
            failure = finished.exception()
            if failure is not None:  # read again (and upgraded in memory) until a write succeeds
                log.warning("policy %s: storing its upgrade failed (%s); tried again at the next reload", name, failure)

        future.add_done_callback(done)

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
        sealer = self._store.keyring()  # one keyring for the seal and the term the row is labelled with
        body = msgspec.json.encode(
            _Sealed(spiffe_id_pattern, path_pattern, sorted(p.value for p in permissions), dialect=DIALECT)
        )
        return self._store.policy_put(
            name,
            lambda policy_id: sealer.seal(body, policy_aad(policy_id, name)),
            create_only=create_only,
            new_id=self._new_id,
        )

    def new_row(
        self,
        name: str,
        spiffe_id_pattern: str,
        path_pattern: str,
        permissions: frozenset[Permission],
        created_at: float,
        updated_at: float,
    ) -> PolicyRow:
        """A new policy's row (a fresh id, its body sealed as `put` seals it), for an import that keeps times."""
        policy_id = self._new_id()
        body = msgspec.json.encode(
            _Sealed(spiffe_id_pattern, path_pattern, sorted(p.value for p in permissions), dialect=DIALECT)
        )
        return policy_id, name, self._store.keyring().seal(body, policy_aad(policy_id, name)), created_at, updated_at

    def delete(self, id_or_name: str) -> Future[None]:
        return self._store.policy_delete(id_or_name)


def _upgraded(legacy: _Sealed) -> _Sealed:
    permissions = frozenset(Permission(p) for p in legacy.permissions)
    result = upgrade(legacy.spiffe_id_pattern, legacy.path_pattern, permissions)
    return _Sealed(
        result.spiffe_id_pattern,
        result.path_pattern,
        legacy.permissions,
        dialect=DIALECT,
        upgraded=_Upgrade(
            legacy.spiffe_id_pattern,
            legacy.path_pattern,
            None if result.system_paths is None else sorted(result.system_paths),
            result.disabled,
        ),
    )


def _notes(legacy: _Sealed) -> tuple[str, ...]:
    permissions = frozenset(Permission(p) for p in legacy.permissions)
    return upgrade(legacy.spiffe_id_pattern, legacy.path_pattern, permissions).notes


def _system_paths(upgraded: _Upgrade | None) -> frozenset[str] | None:
    if upgraded is None or upgraded.system_paths is None:
        return None
    return frozenset(upgraded.system_paths)
