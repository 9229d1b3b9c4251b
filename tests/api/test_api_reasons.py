"""Every refusal says why (issue 18): ``{"err": code, "reason": sentence}``, and the sentence gives nothing away.

SPIKE's clients read ``err`` only (its Go SDK ignores fields it does not know), so ``reason`` is an
added field: the code stays what it was.  These are the refusals a user met with no reason before
(check-and-set required, a write under ``spike/``, a ciphertext that does not open), the 503s, which
now say which wait Nexus is in, and the rule that a reason never tells a caller whether a path it may
not read exists.
"""

from __future__ import annotations

import logging

import pytest

from spike.app.api.messages import CIPHER_DECRYPT_PATH, POLICY_PATH, SECRETS_METADATA_PATH, SECRETS_PATH
from spike.protocol.identity import SpiffeId
from tests.api.api_helpers import TRUST_DOMAIN, Node

OCTET_STREAM = "application/octet-stream"
WORKLOAD = SpiffeId(TRUST_DOMAIN, "/workload/web")


def refusal(node: Node, path: str, body: object, *, action: str = "", **options: object) -> tuple[int, str, str]:
    answer = node.call(path, body, action=action, **options)
    return answer.status, answer.error(), answer.json()["reason"]


def test_check_and_set_required_says_so(node: Node) -> None:
    assert node.call(SECRETS_PATH, {"path": "app/cas", "values": {"k": "v"}}).status == 200
    assert node.call(SECRETS_METADATA_PATH, {"path": "app/cas", "cas_required": True}, action="put").status == 200
    status, code, reason = refusal(node, SECRETS_PATH, {"path": "app/cas", "values": {"k": "w"}})
    assert (status, code) == (400, "api_bad_request")
    assert "requires check-and-set" in reason


def test_a_write_under_spike_says_the_path_is_reserved(node: Node) -> None:
    status, code, reason = refusal(node, SECRETS_PATH, {"path": "spike/mine", "values": {"k": "v"}})
    assert (status, code) == (400, "api_bad_request")
    assert reason == "paths under spike/ are reserved for the system"


@pytest.mark.parametrize(
    ("blob", "said"),
    [
        (b"garbage", "not a ciphertext of `spike cipher encrypt`"),
        (b"\x01" + bytes(12) + b"sixteen bytes!!!", "does not open under this Nexus's cipher key"),
    ],
    ids=["not a ciphertext", "does not open"],
)
def test_decrypting_garbage_says_why(node: Node, blob: bytes, said: str) -> None:
    status, code, reason = refusal(node, CIPHER_DECRYPT_PATH, blob, content_type=OCTET_STREAM)
    assert (status, code) == (400, "api_bad_request")
    assert said in reason


def test_a_cas_conflict_does_not_tell_a_writer_the_current_version(node: Node) -> None:
    for _ in range(3):
        assert node.call(SECRETS_PATH, {"path": "app/v", "values": {"k": "v"}}).status == 200
    status, code, reason = refusal(node, SECRETS_PATH, {"path": "app/v", "values": {"k": "v"}, "cas": 1})
    assert (status, code) == (409, "api_conflict")
    assert "check-and-set failed" in reason and "3" not in reason


def test_503_says_which_wait_nexus_is_in(locked_node: Node) -> None:
    status, code, reason = refusal(locked_node, SECRETS_PATH, {"path": "app/x"}, action="get")
    assert (status, code, reason) == (503, "state_not_ready", "it is waiting for the shards of its root key")


def test_a_refused_caller_hears_the_same_for_a_path_that_exists_and_one_that_does_not(node: Node) -> None:
    """A workload with a policy on web/ asks for app/db (which exists) and app/none (which does not)."""
    assert node.call(SECRETS_PATH, {"path": "app/db", "values": {"k": "v"}}).status == 200
    policy = {
        "name": "web",
        "spiffeidPattern": f"^spiffe://{TRUST_DOMAIN}/workload/web$",
        "pathPattern": "^web/.*",
        "permissions": ["read"],
    }
    assert node.call(POLICY_PATH, policy).status == 200
    answers = {
        path: refusal(node, SECRETS_PATH, {"path": path}, action="get", peer=WORKLOAD)
        for path in ("app/db", "app/none")
    }
    (exists_status, exists_code, exists_reason), (absent_status, absent_code, absent_reason) = answers.values()
    assert (exists_status, exists_code) == (absent_status, absent_code) == (401, "access_unauthorized")
    assert exists_reason.replace("app/db", "PATH") == absent_reason.replace("app/none", "PATH")
    assert "no such" not in exists_reason


def test_no_such_policy_is_logged_by_the_policy_logger(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger="spike"):
        status, code, reason = refusal(node, POLICY_PATH, {"id": "nope"}, action="get")
    assert (status, code, reason) == (404, "api_not_found", "no such policy")
    said = [r.name for r in caplog.records if "no such policy" in r.getMessage()]
    assert said == ["spike.nexus.policy"]
