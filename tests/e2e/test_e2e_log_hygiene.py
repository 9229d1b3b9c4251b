"""No log (or data file) ever holds a shard or the root key.

The test acts as Nexus: with the nexus SVID it reads every keeper's shard
(``POST /v1/store/shard``) and rebuilds the root key from two of them
(checked against the key record Nexus stored), then greps for them in every
form they could be printed in: raw, hex, base64, the JSON int list of the
wire format, a Python list, an integer.

It runs after every other e2e test (see conftest.py): besides the logs of
its own deployment, driven through bootstrap, a keeper re-seed, a Nexus
recovery and a forced bootstrap at debug level with JSON logs,
it sweeps every log those tests wrote for the shards their keepers held
when they were torn down.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from spike.app.store.sqlite_schema import NexusStore
from spike.protocol.shamir import combine
from tests.e2e.harness import Cluster, SecretsSeen, find_secrets

pytestmark = pytest.mark.e2e


def keeper(status: dict[str, Any], keeper_id: int) -> dict[str, Any]:
    views: list[dict[str, Any]] = [k for k in status["keepers"] if k["id"] == keeper_id]
    (view,) = views
    return view


def collect(c: Cluster, label: str, secrets: dict[str, bytes]) -> dict[int, Any]:
    """Read every keeper's shard, rebuild the key from two of them, check it, remember all of it."""
    shards = c.read_shards()
    assert sorted(shards) == c.keeper_ids
    store = NexusStore(c.data_dir)
    try:
        record = store.load_key_record()
    finally:
        store.close()
    assert record is not None
    for keeper_id, share in shards.items():
        assert share.epoch == record.epoch
        assert record.matches_share(share)
        secrets[f"{label} keeper {keeper_id} shard"] = share.secret_bytes()
    key = combine([shards[1], shards[3]], c.threshold)
    try:
        assert record.matches_key(key)  # the real root key, not just some bytes
        secrets[f"{label} root key"] = key.secret_bytes()
    finally:
        key.wipe()
    return shards


@pytest.mark.after_all_e2e
def test_no_log_or_data_file_holds_a_shard_or_the_root_key(
    make_cluster: Any, secrets_seen: SecretsSeen, tmp_path: Path
) -> None:
    c: Cluster = make_cluster(log_level="debug", log_format="json")
    c.start_ready()
    secrets: dict[str, bytes] = {}
    epoch1 = collect(c, "epoch 1", secrets)

    # A re-seed: Nexus pushes a shard, and gives the same bytes as bootstrap did.
    reseeds = keeper(c.wait_status(lambda s: True, "status")[1], 1)["reseeds"]
    c.kill_keeper(1)
    c.start_keeper(1)
    c.wait_status(
        lambda s: keeper(s, 1)["state"] == "holding" and keeper(s, 1)["reseeds"] > reseeds,
        "keeper 1 re-seeded",
    )
    assert c.read_shard(1) == epoch1[1]

    # A recovery, then a new key.
    c.kill("nexus")
    c.start_nexus()
    c.wait_ready(epoch=1)
    assert c.bootstrap("--force").returncode == 0
    c.wait_status(lambda s: s["epoch"] == 2 and s["redundancy"] == 1, "epoch 2, every keeper holding")
    collect(c, "epoch 2", secrets)

    # A key rotation (debug logs, the pending rotation stored and committed in the data dir).
    assert c.rotate().returncode == 0
    c.wait_status(lambda s: s["epoch"] == 3 and s["rotation"] is None and s["redundancy"] == 1, "epoch 3")
    collect(c, "epoch 3", secrets)
    c.close()  # every process has written all it ever will

    assert len(secrets) == 3 * 4
    own = c.log_files()
    data = [p for p in c.data_dir.iterdir() if p.is_file()]
    others = sorted(p for d in secrets_seen.log_dirs if d.exists() for p in d.iterdir() if p.is_file())
    assert len(own) >= 8 and data, (own, data)  # 5 keeper/Nexus runs, 2 bootstraps
    wanted = {**secrets, **secrets_seen.shards}

    # The search itself works: a planted shard (as hex) and key (as a JSON list) are found.
    control = tmp_path / "control.log"
    shard_name, key_name = "epoch 2 keeper 2 shard", "epoch 2 root key"
    control.write_bytes(
        b"x " + secrets[shard_name].hex().encode() + b" y [" + ",".join(map(str, secrets[key_name])).encode() + b"]"
    )
    planted = set(find_secrets([control], secrets))
    assert {f"{control}: {shard_name} as hex", f"{control}: {key_name} as json-ints"} <= planted

    assert find_secrets([*own, *data, *others], wanted) == []
