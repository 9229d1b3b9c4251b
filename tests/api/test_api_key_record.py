"""`/v1/bootstrap/init` keeps the deployment's epochs: they only grow, and the record remembers them (issue 14 L2)."""

from __future__ import annotations

import msgspec
import pytest

from spike.app.api.messages import BOOTSTRAP_INIT_PATH, InitRequest
from spike.app.store.sqlite_schema import NexusStore
from spike.protocol import RootKey, seal_key
from spike.protocol.identity import Role
from tests.api.api_helpers import KEEPERS, ROOT_KEY, TRUST, Node

pytestmark = pytest.mark.anyio  # the custody driver reads the event loop's clock

BOOTSTRAP = TRUST.id_of(Role.BOOTSTRAP)
NEW_KEY = RootKey(bytes(range(2, 34)))


def init(node: Node, epoch: int, *, key: RootKey = NEW_KEY, replace: bool = True) -> int:
    record, _ = seal_key(key, epoch=epoch, threshold=2, keeper_ids=KEEPERS)
    body = msgspec.to_builtins(InitRequest(record=record, replace=replace))
    return node.call(BOOTSTRAP_INIT_PATH, body, peer=BOOTSTRAP).status


async def test_a_replacing_record_must_grow_the_epoch_and_is_stored_with_the_ones_before(node: Node) -> None:
    assert node.custody.record == node.record and node.record.epoch == 1
    before = node.nexus_store.load_key_record()
    for epoch in (1, 0):  # bootstrap --force with an epoch that does not grow: refused, nothing changes
        assert init(node, epoch) == 400
    assert node.nexus_store.load_key_record() == before == node.custody.record
    assert init(node, 2) == 200
    stored = node.nexus_store.load_key_record()
    assert stored is not None and stored.epoch == 2 and stored.history == ((0, 1),)
    assert node.custody.record == stored
    assert init(node, 2) == 200  # the same request again (a retry): changes nothing
    assert node.nexus_store.load_key_record() == stored
    assert init(node, 9, key=ROOT_KEY) == 200
    stored = node.nexus_store.load_key_record()
    assert stored is not None and stored.history == ((0, 2),)
    assert [e for e in range(11) if stored.had_epoch(e)] == [0, 1, 2, 9]
    # What Nexus reads at its next start.
    node.nexus_store.close()
    node.nexus_store = NexusStore(node.data_dir)
    assert node.nexus_store.load_key_record() == stored


async def test_a_first_record_and_a_refused_one_are_as_before(locked_node: Node) -> None:
    assert init(locked_node, 5, replace=False) == 409  # another record is in place: refused as before
    assert locked_node.nexus_store.load_key_record() == locked_node.record


async def test_a_replacing_record_must_also_be_above_every_epoch_a_rotation_used(node: Node) -> None:
    """bootstrap --force after an abandoned rotation to epoch 5: epochs 2 to 5 are never used again."""
    from spike.protocol.pending import PendingRotation

    burnt, _ = seal_key(ROOT_KEY, epoch=5, threshold=2, keeper_ids=KEEPERS)
    pending = PendingRotation.seal(ROOT_KEY, node.record, ROOT_KEY, burnt)
    assert node.nexus_store.persist_rotation(pending, node.store.keyring().wrap(ROOT_KEY, 5)) is True
    assert node.nexus_store.abandon_rotation(pending) is True
    answer = node.call(
        BOOTSTRAP_INIT_PATH,
        msgspec.to_builtins(
            InitRequest(record=seal_key(NEW_KEY, epoch=3, threshold=2, keeper_ids=KEEPERS)[0], replace=True)
        ),
        peer=BOOTSTRAP,
    )
    assert answer.status == 409
    assert answer.json() == {
        "err": "api_conflict",
        "reason": "key epoch 3 is not above 5, the highest epoch this deployment has used (epochs are never "
        "reused): bootstrap again with a higher epoch",
    }
    assert node.nexus_store.load_key_record() == node.record == node.custody.record
    assert init(node, 6) == 200
    stored = node.nexus_store.load_key_record()
    assert stored is not None and stored.epoch == 6 and node.custody.record == stored
    assert node.nexus_store.load_rotation_state() == (None, None, 6)


async def test_a_record_split_another_way_than_configured_is_refused_with_the_reason(node: Node) -> None:
    """docs/spike-keepers.md: bootstrap splits the key as Nexus's status says; a record split otherwise is a 400."""
    from spike.protocol import ShardDerivation

    before = node.nexus_store.load_key_record()
    record, _ = seal_key(NEW_KEY, epoch=2, threshold=2, keeper_ids=KEEPERS, derivation=ShardDerivation.SPIKE)
    answer = node.call(
        BOOTSTRAP_INIT_PATH, msgspec.to_builtins(InitRequest(record=record, replace=True)), peer=BOOTSTRAP
    )
    assert answer.status == 400
    reason = msgspec.json.decode(answer.body)["reason"]
    assert "derived the 'spike' way, configured is 'hmac' (--shard-derivation)" in reason
    assert node.nexus_store.load_key_record() == before == node.custody.record
    assert init(node, 2) == 200  # the same key split the configured way: installed
