"""Issue 18 through the CLI, with real processes: every refusal says why, in one line, at the client.

The mistakes a new user makes (a put on a secret that requires check-and-set, a put under
``spike/``, decrypting garbage) print Nexus's reason instead of "see its log"; the small wordings
(destroyed versions, check-and-set required, policy list columns, a missing path); `spike cipher
encrypt` refuses to write binary to a terminal and has ``--armor``; and after `bootstrap --force`
a secret of the old key reads as "cannot read ... (bootstrap --force)" and its metadata as
unreadable.  The last test replaces the key, so it runs last in this module's deployment.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from spike.app.commands.devca import DevIdentity
from tests.e2e.harness import CLI_TIMEOUT, SPIKE, CliResult, Cluster, SecretsSeen, swept

pytestmark = pytest.mark.e2e

PASSWORD = "reasons-Qx81-secret"  # grepped for in every output and log


@pytest.fixture(scope="module")
def c(
    dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory, secrets_seen: SecretsSeen
) -> Iterator[Cluster]:
    with swept(Cluster(dev_identity, tmp_path_factory.mktemp("reasons")), secrets_seen, "test_e2e_reasons") as cluster:
        cluster.start_ready()
        yield cluster


def ok(result: CliResult) -> CliResult:
    assert result.returncode == 0 and result.stderr == "", result
    return result


def fails(result: CliResult, code: int, line: str) -> None:
    """One line on stderr, exactly `line` after the command's name, and a non-zero exit."""
    assert result.returncode == code and result.stdout == "", result
    (said,) = result.stderr.splitlines()
    assert said.split(": ", 1)[1] == line, result


def test_check_and_set_required_says_so(c: Cluster) -> None:
    ok(c.run("secret", "put", "r/cas", f"password={PASSWORD}"))
    ok(c.run("secret", "tune", "r/cas", "--cas-required", "true"))
    fails(
        c.run("secret", "put", "r/cas", "password=other"),
        1,
        "Nexus rejected the request: this secret requires check-and-set: give the version the write replaces "
        "(cas, or --cas N)",
    )
    assert "check-and-set required: yes" in ok(c.run("secret", "metadata", "r/cas")).stdout
    ok(c.run("secret", "put", "r/cas", "password=other", "--cas", "1"))
    ok(c.run("secret", "put", "r/plain", "k=v"))
    assert "check-and-set required: no" in ok(c.run("secret", "metadata", "r/plain")).stdout


def test_a_put_under_spike_says_the_path_is_reserved(c: Cluster) -> None:
    fails(
        c.run("secret", "put", "spike/mine", "k=v"),
        1,
        "Nexus rejected the request: paths under spike/ are reserved for the system",
    )


def test_decrypting_garbage_says_why(c: Cluster) -> None:
    fails(
        c.run("cipher", "decrypt", stdin=b"garbage that is no ciphertext"),
        1,
        "Nexus rejected the request: not a ciphertext of `spike cipher encrypt`: unknown version byte, or too short",
    )
    fails(
        c.run("cipher", "decrypt", stdin=b"\x01" + bytes(12) + bytes(17)),
        1,
        "Nexus rejected the request: the ciphertext does not open under this Nexus's cipher key: damaged, "
        "or sealed by another deployment",
    )


def test_missing_paths_and_versions_are_said_plainly(c: Cluster) -> None:
    for action in ("delete", "undelete", "destroy", "metadata", "purge"):
        fails(c.run("secret", action, "r/absent"), 1, "there is no secret at r/absent")
    for n in (1, 2, 3):
        ok(c.run("secret", "put", "r/versions", f"n={n}"))
    assert ok(c.run("secret", "destroy", "r/versions", "--versions", "1")).stdout == (
        "destroyed version 1 of r/versions\n"
    )
    assert ok(c.run("secret", "delete", "r/versions", "--versions", "2,3")).stdout == (
        "deleted versions 2 and 3 of r/versions\n"
    )
    fails(c.run("secret", "metadata", "r/versions", "--version", "9"), 1, "r/versions has no version 9")


def test_policy_list_columns_are_aligned(c: Cluster) -> None:
    for name in ("a", "a-much-longer-name"):
        ok(
            c.run(
                "policy",
                "create",
                "--name",
                name,
                "--spiffeid-pattern",
                "^spiffe://spike.test/workload/x$",
                "--path-pattern",
                f"^{name}/.*$",
                "--permissions",
                "read",
            )
        )
    rows = ok(c.run("policy", "list")).stdout.splitlines()
    assert len(rows) == 2
    ids = {row.split()[0]: row.rsplit(" ", 1)[1] for row in rows}
    assert {row.index(ids[row.split()[0]]) for row in rows} == {len("a-much-longer-name") + 2}
    fails(c.run("policy", "get", "nope"), 1, "no such policy: nope")


def run_on_a_terminal(c: Cluster, *args: str, stdin: bytes = b"") -> tuple[int, bytes, str]:
    """`spike ARGS` with its standard output on a pseudo-terminal: (exit code, what the terminal got, stderr)."""
    controller, terminal = pty.openpty()
    env = c._env(c.files("pilot-superuser"), {"SPIKE_NEXUS_API_URL": c.nexus_url})
    try:
        done = subprocess.run(
            [*SPIKE, *args],
            env=env,
            input=stdin,
            stdout=terminal,
            stderr=subprocess.PIPE,
            timeout=CLI_TIMEOUT,
            check=False,
        )
        os.close(terminal)
        terminal = -1
        shown = b""
        while select.select([controller], [], [], 0.5)[0]:
            try:
                chunk = os.read(controller, 65536)
            except OSError:  # the terminal side is closed: everything was read
                break
            if not chunk:
                break
            shown += chunk
    finally:
        if terminal != -1:
            os.close(terminal)
        os.close(controller)
    return done.returncode, shown, done.stderr.decode()


def test_encrypt_refuses_binary_on_a_terminal_and_armor_round_trips(c: Cluster, tmp_path: Path) -> None:
    code, shown, err = run_on_a_terminal(c, "cipher", "encrypt", stdin=PASSWORD.encode())
    assert (code, shown) == (2, b""), err
    assert err == (
        "spike cipher: refusing to write a binary ciphertext to a terminal: use --armor, --out FILE, "
        "or redirect the output\n"
    )
    code, shown, err = run_on_a_terminal(c, "cipher", "encrypt", "--armor", stdin=PASSWORD.encode())
    assert code == 0 and err == "", err
    text = shown.replace(b"\r\n", b"\n")  # the terminal's line discipline
    assert text.startswith(b"-----BEGIN SPIKE CIPHERTEXT-----\n") and text.endswith(b"-----END SPIKE CIPHERTEXT-----\n")
    assert PASSWORD.encode() not in text
    # Armored input decrypts as it is, from stdin or a file; so does binary.
    assert ok(c.run("cipher", "decrypt", stdin=text)).stdout == PASSWORD
    armored = tmp_path / "sealed.asc"
    ok(c.run("cipher", "encrypt", "-a", "--out", str(armored), stdin=b"second"))
    assert ok(c.run("cipher", "decrypt", "--in", str(armored))).stdout == "second"
    binary = tmp_path / "sealed.bin"
    ok(c.run("cipher", "encrypt", "--out", str(binary), stdin=b"third"))
    assert ok(c.run("cipher", "decrypt", "--in", str(binary))).stdout == "third"
    # Damaged armor is refused by the CLI, before Nexus.
    fails(
        c.run("cipher", "decrypt", stdin=text.replace(b"-----END SPIKE CIPHERTEXT-----\n", b"")),
        2,
        "the armored ciphertext has no END line: it is cut short",
    )
    lines = text.splitlines()
    lines[1] = b"!!!" + lines[1][3:]
    fails(
        c.run("cipher", "decrypt", stdin=b"\n".join(lines) + b"\n"),
        2,
        "the armored ciphertext is damaged: its body is not base64",
    )


def test_after_bootstrap_force_an_old_secret_says_its_key_is_gone(c: Cluster) -> None:
    """Runs last: it replaces the deployment's key."""
    ok(c.run("secret", "put", "r/old", f"password={PASSWORD}"))
    assert ok(c.bootstrap("--force")).returncode == 0
    c.wait_status(lambda s: s["phase"] == "ready" and s["epoch"] == 2, "epoch 2 ready")
    result = c.run("secret", "get", "r/old", "password")
    assert result.returncode == 1 and result.stdout == "", result
    (said,) = result.stderr.splitlines()
    assert said.startswith("spike secret: cannot read r/old: r/old version 1 was sealed under "), said
    assert said.endswith(
        "no longer exists: the root key it belonged to was replaced (bootstrap --force); write it again"
    )
    assert (
        "unreadable: sealed under a data key that no longer exists" in ok(c.run("secret", "metadata", "r/old")).stdout
    )
    ok(c.run("secret", "put", "r/old", "password=new"))
    assert ok(c.run("secret", "get", "r/old", "password")).stdout == "new\n"
