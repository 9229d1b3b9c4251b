"""`spike status`: the deployment at a glance, with exit codes for scripts.

Exit codes, the first that applies:

* 1 Nexus unreachable or refusing this identity;
* 4 not ready (waiting for shards or for bootstrap);
* 3 ready but degraded (one more lost keeper would stop a restart);
* 5 ready, but the break-glass recovery shards exported last
  (`spike operator recover`) belong to an earlier key epoch: a rotation
  made them useless, export again (a deployment that never exported gets 0);
* 0 ready with at least one spare shard (redundancy >= 1), or ready on the
  memory backend (no keepers: nothing to lose but everything, on exit).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable

import msgspec

from spike.app.api.messages import StatusBody
from spike.app.commands.client import fetch_status, nexus_connection
from spike.app.config import ClientConfig
from spike.app.errors import CommandError
from spike.app.identity import identity_source
from spike.app.model.stranded import stranded
from spike.transports.blocking import ClientSession
from spike.transports.client import TransportError

EXIT_READY = 0
EXIT_DEGRADED = 3
EXIT_NOT_READY = 4
EXIT_RECOVERY_STALE = 5


def exit_code(status: StatusBody) -> int:
    if status.phase != "ready":
        return EXIT_NOT_READY
    if status.backend == "memory":
        return EXIT_READY
    if (status.redundancy or 0) < 1:
        return EXIT_DEGRADED
    if status.recovery is not None and status.recovery.epochs_behind > 0:
        return EXIT_RECOVERY_STALE
    return EXIT_READY


def _duration(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    if seconds < 172800:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


def _lifecycle_lines(status: StatusBody) -> list[str]:
    """What status says of the key lifecycle: a rotation under way, the schedule, the recovery files."""
    now = status.time
    lines = []
    rotation = status.rotation
    if rotation is not None:
        dealt = ", ".join(map(str, rotation.dealt)) or "none yet"
        lines.append(
            f"key rotation {rotation.from_epoch} -> {rotation.to_epoch}: {rotation.stage}, started "
            f"{_duration(now - rotation.started)} ago; new set {rotation.threshold}-of-{len(rotation.keepers)} "
            f"(keepers {', '.join(map(str, rotation.keepers))}); holding their new shard: {dealt}"
            + (f"; {rotation.needed} more needed" if rotation.needed else "")
        )
    highest = status.highest_epoch
    burned = highest is not None and status.epoch is not None and highest > status.epoch
    if burned and (rotation is None or (highest or 0) > rotation.to_epoch):
        lines.append(f"highest key epoch used: {highest} (given-up rotations burn theirs)")
    schedule = status.schedule
    if schedule is not None:
        due = "" if schedule.next is None else f"; the next in {_duration(schedule.next - now)}"
        lines.append(f"root key rotated by itself every {_duration(schedule.every)}{due}")
    keyring = status.keyring
    if keyring is not None:
        counts = ", ".join(f"term {t}: {n}" for t, n in sorted(keyring.values_by_term.items()) if n)
        held = len(keyring.terms)
        line = f"data key term {keyring.term} ({held} term(s) held; stored values by term: {counts or 'none'})"
        if keyring.rewrap_target is not None:
            line += f"; re-wrap to term {keyring.rewrap_target}: {keyring.rewrap_remaining} value(s) left"
        lines.append(line)
    recovery = status.recovery
    if recovery is None and status.phase == "ready":
        lines.append(
            "recovery shards: none exported for this key: if Nexus and enough keepers are lost together, nothing "
            "brings the key back; run `spike operator recover` and keep the files offline"
        )
    if recovery is not None:
        when = dt.datetime.fromtimestamp(recovery.time, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        if recovery.epochs_behind > 0:
            lines.append(
                f"recovery shards: the newest export ({when}) is for key epoch {recovery.epoch}, "
                f"{recovery.epochs_behind} epoch(s) old: it no longer rebuilds the key; run `spike operator recover`"
            )
        else:
            lines.append(f"recovery shards: exported {when} for the current key epoch {recovery.epoch}")
    return lines


def _ago(moment: float | None, now: float) -> str:
    if moment is None:
        return "-"
    return f"{max(0.0, now - moment):.1f}s ago"


#: What `spike status` says of a Nexus on the memory backend, instead of custody it has not.
MEMORY_LINES = (
    "ready: memory backend, NOTHING IS KEPT",
    "no keepers and no key record: every secret and policy is lost when Nexus stops (development and tests only)",
)


def render(status: StatusBody, url: str) -> str:
    if status.backend == "memory":
        return "\n".join([f"Nexus {url}: {MEMORY_LINES[0]}", *MEMORY_LINES[1:]])
    now = status.time
    if status.phase == "ready":
        head = f"ready: root key epoch {status.epoch}, {status.threshold}-of-{status.shares}"
    elif status.phase == "recovering":
        # The phase's name as the JSON gives it, then what it means.
        head = (
            f"recovering, waiting for shards: {status.shards_needed} more verified shard(s) needed "
            f"(key epoch {status.epoch}, {status.threshold}-of-{status.shares})"
        )
    else:
        head = "uninitialised: run `spike bootstrap`"
    lines = [f"Nexus {url}: {head}"]
    if status.phase == "recovering":
        lost = stranded(status.shards_needed, {k.id: k.state for k in status.keepers})
        if lost is not None:
            lines.append(lost.sentence(status.epoch))
    if status.redundancy is not None:
        lines.append(f"shard redundancy: {status.redundancy} (keepers holding their verified shard minus threshold)")
    lines.extend(_lifecycle_lines(status))
    lines.append(f"keepers polled every {status.poll_interval:g}s")
    rows = [("ID", "URL", "STATE", "SINCE", "LAST POLL", "LATENCY", "POLLS", "404s", "FAILS", "RESEEDS")]
    for k in status.keepers:
        since = dt.datetime.fromtimestamp(k.since, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        rows.append(
            (
                str(k.id),
                k.url,
                k.state + (f" ({k.detail})" if k.detail and k.state not in ("holding",) else ""),
                since,
                _ago(k.last_poll, now),
                "-" if k.latency_ms is None else f"{k.latency_ms:.1f}ms",
                str(k.polls),
                str(k.empty_answers),
                str(k.failures),
                str(k.reseeds),
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.extend("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip() for r in rows)
    return "\n".join(lines)


def run(config: ClientConfig, say: Callable[[str], None] = print) -> int:
    with (
        identity_source(config.common.svid, config.common.trust) as identity,
        ClientSession(identity.client_context, timeout=5.0) as session,
    ):
        nexus = nexus_connection(session, config.nexus_url, config.common.trust, retry_stale=True)
        try:
            status = fetch_status(nexus)
        except TransportError as exc:
            raise CommandError(f"Nexus at {config.nexus_url} is unreachable: {exc}") from None
    if config.output == "json":
        say(msgspec.json.encode(status).decode())
    else:
        say(render(status, config.nexus_url))
    return exit_code(status)
