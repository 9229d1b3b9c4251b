"""Drives a `NexusCustody` machine over real keepers.

One timer task wakes at the machine's `next_deadline()`.  Each keeper has
one keep-alive connection; a request the machine asks for is handed to it
at once (`HttpsConnection.submit`), bounded by the deadline the machine
gave it, and its answer comes back by callback and is fed straight into the
machine.  The machine's reports go to the `on_report` callback (logs,
metrics), its store effects (a key rotation's) to `on_store`.  All of it runs
on one event loop thread, so the machine needs no locks, and no task is
spawned per request.

The keepers the machine polls can change while it runs: a rekey adds the
keepers of the new set when its rotation is stored and lets removed ones go
once they are cleared.  So the driver is given URLs by keeper id (the
configured keepers, and those a rekey is moving custody away from), opens a
keeper's connection when it is first asked to talk to it, and answers a
request to a keeper it has no URL for at once, as a failure: the machine
keeps polling it (no keeper is ever dropped) and sees it unreachable.
The connections of the keepers polled at the start are made at once (no I/O
until the first request), so a caller may open them before `run`.
"""

from __future__ import annotations

import asyncio
import math
import ssl
from collections.abc import Callable, Mapping
from functools import partial

import anyio
import msgspec

from spike.protocol.effects import (
    AbandonRotation,
    CommitRotation,
    PersistRotation,
    Report,
    RequestKind,
    SendRequest,
    StoreEffect,
)
from spike.protocol.events import Answer, FailureKind, RequestFailed, ResponseReceived
from spike.protocol.identity import Role, TrustDomains
from spike.protocol.material import Share
from spike.protocol.nexus import NexusCustody, RestoreProgress
from spike.protocol.pending import PendingRotation
from spike.protocol.record import KeyRecord

from .client import HttpsConnection, Outcome, TransportError
from .tls import keeper_check

ReportSink = Callable[[Report], None]
StoreSink = Callable[[StoreEffect], None]  # a key rotation's store effects (docs/key-lifecycle.md section 10)
AnswerSink = Callable[[SendRequest, Answer, float], None]  # request, its outcome, seconds taken


class PollTiming(msgspec.Struct):
    """How late polls were sent compared with the schedule, for metrics and benchmarks."""

    samples: list[float] = msgspec.field(default_factory=list)
    limit: int = 100_000

    def add(self, lateness: float) -> None:
        if len(self.samples) < self.limit:
            self.samples.append(lateness)


class CustodyDriver:
    def __init__(
        self,
        custody: NexusCustody,
        keeper_urls: Mapping[int, str],
        *,
        ssl_context: ssl.SSLContext | Callable[[], ssl.SSLContext],
        trust: TrustDomains,
        on_report: ReportSink,
        on_answer: AnswerSink | None = None,
        on_store: StoreSink | None = None,
    ) -> None:
        self.custody = custody
        self._on_report = on_report
        self._on_answer = on_answer
        self._on_store = on_store
        self._ssl_context = ssl_context
        self._trust = trust
        self._connections: dict[int, HttpsConnection] = {}
        self._retired: list[HttpsConnection] = []  # connections whose URL changed, to close
        self.keeper_urls = dict(keeper_urls)
        for keeper_id in custody.keeper_ids:  # made now (no I/O yet): a caller may warm them up before run()
            self._connection(keeper_id)
        self._running = False
        self._wake = anyio.Event()
        self._sleep_until = math.inf
        self.lateness = PollTiming()

    # Called from handlers on the event loop thread --------------------------------------

    def now(self) -> float:
        return anyio.current_time()

    def url_of(self, keeper_id: int) -> str:
        """The keeper's URL, or a word saying it has none (a keeper only the stored record names)."""
        return self.keeper_urls.get(keeper_id, "no URL configured")

    def set_keeper_urls(self, keeper_urls: Mapping[int, str]) -> None:
        """Use these URLs from now on (a configuration reload); a keeper whose URL changed gets a new connection."""
        for keeper_id in list(self._connections):
            if keeper_urls.get(keeper_id) != self.keeper_urls.get(keeper_id):
                self._retired.append(self._connections.pop(keeper_id))
        self.keeper_urls = dict(keeper_urls)
        if self._retired and self._running:
            retired, self._retired = self._retired, []
            for connection in retired:
                asyncio.get_running_loop().create_task(connection.aclose())

    def dispatch(self) -> None:
        """Carry out what the machine asked for after a call made on it directly (a rotation call)."""
        self._dispatch()

    def initialise(self, record: KeyRecord, *, replace: bool) -> bool:
        changed = self.custody.initialise(record, self.now(), replace=replace)
        self._dispatch()
        return changed

    def shards_dealt(self) -> int:
        """Bootstrap dealt the shards of the record in force: read the keepers now (`NexusCustody.shards_dealt`)."""
        sent = self.custody.shards_dealt(self.now())
        self._dispatch()
        return sent

    def submit_shard(self, share: Share) -> RestoreProgress:
        progress = self.custody.submit_shard(share, self.now())
        self._dispatch()
        return progress

    def follow_rotation(self, pending: PendingRotation | None) -> None:
        """Another Nexus instance's rotation, as the store shows it (`NexusCustody.follow_rotation`)."""
        self.custody.follow_rotation(pending, self.now())
        self._dispatch()

    def confirm_record(self, checked_at: float) -> int:
        """The stored key record, read from `checked_at` on, is the machine's own (`NexusCustody.confirm_record`)."""
        refuted = self.custody.confirm_record(checked_at, self.now())
        self._dispatch()
        return refuted

    # The tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        self._running = True
        try:
            await self._timer_loop()
        finally:
            self._running = False
            with anyio.CancelScope(shield=True):
                for connection in [*self._connections.values(), *self._retired]:
                    await connection.aclose()

    async def _timer_loop(self) -> None:
        custody = self.custody
        while True:
            self._dispatch()
            self._sleep_until = custody.next_deadline()
            delay = self._sleep_until - self.now()
            if delay > 0:
                self._wake = anyio.Event()
                with anyio.move_on_after(delay):
                    await self._wake.wait()
            self._sleep_until = -math.inf  # awake: nobody needs to wake us
            custody.handle_timer(self.now())

    def _perform(self, request: SendRequest) -> None:
        # No task and no await per request: the connection calls back with the
        # answer, and the request's deadline is a loop timer.  This is what a
        # thousand keepers a second cost little for.
        start = self.now()
        if request.kind is RequestKind.POLL:
            self.lateness.add(start - request.scheduled_at)
        if start >= request.deadline:
            failed = RequestFailed(request.request_id, "deadline passed before it could be sent", FailureKind.TIMEOUT)
            asyncio.get_running_loop().call_soon(self._answered, request, start, failed)
            return
        connection = self._connection(request.keeper_id)
        if connection is None:
            # A keeper of the stored record that the configuration no longer names (a rekey without
            # its URL in --retiring-keepers): the machine keeps polling it and sees it unreachable.
            failed = RequestFailed(request.request_id, "no URL configured for this keeper", FailureKind.UNREACHABLE)
            asyncio.get_running_loop().call_soon(self._answered, request, start, failed)
            return
        connection.submit(
            "POST",
            request.path,
            request.body,
            deadline=request.deadline,
            on_done=partial(self._outcome, request, start),
        )

    def _connection(self, keeper_id: int) -> HttpsConnection | None:
        connection = self._connections.get(keeper_id)
        if connection is None:
            url = self.keeper_urls.get(keeper_id)
            if url is None:
                return None
            connection = self._connections[keeper_id] = HttpsConnection(
                url,
                self._ssl_context,
                keeper_check(self._trust, keeper_id),
                expected_peer=str(self._trust.id_of(Role.KEEPER, keeper_id)),
            )
        return connection

    def _outcome(self, request: SendRequest, start: float, outcome: Outcome) -> None:
        answer: Answer
        if isinstance(outcome, Exception):
            # The connection mapped what went wrong to a kind, once; anything else it let through is OTHER.
            kind = outcome.kind if isinstance(outcome, TransportError) else FailureKind.OTHER
            answer = RequestFailed(request.request_id, str(outcome), kind)
        else:
            answer = ResponseReceived(request.request_id, outcome[0], outcome[1])
        self._answered(request, start, answer)

    def _answered(self, request: SendRequest, start: float, answer: Answer) -> None:
        if not self._running:
            return
        finished = self.now()
        if self._on_answer is not None:
            self._on_answer(request, answer, finished - start)
        self.custody.receive(answer, finished)
        self._dispatch()

    def _dispatch(self) -> None:
        for effect in self.custody.effects():
            if isinstance(effect, SendRequest):
                if self._running:  # otherwise its deadline expires it in the machine
                    self._perform(effect)
            elif isinstance(effect, PersistRotation | CommitRotation | AbandonRotation):
                # Emitted only after a rotation call, which a driver makes only with somewhere to store it.
                if self._on_store is None:
                    raise RuntimeError("a key rotation needs on_store: nowhere to store its pending rotation")
                self._on_store(effect)
            else:
                self._on_report(effect)
        # An answer or a new request may have brought the machine's next deadline forward.
        if self.custody.next_deadline() < self._sleep_until:
            self._wake.set()
