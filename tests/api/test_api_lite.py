"""SPIKE's lite backend and lite workload role (issue 17 section 4).

SPIKE_NEXUS_BACKEND_STORE=lite is encryption as a service only: SPIKE's lite
Nexus routes only bootstrap, operator recover/restore and the cipher, and
answers 400 api_bad_request (its fallback) to the secret and policy routes.
A caller whose SPIFFE ID is spiffe://<td>/spike/workload/role/lite, or below it,
may use the cipher without a policy (spike-sdk-go spiffeid.IsLiteWorkload).
"""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path

import pytest

from spike.app.api.messages import CIPHER_DECRYPT_PATH, CIPHER_ENCRYPT_PATH, POLICY_PATH, SECRETS_PATH
from spike.app.nexus.server import close_for_lite
from spike.protocol.identity import SpiffeId
from tests.api.api_helpers import Node

LITE = SpiffeId.parse("spiffe://spike.test/spike/workload/role/lite")
WORKLOAD = SpiffeId.parse("spiffe://spike.test/app/payments")


@pytest.fixture
def lite_node(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path / "data", lite_workloads=("spike.test",))
    try:
        node.unlock()
        yield node
    finally:
        node.close()


def encrypt(node: Node, peer: SpiffeId) -> int:
    return node.call(CIPHER_ENCRYPT_PATH, {"plaintext": base64.b64encode(b"x").decode()}, peer=peer).status


def test_the_lite_role_uses_the_cipher_without_a_policy(lite_node: Node) -> None:
    for peer in (LITE, SpiffeId.parse("spiffe://spike.test/spike/workload/role/lite/instance-0")):
        answer = lite_node.call(CIPHER_ENCRYPT_PATH, {"plaintext": base64.b64encode(b"hello").decode()}, peer=peer)
        assert answer.status == 200, answer
        opened = lite_node.call(CIPHER_DECRYPT_PATH, answer.json(), peer=peer)
        assert opened.json() == {"plaintext": base64.b64encode(b"hello").decode()}


def test_the_lite_role_is_only_that_id_only_for_the_cipher_only_in_its_domains(lite_node: Node) -> None:
    for peer in (
        WORKLOAD,
        SpiffeId.parse("spiffe://spike.test/spike/workload/role/lite-x"),  # a prefix of the path is not it
        SpiffeId.parse("spiffe://other.test/spike/workload/role/lite"),  # another trust domain
    ):
        assert encrypt(lite_node, peer) == 401
    secrets = lite_node.call(SECRETS_PATH, {"path": "a", "values": {"k": "v"}}, peer=LITE)
    assert secrets.status == 401  # the role is for the cipher only: secrets still need a policy


def test_without_the_role_configured_the_same_id_needs_a_policy(node: Node) -> None:
    assert encrypt(node, LITE) == 401


def test_lite_backend_answers_the_secret_and_policy_routes_as_spikes_lite_does(lite_node: Node) -> None:
    close_for_lite(lite_node.api)
    for path, action, body in (
        (SECRETS_PATH, "", {"path": "a", "values": {"k": "v"}}),
        (SECRETS_PATH, "get", {"path": "a"}),
        (SECRETS_PATH, "list", {}),
        (POLICY_PATH, "", {"name": "p", "spiffeIdPattern": ".*", "pathPattern": ".*", "permissions": ["read"]}),
        (POLICY_PATH, "list", {}),
    ):
        answer = lite_node.call(path, body, action=action)
        assert (answer.status, answer.error()) == (400, "api_bad_request"), (path, action)
    assert encrypt(lite_node, LITE) == 200  # the cipher stays
    assert lite_node.store.list_paths("", limit=10) == []  # nothing was written
