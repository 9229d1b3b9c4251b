"""When the root key cannot come back from the keepers, and what brings it back (issue 18).

Keepers hold their shards in memory only: one that restarted answers, empty.  While Nexus waits
for shards, each keeper that answers without a usable shard is one source fewer; once the keepers
that may still hold one are fewer than the shards still needed, polling will never finish the
job, and only the break-glass shards (`spike operator recover`, taken back with `spike operator
restore`) can.  Nexus's log and `spike status` both say so, from the keepers' states alone: the
log from the custody machine's view, the CLI from the status body, so both take state names.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

# Answered, and holds nothing usable: empty (restarted), a shard that fails its commitment, garbage.
WITHOUT_SHARD = frozenset({"empty", "wrong_shard", "bad_answer"})
# Its shard is already in (verified), or it is no longer in the key's set: a break-glass shard of its id
# adds nothing.
NOT_A_SOURCE = frozenset({"holding", "removed"})


class Stranded(msgspec.Struct, frozen=True):
    """The key cannot be rebuilt from the keepers: `needed` break-glass shards, of the keepers `ids`."""

    needed: int
    lost: tuple[int, ...]  # keepers that answered without their shard
    ids: tuple[int, ...]  # keepers whose break-glass shards count (any `needed` of them)

    def sentence(self, epoch: int | None) -> str:
        of_epoch = "" if epoch is None else f" of key epoch {epoch}"
        lost = ", ".join(map(str, self.lost))
        ids = ", ".join(map(str, self.ids))
        return (
            f"the root key cannot come back from the keepers: keeper(s) {lost} answered without their shard "
            f"(a restarted keeper is empty); restore it with `spike operator restore` and the recovery shards"
            f"{of_epoch} that `spike operator recover` exported: {self.needed} of keeper(s) {ids}"
        )


def stranded(shards_needed: int, states: Mapping[int, str]) -> Stranded | None:
    """`Stranded` when fewer keepers may still give a shard than `shards_needed`; None while they may.

    A keeper that has not answered (unreachable, not yet polled) may still hold its shard: it counts
    as a source, so this is said only once enough keepers answered without theirs.
    """
    if shards_needed <= 0:
        return None
    lost = tuple(sorted(k for k, state in states.items() if state in WITHOUT_SHARD))
    hopeful = [k for k, state in states.items() if state not in WITHOUT_SHARD | NOT_A_SOURCE]
    if not lost or len(hopeful) >= shards_needed:
        return None
    ids = tuple(sorted(k for k, state in states.items() if state not in NOT_A_SOURCE))
    return Stranded(needed=shards_needed, lost=lost, ids=ids)
