"""How a key rotation moves from step to step, as data (docs/key-lifecycle.md section 3).

`STEPS` maps ``(stage, event)`` to the next stage and what the machine does
(`Act`).  The stage is `None` when no rotation is under way.  Events are the
driver's calls (``start_rotation``, ``rotation_persisted``, ...) and the one
the machine notices itself (enough keepers showed their new shard).  A pair
that is not in the table is a call at the wrong moment: the machine raises
`LocalProtocolError` with the reason, changing nothing; a late
acknowledgement of a rotation dropped meanwhile is ignored.

What happens to each keeper along the way is the business of the custody
rules table (`spike.protocol.custody_rules`): dealing, retiring and clearing
ride on keeper answers there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from .effects import RotationStage


class Event(Enum):
    """What moves a rotation on."""

    START = "start_rotation"
    PERSISTED = "rotation_persisted"
    NOT_PERSISTED = "rotation_not_persisted"
    RESUMED = "started with a stored pending rotation"
    DEALT = "enough keepers showed their new shard"
    COMMITTED = "rotation_committed"
    ABORT = "abort_rotation"
    ABANDONED = "rotation_abandoned"
    FOLLOW = "follow_rotation(pending)"
    UNFOLLOW = "follow_rotation(None)"
    ADOPTED = "initialise with the rotation's new record"
    REPLACED = "initialise with another record"


class Act(Enum):
    """One thing a step does, in order."""

    PERSIST = "emit PersistRotation"
    DEAL = "deal: the new set's keepers join the poll list, polls of its keepers ask for the new epoch"
    COMMIT = "emit CommitRotation"
    ADOPT = "the new record and key take over; the old key is wiped"
    ABANDON = "emit AbandonRotation"
    BURN = "raise the high-water mark to the rotation's epoch"
    DROP = "forget the rotation and wipe its new key"
    REPORT = "report RotationProgress"


@dataclass(frozen=True, slots=True)
class Step:
    """The stage after an event (`None`: no rotation), what is done, and why."""

    stage: RotationStage | None
    acts: tuple[Act, ...]
    why: str
    report: RotationStage | None = None  # the stage reported, when it is not `stage` (an ending)


_IN_PROGRESS = (
    RotationStage.PERSISTING,
    RotationStage.DEALING,
    RotationStage.COMMITTING,
    RotationStage.ABANDONING,
    RotationStage.FOLLOWING,
)
_WITH_PENDING = _IN_PROGRESS[1:]  # stages in which the pending rotation is stored (or another instance's)


def _build() -> dict[tuple[RotationStage | None, Event], Step]:
    S = RotationStage  # reads as a table
    steps: dict[tuple[RotationStage | None, Event], Step] = {
        (None, Event.START): Step(
            S.PERSISTING, (Act.PERSIST, Act.REPORT), "nothing of the new epoch leaves Nexus before it is stored"
        ),
        (S.PERSISTING, Event.PERSISTED): Step(
            S.DEALING, (Act.DEAL, Act.REPORT), "stored: a restart resumes it, so the new shards may go out"
        ),
        (S.PERSISTING, Event.NOT_PERSISTED): Step(
            None,
            (Act.DROP, Act.REPORT),
            "not stored (another instance rotates, or the write failed): as if never started",
            S.NOT_STARTED,
        ),
        (None, Event.RESUMED): Step(
            S.DEALING, (Act.DEAL, Act.REPORT), "a restart during a rotation: dealing resumes once the key is rebuilt"
        ),
        (S.DEALING, Event.DEALT): Step(
            S.COMMITTING,
            (Act.COMMIT, Act.REPORT),
            "t' keepers of the new set showed their new shard: the new key is safe",
        ),
        (S.COMMITTING, Event.COMMITTED): Step(
            None, (Act.ADOPT, Act.REPORT), "durable: nothing stored needs the old key any more", S.COMMITTED
        ),
        (S.DEALING, Event.ABORT): Step(
            S.ABANDONING, (Act.ABANDON, Act.REPORT), "dealing stops; every keeper that held its old shard still does"
        ),
        (S.ABANDONING, Event.ABANDONED): Step(
            None, (Act.BURN, Act.DROP, Act.REPORT), "gone; its shards are abandoned and retired", S.ABANDONED
        ),
        (None, Event.FOLLOW): Step(
            S.FOLLOWING, (Act.REPORT,), "another instance rotates: its new shards are not garbage, and not ours to deal"
        ),
        (S.FOLLOWING, Event.FOLLOW): Step(S.FOLLOWING, (Act.REPORT,), "the other instance's rotation, as stored now"),
        (S.FOLLOWING, Event.UNFOLLOW): Step(
            None, (Act.BURN, Act.DROP, Act.REPORT), "gone from the store without a commit: abandoned", S.ABANDONED
        ),
        (None, Event.UNFOLLOW): Step(None, (), "nothing followed: nothing to do"),
    }
    for stage in _IN_PROGRESS:
        steps[(stage, Event.REPLACED)] = Step(
            None,
            (Act.DROP, Act.REPORT),
            "another record was installed (bootstrap --force): the rotation is gone",
            S.ABANDONED,
        )
    for stage in _WITH_PENDING:
        steps[(stage, Event.ADOPTED)] = Step(
            None,
            (Act.ADOPT, Act.REPORT),
            "the rotation's record is in force: its key, already held, takes over",
            S.COMMITTED,
        )
    # Late acknowledgements of a rotation that was dropped meanwhile (a record replaced it) change nothing.
    for event in (Event.PERSISTED, Event.NOT_PERSISTED, Event.COMMITTED, Event.ABANDONED):
        steps[(None, event)] = Step(None, (), "a rotation dropped meanwhile (a record replaced it): nothing to do")
    return steps


#: ``(stage, event) -> step``; a pair that is missing is refused.
STEPS: Mapping[tuple[RotationStage | None, Event], Step] = _build()


def markdown() -> str:
    """The steps as the Markdown table of ``docs/custody-rules.md``."""
    lines = ["| stage | event | becomes | then | why |", "|---|---|---|---|---|"]
    for (stage, event), step in STEPS.items():
        after = step.stage.value if step.stage is not None else "(none)"
        if step.report is not None:
            after += f" ({step.report.value})"
        cells = (
            stage.value if stage is not None else "(none)",
            event.value,
            after,
            "; ".join(act.value for act in step.acts) or "nothing",
            step.why,
        )
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
