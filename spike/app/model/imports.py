"""What an import (`spike migrate from-spike`, `POST /v1/operator/import`) is checked for, on both sides.

The CLI checks its batch with these before it sends anything (its dry run is exactly this), and Nexus
checks the batch it receives with the same ones: a batch that passes here is refused by Nexus only for
what the CLI cannot know (data already there, a database outage).
"""

from __future__ import annotations

from collections.abc import Iterable

from spike.app.model import kv
from spike.app.model.policy import Permission, check_policy_fields, reserved

# name, SPIFFE ID pattern, path pattern, permissions
PolicyFields = tuple[str, str, str, list[str]]


def checked_secrets(secrets: Iterable[kv.ImportedSecret]) -> list[kv.ImportedSecret]:
    """Each secret checked as a write of it would be, plus what an import adds; `kv.InvalidRequest` says why."""
    checked: list[kv.ImportedSecret] = []
    seen: set[str] = set()
    for secret in secrets:
        kv.check_import(secret)
        if reserved(secret.path):
            raise kv.InvalidRequest(f"secret {secret.path}: paths under spike/ belong to the system")
        if secret.path in seen:
            raise kv.InvalidRequest(f"secret {secret.path} appears twice")
        seen.add(secret.path)
        checked.append(secret)
    return checked


def checked_policies(policies: Iterable[PolicyFields]) -> list[frozenset[Permission]]:
    """The permissions each policy grants, checked as a policy write is; `kv.InvalidRequest` otherwise."""
    granted: list[frozenset[Permission]] = []
    seen: set[str] = set()
    for name, spiffe_id_pattern, path_pattern, permissions in policies:
        try:
            granted.append(check_policy_fields(name, spiffe_id_pattern, path_pattern, permissions))
        except kv.InvalidRequest as exc:
            raise kv.InvalidRequest(f"policy {name[:250]!r}: {exc}") from None
        if name in seen:
            raise kv.InvalidRequest(f"policy {name!r} appears twice")
        seen.add(name)
    return granted
