"""Several Nexus instances on one database: each notices what the others changed."""

from __future__ import annotations

import logging

import anyio

from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.routes import NexusApi
from spike.app.store.backend import Backend, ClusterState
from spike.app.store.errors import StorageError
from spike.protocol.effects import NewerKeySeen, Phase, Report, RotationStage
from spike.protocol.errors import LocalProtocolError, RemoteProtocolError
from spike.protocol.pending import PendingRotation
from spike.transports.custody_driver import CustodyDriver

log = logging.getLogger("spike.nexus")


class ClusterWatch:
    """Several Nexus instances on one database: notice what the others changed.

    Every `interval` seconds, and at once when a keeper shows a shard of a key
    epoch newer than this instance's record or a write finds the key replaced,
    it reads the stored key record and the policy change counter (off the
    event loop) and then, on the loop:

    * a record installed through another instance (`spike bootstrap` talked to
      it): this one adopts it and recovers the root key from the keepers;
    * a record replaced through another instance (`bootstrap --force`): this one
      drops its key at once and recovers the new one from the keepers;
    * the stored record is this instance's own, and a keeper showed a newer
      epoch before the read began: that epoch was never the deployment's (a
      record is stored before its shards are dealt), so the custody machine
      reports and re-seeds the keeper (`confirm_record`);
    * policies changed through another instance: the authorizer reloads them
      before its next check.  A policy change made through one instance is in
      force on every other within `interval` (plus one read).
    """

    def __init__(
        self, backend: Backend, api: NexusApi, driver: CustodyDriver, authorizer: Authorizer, interval: float
    ) -> None:
        self._backend = backend
        self._api = api
        self._driver = driver
        self._authorizer = authorizer
        self._interval = interval
        self._policy_version: int | None = None
        self._refused: object = None
        self._refused_pending: PendingRotation | None = None
        self._newer_seen_at: float | None = None  # the latest sighting no read has answered yet
        self._wake = anyio.Event()

    def poke(self) -> None:
        """Look now (event loop thread only)."""
        self._wake.set()

    def report(self, report: Report) -> None:
        if isinstance(report, NewerKeySeen):
            # Another instance's bootstrap --force, or garbage: the stored record tells which.
            self._newer_seen_at = report.at
            self.poke()

    async def run(self) -> None:
        from anyio import to_thread  # only a shared (PostgreSQL) store is watched: SQLite starts without it

        while True:
            with anyio.move_on_after(self._interval):
                await self._wake.wait()
            self._wake = anyio.Event()
            checked_at = self._driver.now()  # the read below sees every record stored before this
            try:
                state = await to_thread.run_sync(self._backend.cluster_state, abandon_on_cancel=True)
            except StorageError:
                continue  # an outage: logged once by the backend; data routes answer 503 meanwhile
            self.apply(state, checked_at)

    def apply(self, state: ClusterState, checked_at: float | None = None) -> None:
        """Act on what the store holds; `checked_at` is when the read of `state` began (driver clock)."""
        custody = self._api.custody
        record = state.record
        if record is not None and record not in (custody.record, self._refused):
            previous = custody.record
            followed = custody.rotation
            if self._api.adopt(record):
                if followed is not None and followed.to_epoch == record.epoch and custody.phase is Phase.READY:
                    log.info(
                        "key rotation %d -> %d committed through another Nexus instance: its key, already held, "
                        "is in force",
                        followed.from_epoch,
                        record.epoch,
                    )
                elif previous is None:
                    log.info(
                        "key record for epoch %d installed through another Nexus instance: "
                        "recovering the root key from keepers",
                        record.epoch,
                    )
                else:
                    log.warning(
                        "key record replaced through another Nexus instance (epoch %d -> %d): "
                        "the old key is dropped; recovering the new one from keepers",
                        previous.epoch,
                        record.epoch,
                    )
            else:
                self._refused = record  # said once, in adopt's log line
        if record is not None and record == custody.record:
            self._follow(state.pending)
        seen = self._newer_seen_at
        if seen is not None and checked_at is not None and seen <= checked_at:
            self._newer_seen_at = None
            # While a rotation is stored, a newer epoch on a keeper is that rotation's (followed above),
            # never garbage: only the record alone proves that no newer epoch existed.
            if record is not None and record == custody.record and state.pending is None:
                self._driver.confirm_record(checked_at)  # otherwise the keepers were read for another record
        if self._policy_version is not None and state.policy_version != self._policy_version:
            self._authorizer.invalidate()
        self._policy_version = state.policy_version

    def _follow(self, pending: PendingRotation | None) -> None:
        """Follow another instance's rotation as the store shows it (docs/key-lifecycle.md section 8)."""
        custody = self._api.custody
        under_way = custody.rotation
        if under_way is not None and under_way.stage is not RotationStage.FOLLOWING:
            return  # this instance's own rotation: the store's compare-and-set settles any other
        if pending is None:
            if under_way is not None:
                self._driver.follow_rotation(None)
            return
        if (under_way is not None and under_way.to_epoch == pending.record.epoch) or pending == self._refused_pending:
            return
        try:
            self._driver.follow_rotation(pending)
        except (RemoteProtocolError, LocalProtocolError) as exc:
            self._refused_pending = pending  # said once
            log.error("cannot follow the key rotation stored by another Nexus instance: %s", exc)  # noqa: TRY400
