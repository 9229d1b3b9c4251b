"""An in-process Nexus that rotates its key: the real route table, custody machine, `KeyLifecycle` and SQLite store.

`RotatingNode` wires what `spike nexus` wires (spike/app/nexus/server.py),
minus sockets and the event loop: keepers are the real keeper machines
(`spike.protocol.Keeper`) answering at once, the clock is moved by hand, and
the store calls `KeyLifecycle` makes off the event loop run inline
(`InlineOffload`; a retry "later" waits in `offload.delayed` until the test
runs it).  `restart()` builds the Nexus again from what the store holds,
keepers untouched, as a SIGKILL and a start would.
"""

from __future__ import annotations

import io
import logging
import random
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from spike.app.nexus.audit import AuditLog
from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import CipherApi
from spike.app.nexus.key_users import KeyUsers
from spike.app.nexus.lifecycle import ExportFile, KeyLifecycle
from spike.app.nexus.metrics import NexusMetrics
from spike.app.nexus.operator_api import OperatorApi
from spike.app.nexus.policy_api import PolicyApi
from spike.app.nexus.report_log import ReportLogger
from spike.app.nexus.routes import NexusApi
from spike.app.nexus.secrets_api import SecretsApi
from spike.app.nexus.server import CallRecorder
from spike.app.store.errors import StorageError
from spike.app.store.policies import PolicyStore
from spike.app.store.sqlite import SqliteBackend
from spike.protocol import (
    AbandonRotation,
    CommitRotation,
    Keeper,
    KeyRecord,
    NexusCustody,
    PendingRotation,
    PersistRotation,
    Phase,
    PollSchedule,
    Report,
    RequestFailed,
    ResponseReceived,
    RestoreProgress,
    RootKey,
    SendRequest,
    ShardContribution,
    Share,
    StoreEffect,
    encode,
    seal_key,
)
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.identity import Role, TrustDomains

T = TypeVar("T")

TRUST = TrustDomains.single("spike.test")
NEXUS = TRUST.id_of(Role.NEXUS)
BOOTSTRAP = TRUST.id_of(Role.BOOTSTRAP)
SUPERUSER = TRUST.id_of(Role.PILOT_SUPERUSER)
INTERVAL = 5.0
WAIT = 10.0


class InlineOffload:
    """Store calls run on the caller's thread once the driver is done dispatching (as the event loop
    would run them next); a retry scheduled "later" waits for `run_delayed`."""

    def __init__(self) -> None:
        self.delayed: list[tuple[float, Callable[[], None]]] = []
        self.queued: list[Callable[[], None]] = []

    def __call__(self, call: Callable[[], T], done: Callable[[T | BaseException], None]) -> None:
        def run() -> None:
            try:
                outcome: T | BaseException = call()
            except Exception as exc:
                outcome = exc
            done(outcome)

        self.queued.append(run)

    def drain(self) -> bool:
        queued, self.queued = self.queued, []
        for run in queued:
            run()
        return bool(queued)

    def later(self, delay: float, call: Callable[[], None]) -> None:
        if delay <= 0:
            self.queued.append(call)
        else:
            self.delayed.append((delay, call))

    def run_delayed(self) -> None:
        waiting, self.delayed = self.delayed, []
        for _, call in waiting:
            call()


class FlakyStore:
    """The real backend, whose rotation writes can be made to fail (`fail` names them) or refused."""

    def __init__(self, backend: SqliteBackend) -> None:
        self.backend = backend
        self.fail: set[str] = set()
        self.calls: list[str] = []

    def _maybe_fail(self, what: str) -> None:
        self.calls.append(what)
        if what in self.fail:
            raise StorageError(f"{what}: the disk is full (a test)")

    def persist_rotation(self, pending: PendingRotation, keyring_blob: bytes) -> bool:
        self._maybe_fail("persist")
        return self.backend.persist_rotation(pending, keyring_blob)

    def commit_rotation(self, pending: PendingRotation) -> bool:
        self._maybe_fail("commit")
        return self.backend.commit_rotation(pending)

    def abandon_rotation(self, pending: PendingRotation) -> bool:
        self._maybe_fail("abandon")
        return self.backend.abandon_rotation(pending)

    def cluster_state(self) -> Any:
        return self.backend.cluster_state()

    def rotate_data_key(self, *, rewrap: bool = False) -> int:
        self._maybe_fail("data key")
        return self.backend.rotate_data_key(rewrap=rewrap)

    def rewrap(self) -> int:
        self._maybe_fail("rewrap")
        return self.backend.rewrap()

    def keyring_status(self, *, fresh: bool = False) -> Any:
        return self.backend.keyring_status(fresh=fresh)


class SyncDriver:
    """Stands in for `CustodyDriver`: requests are answered at once by in-memory keepers (unless down)."""

    def __init__(self, node: RotatingNode) -> None:
        self.node = node
        self.custody = node.custody
        self.keeper_urls = {i: f"https://keeper-{i}.test:8443" for i in node.keepers}
        self.on_store: Callable[[StoreEffect], None] = lambda effect: None
        self.on_report: Callable[[Report], None] = lambda report: None
        self._depth = 0
        self._queue: list[SendRequest] = []

    def now(self) -> float:
        return self.node.clock

    def dispatch(self) -> None:
        for effect in self.custody.effects():
            if isinstance(effect, SendRequest):
                self._queue.append(effect)
            elif isinstance(effect, PersistRotation | CommitRotation | AbandonRotation):
                self.on_store(effect)
            else:
                self.on_report(effect)
        if self._depth:
            return
        self._depth += 1
        try:
            while True:
                while self._queue:
                    request = self._queue.pop(0)
                    self.node.requests.append(request)
                    self.custody.receive(self.node.answer(request), self.node.clock)
                    self.dispatch_effects_only()
                if not self.node.offload.drain():
                    break
                self.dispatch_effects_only()
        finally:
            self._depth -= 1

    def dispatch_effects_only(self) -> None:
        self._depth += 1
        try:
            self.dispatch()
        finally:
            self._depth -= 1

    def initialise(self, record: KeyRecord, *, replace: bool) -> bool:
        changed = self.custody.initialise(record, self.node.clock, replace=replace)
        self.dispatch()
        return changed

    def submit_shard(self, share: Share) -> RestoreProgress:
        progress = self.custody.submit_shard(share, self.node.clock)
        self.dispatch()
        return progress

    def confirm_record(self, checked_at: float) -> int:
        refuted = self.custody.confirm_record(checked_at, self.node.clock)
        self.dispatch()
        return refuted

    def follow_rotation(self, pending: PendingRotation | None) -> None:
        self.custody.follow_rotation(pending, self.node.clock)
        self.dispatch()


class RotatingNode:
    """A Nexus on SQLite with in-memory keepers; `run_for` plays the driver loop on the hand-moved clock."""

    def __init__(
        self,
        data_dir: Path,
        *,
        keepers: Iterable[int] = (1, 2, 3),
        threshold: int = 2,
        rotate_every: float | None = None,
        key: bytes = bytes(range(101, 133)),
    ) -> None:
        self.data_dir = data_dir
        self.keepers = tuple(keepers)
        self.threshold = threshold
        self.rotate_every = rotate_every
        self.clock = 0.0
        self.down: set[int] = set()
        self.requests: list[SendRequest] = []
        self.reports: list[Report] = []
        self.keeper_machines: dict[int, Keeper] = {}
        self.log_stream = io.StringIO()
        self.backend = SqliteBackend(data_dir)
        self.store = FlakyStore(self.backend)
        record, shares = seal_key(RootKey(key), epoch=1, threshold=threshold, keeper_ids=self.keepers)
        self.backend.install_key_record(record, replace=None)
        for keeper_id, share in shares.items():
            self.keeper(keeper_id).handle(
                ApiRequest("POST", "/v1/store/contribute", BOOTSTRAP, encode(ShardContribution.of(share)))
            )
        self.start()
        self.run_for(1.0, stop=lambda: self.custody.phase is Phase.READY)
        assert self.custody.phase is Phase.READY

    # -- the pieces

    def keeper(self, keeper_id: int) -> Keeper:
        if keeper_id not in self.keeper_machines:
            self.keeper_machines[keeper_id] = Keeper(TRUST)
        return self.keeper_machines[keeper_id]

    def answer(self, request: SendRequest) -> RequestFailed | ResponseReceived:
        if request.keeper_id in self.down or request.keeper_id not in self.keeper_machines:
            return RequestFailed(request.request_id, "connection refused")
        outcome = self.keeper_machines[request.keeper_id].handle(ApiRequest("POST", request.path, NEXUS, request.body))
        return ResponseReceived(request.request_id, outcome.response.status, outcome.response.body)

    def start(self, keepers: Iterable[int] | None = None, threshold: int | None = None) -> None:
        """(Re)start Nexus from the store, configured with `keepers` and `threshold` (default: as before)."""
        ids = self.keepers if keepers is None else tuple(keepers)
        t = self.threshold if threshold is None else threshold
        record = self.backend.load_key_record()
        pending, _, highest = self.backend.load_rotation_state()
        assert record is not None
        self.custody = NexusCustody(
            ids,
            threshold=t,
            schedule=PollSchedule(interval=INTERVAL, jitter=0.1, request_timeout=1.0),
            rng=random.Random(1),
            now=self.clock,
            record=record,
            pending=pending,
            highest_epoch=highest,
            rekey=(record.keeper_ids, record.threshold) != (tuple(sorted(ids)), t),
            random_bytes=random.Random(int(self.clock * 1000) + 7).randbytes,
        )
        self.offload = InlineOffload()
        self.driver = SyncDriver(self)
        logger = logging.getLogger(f"spike.test.rotation.{id(self)}")
        logger.handlers[:] = [logging.StreamHandler(self.log_stream)]
        logger.setLevel(logging.INFO)
        logger.propagate = False
        self.cipher = CipherApi()
        self.policies = PolicyStore(self.backend)
        self.authorizer = Authorizer(TRUST, self.policies)
        self.metrics = NexusMetrics(
            lambda: self.custody, self.driver.keeper_urls, lambda: self.clock,
            keyring=lambda: self.lifecycle.refresh_keyring(),  # noqa: PLW0108 - made just below
        )  # fmt: skip
        self.lifecycle = KeyLifecycle(
            self.driver,
            self.store,
            wrap_keyring=lambda key, epoch: self.backend.keyring().wrap(key, epoch),
            offload=self.offload,
            to_wall=lambda moment: 1_800_000_000.0 + moment,
            rotate_every=self.rotate_every,
            exports=ExportFile(self.data_dir),
        )
        sinks: list[Callable[[Report], None]] = [
            self.reports.append,
            ReportLogger(logger, self.driver.keeper_urls, lambda: self.clock),
            self.metrics.report,
            self.lifecycle.report,
        ]
        self.driver.on_report = KeyUsers(self.custody, self.backend, self.cipher, self.authorizer, sinks)
        self.driver.on_store = self.lifecycle.on_store
        self.api = NexusApi(
            self.driver,  # type: ignore[arg-type]
            self.backend,
            TRUST,
            secrets=SecretsApi(self.backend, self.authorizer),
            cipher=self.cipher,
            operator=OperatorApi(self.driver, on_export=self.lifecycle.note_export),  # type: ignore[arg-type]
            policies=PolicyApi(self.policies, self.authorizer),
            authorizer=self.authorizer,
            observer=CallRecorder(AuditLog(io.StringIO()), self.metrics),
            lifecycle=self.lifecycle,
        )
        self.lifecycle.arm_schedule()

    def restart(self, keepers: Iterable[int] | None = None, threshold: int | None = None) -> None:
        self.custody.forget(self.clock)
        self.backend.lock()
        self.start(keepers, threshold)

    def close(self) -> None:
        self.backend.close()

    # -- the loop

    def run_for(self, seconds: float, *, stop: Callable[[], bool] | None = None) -> None:
        end = self.clock + seconds
        self.driver.dispatch()
        while True:
            if stop is not None and stop():
                return
            wake = self.custody.next_deadline()
            if wake > end:
                self.clock = end
                return
            self.clock = max(self.clock, wake)
            self.custody.handle_timer(self.clock)
            self.driver.dispatch()

    def committed(self, epoch: int = 2) -> bool:
        record = self.custody.record
        return self.custody.rotation is None and record is not None and record.epoch >= epoch

    # -- the API

    def call(self, path: str, body: Any = None, *, peer: Any = SUPERUSER, action: str = "") -> ApiResponse:
        raw = body if isinstance(body, bytes) else msgspec.json.encode({} if body is None else body)
        reply = self.api(ApiRequest("POST", path, peer, raw, f"action={action}" if action else "", "application/json"))
        self.driver.dispatch()  # what the event loop would run next: store calls handed off by the request
        return reply.result(WAIT) if isinstance(reply, Future) else reply

    def logs(self) -> str:
        return self.log_stream.getvalue()
