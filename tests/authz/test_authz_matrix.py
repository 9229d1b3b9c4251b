"""Every route of Nexus x every kind of caller -> allowed, refused at the handshake, or 401: one table.

The deployment is real: three keepers and a Nexus on loopback mTLS, READY
(the root key rebuilt from the keepers), so no 503 can hide a decision.  Each
cell is one request from that caller with a valid minimal body for the route.

    ok   the route table let the call through: the answer is the route's
         normal one for that body (`ALLOWED` below), never 401 or 503, and
         Nexus recorded it as allowed
    401  Nexus answered 401 {"err":"access_unauthorized"} and recorded it
    tls  no HTTP answer at all: the TLS handshake was refused, and the
         route table never saw the request

Columns (callers):

    no-crt  a TLS client that presents no certificate
    rogue   the superuser's SPIFFE ID, on an SVID from a CA Nexus does not trust (same trust domain)
    expir   the superuser's SPIFFE ID, from the dev CA, expired an hour ago
    notyet  the superuser's SPIFFE ID, from the dev CA, valid only from tomorrow
    keeper  keeper 1                    nexus   Nexus itself
    boot    bootstrap                   super   pilot superuser
    recov   pilot recover               restor  pilot restore
    wl-app  workload with policy  app/.*            read,write,list
    wl-no   workload without any policy
    wl-all  workload with policy  .*                super    (SPIKE's rules: `.*` describes the reserved system
                                                             paths, so with an anchored SPIFFE ID it reaches them)
    wl-cip  workload with policy  ^spike/system/cipher/exec$  execute  (the cipher, and nothing else)

Every workload policy names its workload's SPIFFE ID anchored (``^...$``), as ADR-0033 asks of a policy
that reaches a reserved system path.
"""

from __future__ import annotations

import base64
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spike.app.api.messages import (
    CIPHER_ENCRYPT_PATH,
    POLICY_PATH,
    SECRETS_PATH,
    VERIFY_INFO,
)
from spike.app.commands.devca import DevIdentity
from spike.protocol.material import RootKey, derive_key
from tests.authz.deployment import (
    ROUTES,
    Caller,
    Deployment,
    TransportError,
    foreign_ca_context,
    no_certificate_context,
    running,
)

MATRIX = """
route             no-crt rogue  expir  notyet keeper nexus  boot   super  recov  restor wl-app wl-no  wl-all wl-cip
status            tls    tls    tls    tls    401    401    ok     ok     ok     ok     401    401    401    401
bootstrap/init    tls    tls    tls    tls    401    401    ok     401    401    401    401    401    401    401
bootstrap/verify  tls    tls    tls    tls    401    401    ok     401    401    401    401    401    401    401
operator/recover  tls    tls    tls    tls    401    401    401    401    ok     401    401    401    401    401
operator/restore  tls    tls    tls    tls    401    401    401    401    401    ok     401    401    401    401
cipher/encrypt    tls    tls    tls    tls    401    401    401    ok     401    401    401    401    ok     ok
cipher/decrypt    tls    tls    tls    tls    401    401    401    ok     401    401    401    401    ok     ok
secrets           tls    tls    tls    tls    401    401    401    ok     401    401    ok     401    ok     401
secrets?get       tls    tls    tls    tls    401    401    401    ok     401    401    ok     401    ok     401
secrets?delete    tls    tls    tls    tls    401    401    401    ok     401    401    ok     401    ok     401
secrets?undelete  tls    tls    tls    tls    401    401    401    ok     401    401    ok     401    ok     401
secrets?destroy   tls    tls    tls    tls    401    401    401    ok     401    401    ok     401    ok     401
secrets?list      tls    tls    tls    tls    401    401    401    ok     401    401    ok     401    ok     401
metadata?get      tls    tls    tls    tls    401    401    401    ok     401    401    ok     401    ok     401
metadata?put      tls    tls    tls    tls    401    401    401    ok     401    401    ok     401    ok     401
metadata?delete   tls    tls    tls    tls    401    401    401    ok     401    401    ok     401    ok     401
policy            tls    tls    tls    tls    401    401    401    ok     401    401    401    401    ok     401
policy?get        tls    tls    tls    tls    401    401    401    ok     401    401    401    401    ok     401
policy?list       tls    tls    tls    tls    401    401    401    ok     401    401    401    401    ok     401
policy?delete     tls    tls    tls    tls    401    401    401    ok     401    401    401    401    ok     401
"""

# What an allowed caller is answered, for the body `bodies()` sends on that route.
ALLOWED = {
    "status": 200,
    "bootstrap/init": 200,  # the key record Nexus already has: nothing changes
    "bootstrap/verify": 200,
    "operator/recover": 200,
    "operator/restore": 200,  # Nexus already holds its key: SPIKE's "restored" (no x-spike-extensions sent)
    "cipher/encrypt": 200,
    "cipher/decrypt": 200,
    "secrets": 200,
    "secrets?get": 200,
    "secrets?delete": 200,
    "secrets?undelete": 200,
    "secrets?destroy": 200,
    "secrets?list": 200,
    "metadata?get": 200,
    "metadata?put": 200,
    "metadata?delete": 404,  # a path that never exists: nothing is lost
    "policy": 200,
    "policy?get": 200,
    "policy?list": 200,
    "policy?delete": 404,  # likewise
}

WORKLOAD_POLICIES = {
    "wl-app": ("app", "^app/.*", ["read", "write", "list"]),
    "wl-all": ("everything", ".*", ["super"]),
    "wl-cip": ("cipher", "^spike/system/cipher/exec$", ["execute"]),
}


def parse(table: str) -> tuple[list[str], dict[str, dict[str, str]]]:
    header, *rows = [line.split() for line in table.strip().splitlines()]
    columns = header[1:]
    cells = {}
    for row in rows:
        assert len(row) == len(header), f"row {row[0]} has {len(row) - 1} cells for {len(columns)} callers"
        cells[row[0]] = dict(zip(columns, row[1:], strict=True))
    return columns, cells


COLUMNS, EXPECTED = parse(MATRIX)


def bodies(deployment: Deployment, ciphertext: dict[str, Any]) -> dict[str, Any]:
    key = RootKey(bytearray(range(1, 33)))
    nonce = os.urandom(12)
    sealed = AESGCM(derive_key(key, VERIFY_INFO)).encrypt(nonce, b"matrix", VERIFY_INFO)
    record = deployment.custody.record
    assert record is not None
    b64 = {"nonce": base64.b64encode(nonce).decode(), "ciphertext": base64.b64encode(sealed).decode()}
    return {
        "status": {},
        "bootstrap/init": {"record": msgspec.to_builtins(record), "replace": False},
        "bootstrap/verify": b64,
        "operator/recover": {},
        "operator/restore": {"id": 1, "shard": [7] * 32},
        "cipher/encrypt": {"plaintext": base64.b64encode(b"hello").decode()},
        "cipher/decrypt": ciphertext,
        "secrets": {"path": "app/matrix", "values": {"k": "v"}},
        "secrets?get": {"path": "app/matrix"},
        "secrets?delete": {"path": "app/matrix", "versions": [1]},
        "secrets?undelete": {"path": "app/matrix", "versions": [1]},
        "secrets?destroy": {"path": "app/matrix-destroyed", "versions": [1]},
        "secrets?list": {"prefix": "app/"},
        "metadata?get": {"path": "app/matrix"},
        "metadata?put": {"path": "app/matrix", "max_versions": 50},
        "metadata?delete": {"path": "app/never-written"},
        "policy": {"name": "scratch", "spiffeidPattern": "^nobody$", "pathPattern": "^x$", "permissions": ["read"]},
        "policy?get": {"id": "app"},
        "policy?list": {},
        "policy?delete": {"id": "never-created"},
    }


@pytest.fixture(scope="module")
def matrix_deployment(
    dev_identity: DevIdentity, same_domain_foreign_ca: DevIdentity, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Deployment, dict[str, Caller], dict[str, Any]]]:
    root: Path = tmp_path_factory.mktemp("matrix")
    with running(dev_identity, root) as deployment:
        superuser = deployment.caller("pilot-superuser")
        for column, (name, paths, permissions) in WORKLOAD_POLICIES.items():
            ids = rf"^spiffe://spike\.test/workload/{column}$"
            superuser.put_policy(name, ids, paths, permissions)
        superuser.ok(SECRETS_PATH, {"path": "app/matrix", "values": {"k": "v1"}})
        superuser.ok(SECRETS_PATH, {"path": "app/matrix-destroyed", "values": {"k": "gone"}})
        ciphertext = superuser.ok(CIPHER_ENCRYPT_PATH, {"plaintext": base64.b64encode(b"matrix").decode()})
        callers = {
            "no-crt": deployment.caller(no_certificate_context(dev_identity)),
            "rogue": deployment.caller(foreign_ca_context(dev_identity, same_domain_foreign_ca, "pilot-superuser")),
            "expir": deployment.caller(deployment.mint("/spike/pilot/role/superuser", expired=True)),
            "notyet": deployment.caller(deployment.mint("/spike/pilot/role/superuser", not_yet_valid=True)),
            "keeper": deployment.caller("keeper-1"),
            "nexus": deployment.caller("nexus"),
            "boot": deployment.caller("bootstrap"),
            "super": superuser,
            "recov": deployment.caller("pilot-recover"),
            "restor": deployment.caller("pilot-restore"),
            "wl-app": deployment.workload("wl-app"),
            "wl-no": deployment.workload("wl-no"),
            "wl-all": deployment.workload("wl-all"),
            "wl-cip": deployment.workload("wl-cip"),
        }
        yield deployment, callers, bodies(deployment, ciphertext)


def test_the_table_covers_every_route_and_every_caller(matrix_deployment: Any) -> None:
    deployment, callers, route_bodies = matrix_deployment
    assert set(ROUTES) == set(EXPECTED) == set(ALLOWED) == set(route_bodies)
    assert set(ROUTES.values()) == set(deployment.api.routes), "a route was added or removed: extend MATRIX"
    assert len(set(ROUTES.values())) == len(ROUTES)
    assert list(callers) == COLUMNS
    assert {cell for row in EXPECTED.values() for cell in row.values()} == {"ok", "401", "tls"}


def outcome(deployment: Deployment, caller: Caller, route: str, body: Any) -> tuple[str, str]:
    """(cell, detail): the outcome as the table spells it, and what was actually seen when it is not."""
    path, action = ROUTES[route]
    seen_before = len(deployment.calls)
    try:
        answer = caller.post(path, body, action=action)
    except TransportError as exc:
        if len(deployment.calls) != seen_before:
            return "?", f"no answer ({exc}) but Nexus saw the call"
        return "tls", ""
    seen = deployment.calls[seen_before:]
    if len(seen) != 1 or (seen[0].path, seen[0].action, seen[0].status) != (path, action, answer.status):
        return "?", f"HTTP {answer.status}; Nexus recorded {seen}"
    if answer.status == 401:
        if answer.json().get("err") != "access_unauthorized":
            return "?", f"401 with body {answer.body!r}"
        return "401", ""
    if answer.status != ALLOWED[route] or seen[0].decision != "allowed":
        return "?", f"HTTP {answer.status} {answer.body[:80]!r}, expected {ALLOWED[route]}; {seen[0].decision}"
    return "ok", ""


def test_every_route_for_every_caller(matrix_deployment: Any, caplog: pytest.LogCaptureFixture) -> None:
    deployment, callers, route_bodies = matrix_deployment
    caplog.set_level(logging.DEBUG, logger="spike.transports.server")
    wrong = []
    for route, row in EXPECTED.items():
        for column, expected in row.items():
            got, detail = outcome(deployment, callers[column], route, route_bodies[route])
            if got != expected:
                wrong.append(f"{route:18} {column:7} expected {expected:4} got {got:4} {detail}")
    assert not wrong, "\n" + "\n".join(wrong)
    assert deployment.phase.value == "ready"
    # Each "tls" cell is Nexus's refusal of that handshake (not a client giving up on Nexus).
    refused = [r for r in caplog.records if r.getMessage().startswith("TLS handshake failed")]
    assert len(refused) == sum(cell == "tls" for row in EXPECTED.values() for cell in row.values())


def test_the_reserved_paths_need_a_pattern_that_describes_them(matrix_deployment: Any) -> None:
    """SPIKE's ADR-0033: `.*` describes every reserved path; a pattern naming one reaches that one only."""
    deployment, callers = matrix_deployment[0], matrix_deployment[1]
    everything, cipher, superuser = callers["wl-all"], callers["wl-cip"], callers["super"]
    assert everything.post(SECRETS_PATH, {"path": "app/matrix"}, action="get").status == 200
    assert everything.post(SECRETS_PATH, {"path": "anything/else", "values": {"k": "v"}}).status == 200
    assert everything.post(CIPHER_ENCRYPT_PATH, {"plaintext": "aGk="}).status == 200
    assert "everything" in [p["name"] for p in everything.ok(POLICY_PATH, {}, action="list")["policies"]]
    assert cipher.post(CIPHER_ENCRYPT_PATH, {"plaintext": "aGk="}).status == 200
    assert cipher.post(POLICY_PATH, {}, action="list").status == 401
    # Policy administration can be delegated, explicitly, and then reaches nothing else.
    superuser.put_policy("policy-admin", r"^spiffe://spike\.test/workload/admin$", "^spike/system/acl$", ["super"])
    admin = deployment.workload("admin")
    assert "policy-admin" in [p["name"] for p in admin.ok(POLICY_PATH, {}, action="list")["policies"]]
    assert admin.post(CIPHER_ENCRYPT_PATH, {"plaintext": "aGk="}).status == 401
    assert admin.post(SECRETS_PATH, {"path": "app/matrix"}, action="get").status == 401
    # The reserved names of spike before RE2 are ordinary strings now: they reach nothing.
    superuser.put_policy("old-names", r"^spiffe://spike\.test/workload/old$", "^spike/(acl|cipher)/.*$", ["super"])
    old = deployment.workload("old")
    assert old.post(CIPHER_ENCRYPT_PATH, {"plaintext": "aGk="}).status == 401
    assert old.post(POLICY_PATH, {}, action="list").status == 401
    # Nobody stores secrets under spike/, not even the superuser: those paths are the system's.
    for caller in (superuser, everything):
        answer = caller.post(SECRETS_PATH, {"path": "spike/system/acl", "values": {"k": "v"}})
        assert answer.status == 400, answer
