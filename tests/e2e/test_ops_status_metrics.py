"""Seeing the deployment, with real processes: `spike status` in every state, and /metrics over HTTP.

One deployment is walked through every state it can be in, and in each the
real `spike status` command (human table) gives its exit code: 4 not
initialised, 0 ready with a spare shard, 3 degraded (a keeper down), 1 Nexus
unreachable, 4 waiting for shards.  Meanwhile /metrics is scraped over plain
HTTP while a keeper is killed with SIGKILL and started again empty: the
redundancy drops to 0 and comes back to 1, and the 404 and the re-seed are
counted.  Nexus's log says each change once, and while the keeper is down
says so again every second (the keeper summary, configured short here).
"""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

import pytest

from spike.app.api.messages import SECRETS_PATH, SecretGetRequest, SecretGetResponse
from spike.app.commands.client import NexusError
from tests.e2e.harness import Cluster, Scrape, SecretsSeen

pytestmark = pytest.mark.e2e

EXIT_READY, EXIT_UNREACHABLE, EXIT_DEGRADED, EXIT_NOT_READY = 0, 1, 3, 4
PATIENT = {"SPIKE_NEXUS_KEEPER_TIMEOUT": "0.5s"}  # the whole 0.5 s poll interval: a busy machine is not an outage
COLUMNS = ["ID", "URL", "STATE", "SINCE", "LAST POLL", "LATENCY", "POLLS", "404s", "FAILS", "RESEEDS"]


def table(c: Cluster, output: str) -> dict[int, dict[str, str]]:
    """The keeper table of `spike status`, one dict per keeper id, cut at the header's column starts."""
    lines = output.splitlines()
    (header_at,) = [i for i, line in enumerate(lines) if line.startswith("ID ")]
    header = lines[header_at]
    starts = [header.index(name) for name in COLUMNS]
    assert starts == sorted(starts), header
    rows: dict[int, dict[str, str]] = {}
    for line in lines[header_at + 1 :]:
        cells = [line[a:b].strip() for a, b in zip(starts, [*starts[1:], None], strict=True)]
        row = dict(zip(COLUMNS, cells, strict=True))
        rows[int(row["ID"])] = row
    assert sorted(rows) == c.keeper_ids, output
    for keeper_id, row in rows.items():
        assert row["URL"] == c.keeper_url(keeper_id)
        dt.datetime.strptime(row["SINCE"], "%Y-%m-%dT%H:%M:%SZ")
        assert all(row[n].isdigit() for n in ("POLLS", "404s", "FAILS", "RESEEDS")), row
    return rows


def status(c: Cluster, expected_code: int) -> str:
    result = c.run("status")
    assert result.returncode == expected_code, result
    assert result.stderr == "", result
    return result.stdout


def per_keeper(scrape: Scrape, name: str, keeper_id: int, **labels: str) -> float:
    return scrape.value(name, keeper=str(keeper_id), **labels)


def test_status_exit_codes_and_metrics_through_every_state(make_cluster: Any, secrets_seen: SecretsSeen) -> None:
    c: Cluster = make_cluster(metrics=True, nexus_env={"SPIKE_NEXUS_KEEPER_SUMMARY_INTERVAL": "1s", **PATIENT})
    secrets_seen.add_dir(c.data_dir)
    c.start()
    nexus = c.nexus()

    # Not initialised: 4.
    out = status(c, EXIT_NOT_READY)
    assert "uninitialised: run `spike bootstrap`" in out  # the phase's name, as in the JSON
    table(c, out)
    assert c.http_get("/healthz") == (200, "ok\n")
    assert c.http_get("/readyz") == (503, "not ready\n")
    restore = c.run("operator", "restore", identity="pilot-restore", stdin=b"spike:1:" + b"ab" * 32)
    assert restore.returncode == 1 and "has no key record" in restore.stderr, restore

    # Ready, every keeper holding: 0.
    assert c.bootstrap().returncode == 0
    before = c.wait_metrics(lambda m: m.value("spike_shard_redundancy") == 1, "redundancy 1")
    secrets_seen.add_keys(c, "status and metrics")
    assert before.value("spike_nexus_phase", phase="ready") == 1
    assert c.http_get("/readyz") == (200, "ready\n")
    out = status(c, EXIT_READY)
    assert out.splitlines()[0] == f"Nexus {c.nexus_url}: ready: root key epoch 1, 2-of-3"
    assert "shard redundancy: 1" in out
    rows = table(c, out)
    assert all(row["STATE"] == "holding" for row in rows.values()), out
    assert all(re.fullmatch(r"\d+\.\ds ago", row["LAST POLL"]) for row in rows.values()), out
    assert all(re.fullmatch(r"\d+\.\dms", row["LATENCY"]) for row in rows.values()), out

    # Keeper 2 killed: redundancy 0, degraded: 3; said once, then again every second.
    target, label = 2, re.escape(c.keeper_label(2))
    mark = len(nexus.text())
    c.kill_keeper(target)
    down = c.wait_metrics(lambda m: m.value("spike_shard_redundancy") == 0, "redundancy dropping to 0")
    assert per_keeper(down, "spike_keeper_state", target, state="unreachable") == 1
    assert per_keeper(down, "spike_keeper_state", target, state="holding") == 0
    out = status(c, EXIT_DEGRADED)
    assert "shard redundancy: 0" in out
    row = table(c, out)[target]
    assert row["STATE"].startswith("unreachable (") and int(row["FAILS"]) >= 1, out
    c.wait_log(nexus, rf"{label} still unreachable since .* shard redundancy 0", start=mark, count=2)

    # Started again, empty: the 404 and the re-seed are counted, redundancy is back.
    c.start_keeper(target)

    def back(m: Scrape) -> bool:
        reseeds = "spike_keeper_reseeds_total"
        more = per_keeper(m, reseeds, target) > per_keeper(before, reseeds, target)
        return bool(more and m.value("spike_shard_redundancy") == 1)

    after = c.wait_metrics(back, "keeper 2 re-seeded, redundancy back to 1")
    empties, reseeds = "spike_keeper_empty_answers_total", "spike_keeper_reseeds_total"
    polls = "spike_keeper_polls_total"
    assert per_keeper(after, empties, target) == per_keeper(before, empties, target) + 1
    assert per_keeper(after, reseeds, target) == per_keeper(before, reseeds, target) + 1
    assert per_keeper(after, "spike_keeper_state", target, state="holding") == 1
    for other in (1, 3):  # (every keeper answered 404 until bootstrap)
        assert per_keeper(after, empties, other) == per_keeper(before, empties, other)
        assert per_keeper(after, reseeds, other) == per_keeper(before, reseeds, other)
        assert per_keeper(after, polls, other) > per_keeper(before, polls, other)
    latency = "spike_keeper_request_duration_seconds_count"
    for kind, result in (("poll", "failed"), ("poll", "404"), ("push", "200"), ("confirm", "200")):
        labels = {"keeper": str(target), "kind": kind, "result": result}
        assert after.value(latency, **labels) > before.value(latency, **labels), labels
    text = nexus.text()[mark:]
    for change in ("unreachable since", "is empty", "holds its shard again"):
        assert len(re.findall(rf"{label} {change}", text)) == 1, (change, text)
    out = status(c, EXIT_READY)
    assert int(table(c, out)[target]["RESEEDS"]) == per_keeper(after, "spike_keeper_reseeds_total", target)

    # API requests by route and status, with their latency.
    with c.client() as client, pytest.raises(NexusError):
        client.call(SECRETS_PATH, SecretGetRequest(path="ops/absent"), SecretGetResponse, action="get")
    api = c.scrape()
    assert api.value("spike_api_requests_total", route="/v1/operator/status", status="200") >= 1
    # Bootstrap installs the record, deals the shards, then sends the record again with "dealt": true.
    assert api.value("spike_api_requests_total", route="/v1/bootstrap/init", status="200") == 2
    assert api.value("spike_api_requests_total", route="/v1/store/secrets?action=get", status="404") == 1
    assert api.value("spike_api_request_duration_seconds_count", route="/v1/bootstrap/verify") == 1
    assert api.value("spike_api_request_duration_seconds_bucket", route="/v1/bootstrap/verify", le="+Inf") == 1

    # Nexus gone: 1, one line.
    c.kill("nexus")
    result = c.run("status")
    assert result.returncode == EXIT_UNREACHABLE and result.stdout == "", result
    assert result.stderr.count("\n") == 1 and f"Nexus at {c.nexus_url} is unreachable" in result.stderr, result
    assert c.http_get("/healthz")[0] == 0  # the metrics listener went with it

    # Two keepers gone too: Nexus comes back with one shard of two and waits: 4.
    c.kill_keeper(2)
    c.kill_keeper(3)
    c.start_nexus()
    c.wait_status(lambda s: s["keepers"][0]["state"] == "holding", "keeper 1 read")
    out = status(c, EXIT_NOT_READY)
    assert "waiting for shards: 1 more verified shard(s) needed (key epoch 1, 2-of-3)" in out
    assert "shard redundancy: -1" in out
    rows = table(c, out)
    assert rows[1]["STATE"] == "holding", out
    assert rows[2]["STATE"].startswith("unreachable") and rows[3]["STATE"].startswith("unreachable"), out
    assert c.http_get("/readyz") == (503, "not ready\n")
    waiting = c.wait_metrics(lambda m: m.value("spike_shards_needed") == 1, "one shard needed")
    assert waiting.value("spike_nexus_phase", phase="recovering") == 1
