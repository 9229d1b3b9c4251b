"""`spike operator rotate`: rotate the root key (superuser), and follow the rotation until it is committed.

Nexus draws the new key, stores the rotation, deals the new shards at the
keepers' polls and commits once enough keepers showed theirs
(docs/key-lifecycle.md); this command asks for it and says how it goes, one
line per step: started, each keeper holding its new shard, committed.
Secrets are not re-encrypted: the root key wraps the data keys, so a
rotation costs the same whatever is stored.  `--abort` gives up a rotation
being dealt; `--no-wait` returns once the rotation is stored.

`--data-key` adds a data-key term instead (new values are sealed under it,
older ones stay readable: one write, no keeper involved); `--rewrap` re-seals
stored values under the newest term in the background (`spike status` shows
how many are left; `--wait` follows it to the end).  While it waits, a live
line on stderr says for what, when stderr is a terminal.

Exit codes: 0 done (committed, given up, or stored with --no-wait), 1
refused or failed (the reason is said), 2 a bad option.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from spike.app.api.messages import ROTATE_PATH, STATUS_PATH, RotateRequest, RotateResponse, StatusBody
from spike.app.errors import CommandError

if TYPE_CHECKING:
    from spike.app.commands.client import NexusClient

Say = Callable[[str], None]
POLL_EVERY = 0.5


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids))


def _silent(text: str) -> None:
    """No progress line (library callers and tests)."""


def run(
    client: NexusClient,
    *,
    abort: bool,
    wait: float | None,
    say: Say,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    progress: Say = _silent,
) -> int:
    answer = client.call(ROTATE_PATH, RotateRequest(abort=abort), RotateResponse, write=True)
    if abort:
        say(
            f"key rotation given up: epoch {answer.epoch} stays in force; keepers forget the abandoned "
            "epoch's shards at their next polls"
        )
        return 0
    rotation = answer.rotation
    if rotation is None:  # committed already (a very fast deployment)
        say(f"root key rotated: epoch {answer.epoch} is in force")
        return 0
    start, target = rotation.from_epoch, rotation.to_epoch
    say(
        f"key rotation {start} -> {target} stored: dealing new shards to keepers {_ids(rotation.keepers)} at "
        f"their polls ({rotation.threshold} of them must show theirs before the commit)"
    )
    if wait is None:
        say("`spike status` shows its progress")
        return 0
    deadline = clock() + wait
    said: set[int] = set(rotation.dealt)
    last: StatusBody | None = None
    while True:
        status = client.call(STATUS_PATH, b"{}", StatusBody)
        last = status
        now = status.rotation
        if now is not None and now.to_epoch == target:
            for keeper_id in sorted(set(now.dealt) - said):
                say(f"keeper {keeper_id} holds its new shard ({now.needed} more needed)")
            said.update(now.dealt)
            waiting = _ids(sorted(set(now.keepers) - set(now.dealt)))
            progress(f"{now.stage}: waiting for keepers {waiting} to show their new shard at their polls")
        elif status.epoch is not None and status.epoch >= target:
            say(f"root key rotated: epoch {status.epoch} is in force; keepers forget epoch {start} at their next polls")
            if status.recovery is not None and status.recovery.epochs_behind > 0:
                say(
                    f"recovery shards exported for epoch {status.recovery.epoch} no longer rebuild the key: "
                    "run `spike operator recover` again"
                )
            return 0
        else:
            raise CommandError(
                f"key rotation {start} -> {target} did not complete: it was given up, or another record "
                f"replaced it (epoch {status.epoch} is in force)"
            )
        if clock() >= deadline:
            break
        sleep(POLL_EVERY)
    needed = "" if last is None or last.rotation is None else f" ({last.rotation.needed} more keepers needed)"
    raise CommandError(
        f"key rotation {start} -> {target} not committed after {wait:g}s{needed}: it goes on in Nexus; "
        "`spike status` shows it, `spike operator rotate --abort` gives it up"
    )


def data_key(
    client: NexusClient,
    *,
    rotate_term: bool,
    rewrap: bool,
    say: Say,
    wait: float | None = None,
    progress: Say = _silent,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """`--data-key` and/or `--rewrap`: a new data-key term, a background re-wrap to the newest one.

    With `wait` (seconds; `--rewrap --wait`), follow the re-wrap until no stored value is left below
    its term, showing how many are left.
    """
    answer = client.call(ROTATE_PATH, RotateRequest(data_key=rotate_term, rewrap=rewrap), RotateResponse, write=True)
    if rotate_term:
        say(f"data key rotated: new values are sealed under term {answer.data_term}; older terms stay readable")
    target = answer.rewrap_target
    if target is None:
        return 0
    if wait is None:
        say(
            f"stored values are re-wrapped to term {target} in the background "
            "(it survives a restart); `spike status` shows how many are left"
        )
        return 0
    say(f"stored values are re-wrapped to term {target} in the background (it survives a restart)")
    deadline = clock() + wait
    while True:
        keyring = client.call(STATUS_PATH, b"{}", StatusBody).keyring
        if keyring is not None and (keyring.rewrap_target is None or keyring.rewrap_remaining == 0):
            say(f"re-wrap done: every stored value is sealed under term {target} or newer")
            return 0
        if keyring is None:
            progress(f"re-wrap to term {target}: Nexus is not ready")
        else:
            progress(f"re-wrap to term {keyring.rewrap_target}: {keyring.rewrap_remaining} value(s) left")
        if clock() >= deadline:
            raise CommandError(
                f"the re-wrap to term {target} is not done after {wait:g}s: it goes on in Nexus; "
                "`spike status` shows how many values are left"
            )
        sleep(POLL_EVERY)
