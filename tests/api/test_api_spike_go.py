"""SPIKE's Go Pilot and SDK against this Nexus, unchanged (issue 17 section 1).

Each test replays the bytes the Go SDK sends (tests/spike_go_sdk.py, written from its code) without
spike's `x-spike-extensions` header, and checks what the Go client concludes from the answer.
"""

from __future__ import annotations

from concurrent.futures import Future

import pytest

from spike.app.api.messages import (
    CIPHER_ENCRYPT_PATH,
    POLICY_PATH,
    RECOVER_PATH,
    SECRETS_METADATA_PATH,
    SECRETS_PATH,
)
from spike.app.model import kv
from spike.app.nexus import secrets_api
from spike.protocol.identity import SpiffeId
from tests.api.api_helpers import TRUST_DOMAIN, Node
from tests.spike_go_sdk import (
    DELETE_CURRENT,
    LIST_ALL,
    POLICY_LIST,
    POLICY_PUT,
    POLICY_READ,
    SECRET_PUT,
    UNDELETE_CURRENT,
    UNEXPECTED,
    Conclusion,
    conclude,
)

S = SECRETS_PATH
WEB = SpiffeId(TRUST_DOMAIN, "/workload/web")


def go(
    node: Node, path: str, body: bytes, *, action: str = "", method: str = "POST", peer: SpiffeId | None = None
) -> Conclusion:
    """Send as the Go SDK does (POST, JSON, no spike header) and conclude as it does."""
    options = {} if peer is None else {"peer": peer}
    answer = node.call(path, body, action=action, method=method, **options)
    return conclude(answer.status, answer.body)


def put_versions(node: Node, path: str, count: int) -> None:
    for n in range(count):
        assert node.call(S, {"path": path, "values": {"k": f"v{n + 1}"}}).status == 200


def current(node: Node, path: str) -> tuple[int, dict[str, str]] | None:
    answer = node.call(S, {"path": path}, action="get")
    if answer.status == 404:
        return None
    body = answer.json()
    return body["version"], body["data"]


# ---------------------------------------------------------------- delete / undelete with default flags


def test_delete_and_undelete_with_default_flags_act_on_the_current_version(node: Node) -> None:
    """`spike secret delete app/db` sends versions [0] ("current"): was 400 (versions must be 1..)."""
    put_versions(node, "app/db", 2)
    assert go(node, S, DELETE_CURRENT, action="delete").error is None
    assert current(node, "app/db") is None
    assert node.call(S, {"path": "app/db", "version": 1}, action="get").status == 200  # only the current one
    assert go(node, S, UNDELETE_CURRENT, action="undelete").error is None
    assert current(node, "app/db") == (2, {"k": "v2"})


def test_zero_among_other_versions_is_the_current_one(node: Node) -> None:
    put_versions(node, "app/db", 3)
    assert go(node, S, b'{"path":"app/db","versions":[0,1]}', action="delete").error is None
    meta = node.call(SECRETS_METADATA_PATH, {"path": "app/db"}, action="get").json()
    deleted = {int(v) for v, info in meta["versions"].items() if info["deletedTime"]}
    assert deleted == {1, 3}


def test_delete_of_an_absent_secret_is_not_found_for_go(node: Node) -> None:
    assert go(node, S, DELETE_CURRENT, action="delete").error == "api_not_found"


def test_vaults_face_still_refuses_version_zero() -> None:
    """0 means "current" only on SPIKE's routes: Vault's API has no version 0."""
    with pytest.raises(kv.InvalidRequest):
        kv.check_versions([0])
    assert kv.check_versions([0, 2], zero_is_current=True) == [0, 2]


# ---------------------------------------------------------------- policy get: SPIKE's spelling


def test_policy_get_answers_the_pattern_under_the_sdks_spelling_too(node: Node) -> None:
    pattern = f"^spiffe://{TRUST_DOMAIN}/workload/web$"
    assert go(node, POLICY_PATH, POLICY_PUT % (b"web", pattern.encode(), b"^app/.*$")).error is None
    listed = go(node, POLICY_PATH, POLICY_LIST, action="list")
    assert listed.error is None
    (item,) = listed.field("policies")
    got = go(node, POLICY_PATH, POLICY_READ % item["id"].encode(), action="get")
    assert got.error is None
    # data.Policy's field is tagged `json:"spiffiedPattern"` (sic): that is what the Go Pilot shows.
    assert got.field("spiffiedPattern") == pattern
    assert got.body["spiffeidPattern"] == pattern  # spike's own spelling stays (additive)
    assert (got.field("name"), got.field("pathPattern"), got.field("permissions")) == (
        "web",
        "^app/.*$",
        ["read", "write"],
    )


# ---------------------------------------------------------------- routing: SPIKE's fallback is 400


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE", "PATCH"])
def test_a_method_other_than_post_is_a_bad_request_for_go(node: Node, method: str) -> None:
    """Was 405: the Go SDK said "unexpected status code from peer"."""
    assert go(node, S, SECRET_PUT, method=method).error == "api_bad_request"
    assert current(node, "app/db") is None


@pytest.mark.parametrize(
    ("path", "action"),
    [
        ("/v1/store/secretz", ""),
        ("/v1/store", ""),
        ("/v1/acl/policies", "list"),
        ("/v1/cipher/rot13", ""),
        ("/v1/operator/nope", ""),
        ("/v1/bootstrap/contribute", ""),
        (S, "purge"),
        (POLICY_PATH, "undelete"),
        (RECOVER_PATH, "get"),
        (CIPHER_ENCRYPT_PATH, "list"),
    ],
)
def test_an_unknown_path_or_action_under_spikes_prefixes_is_a_bad_request(node: Node, path: str, action: str) -> None:
    """Was 404 for an unknown path: the Go SDK read that as "not found" (an empty list for `list`)."""
    conclusion = go(node, path, LIST_ALL, action=action)
    assert conclusion.error == "api_bad_request"
    assert conclusion.error != UNEXPECTED


# ---------------------------------------------------------------- list: every key, no paging


@pytest.fixture
def many(node: Node) -> Node:
    """1,500 secrets (more than the 1,000 a page held), written at once so they share a few commits."""
    replies = [node.request(S, {"path": f"app/k{n:04d}", "values": {"k": "v"}}) for n in range(1500)]
    for reply in replies:
        assert (reply.result(30) if isinstance(reply, Future) else reply).status == 200
    return node


def test_list_without_paging_fields_returns_every_key(many: Node) -> None:
    """The Go SDK sends `{}`: it got 1,000 keys and no sign of the rest."""
    listed = go(many, S, LIST_ALL, action="list")
    assert listed.error is None
    assert listed.field("keys") == [f"app/k{n:04d}" for n in range(1500)]
    assert "next_after" not in listed.body


def test_list_without_paging_fields_returns_only_what_the_caller_may_list(many: Node) -> None:
    policy = {"name": "web", "spiffeidPattern": f"^{WEB}$", "pathPattern": "^app/k1.*$", "permissions": ["list"]}
    assert many.call(POLICY_PATH, policy).status == 200
    listed = go(many, S, LIST_ALL, action="list", peer=WEB)
    assert listed.error is None
    assert listed.field("keys") == [f"app/k{n:04d}" for n in range(1000, 1500)]


def test_a_paging_caller_still_gets_pages(many: Node) -> None:
    page = many.call(S, {"limit": 1000}, action="list").json()
    assert len(page["keys"]) == 1000 and page["next_after"] == "app/k0999"
    rest = many.call(S, {"after": page["next_after"]}, action="list").json()
    assert len(rest["keys"]) == 500 and "next_after" not in rest


def test_too_many_keys_without_paging_is_a_clear_400(many: Node, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(secrets_api, "UNPAGED_MAX_KEYS", 1000)
    answer = many.call(S, LIST_ALL, action="list")
    assert (answer.status, answer.error()) == (400, "api_bad_request")
    assert "page with `limit` and `after`" in answer.json()["reason"]
    assert conclude(answer.status, answer.body).error == "api_bad_request"


# ---------------------------------------------------------------- SPIKE's names (issue 17 section 4)


def test_spikes_paths_and_key_names_are_accepted(node: Node) -> None:
    """A leading `/`, SPIKE's extra path characters, keys with spaces: each was 400."""
    body = b'{"path":"/app/db","values":{"db password":"v1"}}'
    assert go(node, S, body).error is None
    assert go(node, S, b'{"path":"app/(x)/[y]{z}|q?*+\\\\w","values":{"k":"v2"}}').error is None
    got = go(node, S, b'{"path":"/app/db"}', action="get")
    assert (got.error, got.field("data")) == (None, {"db password": "v1"})
    # As in SPIKE, the leading slash is part of the path: /app/db and app/db are two secrets.
    assert go(node, S, b'{"path":"app/db"}', action="get").error == "api_not_found"
    assert go(node, S, LIST_ALL, action="list").field("keys") == ["/app/db", "app/(x)/[y]{z}|q?*+\\w"]
    assert go(node, S, b'{"path":"/app/db","versions":[0]}', action="delete").error is None


@pytest.mark.parametrize(
    "path", ["/spike/system/acl", "/spike", "a//b", "/", "app/", "app/../x", "app/!x", "/" + "a" * 512]
)
def test_paths_still_refused(node: Node, path: str) -> None:
    """The reserved system paths stay reserved with a leading slash; empty segments, .. and ! stay out."""
    body = b'{"path":"%s","values":{"k":"v"}}' % path.encode()
    assert go(node, S, body).error == "api_bad_request"
    assert go(node, S, LIST_ALL, action="list").field("keys") == []


def test_vaults_face_keeps_its_path_rules() -> None:
    for path in ("/app/db", "app/(x)"):
        with pytest.raises(kv.InvalidRequest):
            kv.check_path(path)


@pytest.mark.parametrize(("name", "ok"), [("web team", True), ("w" * 250, True), ("w" * 251, False), ("a/b", False)])
def test_policy_names_with_spaces_up_to_250(node: Node, name: str, ok: bool) -> None:
    body = POLICY_PUT % (name.encode(), b"^spiffe://spike.test/web$", b"^app/.*$")
    assert go(node, POLICY_PATH, body).error == (None if ok else "api_bad_request")
    if ok:
        got = go(node, POLICY_PATH, POLICY_READ % name.encode(), action="get")  # get takes the id or the name
        assert got.field("name") == name
