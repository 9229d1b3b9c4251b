"""Every route of Nexus names who may call it, and the list of routes is written down here.

`Route` has no default guard, so a route cannot be declared without one; these
tests check what each guard says: a `Roles` guard names at least one role, a
`Granted` guard a permission (and, on a fixed path, a reserved ``spike/``
path, so that only an explicit pattern reaches it).  The tripwire compares
the route table with `EXPECTED`: adding, removing or re-guarding a route fails
here until this list, and the matrix in test_authz_matrix.py, say so.
"""

from __future__ import annotations

import inspect
from typing import Any

import pytest

from spike.app.api.messages import (
    BOOTSTRAP_INIT_PATH,
    BOOTSTRAP_VERIFY_PATH,
    CIPHER_DECRYPT_PATH,
    CIPHER_ENCRYPT_PATH,
    POLICY_PATH,
    RECOVER_PATH,
    RESTORE_PATH,
    SECRETS_METADATA_PATH,
    SECRETS_PATH,
    STATUS_PATH,
)
from spike.app.model.policy import Permission, reserved
from spike.app.nexus.routes import Granted, Roles, Route
from spike.protocol.identity import Role
from tests.authz.deployment import Deployment

PILOTS = {Role.PILOT_SUPERUSER, Role.PILOT_RECOVER, Role.PILOT_RESTORE}
READ, WRITE, LIST, EXECUTE, SUPER = (
    Permission.READ,
    Permission.WRITE,
    Permission.LIST,
    Permission.EXECUTE,
    Permission.SUPER,
)

#: (path, action) -> its guard, as a reviewer should read it.  `None` as a Granted path: the secret path in the body.
EXPECTED: dict[tuple[str, str], Roles | Granted] = {
    (STATUS_PATH, ""): Roles(frozenset({Role.BOOTSTRAP, *PILOTS})),
    (BOOTSTRAP_INIT_PATH, ""): Roles(frozenset({Role.BOOTSTRAP})),
    (BOOTSTRAP_VERIFY_PATH, ""): Roles(frozenset({Role.BOOTSTRAP})),
    (RECOVER_PATH, ""): Roles(frozenset({Role.PILOT_RECOVER})),
    (RESTORE_PATH, ""): Roles(frozenset({Role.PILOT_RESTORE})),
    (CIPHER_ENCRYPT_PATH, ""): Granted(EXECUTE, "spike/system/cipher/exec"),
    (CIPHER_DECRYPT_PATH, ""): Granted(EXECUTE, "spike/system/cipher/exec"),
    (SECRETS_PATH, ""): Granted(WRITE),
    (SECRETS_PATH, "get"): Granted(READ),
    (SECRETS_PATH, "delete"): Granted(WRITE),
    (SECRETS_PATH, "undelete"): Granted(WRITE),
    (SECRETS_PATH, "destroy"): Granted(WRITE),
    (SECRETS_PATH, "list"): Granted(LIST),
    (SECRETS_METADATA_PATH, "get"): Granted(READ),
    (SECRETS_METADATA_PATH, "put"): Granted(WRITE),
    (SECRETS_METADATA_PATH, "delete"): Granted(WRITE),
    # SPIKE's predicates (spike-sdk-go predicate/policy.go): write to change, read to get, list to list.
    (POLICY_PATH, ""): Granted(WRITE, "spike/system/acl"),
    (POLICY_PATH, "get"): Granted(READ, "spike/system/acl"),
    (POLICY_PATH, "list"): Granted(LIST, "spike/system/acl"),
    (POLICY_PATH, "delete"): Granted(WRITE, "spike/system/acl"),
}

#: Routes that read their secret path from the body, and check it in the handler.
BODY_PATH_ROUTES = {key for key, guard in EXPECTED.items() if isinstance(guard, Granted) and guard.path is None}


def unguarded(routes: dict[tuple[str, str], Any]) -> list[str]:
    """Every route whose guard admits by accident or by nobody; empty when all are explicit."""
    problems = []
    for (path, action), route in sorted(routes.items()):
        guard: object = getattr(route, "guard", None)
        name = f"{path}?action={action}"
        if isinstance(guard, Roles):
            if not guard.roles or not all(isinstance(r, Role) for r in guard.roles):
                problems.append(f"{name}: a Roles guard with no role")
        elif isinstance(guard, Granted):
            if guard.permission not in set(Permission):
                problems.append(f"{name}: a Granted guard without a permission")
            elif guard.path is not None and not reserved(guard.path):
                problems.append(f"{name}: a system route guarded by a non-reserved path {guard.path!r}")
        else:
            problems.append(f"{name}: no guard ({guard!r})")
    return problems


def test_a_route_cannot_be_declared_without_a_guard() -> None:
    guard = inspect.signature(Route).parameters["guard"]
    assert guard.default is inspect.Parameter.empty
    with pytest.raises(TypeError):
        Route(lambda request: None)  # type: ignore[call-arg,arg-type,return-value]


def test_every_route_has_an_explicit_guard(deployment: Deployment) -> None:
    assert deployment.api.routes, "no routes found"
    assert unguarded(deployment.api.routes) == []


def test_the_check_finds_what_it_looks_for() -> None:
    def handler(request: Any) -> Any:
        return None

    bad = {
        ("/a", ""): Route(handler, Roles(frozenset())),
        ("/b", ""): Route(handler, None),  # type: ignore[arg-type]
        ("/c", ""): Route(handler, Granted(Permission.EXECUTE, "app/cipher")),
        ("/d", ""): Route(handler, "anyone"),  # type: ignore[arg-type]
        ("/ok", ""): Route(handler, Granted(Permission.READ)),
    }
    assert [p.split(":")[0] for p in unguarded(bad)] == ["/a?action=", "/b?action=", "/c?action=", "/d?action="]


def test_tripwire_the_routes_and_their_guards_are_the_listed_ones(deployment: Deployment) -> None:
    actual = {key: route.guard for key, route in deployment.api.routes.items()}
    added = sorted(set(actual) - set(EXPECTED))
    removed = sorted(set(EXPECTED) - set(actual))
    assert not added and not removed, f"routes added {added}, removed {removed}: update EXPECTED and the matrix"
    changed = {key: actual[key] for key in EXPECTED if actual[key] != EXPECTED[key]}
    assert not changed, f"guards changed: {changed}"


def test_body_path_routes_are_only_the_secrets_routes() -> None:
    """A Granted guard without a path trusts the handler to check the body's path: only the secrets routes do."""
    assert {path for path, _ in BODY_PATH_ROUTES} == {SECRETS_PATH, SECRETS_METADATA_PATH}


def test_data_routes_need_the_key(deployment: Deployment) -> None:
    """Policies are sealed: a route that needs one cannot decide before the key is back (503, never a guess)."""
    for key, route in deployment.api.routes.items():
        if isinstance(route.guard, Granted):
            assert route.needs_key, key
