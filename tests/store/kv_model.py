"""A plain in-memory model of Vault KV v2, written from the rules alone (no database, no SQL).

`Model` applies writes to dictionaries; `WriteOp` is one write as the store
takes it (`submit`) and as the model applies it (`apply`), and an `Outcome`
is ("ok", result) or ("error", exception class), so that the two can be
compared.  The store's default max_versions is `DEFAULT_MAX` in these tests.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from spike.app.model import kv
from spike.app.store.sqlite import SecretStore
from tests.store.store_helpers import WAIT

DEFAULT_MAX = 3

Outcome = tuple[str, Any]  # ("ok", result) or ("error", exception class)


@dataclass
class MVersion:
    values: dict[str, str]
    deleted: bool = False
    destroyed: bool = False


@dataclass
class MSecret:
    current: int = 0
    versions: dict[int, MVersion] = field(default_factory=dict)
    max_versions: int = 0
    cas_required: bool = False
    custom: dict[str, str] = field(default_factory=dict)

    @property
    def oldest(self) -> int:
        return min(self.versions, default=0)


class Model:
    """KV v2 as a dictionary: the rules, nothing else."""

    def __init__(self) -> None:
        self.secrets: dict[str, MSecret] = {}

    def put(self, path: str, values: dict[str, str], cas: int | None) -> Outcome:
        secret = self.secrets.get(path)
        if secret is not None and secret.cas_required and cas is None:
            return "error", kv.CasRequired
        if cas is not None and cas != (secret.current if secret else 0):
            return "error", kv.CasMismatch
        if secret is None:
            secret = self.secrets[path] = MSecret()
        secret.current += 1
        secret.versions[secret.current] = MVersion(dict(values))
        keep = secret.max_versions or DEFAULT_MAX
        while len(secret.versions) > keep:
            del secret.versions[min(secret.versions)]
        return "ok", secret.current

    def mark(self, action: str, path: str, versions: list[int]) -> Outcome:
        secret = self.secrets.get(path)
        if secret is None:
            return "error", kv.NotFound
        for number in sorted(set(versions)) or [secret.current]:
            version = secret.versions.get(number)
            if version is None or version.destroyed:
                continue
            if action == "delete":
                version.deleted = True
            elif action == "undelete":
                version.deleted = False
            else:
                version.destroyed = True
        return "ok", None

    def tune(
        self, path: str, max_versions: int | None, cas_required: bool | None, custom: dict[str, str] | None
    ) -> Outcome:
        secret = self.secrets.setdefault(path, MSecret())
        if max_versions is not None:
            secret.max_versions = max_versions
        if cas_required is not None:
            secret.cas_required = cas_required
        if custom is not None:
            secret.custom = dict(custom)
        return "ok", None

    def purge(self, path: str) -> Outcome:
        if self.secrets.pop(path, None) is None:
            return "error", kv.NotFound
        return "ok", None

    def get(self, path: str, version: int) -> Outcome:
        secret = self.secrets.get(path)
        if secret is None:
            return "error", kv.NotFound
        number = version or secret.current
        found = secret.versions.get(number)
        if found is None or found.deleted or found.destroyed:
            return "error", kv.NotFound
        return "ok", (number, found.values)


@dataclass(frozen=True)
class WriteOp:
    """One write, as the store takes it and as the model applies it."""

    kind: str
    path: str
    args: tuple[Any, ...]

    def submit(self, store: SecretStore) -> Future[Any]:
        if self.kind == "put":
            return store.put(self.path, *self.args)
        if self.kind in ("delete", "undelete", "destroy"):
            action: Callable[[str, list[int]], Future[None]] = getattr(store, self.kind)
            return action(self.path, *self.args)
        if self.kind == "tune":
            max_versions, cas_required, custom = self.args
            return store.update_metadata(
                self.path, max_versions=max_versions, cas_required=cas_required, custom_metadata=custom
            )
        return store.delete_all(self.path)

    def apply(self, model: Model) -> Outcome:
        if self.kind == "put":
            return model.put(self.path, *self.args)
        if self.kind in ("delete", "undelete", "destroy"):
            return model.mark(self.kind, self.path, *self.args)
        if self.kind == "tune":
            return model.tune(self.path, *self.args)
        return model.purge(self.path)


def settle(future: Future[Any]) -> Outcome:
    try:
        return "ok", future.result(timeout=WAIT)
    except kv.KvError as exc:
        return "error", type(exc)
