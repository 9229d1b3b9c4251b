"""NexusCustody, rule by rule (see the module docstring of spike.protocol.nexus)."""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable

import msgspec
import pytest

from spike.protocol import (
    KEEPER_CONTRIBUTE_PATH,
    KEEPER_SHARD_PATH,
    AlreadyInitialised,
    ApiRequest,
    Effect,
    FailureKind,
    Keeper,
    KeeperMisbehaved,
    KeeperReseeded,
    KeeperState,
    KeeperStateChanged,
    KeyRecord,
    KeyRecovered,
    KeyRejected,
    LocalProtocolError,
    NewerKeySeen,
    NexusCustody,
    Phase,
    PhaseChanged,
    PollSchedule,
    RemoteProtocolError,
    RequestFailed,
    RequestKind,
    ResponseReceived,
    RestoreProgress,
    Role,
    SendRequest,
    ShamirError,
    ShardContribution,
    Share,
    ShareRejected,
    TrustDomains,
    deal,
    seal_key,
    share_for,
)
from spike.protocol.wire import decode
from tests.core.core_helpers import (
    GO_EMPTY,
    NOT_FOUND,
    OTHER_KEY_INT,
    SAMPLE_KEY_INT,
    Answerer,
    ConstantRandom,
    Rig,
    answer_badly,
    answer_correctly,
    key_from_int,
    of_type,
    poll_times,
    shard_body,
)


def pushed_share(request: SendRequest) -> ShardContribution:
    assert request.kind is RequestKind.PUSH
    assert request.path == KEEPER_CONTRIBUTE_PATH
    return decode(request.body, ShardContribution)


# ---------------------------------------------------------------- construction


@pytest.mark.parametrize(
    "kwargs",
    [
        {"interval": 0.0},
        {"interval": -1.0},
        {"interval": math.inf},
        {"interval": math.nan},
        {"jitter": -0.01},
        {"jitter": 0.26},
        {"request_timeout": 0.0},
        {"request_timeout": 5.01},
    ],
)
def test_poll_schedule_rejects_nonsense(kwargs: dict[str, float]) -> None:
    with pytest.raises(LocalProtocolError):
        PollSchedule(**{"interval": 5.0, **kwargs})


@pytest.mark.parametrize(("ids", "threshold"), [((1, 2), 3), ((1, 2), 0), ((1, 1, 2), 2), ((0, 1), 1), ((), 1)])
def test_custody_rejects_bad_shamir_parameters(ids: tuple[int, ...], threshold: int) -> None:
    with pytest.raises(ShamirError):
        NexusCustody(ids, threshold=threshold, schedule=PollSchedule(), rng=random.Random(0), now=0.0)


def test_custody_rejects_a_record_for_other_keepers_or_threshold() -> None:
    rig = Rig()
    for ids, threshold in (((1, 2, 4), 2), ((1, 2, 3), 3), ((1, 2), 2)):
        with pytest.raises(LocalProtocolError):
            NexusCustody(
                ids,
                threshold=threshold,
                schedule=rig.schedule,
                rng=random.Random(0),
                now=0.0,
                record=rig.record,
            )


@pytest.mark.parametrize(
    "broken",
    [{"epoch": 2**63}, {"epoch": -1}, {"check": b"\x00" * 31}, {"commitments": {}}],
    ids=["epoch-too-big", "epoch-negative", "short-check", "no-commitments"],
)
def test_custody_refuses_a_malformed_stored_record_up_front(broken: dict[str, object]) -> None:
    # A record read back from storage is as untrusted as one from bootstrap:
    # it must be refused when the machine is built, not blow up later inside
    # `receive` when a keeper's shard is checked against it.
    record = msgspec.structs.replace(Rig().record, **broken)
    with pytest.raises(RemoteProtocolError):
        NexusCustody((1, 2, 3), threshold=2, schedule=PollSchedule(), rng=random.Random(0), now=0.0, record=record)


def test_a_new_custody_with_a_record_is_recovering_without_a_key() -> None:
    rig = Rig()
    assert rig.custody.phase is Phase.RECOVERING
    assert rig.custody.shards_needed == 2
    assert rig.custody.effects() == []
    with pytest.raises(LocalProtocolError, match="no root key"):
        _ = rig.custody.root_key
    assert all(v.state is KeeperState.UNKNOWN for v in rig.custody.keepers())


# ---------------------------------------------------------------- polling schedule


def test_first_round_of_polls_is_immediate() -> None:
    rig = Rig(now=100.0)
    assert rig.custody.next_deadline() == 100.0
    rig.custody.handle_timer(99.99)
    assert rig.custody.effects() == []
    polls = rig.requests(rig.start(), RequestKind.POLL)
    assert sorted(p.keeper_id for p in polls) == [1, 2, 3]
    for poll in polls:
        # A read names the record's epoch, so a keeper holding two shards (during or after a rotation) answers the
        # one wanted; SPIKE's keeper ignores the field (docs/key-lifecycle.md section 2).
        assert (poll.path, poll.body, poll.deadline) == (KEEPER_SHARD_PATH, b'{"epoch":7}', 102.0)
    assert len({p.request_id for p in polls}) == 3


def test_keepers_are_spread_over_the_interval_on_their_own_phase() -> None:
    rig = Rig(ids=(1, 2, 3), interval=9.0, jitter=0.0, now=0.0)
    rig.start()
    assert [v.next_poll_at for v in rig.custody.keepers()] == [9.0, 12.0, 15.0]
    assert rig.custody.next_deadline() == 2.0  # the first timeouts come first


def answer_one_keeper_always_empty(rig: Rig, request: SendRequest) -> list[Effect]:
    if request.keeper_id == 3 and request.kind is not RequestKind.PUSH:
        return rig.reply(3, 404, NOT_FOUND)
    return answer_correctly(rig, request)


@pytest.mark.parametrize(
    "answer", [answer_badly, answer_one_keeper_always_empty], ids=["bad-answers", "one-always-empty"]
)
def test_the_poll_schedule_does_not_depend_on_what_keepers_answer(answer: Answerer) -> None:
    good = poll_times(Rig(seed=42, jitter=0.2), 100.0 + 40 * 10.0, answer_correctly)
    other = poll_times(Rig(seed=42, jitter=0.2), 100.0 + 40 * 10.0, answer)
    assert other == good
    assert all(len(times) >= 39 for times in good.values())


def test_poll_gaps_stay_within_interval_and_jitter() -> None:
    jitter, interval = 0.25, 10.0
    times = poll_times(Rig(ids=(1, 2, 3, 4), seed=3, jitter=jitter, interval=interval), 2000.0, answer_badly)
    for keeper_id, polls in times.items():
        gaps = [b - a for a, b in itertools.pairwise(polls)]
        assert interval * (1 - jitter) <= gaps[0] <= interval * (2 + jitter), keeper_id
        for gap in gaps[1:]:
            assert interval * (1 - 2 * jitter) <= gap <= interval * (1 + 2 * jitter), keeper_id
        assert 2000.0 - polls[-1] <= interval * (1 + 2 * jitter), "a keeper stopped being polled"


def test_deadlines_are_capped_at_the_next_poll() -> None:
    # With the timeout as long as the interval, the cap is what keeps a request
    # from outliving the next poll; poll_times() asserts it for every request.
    rig = Rig(seed=5, jitter=0.25, interval=4.0, timeout=4.0)
    capped: list[SendRequest] = []

    def never_answer(rig: Rig, request: SendRequest) -> list[Effect]:
        if request.deadline < rig.now + rig.schedule.request_timeout:
            capped.append(request)
        return []

    poll_times(rig, 400.0, never_answer)
    assert capped, "the cap never bound, so this test checked nothing"
    assert all(v.state is KeeperState.UNREACHABLE for v in rig.custody.keepers())


def test_a_keeper_that_keeps_failing_costs_at_most_three_requests_per_interval() -> None:
    rig = Rig(seed=9, jitter=0.0)
    per_keeper3: list[tuple[float, RequestKind]] = []

    def answer(rig: Rig, request: SendRequest) -> list[Effect]:
        if request.keeper_id == 3:
            per_keeper3.append((rig.now, request.kind))
        return answer_one_keeper_always_empty(rig, request)

    poll_times(rig, 100.0 + 20 * 10.0, answer)
    kinds = [k for _, k in per_keeper3]
    assert kinds.count(RequestKind.PUSH) >= 19  # re-seeded after every poll once ready
    for start in range(100, 300, 10):
        in_window = [t for t, _ in per_keeper3 if start + 6 <= t < start + 16]  # keeper 3's slot is +6.67
        assert len(in_window) <= 3


# ---------------------------------------------------------------- recovering


def test_key_is_recovered_from_threshold_verified_shards() -> None:
    rig = Rig()
    rig.start()
    rig.reply_shard(1)
    assert rig.phase() is Phase.RECOVERING
    assert rig.custody.shards_needed == 1
    effects = rig.reply_shard(2)
    [recovered] = of_type(effects, KeyRecovered)
    assert (recovered.epoch, recovered.keeper_ids, recovered.source, recovered.started_at) == (
        7,
        (1, 2),
        "keepers",
        100.0,
    )
    assert of_type(effects, PhaseChanged) == [PhaseChanged(Phase.RECOVERING, Phase.READY, rig.now)]
    assert rig.custody.phase is Phase.READY
    assert rig.custody.root_key == rig.key
    assert rig.custody.shards_needed == 0
    assert rig.requests(effects) == []  # keeper 3 has a poll in flight: nothing to push yet
    rig.reply_shard(3)
    assert rig.custody.redundancy == 1


def test_go_keeper_answers_without_extension_fields_are_verified_by_commitment() -> None:
    rig = Rig()
    rig.start()
    rig.reply_shard(1, extension=False)
    rig.reply_shard(3, extension=False)
    assert rig.custody.phase is Phase.READY
    assert rig.custody.root_key == rig.key


@pytest.mark.parametrize("bad_position", [0, 1, 2, 3])
def test_three_of_five_with_one_bad_shard_among_four_names_and_skips_it(bad_position: int) -> None:
    rig = Rig(ids=(1, 2, 3, 4, 5), threshold=3)
    rig.start()
    order = [1, 2, 4, 5]
    bad = order[bad_position]
    effects = []
    for keeper_id in order:
        if keeper_id == bad:
            wrong = share_for(key_from_int(OTHER_KEY_INT), epoch=7, threshold=3, id=bad)
            effects += rig.reply_shard(bad, wrong)
        else:
            effects += rig.reply_shard(keeper_id)
    [recovered] = of_type(effects, KeyRecovered)
    assert bad not in recovered.keeper_ids
    assert len(recovered.keeper_ids) == 3
    assert rig.custody.root_key == rig.key
    assert [m.keeper_id for m in of_type(effects, KeeperMisbehaved)] == [bad]
    assert rig.state(bad) is KeeperState.WRONG_SHARD
    # ... and the bad keeper gets its own shard once the key is known.  A bad answer
    # that came before the key may be old: the keeper is read again first.
    checks = rig.requests(effects, RequestKind.CHECK)
    if bad_position < 3:
        assert rig.requests(effects, RequestKind.PUSH) == []
        assert [c.keeper_id for c in checks] == [bad]
        effects = rig.reply_shard(bad, wrong)
    else:
        assert checks == []
    [push] = rig.requests(effects, RequestKind.PUSH)
    assert push.keeper_id == bad
    assert pushed_share(push).shard_bytes() == rig.shares[bad].secret_bytes()


def test_not_enough_verified_shards_means_no_key() -> None:
    rig = Rig(ids=(1, 2, 3, 4, 5), threshold=3)
    rig.start()
    rig.reply_shard(1)
    rig.reply_shard(2, rig.shares[1])  # keeper 1's shard, offered by keeper 2
    rig.reply(3, 404, NOT_FOUND)
    rig.fail(4)
    rig.reply_shard(5)
    assert rig.custody.phase is Phase.RECOVERING
    assert rig.custody.shards_needed == 1
    with pytest.raises(LocalProtocolError):
        _ = rig.custody.root_key


def test_verified_shards_from_different_rounds_add_up() -> None:
    rig = Rig()
    rig.start()
    rig.reply_shard(1)
    rig.fail(2)
    rig.fail(3)
    while 2 not in rig.pending:  # its next scheduled poll
        rig.tick()
    effects = rig.reply_shard(2)
    assert of_type(effects, KeyRecovered)[0].keeper_ids == (1, 2)


def test_commitments_matching_but_check_value_failing_is_key_rejected() -> None:
    rig = Rig()
    record = msgspec.structs.replace(rig.record, check=bytes(32))
    rig = Rig(record=record)
    rig.start()
    rig.reply_shard(1)
    effects = rig.reply_shard(2)
    assert of_type(effects, KeyRejected) == [KeyRejected(7, rig.now, (1, 2))]
    assert of_type(effects, KeyRecovered) == []
    assert rig.custody.phase is Phase.RECOVERING
    assert rig.requests(effects) == []
    with pytest.raises(LocalProtocolError):
        _ = rig.custody.root_key
    # The shards are dropped: one more shard is not enough to try again.
    assert of_type(rig.reply_shard(3), KeyRejected) == []


# ---------------------------------------------------------------- keeper states and reports


def test_repeated_404s_are_one_state_change_and_counted() -> None:
    rig = Rig(ids=(1, 2), threshold=2)
    rig.start()
    for _ in range(5):
        while 1 not in rig.pending:
            rig.tick()
        rig.reply(1, 404, NOT_FOUND)
    view = rig.view(1)
    assert (view.state, view.empty_answers, view.polls) == (KeeperState.EMPTY, 5, 5)
    assert [(c.previous, c.state) for c in rig.changes(1)] == [(KeeperState.UNKNOWN, KeeperState.EMPTY)]


def run_to_ready_with_keeper3(rig: Rig, status: int, body: bytes) -> list[Effect]:
    rig.recover(1, 2)
    return rig.reply(3, status, body)


@pytest.mark.parametrize(("status", "body"), [(404, NOT_FOUND), (400, GO_EMPTY)], ids=["404", "go-keeper-400"])
def test_an_empty_keeper_is_pushed_confirmed_and_reported_reseeded(status: int, body: bytes) -> None:
    rig = Rig()
    effects = run_to_ready_with_keeper3(rig, status, body)
    assert rig.state(3) is KeeperState.EMPTY
    [push] = rig.requests(effects)
    assert push.keeper_id == 3
    contribution = pushed_share(push)
    assert contribution.shard_bytes() == rig.shares[3].secret_bytes()
    assert (contribution.id, contribution.epoch) == (3, 7)

    # Hand the push to a real keeper, then feed its real answers back.
    keeper = Keeper(TrustDomains())
    nexus = TrustDomains().id_of(Role.NEXUS)
    stored = keeper.handle(ApiRequest("POST", push.path, nexus, push.body)).response
    [confirm] = rig.requests(rig.reply(3, stored.status, stored.body), RequestKind.CONFIRM)
    assert (confirm.path, confirm.body) == (KEEPER_SHARD_PATH, b'{"epoch":7}')  # the epoch it was just given
    answer = keeper.handle(ApiRequest("POST", confirm.path, nexus, confirm.body)).response
    effects = rig.reply(3, answer.status, answer.body)
    assert of_type(effects, KeeperReseeded) == [KeeperReseeded(3, rig.now, KeeperState.EMPTY)]
    assert [(c.keeper_id, c.previous, c.state, c.at) for c in of_type(effects, KeeperStateChanged)] == [
        (3, KeeperState.EMPTY, KeeperState.HOLDING, rig.now)
    ]
    assert rig.requests(effects) == []
    assert rig.view(3).reseeds == 1
    assert rig.custody.redundancy == 1
    assert [(c.previous, c.state) for c in rig.changes(3)] == [
        (KeeperState.UNKNOWN, KeeperState.EMPTY),
        (KeeperState.EMPTY, KeeperState.HOLDING),
    ]


def test_an_empty_answer_before_recovery_is_checked_then_pushed_once_the_key_is_known() -> None:
    # Bootstrap seeds keepers while Nexus recovers: a 404 from before the key may be stale.
    rig = Rig()
    rig.start()
    assert rig.requests(rig.reply(3, 404, NOT_FOUND)) == []
    rig.reply_shard(1)
    effects = rig.reply_shard(2)
    assert of_type(effects, KeyRecovered)
    [check] = rig.requests(effects)
    assert (check.keeper_id, check.kind) == (3, RequestKind.CHECK)
    [push] = rig.requests(rig.reply(3, 404, NOT_FOUND))
    assert (push.keeper_id, push.kind) == (3, RequestKind.PUSH)
    assert pushed_share(push).shard_bytes() == rig.shares[3].secret_bytes()


WRONG_SHARDS: dict[str, tuple[Callable[[Rig], Share], bool, str]] = {
    "stale-epoch-labelled": (
        lambda r: share_for(r.key, epoch=6, threshold=2, id=3),
        True,
        "stale shard of epoch 6",
    ),
    "stale-epoch-go": (lambda r: share_for(r.key, epoch=6, threshold=2, id=3), False, "commitment"),
    "other-keeper-labelled": (lambda r: r.shares[1], True, "shard of keeper 1"),
    "other-keeper-go": (lambda r: r.shares[1], False, "commitment"),
    "other-key": (
        lambda r: share_for(key_from_int(OTHER_KEY_INT), epoch=7, threshold=2, id=3),
        True,
        "commitment",
    ),
    "random-bytes": (lambda r: Share(3, 7, random.Random(1).randbytes(32)), False, "commitment"),
    "all-zero": (lambda r: Share(3, 7, bytes(32)), False, "commitment"),
}


@pytest.mark.parametrize("case", WRONG_SHARDS.values(), ids=WRONG_SHARDS.keys())
def test_a_wrong_shard_when_ready_is_reported_and_replaced(
    case: tuple[Callable[[Rig], Share], bool, str],
) -> None:
    make, extension, problem = case
    rig = Rig()
    rig.recover(1, 2)
    effects = rig.reply_shard(3, make(rig), extension=extension)
    [misbehaved] = of_type(effects, KeeperMisbehaved)
    assert misbehaved.keeper_id == 3
    assert problem in misbehaved.problem
    view = rig.view(3)
    assert view.state is KeeperState.WRONG_SHARD
    assert problem in view.detail
    [push] = rig.requests(effects)
    assert pushed_share(push).shard_bytes() == rig.shares[3].secret_bytes()
    rig.reply(3, 200)
    effects = rig.reply_shard(3)
    assert of_type(effects, KeeperReseeded) == [KeeperReseeded(3, rig.now, KeeperState.WRONG_SHARD)]
    assert rig.custody.root_key == rig.key


@pytest.mark.parametrize("case", WRONG_SHARDS.values(), ids=WRONG_SHARDS.keys())
def test_a_wrong_shard_while_recovering_is_left_out(case: tuple[Callable[[Rig], Share], bool, str]) -> None:
    make, extension, _ = case
    rig = Rig()
    rig.start()
    rig.reply_shard(1)
    effects = rig.reply_shard(3, make(rig), extension=extension)
    assert [m.keeper_id for m in of_type(effects, KeeperMisbehaved)] == [3]
    assert rig.custody.phase is Phase.RECOVERING
    effects = rig.reply_shard(2)
    assert of_type(effects, KeyRecovered)[0].keeper_ids == (1, 2)
    assert rig.custody.root_key == rig.key


GARBAGE: dict[str, tuple[int, bytes]] = {
    "invalid-json": (200, b"{not json"),
    "binary": (200, bytes(range(256))),
    "empty-body": (200, b""),
    "empty-object": (200, b"{}"),
    "null": (200, b"null"),
    "shard-string": (200, b'{"shard":"AAAA"}'),
    "shard-floats": (200, msgspec.json.encode({"shard": [1.5] * 32})),
    "31-bytes": (200, msgspec.json.encode({"shard": [1] * 31})),
    "33-bytes": (200, msgspec.json.encode({"shard": [1] * 33})),
    "value-256": (200, msgspec.json.encode({"shard": [256] * 32})),
    "out-of-field": (200, msgspec.json.encode({"shard": [255] * 32})),
    "bad-id-field": (200, msgspec.json.encode({"shard": [1] * 32, "id": 0})),
    "http-500": (500, b'{"err":"api_internal_error"}'),
    "http-401": (401, b'{"err":"access_unauthorized"}'),
    "http-302": (302, b""),
}


@pytest.mark.parametrize(("ready", "case"), [(r, c) for r in (False, True) for c in GARBAGE], ids=str)
def test_garbage_answers_become_bad_answer_reports_not_exceptions(ready: bool, case: str) -> None:
    status, body = GARBAGE[case]
    rig = Rig()
    if ready:
        rig.recover(1, 2)
    else:
        rig.start()
    effects = rig.reply(3, status, body)
    assert rig.state(3) is KeeperState.BAD_ANSWER
    assert [m.keeper_id for m in of_type(effects, KeeperMisbehaved)] == [3]
    assert rig.custody.phase is (Phase.READY if ready else Phase.RECOVERING)
    # Polling goes on as before.
    while 3 not in rig.pending or rig.pending[3].kind is not RequestKind.POLL:
        rig.tick()
    assert rig.view(3).polls == 2


def test_failures_and_timeouts_make_a_keeper_unreachable() -> None:
    rig = Rig()
    rig.start()
    rig.fail(1, "connection refused")
    assert (rig.state(1), rig.view(1).detail, rig.view(1).failures) == (
        KeeperState.UNREACHABLE,
        "connection refused",
        1,
    )
    rig.tick(102.0)  # the deadline of the other two polls
    for keeper_id in (2, 3):
        assert rig.state(keeper_id) is KeeperState.UNREACHABLE
        assert "deadline" in rig.view(keeper_id).detail
    # Exactly one change each, none repeated when a keeper stays unreachable.
    assert len(rig.changes(2)) == 1


def test_a_push_that_is_refused_is_reported_and_retried_after_the_next_poll() -> None:
    rig = Rig()
    run_to_ready_with_keeper3(rig, 404, NOT_FOUND)
    effects = rig.reply(3, 500, b"{}")
    assert "refused its shard" in of_type(effects, KeeperMisbehaved)[0].problem
    assert rig.requests(effects) == []
    while 3 not in rig.pending:
        rig.tick()
    assert rig.pending[3].kind is RequestKind.POLL
    [push] = rig.requests(rig.reply(3, 404, NOT_FOUND))
    assert push.kind is RequestKind.PUSH


def test_a_keeper_still_empty_after_accepting_is_reported_without_a_second_push() -> None:
    rig = Rig()
    run_to_ready_with_keeper3(rig, 404, NOT_FOUND)
    rig.reply(3, 200)
    effects = rig.reply(3, 404, NOT_FOUND)  # the CONFIRM read
    assert "still empty" in of_type(effects, KeeperMisbehaved)[0].problem
    assert rig.requests(effects) == []
    assert of_type(effects, KeeperReseeded) == []


@pytest.mark.parametrize("lost", ["timeout", "failure"])
def test_a_push_whose_read_back_is_lost_is_reported_reseeded_by_the_next_read_that_shows_it(lost: str) -> None:
    """On a slow day the confirmation misses its deadline (or its connection): the re-seed still counts, once."""
    rig = Rig()
    run_to_ready_with_keeper3(rig, 404, NOT_FOUND)
    rig.reply(3, 200)  # the push is accepted
    assert rig.pending[3].kind is RequestKind.CONFIRM
    effects = rig.tick(rig.pending.pop(3).deadline) if lost == "timeout" else rig.fail(3)
    assert of_type(effects, KeeperReseeded) == []
    while 3 not in rig.pending:
        effects += rig.tick()
    assert rig.pending[3].kind is RequestKind.POLL
    effects = rig.reply_shard(3)
    assert of_type(effects, KeeperReseeded) == [KeeperReseeded(3, rig.now, KeeperState.EMPTY)]
    assert rig.state(3) is KeeperState.HOLDING and "later read" in rig.view(3).detail
    assert rig.view(3).reseeds == 1
    # Later polls that find it holding are just polls.
    while 3 not in rig.pending:
        rig.tick()
    assert of_type(rig.reply_shard(3), KeeperReseeded) == []
    assert rig.view(3).reseeds == 1


def test_late_and_unknown_answers_are_ignored() -> None:
    rig = Rig()
    rig.start()
    stale = rig.pending[1]
    rig.tick(102.0)  # every first poll times out
    before = rig.custody.keepers()
    rig.custody.receive(ResponseReceived(stale.request_id, 200, shard_body(rig.shares[1])), 102.5)
    rig.custody.receive(ResponseReceived(9999, 200, shard_body(rig.shares[2])), 102.5)
    rig.custody.receive(RequestFailed(12345, "late"), 102.5)
    assert rig.custody.effects() == []
    assert rig.custody.keepers() == before
    assert rig.custody.shards_needed == 2


def test_an_answer_is_used_only_once() -> None:
    rig = Rig()
    rig.start()
    request = rig.pending[1]
    body = shard_body(rig.shares[1])
    rig.custody.receive(ResponseReceived(request.request_id, 200, body), 100.1)
    rig.custody.receive(ResponseReceived(request.request_id, 200, body), 100.2)
    assert rig.custody.phase is Phase.RECOVERING
    assert rig.custody.shards_needed == 1


def test_keeper_views_count_what_happened() -> None:
    rig = Rig()
    rig.recover(1, 2)
    rig.reply(3, 404, NOT_FOUND)
    view = rig.view(3)
    assert view.polls == 1
    assert view.empty_answers == 1
    assert view.last_poll_at == 100.0
    assert view.last_answer_at == pytest.approx(100.03)
    assert view.latency == pytest.approx(0.03)


# ---------------------------------------------------------------- uninitialised and initialise


def test_uninitialised_nexus_polls_but_invents_no_key() -> None:
    rig = Rig(with_record=False)
    assert rig.custody.phase is Phase.UNINITIALISED
    rig.start()
    effects = rig.reply_shard(1) + rig.reply_shard(2) + rig.reply(3, 404, NOT_FOUND)
    assert rig.state(1) is KeeperState.UNVERIFIED
    assert rig.state(3) is KeeperState.EMPTY
    assert rig.custody.phase is Phase.UNINITIALISED
    assert rig.requests(effects) == []
    assert of_type(effects, KeyRecovered) == []
    with pytest.raises(LocalProtocolError):
        _ = rig.custody.root_key
    with pytest.raises(LocalProtocolError, match="bootstrap"):
        rig.custody.export_shards()
    with pytest.raises(LocalProtocolError, match="bootstrap"):
        rig.custody.submit_shard(rig.shares[1], rig.now)
    assert rig.requests(rig.tick(), RequestKind.POLL)  # still polling


def test_initialise_starts_an_immediate_round_and_ignores_older_answers() -> None:
    rig = Rig(with_record=False)
    rig.start()
    old = rig.pending[1]
    rig.now = 101.0
    assert rig.custody.initialise(rig.record, rig.now) is True
    assert of_type(rig.take(), PhaseChanged) == [PhaseChanged(Phase.UNINITIALISED, Phase.RECOVERING, 101.0)]
    assert rig.custody.next_deadline() == 101.0
    polls = rig.requests(rig.tick(101.0), RequestKind.POLL)
    assert sorted(p.keeper_id for p in polls) == [1, 2, 3]
    rig.custody.receive(ResponseReceived(old.request_id, 200, shard_body(rig.shares[1])), 101.1)
    assert rig.custody.effects() == []
    rig.reply_shard(1)
    rig.reply_shard(2)
    assert rig.custody.root_key == rig.key


def _installed_then_found_empty(seed: int) -> Rig:
    """A fresh Nexus whose bootstrap installed the record: the immediate round finds every keeper empty."""
    rig = Rig(with_record=False, seed=seed, jitter=0.2)
    rig.start()
    for keeper_id in (1, 2, 3):
        rig.reply(keeper_id, 404, NOT_FOUND)
    rig.now = 101.0
    assert rig.custody.initialise(rig.record, rig.now)
    rig.take()
    rig.tick(rig.now)
    for keeper_id in (1, 2, 3):
        rig.reply(keeper_id, 404, NOT_FOUND)  # bootstrap deals the shards only after installing the record
    return rig


def test_shards_dealt_reads_every_keeper_at_once_and_rebuilds_the_key_before_the_next_polls() -> None:
    rig = _installed_then_found_empty(seed=5)
    grid = {v.keeper_id: v.next_poll_at for v in rig.custody.keepers()}
    assert rig.custody.shards_dealt(rig.now) == 3
    checks = rig.requests(rig.take())
    assert [(c.kind, c.keeper_id) for c in checks] == [(RequestKind.CHECK, i) for i in (1, 2, 3)]
    assert all(c.deadline <= grid[c.keeper_id] for c in checks), "a read outlives the keeper's next poll"
    rig.reply_shard(1)
    rig.reply_shard(2)
    assert rig.phase() is Phase.READY and rig.custody.root_key == rig.key
    assert rig.now < min(grid.values())
    assert {v.keeper_id: v.next_poll_at for v in rig.custody.keepers()} == grid, "the extra reads moved the grid"


def test_shards_dealt_does_not_move_any_later_poll() -> None:
    """The schedule rule: the extra round at install changes no poll time, then or ever after."""
    without = _installed_then_found_empty(seed=9)
    with_reads = _installed_then_found_empty(seed=9)
    with_reads.custody.shards_dealt(with_reads.now)
    for request in with_reads.requests(with_reads.take()):
        answer_correctly(with_reads, request)
    assert with_reads.phase() is Phase.READY and without.phase() is Phase.RECOVERING
    until = 101.0 + 30 * 10.0
    assert poll_times(with_reads, until, answer_correctly) == poll_times(without, until, answer_correctly)


def test_shards_dealt_reads_only_idle_keepers_and_only_while_recovering() -> None:
    rig = Rig(with_record=False)
    assert rig.custody.shards_dealt(rig.now) == 0  # no record: nothing to read for
    rig.custody.initialise(rig.record, rig.now)
    rig.take()
    rig.start()  # the immediate round is in flight: its answers are news enough
    assert rig.custody.shards_dealt(rig.now) == 0
    assert rig.take() == []
    rig.reply(3, 404, NOT_FOUND)
    assert rig.custody.shards_dealt(rig.now) == 1
    assert [(r.kind, r.keeper_id) for r in rig.requests(rig.take())] == [(RequestKind.CHECK, 3)]
    rig.reply_shard(1)
    rig.reply_shard(2)
    assert rig.phase() is Phase.READY
    assert rig.custody.shards_dealt(rig.now) == 0  # ready: the polls look after the keepers
    assert rig.requests(rig.take()) == []


def test_initialise_is_idempotent_with_the_same_record() -> None:
    rig = Rig(with_record=False)
    assert rig.custody.initialise(rig.record, 100.0)
    rig.take()
    assert rig.custody.initialise(rig.record, 101.0) is False
    assert rig.custody.effects() == []
    rig.recover(1, 2)
    assert rig.custody.initialise(rig.record, rig.now) is False
    assert rig.custody.phase is Phase.READY


def test_initialise_with_a_different_record_needs_replace() -> None:
    rig = Rig()
    rig.recover(1, 2)
    other, _ = seal_key(key_from_int(OTHER_KEY_INT), epoch=8, threshold=2, keeper_ids=(1, 2, 3))
    with pytest.raises(AlreadyInitialised, match="epoch 7"):
        rig.custody.initialise(other, rig.now)
    assert rig.custody.record == rig.record
    assert rig.custody.root_key == rig.key
    assert rig.custody.initialise(other, rig.now, replace=True) is True
    assert rig.custody.record == other
    assert rig.custody.phase is Phase.RECOVERING
    with pytest.raises(LocalProtocolError):
        _ = rig.custody.root_key
    assert rig.custody.next_deadline() == rig.now


@pytest.mark.parametrize(("ids", "threshold"), [((1, 2, 4), 2), ((1, 2, 3), 3), ((1, 2, 3, 4), 2)])
def test_initialise_refuses_a_record_for_other_keepers_or_threshold(ids: tuple[int, ...], threshold: int) -> None:
    rig = Rig(with_record=False)
    record, _ = seal_key(rig.key, epoch=7, threshold=threshold, keeper_ids=ids)
    with pytest.raises(LocalProtocolError, match="configured"):
        rig.custody.initialise(record, 100.0)
    assert rig.custody.phase is Phase.UNINITIALISED


def test_initialise_refuses_a_malformed_record() -> None:
    rig = Rig(with_record=False)
    broken: KeyRecord = msgspec.structs.replace(rig.record, check=b"short")
    with pytest.raises(RemoteProtocolError):
        rig.custody.initialise(broken, 100.0)
    assert rig.custody.record is None


# ---------------------------------------------------------------- operator restore


def test_operator_restore_rebuilds_the_key_and_reseeds_every_keeper() -> None:
    rig = Rig()
    rig.start()
    for keeper_id in (1, 2, 3):
        rig.reply(keeper_id, 404, NOT_FOUND)
    assert rig.custody.submit_shard(rig.shares[1], rig.now) == RestoreProgress(accepted=1, needed=1, ready=False)
    progress = rig.custody.submit_shard(rig.shares[3], rig.now)
    assert progress == RestoreProgress(accepted=2, needed=0, ready=True)
    effects = rig.take()
    [recovered] = of_type(effects, KeyRecovered)
    assert (recovered.source, recovered.keeper_ids) == ("operator", (1, 3))
    assert rig.custody.root_key == rig.key
    pushes = rig.requests(effects, RequestKind.PUSH)
    assert sorted(p.keeper_id for p in pushes) == [1, 2, 3]
    for push in pushes:
        assert pushed_share(push).shard_bytes() == rig.shares[push.keeper_id].secret_bytes()
    with pytest.raises(LocalProtocolError, match="already holds"):
        rig.custody.submit_shard(rig.shares[2], rig.now)


def test_operator_restore_refuses_duplicate_foreign_and_stale_shards() -> None:
    rig = Rig()
    rig.custody.submit_shard(rig.shares[1], rig.now)
    rejected = [
        rig.shares[1],  # duplicate
        Share(9, 7, rig.shares[1].secret_bytes()),  # not a configured keeper id
        share_for(rig.key, epoch=6, threshold=2, id=2),  # another epoch
        share_for(key_from_int(OTHER_KEY_INT), epoch=7, threshold=2, id=2),  # another key
        Share(2, 7, rig.shares[3].secret_bytes()),  # keeper 3's bytes under id 2
    ]
    for share in rejected:
        with pytest.raises(ShareRejected):
            rig.custody.submit_shard(share, rig.now)
    assert rig.custody.phase is Phase.RECOVERING
    assert rig.custody.shards_needed == 1
    assert rig.custody.submit_shard(rig.shares[2], rig.now).ready


def test_operator_shards_add_to_verified_keeper_shards() -> None:
    rig = Rig()
    rig.start()
    rig.reply_shard(1)
    rig.reply(2, 404, NOT_FOUND)
    # keeper 3 still has its poll in flight: it will be handled by its answer.
    progress = rig.custody.submit_shard(rig.shares[3], rig.now)
    assert progress.ready and progress.accepted == 2
    effects = rig.take()
    assert of_type(effects, KeyRecovered)[0].keeper_ids == (1, 3)
    assert sorted(p.keeper_id for p in rig.requests(effects, RequestKind.PUSH)) == [2]
    [push3] = rig.requests(rig.reply(3, 404, NOT_FOUND))
    assert (push3.keeper_id, push3.kind) == (3, RequestKind.PUSH)


# ---------------------------------------------------------------- export


def test_export_shards_equals_deal() -> None:
    rig = Rig(ids=(2, 5, 9, 11), threshold=3)
    with pytest.raises(LocalProtocolError):
        rig.custody.export_shards()
    rig.recover(2, 5, 9)
    assert rig.custody.export_shards() == deal(rig.key, epoch=7, threshold=3, ids=[2, 5, 9, 11])
    assert rig.custody.export_shards() == rig.shares


def test_custody_works_with_a_constant_random_source() -> None:
    custody = NexusCustody([1], threshold=1, schedule=PollSchedule(5.0, 0.1, 1.0), rng=ConstantRandom(0.0), now=0.0)
    custody.handle_timer(0.0)
    [poll] = of_type(custody.effects(), SendRequest)
    assert [v.next_poll_at for v in custody.keepers()] == [4.5]  # the earliest jitter
    assert poll.deadline == 1.0


def test_forget_leaves_a_consistent_machine() -> None:
    rig = Rig()
    rig.recover(1, 2)
    rig.custody.forget(rig.now)
    assert rig.custody.phase is not Phase.READY
    rig.reply(3, 404, NOT_FOUND)  # an answer still on its way must not raise


def test_a_stale_empty_answer_does_not_lead_to_a_push_when_the_keeper_was_seeded_meanwhile() -> None:
    rig = Rig()
    rig.start()
    rig.reply(3, 404, NOT_FOUND)  # bootstrap has not reached keeper 3 yet
    rig.reply_shard(1)
    effects = rig.reply_shard(2)
    [check] = rig.requests(effects)
    assert (check.keeper_id, check.kind) == (3, RequestKind.CHECK)
    effects = rig.reply_shard(3)  # ... and now it has
    assert rig.requests(effects) == []
    assert of_type(effects, KeeperReseeded) == []
    assert rig.state(3) is KeeperState.HOLDING
    assert rig.view(3).reseeds == 0


@pytest.mark.parametrize("ready", [True, False], ids=["ready", "recovering"])
def test_a_shard_of_a_newer_epoch_is_left_alone(ready: bool) -> None:
    """Several Nexus instances: after `bootstrap --force` through another one, keepers hold shards of a
    newer key.  This machine, still on the old record, must not overwrite them with its old shards."""
    rig = Rig()
    if ready:
        rig.recover(1, 2)
    else:
        rig.start()
    newer = share_for(key_from_int(OTHER_KEY_INT), epoch=rig.record.epoch + 1, threshold=2, id=3)
    effects = rig.reply_shard(3, newer)
    assert rig.requests(effects) == []  # no push
    assert of_type(effects, KeeperMisbehaved) == []
    view = rig.view(3)
    assert view.state is KeeperState.NEWER_EPOCH
    assert f"epoch {rig.record.epoch + 1}" in view.detail
    assert rig.custody.phase is (Phase.READY if ready else Phase.RECOVERING)
    # The machine moves on once it is given the newer record (what the app does when it loads it).
    assert rig.custody.initialise(
        seal_key(key_from_int(OTHER_KEY_INT), epoch=rig.record.epoch + 1, threshold=2, keeper_ids=[1, 2, 3])[0],
        rig.now,
        replace=True,
    )


# ---------------------------------------------------------------- epochs the deployment never had (issue 14, L2)

GARBAGE_EPOCH = 2**63 - 1  # the largest epoch the wire allows


def driver_confirms_on_newer_key_seen(rig: Rig, effects: list[Effect]) -> list[Effect]:
    """What a Nexus that is the only writer of its record does: every newer epoch is garbage at once."""
    for seen in of_type(effects, NewerKeySeen):
        rig.custody.confirm_record(seen.at, rig.now)
        effects = effects + rig.take()
    return effects


def test_a_shard_labelled_with_an_epoch_no_record_had_does_not_freeze_custody() -> None:
    """The bootstrap identity contributed keeper 3 a shard labelled 2^63-1: it is reported and re-seeded."""
    rig = Rig()
    rig.recover(1, 2)
    garbage = share_for(rig.key, epoch=GARBAGE_EPOCH, threshold=2, id=3)
    effects = driver_confirms_on_newer_key_seen(rig, rig.reply_shard(3, garbage))
    assert of_type(effects, NewerKeySeen) == [NewerKeySeen(3, GARBAGE_EPOCH, rig.now)]
    [misbehaved] = of_type(effects, KeeperMisbehaved)
    assert f"epoch {GARBAGE_EPOCH}, which this deployment never had" in misbehaved.problem
    [push] = rig.requests(effects)
    assert pushed_share(push).shard_bytes() == rig.shares[3].secret_bytes()
    assert pushed_share(push).epoch == rig.record.epoch
    rig.reply(3, 200)
    effects = rig.reply_shard(3)
    assert of_type(effects, KeeperReseeded) == [KeeperReseeded(3, rig.now, KeeperState.WRONG_SHARD)]
    assert rig.state(3) is KeeperState.HOLDING and rig.custody.redundancy == 1


def test_garbage_epochs_on_two_keepers_are_repaired_before_a_restart_needs_them() -> None:
    """Before the fix, a Nexus restarted after keepers 2 and 3 got such shards could only be restored by hand."""
    rig = Rig()
    rig.recover(1, 2, 3)
    for keeper_id in (2, 3):
        while keeper_id not in rig.pending:
            rig.tick()
        garbage = share_for(key_from_int(OTHER_KEY_INT), epoch=GARBAGE_EPOCH, threshold=2, id=keeper_id)
        effects = driver_confirms_on_newer_key_seen(rig, rig.reply_shard(keeper_id, garbage))
        assert [r.kind for r in rig.requests(effects)] == [RequestKind.PUSH]
        rig.reply(keeper_id, 200)
        rig.reply_shard(keeper_id)  # the read-back
    restarted = Rig()  # the same record, a new machine: all it has are the keepers
    restarted.start()
    restarted.reply_shard(2)
    effects = restarted.reply_shard(3)
    assert of_type(effects, KeyRecovered) and restarted.custody.root_key == restarted.key


def test_an_earlier_epoch_the_record_never_had_is_garbage_at_once() -> None:
    key = key_from_int(SAMPLE_KEY_INT)
    first, _ = seal_key(key, epoch=4, threshold=2, keeper_ids=(1, 2, 3))
    record = seal_key(key, epoch=7, threshold=2, keeper_ids=(1, 2, 3))[0].succeeding(first)
    assert record.history == ((0, 4),)
    rig = Rig(record=record)
    rig.recover(1, 2)
    effects = rig.reply_shard(3, share_for(key, epoch=5, threshold=2, id=3))
    assert "epoch 5, which this deployment never had" in of_type(effects, KeeperMisbehaved)[0].problem
    assert of_type(effects, NewerKeySeen) == []
    assert [r.kind for r in rig.requests(effects)] == [RequestKind.PUSH]
    rig.reply(3, 200)  # the push
    rig.reply_shard(3)  # its read-back
    while 3 not in rig.pending:
        rig.tick()
    effects = rig.reply_shard(3, share_for(key, epoch=3, threshold=2, id=3))
    assert "stale shard of epoch 3" in of_type(effects, KeeperMisbehaved)[0].problem


def test_confirm_record_refutes_only_what_was_seen_before_the_check_began() -> None:
    rig = Rig()
    rig.recover(1, 2)
    seen_at = rig.now + 0.01
    rig.reply_shard(3, share_for(rig.key, epoch=GARBAGE_EPOCH, threshold=2, id=3))
    # A read of the store that began before the keeper answered proves nothing about that answer.
    assert rig.custody.confirm_record(seen_at - 0.005, rig.now) == 0
    assert rig.custody.effects() == [] and rig.state(3) is KeeperState.NEWER_EPOCH
    # A keeper asked again meanwhile: its answer is the news, not the old sighting.
    while 3 not in rig.pending:
        rig.tick()
    assert rig.custody.confirm_record(seen_at, rig.now) == 0
    effects = rig.reply_shard(3, share_for(rig.key, epoch=GARBAGE_EPOCH, threshold=2, id=3))
    assert of_type(effects, NewerKeySeen)
    assert rig.custody.confirm_record(rig.now, rig.now) == 1
    assert [r.kind for r in rig.requests(rig.take())] == [RequestKind.PUSH]


def test_confirm_record_needs_a_record() -> None:
    rig = Rig(with_record=False)
    with pytest.raises(LocalProtocolError, match="bootstrap"):
        rig.custody.confirm_record(rig.now, rig.now)


def test_a_newer_epoch_is_not_overwritten_after_an_operator_restore() -> None:
    """Deliberate: a restore pushes to every keeper not known to hold its shard, except one holding a newer epoch."""
    rig = Rig()
    rig.start()
    rig.reply_shard(3, share_for(key_from_int(OTHER_KEY_INT), epoch=8, threshold=2, id=3))
    rig.reply(1, 404)
    rig.reply(2, 404)
    rig.custody.submit_shard(rig.shares[1], rig.now)
    rig.custody.submit_shard(rig.shares[2], rig.now)
    assert sorted(r.keeper_id for r in rig.requests(rig.take(), RequestKind.PUSH)) == [1, 2]


def test_next_deadline_is_a_pure_query() -> None:
    rig = Rig()
    rig.start()
    timers = list(rig.custody._timers._heap)
    for _ in range(3):
        assert rig.custody.next_deadline() == 102.0
    assert rig.custody._timers._heap == timers
    rig.reply_shard(1)  # its deadline is cancelled: the next one is still the others'
    assert rig.custody.next_deadline() == 102.0
    rig.reply_shard(2)
    rig.reply_shard(3)
    assert rig.custody.next_deadline() == min(v.next_poll_at for v in rig.custody.keepers())


def test_request_failures_carry_their_kind_into_the_decision() -> None:
    rig = Rig()
    rig.start()
    for keeper_id, kind in ((1, FailureKind.REFUSED), (2, FailureKind.PEER_IDENTITY), (3, FailureKind.TLS)):
        effects = rig.fail(keeper_id, f"{kind.value} failure", kind)
        assert rig.state(keeper_id) is KeeperState.UNREACHABLE
        assert rig.view(keeper_id).detail == f"{kind.value} failure"
        assert [type(e) for e in effects] == [KeeperStateChanged]  # no push, no report
