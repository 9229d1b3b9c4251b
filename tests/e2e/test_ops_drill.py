"""The break-glass drill, with real processes: recover, lose everything, restore from the files.

Secrets are written, `spike operator recover` exports the three recovery
shards, then Nexus and every keeper are killed with SIGKILL and started again
empty (Nexus keeps only its data dir).  Nexus waits: `spike status` says so
(exit 4), /readyz answers 503, secrets are "not ready", and its JSON log says
"waiting for shards" again and again.  The operator's mistakes (malformed
text, another deployment's shard, a shard under the wrong id, the wrong
identity, a duplicate) are each refused with one sentence and change
nothing; two good shards, one from stdin and one from --file, bring the key
back: Nexus is ready, every keeper holds its shard again (the very bytes of
the recovery files), and every secret reads back.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
from pathlib import Path
from typing import Any

import pytest

from spike.app.api.messages import (
    SECRETS_PATH,
    SecretGetRequest,
    SecretGetResponse,
    SecretPutRequest,
    SecretPutResponse,
)
from spike.app.commands.client import NexusClient, NexusError
from spike.app.commands.operator import format_shard, parse_shard
from spike.app.store.sqlite_schema import NexusStore
from spike.protocol import RootKey, combine, seal_key
from tests.e2e.harness import Cluster, SecretsSeen

pytestmark = pytest.mark.e2e

EXIT_READY, EXIT_NOT_READY = 0, 4
SUMMARY_EVERY = 1.0  # the "still waiting" line, instead of every 30 s
PATIENT = {"SPIKE_NEXUS_KEEPER_TIMEOUT": "0.5s"}  # the whole 0.5 s poll interval: a busy machine is not an outage


def put(nexus: NexusClient, path: str, values: dict[str, str]) -> int:
    return nexus.call(SECRETS_PATH, SecretPutRequest(path=path, values=values), SecretPutResponse).version


def get(nexus: NexusClient, path: str, version: int = 0) -> SecretGetResponse:
    request = SecretGetRequest(path=path, version=version)
    return nexus.call(SECRETS_PATH, request, SecretGetResponse, action="get")


def restore(c: Cluster, text: str | None = None, *, file: Path | None = None, identity: str = "pilot-restore") -> Any:
    """`spike operator restore`, the shard on stdin (or in `file`)."""
    args = ["operator", "restore", *(["--file", str(file)] if file else [])]
    return c.run(*args, identity=identity, stdin=(text or "").encode())


def one_line(result: Any) -> str:
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1, result
    return str(lines[0])


def test_recover_lose_everything_restore_and_every_secret_reads_back(
    make_cluster: Any, secrets_seen: SecretsSeen
) -> None:
    c: Cluster = make_cluster(
        log_format="json",
        metrics=True,
        nexus_env={"SPIKE_NEXUS_WAITING_SUMMARY_INTERVAL": f"{SUMMARY_EVERY:g}s", **PATIENT},
    )
    secrets_seen.add_dir(c.data_dir)
    c.start_ready()
    secrets_seen.add_keys(c, "drill")

    # Secrets, one of them in two versions.
    written: dict[tuple[str, int], dict[str, str]] = {}
    with c.client() as nexus:
        for n in range(6):
            path = f"drill/app-{n}"
            values = {"password": secrets.token_urlsafe(24), "user": f"user-{n}"}
            written[(path, put(nexus, path, values))] = values
        values = {"password": secrets.token_urlsafe(24)}
        written[("drill/app-0", put(nexus, "drill/app-0", values))] = values
    assert ("drill/app-0", 2) in written
    for (path, version), values in written.items():
        secrets_seen.add_secret(f"drill value {path} v{version}", values["password"].encode())

    # Break-glass export: only the recover role.
    shards_dir = c.root / "recovery"
    refused = c.run("operator", "recover", "--dir", str(shards_dir), identity="pilot-superuser")
    assert refused.returncode == 1 and "refused this identity" in one_line(refused)
    assert not shards_dir.exists()
    result = c.run("operator", "recover", "--dir", str(shards_dir), identity="pilot-recover")
    assert result.returncode == 0, result
    assert "wrote 3 recovery shards" in result.stdout
    (exported,) = c.wait_log(c.nexus(), r"recovery shards exported to spiffe://spike.test/spike/pilot/role/recover")
    assert json.loads(exported)["level"] == "warning"
    files = {parse_shard(p.read_text()).id: p for p in sorted(shards_dir.iterdir())}
    assert sorted(files) == [1, 2, 3]
    for path in files.values():
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    texts = {i: p.read_text().strip() for i, p in files.items()}
    store = NexusStore(c.data_dir)
    try:
        record = store.load_key_record()
    finally:
        store.close()
    assert record is not None
    shares = {i: parse_shard(t) for i, t in texts.items()}
    key = combine([shares[1], shares[2]], 2)
    try:
        assert record.matches_key(key)  # the files really rebuild this deployment's key
    finally:
        key.wipe()

    # Lose everything: Nexus and every keeper, SIGKILL; they come back empty.
    c.kill("nexus", *(f"keeper-{i}" for i in c.keeper_ids))
    c.start()
    nexus_log = c.nexus()
    code, status = c.wait_status(
        lambda s: s["phase"] == "recovering" and all(k["state"] == "empty" for k in s["keepers"]),
        "Nexus waiting, every keeper empty",
    )
    assert (code, status["shards_needed"], status["redundancy"]) == (EXIT_NOT_READY, 2, -2)
    human = c.run("status")
    assert human.returncode == EXIT_NOT_READY
    assert "recovering, waiting for shards: 2 more verified shard(s) needed" in human.stdout
    # Every keeper answered empty: status says the keepers cannot give the key back, and what can.
    assert (
        "the root key cannot come back from the keepers: keeper(s) 1, 2, 3 answered without their shard "
        "(a restarted keeper is empty); restore it with `spike operator restore` and the recovery shards of key "
        f"epoch {record.epoch} that `spike operator recover` exported: 2 of keeper(s) 1, 2, 3"
    ) in human.stdout.splitlines()
    reads = c.run("secret", "get", "drill/app-1")
    assert reads.returncode == 1 and "nothing was changed" not in reads.stderr, reads
    assert c.http_get("/readyz")[0] == 503 and c.http_get("/healthz")[0] == 200
    with c.client() as nexus, pytest.raises(NexusError) as caught:
        get(nexus, "drill/app-1")
    assert caught.value.code == "state_not_ready"

    # The operator's mistakes: one sentence each, and nothing changes.
    other_key = RootKey(os.urandom(31) + b"\x01")
    _, other_shares = seal_key(other_key, epoch=record.epoch, threshold=2, keeper_ids=[1, 2, 3])
    other_key.wipe()
    mistakes = [
        (texts[2][:-3], "pilot-restore", 2, "a recovery shard looks like spike:<id>:<64 hex digits>"),
        (format_shard(other_shares[2]), "pilot-restore", 1, "does not belong to this deployment's key"),
        (texts[2], "pilot-superuser", 1, "Nexus refused this identity"),
    ]
    for text, identity, exit_code, message in mistakes:
        result = restore(c, text, identity=identity)
        assert result.returncode == exit_code and message in one_line(result), (text[:12], result)

    # Meanwhile Nexus said it is waiting, and said it again.
    waiting = c.wait_log(nexus_log, r"waiting for shards: 2 more verified shard\(s\) needed", count=2)
    for entry in (json.loads(line) for line in waiting):
        assert entry["level"] == "warning" and entry["logger"] == "spike.nexus"
        assert "(keepers: 1=empty, 2=empty, 3=empty); polling continues every 0.5s" in entry["msg"]
    (stranded, *_) = c.wait_log(nexus_log, r"the root key cannot come back from the keepers")
    entry = json.loads(stranded)
    assert (entry["level"], entry["event"], entry["keeper_ids"]) == ("warning", "key_stranded", [1, 2, 3])
    assert "`spike operator restore`" in entry["msg"]

    # Shard 1 from stdin, then again (refused).
    result = restore(c, texts[1] + "\n")
    assert result.returncode == 0 and one_line(result) == "shard 1 accepted: 1 more shard(s) needed", result
    result = restore(c, texts[1])
    assert result.returncode == 1 and one_line(result).endswith("shard 1 was already given"), result
    assert c.wait_status(lambda s: True, "status")[1]["shards_needed"] == 1

    # Shard 3 from its file: the key is back.
    result = restore(c, file=files[3])
    assert result.returncode == 0 and "the root key is restored and verified" in one_line(result), result
    result = restore(c, file=files[2])
    assert result.returncode == 1 and "already holds its verified root key" in one_line(result), result

    # Ready, every keeper re-seeded with the bytes of its recovery file, every secret back.
    code, status = c.wait_status(
        lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "ready, every keeper holding again"
    )
    assert code == EXIT_READY and status["epoch"] == record.epoch
    held = c.read_shards()
    assert {i: s.secret_bytes() for i, s in held.items()} == {i: s.secret_bytes() for i, s in shares.items()}
    assert c.http_get("/readyz")[0] == 200
    with c.client() as nexus:
        for (path, version), values in written.items():
            assert get(nexus, path, version).data == values, (path, version)
        assert get(nexus, "drill/app-0").version == 2
    scrape = c.scrape()
    assert scrape.value("spike_key_recoveries_total", source="operator") == 1
    assert scrape.value("spike_key_recovery_duration_seconds") > 0
    assert scrape.value("spike_api_requests_total", route="/v1/operator/restore", status="200") == 2
    (rebuilt,) = c.wait_log(nexus_log, r"rebuilt from the shards of keepers 1, 3 in \d+ ms and verified")
    assert json.loads(rebuilt)["source"] == "operator"

    # JSON logs: every line of every process is one JSON object.
    c.close()
    for proc in c.history:
        lines = proc.text().splitlines()
        assert lines, proc.name
        for line in lines:
            entry = json.loads(line)
            assert {"ts", "level", "logger", "msg"} <= set(entry), (proc.name, line)
