"""When the root key cannot come back from the keepers (spike/app/model/stranded.py), from the keepers' states."""

from __future__ import annotations

import pytest

from spike.app.model.stranded import Stranded, stranded


@pytest.mark.parametrize(
    ("needed", "states", "expected"),
    [
        # Every keeper restarted (empty): any 2 of the three recovery shards.
        (2, {1: "empty", 2: "empty", 3: "empty"}, Stranded(2, (1, 2, 3), (1, 2, 3))),
        # Keeper 3 holds its verified shard: one more, from keeper 1 or 2.
        (1, {1: "empty", 2: "wrong_shard", 3: "holding"}, Stranded(1, (1, 2), (1, 2))),
        # Garbage counts as no shard; a keeper removed from the set is no source either.
        (1, {1: "bad_answer", 2: "removed", 3: "holding"}, Stranded(1, (1,), (1,))),
    ],
    ids=["all empty", "one holding", "bad answer and removed"],
)
def test_stranded_when_the_keepers_that_may_hold_a_shard_are_too_few(
    needed: int, states: dict[int, str], expected: Stranded
) -> None:
    assert stranded(needed, states) == expected


@pytest.mark.parametrize(
    ("needed", "states"),
    [
        (1, {1: "empty", 2: "unreachable", 3: "holding"}),  # keeper 2 has not answered: it may hold its shard
        (1, {1: "empty", 2: "unknown", 3: "holding"}),  # not polled yet
        (2, {1: "unreachable", 2: "unreachable", 3: "empty"}),
        (0, {1: "empty", 2: "empty", 3: "empty"}),  # nothing needed (ready)
        (2, {1: "unreachable", 2: "unreachable", 3: "unreachable"}),  # nobody answered: nothing is known
    ],
)
def test_not_stranded_while_enough_keepers_may_still_give_a_shard(needed: int, states: dict[int, str]) -> None:
    assert stranded(needed, states) is None


def test_the_sentence_names_restore_the_epoch_and_the_keepers() -> None:
    said = Stranded(1, (1, 2), (1, 2)).sentence(epoch=4)
    assert said == (
        "the root key cannot come back from the keepers: keeper(s) 1, 2 answered without their shard "
        "(a restarted keeper is empty); restore it with `spike operator restore` and the recovery shards "
        "of key epoch 4 that `spike operator recover` exported: 1 of keeper(s) 1, 2"
    )
