"""The memory backend (SPIKE_NEXUS_BACKEND_STORE=memory, issue 17 section 4): Nexus's API with nothing kept.

The real route table over the in-memory store, as `spike nexus --backend-store memory` wires it
(`memory_mode.memory_api`): secrets, policies and the cipher work from the start; the routes of a
key in custody (bootstrap, recover, restore, rotate) answer 400 with the reason to every caller, as
SPIKE's memory Nexus answers recover and restore; status says the backend is memory.
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec
import pytest

from spike.app.api.messages import (
    BOOTSTRAP_INIT_PATH,
    BOOTSTRAP_VERIFY_PATH,
    CIPHER_DECRYPT_PATH,
    CIPHER_ENCRYPT_PATH,
    POLICY_PATH,
    RECOVER_PATH,
    RESTORE_PATH,
    ROTATE_PATH,
    SECRETS_PATH,
    STATUS_PATH,
    StatusBody,
)
from spike.app.commands import status
from spike.app.nexus.cipher_api import CipherApi
from spike.app.nexus.memory_mode import memory_api
from spike.app.nexus.routes import NexusApi
from spike.app.store.memory import MemoryBackend
from spike.protocol.api import ApiRequest
from spike.protocol.identity import Role, SpiffeId
from tests.api.api_helpers import OTHER_PEERS, SUPERUSER, TRUST, WAIT, Answer

WORKLOAD = SpiffeId.parse("spiffe://spike.test/app/payments")


class MemoryNode:
    def __init__(self) -> None:
        self.store = MemoryBackend()
        self.api: NexusApi = memory_api(self.store, TRUST, CipherApi())

    def call(self, path: str, body: Any = None, *, action: str = "", peer: SpiffeId | None = SUPERUSER) -> Answer:
        raw = msgspec.json.encode({} if body is None else body)
        reply = self.api(ApiRequest("POST", path, peer, raw, f"action={action}" if action else "", "application/json"))
        response = reply.result(WAIT) if isinstance(reply, Future) else reply
        return Answer(response.status, response.body, response.content_type)


@pytest.fixture
def memory_node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MemoryNode]:
    monkeypatch.chdir(tmp_path)  # a database that fell back to a file would show up here
    node = MemoryNode()
    try:
        yield node
    finally:
        node.store.close()
    assert list(tmp_path.iterdir()) == [], "the memory backend wrote a file"


def test_secrets_policies_and_the_cipher_work_from_the_start(memory_node: MemoryNode) -> None:
    assert memory_node.call(SECRETS_PATH, {"path": "app/db", "values": {"pw": "s3"}}).json() == {"version": 1}
    assert memory_node.call(SECRETS_PATH, {"path": "app/db", "values": {"pw": "s4"}}).json() == {"version": 2}
    got = memory_node.call(SECRETS_PATH, {"path": "app/db", "version": 1}, action="get")
    assert got.json() == {"data": {"pw": "s3"}, "version": 1}
    assert memory_node.call(SECRETS_PATH, {}, action="list").json()["keys"] == ["app/db"]
    # A policy gives a workload what the superuser role gives by itself, as on every backend.
    assert memory_node.call(SECRETS_PATH, {"path": "app/db"}, action="get", peer=WORKLOAD).status == 401
    policy = {
        "name": "payments",
        "spiffeidPattern": "^spiffe://spike\\.test/app/payments$",
        "pathPattern": "^app/",
        "permissions": ["read"],
    }
    assert memory_node.call(POLICY_PATH, policy).status == 200
    read = memory_node.call(SECRETS_PATH, {"path": "app/db"}, action="get", peer=WORKLOAD)
    assert read.json() == {"data": {"pw": "s4"}, "version": 2}
    sealed = memory_node.call(CIPHER_ENCRYPT_PATH, {"plaintext": base64.b64encode(b"hello").decode()})
    assert sealed.status == 200
    opened = memory_node.call(CIPHER_DECRYPT_PATH, sealed.json())
    assert opened.json() == {"plaintext": base64.b64encode(b"hello").decode()}


def test_the_routes_of_a_key_in_custody_answer_400_with_the_reason_to_every_caller(memory_node: MemoryNode) -> None:
    callers = [SUPERUSER, TRUST.id_of(Role.BOOTSTRAP), *OTHER_PEERS.values()]
    for path in (BOOTSTRAP_INIT_PATH, BOOTSTRAP_VERIFY_PATH, RECOVER_PATH, RESTORE_PATH, ROTATE_PATH):
        for peer in callers:
            answer = memory_node.call(path, {}, peer=peer)
            assert (answer.status, answer.error()) == (400, "api_bad_request"), (path, peer)
            assert "memory backend" in answer.json()["reason"], (path, answer)


def test_status_says_memory_and_nothing_in_custody(memory_node: MemoryNode) -> None:
    body = memory_node.call(STATUS_PATH).json()
    assert body["backend"] == "memory"
    assert (body["phase"], body["keepers"], body["epoch"], body["threshold"]) == ("ready", [], None, 0)
    assert memory_node.call(STATUS_PATH, peer=WORKLOAD).status == 401  # still the operators' route
    # What `spike status` makes of it: ready, exit 0 (no keepers to be degraded by), and says nothing is kept.
    answer = msgspec.json.decode(memory_node.call(STATUS_PATH).body, type=StatusBody)
    assert status.exit_code(answer) == status.EXIT_READY
    assert "memory backend, NOTHING IS KEPT" in status.render(answer, "https://nexus.test")


def test_two_memory_stores_of_one_process_are_apart(memory_node: MemoryNode) -> None:
    other = MemoryNode()
    try:
        assert memory_node.call(SECRETS_PATH, {"path": "a", "values": {"k": "v"}}).status == 200
        assert other.call(SECRETS_PATH, {}, action="list").json()["keys"] == []
    finally:
        other.store.close()
