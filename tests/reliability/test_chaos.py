"""Chaos: writers and readers against Nexus while keepers and Nexus are SIGKILLed and the network misbehaves.

Real processes on loopback: three keepers, Nexus (2-of-3, 0.5 s polls), and
a `FaultProxy` between Nexus and each keeper.  In this process, writers put
fresh values (each path keeps every version) and readers read back versions
that were acknowledged, all through the operator's client, while a driver
thread, drawing from a seeded random source (printed; replay with
``SPIKE_CHAOS_SEED``), SIGKILLs and restarts keepers and Nexus at random
moments, makes the proxies drop, delay, blackhole and cut connections,
sometimes all at once (a partition), and asks Nexus to rotate its root key
(`spike operator rotate`'s route), so that kills and faults land in every step
of rotations too.

What is checked, while it runs and at the end:

* every acknowledged write reads back exactly (path, version, value), during the
  run, after each Nexus recovery and at the end; a version nobody acknowledged
  holds a value whose write was in doubt (its connection broke), never another;
* Nexus serves whenever it holds the verified key: no request that started after
  the test saw it READY and ended before it was killed failed or got a 503;
* Nexus recovers by itself: READY within `RECOVERY_BOUND` seconds of the moment at
  least t keepers hold their shard (read directly) and their proxies pass traffic;
* every keeper that came back empty holds its own shard again (the same bytes as
  before, read directly) within `RESEED_BOUND` seconds of Nexus being READY, its
  proxy passing and the keeper listening; a keeper only ever holds a shard that
  matches the commitment of a key record the store held (the record in force,
  or a stored rotation's), and "holding" means a shard of the record in force
  or of the rotation stored now;
* Nexus never stops polling any keeper: over every stretch of 6+ poll intervals
  each keeper's poll counter in the status grows (whatever the faults), and no
  keeper is ever missing from the status.

The counts (writes acknowledged, reads checked, kills, partitions, recoveries,
re-seeds, rotations asked, started and committed, data lost) are printed in the
run's summary.  The short run is part of
the normal suite; ``--run-slow`` adds a long one (``SPIKE_CHAOS_SECONDS``, 10 min
by default).
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from spike.app.api.messages import (
    ROTATE_PATH,
    SECRETS_METADATA_PATH,
    SECRETS_PATH,
    RotateRequest,
    RotateResponse,
    SecretGetRequest,
    SecretGetResponse,
    SecretMetadataResponse,
    SecretMetadataUpdate,
    SecretPutRequest,
    SecretPutResponse,
)
from spike.app.commands.client import Empty, NexusClient, NexusError
from spike.app.store.sqlite_schema import NexusStore
from spike.protocol.material import Share
from spike.protocol.record import KeyRecord
from tests.e2e.harness import HarnessError
from tests.reliability.faultproxy import FaultSchedule
from tests.reliability.reliability_rig import REPORT, LeakWatch, ProxiedCluster, ShardProbe, StatusProbe

pytestmark = pytest.mark.e2e

POLL_INTERVAL = 0.5
RECOVERY_BOUND = 15.0
RESEED_BOUND = 15.0
POLL_WINDOW = 6 * POLL_INTERVAL  # poll progress is judged over stretches at least this long
WRITERS = 3
READERS = 2
PER_PATH = 200  # writes per path before a writer moves to a new path (every version is kept)
CLIENT_TIMEOUT = 5.0
SHORT_SECONDS = float(os.environ.get("SPIKE_CHAOS_SHORT_SECONDS", "35"))
LONG_SECONDS = float(os.environ.get("SPIKE_CHAOS_SECONDS", "600"))


# ---------------------------------------------------------------------- what the clients saw


@dataclass(frozen=True)
class Failure:
    who: str
    started: float
    ended: float
    previous_end: float  # when this client's previous request ended (its connection's age)
    kind: str
    detail: str


@dataclass
class Acked:
    path: str
    version: int
    value: str


@dataclass
class Book:
    """Everything the clients learned.  Appends only, so threads share it without locks."""

    acks: list[Acked] = field(default_factory=list)
    in_doubt: dict[str, set[str]] = field(default_factory=dict)
    failures: list[Failure] = field(default_factory=list)
    mismatches: list[str] = field(default_factory=list)
    reads_checked: int = 0
    crashed: list[BaseException] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)


def classify(exc: NexusError) -> str:
    if exc.code == "state_not_ready":
        return "not_ready"
    if exc.status == 0 and "connection refused" in str(exc):
        return "refused"  # certainly not carried out
    if exc.status == 0:
        return "in_doubt"  # the connection broke or timed out after the request may have arrived
    return f"http_{exc.status}"


def writer(cluster: ProxiedCluster, number: int, book: Book, watch: LeakWatch, stop: threading.Event) -> None:
    prepared: set[str] = set()
    n = 0
    previous_end = time.monotonic()
    with cluster.client(timeout=CLIENT_TIMEOUT) as nexus:
        while not stop.is_set():
            path = f"chaos/w{number}/g{n // PER_PATH}"
            value = ""
            started = time.monotonic()
            try:
                if path not in prepared:
                    # Keep every version, so that every acknowledged write can be read back.
                    update = SecretMetadataUpdate(path=path, max_versions=1000)
                    nexus.call(SECRETS_METADATA_PATH, update, Empty, action="put")
                    prepared.add(path)
                else:
                    value = watch.value(f"w{number}n{n}")
                    answer = nexus.call(
                        SECRETS_PATH, SecretPutRequest(path=path, values={"v": value}), SecretPutResponse
                    )
                    book.acks.append(Acked(path, answer.version, value))
                    book.outcomes["write acked"] += 1
                    n += 1
            except NexusError as exc:
                kind = classify(exc)
                book.outcomes[f"write {kind}"] += 1
                if value and (kind == "in_doubt" or kind.startswith("http_5")):
                    book.in_doubt.setdefault(path, set()).add(value)
                book.failures.append(
                    Failure(f"writer {number}", started, time.monotonic(), previous_end, kind, str(exc))
                )
                stop.wait(0.05)  # pace retries while Nexus is away
            previous_end = time.monotonic()


def check_read(nexus: NexusClient, ack: Acked, book: Book, where: str) -> None:
    """Raises NexusError if the read fails; a wrong answer, or none (404), is recorded as lost data."""
    try:
        got = nexus.call(
            SECRETS_PATH, SecretGetRequest(path=ack.path, version=ack.version), SecretGetResponse, action="get"
        )
    except NexusError as exc:
        if exc.code != "api_not_found":
            raise
        book.reads_checked += 1
        book.mismatches.append(f"{where}: {ack.path} v{ack.version}: acknowledged {ack.value!r}, now not found")
        return
    book.reads_checked += 1
    if (got.version, got.data) != (ack.version, {"v": ack.value}):
        book.mismatches.append(f"{where}: {ack.path} v{ack.version}: acknowledged {ack.value!r}, read {got.data!r}")


def patiently(call: Any, *args: Any, **kwargs: Any) -> Any:
    """A read at the end, when Nexus is settled: sent once more if the first met a stale connection."""
    try:
        return call(*args, **kwargs)
    except NexusError as exc:
        if exc.status != 0:
            raise
        return call(*args, **kwargs)


def reader(cluster: ProxiedCluster, number: int, book: Book, stop: threading.Event, seed: int) -> None:
    rng = random.Random(seed)
    previous_end = time.monotonic()
    with cluster.client(timeout=CLIENT_TIMEOUT) as nexus:
        while not stop.is_set():
            if not book.acks:
                stop.wait(0.05)
                continue
            ack = book.acks[rng.randrange(len(book.acks))]
            started = time.monotonic()
            try:
                check_read(nexus, ack, book, f"reader {number}")
                book.outcomes["read ok"] += 1
            except NexusError as exc:
                kind = classify(exc)
                book.outcomes[f"read {kind}"] += 1
                book.failures.append(
                    Failure(f"reader {number}", started, time.monotonic(), previous_end, kind, str(exc))
                )
                stop.wait(0.05)
            previous_end = time.monotonic()


# ---------------------------------------------------------------------- the driver


@dataclass
class Incarnation:
    """One run of the Nexus process, as the driver saw it."""

    number: int
    started: float
    ready: float | None = None  # when the driver first saw it READY
    killed: float | None = None
    polls: list[tuple[float, dict[int, int]]] = field(default_factory=list)


class Driver:
    def __init__(self, cluster: ProxiedCluster, rng: random.Random, book: Book, watch: LeakWatch) -> None:
        self.c = cluster
        self.rng = rng
        self.book = book
        self.watch = watch
        self.t = cluster.threshold
        self.faults = FaultSchedule(rng, cluster.keeper_ids, longest=3.0, max_delay=0.6)
        self.status = StatusProbe(cluster)
        self.shards = ShardProbe(cluster)
        self.expected: dict[tuple[int, int], bytes] = {}  # (keeper, epoch) -> its shard, once verified
        self.store = NexusStore(cluster.data_dir)  # the key records, read beside Nexus (SQLite's WAL allows it)
        self.in_play: list[KeyRecord] = []  # the record in force and a stored rotation's, as last read
        self.epoch_seen = 0  # the highest epoch Nexus's status showed in force
        self.rotate_by = math.inf  # by then the run has asked for a rotation twice (set in run())
        self.counts: Counter[str] = Counter()
        self.violations: list[str] = []
        self.incarnations: list[Incarnation] = []
        self.keeper_restart_at: dict[int, float] = {}  # keepers killed, waiting to be started again
        self.keeper_started: dict[int, float] = {}
        self.expect_reseed: dict[int, float] = {}  # keeper -> when it came back empty
        self.fault_end: dict[int, float] = {}  # proxy -> when its fault ends
        self.healed_at: dict[int, float] = dict.fromkeys(cluster.keeper_ids, 0.0)
        self.nexus_restart_at: float | None = None
        self.recovery_clock: float | None = None  # since when recovery is possible (and due)
        self.recovery_late = False
        self.phase = "unknown"
        # By these moments the run has killed Nexus once and keepers twice, whatever the dice said:
        # the checks at the end count on it, and a short run can miss them by chance (set in run()).
        self.nexus_kill_by = self.keeper_kills_by = math.inf
        self.holding: set[int] = set()
        self.read_back_client = cluster.client(timeout=CLIENT_TIMEOUT)

    def close(self) -> None:
        self.status.close()
        self.shards.close()
        self.read_back_client.close()
        self.store.close()

    @property
    def nexus(self) -> Incarnation:
        return self.incarnations[-1]

    def note(self, problem: str) -> None:
        self.violations.append(f"t+{time.monotonic() - self.began:.1f}s: {problem}")

    # ------------------------------------------------------------------ observing

    def learn_expected(self) -> None:
        shards = {}
        self.read_records()
        for keeper_id in self.c.keeper_ids:
            share = self.shards.read(keeper_id)
            assert isinstance(share, Share), (keeper_id, share)
            shards[keeper_id] = share
            self.expected[(keeper_id, share.epoch)] = share.secret_bytes()
        self.watch.add_shards(shards, "chaos epoch 1", self.t)

    def read_records(self) -> None:
        """The key records in play as the store holds them now (the record in force, a stored rotation's)."""
        record = self.store.load_key_record()
        pending, _, _ = self.store.load_rotation_state()
        self.in_play = [r for r in (record, None if pending is None else pending.record) if r is not None]

    def genuine(self, share: Share) -> bool:
        """Whether a keeper's shard is its own: bytes seen verified before, or matching a record in play."""
        known = self.expected.get((share.id, share.epoch))
        if known is not None:
            return known == share.secret_bytes()
        if not any(r.matches_share(share) for r in self.in_play):
            self.read_records()  # a rotation stored or committed since the last read
        if any(r.matches_share(share) for r in self.in_play):
            self.expected[(share.id, share.epoch)] = share.secret_bytes()
            self.watch.add_shards({share.id: share}, f"chaos epoch {share.epoch}")
            return True
        return False

    def observe(self, now: float) -> None:
        # Who holds its own shard of an epoch in play, read directly (not through the proxies).
        self.holding = set()
        self.read_records()
        current = {r.epoch for r in self.in_play}
        for keeper_id in self.c.keeper_ids:
            if keeper_id in self.keeper_restart_at:
                continue
            share = self.shards.read(keeper_id)
            if isinstance(share, Share):
                if not self.genuine(share):
                    self.note(f"keeper {keeper_id} holds bytes that are not its shard (epoch {share.epoch})")
                elif share.epoch in current:
                    self.holding.add(keeper_id)  # an earlier epoch's shard is stale: re-seeded like an empty one
        for keeper_id in list(self.expect_reseed):
            if keeper_id in self.holding:
                del self.expect_reseed[keeper_id]
                self.counts["re-seeds"] += 1
        # Nexus, if it runs.
        status = None
        if self.nexus_restart_at is None:
            status = self.status.get()
            # Stamped after the answer: a request sent from now on is handled after what it says.
            now = time.monotonic()
        if status is None:
            self.phase = "down" if self.nexus_restart_at is not None else "unreachable"
        else:
            self.phase = status["phase"]
            if status["epoch"] is not None and status["epoch"] > self.epoch_seen:
                if self.epoch_seen:  # epochs grow by one per commit (nothing here gives a rotation up)
                    self.counts["rotations committed"] += status["epoch"] - self.epoch_seen
                self.epoch_seen = status["epoch"]
            ids = sorted(k["id"] for k in status["keepers"])
            if ids != self.c.keeper_ids:
                self.note(f"status lists keepers {ids}, configured are {self.c.keeper_ids}")
            self.nexus.polls.append((now, {k["id"]: k["polls"] for k in status["keepers"]}))
            self.check_polls()
            if self.phase == "ready" and self.nexus.ready is None:
                self.nexus.ready = now
                if self.nexus.number > 1:
                    self.counts["recoveries"] += 1
                    self.read_back(f"after recovery {self.counts['recoveries']}")
                self.recovery_clock = None
        self.check_recovery(now)
        self.check_reseeds(now)

    def check_polls(self) -> None:
        samples = self.nexus.polls
        now, latest = samples[-1]
        old = [s for s in samples if now - s[0] >= POLL_WINDOW]
        if not old:
            return
        then, earlier = old[-1]
        expected = (now - then) / POLL_INTERVAL
        for keeper_id in self.c.keeper_ids:
            grown = latest[keeper_id] - earlier[keeper_id]
            if grown < max(1.0, 0.3 * expected):
                self.note(f"keeper {keeper_id} polled {grown} times in {now - then:.1f}s (about {expected:.0f} due)")
        self.counts["poll checks"] += 1
        samples[:] = [s for s in samples if s[0] >= then]

    def passing(self, keeper_id: int) -> bool:
        return self.c.proxies[keeper_id].mode == "pass"

    def check_recovery(self, now: float) -> None:
        if self.nexus.ready is not None or self.nexus_restart_at is not None:
            return
        able = {k for k in self.holding if self.passing(k)}
        if len(able) < self.t:
            self.recovery_clock = None
            return
        if self.recovery_clock is None:
            self.recovery_clock = now
        elif now - self.recovery_clock > RECOVERY_BOUND and not self.recovery_late:
            self.recovery_late = True
            self.note(
                f"Nexus #{self.nexus.number} not READY {now - self.recovery_clock:.1f}s after keepers "
                f"{sorted(able)} held their shards with clear paths (phase {self.phase}; {self.status.last_error})"
            )

    def check_reseeds(self, now: float) -> None:
        if self.nexus.ready is None or self.nexus_restart_at is not None:
            return
        for keeper_id, since in list(self.expect_reseed.items()):
            if not self.passing(keeper_id):
                continue
            start = max(since, self.healed_at[keeper_id], self.nexus.ready)
            if now - start > RESEED_BOUND:
                self.note(f"keeper {keeper_id} still empty {now - start:.1f}s after it could have been re-seeded")
                del self.expect_reseed[keeper_id]

    def read_back(self, where: str) -> None:
        """Every path's latest acknowledged version, read back now."""
        latest: dict[str, Acked] = {}
        for ack in list(self.book.acks):
            latest[ack.path] = ack
        for ack in latest.values():
            for attempt in (1, 2):
                try:
                    check_read(self.read_back_client, ack, self.book, where)
                    break
                except NexusError as exc:
                    # The first read after a restart may meet this client's connection to the killed
                    # Nexus (it does not resend on its own); a read is safe to send again.
                    if attempt == 2 or exc.status != 0:
                        self.note(f"{where}: {ack.path} v{ack.version} unreadable: {exc}")

    # ------------------------------------------------------------------ acting

    def start_nexus(self) -> None:
        self.incarnations.append(Incarnation(len(self.incarnations) + 1, time.monotonic()))
        self.c.start_nexus()
        self.recovery_late = False

    def kill_nexus(self, now: float) -> None:
        self.nexus.killed = time.monotonic()  # stamped before: whatever ends later may have met the kill
        self.c.kill("nexus")
        self.counts["Nexus kills"] += 1
        self.nexus_restart_at = now + self.rng.choice([0.0, self.rng.uniform(0.1, 1.5)])

    def kill_keeper(self, keeper_id: int, now: float) -> None:
        self.c.kill_keeper(keeper_id)
        self.counts["keeper kills"] += 1
        self.expect_reseed.pop(keeper_id, None)
        self.keeper_restart_at[keeper_id] = now + self.rng.choice([0.0, self.rng.uniform(0.1, 3.0)])

    def restarts_due(self, now: float) -> None:
        for keeper_id, when in list(self.keeper_restart_at.items()):
            if now >= when:
                self.c.start_keeper(keeper_id)
                del self.keeper_restart_at[keeper_id]
                self.expect_reseed[keeper_id] = time.monotonic()
        if self.nexus_restart_at is not None and now >= self.nexus_restart_at:
            self.nexus_restart_at = None
            self.start_nexus()

    def heal_due(self, now: float) -> None:
        for keeper_id, end in list(self.fault_end.items()):
            if now >= end:
                self.c.proxies[keeper_id].heal()
                self.healed_at[keeper_id] = time.monotonic()
                del self.fault_end[keeper_id]

    def rotate(self) -> None:
        """Ask Nexus to rotate its root key, as `spike operator rotate --no-wait` does."""
        self.counts["rotations asked"] += 1
        try:
            self.read_back_client.call(ROTATE_PATH, RotateRequest(), RotateResponse)
        except NexusError as exc:
            # Refused (one under way, not ready) or cut by a kill: the kinds are counted, none is a failure.
            self.counts[f"rotation refused: {classify(exc)}"] += 1
        else:
            self.counts["rotations started"] += 1

    def act(self, now: float) -> None:
        rng = self.rng
        roll = rng.random()
        if self.counts["Nexus kills"] == 0 and now >= self.nexus_kill_by:
            roll = 0.25  # a Nexus kill, as soon as it is allowed
        elif self.counts["keeper kills"] < 2 and now >= self.keeper_kills_by:
            roll = 0.0  # a keeper kill, as soon as it is allowed
        elif self.counts["rotations started"] < 2 and now >= self.rotate_by and self.phase == "ready":
            roll = 0.97  # a rotation, as soon as Nexus can take one
        alive = [k for k in self.c.keeper_ids if k not in self.keeper_restart_at]
        if roll < 0.20 and alive:
            keeper_id = rng.choice(alive)
            # While Nexus has no key, never go below t holders: nobody could rebuild it.
            if self.phase == "ready" or len(self.holding - {keeper_id}) >= self.t:
                self.kill_keeper(keeper_id, now)
        elif roll < 0.27:
            if self.nexus_restart_at is None and len(self.holding) >= self.t:
                self.kill_nexus(now)
        elif roll < 0.85:
            fault = self.faults.next()
            proxy = self.c.proxies[fault.target]
            if fault.mode == "cut":
                proxy.cut()
                self.counts["proxy cuts"] += 1
            elif fault.target not in self.fault_end:
                proxy.set_mode(fault.mode, fault.delay)
                self.fault_end[fault.target] = now + fault.duration
                self.counts[f"proxy {fault.mode}"] += 1
        elif roll >= 0.93:
            if self.nexus_restart_at is None:
                self.rotate()
        elif not self.fault_end:
            # A partition: Nexus cut off from every keeper at once.
            for proxy in self.c.proxies.values():
                proxy.set_mode("blackhole")
            end = now + rng.uniform(0.5, 3.0)
            self.fault_end = dict.fromkeys(self.c.keeper_ids, end)
            self.counts["partitions (all keepers)"] += 1

    def describe(self) -> str:
        """Where things stand, for a failure message."""
        nexus = self.c.nexus()
        procs = {name: ("alive" if p.alive() else f"exited {p.popen.returncode}") for name, p in self.c.procs.items()}
        return (
            f"phase {self.phase} ({self.status.last_error}), holding {sorted(self.holding)}, "
            f"awaiting re-seed {sorted(self.expect_reseed)}, processes {procs}, "
            f"proxies { {k: (p.mode, p.open_connections) for k, p in self.c.proxies.items()} }; "
            f"violations so far {self.violations[:5]}; Nexus log {nexus.log} ends:\n{nexus.text()[-3000:]}"
        )

    # ------------------------------------------------------------------ the run

    def run(self, seconds: float, stop_clients: threading.Event) -> None:
        self.began = time.monotonic()
        end = self.began + seconds
        self.keeper_kills_by, self.nexus_kill_by = self.began + 0.25 * seconds, self.began + 0.4 * seconds
        self.rotate_by = self.began + 0.15 * seconds
        while time.monotonic() < end and not self.book.crashed:
            now = time.monotonic()
            self.heal_due(now)
            self.restarts_due(now)
            self.observe(time.monotonic())
            self.act(time.monotonic())
            # The next moment: random, so faults land anywhere in the clients' requests.
            time.sleep(self.rng.uniform(0.2, 1.0))
        self.settle()

    def settle(self) -> None:
        """Every fault healed, every process back: Nexus READY and every keeper holding, within the bounds."""
        for keeper_id in list(self.fault_end):
            self.c.proxies[keeper_id].heal()
            self.healed_at[keeper_id] = time.monotonic()
        self.fault_end.clear()
        for keeper_id in list(self.keeper_restart_at):
            self.keeper_restart_at[keeper_id] = 0.0
        if self.nexus_restart_at is not None:
            self.nexus_restart_at = 0.0
        self.restarts_due(time.monotonic())
        deadline = time.monotonic() + RECOVERY_BOUND + RESEED_BOUND
        while True:
            self.observe(time.monotonic())
            if self.phase == "ready" and self.holding == set(self.c.keeper_ids) and not self.expect_reseed:
                # No rotation under way, every keeper on the epoch in force: the key the secrets sweep opens the
                # database with (rotations changed it since the start).
                status = self.status.get()
                final = {k: s for k in self.c.keeper_ids if isinstance(s := self.shards.read(k), Share)}
                settled = status is not None and status["rotation"] is None
                if settled and status and {share.epoch for share in final.values()} == {status["epoch"]}:
                    self.watch.add_shards(final, "chaos", self.t)
                    return
            if time.monotonic() > deadline:
                raise HarnessError(f"not settled: {self.describe()}")
            time.sleep(0.1)


def served_while_ready(book: Book, incarnations: list[Incarnation]) -> list[str]:
    """Failures of requests that lived wholly while a Nexus was READY (and on a connection made after it started)."""
    wrong = []
    for failure in book.failures:
        for inc in incarnations:
            if inc.ready is None:
                continue
            killed = inc.killed if inc.killed is not None else float("inf")
            if inc.ready <= failure.previous_end and failure.started >= inc.ready and failure.ended <= killed:
                wrong.append(f"{failure.who}: {failure.kind} ({failure.detail}) while Nexus #{inc.number} was READY")
    return wrong


def final_check(cluster: ProxiedCluster, book: Book) -> tuple[int, list[str]]:
    """Every acknowledged version reads back; versions nobody acknowledged hold in-doubt values only."""
    problems: list[str] = []
    checked = 0
    by_path: dict[str, list[Acked]] = {}
    for ack in book.acks:
        by_path.setdefault(ack.path, []).append(ack)
    with cluster.client(timeout=10.0) as nexus:
        for path, acks in by_path.items():
            versions = [a.version for a in acks]
            if len(set(versions)) != len(versions):
                problems.append(f"{path}: one version acknowledged twice: {versions}")
            try:
                for ack in acks:
                    patiently(check_read, nexus, ack, book, "final")
                    checked += 1
                meta = patiently(
                    nexus.call, SECRETS_METADATA_PATH, SecretGetRequest(path=path), SecretMetadataResponse, action="get"
                )
                present = set(meta.versions)
                missing = set(versions) - present
                if missing:
                    problems.append(f"{path}: acknowledged versions {sorted(missing)} are gone")
                for version in sorted(present - set(versions)):
                    got = patiently(
                        nexus.call,
                        SECRETS_PATH,
                        SecretGetRequest(path=path, version=version),
                        SecretGetResponse,
                        action="get",
                    )
                    if got.data.get("v") not in book.in_doubt.get(path, set()):
                        problems.append(f"{path} v{version}: holds {got.data!r}, which nobody wrote (or was refused)")
            except NexusError as exc:
                problems.append(f"{path}: could not be read back once settled: {exc}")
    return checked, problems


def run_chaos(make_rcluster: Any, leak_watch: LeakWatch, seconds: float, label: str) -> dict[str, Any]:
    seed = int(os.environ.get("SPIKE_CHAOS_SEED", time.time_ns() % 2**32))
    rng = random.Random(seed)
    cluster: ProxiedCluster = make_rcluster(
        proxied=True, poll_interval=POLL_INTERVAL, nexus_env={"SPIKE_NEXUS_KEEPER_TIMEOUT": "0.5s"}
    )
    cluster.start(nexus=False)
    book = Book()
    driver = Driver(cluster, rng, book, leak_watch)
    driver.start_nexus()
    result = cluster.bootstrap()
    assert result.returncode == 0, result
    cluster.wait_status(lambda s: s["phase"] == "ready" and s["redundancy"] == 1, "ready, every keeper holding")
    driver.learn_expected()

    stop = threading.Event()
    threads = []

    def guarded(target: Any, *args: Any) -> None:
        try:
            target(*args)
        except BaseException as exc:
            book.crashed.append(exc)

    for w in range(WRITERS):
        threads.append(threading.Thread(target=guarded, args=(writer, cluster, w, book, leak_watch, stop), daemon=True))
    for r in range(READERS):
        threads.append(threading.Thread(target=guarded, args=(reader, cluster, r, book, stop, seed + r), daemon=True))
    started = time.monotonic()
    for thread in threads:
        thread.start()
    try:
        try:
            driver.run(seconds, stop)
        except HarnessError as exc:
            raise HarnessError(f"seed {seed} ({label} run): {exc}") from None
        # A last stretch of quiet traffic: the clients must be served again.
        quiet_from = len(book.acks)
        deadline = time.monotonic() + 10
        while len(book.acks) < quiet_from + 20 and time.monotonic() < deadline and not book.crashed:
            time.sleep(0.05)
        if len(book.acks) < quiet_from + 20:
            driver.note(f"after the faults, only {len(book.acks) - quiet_from} writes acknowledged in 10 s")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        driver.close()
    assert not book.crashed, book.crashed
    checked, problems = final_check(cluster, book)
    status = cluster.wait_status(lambda s: True, "status")[1]
    reseeds_by_nexus = sum(k["reseeds"] for k in status["keepers"])
    counts = {
        "seed": seed,
        "seconds": round(time.monotonic() - started, 1),
        "writes acknowledged": len(book.acks),
        "reads checked": book.reads_checked,
        "acknowledged writes read back at the end": checked,
        "writes in doubt": sum(len(v) for v in book.in_doubt.values()),
        "Nexus kills": driver.counts["Nexus kills"],
        "keeper kills": driver.counts["keeper kills"],
        "partitions": driver.counts["partitions (all keepers)"],
        "proxy faults": {k.removeprefix("proxy "): v for k, v in driver.counts.items() if k.startswith("proxy ")},
        "recoveries": driver.counts["recoveries"],
        "re-seeds (seen by the test)": driver.counts["re-seeds"],
        "re-seeds (counted by the last Nexus)": reseeds_by_nexus,
        "rotations asked": driver.counts["rotations asked"],
        "rotations started": driver.counts["rotations started"],
        "rotations committed": driver.counts["rotations committed"],
        "root key epoch at the end": status["epoch"],
        "poll checks": driver.counts["poll checks"],
        "client outcomes": dict(book.outcomes),
        "data lost": len(book.mismatches) + len(problems),
    }
    REPORT.append(f"chaos ({label}): " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    context = f"seed {seed}; counts {counts}"
    wrong = served_while_ready(book, driver.incarnations)
    assert not book.mismatches, f"{context}\n" + "\n".join(book.mismatches[:20])
    assert not problems, f"{context}\n" + "\n".join(problems[:20])
    assert not driver.violations, f"{context}\n" + "\n".join(driver.violations[:20])
    assert checked == len(book.acks), context
    assert not wrong, f"{context}\n" + "\n".join(wrong[:20])
    # The run did what it says: enough of everything happened for the checks to mean something.
    assert len(book.acks) >= 100, context
    assert driver.counts["keeper kills"] >= 2 and driver.counts["Nexus kills"] >= 1, context
    assert driver.counts["recoveries"] >= 1 and driver.counts["re-seeds"] >= 1, context
    assert driver.counts["poll checks"] >= 1, context
    assert driver.counts["rotations committed"] >= 1, context
    return counts


def test_chaos_short(make_rcluster: Any, leak_watch: LeakWatch) -> None:
    run_chaos(make_rcluster, leak_watch, SHORT_SECONDS, "short")


@pytest.mark.slow
def test_chaos_long(make_rcluster: Any, leak_watch: LeakWatch) -> None:
    run_chaos(make_rcluster, leak_watch, LONG_SECONDS, "long")
