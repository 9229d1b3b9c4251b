"""The audit log in-process: one JSON line per API call, who/what/decision/status/duration, never a value.

Calls of every kind go through the real route table with `CallRecorder` as
its observer: secret writes and reads, cipher calls (JSON and raw), refused
identities, unknown routes, a restore and a recovery export.  Every line
must carry exactly the documented fields, and the whole log none of the
values, plaintexts, shards or key the bodies and answers carried.
"""

from __future__ import annotations

import base64
import json
import stat
import threading
from pathlib import Path
from typing import Any

from spike.app.api.messages import RECOVER_PATH, RESTORE_PATH
from spike.app.nexus.audit import AuditLog, secret_path_of
from tests.ops.ops_helpers import ROOT_KEY, SHARES, Node, leaks, peer, secrets_of

VALUE = "s3cr3t-value-7d1e4b0a9f"
PLAINTEXT = b"cipher plaintext 0c8e7f1d2a"
FIELDS = {"ts", "caller", "route", "action", "path", "decision", "status", "duration_ms"}
SECRETS = {
    **secrets_of(SHARES.values(), ROOT_KEY),
    "secret value": VALUE.encode(),
    "other value": b"other-value-91b3c5d7e2",
    "plaintext": PLAINTEXT,
}


def only(lines: list[dict[str, Any]], **match: Any) -> dict[str, Any]:
    found = [line for line in lines if all(line[k] == v for k, v in match.items())]
    assert len(found) == 1, (match, found)
    return found[0]


def test_every_call_is_one_line_with_caller_route_path_decision_status_and_duration(node: Node) -> None:
    restore = {"id": 1, "shard": list(SHARES[1].secret_bytes())}
    assert node.call(RESTORE_PATH, restore, as_="restore").status == 200
    assert node.call("/v1/store/secrets", {"path": "app/db", "values": {"k": VALUE}}).status == 503  # not ready
    restore = {"id": 2, "shard": list(SHARES[2].secret_bytes())}
    assert node.call(RESTORE_PATH, restore, as_="restore").status == 200
    assert node.call("/v1/store/secrets", {"path": "app/db", "values": {"password": VALUE}}).status == 200
    assert node.call("/v1/store/secrets", {"path": "app/db"}, action="get").status == 200
    assert node.call("/v1/store/secrets", {"path": "app/db"}, action="get", as_="/web").status == 401
    other = {"path": "app/other", "values": {"k": SECRETS["other value"].decode()}}
    assert node.call("/v1/store/secrets", other, as_="nobody").status == 401
    assert node.call("/v1/cipher/encrypt", {"plaintext": base64.b64encode(PLAINTEXT).decode()}).status == 200
    raw = node.call("/v1/cipher/encrypt", PLAINTEXT, content_type="application/octet-stream")
    assert raw.status == 200
    assert node.call("/v1/cipher/decrypt", raw.body, content_type="application/octet-stream").status == 200
    assert node.call(RECOVER_PATH, as_="recover").status == 200
    assert node.call("/v1/no/such/route", {"path": "x"}).status == 404
    assert node.call("/v1/store/secrets", method="GET").status == 400

    lines = node.audit()
    assert len(lines) == 13
    for line in lines:
        assert set(line) == FIELDS, line
        assert isinstance(line["duration_ms"], float | int) and line["duration_ms"] >= 0
        assert line["ts"].endswith("+00:00")
    superuser, restorer = str(peer("superuser")), str(peer("restore"))

    assert [line["caller"] for line in lines[:3]] == [restorer, superuser, restorer]
    first = lines[0]
    assert (first["route"], first["path"], first["decision"], first["status"]) == (RESTORE_PATH, "", "allowed", 200)
    put = only(lines, route="/v1/store/secrets", action="", status=200)
    assert (put["caller"], put["path"], put["decision"]) == (superuser, "app/db", "allowed")
    got = only(lines, action="get", status=200)
    assert (got["caller"], got["path"]) == (superuser, "app/db")
    denied = only(lines, action="get", status=401)
    assert (denied["caller"], denied["decision"], denied["path"]) == ("spiffe://spike.test/web", "denied", "app/db")
    anonymous = only(lines, caller="")
    assert (anonymous["decision"], anonymous["status"], anonymous["path"]) == ("denied", 401, "app/other")
    assert only(lines, route="/v1/no/such/route")["decision"] == "no_route"
    assert only(lines, status=400)["decision"] == "allowed"
    assert only(lines, route=RECOVER_PATH)["caller"] == str(peer("recover"))
    assert [line["path"] for line in lines if line["route"].startswith("/v1/cipher")] == ["", "", ""]

    # The answers carried the value, the plaintext and every shard; the log has none of them.
    assert not leaks(node.audit_stream.getvalue(), SECRETS)


def test_the_secret_path_is_the_only_thing_read_from_a_body() -> None:
    json_type = "application/json"
    assert secret_path_of(b'{"path": "a/b", "values": {"k": "v"}}', json_type) == "a/b"
    assert secret_path_of(b'{"values": {"path": "v"}}', json_type) == ""
    assert secret_path_of(b'{"path": 5}', json_type) == ""
    assert secret_path_of(b"not json at all", json_type) == ""
    assert secret_path_of(b'{"path": "a/b"}', "application/octet-stream") == ""
    assert secret_path_of(b"", json_type) == ""
    assert secret_path_of(json.dumps({"path": "p" * 5000}).encode(), json_type) == "p" * 512


def test_the_audit_file_is_private_appended_and_written_line_by_line(tmp_path: Path) -> None:
    path = tmp_path / "logs" / "audit.log"
    audit = AuditLog.to_file(path)
    audit.record(caller="a", route="/r", action="", path="x", decision="allowed", status=200, seconds=0.0012)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert json.loads(path.read_text())["duration_ms"] == 1.2  # flushed before close

    def many(n: int) -> None:
        for i in range(200):
            audit.record(caller=f"t{n}", route="/r", action="", path=str(i), decision="allowed", status=200, seconds=0)

    threads = [threading.Thread(target=many, args=(n,)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    audit.close()
    again = AuditLog.to_file(path)
    again.record(caller="b", route="/r", action="", path="", decision="denied", status=401, seconds=0)
    again.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 1 + 800 + 1
    assert (lines[0]["caller"], lines[-1]["caller"]) == ("a", "b")
