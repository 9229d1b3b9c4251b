"""The custody driver end to end, in-process: real keeper servers, real mTLS, a fast schedule."""

from __future__ import annotations

import contextlib
import random
from collections.abc import AsyncIterator

import anyio
import anyio.abc
import pytest

from spike.app.commands.devca import DevIdentity
from spike.protocol.effects import (
    CommitRotation,
    KeeperReseeded,
    KeeperState,
    KeeperStateChanged,
    KeyRecovered,
    PersistRotation,
    Phase,
    Report,
)
from spike.protocol.events import Answer, FailureKind, RequestFailed, ResponseReceived
from spike.protocol.material import RootKey, Share
from spike.protocol.nexus import DEAL_ROUNDS, KeeperView, NexusCustody, PollSchedule
from spike.protocol.record import KeyRecord, seal_key
from spike.protocol.wire import ShardAnswer, ShardContribution, decode, encode
from spike.transports.client import HttpsConnection
from spike.transports.custody_driver import CustodyDriver
from spike.transports.tls import client_context, keeper_check
from tests.transport.transport_rig import TRUST, KeeperServer, keeper_server, nexus_client, wait_for

pytestmark = pytest.mark.anyio

IDS = (1, 2, 3)
SCHEDULE = PollSchedule(interval=0.3, jitter=0.1, request_timeout=0.2)
#: Longest gap between two polls of one keeper: one interval plus jitter at both ends.
MAX_GAP = SCHEDULE.interval * (1 + 2 * SCHEDULE.jitter)
SLACK = 0.5  # for a loaded machine
KEY = RootKey(bytes.fromhex("5ec0de" * 10 + "5ec0"))


class KeeperSlot:
    """One keeper server that can be stopped and started again, empty, on the same port."""

    def __init__(self, tg: anyio.abc.TaskGroup, identity: DevIdentity, keeper_id: int, served_id: int) -> None:
        self._tg = tg
        self._identity = identity
        self.keeper_id = keeper_id
        self._served_id = served_id  # whose SVID it presents (an impostor has another's)
        self.port = 0
        self.current: KeeperServer | None = None
        self._scope: anyio.CancelScope | None = None
        self._stopped = anyio.Event()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    async def start(self) -> KeeperServer:
        self.current = await self._tg.start(self._run)
        self.port = self.current.served.port
        return self.current

    async def stop(self) -> None:
        assert self._scope is not None
        self._scope.cancel()
        await self._stopped.wait()
        self.current = None

    async def _run(self, *, task_status: anyio.abc.TaskStatus[KeeperServer]) -> None:
        self._stopped = anyio.Event()
        try:
            with anyio.CancelScope() as self._scope:
                async with keeper_server(self._identity, self._served_id, port=self.port) as k:
                    task_status.started(k)
                    await anyio.sleep_forever()
        finally:
            self._stopped.set()


@contextlib.asynccontextmanager
async def keepers(
    identity: DevIdentity, served_ids: dict[int, int] | None = None
) -> AsyncIterator[dict[int, KeeperSlot]]:
    async with anyio.create_task_group() as tg:
        slots = {i: KeeperSlot(tg, identity, i, (served_ids or {}).get(i, i)) for i in IDS}
        for slot in slots.values():
            await slot.start()
        try:
            yield slots
        finally:
            tg.cancel_scope.cancel()


async def seed(identity: DevIdentity, slots: dict[int, KeeperSlot], record_shares: dict[int, Share]) -> None:
    """What bootstrap does: contribute each keeper's shard over mTLS."""
    for keeper_id, share in record_shares.items():
        connection = HttpsConnection(
            slots[keeper_id].url, client_context(identity.files("bootstrap")), keeper_check(TRUST, keeper_id)
        )
        try:
            status, _ = await connection.request(
                "POST",
                "/v1/store/contribute",
                encode(ShardContribution.of(share)),
            )
        finally:
            await connection.aclose()
        assert status == 200


@contextlib.asynccontextmanager
async def driving(
    identity: DevIdentity, slots: dict[int, KeeperSlot], record: KeyRecord
) -> AsyncIterator[tuple[CustodyDriver, list[Report]]]:
    reports: list[Report] = []
    custody = NexusCustody(
        IDS, threshold=2, schedule=SCHEDULE, rng=random.Random(7), now=anyio.current_time(), record=record
    )
    driver = CustodyDriver(
        custody,
        {i: slot.url for i, slot in slots.items()},
        ssl_context=nexus_client(identity),
        trust=TRUST,
        on_report=reports.append,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(driver.run)
        try:
            yield driver, reports
        finally:
            tg.cancel_scope.cancel()
            custody.forget(anyio.current_time())


def view(driver: CustodyDriver, keeper_id: int) -> KeeperView:
    return next(v for v in driver.custody.keepers() if v.keeper_id == keeper_id)


def accepted(slot: KeeperSlot) -> int:
    assert slot.current is not None
    return slot.current.served.listener.accepted


async def read_shard(identity: DevIdentity, slot: KeeperSlot) -> bytes:
    connection = HttpsConnection(slot.url, nexus_client(identity), keeper_check(TRUST, slot.keeper_id))
    try:
        status, body = await connection.request("POST", "/v1/store/shard", b"{}")
    finally:
        await connection.aclose()
    assert status == 200
    return decode(body, ShardAnswer).shard_bytes()


async def test_recover_reseed_outage_and_connection_reuse(dev_identity: DevIdentity) -> None:
    record, shares = seal_key(KEY, epoch=3, threshold=2, keeper_ids=IDS)
    async with keepers(dev_identity) as slots:
        await seed(dev_identity, slots, dict(shares))
        baseline = {i: accepted(slot) for i, slot in slots.items()}  # bootstrap's connections
        async with driving(dev_identity, slots, record) as (driver, reports):
            custody = driver.custody

            # 1. Recovery: the first round is immediate, so READY comes within one request time.
            await wait_for(lambda: custody.phase is Phase.READY, SCHEDULE.request_timeout + SLACK, "READY")
            assert custody.root_key.secret_bytes() == KEY.secret_bytes()
            recovered = [r for r in reports if isinstance(r, KeyRecovered)]
            assert len(recovered) == 1 and recovered[0].source == "keepers"
            await wait_for(lambda: all(v.state is KeeperState.HOLDING for v in custody.keepers()), MAX_GAP + SLACK)

            # 2. Keeper 2 restarts empty on the same port: re-seeded and confirmed within a poll gap.
            failed_before_restart = view(driver, 2).failures
            await slots[2].stop()
            restarted = anyio.current_time()
            fresh = await slots[2].start()
            assert not fresh.keeper.holds_shard
            await wait_for(
                lambda: any(isinstance(r, KeeperReseeded) and r.keeper_id == 2 and r.at > restarted for r in reports),
                MAX_GAP + SLACK,
                "keeper 2 to be re-seeded",
            )
            assert fresh.keeper.holds_shard
            assert view(driver, 2).state is KeeperState.HOLDING
            assert view(driver, 2).reseeds == 1
            assert any(
                isinstance(r, KeeperStateChanged) and r.keeper_id == 2 and r.state is KeeperState.EMPTY for r in reports
            )
            assert await read_shard(dev_identity, slots[2]) == shares[2].secret_bytes()

            # 3. Keeper 3 goes away: UNREACHABLE, and polled on schedule all the same.
            await slots[3].stop()
            await wait_for(lambda: view(driver, 3).state is KeeperState.UNREACHABLE, MAX_GAP + SLACK, "UNREACHABLE")
            polls = view(driver, 3).polls
            failures = view(driver, 3).failures
            await wait_for(lambda: view(driver, 3).failures >= failures + 3, 3 * MAX_GAP + SLACK, "more failed polls")
            assert view(driver, 3).polls >= polls + 3
            assert view(driver, 3).state is KeeperState.UNREACHABLE
            assert custody.phase is Phase.READY  # two of three still hold their shards
            assert custody.redundancy == 0

            # 4. It comes back empty: re-seeded as well.
            failed_while_down = view(driver, 3).failures
            back = await slots[3].start()
            await wait_for(lambda: back.keeper.holds_shard, MAX_GAP + SLACK, "keeper 3 to be re-seeded")
            await wait_for(lambda: view(driver, 3).state is KeeperState.HOLDING, SLACK, "keeper 3 confirmed")
            assert custody.redundancy == 1

            # 5. One TLS connection per keeper, however many polls (and the push and confirm);
            # only a request that failed (a deadline on a loaded machine) costs a new one.
            k1 = view(driver, 1)
            assert k1.polls >= 6
            assert 1 <= accepted(slots[1]) - baseline[1] <= 1 + k1.failures
            # The restarted server: the driver's one (poll, push, confirm, polls) and our read_shard.
            assert 2 <= accepted(slots[2]) <= 2 + view(driver, 2).failures - failed_before_restart
            assert 1 <= accepted(slots[3]) <= 1 + view(driver, 3).failures - failed_while_down
            # Polls follow the schedule, not a burst and not a stall.
            elapsed = anyio.current_time() - recovered[0].started_at
            assert abs(k1.polls - elapsed / SCHEDULE.interval) <= 2


async def test_impostor_keeper_is_unreachable_and_never_seeded(dev_identity: DevIdentity) -> None:
    """Keeper 3's address answers with keeper 2's SVID: refused by the client, shard never sent."""
    record, shares = seal_key(KEY, epoch=1, threshold=2, keeper_ids=IDS)
    async with keepers(dev_identity, served_ids={3: 2}) as slots:
        await seed(dev_identity, {1: slots[1], 2: slots[2]}, {1: shares[1], 2: shares[2]})
        async with driving(dev_identity, slots, record) as (driver, _):
            await wait_for(lambda: driver.custody.phase is Phase.READY, SCHEDULE.request_timeout + SLACK)
            await wait_for(lambda: view(driver, 3).polls >= 3, 3 * MAX_GAP + SLACK, "polls of keeper 3")
            impostor = view(driver, 3)
            assert impostor.state is KeeperState.UNREACHABLE
            assert "spiffe://spike.test/spike/keeper/2" in impostor.detail
            assert slots[3].current is not None
            assert not slots[3].current.keeper.holds_shard


async def test_driver_waits_and_keeps_polling_below_threshold(dev_identity: DevIdentity) -> None:
    """Only one keeper holds a shard: no key, RECOVERING, and every keeper still polled."""
    record, shares = seal_key(KEY, epoch=1, threshold=2, keeper_ids=IDS)
    async with keepers(dev_identity) as slots:
        await seed(dev_identity, {1: slots[1]}, {1: shares[1]})
        async with driving(dev_identity, slots, record) as (driver, _):
            await wait_for(lambda: all(v.polls >= 3 for v in driver.custody.keepers()), 3 * MAX_GAP + SLACK, "polls")
            assert driver.custody.phase is Phase.RECOVERING
            assert view(driver, 2).state is KeeperState.EMPTY
            assert not slots[2].current.keeper.holds_shard  # type: ignore[union-attr]
            # Bootstrap (or a restarted keeper with its shard) brings the second shard: recovered.
            await seed(dev_identity, {2: slots[2]}, {2: shares[2]})
            await wait_for(lambda: driver.custody.phase is Phase.READY, MAX_GAP + SLACK, "READY")
            await wait_for(lambda: slots[3].current.keeper.holds_shard, SLACK, "keeper 3 seeded")  # type: ignore[union-attr]
            assert driver.custody.root_key.secret_bytes() == KEY.secret_bytes()


async def test_the_driver_hands_the_machine_typed_failures(dev_identity: DevIdentity) -> None:
    """An impostor at keeper 3's address and keeper 2 down: the machine gets PEER_IDENTITY and REFUSED, not text."""
    record, shares = seal_key(KEY, epoch=1, threshold=2, keeper_ids=IDS)
    answers: list[tuple[int, Answer]] = []
    async with keepers(dev_identity, served_ids={3: 2}) as slots:
        await seed(dev_identity, {1: slots[1]}, {1: shares[1]})
        await slots[2].stop()
        custody = NexusCustody(
            IDS, threshold=2, schedule=SCHEDULE, rng=random.Random(3), now=anyio.current_time(), record=record
        )
        driver = CustodyDriver(
            custody,
            {i: slot.url for i, slot in slots.items()},
            ssl_context=nexus_client(dev_identity),
            trust=TRUST,
            on_report=lambda report: None,
            on_answer=lambda request, answer, _: answers.append((request.keeper_id, answer)),
        )
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.run)
            await wait_for(lambda: len(answers) >= 6, 3 * MAX_GAP + SLACK, "answers from every keeper")
            tg.cancel_scope.cancel()
        custody.forget(anyio.current_time())
    kinds = {(k, a.kind) for k, a in answers if isinstance(a, RequestFailed)}
    assert (3, FailureKind.PEER_IDENTITY) in kinds
    assert (2, FailureKind.REFUSED) in kinds
    assert not [a for k, a in answers if k == 1 and not isinstance(a, ResponseReceived)]


async def test_a_keeper_of_the_record_without_a_url_is_polled_and_seen_unreachable(dev_identity: DevIdentity) -> None:
    """A rekey's restart where a leaving keeper's URL was not given: still polled (never dropped), unreachable."""
    record, shares = seal_key(KEY, epoch=1, threshold=2, keeper_ids=IDS)
    async with keepers(dev_identity) as slots:
        await seed(dev_identity, slots, dict(shares))
        custody = NexusCustody(
            (1, 2), threshold=2, schedule=SCHEDULE, rng=random.Random(7), now=anyio.current_time(), record=record,
            rekey=True, random_bytes=random.Random(8).randbytes,
        )  # fmt: skip
        driver = CustodyDriver(
            custody, {1: slots[1].url, 2: slots[2].url}, ssl_context=nexus_client(dev_identity), trust=TRUST,
            on_report=lambda report: None, on_store=lambda effect: None,
        )  # fmt: skip
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.run)
            try:
                await wait_for(lambda: view(driver, 3).polls >= 3, 3 * MAX_GAP + SLACK, "polls of keeper 3")
                assert view(driver, 3).state is KeeperState.UNREACHABLE
                assert "no URL configured" in view(driver, 3).detail
                assert custody.phase is Phase.READY  # rebuilt from keepers 1 and 2
            finally:
                tg.cancel_scope.cancel()
                custody.forget(anyio.current_time())


async def test_a_keeper_joining_by_a_rekey_gets_its_connection_when_first_dealt(dev_identity: DevIdentity) -> None:
    """Keeper 3 is not in the record (1, 2): the rotation to (1, 2, 3) adds it, and the driver connects then."""
    record, shares = seal_key(KEY, epoch=1, threshold=2, keeper_ids=(1, 2))
    stored: list[object] = []
    async with keepers(dev_identity) as slots:
        await seed(dev_identity, {1: slots[1], 2: slots[2]}, {1: shares[1], 2: shares[2]})
        custody = NexusCustody(
            IDS, threshold=2, schedule=SCHEDULE, rng=random.Random(7), now=anyio.current_time(), record=record,
            rekey=True, random_bytes=random.Random(8).randbytes,
        )  # fmt: skip
        assert custody.keeper_ids == (1, 2)
        holder: list[CustodyDriver] = []

        def on_store(effect: object) -> None:  # a store that takes every write at once
            stored.append(effect)
            driver = holder[0]
            pending = effect.pending  # type: ignore[attr-defined]
            if isinstance(effect, PersistRotation):
                driver.custody.rotation_persisted(driver.now(), pending)
            elif isinstance(effect, CommitRotation):
                driver.custody.rotation_committed(driver.now(), pending)
            driver.dispatch()

        driver = CustodyDriver(
            custody, {i: slot.url for i, slot in slots.items()}, ssl_context=nexus_client(dev_identity),
            trust=TRUST, on_report=lambda report: None, on_store=on_store,
        )  # fmt: skip
        holder.append(driver)
        async with anyio.create_task_group() as tg:
            tg.start_soon(driver.run)
            try:
                await wait_for(
                    lambda: (
                        custody.record is not None and custody.record.keeper_ids == IDS and custody.rotation is None
                    ),
                    (DEAL_ROUNDS + 3) * MAX_GAP + SLACK,
                    "custody moved to keepers 1, 2, 3",
                )
                assert slots[3].current is not None and slots[3].current.keeper.holds_shard
                assert accepted(slots[3]) >= 1
                assert [type(e) for e in stored] == [PersistRotation, CommitRotation]
            finally:
                tg.cancel_scope.cancel()
                custody.forget(anyio.current_time())
