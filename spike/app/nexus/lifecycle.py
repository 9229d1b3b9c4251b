"""Nexus's side of the key lifecycle: it stores what the custody machine's rotations need, and starts them.

The custody core decides how a rotation moves (docs/key-lifecycle.md); this
module is the driver's half of that contract:

* **Store effects.**  `PersistRotation` stores the pending rotation with the
  keyring wrapped under the new root key, `CommitRotation` makes the new
  record (and that keyring) the ones in force, `AbandonRotation` deletes the
  pending rotation and burns its epoch: each one write, a compare-and-set in
  the store, run off the event loop, and acknowledged to the machine only once
  it is durable.  A failed commit or abandon is tried again (the machine waits
  for it; nothing else waits on it).
* **Starting rotations.**  An operator's `spike operator rotate` (the route
  `/v1/operator/rotate`, superuser only), the schedule (`--rotate-every`: the
  next one is armed a period after each rotation ends, this instance's or one
  it followed, so several instances make one rotation per period), and a
  configuration reload that moves custody to another keeper set or threshold.
* **What status shows** of a rotation under way and of the schedule.

Nothing here holds a key longer than the call that wraps the keyring with it,
and nothing here logs one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from collections.abc import Callable, Iterable
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from pathlib import Path
from typing import Protocol, TypeVar

import msgspec

from spike.app.api.messages import (
    KeyringStatusBody,
    RecoveryStatus,
    RotateRequest,
    RotateResponse,
    RotationStatus,
    ScheduleStatus,
)
from spike.app.nexus import refusals
from spike.app.store.backend import ClusterState, KeyringStatus
from spike.app.store.errors import RotationUnderWay, StorageError
from spike.app.store.group_commit import resolved
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.custody_view import RotationView
from spike.protocol.effects import (
    CommitRotation,
    PersistRotation,
    Phase,
    Report,
    RotationProgress,
    RotationStage,
    StoreEffect,
)
from spike.protocol.errors import LocalProtocolError, RemoteProtocolError, ShamirError
from spike.protocol.material import RootKey
from spike.protocol.nexus import NexusCustody
from spike.protocol.pending import PendingRotation
from spike.protocol.record import KeyRecord
from spike.protocol.wire import ErrorCode, decode

log = logging.getLogger("spike.nexus.lifecycle")

T = TypeVar("T")

#: The first wait before a failed commit or abandon is written again; it doubles up to `RETRY_MOST`.
RETRY_FIRST = 0.5
RETRY_MOST = 30.0


class RotationStore(Protocol):
    """What the store does for a rotation (spike.app.store: a compare-and-set each, durable on return),
    and for the data keys (blocking calls: run off the event loop)."""

    def persist_rotation(self, pending: PendingRotation, keyring_blob: bytes) -> bool: ...

    def commit_rotation(self, pending: PendingRotation) -> bool: ...

    def abandon_rotation(self, pending: PendingRotation) -> bool: ...

    def cluster_state(self) -> ClusterState: ...

    def rotate_data_key(self, *, rewrap: bool = False) -> int: ...

    def rewrap(self) -> int: ...

    def keyring_status(self, *, fresh: bool = False) -> KeyringStatus: ...


class Driver(Protocol):
    """What this module needs of the custody driver (spike.transports.custody_driver.CustodyDriver)."""

    custody: NexusCustody

    def now(self) -> float: ...

    def dispatch(self) -> None: ...


#: Wraps the keyring in force under a new root key, for the rotation to that key's epoch.
WrapKeyring = Callable[[RootKey, int], bytes]


class Offload(Protocol):
    """Runs a blocking store call away from the event loop, then `done` (outcome or exception) back on it."""

    def __call__(self, call: Callable[[], T], done: Callable[[T | BaseException], None]) -> None: ...

    def later(self, delay: float, call: Callable[[], None]) -> None: ...


class LoopOffload:
    """`Offload` on the running asyncio loop and one writer thread: store calls are made one at a time, in order."""

    def __init__(self, executor: Executor | None = None) -> None:
        self._executor = executor or ThreadPoolExecutor(max_workers=1, thread_name_prefix="spike-rotation-store")

    def __call__(self, call: Callable[[], T], done: Callable[[T | BaseException], None]) -> None:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, call)

        def finished(outcome: asyncio.Future[T]) -> None:
            if outcome.cancelled():
                return  # the loop is stopping
            error = outcome.exception()
            done(error if error is not None else outcome.result())

        future.add_done_callback(finished)

    def later(self, delay: float, call: Callable[[], None]) -> None:
        asyncio.get_running_loop().call_later(delay, call)

    def close(self) -> None:
        if isinstance(self._executor, ThreadPoolExecutor):
            self._executor.shutdown(wait=True)


class ExportLog(Protocol):
    """Where `spike operator recover`'s exports are recorded: the key epoch, and when (unix time)."""

    def note(self, epoch: int, at: float) -> None: ...

    def newest(self) -> tuple[int, float] | None: ...


class ExportFile:
    """`ExportLog` in a small file of the data dir (`recovery-exports.json`, 0600): it survives restarts.

    It is this instance's: with several Nexus instances on PostgreSQL, each knows the exports it
    served (docs/key-lifecycle.md section 11).  Nothing secret is in it: epochs and times.
    """

    NAME = "recovery-exports.json"
    KEEP = 16

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / self.NAME

    def _read(self) -> list[tuple[int, float]]:
        import json  # here: only an export writes or reads the file (~2 ms of every start, issue 20)

        try:
            raw = json.loads(self.path.read_text())
            return [(int(e["epoch"]), float(e["time"])) for e in raw["exports"]]
        except FileNotFoundError:
            return []
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("%s is unreadable (%s): no recovery export is known", self.path, exc)
            return []

    def note(self, epoch: int, at: float) -> None:
        import json

        exports = [*self._read(), (epoch, at)][-self.KEEP :]
        data = json.dumps({"exports": [{"epoch": e, "time": t} for e, t in exports]}).encode()
        tmp = self.path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(self.path)

    def newest(self) -> tuple[int, float] | None:
        exports = self._read()
        return max(exports, key=lambda e: e[1]) if exports else None


def epochs_since(record: KeyRecord, epoch: int) -> int:
    """How many key epochs the deployment had after `epoch`, up to the record's (0: `epoch` is in force)."""
    if epoch >= record.epoch:
        return 0
    later = 1  # the record's own
    for first, last in record.earlier_epochs():
        low, high = max(first, epoch + 1), last
        if high >= low:
            later += high - low + 1
    return later


def crash_here(point: str, armed: str | None) -> None:
    """SIGKILL this process at `point` if a test build armed it (spike.app.config.CRASH_POINTS)."""
    if armed is not None and point == armed:
        log.warning("test build: stopping with SIGKILL at %s (SPIKE_TEST_CRASH_AT)", point)
        for handler in logging.getLogger().handlers:
            handler.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def rotation_status(view: RotationView, to_wall: Callable[[float], float]) -> RotationStatus:
    return RotationStatus(
        stage=view.stage.value,
        from_epoch=view.from_epoch,
        to_epoch=view.to_epoch,
        threshold=view.threshold,
        keepers=list(view.keeper_ids),
        dealt=list(view.dealt),
        needed=view.needed,
        started=to_wall(view.started_at),
    )


def describe(view: RotationView) -> str:
    """A rotation under way in words, for refusals and logs."""
    where = {
        RotationStage.PERSISTING: "being stored",
        RotationStage.DEALING: f"dealing: {view.needed} more keeper(s) must show their new shard",
        RotationStage.COMMITTING: "committing",
        RotationStage.ABANDONING: "being given up",
        RotationStage.FOLLOWING: "carried out by another Nexus instance",
    }.get(view.stage, view.stage.value)
    return f"a key rotation {view.from_epoch} -> {view.to_epoch} is under way ({where})"


class _Waiter(msgspec.Struct):
    """An operator's request waiting for its rotation to be stored (or given up)."""

    to_epoch: int  # the rotation's (each rotation has an epoch of its own)
    answer: Future[ApiResponse]


class KeyLifecycle:
    """Stores rotations for the custody machine, and starts them: operator, schedule, reload."""

    def __init__(
        self,
        driver: Driver,
        store: RotationStore,
        *,
        wrap_keyring: WrapKeyring,
        offload: Offload,
        to_wall: Callable[[float], float],
        rotate_every: float | None = None,
        crash_at: str | None = None,
        follow_window: float = 0.0,
        exports: ExportLog | None = None,
        reads: Callable[[Callable[[], KeyringStatusBody | None]], Future[KeyringStatusBody | None]] | None = None,
    ) -> None:
        self._driver = driver
        self._store = store
        self._wrap_keyring = wrap_keyring
        self._offload = offload
        self._to_wall = to_wall
        self._rotate_every = rotate_every
        self._next_rotation: float | None = None
        self._crash_at = crash_at
        # Several instances: a commit is written no sooner than this long after the rotation was stored
        # (or this instance learned of it), so that every other instance has read the stored rotation and
        # takes the new key as it is (a follower), instead of dropping its key to recover the new one.
        self._follow_window = follow_window
        self._stored_at: dict[int, float] = {}  # rotation's epoch -> when this instance knew it stored
        self._exports = exports
        self._reads = reads or resolved
        self.last_keyring: KeyringStatusBody | None = None  # as last counted (metrics read it)
        self._keyring_reading = False
        self._keyring_read_at = -float("inf")
        self._waiters: list[_Waiter] = []
        self._dealing_said: set[int] = set()
        self.rotations_committed = 0  # this process's, and those it followed

    @property
    def custody(self) -> NexusCustody:
        return self._driver.custody

    # ------------------------------------------------------------------ the schedule

    def arm_schedule(self) -> None:
        """Arm the next scheduled rotation a period from now (`--rotate-every`), or none without one."""
        now = self._driver.now()
        if self._rotate_every is None:
            self._next_rotation = None
            self.custody.rotate_at(None)
            return
        self._next_rotation = now + self._rotate_every
        self.custody.rotate_at(self._next_rotation)
        self._driver.dispatch()

    def set_rotate_every(self, every: float | None) -> None:
        if every != self._rotate_every:
            self._rotate_every = every
            self.arm_schedule()
            log.info(
                "scheduled key rotation %s",
                "off" if every is None else f"every {every:g}s; the next in {every:g}s",
            )

    def schedule_status(self) -> ScheduleStatus | None:
        if self._rotate_every is None:
            return None
        due = self._next_rotation
        return ScheduleStatus(every=self._rotate_every, next=None if due is None else self._to_wall(due))

    # ------------------------------------------------------------------ recovery files

    def note_export(self, epoch: int) -> None:
        """`spike operator recover` exported the shards of key epoch `epoch`: recorded (off the event loop)."""
        if self._exports is None:
            return
        exports, at = self._exports, self._to_wall(self._driver.now())

        def done(outcome: BaseException | None) -> None:
            if isinstance(outcome, BaseException):
                log.warning("the recovery export of key epoch %d was not recorded: %s", epoch, outcome)

        self._offload(lambda: exports.note(epoch, at), done)

    def recovery_status(self) -> RecoveryStatus | None:
        """The newest break-glass export recorded, against the epoch in force (None: none recorded)."""
        record = self.custody.record
        newest = None if self._exports is None else self._exports.newest()
        if newest is None or record is None:
            return None
        epoch, at = newest
        return RecoveryStatus(epoch=epoch, time=at, epochs_behind=epochs_since(record, epoch))

    # ------------------------------------------------------------------ reports

    def report(self, report: Report) -> None:
        """A report sink: re-arms the schedule when a rotation ends, and the test build's crash points."""
        if not isinstance(report, RotationProgress):
            return
        stage = report.stage
        if stage is RotationStage.DEALING and report.dealt and report.to_epoch not in self._dealing_said:
            self._dealing_said.add(report.to_epoch)
            crash_here("rotation-dealing", self._crash_at)
        elif stage is RotationStage.COMMITTED:
            self.rotations_committed += 1
            crash_here("rotation-retiring", self._crash_at)
        if stage in (RotationStage.COMMITTED, RotationStage.ABANDONED, RotationStage.NOT_STARTED):
            self._dealing_said.discard(report.to_epoch)
            self._stored_at.pop(report.to_epoch, None)
            if self._rotate_every is not None:
                self._next_rotation = report.at + self._rotate_every
                self.custody.rotate_at(self._next_rotation)

    # ------------------------------------------------------------------ store effects

    def on_store(self, effect: StoreEffect) -> None:
        """The custody driver's `on_store`: perform one store effect, then acknowledge it to the machine."""
        pending = effect.pending
        if isinstance(effect, PersistRotation):
            crash_here("rotation-store-before", self._crash_at)
            try:
                blob = self._wrap_keyring(self.custody.rotation_key, pending.record.epoch)
            except (LocalProtocolError, StorageError) as exc:
                reason = f"the keyring could not be wrapped under the new key: {exc}"
                # Acknowledged as a store outcome is: after this dispatch, never inside it.
                self._offload.later(0.0, lambda: self._not_persisted(pending, reason))
                return
            self._offload(
                lambda: self._store.persist_rotation(pending, blob), lambda out: self._persisted(pending, out)
            )
        elif isinstance(effect, CommitRotation):
            crash_here("rotation-commit-before", self._crash_at)
            now = self._driver.now()
            # A rotation resumed after a restart: the window counts from now (a restarted peer reads it too).
            stored = self._stored_at.setdefault(pending.record.epoch, now)
            wait = stored + self._follow_window - now
            if wait > 0:
                self._offload.later(wait, lambda: self._commit(pending, RETRY_FIRST))
            else:
                self._commit(pending, RETRY_FIRST)
        else:
            crash_here("rotation-abandon-before", self._crash_at)
            self._abandon(pending, RETRY_FIRST)

    def _persisted(self, pending: PendingRotation, outcome: bool | BaseException) -> None:
        if isinstance(outcome, BaseException):
            if not isinstance(outcome, StorageError):  # a bug: said with its traceback; the rotation is dropped
                log.error("storing key rotation %d -> %d failed", pending.from_epoch, pending.record.epoch,
                          exc_info=outcome)  # fmt: skip
            self._not_persisted(pending, f"the store could not take it: {outcome}")
            return
        if not outcome:
            self._not_persisted(
                pending,
                "another key rotation is stored, or the key record or keyring changed meanwhile (another Nexus "
                "instance, a bootstrap, a data key rotation)",
            )
            return
        crash_here("rotation-stored", self._crash_at)
        self._stored_at[pending.record.epoch] = self._driver.now()
        self._acknowledge(lambda now: self.custody.rotation_persisted(now, pending))
        self._answer_waiters(pending, None)

    def _not_persisted(self, pending: PendingRotation, reason: str) -> None:
        self._acknowledge(lambda now: self.custody.rotation_not_persisted(now, reason, pending))
        self._answer_waiters(pending, reason)

    def _commit(self, pending: PendingRotation, retry: float) -> None:
        def done(outcome: bool | BaseException) -> None:
            if isinstance(outcome, BaseException):
                self._retry_later("commit", pending, outcome, retry, self._commit)
                return
            if not outcome and not self._committed_by_another(pending):
                # The record in force is no longer the one this rotation starts from: a bootstrap
                # --force replaced it (the machine dropped the rotation) or another instance did;
                # ClusterWatch moves this instance to what the store holds.
                log.warning(
                    "key rotation %d -> %d not committed: the stored key record changed meanwhile",
                    pending.from_epoch,
                    pending.record.epoch,
                )
                return
            crash_here("rotation-committed", self._crash_at)
            self._acknowledge(lambda now: self.custody.rotation_committed(now, pending))

        self._offload(lambda: self._store.commit_rotation(pending), done)

    def _committed_by_another(self, pending: PendingRotation) -> bool:
        """A refused commit whose record is in force all the same: another instance committed this rotation."""
        try:
            state = self._store.cluster_state()
        except StorageError:
            return False
        return state.record is not None and state.record == pending.record and state.pending is None

    def _abandon(self, pending: PendingRotation, retry: float) -> None:
        def done(outcome: bool | BaseException) -> None:
            if isinstance(outcome, BaseException):
                self._retry_later("give up", pending, outcome, retry, self._abandon)
                return
            if not outcome:
                log.warning(
                    "key rotation %d -> %d was no longer stored when it was given up",
                    pending.from_epoch,
                    pending.record.epoch,
                )
            crash_here("rotation-abandoned", self._crash_at)
            self._acknowledge(lambda now: self.custody.rotation_abandoned(now, pending))
            self._answer_waiters(pending, None)

        self._offload(lambda: self._store.abandon_rotation(pending), done)

    def _retry_later(
        self,
        what: str,
        pending: PendingRotation,
        error: BaseException,
        retry: float,
        again: Callable[[PendingRotation, float], None],
    ) -> None:
        # A bug (not a StorageError) is said with its traceback, and tried again all the same: the
        # machine waits for this write, and nothing of the old epoch is retired meanwhile.
        log.error(
            "cannot %s key rotation %d -> %d: %s; trying again in %gs",
            what,
            pending.from_epoch,
            pending.record.epoch,
            error,
            retry,
            exc_info=None if isinstance(error, StorageError) else error,
        )
        self._offload.later(retry, lambda: again(pending, min(retry * 2, RETRY_MOST)))

    def _acknowledge(self, call: Callable[[float], None]) -> None:
        try:
            call(self._driver.now())
        except LocalProtocolError as exc:
            # The machine moved on meanwhile (a record replaced the rotation): the acknowledgement is moot.
            log.debug("rotation acknowledgement not taken: %s", exc)
        self._driver.dispatch()

    # ------------------------------------------------------------------ the operator's route

    def rotate(self, request: ApiRequest) -> ApiResponse | Future[ApiResponse]:
        """`POST /v1/operator/rotate` (superuser): start a rotation of the root key, or give one up."""
        try:
            body = decode(request.body or b"{}", RotateRequest)
        except RemoteProtocolError as exc:
            log.info("rotate: %s", exc)
            return ApiResponse.error(400, ErrorCode.BAD_REQUEST, str(exc)[:500])
        custody = self.custody
        now = self._driver.now()
        if custody.phase is not Phase.READY:
            return refusals.not_ready(custody.phase)
        if body.abort and (body.data_key or body.rewrap):
            return ApiResponse.error(400, ErrorCode.BAD_REQUEST, "abort gives up a root key rotation: nothing else")
        if body.abort:
            return self._abort(request, now)
        if body.data_key or body.rewrap:
            return self._data_key(request, rotate=body.data_key, rewrap=body.rewrap)
        under_way = custody.rotation
        if under_way is not None:
            return ApiResponse.error(409, ErrorCode.CONFLICT, describe(under_way))
        try:
            pending = custody.start_rotation(now)
        except (LocalProtocolError, ShamirError) as exc:
            log.warning("key rotation refused (asked by %s): %s", request.peer, exc)
            return ApiResponse.error(409, ErrorCode.CONFLICT, str(exc))
        log.info("key rotation %d -> %d asked by %s", pending.from_epoch, pending.record.epoch, request.peer)
        answer: Future[ApiResponse] = Future()
        self._waiters.append(_Waiter(pending.record.epoch, answer))
        self._driver.dispatch()  # PersistRotation: the answer comes once it is stored, or refused
        return answer

    def _data_key(self, request: ApiRequest, *, rotate: bool, rewrap: bool) -> Future[ApiResponse]:
        """A new data-key term for new values (and/or a background re-wrap of older ones): one store write."""
        store = self._store
        answer: Future[ApiResponse] = Future()

        def call() -> int:
            return store.rotate_data_key(rewrap=rewrap) if rotate else store.rewrap()

        def done(outcome: int | BaseException) -> None:
            if isinstance(outcome, BaseException):
                if not isinstance(outcome, StorageError):
                    answer.set_exception(outcome)
                    return
                log.warning("data key rotation refused (asked by %s): %s", request.peer, outcome)
                if isinstance(outcome, RotationUnderWay):
                    answer.set_result(ApiResponse.error(409, ErrorCode.CONFLICT, str(outcome)))
                else:
                    answer.set_result(refusals.unavailable(outcome))
                return
            if rotate:
                log.info(
                    "data key rotated by %s: new values are sealed under term %d%s",
                    request.peer,
                    outcome,
                    "; stored values are re-wrapped to it in the background" if rewrap else "",
                    extra={"event": "data_key_rotated", "term": outcome},
                )
            else:
                log.info(
                    "re-wrap of stored values to data-key term %d asked by %s", outcome, request.peer,
                    extra={"event": "rewrap_started", "term": outcome},
                )  # fmt: skip
            response = self.rotate_response()
            response.data_term = outcome
            response.rewrap_target = outcome if rewrap or not rotate else None
            answer.set_result(ApiResponse.json(response))

        self._offload(call, done)
        return answer

    def keyring_status_soon(self) -> Future[KeyringStatusBody | None]:
        """`keyring_status`, read as the store reads (PostgreSQL: off the event loop; SQLite: at once)."""
        counted = self._reads(self.keyring_status)
        counted.add_done_callback(self._keep_keyring)
        return counted

    def _keep_keyring(self, done: Future[KeyringStatusBody | None]) -> None:
        self._keyring_reading = False
        if done.exception() is None:
            self.last_keyring = done.result()

    def refresh_keyring(self, older_than: float = 5.0) -> KeyringStatusBody | None:
        """For metrics: the data keys as last counted, counted again when that is older than `older_than` s
        (at once on SQLite; on PostgreSQL the next call sees the new count).  None before the key is held."""
        now = self._driver.now()
        if self.custody.phase is not Phase.READY:
            self.last_keyring = None
        elif not self._keyring_reading and now - self._keyring_read_at >= older_than:
            self._keyring_reading, self._keyring_read_at = True, now
            self.keyring_status_soon()
        return self.last_keyring

    def keyring_status(self) -> KeyringStatusBody | None:
        """The data keys as the store counts them (blocking: the caller runs it off the event loop)."""
        try:
            status = self._store.keyring_status()
        except StorageError:
            return None  # locked (no root key), or the database is away
        return KeyringStatusBody(
            term=status.active_term,
            terms=[(term, created) for term, created in status.terms],
            values_by_term=dict(status.values_by_term),
            rewrap_target=status.rewrap_target,
            rewrap_remaining=status.rewrap_remaining,
        )

    def _abort(self, request: ApiRequest, now: float) -> ApiResponse | Future[ApiResponse]:
        custody = self.custody
        under_way = custody.rotation
        if under_way is None:
            return ApiResponse.error(409, ErrorCode.CONFLICT, "no key rotation is under way")
        if under_way.stage is not RotationStage.DEALING:
            return ApiResponse.error(409, ErrorCode.CONFLICT, f"{describe(under_way)}: only one being dealt can stop")
        try:
            custody.abort_rotation(now)
        except LocalProtocolError as exc:
            log.warning("giving up the key rotation refused (asked by %s): %s", request.peer, exc)
            return ApiResponse.error(409, ErrorCode.CONFLICT, str(exc))
        log.warning("key rotation %d -> %d given up by %s", under_way.from_epoch, under_way.to_epoch, request.peer)
        answer: Future[ApiResponse] = Future()
        self._waiters.append(_Waiter(under_way.to_epoch, answer))
        self._driver.dispatch()
        return answer

    def _answer_waiters(self, pending: PendingRotation, refused: str | None) -> None:
        epoch = pending.record.epoch
        waiting = [w for w in self._waiters if w.to_epoch == epoch]
        self._waiters = [w for w in self._waiters if w.to_epoch != epoch]
        for waiter in waiting:
            if waiter.answer.done():
                continue
            if refused is not None:
                waiter.answer.set_result(ApiResponse.error(409, ErrorCode.CONFLICT, f"not started: {refused}"))
            else:
                waiter.answer.set_result(ApiResponse.json(self.rotate_response()))

    def rotate_response(self) -> RotateResponse:
        custody = self.custody
        view = custody.rotation
        record = custody.record
        return RotateResponse(
            rotation=None if view is None else rotation_status(view, self._to_wall),
            epoch=record.epoch if record is not None else 0,
        )

    # ------------------------------------------------------------------ a configuration reload

    def move_custody(self, keeper_ids: Iterable[int], threshold: int) -> None:
        """The configuration names these keepers and threshold: move custody there if it is elsewhere."""
        custody = self.custody
        keeper_ids = sorted(keeper_ids)
        try:
            moving = custody.retarget(self._driver.now(), keeper_ids, threshold)
        except (LocalProtocolError, ShamirError) as exc:
            log.error("cannot move custody to keepers %s, threshold %d: %s", keeper_ids, threshold, exc)  # noqa: TRY400
            return
        record = custody.record
        if moving and record is not None:
            log.info(
                "custody moves from keepers %s (threshold %d) to keepers %s (threshold %d)%s",
                list(record.keeper_ids),
                record.threshold,
                keeper_ids,
                threshold,
                "" if custody.phase is Phase.READY else " once the root key is rebuilt",
            )
        self._driver.dispatch()
