"""An in-process Nexus for the operations tests: the real route table, custody machine and operator API.

`Node` wires `NexusApi` as `spike nexus` does (`KeyUsers` hands the verified
key to the secrets store, the cipher and the policy authorizer, `CallRecorder`
feeds the audit log and the request metrics), minus sockets.  The custody driver is a small
double that keeps a hand-moved clock and the effects the machine asked for,
so a test can answer polls as keepers would (`answer`) and see which keepers
a restore re-seeds.  `client()` is the operator's real `NexusClient` talking
to this node in-process: `spike operator recover|restore` run their real
code, error mapping included.
"""

from __future__ import annotations

import base64
import io
import json
import random
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import msgspec

from spike.app.api.messages import EXTENSIONS_HEADER
from spike.app.commands.client import NexusClient
from spike.app.nexus.audit import AuditLog
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import CipherApi
from spike.app.nexus.key_users import KeyUsers
from spike.app.nexus.metrics import NexusMetrics
from spike.app.nexus.operator_api import OperatorApi
from spike.app.nexus.policy_api import PolicyApi
from spike.app.nexus.routes import NexusApi
from spike.app.nexus.secrets_api import SecretsApi
from spike.app.nexus.server import CallRecorder
from spike.app.store.policies import PolicyStore
from spike.app.store.sqlite import SecretStore
from spike.app.store.sqlite_schema import NexusStore
from spike.protocol import (
    KeyRecord,
    NexusCustody,
    PollSchedule,
    Report,
    RequestFailed,
    ResponseReceived,
    RestoreProgress,
    RootKey,
    SendRequest,
    Share,
    seal_key,
)
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.identity import Role, SpiffeId, TrustDomains
from spike.protocol.shamir import ShardDerivation

TRUST_DOMAIN = "spike.test"  # as in tests/conftest.py
TRUST = TrustDomains.single(TRUST_DOMAIN)
KEEPERS = (1, 2, 3)
URLS = {i: f"https://127.0.0.1:{20000 + i}" for i in KEEPERS}
#: The header spike's own clients send with every request (spike/app/nexus/dialect.py).
SPIKE_CLIENT = {EXTENSIONS_HEADER: b"1"}
ROOT_KEY = bytes(range(101, 133))  # a fixed, recognisable 32-byte key
OTHER_KEY = bytes(range(1, 33))
WAIT = 10.0


_ROLES = {
    "superuser": Role.PILOT_SUPERUSER,
    "recover": Role.PILOT_RECOVER,
    "restore": Role.PILOT_RESTORE,
    "bootstrap": Role.BOOTSTRAP,
    "nexus": Role.NEXUS,
}


def peer(who: str) -> SpiffeId:
    """'superuser', 'recover', 'restore', 'bootstrap', 'nexus', 'keeper-2', or a workload's path ('/web')."""
    if who.startswith("/"):
        return SpiffeId(TRUST_DOMAIN, who)
    if who.startswith("keeper-"):
        return TRUST.id_of(Role.KEEPER, int(who.removeprefix("keeper-")))
    return TRUST.id_of(_ROLES[who])


def sealed(key: bytes = ROOT_KEY, epoch: int = 1) -> tuple[KeyRecord, dict[int, Share]]:
    return seal_key(RootKey(key), epoch=epoch, threshold=2, keeper_ids=KEEPERS)


RECORD, SHARES = sealed()  # the deployment of every ops test (its `node` fixture: conftest.py)


def shard_answer(share: Share) -> bytes:
    return msgspec.json.encode({"shard": list(share.secret_bytes()), "id": share.id, "epoch": share.epoch})


class Driver:
    """Stands in for `CustodyDriver`: the machine, a clock moved by hand, the requests it asked for."""

    def __init__(self, custody: NexusCustody, on_report: Callable[[Report], None]) -> None:
        self.custody = custody
        self.keeper_urls = dict(URLS)
        self.clock = 0.0
        self.sent: list[SendRequest] = []
        self.pending: dict[int, SendRequest] = {}
        self._on_report = on_report

    def now(self) -> float:
        return self.clock

    def dispatch(self) -> None:
        for effect in self.custody.effects():
            if isinstance(effect, SendRequest):
                self.sent.append(effect)
                self.pending[effect.keeper_id] = effect
            else:
                self._on_report(effect)

    def submit_shard(self, share: Share) -> RestoreProgress:
        progress = self.custody.submit_shard(share, self.clock)
        self.dispatch()
        return progress

    def initialise(self, record: KeyRecord, *, replace: bool) -> bool:
        changed = self.custody.initialise(record, self.clock, replace=replace)
        self.dispatch()
        return changed

    def confirm_record(self, checked_at: float) -> int:
        refuted = self.custody.confirm_record(checked_at, self.clock)
        self.dispatch()
        return refuted

    def tick(self, to: float | None = None) -> None:
        """Run the machine's timers at `to` (default: its next deadline, or now if that has passed)."""
        self.clock = max(self.clock, self.custody.next_deadline()) if to is None else to
        self.custody.handle_timer(self.clock)
        self.dispatch()

    def answer(self, keeper_id: int, status: int | None, body: bytes = b"{}") -> SendRequest:
        """Answer the keeper's request in flight (`status` None: it failed, as an unreachable keeper)."""
        request = self.pending.pop(keeper_id)
        self.clock += 0.01
        if status is None:
            self.custody.receive(RequestFailed(request.request_id, "connection refused"), self.clock)
        else:
            self.custody.receive(ResponseReceived(request.request_id, status, body), self.clock)
        self.dispatch()
        return request


class Node:
    """A Nexus in-process: custody, operator API, secrets, cipher, audit log (in memory) and metrics."""

    def __init__(
        self,
        data_dir: Path,
        *,
        record: KeyRecord | None = None,
        initialised: bool = True,
        derivation: ShardDerivation = ShardDerivation.HMAC,
    ) -> None:
        if initialised and record is None:
            record, _ = sealed()
        self.record = record
        self.data_dir = data_dir
        self.nexus_store = NexusStore(data_dir)
        if record is not None:
            self.nexus_store.save_key_record(record)
        self.store = SecretStore(data_dir)
        self.custody = NexusCustody(
            KEEPERS,
            threshold=2,
            schedule=PollSchedule(interval=5.0),
            rng=random.Random(1),
            now=0.0,
            record=record,
            derivation=derivation,
        )
        self.reports: list[Report] = []
        self.cipher = CipherApi()
        self.policies = PolicyStore(self.store)
        self.authorizer = Authorizer(TRUST, self.policies)
        self.metrics = NexusMetrics(lambda: self.custody, URLS, lambda: self.driver.clock)
        sinks: list[Callable[[Report], None]] = [self.reports.append, self.metrics.report]
        key_users = KeyUsers(self.custody, self.store, self.cipher, self.authorizer, sinks)
        self.driver = Driver(self.custody, key_users)
        self.audit_stream = io.StringIO()
        self.operator = OperatorApi(self.driver)  # type: ignore[arg-type]
        self.api = NexusApi(
            self.driver,  # type: ignore[arg-type]
            self.nexus_store,
            TRUST,
            secrets=SecretsApi(self.store, self.authorizer),
            cipher=self.cipher,
            operator=self.operator,
            policies=PolicyApi(self.policies, self.authorizer),
            authorizer=self.authorizer,
            observer=CallRecorder(AuditLog(self.audit_stream), self.metrics),
        )

    def close(self) -> None:
        self.store.close()
        self.nexus_store.close()

    def call(
        self,
        path: str,
        body: Any = None,
        *,
        as_: str = "superuser",
        action: str = "",
        method: str = "POST",
        content_type: str = "application/json",
        headers: Mapping[bytes, bytes] | None = None,
    ) -> ApiResponse:
        """`headers`: none by default (SPIKE's Go SDK sends none that matter); `SPIKE_CLIENT` for spike's own."""
        raw = body if isinstance(body, bytes) else msgspec.json.encode({} if body is None else body)
        who = None if as_ == "nobody" else peer(as_)
        query = f"action={action}" if action else ""
        reply = self.api(ApiRequest(method, path, who, raw, query, content_type, headers or {}))
        return reply.result(WAIT) if isinstance(reply, Future) else reply

    def audit(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.audit_stream.getvalue().splitlines()]

    def client(self, as_: str) -> NexusClient:
        """The operator's real client, whose connection is this node (no TLS, no event loop)."""
        client = NexusClient.__new__(NexusClient)
        client.url = "https://nexus.in-process"
        client._nexus = _InProcess(self, as_)  # type: ignore[assignment]
        return client


class _InProcess:
    """What `NexusClient` needs of a connection: post(target, body, content_type) -> (status, body)."""

    def __init__(self, node: Node, as_: str) -> None:
        self._node = node
        self._as = as_

    def post(self, target: str, body: bytes = b"{}", *, content_type: str = "application/json") -> tuple[int, bytes]:
        path, _, query = target.partition("?")
        action = query.partition("action=")[2]
        answer = self._node.call(
            path, body, as_=self._as, action=action, content_type=content_type, headers=SPIKE_CLIENT
        )
        return answer.status, answer.body


def unlock(node: Node, shares: dict[int, Share]) -> None:
    """Hand two shards in as the restore role would; the node is then ready."""
    for keeper_id in (1, 2):
        node.driver.submit_shard(shares[keeper_id])


# ---------------------------------------------------------------------- secret hunting


def secret_needles(secret: bytes) -> list[bytes]:
    """Forms a leaked secret could take in text: raw, hex, base64, JSON and Python int lists (8-byte windows)."""
    windows = [secret[i : i + 8] for i in range(max(1, len(secret) - 7))]
    b64 = base64.b64encode(secret).rstrip(b"=")
    return [
        *windows,
        *(w.hex().encode() for w in windows),
        *(w.hex().upper().encode() for w in windows),
        *(b64[i : i + 12] for i in range(0, max(1, len(b64) - 11), 4)),
        *(",".join(map(str, w)).encode() for w in windows),
        *(", ".join(map(str, w)).encode() for w in windows),
    ]


def leaks(text: str | bytes, secrets: dict[str, bytes]) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [name for name, secret in secrets.items() if any(n in data for n in secret_needles(secret))]


def secrets_of(shares: Iterable[Share], key: bytes, label: str = "") -> dict[str, bytes]:
    found = {f"{label}shard {s.id}": s.secret_bytes() for s in shares}
    found[f"{label}root key"] = key
    return found
