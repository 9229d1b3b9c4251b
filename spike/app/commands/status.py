"""`spike status`: the deployment at a glance, with exit codes for scripts.

Exit codes: 0 ready with at least one spare shard (redundancy >= 1),
3 ready but degraded (one more lost keeper would stop a restart),
4 not ready (waiting for shards or for bootstrap), 1 Nexus unreachable or
refusing this identity.
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
from spike.transports.blocking import ClientSession
from spike.transports.client import TransportError

EXIT_READY = 0
EXIT_DEGRADED = 3
EXIT_NOT_READY = 4


def exit_code(status: StatusBody) -> int:
    if status.phase != "ready":
        return EXIT_NOT_READY
    return EXIT_READY if (status.redundancy or 0) >= 1 else EXIT_DEGRADED


def _ago(moment: float | None, now: float) -> str:
    if moment is None:
        return "-"
    return f"{max(0.0, now - moment):.1f}s ago"


def render(status: StatusBody, url: str) -> str:
    now = status.time
    if status.phase == "ready":
        head = f"ready: root key epoch {status.epoch}, {status.threshold}-of-{status.shares}"
    elif status.phase == "recovering":
        head = (
            f"waiting for shards: {status.shards_needed} more verified shard(s) needed "
            f"(key epoch {status.epoch}, {status.threshold}-of-{status.shares})"
        )
    else:
        head = "not initialised: run `spike bootstrap`"
    lines = [f"Nexus {url}: {head}"]
    if status.redundancy is not None:
        lines.append(f"shard redundancy: {status.redundancy} (keepers holding their verified shard minus threshold)")
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
