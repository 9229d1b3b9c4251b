"""Drives a `NexusCustody` machine over real keepers.

One timer task wakes at the machine's `next_deadline()`; one worker task per
keeper owns that keeper's keep-alive connection and performs its requests
in order, each bounded by the deadline the machine gave it.  Every answer is
fed straight back into the machine, and the machine's reports go to the
`on_report` callback (logs, metrics).  All of it runs on one event loop
thread, so the machine needs no locks.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from spike.protocol.effects import Report, RequestKind, SendRequest
from spike.protocol.events import Answer, RequestFailed, ResponseReceived
from spike.protocol.identity import Role, TrustDomains
from spike.protocol.material import Share
from spike.protocol.nexus import NexusCustody, RestoreProgress
from spike.protocol.record import KeyRecord

from .client import HttpsConnection, TransportError
from .tls import keeper_check

ReportSink = Callable[[Report], None]
AnswerSink = Callable[[SendRequest, Answer, float], None]  # request, its outcome, seconds taken


@dataclass(slots=True)
class PollTiming:
    """How late polls were sent compared with the schedule, for metrics and benchmarks."""

    samples: list[float] = field(default_factory=list)
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
    ) -> None:
        if set(keeper_urls) != set(custody.keeper_ids):
            raise ValueError("keeper URLs must be given for exactly the custody machine's keepers")
        self.custody = custody
        self._on_report = on_report
        self._on_answer = on_answer
        self._connections = {
            keeper_id: HttpsConnection(
                url,
                ssl_context,
                keeper_check(trust, keeper_id),
                expected_peer=str(trust.id_of(Role.KEEPER, keeper_id)),
            )
            for keeper_id, url in keeper_urls.items()
        }
        self.keeper_urls = dict(keeper_urls)
        self._queues: dict[int, MemoryObjectSendStream[SendRequest]] = {}
        self._wake = anyio.Event()
        self._sleep_until = math.inf
        self.lateness = PollTiming()

    # Called from handlers on the event loop thread --------------------------------------

    def now(self) -> float:
        return anyio.current_time()

    def initialise(self, record: KeyRecord, *, replace: bool) -> bool:
        changed = self.custody.initialise(record, self.now(), replace=replace)
        self._dispatch()
        return changed

    def submit_shard(self, share: Share) -> RestoreProgress:
        progress = self.custody.submit_shard(share, self.now())
        self._dispatch()
        return progress

    # The tasks ----------------------------------------------------------------------------

    async def run(self) -> None:
        async with anyio.create_task_group() as tg:
            for keeper_id in self.custody.keeper_ids:
                send, receive = anyio.create_memory_object_stream[SendRequest](math.inf)
                self._queues[keeper_id] = send
                tg.start_soon(self._worker, keeper_id, receive)
            try:
                await self._timer_loop()
            finally:
                for queue in self._queues.values():
                    queue.close()

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

    async def _worker(self, keeper_id: int, requests: MemoryObjectReceiveStream[SendRequest]) -> None:
        connection = self._connections[keeper_id]
        try:
            async with requests:
                async for request in requests:
                    await self._perform(connection, request)
        finally:
            await connection.aclose()

    async def _perform(self, connection: HttpsConnection, request: SendRequest) -> None:
        start = self.now()
        if request.kind is RequestKind.POLL:
            self.lateness.add(start - request.scheduled_at)
        answer: Answer
        if start >= request.deadline:
            answer = RequestFailed(request.request_id, "deadline passed before it could be sent")
        else:
            try:
                with anyio.fail_after(request.deadline - start):
                    status, body = await connection.request("POST", request.path, request.body)
            except TimeoutError:
                answer = RequestFailed(request.request_id, "timed out")
            except TransportError as exc:
                answer = RequestFailed(request.request_id, str(exc))
            else:
                answer = ResponseReceived(request.request_id, status, body)
        finished = self.now()
        if self._on_answer is not None:
            self._on_answer(request, answer, finished - start)
        self.custody.receive(answer, finished)
        self._dispatch()

    def _dispatch(self) -> None:
        for effect in self.custody.effects():
            if isinstance(effect, SendRequest):
                queue = self._queues.get(effect.keeper_id)
                if queue is None:  # not running yet or shutting down: the deadline will expire it
                    continue
                queue.send_nowait(effect)
            else:
                self._on_report(effect)
        # An answer or a new request may have brought the machine's next deadline forward.
        if self.custody.next_deadline() < self._sleep_until:
            self._wake.set()
