"""The custody rules table: total, every reachable row walked through the real machine, and its document.

`spike.protocol.custody_rules.TABLE` is the only place the custody machine
decides what follows an answer.  These tests check that the table covers
every combination of phase, request kind and outcome (and says why the ones
it marks impossible are), that the machine does exactly what each reachable
row says, and that docs/custody-rules.md is the table (``SPIKE_UPDATE_DOCS=1``
rewrites the generated part).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable
from pathlib import Path

import msgspec
import pytest
from core_helpers import OTHER_KEY_INT, SAMPLE_KEY_INT, Rig, key_from_int, of_type, shard_body

from spike.protocol import (
    FailureKind,
    KeeperMisbehaved,
    KeeperReseeded,
    KeyRecord,
    KeySource,
    NewerKeySeen,
    Phase,
    RequestFailed,
    RequestKind,
    ResponseReceived,
    SendRequest,
    seal_key,
    share_for,
)
from spike.protocol.answers import classify
from spike.protocol.custody_rules import (
    AFTER_REBUILD,
    CANNOT_HAPPEN,
    NO_ANSWER,
    RULES,
    TABLE,
    Do,
    Key,
    Outcome,
    Rule,
    Seen,
    markdown,
    outcomes_of,
)

ROOT = Path(__file__).resolve().parent.parent.parent
DOC = ROOT / "docs" / "custody-rules.md"
BEGIN = (
    "<!-- generated from spike/protocol/custody_rules.py by tests/core/test_custody_rules.py: do not edit by hand -->\n"
)
END = "<!-- end of generated tables -->\n"

EPOCH = 7
# Epochs 2..6 came before 7; 0 and 1 this deployment never had.
HISTORIED: KeyRecord = msgspec.structs.replace(
    seal_key(key_from_int(SAMPLE_KEY_INT), epoch=EPOCH, threshold=2, keeper_ids=(1, 2, 3))[0],
    history=((2, EPOCH - 1),),
).validate()

EVERY_KEY = [(p, k, o) for p in Phase for k in RequestKind for o in outcomes_of(k)]
REACHABLE = [key for key in EVERY_KEY if TABLE[key].possible]


# ---------------------------------------------------------------- the table is total


def test_the_table_decides_every_combination_of_phase_kind_and_outcome_once() -> None:
    assert set(TABLE) == set(EVERY_KEY)
    assert len(EVERY_KEY) == len(set(EVERY_KEY)) == 3 * (3 * 12 + 5)
    for phase, kind, outcome in itertools.product(Phase, RequestKind, Outcome):
        assert ((phase, kind, outcome) in TABLE) == (outcome in outcomes_of(kind))


def test_every_rule_decides_something_and_says_why() -> None:
    used = {id(rule) for rule in TABLE.values()}
    assert [rule for rule in (*RULES, *CANNOT_HAPPEN) if id(rule) not in used] == []
    assert all(rule.why for rule in (*RULES, *CANNOT_HAPPEN))
    assert all(rule.possible for rule in RULES) and not any(rule.possible for rule in CANNOT_HAPPEN)


def test_the_rules_keep_the_custody_invariants() -> None:
    """A few rules of docs/design.md section 2 read straight off the table."""
    for (phase, kind, outcome), rule in TABLE.items():
        if Do.PUSH in rule.then:
            assert phase is Phase.READY and kind in (RequestKind.POLL, RequestKind.CHECK)  # a key, a regular read
        if outcome in NO_ANSWER or outcome in (Outcome.ERROR_STATUS, Outcome.NEWER_EPOCH):
            assert Do.PUSH not in rule.then  # nothing shown, or not ours: never pushed over
        if kind is RequestKind.CONFIRM:
            assert Do.PUSH not in rule.then  # at most three requests per keeper per interval
        if Do.COLLECT in rule.then:
            assert outcome is Outcome.HOLDING and phase is Phase.RECOVERING
        if outcome in (Outcome.WRONG_SHARD, Outcome.STALE_EPOCH, Outcome.UNKNOWN_EPOCH, Outcome.MALFORMED):
            assert Do.REPORT in rule.then or not rule.possible  # a wrong shard is always reported


def test_the_after_rebuild_table_is_total() -> None:
    assert set(AFTER_REBUILD) == set(itertools.product(KeySource, Seen))
    for (source, seen), (do, why) in AFTER_REBUILD.items():
        assert why
        if seen in (Seen.HOLDING, Seen.NEWER):
            assert do is None  # nothing to do, or not ours to overwrite
        if source is KeySource.KEEPERS:
            assert do is not Do.PUSH  # old news is checked before anything is pushed


# ---------------------------------------------------------------- walking every row through the machine


def rig_with(phase: Phase, kind: RequestKind) -> Rig:
    """A machine in `phase` with a request of `kind` to keeper 3 in flight."""
    if phase is Phase.UNINITIALISED:
        assert kind is RequestKind.POLL
        rig = Rig(with_record=False, record=HISTORIED)
        rig.start()
        return rig
    rig = Rig(record=HISTORIED)
    rig.start()
    if phase is Phase.RECOVERING and kind is RequestKind.POLL:
        return rig
    if kind is RequestKind.POLL:
        rig.reply_shard(1)
        rig.reply_shard(2)
    else:
        rig.reply(3, 404)  # an empty keeper: CHECK once the key is rebuilt, and so on
        rig.reply_shard(1)
        rig.reply_shard(2)
        if kind is not RequestKind.CHECK:
            rig.reply(3, 404)  # the CHECK: still empty, pushed
        if kind is RequestKind.CONFIRM:
            rig.reply(3, 200)  # the push accepted: read back
    assert rig.phase() is Phase.READY
    if phase is Phase.RECOVERING:
        rig.custody.forget(rig.now)  # shutting down with the request in flight
        rig.take()
    assert rig.pending[3].kind is kind
    return rig


def labelled(epoch: int, key_int: int = SAMPLE_KEY_INT) -> bytes:
    return shard_body(share_for(key_from_int(key_int), epoch=epoch, threshold=2, id=3))


READ_ANSWERS: dict[Outcome, tuple[int, bytes]] = {
    Outcome.HOLDING: (200, labelled(EPOCH)),
    Outcome.UNVERIFIABLE: (200, labelled(EPOCH)),
    Outcome.EMPTY: (404, b'{"err":"api_not_found"}'),
    Outcome.WRONG_SHARD: (200, labelled(EPOCH, OTHER_KEY_INT)),
    Outcome.STALE_EPOCH: (200, labelled(EPOCH - 1)),
    Outcome.UNKNOWN_EPOCH: (200, labelled(1)),
    Outcome.NEWER_EPOCH: (200, labelled(2**63 - 1)),
    Outcome.MALFORMED: (200, b"{}"),
    Outcome.ERROR_STATUS: (500, b'{"err":"api_internal_error"}'),
    Outcome.ACCEPTED: (200, b"{}"),
    Outcome.REFUSED: (500, b"{}"),
}
FAILURES = {Outcome.UNREACHABLE: FailureKind.REFUSED, Outcome.IMPOSTOR: FailureKind.PEER_IDENTITY}


def answer(rig: Rig, outcome: Outcome) -> None:
    request = rig.pending.pop(3)
    if outcome is Outcome.TIMEOUT:
        rig.tick(request.deadline)
        return
    rig.now += 0.01
    if outcome in FAILURES:
        rig.custody.receive(RequestFailed(request.request_id, "down", FAILURES[outcome]), rig.now)
    else:
        status, body = READ_ANSWERS[outcome]
        rig.custody.receive(ResponseReceived(request.request_id, status, body), rig.now)
    rig.take()


def check_row(rig: Rig, key: Key, act: Callable[[], None]) -> None:
    """Do `act` on `rig` and check that the machine did what the row `key` says, and nothing else."""
    rule: Rule = TABLE[key]
    keeper = rig.custody._keepers[3]
    before = (rig.state(3), keeper.needs_seed, rig.view(3).empty_answers, rig.view(3).failures)
    unconfirmed = keeper.unconfirmed_push
    needed = rig.custody.shards_needed
    mark = len(rig.history)
    act()
    effects = rig.history[mark:]
    assert rig.custody._last_rule is rule, key
    assert rig.state(3) is (before[0] if rule.state is None else rule.state), key
    assert keeper.needs_seed is (before[1] if rule.needs_seed is None else rule.needs_seed), key
    assert rig.view(3).empty_answers == before[2] + (Do.COUNT_EMPTY in rule.then), key
    assert rig.view(3).failures == before[3] + (Do.COUNT_FAILURE in rule.then), key
    mine = [e for e in effects if getattr(e, "keeper_id", 3) == 3]
    assert bool(of_type(mine, KeeperMisbehaved)) == (Do.REPORT in rule.then), key
    assert bool(of_type(mine, NewerKeySeen)) == (Do.REPORT_NEWER in rule.then), key
    assert bool(of_type(mine, KeeperReseeded)) == (Do.RESEEDED in rule.then and unconfirmed), key
    requests = [r.kind for r in of_type(mine, SendRequest)]
    expected = [RequestKind.PUSH] * (Do.PUSH in rule.then) + [RequestKind.CONFIRM] * (Do.CONFIRM in rule.then)
    assert requests == expected, key
    if Do.COLLECT in rule.then:
        assert rig.custody.shards_needed == needed - 1, key
    assert rig.custody._cannot_happen == 0


@pytest.mark.parametrize("key", REACHABLE, ids=lambda k: f"{k[0].value}-{k[1].value}-{k[2].value}")
def test_every_reachable_row_is_what_the_machine_does(key: Key) -> None:
    phase, kind, outcome = key
    rig = rig_with(phase, kind)
    check_row(rig, key, lambda: answer(rig, outcome))


@pytest.mark.parametrize(
    "key",
    [(p, k, Outcome.UNKNOWN_EPOCH) for p in (Phase.RECOVERING, Phase.READY) for k in RequestKind if k.value != "push"],
    ids=lambda k: f"{k[0].value}-{k[1].value}",
)
def test_a_newer_epoch_refuted_by_the_driver_follows_the_unknown_epoch_row(key: Key) -> None:
    phase, kind, _ = key
    rig = rig_with(phase, kind)
    answer(rig, Outcome.NEWER_EPOCH)
    seen_at = rig.now
    assert rig.custody.confirm_record(seen_at - 0.001, rig.now) == 0  # a check that began before the sighting

    def confirm() -> None:
        rig.now += 0.5
        assert rig.custody.confirm_record(seen_at, rig.now) == 1
        rig.take()

    check_row(rig, key, confirm)
    assert rig.custody.confirm_record(seen_at, rig.now) == 0  # refuted once


def test_rows_that_cannot_happen_are_never_reached_in_a_long_hostile_run() -> None:
    from test_nexus_custody import answer_badly, poll_times

    rig = Rig(record=HISTORIED, seed=11)
    poll_times(rig, 2000.0, answer_badly)
    assert rig.custody._cannot_happen == 0


def test_the_classifier_gives_each_answer_its_outcome() -> None:
    record = HISTORIED
    for outcome, (status, body) in READ_ANSWERS.items():
        kind = RequestKind.PUSH if outcome in (Outcome.ACCEPTED, Outcome.REFUSED) else RequestKind.POLL
        given = None if outcome is Outcome.UNVERIFIABLE else record
        assert classify(kind, ResponseReceived(1, status, body), given, 3).outcome is outcome
    for kind in FailureKind:
        expected = {FailureKind.TIMEOUT: Outcome.TIMEOUT, FailureKind.TLS: Outcome.IMPOSTOR}.get(kind)
        if kind is FailureKind.PEER_IDENTITY:
            expected = Outcome.IMPOSTOR
        got = classify(RequestKind.POLL, RequestFailed(1, "x", kind), record, 3).outcome
        assert got is (expected or Outcome.UNREACHABLE), kind
    assert classify(RequestKind.POLL, RequestFailed(1, "x"), record, 3).outcome is Outcome.UNREACHABLE


# ---------------------------------------------------------------- the document is the table


def test_the_rules_document_is_generated_from_the_table() -> None:
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"{DOC} lost its markers"
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    expected = head + BEGIN + markdown() + END + tail
    if os.environ.get("SPIKE_UPDATE_DOCS") == "1" and text != expected:
        DOC.write_text(expected)
        text = expected
    assert text == expected, "docs/custody-rules.md differs from the table: SPIKE_UPDATE_DOCS=1 pytest " + __file__
