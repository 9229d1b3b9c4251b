"""`spike bootstrap`: make a fresh root key, seed the keepers, prove Nexus holds it.

The root key exists here only for the few seconds this takes, and only in
memory.  Nexus learns the key's *record* (check value and shard
commitments, no secret) first, then rebuilds the key from the keepers on its
own, exactly as it will after every restart; the final encrypt-and-verify
round trip proves it got the same key.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Callable

import msgspec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from spike.app.api.messages import (
    BOOTSTRAP_INIT_PATH,
    BOOTSTRAP_VERIFY_PATH,
    VERIFY_INFO,
    InitRequest,
    InitResponse,
    StatusBody,
    VerifyRequest,
    VerifyResponse,
)
from spike.app.commands.client import error_reason, fetch_status, nexus_connection
from spike.app.commands.progress import Progress
from spike.app.config import THRESHOLD_ONE, BootstrapConfig
from spike.app.errors import CommandError
from spike.app.identity import identity_source
from spike.protocol.identity import Role, TrustDomains
from spike.protocol.material import RootKey, Share, derive_key
from spike.protocol.record import seal_key
from spike.protocol.shamir import ShardDerivation
from spike.protocol.wire import KEEPER_CONTRIBUTE_PATH, ShardContribution, decode, encode
from spike.transports.blocking import BlockingConnection, ClientSession
from spike.transports.client import TransportError
from spike.transports.tls import keeper_check

Say = Callable[[str], None]


def _wait_for_nexus(nexus: BlockingConnection, deadline: float, url: str, progress: Say) -> StatusBody:
    last_error = ""
    while time.monotonic() < deadline:
        try:
            status = fetch_status(nexus)
        except TransportError as exc:
            last_error = str(exc)
            progress(f"waiting for Nexus at {url} to answer ({exc})")
            time.sleep(0.25)
            continue
        # Wait until Nexus has heard from every keeper (or a couple of polls went by),
        # so that "no keeper holds a shard" is known rather than assumed.
        if all(k.state != "unknown" for k in status.keepers) or time.monotonic() > deadline - 1:
            return status
        unheard = ", ".join(str(k.id) for k in status.keepers if k.state == "unknown")
        progress(f"waiting for Nexus to hear from keepers {unheard}")
        time.sleep(0.1)
    raise CommandError(f"Nexus at {url} is not reachable: {last_error or 'no answer'}")


def run(config: BootstrapConfig, say: Say = print, progress: Progress | None = None, output: str = "human") -> None:
    """Bootstrap; what it waits for is shown by `progress` (a live line on stderr when that is a terminal).

    With `output` "json", the steps are not said, and the result is one JSON object:
    ``{"epoch", "threshold", "shares", "seeded": [ids], "missing": [ids]}``.
    """
    bar = Progress("spike bootstrap") if progress is None else progress

    def said(line: str) -> None:
        bar.done()  # the result lines go where the live line was
        if output != "json":
            say(line)

    try:
        result = _run(config, said, bar)
    finally:
        bar.done()
    if output == "json":
        say(json.dumps(result))


def _run(config: BootstrapConfig, say: Say, progress: Progress) -> dict[str, object]:
    trust = config.common.trust
    deadline = time.monotonic() + config.timeout
    with (
        identity_source(config.common.svid, trust) as identity,
        ClientSession(identity.client_context, timeout=5.0) as session,
    ):
        nexus = nexus_connection(session, config.nexus_url, trust, retry_stale=True)
        status = _wait_for_nexus(nexus, deadline, config.nexus_url, progress)
        keepers = {k.id: k.url for k in status.keepers}
        if config.keepers is not None:
            if set(config.keepers) != set(keepers):
                raise CommandError(
                    f"Nexus polls keepers {sorted(keepers)} but bootstrap was given {sorted(config.keepers)}"
                )
            keepers = config.keepers  # the URLs as this host reaches them
        _refuse_if_initialised(status, config.force)
        if status.threshold == 1 and not config.allow_threshold_one:
            raise CommandError(f"Nexus is configured with {THRESHOLD_ONE}", exit_code=2)
        # Epochs are never reused: above the record's and every rotation's, given up ones and the one
        # under way included (a replacement drops a stored rotation, whose shards keepers may hold).
        under_way = status.rotation.to_epoch if status.rotation is not None else 0
        epoch = max(status.epoch or 0, status.highest_epoch or 0, under_way) + 1
        key = RootKey.generate(os.urandom)
        try:
            record, shares = seal_key(
                key,
                epoch=epoch,
                threshold=status.threshold,
                keeper_ids=sorted(keepers),
                derivation=_derivation(status.shard_derivation),
            )
            _install_record(nexus, InitRequest(record=record, replace=config.force))
            say(f"key record for epoch {epoch} installed in Nexus ({status.threshold}-of-{len(keepers)})")
            seeded = _seed_keepers(session, trust, keepers, shares, status.threshold, deadline, say, progress)
            shares.clear()
            _shards_dealt(nexus, InitRequest(record=record, replace=config.force, dealt=True))
            _wait_until_ready(nexus, deadline, epoch, progress)
            _verify(nexus, key)
        finally:
            key.wipe()
    missing = sorted(set(keepers) - seeded)
    say(
        f"bootstrap complete: Nexus rebuilt and verified root key epoch {epoch}; "
        f"keepers seeded: {', '.join(map(str, sorted(seeded)))}"
        + (f"; Nexus will seed {', '.join(map(str, missing))} when they answer" if missing else "")
    )
    return {
        "epoch": epoch,
        "threshold": status.threshold,
        "shares": len(keepers),
        "seeded": sorted(seeded),
        "missing": missing,
    }


def _refuse_if_initialised(status: StatusBody, force: bool) -> None:
    if force:
        return
    if status.phase != "uninitialised":
        raise CommandError(
            f"Nexus is already initialised (key epoch {status.epoch}, {status.phase}); refusing to "
            "replace its root key. `--force` replaces it, and secrets sealed under the old key "
            "become unreadable."
        )
    holding = [k.id for k in status.keepers if k.state == "unverified"]
    if holding:
        raise CommandError(
            f"keepers {', '.join(map(str, holding))} hold shards of a key this Nexus does not know "
            "(was its data dir replaced?); refusing to overwrite them. `--force` overwrites them."
        )


def _install_record(nexus: BlockingConnection, request: InitRequest) -> None:
    status, body = nexus.post(BOOTSTRAP_INIT_PATH, msgspec.json.encode(request))
    if status != 200:
        reason = error_reason(body)
        if status == 409:
            raise CommandError(reason or "Nexus already holds another key record (initialised meanwhile?)")
        raise CommandError(f"Nexus refused the key record (HTTP {status}): {reason or 'see its log'}")
    decode(body, InitResponse)


def _derivation(name: str | None) -> ShardDerivation:
    """How Nexus splits its keys (a Nexus that does not say splits them spike's way)."""
    try:
        return ShardDerivation(name or ShardDerivation.HMAC.value)
    except ValueError:
        raise CommandError(f"Nexus splits its keys a way this bootstrap does not know: {name!r}") from None


def _shards_dealt(nexus: BlockingConnection, request: InitRequest) -> None:
    """Tell Nexus the keepers hold their shards, so that it reads them now rather than at its next polls.

    Only a hint: if it does not arrive (or Nexus is older and ignores it), the polls find the shards.
    """
    with contextlib.suppress(TransportError):
        nexus.post(BOOTSTRAP_INIT_PATH, msgspec.json.encode(request))


def _seed_keepers(
    session: ClientSession,
    trust: TrustDomains,
    keepers: dict[int, str],
    shares: dict[int, Share],
    threshold: int,
    deadline: float,
    say: Say,
    progress: Say,
) -> set[int]:
    connections = {
        keeper_id: session.connect(
            url,
            keeper_check(trust, keeper_id),
            expected_peer=str(trust.id_of(Role.KEEPER, keeper_id)),
        )
        for keeper_id, url in keepers.items()
    }
    seeded: set[int] = set()
    errors: dict[int, str] = {}
    grace_until = time.monotonic() + 5.0
    while True:
        for keeper_id in sorted(set(keepers) - seeded):
            try:
                status, _ = connections[keeper_id].post(
                    KEEPER_CONTRIBUTE_PATH, encode(ShardContribution.of(shares[keeper_id])), timeout=2.0
                )
            except TransportError as exc:
                errors[keeper_id] = str(exc)
                continue
            if status == 200:
                seeded.add(keeper_id)
                say(f"keeper {keeper_id} ({keepers[keeper_id]}) seeded")
            else:
                errors[keeper_id] = f"HTTP {status}"
        now = time.monotonic()
        if len(seeded) == len(keepers) or (len(seeded) >= threshold and now > grace_until):
            return seeded
        waiting = ", ".join(str(i) for i in sorted(set(keepers) - seeded))
        progress(f"{len(seeded)} of {len(keepers)} keepers hold their shard; waiting for keepers {waiting}")
        if now > deadline:
            detail = "; ".join(f"keeper {i}: {e}" for i, e in sorted(errors.items()) if i not in seeded)
            raise CommandError(
                f"only {len(seeded)} of the {threshold} keepers needed accepted a shard ({detail}). "
                "The new key is lost; start the keepers and run `spike bootstrap --force`."
            )
        time.sleep(0.2)


def _wait_until_ready(nexus: BlockingConnection, deadline: float, epoch: int, progress: Say) -> None:
    while True:
        status = fetch_status(nexus)
        if status.phase == "ready" and status.epoch == epoch:
            return
        progress(f"waiting for Nexus to rebuild the root key from the keepers ({status.shards_needed} shard(s) to go)")
        if time.monotonic() > deadline:
            raise CommandError(
                f"Nexus did not rebuild the key in time (phase {status.phase}, "
                f"{status.shards_needed} shard(s) missing); see its log"
            )
        time.sleep(0.05)


def _verify(nexus: BlockingConnection, key: RootKey) -> None:
    plaintext = os.urandom(32)
    nonce = os.urandom(12)
    ciphertext = AESGCM(derive_key(key, VERIFY_INFO)).encrypt(nonce, plaintext, VERIFY_INFO)
    status, body = nexus.post(BOOTSTRAP_VERIFY_PATH, encode(VerifyRequest(nonce=nonce, ciphertext=ciphertext)))
    if status != 200:
        raise CommandError(f"Nexus could not decrypt the verification message (HTTP {status})")
    answer = decode(body, VerifyResponse)
    if answer.hash != hashlib.sha256(plaintext).hexdigest():
        raise CommandError("Nexus holds a different key than the one just made: verification failed")
