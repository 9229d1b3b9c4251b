"""Break-glass: export recovery shards, and restore the root key from them.

The operator's side (Nexus's is spike/app/nexus/operator_api.py).
`spike operator recover` (only the recover role) asks a ready Nexus for all
n shards and writes each to its own 0600 file as ``spike:<id>:<64 hex>``.
`spike operator restore` (only the restore role) hands one shard per run to
a Nexus that is waiting for shards; once t valid shards are in, Nexus
rebuilds the key, checks it against its key check value, becomes ready and
re-seeds every keeper at once.  Nothing about a shard is ever logged.
"""

from __future__ import annotations

import getpass
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from spike.app.api.messages import (
    RECOVER_PATH,
    RESTORE_PATH,
    STATUS_PATH,
    RecoverResponse,
    RestorationStatus,
    RestoreRequest,
    StatusBody,
)
from spike.app.errors import CommandError
from spike.protocol.errors import ShamirError
from spike.protocol.material import Share

if TYPE_CHECKING:  # the client side (and its thread portal) is the CLI's: a Nexus starts without it
    from spike.app.commands.client import NexusClient

_TEXT_FORM = re.compile(r"spike:(\d{1,3}):([0-9a-fA-F]{64})")

Say = Callable[[str], None]


def format_shard(share: Share) -> str:
    return f"spike:{share.id}:{share.secret_bytes().hex()}"


def parse_shard(text: str, epoch: int = 0) -> Share:
    """Read the ``spike:<id>:<hex>`` form; raise CommandError with what is wrong (never the value)."""
    match = _TEXT_FORM.fullmatch(text.strip())
    if match is None:
        raise CommandError("a recovery shard looks like spike:<id>:<64 hex digits>", exit_code=2)
    try:
        return Share(int(match.group(1)), epoch, bytes.fromhex(match.group(2)))
    except ShamirError as exc:
        raise CommandError(f"not a valid recovery shard: {exc}", exit_code=2) from None


def recover(client: NexusClient, directory: Path, say: Say, output: str = "human") -> int:
    answer = client.call(RECOVER_PATH, b"{}", RecoverResponse)
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    written: dict[int, str] = {}
    for keeper_id, shard in sorted(answer.shards.items()):
        share = Share(keeper_id, 0, bytes(shard))
        target = directory / f"spike.recovery.{keeper_id}.txt"
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (format_shard(share) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        written[keeper_id] = str(target)
    if output == "json":  # where the shards are, never what they are
        say(json.dumps({"epoch": answer.epoch, "directory": str(directory), "files": written}))
        return 0
    of_epoch = "" if answer.epoch is None else f" of key epoch {answer.epoch}"
    say(
        f"wrote {len(answer.shards)} recovery shards{of_epoch} to {directory} (mode 0600, one per file): "
        "keep them apart, offline; any threshold of them rebuild the root key until the next rotation"
    )
    return 0


def read_shard_text(stdin: TextIO, prompt: Callable[[str], str] = getpass.getpass) -> str:
    if stdin.isatty():
        return prompt("recovery shard (spike:<id>:<hex>, not echoed): ")
    line = stdin.readline()
    if not line:
        raise CommandError("no recovery shard on standard input", exit_code=2)
    return line


def restore(client: NexusClient, text: str, say: Say, output: str = "human") -> int:
    from spike.app.commands.client import NexusError

    share = parse_shard(text)
    state = client.call(STATUS_PATH, b"{}", StatusBody)
    if state.phase == "ready":
        raise CommandError("Nexus already holds its verified root key: there is nothing to restore")
    if state.phase == "uninitialised":
        raise CommandError("Nexus has no key record (a new data dir?): restore needs the data dir the shards belong to")
    try:
        status = client.call(
            RESTORE_PATH,
            RestoreRequest(id=share.id, shard=list(share.secret_bytes())),
            RestorationStatus,
            conflict=f"shard {share.id} was already given",
            write=True,
        )
    except NexusError as exc:
        if exc.code == "api_bad_request":
            raise CommandError(
                f"Nexus refused shard {share.id}: it does not belong to this deployment's key "
                "(another key or epoch, or the wrong id)"
            ) from None
        raise
    if output == "json":
        say(json.dumps({"id": share.id, "remaining": status.remaining, "restored": status.restored}))
    elif status.restored:
        say(f"shard {share.id} accepted: the root key is restored and verified; Nexus re-seeds its keepers now")
    else:
        say(f"shard {share.id} accepted: {status.remaining} more shard(s) needed")
    return 0
