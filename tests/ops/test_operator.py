"""Break-glass in-process: `spike operator recover|restore` against the real OperatorApi and custody machine.

Each refusal is checked at both ends: the HTTP answer Nexus gives (a code,
never a detail), the one sentence and exit code the operator gets, and that
nothing changed (the shards collected so far, the phase, no request sent to
any keeper).  A successful restore rebuilds the key from two shards, the
node becomes ready, and every keeper is re-seeded at once.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import stat
from pathlib import Path

import pytest

from spike.app.api.messages import RECOVER_PATH, RESTORE_PATH
from spike.app.commands import operator
from spike.app.commands.operator import format_shard, parse_shard
from spike.app.errors import CommandError
from spike.protocol import KeyRecovered, Phase, RequestKind, Share
from spike.protocol.wire import ShardContribution, decode
from tests.ops.ops_helpers import (
    OTHER_KEY,
    ROOT_KEY,
    SHARES,
    SPIKE_CLIENT,
    Node,
    leaks,
    sealed,
    secrets_of,
    shard_answer,
    unlock,
)
from tests.spike_go_sdk import conclude, restore_body

OLD_RECORD, OLD_SHARES = sealed(OTHER_KEY, epoch=1)  # another deployment's key (same ids, same epoch)
SECRETS = {**secrets_of(SHARES.values(), ROOT_KEY), **secrets_of(OLD_SHARES.values(), OTHER_KEY, "other key ")}


def error_of(body: bytes) -> str:
    """The `err` of an error answer, which also carries a one-line `reason` for people (issue 18)."""
    answer = json.loads(body)
    assert set(answer) == {"err", "reason"} and answer["reason"] and "\n" not in answer["reason"], answer
    return str(answer["err"])


def restore_text(node: Node, text: str, as_: str = "restore") -> tuple[int, str]:
    """Run `spike operator restore` with `text` as the shard: (exit code, the one sentence it printed)."""
    said: list[str] = []
    try:
        code = operator.restore(node.client(as_), text, said.append)
    except CommandError as exc:
        return exc.exit_code, str(exc)
    assert len(said) == 1
    return code, said[0]


def unchanged(node: Node, needed: int, *, sent: int = 0) -> None:
    assert node.custody.phase is Phase.RECOVERING
    assert node.custody.shards_needed == needed
    assert len(node.driver.sent) == sent
    assert not [r for r in node.reports if isinstance(r, KeyRecovered)]


# ---------------------------------------------------------------------- the text form


def test_the_text_form_round_trips_and_its_errors_never_echo_the_value() -> None:
    share = SHARES[2]
    text = format_shard(share)
    assert re.fullmatch(r"spike:2:[0-9a-f]{64}", text)
    parsed = parse_shard(f"  {text}\n")
    assert (parsed.id, parsed.secret_bytes()) == (2, share.secret_bytes())
    assert parse_shard(text.upper().replace("SPIKE", "spike")).secret_bytes() == share.secret_bytes()

    hexed = share.secret_bytes().hex()
    bad = [
        "",
        "spike:2:",
        f"spike:2:{hexed[:-1]}",  # 63 digits
        f"spike:2:{hexed}0",  # 65
        f"spike:2:{hexed[:-1]}g",
        f"2:{hexed}",
        f"spike:two:{hexed}",
        f"spike:2:{hexed} spike:3:{hexed}",
        f"spike:0:{hexed}",  # ids are 1-255
        f"spike:256:{hexed}",
        "spike:2:" + "ff" * 32,  # not an element of the field
    ]
    for text in bad:
        with pytest.raises(CommandError) as caught:
            parse_shard(text)
        assert caught.value.exit_code == 2, text
        message = str(caught.value)
        assert "\n" not in message and not leaks(message, SECRETS), (text, message)


def test_a_hidden_prompt_on_a_terminal_and_one_line_from_stdin_otherwise() -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    prompts: list[str] = []

    def prompt(question: str) -> str:
        prompts.append(question)
        return "spike:1:" + "ab" * 32

    assert operator.read_shard_text(Terminal(""), prompt).startswith("spike:1:")
    assert len(prompts) == 1 and "not echoed" in prompts[0]

    piped = io.StringIO("spike:3:" + "cd" * 32 + "\nspike:1:" + "ab" * 32 + "\n")
    assert operator.read_shard_text(piped, prompt).strip() == "spike:3:" + "cd" * 32  # one shard per run
    assert len(prompts) == 1
    with pytest.raises(CommandError, match="no recovery shard on standard input") as caught:
        operator.read_shard_text(io.StringIO(""), prompt)
    assert caught.value.exit_code == 2


# ---------------------------------------------------------------------- restore


def test_restore_counts_down_rebuilds_the_key_and_reseeds_every_keeper_at_once(node: Node) -> None:
    # Nexus polled its keepers after the restart: all of them are empty now.
    node.driver.tick(0.0)
    for keeper_id in (1, 2, 3):
        assert node.driver.answer(keeper_id, 404).kind is RequestKind.POLL
    polls = len(node.driver.sent)

    assert restore_text(node, format_shard(SHARES[3])) == (0, "shard 3 accepted: 1 more shard(s) needed")
    unchanged(node, needed=1, sent=polls)
    code, said = restore_text(node, format_shard(SHARES[1]) + "\n")
    assert code == 0 and "root key is restored and verified" in said, said

    assert node.custody.phase is Phase.READY
    assert node.custody.root_key.secret_bytes() == ROOT_KEY
    (recovered,) = [r for r in node.reports if isinstance(r, KeyRecovered)]
    assert (recovered.source, recovered.keeper_ids) == ("operator", (1, 3))
    # Every keeper gets its own shard pushed at once, without waiting for its next poll.
    pushes = node.driver.sent[polls:]
    assert sorted((p.kind, p.keeper_id) for p in pushes) == [(RequestKind.PUSH, i) for i in (1, 2, 3)]
    for push in pushes:
        pushed = decode(push.body, ShardContribution)
        assert pushed.shard_bytes() == SHARES[push.keeper_id].secret_bytes()
        node.driver.answer(push.keeper_id, 200)
    for keeper_id in (1, 2, 3):  # ... and reads it back
        node.driver.answer(keeper_id, 200, shard_answer(SHARES[keeper_id]))
    assert node.custody.redundancy == 1
    assert {v.keeper_id: v.reseeds for v in node.custody.keepers()} == {1: 1, 2: 1, 3: 1}


def test_restore_while_keepers_are_still_answering_needs_only_the_missing_shards(node: Node) -> None:
    node.driver.tick(0.0)
    node.driver.answer(2, 200, shard_answer(SHARES[2]))  # keeper 2 survived
    node.driver.answer(1, 404)
    node.driver.answer(3, None)
    assert node.custody.shards_needed == 1
    # The operator's copy of a shard Nexus already has from its keeper is simply taken again.
    assert restore_text(node, format_shard(SHARES[2])) == (0, "shard 2 accepted: 1 more shard(s) needed")
    code, said = restore_text(node, format_shard(SHARES[3]))
    assert code == 0 and "restored" in said
    assert node.custody.phase is Phase.READY


@pytest.mark.parametrize(
    ("case", "shard", "message"),
    [
        ("another key", lambda: format_shard(OLD_SHARES[1]), "does not belong to this deployment's key"),
        ("another epoch of the key", lambda: format_shard(sealed(epoch=2)[1][1]), "does not belong"),
        ("the wrong id", lambda: f"spike:2:{SHARES[1].secret_bytes().hex()}", "does not belong"),
        ("an id of no keeper", lambda: f"spike:7:{SHARES[1].secret_bytes().hex()}", "does not belong"),
        ("a zero shard", lambda: "spike:1:" + "00" * 32, "does not belong"),
    ],
)
def test_a_foreign_shard_is_refused_and_changes_nothing(node: Node, case: str, shard: object, message: str) -> None:
    assert restore_text(node, format_shard(SHARES[3]))[0] == 0
    text = shard()  # type: ignore[operator]
    code, said = restore_text(node, text)
    assert code == 1 and message in said, (case, said)
    assert "\n" not in said and not leaks(said, SECRETS)
    unchanged(node, needed=1)
    # The shard given before still counts: one more good one finishes the restore.
    assert "restored" in restore_text(node, format_shard(SHARES[1]))[1]


def test_a_duplicate_is_refused_and_changes_nothing(node: Node) -> None:
    assert restore_text(node, format_shard(SHARES[2]))[0] == 0
    assert restore_text(node, format_shard(SHARES[2])) == (1, "shard 2 was already given")
    unchanged(node, needed=1)
    shard = {"id": 2, "shard": list(SHARES[2].secret_bytes())}
    response = node.call(RESTORE_PATH, shard, as_="restore", headers=SPIKE_CLIENT)
    assert (response.status, error_of(response.body)) == (409, "api_conflict")
    unchanged(node, needed=1)


def test_spikes_go_pilot_gets_the_progress_for_a_duplicate(node: Node) -> None:
    """SPIKE's Go Nexus answers a shard it holds with 200 and the progress (spike's CLI gets 409 above)."""
    body = restore_body(2, SHARES[2].secret_bytes())
    assert node.call(RESTORE_PATH, body, as_="restore").status == 200
    response = node.call(RESTORE_PATH, body, as_="restore")
    go = conclude(response.status, response.body)
    assert go.error is None
    assert (go.field("collected"), go.field("remaining"), go.field("restored")) == (1, 1, False)
    unchanged(node, needed=1)


def test_spikes_go_pilot_hears_restored_from_a_ready_nexus(node: Node) -> None:
    """Was 409, which the Go SDK reports as "unexpected status code from peer"; SPIKE answers 200."""
    unlock(node, SHARES)
    response = node.call(RESTORE_PATH, restore_body(3, SHARES[3].secret_bytes()), as_="restore")
    go = conclude(response.status, response.body)
    assert go.error is None
    assert (go.field("collected"), go.field("remaining"), go.field("restored")) == (2, 0, True)
    assert node.custody.phase is Phase.READY


@pytest.mark.parametrize(
    "body",
    [
        b"not json",
        b"{}",
        b'{"id": 1}',
        b'{"id": 1, "shard": [1, 2, 3]}',
        b'{"id": 1, "shard": "' + b"ab" * 32 + b'"}',
        b'{"id": 1, "shard": [' + b",".join([b"256"] * 32) + b"]}",
        b'{"id": 0, "shard": [' + b",".join([b"1"] * 32) + b"]}",
        b'{"id": 1, "shard": [' + b",".join([b"255"] * 32) + b"]}",  # not in the field
    ],
)
def test_malformed_restore_bodies_get_a_400(node: Node, body: bytes) -> None:
    response = node.call(RESTORE_PATH, body, as_="restore")
    assert (response.status, error_of(response.body)) == (400, "api_bad_request")
    unchanged(node, needed=2)


def test_malformed_text_never_reaches_nexus(node: Node) -> None:
    code, said = restore_text(node, f"spike:1:{SHARES[1].secret_bytes().hex()[:40]}")
    assert code == 2 and "spike:<id>:<64 hex digits>" in said
    assert node.audit() == []  # not even a status call


def test_restore_on_a_ready_nexus_is_refused(node: Node) -> None:
    unlock(node, SHARES)
    assert node.custody.phase is Phase.READY
    code, said = restore_text(node, format_shard(SHARES[3]))
    assert code == 1 and "already holds its verified root key" in said
    shard = {"id": 3, "shard": list(SHARES[3].secret_bytes())}
    response = node.call(RESTORE_PATH, shard, as_="restore", headers=SPIKE_CLIENT)
    assert (response.status, error_of(response.body)) == (409, "api_conflict")
    assert node.custody.phase is Phase.READY


def test_restore_on_an_uninitialised_nexus_is_refused(tmp_path: Path) -> None:
    empty = Node(tmp_path / "empty", initialised=False)
    try:
        code, said = restore_text(empty, format_shard(SHARES[1]))
        assert code == 1 and "no key record" in said
        response = empty.call(RESTORE_PATH, {"id": 1, "shard": list(SHARES[1].secret_bytes())}, as_="restore")
        assert (response.status, error_of(response.body)) == (503, "state_not_ready")
        assert empty.custody.phase is Phase.UNINITIALISED
    finally:
        empty.close()


@pytest.mark.parametrize("who", ["superuser", "recover", "bootstrap", "nexus", "keeper-1", "/web", "nobody"])
def test_only_the_restore_role_may_restore(node: Node, who: str) -> None:
    response = node.call(RESTORE_PATH, {"id": 1, "shard": list(SHARES[1].secret_bytes())}, as_=who)
    assert (response.status, error_of(response.body)) == (401, "access_unauthorized")
    unchanged(node, needed=2)


def test_restore_logs_progress_but_never_a_shard(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for text in (format_shard(OLD_SHARES[1]), format_shard(SHARES[1]), format_shard(SHARES[1]), "spike:9:00"):
        restore_text(node, text)
    restore_text(node, format_shard(SHARES[2]))
    assert node.custody.phase is Phase.READY
    logged = "\n".join(f"{r.getMessage()} {r.__dict__}" for r in caplog.records)
    assert "recovery shard 1 accepted" in logged and "restore refused" in logged
    assert not leaks(logged, SECRETS)
    assert not leaks(node.audit_stream.getvalue(), SECRETS)


# ---------------------------------------------------------------------- recover


def test_recover_writes_one_0600_file_per_shard_that_restore_takes_back(node: Node, tmp_path: Path) -> None:
    unlock(node, SHARES)
    target = tmp_path / "recovery" / "shards"
    said: list[str] = []
    assert operator.recover(node.client("recover"), target, said.append) == 0
    assert "wrote 3 recovery shards" in said[0] and not leaks(said[0], SECRETS)

    files = sorted(target.iterdir())
    assert len(files) == 3
    assert stat.S_IMODE(target.stat().st_mode) == 0o700
    texts = {}
    for path in files:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        text = path.read_text()
        assert re.fullmatch(r"spike:[123]:[0-9a-f]{64}\n", text), text
        share = parse_shard(text)
        texts[share.id] = share.secret_bytes()
    assert texts == {i: s.secret_bytes() for i, s in SHARES.items()}

    # A new Nexus on the same data dir (keepers all lost) takes two of them back.
    node.custody.forget(node.driver.clock)
    assert node.custody.phase is Phase.RECOVERING
    for path in files[1:]:
        assert restore_text(node, path.read_text())[0] == 0
    assert node.custody.phase is Phase.READY


def test_recover_replaces_stale_files_with_private_ones(node: Node, tmp_path: Path) -> None:
    unlock(node, SHARES)
    target = tmp_path / "out"
    target.mkdir()
    stale = target / "spike.recovery.1.txt"
    stale.write_text("old\n")
    os.chmod(stale, 0o644)
    operator.recover(node.client("recover"), target, lambda line: None)
    assert stat.S_IMODE(stale.stat().st_mode) == 0o600
    assert parse_shard(stale.read_text()).secret_bytes() == SHARES[1].secret_bytes()


@pytest.mark.parametrize("who", ["superuser", "restore", "bootstrap", "nexus", "keeper-1", "/web", "nobody"])
def test_only_the_recover_role_may_export_shards(node: Node, who: str) -> None:
    unlock(node, SHARES)
    response = node.call(RECOVER_PATH, as_=who)
    assert (response.status, error_of(response.body)) == (401, "access_unauthorized")


def test_recover_waits_for_the_key_and_the_cli_says_so(node: Node, tmp_path: Path) -> None:
    response = node.call(RECOVER_PATH, as_="recover")
    assert (response.status, error_of(response.body)) == (503, "state_not_ready")
    with pytest.raises(CommandError, match="not ready"):
        operator.recover(node.client("recover"), tmp_path / "none", print)
    assert not (tmp_path / "none").exists()


def test_the_recover_answer_is_redacted_in_reprs(node: Node) -> None:
    unlock(node, SHARES)
    body = node.call(RECOVER_PATH, as_="recover").body
    answer = decode(body, operator.RecoverResponse)
    assert sorted(answer.shards) == [1, 2, 3]
    assert not leaks(repr(answer), SECRETS)
    assert not leaks(repr(operator.RestoreRequest(id=1, shard=list(SHARES[1].secret_bytes()))), SECRETS)
    assert Share(1, 1, bytes(answer.shards[1])) == SHARES[1]


def test_a_shutdown_wipes_the_restored_key_and_locks_everything_that_used_it(node: Node) -> None:
    unlock(node, SHARES)
    key = node.custody.root_key
    assert key.secret_bytes() == ROOT_KEY
    assert node.call("/v1/store/secrets", {"path": "a/b", "values": {"k": "v"}}).status == 200
    node.custody.forget(node.driver.clock)  # what `spike nexus` does once it stops serving
    node.driver.dispatch()
    assert bytes(key._buf) == bytes(32)  # overwritten in place, not just dropped
    assert node.custody.phase is Phase.RECOVERING
    assert node.call("/v1/store/secrets", {"path": "a/b"}, action="get").status == 503
    assert node.call("/v1/cipher/encrypt", {"plaintext": "aGk="}).status == 503
    assert node.cipher._aead is None and node.store._keyring is None
