"""SPIKE's Go bootstrap's flow against real keeper and Nexus processes (issue 17 section 1).

No `/v1/bootstrap/init`: the shards go to the keepers as Go bootstrap sends them (`{"shard": [...]}`,
as the bootstrap identity), then `/v1/bootstrap/verify` sealed under the raw root key, retried while
Nexus says it is not ready, as Go bootstrap does.  Nexus adopts the key, writes its record, re-seeds
the keepers with its own shards and serves secrets.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spike.app.api.messages import (
    BOOTSTRAP_VERIFY_PATH,
    SECRETS_PATH,
    SecretGetRequest,
    SecretGetResponse,
    SecretPutRequest,
    SecretPutResponse,
)
from spike.protocol import Role, RootKey, seal_key
from spike.protocol.shamir import ORDER, split_with
from spike.protocol.wire import ShardContribution
from spike.transports.blocking import ClientSession
from spike.transports.tls import client_context, role_check
from tests.e2e.harness import Cluster, wait_until

KEY = os.urandom(31).rjust(32, b"\x01")  # a non-zero field element


def test_go_bootstrap_flow_is_adopted(cluster: Cluster) -> None:
    cluster.start()
    ids = sorted(cluster.keeper_ids)
    shards = split_with(int.from_bytes(KEY, "big"), [int.from_bytes(os.urandom(32), "big") % ORDER], ids)
    for keeper_id in ids:
        contribution = ShardContribution(shard=list(shards[keeper_id].to_bytes(32, "big")))
        assert cluster.contribute(keeper_id, contribution) == 200
    text = os.urandom(32).hex()
    nonce = os.urandom(12)
    body = json.dumps(
        {
            "nonce": base64.b64encode(nonce).decode(),
            "ciphertext": base64.b64encode(AESGCM(KEY).encrypt(nonce, text.encode(), None)).decode(),
        }
    ).encode()
    with ClientSession(client_context(cluster.files("bootstrap")), timeout=5.0) as session:
        nexus = session.connect(
            cluster.nexus_url,
            role_check(cluster.trust, Role.NEXUS),
            expected_peer=str(cluster.trust.id_of(Role.NEXUS)),
        )

        def verified() -> bytes | None:
            status, answer = nexus.post(BOOTSTRAP_VERIFY_PATH, body)
            assert status in (200, 503), (status, answer)  # 503: not every keeper polled yet (Go asks again)
            return answer if status == 200 else None

        answer = wait_until(verified, "Nexus to verify Go bootstrap's key")
    assert json.loads(answer) == {"hash": hashlib.sha256(text.encode()).hexdigest()}
    cluster.wait_ready(epoch=1)
    with cluster.client() as client:
        assert client.call(SECRETS_PATH, SecretPutRequest(path="go/x", values={"k": "v"}), SecretPutResponse).version
        got = client.call(SECRETS_PATH, SecretGetRequest(path="go/x"), SecretGetResponse, action="get")
        assert got.data == {"k": "v"}
    # The keepers now hold this Nexus's own shards of the same key (epoch 1).
    _, own = seal_key(RootKey(KEY), epoch=1, threshold=2, keeper_ids=ids)
    wait_until(lambda: cluster.read_shards() == {i: own[i] for i in ids}, "the keepers to be re-seeded")
