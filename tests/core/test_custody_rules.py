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

from spike.protocol import (
    CommitRotation,
    FailureKind,
    KeeperLeft,
    KeeperMisbehaved,
    KeeperReseeded,
    KeeperStateChanged,
    KeyRecord,
    KeySource,
    NewerKeySeen,
    Phase,
    RequestFailed,
    RequestKind,
    ResponseReceived,
    SendRequest,
    ShardRetired,
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
    WRITES,
    Do,
    Key,
    Outcome,
    Rule,
    Seen,
    markdown,
    outcomes_of,
)
from spike.protocol.pending import PendingRotation
from tests.core.core_helpers import OTHER_KEY_INT, SAMPLE_KEY_INT, Rig, key_from_int, of_type, shard_body

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
    assert len(EVERY_KEY) == len(set(EVERY_KEY)) == 3 * (3 * 15 + 4 * 5)  # 3 phases; 3 reads, 4 writes
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


def rig_with(phase: Phase, kind: RequestKind, outcome: Outcome | None = None) -> Rig:
    """A machine in `phase` with a request of `kind` to keeper 3 in flight (`outcome`: the answer it will get)."""
    if kind is RequestKind.DEAL or outcome is Outcome.LACKS_NEW:
        return dealing_rig(phase, kind)
    if kind is RequestKind.CLEAR or outcome in (Outcome.REMOVED, Outcome.CLEARED):
        return removed_rig(phase, kind)
    if kind is RequestKind.FORGET:
        return retiring_rig(phase)
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


# ---------------------------------------------------------------- machines in the middle of a rotation

NEW_KEY_INT = 0x0BADC0FFEE0BADC0FFEE0BADC0FFEE0BADC0FFEE0BADC0FFEE0BADC0FFEE0BAD


def new_shard(keeper_id: int, epoch: int = EPOCH + 1) -> bytes:
    return shard_body(share_for(key_from_int(NEW_KEY_INT), epoch=epoch, threshold=2, id=keeper_id))


def holding_with_other(other: int) -> bytes:
    """Keeper 3's own shard of EPOCH, from a keeper that says it also holds one of epoch `other`."""
    share = share_for(key_from_int(SAMPLE_KEY_INT), epoch=EPOCH, threshold=2, id=3)
    return msgspec.json.encode(
        {"shard": list(share.secret_bytes()), "id": 3, "epoch": EPOCH, "other_epoch": other, "slots": 2}
    )


def ready_rig(**options: object) -> Rig:
    rig = Rig(record=HISTORIED, **options)
    rig.recover(1, 2, 3)
    assert rig.phase() is Phase.READY
    return rig


def poll_of(rig: Rig, keeper_id: int) -> SendRequest:
    """Run the clock (letting other requests time out) until `keeper_id` has a new poll in flight."""
    rig.pending.pop(keeper_id, None)
    while keeper_id not in rig.pending or rig.pending[keeper_id].kind is not RequestKind.POLL:
        rig.pending.pop(keeper_id, None)
        rig.tick()
    return rig.pending[keeper_id]


def rotating(rig: Rig, keeper_ids: tuple[int, ...] = (1, 2, 3)) -> None:
    rig.custody.start_rotation(rig.now, key=key_from_int(NEW_KEY_INT), keeper_ids=keeper_ids)
    rig.take()
    rig.custody.rotation_persisted(rig.now)
    rig.take()


def deal_to(rig: Rig, keeper_id: int) -> None:
    """Deal keeper `keeper_id` its new shard at its next poll and confirm it."""
    poll_of(rig, keeper_id)
    rig.reply_shard(keeper_id)  # its current shard: it lacks the new one
    assert rig.pending[keeper_id].kind is RequestKind.DEAL
    rig.reply(keeper_id, 200)
    rig.reply(keeper_id, 200, new_shard(keeper_id))


def dealing_rig(phase: Phase, kind: RequestKind) -> Rig:
    """Keeper 3 asked for its shard of the epoch being dealt (a poll, a check, a read-back), or being dealt it."""
    if kind is RequestKind.CHECK:
        new_record, _ = seal_key(key_from_int(NEW_KEY_INT), epoch=EPOCH + 1, threshold=2, keeper_ids=(1, 2, 3))
        pending = PendingRotation.seal(key_from_int(SAMPLE_KEY_INT), HISTORIED, key_from_int(NEW_KEY_INT), new_record)
        rig = Rig(record=HISTORIED, pending=pending)
        rig.start()
        rig.reply(3, 404)
        rig.recover(1, 2)  # rebuilt: keeper 3 is read again, for the new epoch
    else:
        rig = ready_rig()
        rotating(rig)
        poll_of(rig, 3)
        if kind is not RequestKind.POLL:
            rig.reply_shard(3)
        if kind is RequestKind.CONFIRM:
            rig.reply(3, 200)
    assert rig.pending[3].kind is kind and rig.custody.rotation is not None
    if phase is Phase.RECOVERING:
        rig.custody.forget(rig.now)
        rig.take()
    return rig


def removed_rig(phase: Phase, kind: RequestKind) -> Rig:
    """Keeper 3 removed from the set by a committed rekey, with a poll, check or clear in flight."""
    rig = ready_rig()
    if kind is RequestKind.CHECK:  # it lacks its shard when the rekey commits
        poll_of(rig, 3)
        rig.reply(3, 404)
        rig.pending.pop(3)  # the push goes unanswered
    rotating(rig, (1, 2))
    deal_to(rig, 1)
    deal_to(rig, 2)
    assert of_type(rig.history, CommitRotation)
    rig.custody.rotation_committed(rig.now)
    rig.take()
    rig.pending.pop(3, None)
    if kind is RequestKind.CHECK:
        rig.custody.forget(rig.now)
        rig.pending.clear()
        poll_of(rig, 1)
        rig.reply(1, 200, new_shard(1))
        poll_of(rig, 2)
        rig.reply(2, 200, new_shard(2))  # rebuilt: keeper 3 was last seen lacking its shard, read again
    else:
        poll_of(rig, 3)
        if kind is RequestKind.CLEAR:
            rig.reply(3, 200, labelled(EPOCH))
    assert rig.pending[3].kind is kind
    if phase is Phase.RECOVERING:
        rig.custody.forget(rig.now)
        rig.take()
    return rig


def retiring_rig(phase: Phase) -> Rig:
    """Keeper 3 told to forget its shard of an earlier epoch that it said it still holds."""
    rig = Rig(record=HISTORIED)
    rig.start()
    if phase is Phase.READY:
        rig.recover(1, 2)
        poll_of(rig, 3)
    rig.reply(3, 200, holding_with_other(EPOCH - 2))
    assert rig.pending[3].kind is RequestKind.FORGET
    assert rig.phase() is phase
    return rig


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
# Answers whose outcome depends on what the machine asked and knows (a rotation, a removed keeper).
IN_CONTEXT: dict[Outcome, tuple[int, bytes]] = {
    Outcome.LACKS_NEW: (200, labelled(EPOCH)),  # asked for the new epoch's
    Outcome.REMOVED: (200, labelled(EPOCH)),  # from a keeper removed from the set
    Outcome.CLEARED: (404, b'{"err":"api_not_found"}'),  # from a keeper removed from the set
}
ANSWERS = {**READ_ANSWERS, **IN_CONTEXT}
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
        status, body = ANSWERS[outcome]
        rig.custody.receive(ResponseReceived(request.request_id, status, body), rig.now)
    rig.take()


def check_row(rig: Rig, key: Key, act: Callable[[], None]) -> None:
    """Do `act` on `rig` and check that the machine did what the row `key` says, and nothing else."""
    rule: Rule = TABLE[key]
    if Do.LEAVE in rule.then:
        return check_leaving_row(rig, key, act)
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
    expected += [RequestKind.DEAL] * (Do.DEAL in rule.then) + [RequestKind.CLEAR] * (Do.CLEAR in rule.then)
    assert requests == expected, key  # Do.RETIRE asks only when the keeper says it holds a shard to retire
    assert bool(of_type(mine, ShardRetired)) == (Do.RETIRED in rule.then), key
    if Do.COLLECT in rule.then:
        assert rig.custody.shards_needed == needed - 1, key
    assert rig.custody._cannot_happen == 0


def check_leaving_row(rig: Rig, key: Key, act: Callable[[], None]) -> None:
    """A row that takes keeper 3 off the poll list: it is gone, with a report, and nothing else is asked of it."""
    rule: Rule = TABLE[key]
    mark = len(rig.history)
    act()
    mine = [e for e in rig.history[mark:] if getattr(e, "keeper_id", 3) == 3]
    assert rig.custody._last_rule is rule, key
    assert 3 not in rig.custody.keeper_ids and 3 not in rig.pending, key
    assert [type(e) for e in mine if not isinstance(e, KeeperStateChanged)] == [
        *([KeeperMisbehaved] if Do.REPORT in rule.then else []),
        *([ShardRetired] if Do.RETIRED in rule.then else []),
        KeeperLeft,
    ], key
    rig.tick(rig.now + 100.0)
    assert not [r for r in of_type(rig.history[mark:], SendRequest) if r.keeper_id == 3], key
    assert rig.custody._cannot_happen == 0


@pytest.mark.parametrize("key", REACHABLE, ids=lambda k: f"{k[0].value}-{k[1].value}-{k[2].value}")
def test_every_reachable_row_is_what_the_machine_does(key: Key) -> None:
    phase, kind, outcome = key
    rig = rig_with(phase, kind, outcome)
    check_row(rig, key, lambda: answer(rig, outcome))


@pytest.mark.parametrize("phase", [Phase.RECOVERING, Phase.READY])
@pytest.mark.parametrize("kind", [RequestKind.POLL, RequestKind.CHECK])
@pytest.mark.parametrize("other", [EPOCH - 1, 1, EPOCH + 5])
def test_a_keeper_holding_a_shard_of_an_epoch_out_of_play_is_told_to_forget_it(
    phase: Phase, kind: RequestKind, other: int
) -> None:
    """The HOLDING rows' conditional RETIRE: an earlier (had or never had) epoch is forgotten; a newer one is left."""
    rig = rig_with(phase, kind)
    request = rig.pending.pop(3)
    rig.custody.receive(ResponseReceived(request.request_id, 200, holding_with_other(other)), rig.now)
    effects = rig.take()
    forgets = [r for r in of_type(effects, SendRequest) if r.keeper_id == 3 and r.kind is RequestKind.FORGET]
    if other > EPOCH:  # above anything known: perhaps another instance's, not this machine's to touch
        assert forgets == []
    else:
        assert [msgspec.json.decode(r.body) for r in forgets] == [{"epoch": other}]
        rig.reply(3, 200)
        assert [(r.keeper_id, r.epoch) for r in of_type(rig.history, ShardRetired)] == [(3, other)]


@pytest.mark.parametrize(
    "key",
    [(p, k, Outcome.UNKNOWN_EPOCH) for p in (Phase.RECOVERING, Phase.READY) for k in RequestKind if k not in WRITES],
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
    from tests.core.core_helpers import answer_badly, poll_times

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


def test_the_classifier_judges_against_a_rotation_and_the_keeper_set() -> None:
    new_record, _ = seal_key(key_from_int(NEW_KEY_INT), epoch=EPOCH + 1, threshold=2, keeper_ids=(1, 2, 3))
    old = ResponseReceived(1, 200, labelled(EPOCH))
    new = ResponseReceived(1, 200, new_shard(3))
    go_old = ResponseReceived(
        1, 200, shard_body(share_for(key_from_int(SAMPLE_KEY_INT), epoch=EPOCH, threshold=2, id=3), extension=False)
    )
    go_new = ResponseReceived(1, 200, new_shard(3)[: new_shard(3).index(b',"id"')] + b"}")
    empty = ResponseReceived(1, 404, b"")

    def outcome(answer: ResponseReceived, **context: object) -> Outcome:
        return classify(RequestKind.POLL, answer, HISTORIED, 3, **context).outcome  # type: ignore[arg-type]

    dealing = {"pending": new_record, "asked": EPOCH + 1}
    assert outcome(old, **dealing) is outcome(go_old, **dealing) is Outcome.LACKS_NEW
    assert outcome(new, **dealing) is outcome(go_new, **dealing) is Outcome.HOLDING
    recovering = {"pending": new_record, "asked": EPOCH}
    assert outcome(new, **recovering) is outcome(go_new, **recovering) is Outcome.HOLDING  # the new key's pile
    assert outcome(new) is Outcome.NEWER_EPOCH  # no rotation known: not this machine's to judge
    assert outcome(new, highest=EPOCH + 1) is Outcome.UNKNOWN_EPOCH  # an abandoned rotation's
    assert outcome(go_new) is Outcome.WRONG_SHARD
    assert outcome(old, member=False) is Outcome.REMOVED
    assert outcome(empty, member=False) is Outcome.CLEARED
    assert outcome(empty, **dealing) is Outcome.EMPTY


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
