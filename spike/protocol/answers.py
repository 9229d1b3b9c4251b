"""Classify what a keeper answered, once, into an `Outcome` (plus the words for reports).

Pure functions of the request kind, the answer and the key record: no keeper
history, no phase.  What to *do* about an outcome is the business of the
rules table (`spike.protocol.custody_rules`), never of this module.  A
peer's garbage becomes an outcome here; nothing a keeper sends makes these
functions raise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .custody_rules import Outcome
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
    share: Share | None = field(default=None, repr=False)  # the verified shard, when HOLDING
    epoch: int | None = None  # the epoch the shard was labelled with, when NEWER_EPOCH or UNKNOWN_EPOCH


#: What the machine's own timer says when a request's deadline passes.
TIMED_OUT = Classified(Outcome.TIMEOUT, "no answer before the deadline")


def classify(kind: RequestKind, answer: Answer, record: KeyRecord | None, keeper_id: int) -> Classified:
    """What `answer` to a request of `kind` to keeper `keeper_id` says, judged against `record`."""
    if isinstance(answer, RequestFailed):
        if answer.kind is FailureKind.TIMEOUT:
            return Classified(Outcome.TIMEOUT, answer.reason)
        if answer.kind in _IMPOSTOR:
            return Classified(Outcome.IMPOSTOR, answer.reason)
        return Classified(Outcome.UNREACHABLE, answer.reason)
    status = answer.status
    if kind is RequestKind.PUSH:
        if status == 200:
            return Classified(Outcome.ACCEPTED)
        return Classified(Outcome.REFUSED, problem=f"refused its shard with HTTP {status}")
    if status in EMPTY_STATUSES:
        still = "still empty right after accepting its shard" if kind is RequestKind.CONFIRM else ""
        return Classified(Outcome.EMPTY, f"HTTP {status}", still)
    if status != 200:
        return Classified(Outcome.ERROR_STATUS, f"HTTP {status}", f"answered HTTP {status} to a shard read")
    try:
        body = decode(answer.body, ShardAnswer)
        share = Share(keeper_id, record.epoch if record is not None else 0, body.shard_bytes())
    except (RemoteProtocolError, ShamirError) as exc:
        return Classified(Outcome.MALFORMED, "malformed shard answer", f"malformed shard answer: {exc}")
    if record is None:
        return Classified(Outcome.UNVERIFIABLE, "holds a shard, no key record")
    if body.id is not None and body.id != keeper_id:
        return _wrong(f"holds the shard of keeper {body.id}")
    if body.epoch is not None and body.epoch > record.epoch:
        detail = f"holds a shard of key epoch {body.epoch}, newer than this record's {record.epoch}"
        return Classified(Outcome.NEWER_EPOCH, detail, epoch=body.epoch)
    if body.epoch is not None and body.epoch != record.epoch:
        if record.had_epoch(body.epoch):
            return _wrong(f"holds a stale shard of epoch {body.epoch} (current {record.epoch})", Outcome.STALE_EPOCH)
        return never_had(body.epoch, record)
    if not record.matches_share(share):
        return _wrong(f"holds a shard that does not match its commitment for epoch {record.epoch}")
    return Classified(Outcome.HOLDING, share=share)


def never_had(epoch: int, record: KeyRecord) -> Classified:
    """A shard labelled with `epoch`, which the deployment of `record` never had: garbage."""
    problem = f"holds a shard labelled key epoch {epoch}, which this deployment never had (current {record.epoch})"
    return Classified(Outcome.UNKNOWN_EPOCH, problem, problem, epoch=epoch)


def _wrong(problem: str, outcome: Outcome = Outcome.WRONG_SHARD) -> Classified:
    return Classified(outcome, problem, problem)
