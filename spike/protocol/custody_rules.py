"""Every decision of the Nexus custody machine, as data.

The machine classifies each answer once (`spike.protocol.answers.classify`)
into an `Outcome`, then looks up one rule in `TABLE` by
``(phase, request kind, outcome)``: the keeper's next state, whether it now
needs its shard, and what to do (`Do`).  Nothing else decides what happens to
a keeper after an answer: the machine only carries the rule out.  The way h2
keeps ``(state, input) -> (side effect, next state)`` in one dictionary and
h11 keeps "everything that affects the state machine" in ``_state.py``.

`AFTER_REBUILD` is the one other decision: what happens to each idle keeper
at the moment the key is rebuilt.

The tables are total: every combination of the enums has an entry, and the
ones the machine can never reach say why (`Rule.possible` is False).  The
tests walk every reachable row and check the document generated from these
tables (``docs/custody-rules.md``, `markdown()`) against it.  Key rotation
came in this way: request kinds (deal, forget, clear) and outcomes (lacks
the new shard, removed, cleared) with their rows; how a rotation moves from
step to step is the other table, `spike.protocol.rotation_steps.STEPS`.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import Enum

from . import rotation_steps
from .effects import KeeperState, KeySource, Phase, RequestKind


class Outcome(Enum):
    """What one answer, or its absence, says about a keeper (`MEANING` says it in words)."""

    HOLDING = "holding"
    EMPTY = "empty"
    WRONG_SHARD = "wrong shard"
    STALE_EPOCH = "stale epoch"
    UNKNOWN_EPOCH = "unknown epoch"
    NEWER_EPOCH = "newer epoch"
    LACKS_NEW = "lacks the new shard"
    REMOVED = "removed"
    CLEARED = "cleared"
    UNVERIFIABLE = "unverifiable"
    MALFORMED = "malformed"
    ERROR_STATUS = "error status"
    ACCEPTED = "accepted"
    REFUSED = "refused"
    UNREACHABLE = "unreachable"
    TIMEOUT = "timeout"
    IMPOSTOR = "impostor"


#: Which answers each outcome stands for (`spike.protocol.answers.classify` decides).
MEANING: Mapping[Outcome, str] = {
    Outcome.HOLDING: "200 with its own shard of the epoch asked for, matching its commitment (or, asked for the "
    "record's epoch during a rotation, its shard of the new epoch); it may say it also holds a shard to retire",
    Outcome.EMPTY: "404, or 400 (how SPIKE's Go keeper says it is empty)",
    Outcome.WRONG_SHARD: "200 with a shard that fails its commitment, or is labelled as another keeper's",
    Outcome.STALE_EPOCH: "200 with a shard labelled with an earlier epoch the deployment had",
    Outcome.UNKNOWN_EPOCH: "200 with a shard labelled with an epoch the deployment never had: an earlier one "
    "not in the record's history, or a newer one after the driver confirmed its record (`confirm_record`)",
    Outcome.NEWER_EPOCH: "200 with a shard labelled with an epoch above every epoch known (the record's, a "
    "rotation's, the high-water mark), not (yet) known to be garbage",
    Outcome.LACKS_NEW: "200 with its own shard of the record's epoch, when asked for its shard of the epoch "
    "being dealt: it lacks the new one",
    Outcome.REMOVED: "200 from a keeper no longer in the key's set (a rekey removed it): it holds what it must not",
    Outcome.CLEARED: "404 (or 400) from a keeper no longer in the key's set: it holds nothing",
    Outcome.UNVERIFIABLE: "200 with a well-formed shard, and no key record to check it against",
    Outcome.MALFORMED: "200 with a body that is not a shard (bad JSON, wrong length, out of the field)",
    Outcome.ERROR_STATUS: "any other status to a shard read (401, 500, 302, ...)",
    Outcome.ACCEPTED: "200 to a push",
    Outcome.REFUSED: "any other status to a push",
    Outcome.UNREACHABLE: "no answer: connection refused, closed or reset, no route, bad HTTP, anything else",
    Outcome.TIMEOUT: "no answer before the request's deadline",
    Outcome.IMPOSTOR: "no answer: the TLS handshake failed or the peer's SPIFFE ID is not this keeper's",
}


READ_OUTCOMES = frozenset(
    {
        Outcome.HOLDING,
        Outcome.EMPTY,
        Outcome.WRONG_SHARD,
        Outcome.STALE_EPOCH,
        Outcome.UNKNOWN_EPOCH,
        Outcome.NEWER_EPOCH,
        Outcome.LACKS_NEW,
        Outcome.REMOVED,
        Outcome.CLEARED,
        Outcome.UNVERIFIABLE,
        Outcome.MALFORMED,
        Outcome.ERROR_STATUS,
    }
)
PUSH_OUTCOMES = frozenset({Outcome.ACCEPTED, Outcome.REFUSED})
NO_ANSWER = frozenset({Outcome.UNREACHABLE, Outcome.TIMEOUT, Outcome.IMPOSTOR})
READS = frozenset({RequestKind.POLL, RequestKind.CHECK, RequestKind.CONFIRM})
REGULAR = frozenset({RequestKind.POLL, RequestKind.CHECK})  # reads whose answer may lead to a push
#: Requests that change what a keeper holds: their answer is accepted or refused.
WRITES = frozenset({RequestKind.PUSH, RequestKind.DEAL, RequestKind.FORGET, RequestKind.CLEAR})


def outcomes_of(kind: RequestKind) -> frozenset[Outcome]:
    """The outcomes an answer to a request of `kind` can be classified into."""
    return (PUSH_OUTCOMES if kind in WRITES else READ_OUTCOMES) | NO_ANSWER


class Do(Enum):
    """One thing a rule does, in the order the rule lists them (after the state change)."""

    COUNT_EMPTY = "count an empty answer"
    COUNT_FAILURE = "count a failure"
    REPORT = "report the keeper (KeeperMisbehaved)"
    REPORT_NEWER = "report NewerKeySeen; remember the sighting"
    RESEEDED = "if it accepted a push not yet seen: report KeeperReseeded"
    COLLECT = "use the shard towards the key"
    KEEP_UNRECORDED = "keep an unlabelled shard: SPIKE's Go bootstrap's key may be adopted from it (adopt_unrecorded)"
    PUSH = "push its shard (PUSH)"
    CONFIRM = "read it back (CONFIRM)"
    CHECK = "read it again (CHECK)"
    DEAL = "deal its shard of the new epoch, keeping its current one (DEAL)"
    RETIRE = "if it said it also holds a shard to retire: tell it to forget that one (FORGET)"
    CLEAR = "tell it to forget every shard (CLEAR)"
    RETIRED = "report ShardRetired"
    LEAVE = "take it off the poll list (report KeeperLeft)"


@dataclass(frozen=True, slots=True)
class Rule:
    """What follows one answer: the keeper's next state, whether it needs its shard, what to do.

    `state` None leaves the state (and the per-outcome answer counts) as they
    were; `needs_seed` None leaves that as it was.  A rule that is not
    `possible` covers combinations the machine never reaches; `why` says
    why, and the machine ignores such an answer.
    """

    phases: frozenset[Phase]
    kinds: frozenset[RequestKind]
    outcomes: frozenset[Outcome]
    state: KeeperState | None
    needs_seed: bool | None
    then: tuple[Do, ...]
    why: str
    possible: bool = True


Key = tuple[Phase, RequestKind, Outcome]

ANY_PHASE = frozenset(Phase)
WITH_RECORD = frozenset({Phase.RECOVERING, Phase.READY})
WRONG = frozenset({Outcome.WRONG_SHARD, Outcome.STALE_EPOCH, Outcome.UNKNOWN_EPOCH})
_UNINITIALISED = frozenset({Phase.UNINITIALISED})
_RECOVERING = frozenset({Phase.RECOVERING})
_READY = frozenset({Phase.READY})
_POLL = frozenset({RequestKind.POLL})
_PUSH = frozenset({RequestKind.PUSH, RequestKind.DEAL})  # both give it a shard: read back at once
_CONFIRM = frozenset({RequestKind.CONFIRM})
_FORGET = frozenset({RequestKind.FORGET})
_CLEAR = frozenset({RequestKind.CLEAR})


def _rule(
    phases: frozenset[Phase],
    kinds: frozenset[RequestKind],
    outcomes: Iterable[Outcome],
    state: KeeperState | None,
    needs_seed: bool | None,
    then: tuple[Do, ...],
    why: str,
) -> Rule:
    return Rule(phases, kinds, frozenset(outcomes), state, needs_seed, then, why)


def _never(phases: frozenset[Phase], kinds: frozenset[RequestKind], outcomes: Iterable[Outcome], why: str) -> Rule:
    return Rule(phases, kinds, frozenset(outcomes), None, None, (), why, possible=False)


# The combinations the machine never reaches.  Their keys are taken first; the rules below cover
# every other key exactly once (checked when the table is built).
CANNOT_HAPPEN: tuple[Rule, ...] = (
    _never(
        _UNINITIALISED,
        frozenset(RequestKind) - _POLL,
        PUSH_OUTCOMES | READ_OUTCOMES | NO_ANSWER,
        "only polls are sent without a key record: the others follow a key, `initialise` drops every "
        "request in flight, and no phase leads back to uninitialised",
    ),
    _never(
        _UNINITIALISED,
        _POLL,
        {Outcome.HOLDING, Outcome.NEWER_EPOCH, Outcome.LACKS_NEW, Outcome.REMOVED, Outcome.CLEARED, *WRONG},
        "without a key record no shard is checked and no keeper has left a set: a well-formed shard is "
        "unverifiable, a 404 is empty",
    ),
    _never(WITH_RECORD, READS, (Outcome.UNVERIFIABLE,), "with a key record every shard is checked"),
    _never(
        WITH_RECORD,
        _CONFIRM,
        (Outcome.REMOVED, Outcome.CLEARED),
        "a keeper leaves the sets only through a commit, `initialise` or the end of a rotation, each of which drops "
        "its request in flight, and nothing is pushed to a keeper outside them: a read-back never meets a removed one",
    ),
)

RULES: tuple[Rule, ...] = (
    # ---------------------------------------------------------------- no answer
    _rule(
        ANY_PHASE,
        frozenset(RequestKind),
        NO_ANSWER,
        KeeperState.UNREACHABLE,
        None,
        (Do.COUNT_FAILURE,),
        "no answer says nothing about what it holds: keep polling, push nothing",
    ),
    # ---------------------------------------------------------------- pushes
    _rule(
        WITH_RECORD,
        _PUSH,
        (Outcome.ACCEPTED,),
        None,
        None,
        (Do.CONFIRM,),
        "read the shard back at once: the re-seed counts when a read shows it",
    ),
    _rule(
        WITH_RECORD,
        _PUSH,
        (Outcome.REFUSED,),
        None,
        None,
        (Do.REPORT,),
        "pushed again after its next poll, if that poll shows it still lacks its shard",
    ),
    # ---------------------------------------------------------------- reads: its own shard
    _rule(
        _RECOVERING,
        REGULAR,
        (Outcome.HOLDING,),
        KeeperState.HOLDING,
        False,
        (Do.RESEEDED, Do.COLLECT, Do.RETIRE),
        "a verified shard: the key is rebuilt from the first t; a shard of an epoch no longer in play is let go",
    ),
    _rule(
        _RECOVERING,
        _CONFIRM,
        (Outcome.HOLDING,),
        KeeperState.HOLDING,
        False,
        (Do.RESEEDED, Do.COLLECT),
        "a verified shard: the key is rebuilt from the first t",
    ),
    _rule(
        _READY,
        REGULAR,
        (Outcome.HOLDING,),
        KeeperState.HOLDING,
        False,
        (Do.RESEEDED, Do.RETIRE),
        "all is well; a shard of an epoch no longer in play is let go",
    ),
    _rule(
        _READY,
        _CONFIRM,
        (Outcome.HOLDING,),
        KeeperState.HOLDING,
        False,
        (Do.RESEEDED,),
        "all is well (anything to retire waits for its next poll: at most three requests per interval)",
    ),
    # ---------------------------------------------------------------- reads: a rotation is being dealt
    _rule(
        _RECOVERING,
        READS,
        (Outcome.LACKS_NEW,),
        KeeperState.HOLDING,
        False,
        (Do.RESEEDED,),
        "a read sent before the key was let go: its next poll asks for the record's epoch and counts it",
    ),
    _rule(
        _READY,
        REGULAR,
        (Outcome.LACKS_NEW,),
        KeeperState.HOLDING,
        False,
        (Do.RESEEDED, Do.DEAL),
        "it holds its current shard, checked just now: dealt the new one, with the current one kept beside it",
    ),
    _rule(
        _READY,
        _CONFIRM,
        (Outcome.LACKS_NEW,),
        KeeperState.HOLDING,
        None,
        (Do.REPORT,),
        "it accepted its new shard and does not show it: reported; its next poll deals it again",
    ),
    # ---------------------------------------------------------------- reads: a keeper a rekey removed
    _rule(
        WITH_RECORD,
        REGULAR,
        (Outcome.REMOVED,),
        KeeperState.REMOVED,
        None,
        (Do.CLEAR,),
        "no longer in the key's set: told to forget every shard it holds",
    ),
    _rule(
        WITH_RECORD,
        REGULAR,
        (Outcome.CLEARED,),
        None,
        None,
        (Do.LEAVE,),
        "it holds nothing, and the operator removed it: it leaves the poll list (the only way one ever does)",
    ),
    # ---------------------------------------------------------------- retiring
    _rule(WITH_RECORD, _FORGET, (Outcome.ACCEPTED,), None, None, (Do.RETIRED,), "that shard is gone"),
    _rule(
        WITH_RECORD,
        _FORGET,
        (Outcome.REFUSED,),
        None,
        None,
        (Do.REPORT,),
        "it cannot forget (an older spike keeper): reported; asked again after its next poll",
    ),
    _rule(
        WITH_RECORD,
        _CLEAR,
        (Outcome.ACCEPTED,),
        None,
        None,
        (Do.RETIRED, Do.LEAVE),
        "it holds nothing of this deployment any more: it leaves the poll list",
    ),
    _rule(
        WITH_RECORD,
        _CLEAR,
        (Outcome.REFUSED,),
        None,
        None,
        (Do.REPORT, Do.LEAVE),
        "it cannot forget (SPIKE's Go keeper, an older spike keeper): reported, left to the operator, no longer polled",
    ),
    # ---------------------------------------------------------------- reads: no shard
    _rule(
        frozenset({Phase.UNINITIALISED, Phase.RECOVERING}),
        REGULAR,
        (Outcome.EMPTY,),
        KeeperState.EMPTY,
        True,
        (Do.COUNT_EMPTY,),
        "seeded once the key is rebuilt (after a fresh read: bootstrap may seed it meanwhile)",
    ),
    _rule(
        _READY,
        REGULAR,
        (Outcome.EMPTY,),
        KeeperState.EMPTY,
        True,
        (Do.COUNT_EMPTY, Do.PUSH),
        "re-seeded at once",
    ),
    _rule(
        WITH_RECORD,
        _CONFIRM,
        (Outcome.EMPTY,),
        KeeperState.EMPTY,
        None,
        (Do.COUNT_EMPTY, Do.REPORT),
        "it accepted its shard and does not hold it: reported; its next poll decides",
    ),
    # ---------------------------------------------------------------- reads: not its shard
    _rule(
        _RECOVERING,
        REGULAR,
        WRONG,
        KeeperState.WRONG_SHARD,
        True,
        (Do.REPORT,),
        "left out of the key; re-seeded once the key is rebuilt",
    ),
    _rule(
        _READY,
        REGULAR,
        WRONG,
        KeeperState.WRONG_SHARD,
        True,
        (Do.REPORT, Do.PUSH),
        "re-seeded at once with its own shard",
    ),
    _rule(
        WITH_RECORD,
        _CONFIRM,
        WRONG,
        KeeperState.WRONG_SHARD,
        None,
        (Do.REPORT,),
        "something else replaced the shard just pushed: reported; its next poll decides",
    ),
    _rule(
        frozenset({Phase.UNINITIALISED, Phase.RECOVERING}),
        REGULAR,
        (Outcome.MALFORMED,),
        KeeperState.BAD_ANSWER,
        True,
        (Do.REPORT,),
        "it says it holds a shard and shows garbage: it lacks its shard; seeded once the key is rebuilt",
    ),
    _rule(
        _READY,
        REGULAR,
        (Outcome.MALFORMED,),
        KeeperState.BAD_ANSWER,
        True,
        (Do.REPORT, Do.PUSH),
        "it says it holds a shard and shows garbage: it lacks its shard, re-seeded at once",
    ),
    _rule(
        WITH_RECORD,
        _CONFIRM,
        (Outcome.MALFORMED,),
        KeeperState.BAD_ANSWER,
        None,
        (Do.REPORT,),
        "reported; its next poll decides",
    ),
    _rule(
        ANY_PHASE,
        READS,
        (Outcome.ERROR_STATUS,),
        KeeperState.BAD_ANSWER,
        None,
        (Do.REPORT,),
        "an error status shows nothing of what it holds, like no answer: reported, no push",
    ),
    # ---------------------------------------------------------------- reads: a shard this record cannot judge
    _rule(
        WITH_RECORD,
        READS,
        (Outcome.NEWER_EPOCH,),
        KeeperState.NEWER_EPOCH,
        False,
        (Do.REPORT_NEWER,),
        "another Nexus instance's newer key, or garbage: left alone until the driver loads the newer "
        "record or confirms its own (then it is an unknown epoch)",
    ),
    _rule(
        _UNINITIALISED,
        _POLL,
        (Outcome.UNVERIFIABLE,),
        KeeperState.UNVERIFIED,
        False,
        (Do.KEEP_UNRECORDED,),
        "checked once bootstrap installs a key record, or adopted with SPIKE's Go bootstrap's verification",
    ),
)


class Seen(Enum):
    """What a keeper's latest answers showed, as far as the moment the key is rebuilt cares."""

    HOLDING = "holding its shard"
    NEWER = "a newer epoch's shard"
    NEEDS_SHARD = "lacking its shard"
    UNSURE = "nothing about its shard"  # not answered yet, unreachable, an error status


# When the key is rebuilt, each keeper without a request in flight (one in flight is handled by its
# answer): (where the shards came from, what the keeper showed) -> what to do, and why.
AFTER_REBUILD: Mapping[tuple[KeySource, Seen], tuple[Do | None, str]] = {
    (KeySource.KEEPERS, Seen.HOLDING): (None, "nothing to do"),
    (KeySource.KEEPERS, Seen.NEWER): (None, "not this Nexus's to overwrite"),
    (KeySource.KEEPERS, Seen.NEEDS_SHARD): (Do.CHECK, "that answer may predate a bootstrap that seeded it: ask again"),
    (KeySource.KEEPERS, Seen.UNSURE): (None, "its next poll decides"),
    (KeySource.OPERATOR, Seen.HOLDING): (None, "nothing to do"),
    (KeySource.OPERATOR, Seen.NEWER): (None, "not this Nexus's to overwrite"),
    (KeySource.OPERATOR, Seen.NEEDS_SHARD): (Do.PUSH, "re-seeded at once"),
    (KeySource.OPERATOR, Seen.UNSURE): (Do.PUSH, "after a restore every keeper is presumably empty"),
}


def _build() -> dict[Key, Rule]:
    table: dict[Key, Rule] = {}
    for rule in CANNOT_HAPPEN:
        for key in itertools.product(rule.phases, rule.kinds, rule.outcomes):
            if key[2] not in outcomes_of(key[1]):
                continue  # written for several kinds at once: each kind gets the outcomes it has
            if key in table:
                raise AssertionError(f"{key} cannot happen twice")
            table[key] = rule
    impossible = set(table)
    for rule in RULES:
        for key in itertools.product(rule.phases, rule.kinds, rule.outcomes):
            if key[2] not in outcomes_of(key[1]):
                raise AssertionError(f"{key}: a {key[1].value} answer is never {key[2].value}")
            if key in impossible:
                continue  # a row written for "any" phase or kind covers only what can happen
            if key in table:
                raise AssertionError(f"{key} is decided by two rules")
            table[key] = rule
    missing = [(p, k, o) for p in Phase for k in RequestKind for o in outcomes_of(k) if (p, k, o) not in table]
    if missing:
        raise AssertionError(f"no rule for {missing}")
    return table


#: ``(phase, request kind, outcome) -> rule``, for every combination the enums allow.
TABLE: Mapping[Key, Rule] = _build()


# ---------------------------------------------------------------------------- the document


def _names(values: Iterable[Enum], every: Iterable[Enum], every_name: str) -> str:
    chosen = list(values)
    if set(chosen) == set(every):
        return every_name
    order = list(every)
    return ", ".join(v.value for v in sorted(chosen, key=order.index))


def _row(cells: Iterable[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def markdown() -> str:
    """The rules as the Markdown tables of ``docs/custody-rules.md`` (a test checks they agree)."""
    lines = ["| answer | stands for | to |", "|---|---|---|"]
    for outcome in Outcome:
        kinds = [k for k in RequestKind if outcome in outcomes_of(k)]
        lines.append(_row((outcome.value, MEANING[outcome], _names(kinds, RequestKind, "any request"))))
    lines += [
        "",
        "Then one rule decides, by phase, request and answer:",
        "",
        "| phase | request | answer | keeper becomes | needs its shard | then | why |",
        "|---|---|---|---|---|---|---|",
    ]
    for rule in RULES:
        possible_kinds = {k for k in rule.kinds if any(o in outcomes_of(k) for o in rule.outcomes)}
        lines.append(
            _row(
                (
                    _names(rule.phases, Phase, "any"),
                    _names(possible_kinds, RequestKind, "any"),
                    _names(rule.outcomes, Outcome, "any"),
                    "unchanged" if rule.state is None else f"`{rule.state.name}`",
                    {None: "unchanged", True: "yes", False: "no"}[rule.needs_seed],
                    "; ".join(do.value for do in rule.then) or "nothing",
                    rule.why,
                )
            )
        )
    lines += ["", "Combinations that cannot happen (an answer that hit one would be ignored):", ""]
    lines += ["| phase | request | answer | why not |", "|---|---|---|---|"]
    for rule in CANNOT_HAPPEN:
        lines.append(
            _row(
                (
                    _names(rule.phases, Phase, "any"),
                    _names(rule.kinds, RequestKind, "any"),
                    _names(rule.outcomes, Outcome, "any"),
                    rule.why,
                )
            )
        )
    lines += ["", "When the key is rebuilt, each keeper with no request in flight:", ""]
    lines += ["| key rebuilt from | keeper last showed | then | why |", "|---|---|---|---|"]
    for (source, seen), (do, why) in AFTER_REBUILD.items():
        lines.append(_row((source.value, seen.value, "nothing" if do is None else do.value, why)))
    lines += ["", "How a key rotation moves on ([key-lifecycle.md](key-lifecycle.md)); any other call is refused:", ""]
    return "\n".join(lines) + "\n" + rotation_steps.markdown()
