"""Helpers shared by the pure core tests: keys, shard bodies and a small Nexus test rig.

The rig plays the driver of `NexusCustody` by hand: it keeps the clock, takes
the effects, remembers which request is in flight for which keeper and feeds
answers back, so a test reads as a conversation with the machine.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any, TypeVar

import msgspec

from spike.protocol import (
    Effect,
    FailureKind,
    KeeperMisbehaved,
    KeeperState,
    KeeperStateChanged,
    KeeperView,
    KeyRecord,
    NexusCustody,
    Phase,
    PollSchedule,
    RequestFailed,
    RequestKind,
    ResponseReceived,
    RootKey,
    SendRequest,
    Share,
    seal_key,
    share_for,
)

E = TypeVar("E")


def key_from_int(value: int) -> RootKey:
    return RootKey(value.to_bytes(32, "big"))


#: A fixed, recognisable root key (a field element well inside the order).
SAMPLE_KEY_INT = 0x5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0DE5EC0
OTHER_KEY_INT = 0x0DDBA11C0FFEE0DDBA11C0FFEE0DDBA11C0FFEE0DDBA11C0FFEE0DDBA11C0FF


def shard_body(share: Share, *, extension: bool = True) -> bytes:
    """A keeper's 200 answer carrying `share` (Go-keeper shape without the extension)."""
    if extension:
        return msgspec.json.encode({"shard": list(share.secret_bytes()), "id": share.id, "epoch": share.epoch})
    return msgspec.json.encode({"shard": list(share.secret_bytes())})


def of_type(effects: Iterable[object], kind: type[E]) -> list[E]:
    return [e for e in effects if isinstance(e, kind)]


class ConstantRandom:
    """A `RandomSource` that always returns one value (0.5 means no jitter at all)."""

    def __init__(self, value: float = 0.5) -> None:
        self.value = value

    def random(self) -> float:
        return self.value


class Rig:
    """A hand-driven Nexus: one custody machine, its clock, its key and shards."""

    def __init__(
        self,
        ids: Sequence[int] = (1, 2, 3),
        threshold: int = 2,
        *,
        epoch: int = 7,
        with_record: bool = True,
        interval: float = 10.0,
        jitter: float = 0.1,
        timeout: float = 2.0,
        seed: int = 1,
        now: float = 100.0,
        key: RootKey | None = None,
        record: KeyRecord | None = None,
        **options: Any,
    ) -> None:
        self.key = key if key is not None else key_from_int(SAMPLE_KEY_INT)
        self.record, self.shares = seal_key(self.key, epoch=epoch, threshold=threshold, keeper_ids=ids)
        if record is not None:
            self.record = record
        self.schedule = PollSchedule(interval=interval, jitter=jitter, request_timeout=timeout)
        self.now = now
        self.custody = NexusCustody(
            ids,
            threshold=threshold,
            schedule=self.schedule,
            rng=random.Random(seed),
            now=now,
            record=self.record if with_record else None,
            **options,
        )
        self.pending: dict[int, SendRequest] = {}  # keeper id -> its request in flight
        self.history: list[Effect] = []

    # -- driving

    def take(self) -> list[Effect]:
        effects = self.custody.effects()
        for effect in effects:
            if isinstance(effect, SendRequest):
                self.pending[effect.keeper_id] = effect
        self.history.extend(effects)
        return effects

    def tick(self, until: float | None = None) -> list[Effect]:
        """Move the clock to `until` (default: the next deadline) and run the timers."""
        self.now = self.custody.next_deadline() if until is None else until
        self.custody.handle_timer(self.now)
        return self.take()

    def start(self) -> list[Effect]:
        """Run the immediate first round of polls."""
        return self.tick(self.now)

    def reply(self, keeper_id: int, status: int, body: bytes = b"{}", *, after: float = 0.01) -> list[Effect]:
        request = self.pending.pop(keeper_id)
        self.now += after
        self.custody.receive(ResponseReceived(request.request_id, status, body), self.now)
        return self.take()

    def reply_shard(self, keeper_id: int, share: Share | None = None, *, extension: bool = True) -> list[Effect]:
        return self.reply(keeper_id, 200, shard_body(share or self.shares[keeper_id], extension=extension))

    def fail(
        self, keeper_id: int, reason: str = "connection refused", kind: FailureKind = FailureKind.OTHER
    ) -> list[Effect]:
        request = self.pending.pop(keeper_id)
        self.now += 0.01
        self.custody.receive(RequestFailed(request.request_id, reason, kind), self.now)
        return self.take()

    def recover(self, *keeper_ids: int) -> list[Effect]:
        """Start and answer the first round from `keeper_ids` with their correct shards."""
        effects = self.start()
        for keeper_id in keeper_ids:
            effects += self.reply_shard(keeper_id)
        return effects

    # -- looking

    def view(self, keeper_id: int) -> KeeperView:
        return next(v for v in self.custody.keepers() if v.keeper_id == keeper_id)

    def phase(self) -> Phase:
        """The phase, read through a call so that type checkers do not pin it after an assert."""
        return self.custody.phase

    def state(self, keeper_id: int) -> KeeperState:
        return self.view(keeper_id).state

    def requests(self, effects: Iterable[Effect], kind: RequestKind | None = None) -> list[SendRequest]:
        return [e for e in of_type(effects, SendRequest) if kind is None or e.kind is kind]

    def changes(self, keeper_id: int) -> list[KeeperStateChanged]:
        return [e for e in of_type(self.history, KeeperStateChanged) if e.keeper_id == keeper_id]

    def misbehaved(self, effects: Iterable[Effect]) -> list[KeeperMisbehaved]:
        return of_type(effects, KeeperMisbehaved)


# ---------------------------------------------------------------------- answering a rig's requests

NOT_FOUND = b'{"err":"api_not_found"}'
GO_EMPTY = b'{"err":"api_bad_request"}'  # how SPIKE's Go keeper says it is empty

Answerer = Callable[[Rig, SendRequest], list[Effect]]


def poll_times(rig: Rig, until: float, answer: Answerer) -> dict[int, list[float]]:
    """Run `rig` until `until`, answering each request with `answer`; return POLL times per keeper."""
    times: dict[int, list[float]] = {i: [] for i in rig.custody.keeper_ids}
    queue = rig.requests(rig.start())
    while True:
        while queue:
            request = queue.pop(0)
            if request.kind is RequestKind.POLL:
                times[request.keeper_id].append(rig.now)
            view = rig.view(request.keeper_id)
            assert request.deadline <= view.next_poll_at, "a request outlives the next poll"
            assert request.deadline <= rig.now + rig.schedule.request_timeout
            queue += rig.requests(answer(rig, request))
        if rig.custody.next_deadline() > until:
            return times
        queue += rig.requests(rig.tick())


def answer_correctly(rig: Rig, request: SendRequest) -> list[Effect]:
    if request.kind is RequestKind.PUSH:
        return rig.reply(request.keeper_id, 200)
    return rig.reply_shard(request.keeper_id)


def answer_badly(rig: Rig, request: SendRequest) -> list[Effect]:
    """A rotating menu of every bad answer; no correct shard is ever given."""
    choice = (request.request_id + request.keeper_id) % 7
    wrong = share_for(key_from_int(OTHER_KEY_INT), epoch=7, threshold=2, id=request.keeper_id)
    if choice == 0:
        return rig.reply(request.keeper_id, 404, NOT_FOUND)
    if choice == 1:
        return rig.reply(request.keeper_id, 400, GO_EMPTY)
    if choice == 2:
        return rig.reply(request.keeper_id, 200, b"\x00garbage")
    if choice == 3:
        return rig.reply_shard(request.keeper_id, wrong)
    if choice == 4:
        return rig.fail(request.keeper_id)
    if choice == 5:
        return rig.reply(request.keeper_id, 500, b"oops")
    return []  # never answered: the request times out
