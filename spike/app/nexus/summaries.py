"""What stays wrong is said again in the log now and then: Nexus waiting for shards, a keeper without its shard."""

from __future__ import annotations

import logging
from collections.abc import Mapping

from spike.app.config import KEEPER_SUMMARY_EVERY, WAITING_SUMMARY_EVERY
from spike.app.logs import wall_time
from spike.app.model.stranded import stranded
from spike.protocol.effects import KeeperState, Phase
from spike.protocol.nexus import NexusCustody
from spike.transports.custody_driver import CustodyDriver

log = logging.getLogger("spike.nexus")


class Summaries:
    """What stays wrong is said again now and then, never once per poll.

    While Nexus cannot rebuild its key it says so every `waiting_every`
    seconds (30 s by default; the first time after the couple of polls a
    normal recovery takes); while a keeper stays without its shard, every
    `keepers_every` seconds (5 minutes).
    """

    def __init__(
        self,
        driver: CustodyDriver,
        urls: Mapping[int, str],
        *,
        waiting_every: float = WAITING_SUMMARY_EVERY,
        keepers_every: float = KEEPER_SUMMARY_EVERY,
    ) -> None:
        self._driver = driver
        self._urls = urls
        self._waiting_every = waiting_every
        self._keepers_every = keepers_every
        self._last_waiting = -float("inf")
        self._last_keepers = -float("inf")
        self._waiting_since: float | None = None

    def __call__(self) -> None:
        custody = self._driver.custody
        now = self._driver.now()
        if custody.phase is Phase.READY:
            self._waiting_since = None
            self._keepers(custody, now)
            return
        if self._waiting_since is None:
            self._waiting_since = now
        if now - self._waiting_since < 2 * custody.schedule.interval:
            return
        if now - self._last_waiting < self._waiting_every:
            return
        self._last_waiting = now
        states = ", ".join(f"{v.keeper_id}={v.state.value}" for v in custody.keepers())
        if custody.phase is Phase.UNINITIALISED:
            log.info("not initialised: waiting for `spike bootstrap` (keepers: %s)", states)
        else:
            log.warning(
                "waiting for shards: %d more verified shard(s) needed of %d (keepers: %s); polling continues every %gs",
                custody.shards_needed,
                custody.threshold,
                states,
                custody.schedule.interval,
            )
            lost = stranded(custody.shards_needed, {v.keeper_id: v.state.value for v in custody.keepers()})
            if lost is not None:
                epoch = None if custody.record is None else custody.record.epoch
                log.warning("%s", lost.sentence(epoch), extra={"event": "key_stranded", "keeper_ids": list(lost.ids)})

    def _keepers(self, custody: NexusCustody, now: float) -> None:
        lasting = [
            v for v in custody.keepers() if v.state is not KeeperState.HOLDING and now - v.since >= self._keepers_every
        ]
        if not lasting or now - self._last_keepers < self._keepers_every:
            return
        self._last_keepers = now
        for view in lasting:
            log.warning(
                "keeper %d (%s) still %s since %s (%d polls, %d empty, %d failed); shard redundancy %d",
                view.keeper_id,
                self._urls.get(view.keeper_id, "no URL configured"),
                view.state.value.replace("_", " "),
                wall_time(view.since, self._driver.now),
                view.polls,
                view.empty_answers,
                view.failures,
                custody.redundancy,
                extra={"keeper_id": view.keeper_id, "event": "keeper_summary"},
            )
