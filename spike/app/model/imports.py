"""What an import (`spike migrate from-spike`, `POST /v1/operator/import`) is checked for, on both sides.

The CLI checks its batch with these before it sends anything (its dry run is exactly this), and Nexus
checks the batch it receives with the same ones: a batch that passes here is refused by Nexus only for
what the CLI cannot know (data already there, a database outage).
"""

from __future__ import annotations

from spike.app.api.messages import ImportPolicy, ImportRequest
from spike.app.model import kv
from spike.app.model.policy import Permission, check_policy_fields, reserved


def checked_secrets(body: ImportRequest) -> list[kv.ImportedSecret]:
    """The body's secrets as the store takes them, each checked; `kv.InvalidRequest` says what is wrong."""
    secrets: list[kv.ImportedSecret] = []
    seen: set[str] = set()
    for item in body.secrets:
        secret = kv.check_import(
            kv.ImportedSecret(
                item.path,
                tuple(kv.ImportedVersion(v.version, v.values, v.created_at, v.deleted_at) for v in item.versions),
                item.created_at,
                item.updated_at,
                item.max_versions,
            )
        )
        if reserved(secret.path):
            raise kv.InvalidRequest(f"secret {secret.path}: paths under spike/ belong to the system")
        if secret.path in seen:
            raise kv.InvalidRequest(f"secret {secret.path} appears twice")
        seen.add(secret.path)
        secrets.append(secret)
    return secrets


def checked_policies(body: ImportRequest) -> list[tuple[ImportPolicy, frozenset[Permission]]]:
    """Each policy with the permissions it grants, checked as a policy write is; `kv.InvalidRequest` otherwise."""
    checked: list[tuple[ImportPolicy, frozenset[Permission]]] = []
    seen: set[str] = set()
    for item in body.policies:
        try:
            granted = check_policy_fields(item.name, item.spiffeidPattern, item.pathPattern, item.permissions)
        except kv.InvalidRequest as exc:
            raise kv.InvalidRequest(f"policy {item.name[:250]!r}: {exc}") from None
        if item.name in seen:
            raise kv.InvalidRequest(f"policy {item.name!r} appears twice")
        seen.add(item.name)
        checked.append((item, granted))
    return checked
