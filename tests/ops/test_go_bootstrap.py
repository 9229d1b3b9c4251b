"""SPIKE's Go bootstrap against spike's Nexus (issue 17 section 1): no key record is ever sent.

Go bootstrap deals its key's shards to the keepers itself (`{"shard": [32 bytes]}`, no id, no epoch),
then posts `/v1/bootstrap/verify` sealed under the raw root key, without associated data.  A Nexus
without a key record adopts the key the keepers' shards rebuild only if every shard it saw lies on one
polynomial and the verification opens under that key; it then writes the record and re-seeds the
keepers with its own shards.  The shards here come from a polynomial of their own (Go's derivation is
not spike's): any one the keepers agree on will do.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spike.app.api.messages import BOOTSTRAP_VERIFY_PATH
from spike.protocol.effects import Phase, RequestKind
from spike.protocol.material import RootKey
from spike.protocol.shamir import ORDER, ShardDerivation, on_one_polynomial, share_for, split_with
from tests.ops.ops_helpers import KEEPERS, RECORD, ROOT_KEY, Node, unlock
from tests.ops.ops_helpers import SHARES as NEXUS_SHARES
from tests.spike_go_sdk import conclude

SECRET = int.from_bytes(ROOT_KEY, "big")
GO_SHARDS = split_with(SECRET, [0x1234_5678_9ABC % ORDER], KEEPERS)  # 2-of-3, not spike's coefficients
TEXT = os.urandom(32).hex()  # Go bootstrap verifies with a random hex text


def verify_body(key: bytes = ROOT_KEY, text: str = TEXT) -> bytes:
    """reqres.BootstrapVerifyRequest: Go marshals []byte as standard base64."""
    nonce = os.urandom(12)
    sealed = AESGCM(key).encrypt(nonce, text.encode(), None)
    return msgspec.json.encode(
        {"nonce": base64.b64encode(nonce).decode(), "ciphertext": base64.b64encode(sealed).decode()}
    )


def go_keeper_answer(keeper_id: int, y: int | None = None) -> bytes:
    """What SPIKE's keeper answers to a shard read: the shard only."""
    value = GO_SHARDS[keeper_id] if y is None else y
    return b'{"shard":[%s]}' % ",".join(str(b) for b in value.to_bytes(32, "big")).encode()


@pytest.fixture
def empty(tmp_path: Path) -> Iterator[Node]:
    node = Node(tmp_path / "empty", initialised=False)
    try:
        yield node
    finally:
        node.close()


def polled(node: Node, answers: dict[int, bytes | None]) -> None:
    """One round of polls, each keeper answering as given (None: 404, empty)."""
    for _ in range(10):
        if set(answers) <= set(node.driver.pending):
            break
        node.driver.tick()
    assert set(answers) <= set(node.driver.pending), "the keepers were not polled"
    for keeper_id, body in answers.items():
        node.driver.answer(keeper_id, 404 if body is None else 200, b"{}" if body is None else body)


def test_go_bootstrap_is_adopted_once_verified(empty: Node) -> None:
    polled(empty, {i: go_keeper_answer(i) for i in KEEPERS})
    answer = empty.call(BOOTSTRAP_VERIFY_PATH, verify_body(), as_="bootstrap")
    go = conclude(answer.status, answer.body)
    assert go.error is None, answer.body
    assert go.field("hash") == hashlib.sha256(TEXT.encode()).hexdigest()  # what Go bootstrap checks
    assert empty.custody.phase is Phase.READY
    record = empty.nexus_store.load_key_record()
    assert record is not None and record.epoch == 1 and record.threshold == 2 and record.keeper_ids == KEEPERS
    assert record == RECORD  # the record of that key with this Nexus's own shards (tests/ops/ops_helpers.py)
    # Every keeper is re-seeded with this Nexus's own shard of the adopted key.
    pushed = {r.keeper_id for r in empty.driver.sent if r.kind is RequestKind.PUSH}
    assert pushed == set(KEEPERS)


def test_with_spikes_derivation_the_record_commits_to_the_shards_go_bootstrap_dealt(tmp_path: Path) -> None:
    """--shard-derivation spike: Go bootstrap's own shards (SPIKE's derivation) are what the record commits to,
    so no keeper is re-seeded and a SPIKE Go Nexus can read them after this one."""
    node = Node(tmp_path / "spike-derived", initialised=False, derivation=ShardDerivation.SPIKE)
    try:
        key = RootKey(ROOT_KEY)
        go = {i: share_for(key, epoch=1, threshold=2, id=i, derivation=ShardDerivation.SPIKE) for i in KEEPERS}
        polled(node, {i: b'{"shard":[%s]}' % ",".join(map(str, go[i].secret_bytes())).encode() for i in KEEPERS})
        answer = node.call(BOOTSTRAP_VERIFY_PATH, verify_body(), as_="bootstrap")
        assert conclude(answer.status, answer.body).error is None, answer.body
        record = node.nexus_store.load_key_record()
        assert record is not None and record.derivation is ShardDerivation.SPIKE
        assert all(record.matches_share(go[i]) for i in KEEPERS)
        assert node.custody.phase is Phase.READY
    finally:
        node.close()


def test_a_shard_off_the_polynomial_is_refused_and_nothing_is_written(empty: Node) -> None:
    """With 3 keepers and t = 2 the third shard is a real check."""
    answers = {i: go_keeper_answer(i) for i in KEEPERS}
    answers[3] = go_keeper_answer(3, GO_SHARDS[3] + 1)
    polled(empty, answers)
    answer = empty.call(BOOTSTRAP_VERIFY_PATH, verify_body(), as_="bootstrap")
    assert conclude(answer.status, answer.body).error == "api_bad_request"
    assert b"not shards of one key" in answer.body
    assert empty.custody.phase is Phase.UNINITIALISED and empty.nexus_store.load_key_record() is None


def test_fewer_than_t_shards_is_not_ready_and_go_asks_again(empty: Node) -> None:
    polled(empty, {1: go_keeper_answer(1), 2: None, 3: None})
    answer = empty.call(BOOTSTRAP_VERIFY_PATH, verify_body(), as_="bootstrap")
    assert conclude(answer.status, answer.body).error == "state_not_ready"
    assert empty.nexus_store.load_key_record() is None
    polled(empty, {i: go_keeper_answer(i) for i in KEEPERS})
    answer = empty.call(BOOTSTRAP_VERIFY_PATH, verify_body(), as_="bootstrap")
    assert conclude(answer.status, answer.body).error is None


def test_a_verification_under_another_key_adopts_nothing(empty: Node) -> None:
    polled(empty, {i: go_keeper_answer(i) for i in KEEPERS})
    answer = empty.call(BOOTSTRAP_VERIFY_PATH, verify_body(key=bytes(range(1, 33))), as_="bootstrap")
    assert conclude(answer.status, answer.body).error == "api_bad_request"
    assert empty.custody.phase is Phase.UNINITIALISED and empty.nexus_store.load_key_record() is None


@pytest.mark.parametrize("who", ["superuser", "restore", "keeper-1", "nobody"])
def test_only_bootstrap_may_verify(empty: Node, who: str) -> None:
    polled(empty, {i: go_keeper_answer(i) for i in KEEPERS})
    assert empty.call(BOOTSTRAP_VERIFY_PATH, verify_body(), as_=who).status == 401
    assert empty.nexus_store.load_key_record() is None


def test_a_ready_nexus_opens_go_bootstraps_raw_key_form(node: Node) -> None:
    unlock(node, NEXUS_SHARES)
    answer = node.call(BOOTSTRAP_VERIFY_PATH, verify_body(), as_="bootstrap")
    assert conclude(answer.status, answer.body).field("hash") == hashlib.sha256(TEXT.encode()).hexdigest()


def test_points_on_one_polynomial() -> None:
    points = dict(GO_SHARDS)
    assert on_one_polynomial(points, 2)
    assert on_one_polynomial({1: points[1], 3: points[3] + 5}, 2)  # t points always define one
    assert not on_one_polynomial({**points, 3: points[3] + 1}, 2)
    assert not on_one_polynomial({**points, 1: 0}, 2)
