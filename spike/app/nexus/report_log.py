"""What each custody report says in the log: one line per *change*.

Reports from the custody machine are turned into one line per change (a
keeper going empty, coming back, being re-seeded), never one line per poll.
Nothing here is ever given a key, a shard or a secret value: reports carry
ids, states and times only.  (Moved out of spike.app.logs so that a CLI
command, which sets up logging too, does not import the custody core.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from spike.app.logs import wall_time
from spike.protocol.effects import (
    KeeperLeft,
    KeeperMisbehaved,
    KeeperReseeded,
    KeeperState,
    KeeperStateChanged,
    KeyRecovered,
    KeyRejected,
    NewerKeySeen,
    Phase,
    PhaseChanged,
    Report,
    RotationProgress,
    RotationStage,
    ShardRetired,
)


class ReportLogger:
    """Turns custody reports into log lines, one per change.

    A keeper that keeps misbehaving the same way is logged once, then at
    most every `repeat_every` seconds, so a hostile or broken keeper cannot
    flood the log (its counters still grow in the status and metrics).
    """

    def __init__(
        self,
        log: logging.Logger,
        keeper_urls: Mapping[int, str],
        now: Callable[[], float],
        *,
        repeat_every: float = 300.0,
    ) -> None:
        self._log = log
        self._urls = keeper_urls
        self._now = now
        self._repeat_every = repeat_every
        self._last_problem: dict[tuple[int, str], float] = {}
        self._dealt: dict[tuple[int, int], tuple[int, ...]] = {}  # rotation (from, to) -> keepers said dealt

    def _keeper(self, keeper_id: int) -> str:
        return f"keeper {keeper_id} ({self._urls.get(keeper_id, '?')})"

    def __call__(self, report: Report) -> None:
        log = self._log
        if isinstance(report, KeeperStateChanged):
            self._state_changed(report)
        elif isinstance(report, KeeperReseeded):
            # The state change to HOLDING that comes with it already said so at INFO.
            log.debug(
                "%s re-seeded with its shard and confirmed (was %s)",
                self._keeper(report.keeper_id),
                report.was.value,
                extra={"keeper_id": report.keeper_id, "event": "keeper_reseeded"},
            )
        elif isinstance(report, KeeperMisbehaved):
            key = (report.keeper_id, report.problem)
            last = self._last_problem.get(key)
            if last is None or report.at - last >= self._repeat_every:
                self._last_problem[key] = report.at
                log.warning(
                    "%s: %s",
                    self._keeper(report.keeper_id),
                    report.problem,
                    extra={"keeper_id": report.keeper_id, "event": "keeper_misbehaved"},
                )
        elif isinstance(report, NewerKeySeen):
            # Said once by the state change to NEWER_EPOCH; this comes with every such answer.
            log.debug(
                "%s shows a shard of key epoch %d: checking the stored key record",
                self._keeper(report.keeper_id),
                report.epoch,
                extra={"keeper_id": report.keeper_id, "event": "newer_key_seen", "epoch": report.epoch},
            )
        elif isinstance(report, PhaseChanged):
            self._phase_changed(report)
        elif isinstance(report, KeyRecovered):
            log.info(
                "root key (epoch %d) rebuilt from the shards of keepers %s in %.0f ms and verified",
                report.epoch,
                ", ".join(map(str, report.keeper_ids)),
                (report.at - report.started_at) * 1000,
                extra={"event": "key_recovered", "source": report.source, "epoch": report.epoch},
            )
        elif isinstance(report, RotationProgress):
            self._rotation(report)
        elif isinstance(report, ShardRetired):
            what = "every shard" if report.epoch is None else f"its shard of epoch {report.epoch}"
            log.info(
                "%s forgot %s",
                self._keeper(report.keeper_id),
                what,
                extra={"keeper_id": report.keeper_id, "event": "shard_retired", "epoch": report.epoch},
            )
        elif isinstance(report, KeeperLeft):
            log.info(
                "%s is no longer in the keeper set and holds nothing of this deployment: no longer polled%s",
                self._keeper(report.keeper_id),
                f" ({report.detail})" if report.detail else "",
                extra={"keeper_id": report.keeper_id, "event": "keeper_left"},
            )
        elif isinstance(report, KeyRejected):
            log.error(
                "shards of keepers %s passed their commitments but rebuilt a key that fails the key "
                "check value of epoch %d: the key record is inconsistent; the key is not used",
                ", ".join(map(str, report.keeper_ids)),
                report.epoch,
                extra={"event": "key_rejected"},
            )

    def _rotation(self, report: RotationProgress) -> None:
        """One line per step of a rotation, and one per keeper that shows its new shard."""
        stage, rotation = report.stage, (report.from_epoch, report.to_epoch)
        arrow = f"{report.from_epoch} -> {report.to_epoch}"
        extra = {
            "event": "key_rotation",
            "stage": stage.value,
            "from_epoch": report.from_epoch,
            "to_epoch": report.to_epoch,
            "dealt": list(report.dealt),
            "needed": report.needed,
        }
        log = self._log
        if stage in (RotationStage.DEALING, RotationStage.COMMITTING, RotationStage.FOLLOWING) and report.detail:
            log.error("key rotation %s: %s", arrow, report.detail, extra=extra)
            return
        if stage is RotationStage.DEALING:
            said = self._dealt.get(rotation)
            self._dealt[rotation] = report.dealt
            if said is None:
                log.info(
                    "key rotation %s stored: dealing the new shards at the keepers' polls "
                    "(%d more must show theirs before the commit)",
                    arrow,
                    report.needed,
                    extra=extra,
                )
                return
            for keeper_id in sorted(set(report.dealt) - set(said)):
                log.info(
                    "key rotation %s: %s holds its new shard (%d more needed)",
                    arrow,
                    self._keeper(keeper_id),
                    report.needed,
                    extra={**extra, "keeper_id": keeper_id},
                )
            return
        if stage is not RotationStage.COMMITTING:
            self._dealt.pop(rotation, None)
        if stage is RotationStage.PERSISTING:
            log.info("key rotation %s started: storing it before anything is dealt", arrow, extra=extra)
        elif stage is RotationStage.COMMITTING:
            log.info(
                "key rotation %s: keepers %s showed their new shards: committing",
                arrow,
                ", ".join(map(str, report.dealt)),
                extra=extra,
            )
        elif stage is RotationStage.COMMITTED:
            log.info(
                "root key rotated: epoch %d is in force; keepers forget epoch %d at their next polls",
                report.to_epoch,
                report.from_epoch,
                extra=extra,
            )
        elif stage is RotationStage.FOLLOWING:
            log.info("another Nexus instance rotates the root key %s: following it", arrow, extra=extra)
        elif stage is RotationStage.ABANDONING:
            log.warning("key rotation %s given up: removing it from the store", arrow, extra=extra)
        elif stage is RotationStage.ABANDONED:
            log.warning(
                "key rotation %s abandoned: epoch %d stays in force%s",
                arrow,
                report.from_epoch,
                f" ({report.detail})" if report.detail else "",
                extra=extra,
            )
        else:  # NOT_STARTED
            log.warning("key rotation not started: %s", report.detail or "refused", extra=extra)

    def _state_changed(self, report: KeeperStateChanged) -> None:
        who = self._keeper(report.keeper_id)
        extra = {"keeper_id": report.keeper_id, "state": report.state.value, "event": "keeper_state"}
        state = report.state
        if state is KeeperState.HOLDING:
            how = f" again: {report.detail}" if report.detail else ""
            was = "" if report.previous is KeeperState.UNKNOWN else f" (was {report.previous.value})"
            self._log.info("%s holds its shard%s%s", who, how, was, extra=extra)
        elif state is KeeperState.EMPTY:
            self._log.warning("%s is empty (%s)", who, report.detail, extra=extra)
        elif state is KeeperState.UNREACHABLE:
            since = wall_time(report.at, self._now)
            self._log.warning("%s unreachable since %s: %s", who, since, report.detail, extra=extra)
        elif state is KeeperState.UNVERIFIED:
            self._log.warning(
                "%s holds a shard, but this Nexus has no key record to check it against", who, extra=extra
            )
        elif state is KeeperState.NEWER_EPOCH:
            self._log.warning(
                "%s %s: left alone until the stored key record says whether that epoch is the deployment's",
                who,
                report.detail,
                extra=extra,
            )
        elif state is KeeperState.REMOVED:
            self._log.warning(
                "%s is no longer in the keeper set but still holds a shard: telling it to forget", who, extra=extra
            )
        elif state is KeeperState.UNKNOWN:
            self._log.info("%s state unknown", who, extra=extra)
        else:
            self._log.error("%s %s: %s", who, state.value.replace("_", " "), report.detail, extra=extra)

    def _phase_changed(self, report: PhaseChanged) -> None:
        extra = {"phase": report.phase.value, "event": "phase"}
        if report.phase is Phase.READY:
            self._log.info("Nexus is ready: it holds the verified root key", extra=extra)
        elif report.phase is Phase.RECOVERING:
            self._log.info("Nexus is waiting for shards to rebuild the root key", extra=extra)
        else:
            self._log.info("Nexus is not initialised: waiting for bootstrap", extra=extra)
