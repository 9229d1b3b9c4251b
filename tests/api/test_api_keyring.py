"""A value sealed under a data key that no longer exists (after `bootstrap --force`), through the real API.

Not tampering: a 409 with a reason the caller can act on (write the value again), a warning in the log and no
"REFUSED TAMPERED DATA"; metadata shows the version as unreadable, never as live; new writes work at once.
"""

from __future__ import annotations

import logging

import msgspec
import pytest

from spike.app.api.messages import BOOTSTRAP_INIT_PATH, SECRETS_METADATA_PATH, SECRETS_PATH, InitRequest
from spike.protocol import RootKey, seal_key
from spike.protocol.effects import Phase
from spike.protocol.identity import Role
from tests.api.api_helpers import KEEPERS, TRUST, Node

pytestmark = pytest.mark.anyio  # the custody driver reads the event loop's clock

NEW_KEY = RootKey(bytes(range(7, 39)))
VALUE = "value-under-the-old-key-do-not-leak"


def force_bootstrap(node: Node) -> None:
    """`spike bootstrap --force` with a new root key, then the keepers' shards of it: Nexus READY again."""
    record, shares = seal_key(NEW_KEY, epoch=node.record.epoch + 1, threshold=2, keeper_ids=KEEPERS)
    body = msgspec.to_builtins(InitRequest(record=record, replace=True))
    assert node.call(BOOTSTRAP_INIT_PATH, body, peer=TRUST.id_of(Role.BOOTSTRAP)).status == 200
    node._dispatch()
    for keeper_id in KEEPERS[:2]:
        node.custody.submit_shard(shares[keeper_id], node.now)
    node._dispatch()
    assert node.custody.phase is Phase.READY and node.custody.record is not None
    assert node.custody.record.epoch == record.epoch


async def test_a_secret_under_a_key_that_no_longer_exists_is_a_409_with_a_reason(
    node: Node, caplog: pytest.LogCaptureFixture
) -> None:
    assert node.call(SECRETS_PATH, {"path": "app/db", "values": {"pw": VALUE}}).status == 200
    force_bootstrap(node)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="spike"):
        answer = node.call(SECRETS_PATH, {"path": "app/db"}, action="get")
    assert answer.status == 409
    assert answer.json() == {
        "err": "api_conflict",
        "reason": "app/db version 1 was sealed under data-key term 1, which no longer exists: the root key it "
        "belonged to was replaced (bootstrap --force); write it again",
    }
    assert "REFUSED TAMPERED DATA" not in caplog.text
    assert [r.levelno for r in caplog.records if "no longer exists" in r.getMessage()] == [logging.WARNING]
    assert VALUE not in caplog.text and VALUE.encode() not in answer.body
    # Metadata answers, and says the version cannot be read.
    meta = node.call(SECRETS_METADATA_PATH, {"path": "app/db"}, action="get")
    assert meta.status == 200
    assert meta.json()["versions"]["1"]["unreadable"] is True
    # Written again: a new version under the new keyring, read at once.
    assert node.call(SECRETS_PATH, {"path": "app/db", "values": {"pw": "new"}}).json() == {"version": 2}
    assert node.call(SECRETS_PATH, {"path": "app/db"}, action="get").json()["data"] == {"pw": "new"}
    versions = node.call(SECRETS_METADATA_PATH, {"path": "app/db"}, action="get").json()["versions"]
    assert "unreadable" not in versions["2"]  # the shape of SPIKE's and Vault's answer for a live version


async def test_ciphertexts_and_secrets_outlive_a_root_key_rotation(node: Node) -> None:
    """The cipher key and the data keys are in the keyring: a rotation re-wraps it, and nothing changes for a
    caller (before the keyring, the cipher key was derived from the root key and a new key lost every
    ciphertext handed out)."""
    from spike.app.api.messages import CIPHER_DECRYPT_PATH, CIPHER_ENCRYPT_PATH
    from spike.protocol.pending import PendingRotation

    assert node.call(SECRETS_PATH, {"path": "app/db", "values": {"pw": VALUE}}).status == 200
    encrypted = node.call(CIPHER_ENCRYPT_PATH, b"plaintext", content_type="application/octet-stream")
    assert encrypted.status == 200
    new, _ = seal_key(NEW_KEY, epoch=2, threshold=2, keeper_ids=KEEPERS)
    pending = PendingRotation.seal(node.custody.root_key, node.record, NEW_KEY, new)
    assert node.nexus_store.persist_rotation(pending, node.store.keyring().wrap(NEW_KEY, 2))
    assert node.nexus_store.commit_rotation(pending)
    # What Nexus does once the commit is durable: the store and the cipher use the keyring under the new key.
    node.store.unlock(NEW_KEY, 2)
    node.cipher.unlock(lambda: node.store.keyring().cipher_key)
    decrypted = node.call(CIPHER_DECRYPT_PATH, encrypted.body, content_type="application/octet-stream")
    assert (decrypted.status, decrypted.body) == (200, b"plaintext")
    assert node.call(SECRETS_PATH, {"path": "app/db"}, action="get").json()["data"] == {"pw": VALUE}


async def test_a_nexus_that_rebuilt_the_rotations_key_first_opens_the_keyring_of_the_stored_record(
    node: Node,
) -> None:
    """A Nexus restarted mid-rotation may rebuild the new epoch's key first (keepers that hold only the new
    shard): `KeyRecovered` then names the new epoch, while the key in use and the stored keyring are the
    record's.  The store is unlocked with the record's epoch (before: the report's, and nothing opened)."""
    import random

    from spike.app.nexus.key_users import KeyUsers
    from spike.protocol import PollSchedule
    from spike.protocol.effects import KeyRecovered, Report
    from spike.protocol.nexus import NexusCustody
    from spike.protocol.pending import PendingRotation

    assert node.call(SECRETS_PATH, {"path": "app/db", "values": {"pw": VALUE}}).status == 200
    new, new_shares = seal_key(NEW_KEY, epoch=2, threshold=2, keeper_ids=KEEPERS)
    pending = PendingRotation.seal(node.custody.root_key, node.record, NEW_KEY, new)
    assert node.nexus_store.persist_rotation(pending, node.store.keyring().wrap(NEW_KEY, 2))
    node.lock()
    restarted = NexusCustody(
        KEEPERS,
        threshold=2,
        schedule=PollSchedule(),
        rng=random.Random(1),
        now=node.now,
        record=node.record,
        pending=pending,
        highest_epoch=1,
    )
    reports: list[Report] = []
    users = KeyUsers(restarted, node.store, node.cipher, node.authorizer, [reports.append])
    for keeper_id in KEEPERS[:2]:
        restarted.submit_shard(new_shares[keeper_id], node.now)
    for effect in restarted.effects():
        if isinstance(effect, Report):
            users(effect)
    assert [r.epoch for r in reports if isinstance(r, KeyRecovered)] == [2]
    assert node.store.get("app/db", 0) == (1, {"pw": VALUE})
