"""An in-process Nexus for the API tier: the real route table, custody machine, store and cipher.

`Node` wires `NexusApi` as `spike.app.nexus.server.Nexus` does (`KeyUsers` hands the
verified key to the secrets store, the cipher and the policy authorizer), minus sockets: the custody
machine gets its key from two recovery shards handed in as an operator would
(`unlock`), and gives it up on `lock` (what a shutdown does).  `call` builds
an `ApiRequest` for a peer and waits for a write's future, as the server does.
"""

from __future__ import annotations

import json
import random
import sqlite3
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import CipherApi
from spike.app.nexus.import_api import ImportApi
from spike.app.nexus.key_users import KeyUsers
from spike.app.nexus.operator_api import OperatorApi
from spike.app.nexus.policy_api import PolicyApi
from spike.app.nexus.routes import NexusApi
from spike.app.nexus.secrets_api import SecretsApi
from spike.app.store.policies import PolicyStore
from spike.app.store.sqlite import SecretStore
from spike.app.store.sqlite_schema import DB_NAME, NexusStore
from spike.protocol import PollSchedule, Report, seal_key
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.effects import Phase
from spike.protocol.identity import Role, SpiffeId, TrustDomains
from spike.protocol.material import RootKey
from spike.protocol.nexus import NexusCustody
from spike.transports.custody_driver import CustodyDriver

TRUST_DOMAIN = "spike.test"  # as in tests/conftest.py
TRUST = TrustDomains.single(TRUST_DOMAIN)
SUPERUSER = TRUST.id_of(Role.PILOT_SUPERUSER)
ROOT_KEY = RootKey(bytes(range(1, 33)))
KEEPERS = (1, 2, 3)
WAIT = 10.0

#: Every peer that must be refused the data routes: other roles, no SPIFFE ID, a foreign trust domain.
OTHER_PEERS: dict[str, SpiffeId | None] = {
    "pilot-recover": TRUST.id_of(Role.PILOT_RECOVER),
    "pilot-restore": TRUST.id_of(Role.PILOT_RESTORE),
    "bootstrap": TRUST.id_of(Role.BOOTSTRAP),
    "nexus": TRUST.id_of(Role.NEXUS),
    "keeper-1": TRUST.id_of(Role.KEEPER, 1),
    "workload": SpiffeId(TRUST_DOMAIN, "/workload/web"),
    "foreign-superuser": SpiffeId("other.test", SUPERUSER.path),
    "no-spiffe-id": None,
}


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    content_type: str

    def json(self) -> Any:
        return json.loads(self.body)

    def error(self) -> str:
        """The `err` code of an error answer, which also gives people its `reason` (issue 18): one line."""
        body = self.json()
        assert set(body) == {"err", "reason"}, body
        reason = body["reason"]
        assert isinstance(reason, str) and reason.strip() and "\n" not in reason, body
        return str(body["err"])


def _no_tls() -> Any:
    raise AssertionError("the in-process node never talks to keepers")


class Node:
    def __init__(self, data_dir: Path, *, lite_workloads: tuple[str, ...] = ()) -> None:
        self.data_dir = data_dir
        self.record, self.shares = seal_key(ROOT_KEY, epoch=1, threshold=2, keeper_ids=KEEPERS)
        self.nexus_store = NexusStore(data_dir)
        self.nexus_store.save_key_record(self.record)
        self.store = SecretStore(data_dir)
        self.now = 0.0
        self.custody = NexusCustody(
            KEEPERS, threshold=2, schedule=PollSchedule(), rng=random.Random(1), now=self.now, record=self.record
        )
        self.cipher = CipherApi()
        self.policies = PolicyStore(self.store)
        self.authorizer = Authorizer(TRUST, self.policies, lite_workloads=lite_workloads)
        self.reports: list[Report] = []
        self.key_users = KeyUsers(self.custody, self.store, self.cipher, self.authorizer, [self.reports.append])
        urls = {i: f"https://127.0.0.1:{20000 + i}" for i in KEEPERS}
        driver = CustodyDriver(self.custody, urls, ssl_context=_no_tls, trust=TRUST, on_report=self.key_users)
        self.api = NexusApi(
            driver,
            self.nexus_store,
            TRUST,
            secrets=SecretsApi(self.store, self.authorizer),
            cipher=self.cipher,
            operator=OperatorApi(driver),
            policies=PolicyApi(self.policies, self.authorizer),
            authorizer=self.authorizer,
            importer=ImportApi(self.policies, self.authorizer.invalidate),
        )

    def _dispatch(self) -> None:
        for effect in self.custody.effects():
            if isinstance(effect, Report):
                self.key_users(effect)

    def unlock(self) -> None:
        for keeper_id in KEEPERS[:2]:
            self.custody.submit_shard(self.shares[keeper_id], self.now)
        self._dispatch()
        assert self.custody.phase is Phase.READY

    def lock(self) -> None:
        self.now += 1
        self.custody.forget(self.now)
        self._dispatch()
        assert self.custody.phase is not Phase.READY

    def close(self) -> None:
        self.store.close()
        self.nexus_store.close()

    def request(
        self,
        path: str,
        body: Any = None,
        *,
        action: str = "",
        peer: SpiffeId | None = SUPERUSER,
        method: str = "POST",
        content_type: str = "application/json",
        headers: dict[bytes, bytes] | None = None,
    ) -> ApiResponse | Future[ApiResponse]:
        raw = body if isinstance(body, bytes) else msgspec.json.encode({} if body is None else body)
        query = f"action={action}" if action else ""
        return self.api(ApiRequest(method, path, peer, raw, query, content_type, headers or {}))

    def call(self, path: str, body: Any = None, **options: Any) -> Answer:
        reply = self.request(path, body, **options)
        response = reply.result(WAIT) if isinstance(reply, Future) else reply
        return Answer(response.status, response.body, response.content_type)


def snapshot(node: Node) -> tuple[list[Any], list[Any]]:
    """Every row of both secret tables: equal snapshots mean a request changed nothing."""
    with sqlite3.connect(node.data_dir / DB_NAME) as db:
        secrets = db.execute("SELECT * FROM secret ORDER BY path").fetchall()
        versions = db.execute("SELECT * FROM secret_version ORDER BY path, version").fetchall()
    return secrets, versions
