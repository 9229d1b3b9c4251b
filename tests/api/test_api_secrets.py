"""Every secrets route, every answer: 200s, each validation rule's 400, 404s, 409, 401, 503.

The cases run against one seeded node per test:

    app/db         v1 deleted then destroyed, v2 deleted, v3 live
    app/cas        v1, check-and-set required
    app/meta-only  metadata (custom owner=ops) but no version yet
    other/x        v1

A case is (route, action, body, status, then): `then` is the error code for a
failure, whose body must be exactly ``{"err": code, "reason": sentence}`` and which must leave the
database exactly as it was (a rejected request changes nothing) with the
detail in the log; or, for a 200, a check of the answer and of what changed.
No value ever reaches the log.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

from spike.app.api.messages import CIPHER_DECRYPT_PATH, CIPHER_ENCRYPT_PATH, SECRETS_METADATA_PATH, SECRETS_PATH
from spike.app.model import kv
from spike.app.nexus.routes import Granted
from spike.app.store.sqlite_schema import DB_NAME
from tests.api.api_helpers import OTHER_PEERS, Node, snapshot

S, M = SECRETS_PATH, SECRETS_METADATA_PATH
BAD, NOT_FOUND, CONFLICT = "api_bad_request", "api_not_found", "api_conflict"
PW = {1: "pw-one-Qx81", 2: "pw-two-Zr27", 3: "pw-three-Lm44"}
OTHER_PW = "pw-other-Kd90"
SECRET_VALUES = [*PW.values(), OTHER_PW, "admin-Ws55"]
BIG = 2**31
LIMIT = kv.MAX_VALUES_BYTES


def seed(node: Node) -> None:
    steps: list[tuple[str, str, dict[str, Any]]] = [
        (S, "", {"path": "app/db", "values": {"user": "admin-Ws55", "password": PW[1]}}),
        (S, "", {"path": "app/db", "values": {"password": PW[2]}}),
        (S, "", {"path": "app/db", "values": {"password": PW[3]}}),
        (S, "delete", {"path": "app/db", "versions": [1]}),
        (S, "destroy", {"path": "app/db", "versions": [1]}),
        (S, "delete", {"path": "app/db", "versions": [2]}),
        (S, "", {"path": "app/cas", "values": {"k": "v"}}),
        (M, "put", {"path": "app/cas", "cas_required": True}),
        (M, "put", {"path": "app/meta-only", "custom_metadata": {"owner": "ops"}}),
        (S, "", {"path": "other/x", "values": {"k": OTHER_PW}}),
    ]
    for route, action, body in steps:
        answer = node.call(route, body, action=action)
        assert answer.status == 200, (route, action, body, answer)


@pytest.fixture(scope="module")
def seeded_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The seeded database, built once: each test gets a copy (a few fsyncs instead of a dozen)."""
    node = Node(tmp_path_factory.mktemp("seeded") / "data")
    try:
        node.unlock()
        seed(node)
    finally:
        node.close()  # the last connection checkpoints the WAL into the file
    return node.data_dir / DB_NAME


@pytest.fixture
def seeded(tmp_path: Path, seeded_file: Path) -> Iterator[Node]:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    shutil.copy(seeded_file, data_dir / DB_NAME)
    node = Node(data_dir)
    try:
        node.unlock()
        yield node
    finally:
        node.close()


def get(node: Node, path: str, version: int = 0) -> tuple[int, Any]:
    answer = node.call(S, {"path": path, "version": version}, action="get")
    return answer.status, answer.json()


def metadata(node: Node, path: str) -> Any:
    answer = node.call(M, {"path": path}, action="get")
    assert answer.status == 200, answer
    return answer.json()


# ---------------------------------------------------------------------- checks of 200 answers


def wrote(path: str, version: int, values: dict[str, str]) -> Callable[[Any, Node], None]:
    def check(body: Any, node: Node) -> None:
        assert body == {"version": version}
        assert get(node, path) == (200, {"data": values, "version": version})

    return check


def reads(values: dict[str, str], version: int) -> Callable[[Any, Node], None]:
    def check(body: Any, node: Node) -> None:
        assert body == {"data": values, "version": version}

    return check


def then_get(path: str, version: int, status: int) -> Callable[[Any, Node], None]:
    def check(body: Any, node: Node) -> None:
        assert body == {}
        assert get(node, path, version)[0] == status

    return check


def version_flags(path: str, expected: dict[str, tuple[bool, bool]]) -> Callable[[Any, Node], None]:
    """After a delete/undelete/destroy: {version: (deleted, destroyed)} as metadata reports it."""

    def check(body: Any, node: Node) -> None:
        assert body == {}
        versions = metadata(node, path)["versions"]
        flags = {n: (v["deletedTime"] is not None, v["destroyed"]) for n, v in versions.items()}
        assert flags == expected

    return check


def listed(keys: list[str], next_after: str | None = None) -> Callable[[Any, Node], None]:
    def check(body: Any, node: Node) -> None:
        assert body == ({"keys": keys} if next_after is None else {"keys": keys, "next_after": next_after})

    return check


def meta_is(**expected: Any) -> Callable[[Any, Node], None]:
    def check(body: Any, node: Node) -> None:
        versions = expected.pop("versions", None)
        if versions is not None:
            got = {n: (v["deletedTime"] is not None, v["destroyed"]) for n, v in body["versions"].items()}
            assert got == versions
        for key, value in expected.items():
            assert body["metadata"][key] == value, (key, body)

    return check


def tuned(path: str, **expected: Any) -> Callable[[Any, Node], None]:
    def check(body: Any, node: Node) -> None:
        assert body == {}
        meta = metadata(node, path)["metadata"]
        for key, value in expected.items():
            assert meta[key] == value, (key, meta)

    return check


def purged(path: str) -> Callable[[Any, Node], None]:
    def check(body: Any, node: Node) -> None:
        assert body == {}
        assert get(node, path)[0] == 404
        assert node.call(M, {"path": path}, action="get").status == 404
        assert path not in node.call(S, {}, action="list").json()["keys"]
        # Gone with its version history: a new secret at the same path starts at version 1.
        assert node.call(S, {"path": path, "values": {"k": "again"}}).json() == {"version": 1}

    return check


# ---------------------------------------------------------------------- the table


def case(route: str, action: str, body: Any, status: int, then: Any, name: str) -> Any:
    return pytest.param(route, action, body, status, then, id=f"{route.rsplit('/', 1)[-1]}?{action}:{status}:{name}")


PUT_400 = {
    "empty path": {"path": "", "values": {"k": "v"}},
    # A leading slash, ? and the other characters of SPIKE's paths, spaces in keys and keys up to 250 bytes are
    # accepted since issue 17 (tests/api/test_api_spike_go.py).
    "leading double slash": {"path": "//a", "values": {"k": "v"}},
    "trailing slash": {"path": "a/", "values": {"k": "v"}},
    "double slash": {"path": "a//b", "values": {"k": "v"}},
    "dot segment": {"path": "a/./b", "values": {"k": "v"}},
    "dotdot segment": {"path": "a/../b", "values": {"k": "v"}},
    "space in path": {"path": "a b", "values": {"k": "v"}},
    "colon in path": {"path": "a:b", "values": {"k": "v"}},
    "non-ascii path": {"path": "caf\u00e9", "values": {"k": "v"}},
    "newline in path": {"path": "a\nb", "values": {"k": "v"}},
    "path 513 bytes": {"path": "a" * 513, "values": {"k": "v"}},
    "path not a string": {"path": 7, "values": {"k": "v"}},
    "no path": {"values": {"k": "v"}},
    "no values": {"path": "new/x"},
    "empty values": {"path": "new/x", "values": {}},
    "values a list": {"path": "new/x", "values": ["k", "v"]},
    "value a number": {"path": "new/x", "values": {"k": 1}},
    "value null": {"path": "new/x", "values": {"k": None}},
    "empty key": {"path": "new/x", "values": {"": "v"}},
    "tab in key": {"path": "new/x", "values": {"a\tb": "v"}},
    "slash in key": {"path": "new/x", "values": {"a/b": "v"}},
    "key 251 bytes": {"path": "new/x", "values": {"k" * 251: "v"}},
    "values over 64 KiB": {"path": "new/x", "values": {"k": "x" * LIMIT}},
    "values over 64 KiB in bytes": {"path": "new/x", "values": {"k": "\u00e9" * (LIMIT // 2)}},
    "values over 64 KiB across keys": {"path": "new/x", "values": {f"k{i}": "x" * 1024 for i in range(64)}},
    "cas negative": {"path": "app/db", "values": {"k": "v"}, "cas": -1},
    "cas 2**31": {"path": "app/db", "values": {"k": "v"}, "cas": BIG},
    "cas a string": {"path": "app/db", "values": {"k": "v"}, "cas": "3"},
    "cas a float": {"path": "app/db", "values": {"k": "v"}, "cas": 3.0},
    "cas required, not given": {"path": "app/cas", "values": {"k": "v"}},
    "body not json": b"path=a&k=v",
    "body a json list": b'[{"path": "a", "values": {"k": "v"}}]',
    "body empty": b"",
}
# Version 0 is no longer here: it is the current version, as in SPIKE (issue 17; tests/api/test_api_spike_go.py).
VERSIONS_400 = {
    "negative version": {"path": "app/db", "versions": [-1]},
    "version 2**31": {"path": "app/db", "versions": [BIG]},
    "1001 versions": {"path": "app/db", "versions": list(range(1, 1002))},
    "versions not a list": {"path": "app/db", "versions": 3},
    "versions as strings": {"path": "app/db", "versions": ["3"]},
    "bad path": {"path": "app//db"},
    "no path": {"versions": [1]},
}
LIST_400 = {
    "prefix double slash only": {"prefix": "//"},
    "prefix double slash": {"prefix": "a//"},
    "prefix with space": {"prefix": "a b"},
    "limit 0": {"limit": 0},
    "limit 10001": {"limit": 10_001},
    "after not a path": {"after": "a//b"},
    "prefix not a string": {"prefix": 1},
}
META_PUT_400 = {
    "max_versions negative": {"path": "app/db", "max_versions": -1},
    "max_versions 1001": {"path": "app/db", "max_versions": 1001},
    "65 custom entries": {"path": "app/db", "custom_metadata": {f"k{i}": "v" for i in range(65)}},
    "custom key with space": {"path": "app/db", "custom_metadata": {"a b": "v"}},
    "custom over 8 KiB": {"path": "app/db", "custom_metadata": {"k": "x" * 8192}},
    "custom value a number": {"path": "app/db", "custom_metadata": {"k": 1}},
    "cas_required a string": {"path": "app/db", "cas_required": "yes"},
    "bad path": {"path": "//app/db", "max_versions": 3},  # a single leading slash is SPIKE's (issue 17)
}

CASES = [
    # ---------------------------------------------------------------- put
    case(S, "", {"path": "new/x", "values": {"k": "v"}}, 200, wrote("new/x", 1, {"k": "v"}), "new secret"),
    case(S, "", {"path": "app/db", "values": {"k": "4"}}, 200, wrote("app/db", 4, {"k": "4"}), "next version"),
    case(S, "", {"path": "app/db", "values": {"k": "4"}, "cas": 3}, 200, wrote("app/db", 4, {"k": "4"}), "cas match"),
    case(S, "", {"path": "new/x", "values": {"k": "v"}, "cas": 0}, 200, wrote("new/x", 1, {"k": "v"}), "cas 0 absent"),
    case(S, "", {"path": "app/cas", "values": {"k": "2"}, "cas": 1}, 200, wrote("app/cas", 2, {"k": "2"}), "cas req"),
    case(
        S,
        "",
        {"path": "app/meta-only", "values": {"k": "v"}, "cas": 0},
        200,
        wrote("app/meta-only", 1, {"k": "v"}),
        "first after metadata",
    ),
    case(
        S,
        "",
        {"path": "new/x", "values": {"k": "x" * (LIMIT - 1)}},
        200,
        wrote("new/x", 1, {"k": "x" * (LIMIT - 1)}),
        "64 KiB exactly",
    ),
    case(S, "", {"path": "a" * 512, "values": {"k": "v"}}, 200, wrote("a" * 512, 1, {"k": "v"}), "path 512 bytes"),
    case(
        S, "", {"path": "new/x", "values": {"k" * 128: "v"}}, 200, wrote("new/x", 1, {"k" * 128: "v"}), "key 128 bytes"
    ),
    case(
        S,
        "",
        {"path": "a.b/c_d/e-f@g+h=i~j", "values": {"K.9_-": "\u00e9\u20ac \n\x00"}},
        200,
        wrote("a.b/c_d/e-f@g+h=i~j", 1, {"K.9_-": "\u00e9\u20ac \n\x00"}),
        "every allowed character",
    ),
    case(
        S,
        "",
        {"path": "new/x", "values": {"k": "v"}, "ignored": 1},
        200,
        wrote("new/x", 1, {"k": "v"}),
        "unknown field",
    ),
    *[case(S, "", body, 400, BAD, name) for name, body in PUT_400.items()],
    case(S, "", {"path": "app/db", "values": {"k": "v"}, "cas": 0}, 409, CONFLICT, "cas 0 but exists"),
    case(S, "", {"path": "app/db", "values": {"k": "v"}, "cas": 2}, 409, CONFLICT, "cas behind"),
    case(S, "", {"path": "app/db", "values": {"k": "v"}, "cas": 4}, 409, CONFLICT, "cas ahead"),
    case(S, "", {"path": "new/x", "values": {"k": "v"}, "cas": 1}, 409, CONFLICT, "cas 1 but absent"),
    case(S, "", {"path": "app/meta-only", "values": {"k": "v"}, "cas": 1}, 409, CONFLICT, "cas 1 no version"),
    # ---------------------------------------------------------------- get
    case(S, "get", {"path": "app/db"}, 200, reads({"password": PW[3]}, 3), "current"),
    case(S, "get", {"path": "app/db", "version": 3}, 200, reads({"password": PW[3]}, 3), "by number"),
    case(S, "get", {"path": "other/x", "version": 0}, 200, reads({"k": OTHER_PW}, 1), "version 0 is current"),
    case(S, "get", {"path": "app/db", "version": -1}, 400, BAD, "negative version"),
    case(S, "get", {"path": "app/db", "version": BIG}, 400, BAD, "version 2**31"),
    case(S, "get", {"path": "app/db", "version": "3"}, 400, BAD, "version a string"),
    case(S, "get", {"path": "app/../db"}, 400, BAD, "bad path"),
    case(S, "get", {}, 400, BAD, "no path"),
    case(S, "get", {"path": "no/such"}, 404, NOT_FOUND, "no such secret"),
    case(S, "get", {"path": "app/db", "version": 4}, 404, NOT_FOUND, "no such version"),
    case(S, "get", {"path": "app/db", "version": BIG - 1}, 404, NOT_FOUND, "largest version"),
    case(S, "get", {"path": "app/db", "version": 2}, 404, NOT_FOUND, "deleted version"),
    case(S, "get", {"path": "app/db", "version": 1}, 404, NOT_FOUND, "destroyed version"),
    case(S, "get", {"path": "app/meta-only"}, 404, NOT_FOUND, "metadata only"),
    case(S, "get", {"path": "app"}, 404, NOT_FOUND, "a prefix is not a secret"),
    # ---------------------------------------------------------------- delete / undelete / destroy
    case(S, "delete", {"path": "app/db"}, 200, then_get("app/db", 3, 404), "current"),
    case(
        S,
        "delete",
        {"path": "app/db", "versions": [3, 3]},
        200,
        version_flags("app/db", {"1": (True, True), "2": (True, False), "3": (True, False)}),
        "listed twice",
    ),
    case(
        S,
        "delete",
        {"path": "app/db", "versions": [99]},
        200,
        version_flags("app/db", {"1": (True, True), "2": (True, False), "3": (False, False)}),
        "absent version",
    ),
    case(S, "undelete", {"path": "app/db", "versions": [2]}, 200, then_get("app/db", 2, 200), "deleted version"),
    case(
        S,
        "undelete",
        {"path": "app/db", "versions": [1]},
        200,
        version_flags("app/db", {"1": (True, True), "2": (True, False), "3": (False, False)}),
        "destroyed stays",
    ),
    case(
        S,
        "destroy",
        {"path": "app/db"},
        200,
        version_flags("app/db", {"1": (True, True), "2": (True, False), "3": (False, True)}),
        "current",
    ),
    case(
        S,
        "destroy",
        {"path": "app/db", "versions": [2]},
        200,
        version_flags("app/db", {"1": (True, True), "2": (True, True), "3": (False, False)}),
        "a deleted version",
    ),
    *[
        case(S, a, body, 400, BAD, name)
        for a in ("delete", "undelete", "destroy")
        for name, body in VERSIONS_400.items()
    ],
    *[case(S, a, {"path": "no/such"}, 404, NOT_FOUND, "no such secret") for a in ("delete", "undelete", "destroy")],
    # ---------------------------------------------------------------- list
    case(S, "list", {}, 200, listed(["app/cas", "app/db", "app/meta-only", "other/x"]), "everything"),
    case(S, "list", {"prefix": "app/"}, 200, listed(["app/cas", "app/db", "app/meta-only"]), "by prefix"),
    case(S, "list", {"prefix": "app/d"}, 200, listed(["app/db"]), "partial segment"),
    case(S, "list", {"prefix": "zzz"}, 200, listed([]), "nothing"),
    case(S, "list", {"limit": 2}, 200, listed(["app/cas", "app/db"], "app/db"), "first page"),
    case(S, "list", {"limit": 2, "after": "app/db"}, 200, listed(["app/meta-only", "other/x"]), "last page"),
    case(
        S, "list", {"prefix": "app/", "after": "app/cas"}, 200, listed(["app/db", "app/meta-only"]), "after in prefix"
    ),
    *[case(S, "list", body, 400, BAD, name) for name, body in LIST_400.items()],
    # ---------------------------------------------------------------- metadata get
    case(
        M,
        "get",
        {"path": "app/db"},
        200,
        meta_is(
            currentVersion=3,
            oldestVersion=1,
            maxVersions=10,
            casRequired=False,
            customMetadata={},
            versions={"1": (True, True), "2": (True, False), "3": (False, False)},
        ),
        "all versions",
    ),
    case(M, "get", {"path": "app/db", "version": 2}, 200, meta_is(versions={"2": (True, False)}), "one version"),
    case(
        M,
        "get",
        {"path": "app/meta-only"},
        200,
        meta_is(currentVersion=0, oldestVersion=0, customMetadata={"owner": "ops"}, versions={}),
        "no version yet",
    ),
    case(M, "get", {"path": "app/cas"}, 200, meta_is(casRequired=True), "cas required"),
    case(M, "get", {"path": "app/db", "version": -1}, 400, BAD, "negative version"),
    case(M, "get", {"path": "app/db/"}, 400, BAD, "bad path"),
    case(M, "get", {"path": "no/such"}, 404, NOT_FOUND, "no such secret"),
    case(M, "get", {"path": "app/db", "version": 4}, 404, NOT_FOUND, "no such version"),
    # ---------------------------------------------------------------- metadata put
    case(M, "put", {"path": "app/db", "max_versions": 2}, 200, tuned("app/db", maxVersions=2), "max_versions"),
    case(M, "put", {"path": "app/db", "max_versions": 0}, 200, tuned("app/db", maxVersions=10), "back to default"),
    case(M, "put", {"path": "app/db", "cas_required": True}, 200, tuned("app/db", casRequired=True), "cas_required"),
    case(
        M,
        "put",
        {"path": "app/db", "custom_metadata": {"a": "1", "b": "2"}},
        200,
        tuned("app/db", customMetadata={"a": "1", "b": "2"}, currentVersion=3),
        "custom",
    ),
    case(
        M,
        "put",
        {"path": "app/meta-only", "custom_metadata": {}},
        200,
        tuned("app/meta-only", customMetadata={}),
        "custom cleared",
    ),
    case(
        M,
        "put",
        {"path": "new/x", "max_versions": 5},
        200,
        tuned("new/x", maxVersions=5, currentVersion=0),
        "before the first version",
    ),
    *[case(M, "put", body, 400, BAD, name) for name, body in META_PUT_400.items()],
    # ---------------------------------------------------------------- metadata delete
    case(M, "delete", {"path": "app/db"}, 200, purged("app/db"), "everything"),
    case(M, "delete", {"path": "app/meta-only"}, 200, purged("app/meta-only"), "metadata only"),
    case(M, "delete", {"path": "app//db"}, 400, BAD, "bad path"),
    case(M, "delete", {}, 400, BAD, "no path"),
    case(M, "delete", {"path": "no/such"}, 404, NOT_FOUND, "no such secret"),
]


@pytest.mark.parametrize(("route", "action", "body", "status", "then"), CASES)
def test_route(
    seeded: Node, caplog: pytest.LogCaptureFixture, route: str, action: str, body: Any, status: int, then: Any
) -> None:
    before = snapshot(seeded)
    with caplog.at_level(logging.DEBUG, logger="spike"):
        answer = seeded.call(route, body, action=action)
        assert answer.status == status, answer.body
        assert answer.content_type == "application/json"
        if isinstance(then, str):
            assert answer.error() == then
            assert snapshot(seeded) == before  # a rejected request changes nothing
            detail = [r for r in caplog.records if r.name == "spike.nexus.secrets"]
            assert detail, "the reason for a refusal goes to the log"
        else:
            then(answer.json(), seeded)
    for value in SECRET_VALUES:
        assert value not in caplog.text
        assert value.encode() not in answer.body or status == 200


def test_every_secrets_route_is_in_the_table(node: Node) -> None:
    """A route added to the API without cases here fails this test."""
    tested = {(route, action, status) for route, action, _, status, _ in (c.values for c in CASES)}
    for path, action in node.api.routes:
        if path in (S, M):
            statuses = {s for r, a, s in tested if (r, a) == (path, action)}
            assert {200, 400} <= statuses, (path, action, statuses)


# ---------------------------------------------------------------------- routing, guards, readiness


ROUTES_WITH_KEY = [
    (S, ""), (S, "get"), (S, "delete"), (S, "undelete"), (S, "destroy"), (S, "list"),
    (M, "get"), (M, "put"), (M, "delete"), (CIPHER_ENCRYPT_PATH, ""), (CIPHER_DECRYPT_PATH, ""),
]  # fmt: skip


def test_the_data_routes_are_guarded(node: Node) -> None:
    """Every secrets and cipher route needs the key and a permission (policy, or the superuser role)."""
    data = {r: spec for r, spec in node.api.routes.items() if r[0].startswith(("/v1/store/", "/v1/cipher/"))}
    assert set(data) == set(ROUTES_WITH_KEY)
    assert all(spec.needs_key and isinstance(spec.guard, Granted) for spec in data.values())


@pytest.mark.parametrize(("route", "action"), ROUTES_WITH_KEY)
def test_503_until_the_key_is_verified_and_again_once_it_is_gone(locked_node: Node, route: str, action: str) -> None:
    body = {"path": "app/db", "values": {"k": "v"}, "plaintext": "aGk="}
    answer = locked_node.call(route, body, action=action)
    assert (answer.status, answer.error()) == (503, "state_not_ready")
    locked_node.unlock()
    assert locked_node.call(route, body, action=action).status != 503
    locked_node.lock()
    answer = locked_node.call(route, body, action=action)
    assert (answer.status, answer.error()) == (503, "state_not_ready")


def test_nothing_is_written_while_not_ready(locked_node: Node) -> None:
    before = snapshot(locked_node)
    for route, action in ROUTES_WITH_KEY:
        locked_node.call(route, {"path": "app/db", "values": {"k": "v"}}, action=action)
    assert snapshot(locked_node) == before


@pytest.mark.parametrize(("route", "action"), ROUTES_WITH_KEY)
def test_401_for_anyone_but_the_superuser(seeded: Node, route: str, action: str) -> None:
    before = snapshot(seeded)
    body = {"path": "app/db", "values": {"k": "v"}, "versions": [3], "plaintext": "aGk="}
    for name, peer in OTHER_PEERS.items():
        answer = seeded.call(route, body, action=action, peer=peer)
        assert (answer.status, answer.error()) == (401, "access_unauthorized"), name
    assert snapshot(seeded) == before


def test_before_the_key_everyone_hears_503(locked_node: Node) -> None:
    """Policies are sealed too: before the key no permission can be checked, so nobody learns more."""
    for name, peer in OTHER_PEERS.items():
        answer = locked_node.call(S, {"path": "a"}, action="get", peer=peer)
        assert (answer.status, answer.error()) == (503, "state_not_ready"), name


@pytest.mark.parametrize(
    ("route", "query_action"),
    [(S, "nope"), (S, "put"), (S, "GET"), (M, ""), (M, "list"), (M, "nope"), (CIPHER_ENCRYPT_PATH, "get")],
)
def test_unknown_action_is_400(seeded: Node, route: str, query_action: str) -> None:
    before = snapshot(seeded)
    answer = seeded.call(route, {"path": "app/db", "values": {"k": "v"}}, action=query_action)
    assert (answer.status, answer.error()) == (400, "api_bad_request")
    assert snapshot(seeded) == before


@pytest.mark.parametrize("path", ["/", "/v1", "/v2/store/secrets", "/v1/nope"])
def test_unknown_path_outside_spikes_prefixes_is_404(seeded: Node, path: str) -> None:
    answer = seeded.call(path, {"path": "app/db"}, action="get")
    assert (answer.status, answer.error()) == (404, "api_not_found")


@pytest.mark.parametrize(
    "path", ["/v1/store/secret", "/v1/store/secrets/", "/v1/store/secrets/app/db", "/v1/store", "/v1/storex"]
)
def test_unknown_path_under_spikes_prefixes_is_400_as_from_spike(seeded: Node, path: str) -> None:
    """SPIKE's Go Nexus answers every request it has no route for with its fallback, 400 (issue 17).

    /v1/storex is not under /v1/store: outside SPIKE's prefixes, so 404 (no Vault face in this node)."""
    answer = seeded.call(path, {"path": "app/db"}, action="get")
    expected = (404, "api_not_found") if path == "/v1/storex" else (400, "api_bad_request")
    assert (answer.status, answer.error()) == expected


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_are_400_as_from_spike(seeded: Node, method: str) -> None:
    """Was 405, which SPIKE's Go SDK reports as "unexpected status code from peer" (issue 17)."""
    before = snapshot(seeded)
    answer = seeded.call(S, {"path": "app/db", "values": {"k": "v"}}, method=method)
    assert (answer.status, answer.error()) == (400, "api_bad_request")
    assert snapshot(seeded) == before


def test_writes_answer_with_a_future_and_reads_inline(seeded: Node) -> None:
    """What the server relies on: a write's answer comes once its commit is done."""
    reply = seeded.request(S, {"path": "new/x", "values": {"k": "v"}})
    assert isinstance(reply, Future)
    assert reply.result(10).status == 200
    assert not isinstance(seeded.request(S, {"path": "new/x"}, action="get"), Future)


def test_a_cas_conflict_is_logged_with_its_versions(seeded: Node, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="spike"):
        answer = seeded.call(S, {"path": "app/db", "values": {"k": PW[1]}, "cas": 1})
    assert answer.status == 409
    assert "check-and-set expected version 1, current is 3" in caplog.text
    assert PW[1] not in caplog.text
