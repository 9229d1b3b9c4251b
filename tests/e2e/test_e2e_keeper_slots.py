"""A real `spike keeper` process keeps its previous shard when asked, reads by epoch, forgets on Nexus's word.

docs/key-lifecycle.md section 2, end to end: bootstrap seeds epoch 7, "Nexus"
deals epoch 8 keeping 7, reads each epoch back, retires 7, and the keeper's
log says what happened without a shard byte.  Only Nexus may make it forget,
and a SIGKILLed keeper comes back with nothing (memory only).
"""

from __future__ import annotations

import json

import pytest

from spike.protocol import Role, ShardContribution, share_for
from spike.protocol.material import RootKey
from spike.protocol.wire import KEEPER_CONTRIBUTE_PATH, KEEPER_FORGET_PATH, KEEPER_SHARD_PATH, encode
from spike.transports.blocking import ClientSession
from spike.transports.tls import client_context, keeper_check
from tests.e2e.harness import Cluster, wait_until

pytestmark = pytest.mark.e2e

KEY = RootKey(bytes(range(7, 39)))


def post(cluster: Cluster, identity: str, path: str, body: bytes) -> tuple[int, dict[str, object]]:
    with ClientSession(client_context(cluster.identity.files(identity)), timeout=5.0) as session:
        connection = session.connect(
            cluster.keeper_url(1),
            keeper_check(cluster.trust, 1),
            expected_peer=str(cluster.trust.id_of(Role.KEEPER, 1)),
        )
        status, answer = connection.post(path, body)
    return status, json.loads(answer)


def test_a_keeper_process_keeps_reads_by_epoch_and_forgets(cluster: Cluster) -> None:
    cluster.start([1], nexus=False)
    old, new = (share_for(KEY, epoch=e, threshold=2, id=1) for e in (7, 8))
    assert cluster.contribute(1, ShardContribution.of(old)) == 200
    dealt = encode(ShardContribution.of(new, keep=7))
    assert post(cluster, "nexus", KEEPER_CONTRIBUTE_PATH, dealt) == (200, {})

    status, answer = post(cluster, "nexus", KEEPER_SHARD_PATH, b'{"epoch":7}')
    assert (status, answer) == (
        200,
        {"shard": list(old.secret_bytes()), "id": 1, "epoch": 7, "other_epoch": 8, "slots": 2},
    )
    status, answer = post(cluster, "nexus", KEEPER_SHARD_PATH, b"{}")  # SPIKE's read: the latest, as it was given
    assert (status, answer) == (200, {"shard": list(new.secret_bytes()), "id": 1, "epoch": 8})

    assert post(cluster, "bootstrap", KEEPER_FORGET_PATH, b'{"epoch":7}') == (401, {"err": "access_unauthorized"})
    assert post(cluster, "nexus", KEEPER_FORGET_PATH, b'{"epoch":7}') == (200, {})
    status, answer = post(cluster, "nexus", KEEPER_SHARD_PATH, b'{"epoch":7}')
    assert answer == {"shard": list(new.secret_bytes()), "id": 1, "epoch": 8, "slots": 2}

    log = wait_until(
        lambda: "shard forgotten on request" in cluster.keeper(1).text() and cluster.keeper(1).text(), "log"
    )
    for share in (old, new):
        for form in (share.secret_bytes().hex(), str(list(share.secret_bytes()))[1:-1]):
            assert form not in log

    cluster.kill_keeper(1)
    cluster.start_keeper(1)
    assert post(cluster, "nexus", KEEPER_SHARD_PATH, b'{"epoch":8}') == (404, {"err": "api_not_found"})
