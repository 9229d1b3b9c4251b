"""`POST /v1/operator/import`: the superuser's one-request import (`spike migrate from-spike`).

The batch is what the CLI builds from a SPIKE database written by tests/spike_go_db.py.  Only the
superuser, only with the key; a bad body is a 400 with a code and changes nothing, even when only its
last item is bad; data already there is a 409 (without merge), a clash is a 409 (with merge).
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import msgspec
import pytest

from spike.app.api.messages import IMPORT_PATH, POLICY_PATH, SECRETS_METADATA_PATH, SECRETS_PATH
from spike.app.commands.migrate import import_request
from spike.app.spike_db import read_database
from spike.protocol.identity import SpiffeId
from spike.protocol.material import RootKey
from tests.api.api_helpers import OTHER_PEERS, TRUST_DOMAIN, Node, snapshot
from tests.spike_go_db import ROOT_KEY, VALUES, build_deployment


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The import the CLI sends for the fixture's SPIKE database, as JSON-like builtins."""
    path = tmp_path_factory.mktemp("spike-go") / "spike.db"
    build_deployment(path)
    request = import_request(read_database(path, RootKey(ROOT_KEY)), merge=False)
    body: dict[str, Any] = msgspec.to_builtins(request)
    return body


def nothing_written(node: Node) -> bool:
    return snapshot(node) == ([], []) and node.policies.list() == []


def get(node: Node, path: str, version: int = 0) -> tuple[int, Any]:
    answer = node.call(SECRETS_PATH, {"path": path, "version": version}, action="get")
    return answer.status, answer.json()


def test_the_superuser_imports_every_version_policy_and_time(node: Node, batch: dict[str, Any]) -> None:
    answer = node.call(IMPORT_PATH, batch)
    assert answer.status == 200, answer
    assert answer.json() == {"secrets": 4, "versions": 6, "deleted_versions": 2, "policies": 2}

    assert get(node, "apps/db")[1]["data"]["password"] == VALUES["v3"]
    assert get(node, "apps/db", 1)[1]["data"]["password"] == VALUES["v1"]
    assert get(node, "apps/db", 2)[0] == 404  # soft-deleted in SPIKE, soft-deleted here
    assert get(node, "old/token")[0] == 404  # deleted whole
    assert get(node, "/tenants/acme/api")[1]["data"] == {"api key": VALUES["slash"]}
    meta = node.call(SECRETS_METADATA_PATH, {"path": "apps/db"}, action="get").json()
    source = batch["secrets"][[s["path"] for s in batch["secrets"]].index("apps/db")]
    assert meta["versions"]["2"]["deletedTime"] is not None and meta["versions"]["3"]["deletedTime"] is None
    assert (meta["metadata"]["currentVersion"], meta["metadata"]["oldestVersion"]) == (3, 1)
    # SPIKE's times are kept (the fixture's clock, in December 2025), not the moment of the import.
    created = dt.datetime.fromtimestamp(source["versions"][0]["created_at"], dt.UTC)
    assert meta["versions"]["1"]["createdTime"].startswith(created.strftime("%Y-%m-%dT%H:%M:%S"))
    assert created.year == 2025

    policy = node.call(POLICY_PATH, {"id": "db readers"}, action="get").json()
    assert policy["pathPattern"] == "^apps/db$" and sorted(policy["permissions"]) == ["list", "read"]
    # The authorizer uses the imported policies at once.
    reader = SpiffeId(TRUST_DOMAIN, "/workload/db-1")
    assert node.call(SECRETS_PATH, {"path": "apps/db"}, action="get", peer=reader).status == 200
    assert node.call(SECRETS_PATH, {"path": "team/web"}, action="get", peer=reader).status == 401


@pytest.mark.parametrize("peer", sorted(OTHER_PEERS))
def test_nobody_but_the_superuser_imports(node: Node, batch: dict[str, Any], peer: str) -> None:
    answer = node.call(IMPORT_PATH, batch, peer=OTHER_PEERS[peer])
    assert (answer.status, answer.error()) == (401, "access_unauthorized")
    assert nothing_written(node)


def test_no_import_without_the_key(locked_node: Node, batch: dict[str, Any]) -> None:
    answer = locked_node.call(IMPORT_PATH, batch)
    assert (answer.status, answer.error()) == (503, "state_not_ready")


def with_last(batch: dict[str, Any], **change: Any) -> dict[str, Any]:
    """The batch with its last secret changed: every item before it is fine, and still nothing may be written."""
    secrets = [dict(s) for s in batch["secrets"]]
    secrets[-1] = secrets[-1] | change
    return batch | {"secrets": secrets}


def bad_version(batch: dict[str, Any], **change: Any) -> dict[str, Any]:
    last = batch["secrets"][-1]
    return with_last(batch, versions=[last["versions"][0] | change])


BAD_BODIES: dict[str, Any] = {
    "not json": lambda b: b"{not json",
    "unknown field": lambda b: b | {"overwrite": True},
    "reserved path": lambda b: with_last(b, path="spike/system/acl"),
    "dot segment": lambda b: with_last(b, path="apps/../etc"),
    "no version": lambda b: with_last(b, versions=[]),
    "version 0": lambda b: bad_version(b, version=0),
    "twice the version": lambda b: with_last(b, versions=b["secrets"][-1]["versions"] * 2),
    "bad key name": lambda b: bad_version(b, values={"bad/key": "x"}),
    "no values": lambda b: bad_version(b, values={}),
    "max versions": lambda b: with_last(b, max_versions=5000),
    "twice the path": lambda b: b | {"secrets": [*b["secrets"], b["secrets"][0]]},
    "bad pattern": lambda b: b | {"policies": [*b["policies"], b["policies"][0] | {"name": "x", "pathPattern": "("}]},
    "bad permission": lambda b: b | {"policies": [b["policies"][0] | {"permissions": ["admin"]}]},
    "no permission": lambda b: b | {"policies": [b["policies"][0] | {"permissions": []}]},
    "policy twice": lambda b: b | {"policies": [b["policies"][0], b["policies"][0]]},
}


@pytest.mark.parametrize("case", sorted(BAD_BODIES))
def test_a_bad_body_is_a_400_and_writes_nothing(node: Node, batch: dict[str, Any], case: str) -> None:
    body = BAD_BODIES[case](batch)
    answer = node.call(IMPORT_PATH, body)
    assert (answer.status, answer.error()) == (400, "api_bad_request"), answer
    for value in VALUES.values():
        assert value.encode() not in answer.body
    assert nothing_written(node)


def test_data_already_there_is_a_409_unless_merged_and_a_clash_always(node: Node, batch: dict[str, Any]) -> None:
    assert node.call(SECRETS_PATH, {"path": "mine", "values": {"k": "v"}}).status == 200
    before = snapshot(node)
    refused = node.call(IMPORT_PATH, batch)
    assert (refused.status, refused.error()) == (409, "api_conflict")
    assert "already holds 1 secret" in refused.json()["reason"]
    assert snapshot(node) == before

    assert node.call(IMPORT_PATH, batch | {"merge": True}).status == 200
    merged = snapshot(node)
    assert len(merged[0]) == 5

    fresh = {"path": "fresh", "versions": [{"version": 1, "values": {"k": "v"}, "created_at": 1.0}]}
    again = batch | {"merge": True, "secrets": [*batch["secrets"], fresh | {"created_at": 1.0, "updated_at": 1.0}]}
    clash = node.call(IMPORT_PATH, again)
    assert (clash.status, clash.error()) == (409, "api_conflict")
    assert "'apps/db'" in clash.json()["reason"] and "db readers" in clash.json()["reason"]
    assert snapshot(node) == merged  # not even the fresh path
    assert len(node.policies.list()) == 2


def test_the_lite_backend_has_no_import(tmp_path: Path, batch: dict[str, Any]) -> None:
    from spike.app.nexus.server import close_for_lite

    node = Node(tmp_path / "lite")
    try:
        node.unlock()
        close_for_lite(node.api)
        answer = node.call(IMPORT_PATH, batch)
        assert (answer.status, answer.error()) == (400, "api_bad_request")
        assert nothing_written(node)
    finally:
        node.close()
