"""Classify what a keeper answered, once, into an `Outcome` (plus the words for reports).

Pure functions of the request kind, the answer and what the machine knows
(the key record, a rotation's record, the epoch asked for): no keeper
history, no phase.  What to *do* about an outcome is the business of the
rules table (`spike.protocol.custody_rules`), never of this module.  A
peer's garbage becomes an outcome here; nothing a keeper sends makes these
functions raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .custody_rules import WRITES, Outcome
from .effects import RequestKind
from .errors import RemoteProtocolError, ShamirError
from .events import Answer, FailureKind, RequestFailed
from .material import Share
from .record import KeyRecord
from .wire import ShardAnswer, decode

# Failures that mean the peer could not prove it is the keeper, rather than that nobody answered.
_IMPOSTOR = frozenset({FailureKind.TLS, FailureKind.PEER_IDENTITY})
EMPTY_STATUSES = (404, 400)  # 400 is how SPIKE's Go keeper says it holds no shard


@dataclass(frozen=True, slots=True)
class Classified:
    """One answer, classified: the outcome, the words for the keeper's state and for a report."""

    outcome: Outcome
    detail: str = ""  # why the keeper is in its state (KeeperStateChanged.detail, KeeperView.detail)
    problem: str = ""  # what it did wrong, if the rule reports it (KeeperMisbehaved.problem)
    # The verified shard, when HOLDING or LACKS_NEW; an unlabelled one (epoch 0), when UNVERIFIABLE.
    share: Share | None = field(default=None, repr=False)
    epoch: int | None = None  # the epoch the shard was labelled with, when NEWER_EPOCH or UNKNOWN_EPOCH
    retire: int | None = None  # an epoch it says it also holds that is no longer in play (HOLDING)
    slots: int | None = None  # what a decoded shard answer said it keeps (None: one, as SPIKE's keeper)
    holds: frozenset[int] | None = None  # epochs the answer shows it holds, verified (None: it shows nothing)


#: What the machine's own timer says when a request's deadline passes.
TIMED_OUT = Classified(Outcome.TIMEOUT, "no answer before the deadline")
_NOTHING: frozenset[int] = frozenset()


def classify(
    kind: RequestKind,
    answer: Answer,
    record: KeyRecord | None,
    keeper_id: int,
    *,
    pending: KeyRecord | None = None,
    highest: int = 0,
    asked: int | None = None,
    member: bool = True,
) -> Classified:
    """What `answer` to a request of `kind` to keeper `keeper_id` says, judged against what the machine knows.

    `record` is the key record in force; `pending` the record of a rotation
    in play (stored); `highest` the highest epoch the deployment ever used;
    `asked` the epoch the read asked for; `member` whether the keeper is in
    the set of `record` or `pending` (a rekey may have removed it).
    """
    if isinstance(answer, RequestFailed):
        if answer.kind is FailureKind.TIMEOUT:
            return Classified(Outcome.TIMEOUT, answer.reason)
        if answer.kind in _IMPOSTOR:
            return Classified(Outcome.IMPOSTOR, answer.reason)
        return Classified(Outcome.UNREACHABLE, answer.reason)
    status = answer.status
    if kind in WRITES:
        if status == 200:
            return Classified(Outcome.ACCEPTED)
        what = "its shard" if kind in (RequestKind.PUSH, RequestKind.DEAL) else "to forget"
        return Classified(Outcome.REFUSED, problem=f"refused {what} with HTTP {status}")
    if status in EMPTY_STATUSES:
        if record is not None and not member:
            return Classified(Outcome.CLEARED, f"HTTP {status}: holds nothing", holds=_NOTHING)
        still = "still empty right after accepting its shard" if kind is RequestKind.CONFIRM else ""
        return Classified(Outcome.EMPTY, f"HTTP {status}", still, holds=_NOTHING)
    if status != 200:
        return Classified(Outcome.ERROR_STATUS, f"HTTP {status}", f"answered HTTP {status} to a shard read")
    try:
        body = decode(answer.body, ShardAnswer)
        bytes_ = body.shard_bytes()
        Share(keeper_id, 0, bytes_)  # a shard is an element of the field, whatever its label
    except (RemoteProtocolError, ShamirError) as exc:
        return Classified(Outcome.MALFORMED, "malformed shard answer", f"malformed shard answer: {exc}", holds=_NOTHING)
    slots = body.slots or 1  # SPIKE's keeper says nothing: it keeps one shard
    if record is None:
        # An unlabelled shard (SPIKE's Go bootstrap deals them) may be adopted with Go bootstrap's key
        # (`NexusCustody.adopt_unrecorded`): it is kept, at epoch 0, as the shard keeper `keeper_id` shows.
        unlabelled = body.epoch is None and body.id in (None, keeper_id)
        share = Share(keeper_id, 0, bytes_) if unlabelled else None
        return Classified(Outcome.UNVERIFIABLE, "holds a shard, no key record", share=share, slots=slots)
    if not member:
        detail = "removed from the key's keepers, still holds a shard"
        return Classified(Outcome.REMOVED, detail, slots=slots, holds=_NOTHING)
    if body.id is not None and body.id != keeper_id:
        return _wrong(f"holds the shard of keeper {body.id}", slots=slots)
    records = {record.epoch: record} if pending is None else {record.epoch: record, pending.epoch: pending}
    top = max(record.epoch, highest, 0 if pending is None else pending.epoch)
    label = body.epoch
    if label is None:  # SPIKE's keeper keeps no label: try the epoch asked for, then the other one in play
        wanted = record.epoch if asked not in records else asked
        order = [wanted, *(e for e in records if e != wanted)]
        label = next((e for e in order if records[e].matches_share(Share(keeper_id, e, bytes_))), None)
        if label is None:
            return _wrong(f"holds a shard that does not match its commitment for epoch {wanted}", slots=slots)
    elif label not in records:
        if label > top:
            detail = f"holds a shard of key epoch {label}, newer than any this Nexus knows ({top})"
            return Classified(Outcome.NEWER_EPOCH, detail, epoch=label, slots=slots)
        if label < record.epoch and record.had_epoch(label):
            problem = f"holds a stale shard of epoch {label} (current {record.epoch})"
            return _wrong(problem, Outcome.STALE_EPOCH, slots=slots)
        if label > record.epoch:
            problem = f"holds a shard of epoch {label}, of a rotation that was abandoned (current {record.epoch})"
            return Classified(Outcome.UNKNOWN_EPOCH, problem, problem, epoch=label, slots=slots, holds=_NOTHING)
        return never_had(label, record, slots=slots)
    share = Share(keeper_id, label, bytes_)
    if not records[label].matches_share(share):
        return _wrong(f"holds a shard that does not match its commitment for epoch {label}", slots=slots)
    shown = frozenset({label})
    if pending is not None and asked == pending.epoch and label == record.epoch:
        detail = f"holds its shard of epoch {label}, not yet of epoch {pending.epoch}"
        return Classified(Outcome.LACKS_NEW, detail, share=share, slots=slots, holds=shown)
    other = body.other_epoch
    retire = other if other is not None and other not in records and other <= top and other != label else None
    return Classified(Outcome.HOLDING, share=share, retire=retire, slots=slots, holds=shown)


def never_had(epoch: int, record: KeyRecord, *, slots: int | None = None) -> Classified:
    """A shard labelled with `epoch`, which the deployment of `record` never had: garbage."""
    problem = f"holds a shard labelled key epoch {epoch}, which this deployment never had (current {record.epoch})"
    return Classified(Outcome.UNKNOWN_EPOCH, problem, problem, epoch=epoch, slots=slots, holds=_NOTHING)


def _wrong(problem: str, outcome: Outcome = Outcome.WRONG_SHARD, *, slots: int | None = None) -> Classified:
    return Classified(outcome, problem, problem, slots=slots, holds=_NOTHING)
