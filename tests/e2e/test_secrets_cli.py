"""`spike secret` and `spike cipher` against real keepers and Nexus.

One deployment serves the whole module (starting one costs seconds); every
test uses its own paths.  What is checked is what an operator or a script
sees: exit codes, stdout (``get PATH KEY`` prints just the value), and on any
failure exactly one sentence on stderr, never a traceback: for a missing
secret, a Nexus still waiting for its shards, a refused identity, an
unreachable Nexus.  The last tests tamper with the database file and check
that Nexus refuses the value and says so in its log.
"""

from __future__ import annotations

import base64
import json
import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from spike.app.api.messages import (
    CIPHER_DECRYPT_PATH,
    CIPHER_ENCRYPT_PATH,
    SECRETS_PATH,
    CipherDecryptRequest,
    CipherDecryptResponse,
    CipherEncryptRequest,
    CipherEncryptResponse,
    SecretGetRequest,
    SecretGetResponse,
    SecretPutRequest,
    SecretPutResponse,
)
from spike.app.api.messages import CIPHER_MAX_OVERHEAD as MAX_OVERHEAD
from spike.app.api.messages import CIPHER_MAX_PLAINTEXT as MAX_PLAINTEXT
from spike.app.commands.devca import DevIdentity
from spike.app.store.sqlite_schema import DB_NAME
from tests.e2e.harness import CliResult, Cluster, SecretsSeen, pick_port, swept

pytestmark = pytest.mark.e2e

PASSWORD = "hunter2-Vz71"  # distinctive: grepped for in every output and log


@pytest.fixture(scope="module")
def c(
    dev_identity: DevIdentity, tmp_path_factory: pytest.TempPathFactory, secrets_seen: SecretsSeen
) -> Iterator[Cluster]:
    with swept(
        Cluster(dev_identity, tmp_path_factory.mktemp("secrets-cli")), secrets_seen, "test_secrets_cli"
    ) as cluster:
        cluster.start_ready()
        yield cluster


def ok(result: CliResult) -> CliResult:
    assert result.returncode == 0, result
    assert result.stderr == "", result
    return result


def fails(result: CliResult, code: int, sentence: str) -> CliResult:
    """A failure is a non-zero exit code and one line on stderr, with nothing on stdout."""
    assert result.returncode == code, result
    assert result.stdout == "", result
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result
    assert lines[0].startswith("spike "), result
    assert sentence in lines[0], result
    return result


def put(c: Cluster, path: str, values: dict[str, str]) -> int:
    with c.client() as nexus:
        request = SecretPutRequest(path=path, values=values)
        return nexus.call(SECRETS_PATH, request, SecretPutResponse).version


def read(c: Cluster, path: str, version: int = 0) -> tuple[int, dict[str, str]]:
    with c.client() as nexus:
        got = nexus.call(SECRETS_PATH, SecretGetRequest(path=path, version=version), SecretGetResponse, action="get")
    return got.version, got.data


# ---------------------------------------------------------------------- reading and writing


def test_put_get_list(c: Cluster) -> None:
    assert ok(c.run("secret", "put", "one/app", "user=admin", f"password={PASSWORD}")).stdout == (
        "wrote one/app version 1\n"
    )
    assert ok(c.run("secret", "get", "one/app", "password")).stdout == f"{PASSWORD}\n"  # just the value
    assert ok(c.run("secret", "get", "one/app")).stdout == f"password: {PASSWORD}\nuser: admin\n"
    assert ok(c.run("secret", "put", "one/app", "password=second", "--cas", "1", "--format", "json")).json() == {
        "path": "one/app",
        "version": 2,
    }
    assert ok(c.run("secret", "get", "one/app", "--version", "1", "--format", "json")).json() == {
        "data": {"user": "admin", "password": PASSWORD},
        "version": 1,
    }
    put(c, "one/other", {"k": "v"})
    put(c, "onex", {"k": "v"})
    assert ok(c.run("secret", "list", "one/")).stdout == "one/app\none/other\n"


def test_values_from_a_file_and_from_stdin(c: Cluster, tmp_path: Path) -> None:
    values = tmp_path / "values.json"
    values.write_text(json.dumps({"user": "svc", "password": PASSWORD}))
    ok(c.run("secret", "put", "file/a", "--file", str(values)))
    assert read(c, "file/a") == (1, {"user": "svc", "password": PASSWORD})

    ok(c.run("secret", "put", "file/b", "--file", "-", stdin=json.dumps({"token": PASSWORD}).encode()))
    assert read(c, "file/b") == (1, {"token": PASSWORD})

    pem = "-----BEGIN KEY-----\nMIIB\u00e9\n-----END KEY-----"
    ok(c.run("secret", "put", "file/c", "--stdin", "pem", "extra=1", stdin=(pem + "\n").encode()))
    assert read(c, "file/c") == (1, {"pem": pem, "extra": "1"})
    assert ok(c.run("secret", "get", "file/c", "pem")).stdout == pem + "\n"

    fails(c.run("secret", "put", "file/d", "--file", str(tmp_path / "absent.json")), 2, "cannot read")
    fails(c.run("secret", "put", "file/d", "--file", "-", stdin=b'{"k": 1}'), 2, "JSON object of strings")
    fails(c.run("secret", "put", "file/d", "--stdin", "k", stdin=b"\xff\xfe"), 2, "not UTF-8")


def test_versions_metadata_and_purge(c: Cluster) -> None:
    for n in (1, 2, 3):
        put(c, "ver/app", {"n": str(n)})
    assert ok(c.run("secret", "delete", "ver/app")).stdout == "deleted the current version of ver/app\n"
    fails(c.run("secret", "get", "ver/app"), 1, "no readable version of ver/app")
    assert ok(c.run("secret", "undelete", "ver/app", "--versions", "3")).stdout == "undeleted version 3 of ver/app\n"
    assert (
        ok(c.run("secret", "destroy", "ver/app", "--versions", "1,2")).stdout
        == "destroyed versions 1 and 2 of ver/app\n"
    )
    fails(c.run("secret", "get", "ver/app", "--version", "1"), 1, "version 1 of ver/app does not exist")
    assert read(c, "ver/app") == (3, {"n": "3"})

    ok(c.run("secret", "tune", "ver/app", "--max-versions", "5", "--cas-required", "true", "--custom", "owner=ops"))
    meta = ok(c.run("secret", "metadata", "ver/app", "--format", "json")).json()
    assert meta["metadata"]["maxVersions"] == 5 and meta["metadata"]["casRequired"] is True
    assert meta["metadata"]["customMetadata"] == {"owner": "ops"}
    assert {n: v["destroyed"] for n, v in meta["versions"].items()} == {"1": True, "2": True, "3": False}
    human = ok(c.run("secret", "metadata", "ver/app")).stdout
    assert "current version 3" in human and "custom owner: ops" in human and "version 1:" in human
    fails(c.run("secret", "put", "ver/app", "n=4"), 1, "rejected the request: this secret requires check-and-set")
    ok(c.run("secret", "put", "ver/app", "n=4", "--cas", "3"))

    assert ok(c.run("secret", "purge", "ver/app")).stdout == "deleted ver/app with all its versions and metadata\n"
    fails(c.run("secret", "metadata", "ver/app"), 1, "there is no secret at ver/app")


@pytest.fixture(scope="module")
def seeded(c: Cluster) -> Cluster:
    put(c, "err/app", {"password": PASSWORD})
    return c


@pytest.mark.parametrize(
    ("args", "options", "code", "sentence"),
    [
        (["get", "err/absent"], {}, 1, "no readable version of err/absent (no such secret, or deleted or destroyed)"),
        (["get", "err/app", "--version", "7"], {}, 1, "version 7 of err/app does not exist"),
        (["get", "err/app", "user"], {}, 1, "err/app (version 1) has no key 'user'"),
        (["put", "err/app", "k=v", "--cas", "0"], {}, 1, "check-and-set failed: err/app is not at version 0"),
        (["delete", "err/absent"], {}, 1, "there is no secret at err/absent"),
        (["put", "err//app", "k=v"], {}, 2, "path must be segments"),
        (["put", "err/app"], {}, 2, "values is empty"),
        (["put", "err/app", "bad:key=v"], {}, 2, "key names are"),  # a space is SPIKE's, allowed (issue 17)
        (["get", "err/app"], {"identity": "pilot-recover"}, 1, "Nexus refused this identity"),
        (["put", "err/app", "k=v"], {"identity": "bootstrap"}, 1, "Nexus refused this identity"),
        (["get", "err/app"], {"unreachable": True}, 1, "is unreachable: connection refused"),
    ],
    ids=[
        "not found",
        "no such version",
        "no such key",
        "cas conflict",
        "delete not found",
        "bad path",
        "no values",
        "bad key",
        "refused recover",
        "refused bootstrap",
        "unreachable",
    ],
)
def test_errors_are_one_sentence_and_a_non_zero_exit(
    seeded: Cluster, args: list[str], options: dict[str, Any], code: int, sentence: str
) -> None:
    env = {"SPIKE_NEXUS_API_URL": f"https://127.0.0.1:{pick_port()}"} if options.get("unreachable") else None
    result = seeded.run("secret", *args, identity=options.get("identity", "pilot-superuser"), env=env)
    fails(result, code, sentence)
    assert read(seeded, "err/app") == (1, {"password": PASSWORD})  # nothing changed


def test_not_ready_while_nexus_waits_for_shards(seeded: Cluster) -> None:
    """Two keepers hang (SIGSTOP) and Nexus restarts: it cannot rebuild its key, and says so."""
    c = seeded
    for keeper_id in (1, 2):
        c.keeper(keeper_id).pause()
    try:
        c.kill("nexus")
        c.start_nexus()
        c.wait_status(lambda s: s["phase"] != "ready" and s["shards_needed"] == 1, "waiting for one more shard")
        waiting = "Nexus is not ready: it is waiting for the shards of its root key"
        for args in (["get", "err/app", "password"], ["list"], ["metadata", "err/app"]):  # reads: nothing to change
            said = fails(c.run("secret", *args), 1, f"{waiting}; try again once `spike status` says ready")
            assert "nothing was changed" not in said.stderr
        for args in (["put", "err/app", "k=v"], ["delete", "err/app"], ["purge", "err/app"]):
            fails(
                c.run("secret", *args), 1, f"{waiting}; nothing was changed; try again once `spike status` says ready"
            )
    finally:
        for keeper_id in (1, 2):
            c.keeper(keeper_id).resume()
    c.wait_ready()
    assert ok(c.run("secret", "get", "err/app", "password")).stdout == f"{PASSWORD}\n"
    assert read(c, "err/app") == (1, {"password": PASSWORD})  # the refused put wrote nothing


# ---------------------------------------------------------------------- encryption as a service


def test_cipher_round_trips_and_the_size_limit(c: Cluster, tmp_path: Path) -> None:
    largest = tmp_path / "largest.bin"
    largest.write_bytes(os.urandom(MAX_PLAINTEXT))
    sealed, opened = tmp_path / "sealed.bin", tmp_path / "opened.bin"
    ok(c.run("cipher", "encrypt", "--in", str(largest), "--out", str(sealed)))
    assert sealed.stat().st_size == MAX_PLAINTEXT + MAX_OVERHEAD
    ok(c.run("cipher", "decrypt", "--in", str(sealed), "--out", str(opened)))
    assert opened.read_bytes() == largest.read_bytes()

    # Standard input to standard output.
    small = tmp_path / "small.bin"
    ok(c.run("cipher", "encrypt", "--out", str(small), stdin=PASSWORD.encode()))
    assert PASSWORD.encode() not in small.read_bytes()
    assert ok(c.run("cipher", "decrypt", stdin=small.read_bytes())).stdout == PASSWORD

    tampered = bytearray(small.read_bytes())
    tampered[-1] ^= 1
    fails(c.run("cipher", "decrypt", stdin=bytes(tampered)), 1, "the ciphertext does not open under this Nexus's")
    largest.write_bytes(largest.read_bytes() + b"!")
    fails(c.run("cipher", "encrypt", "--in", str(largest)), 2, "is more than Nexus encrypts at once")


def test_cipher_json_mode(c: Cluster) -> None:
    """The JSON (base64) form, as an application would call it, up to the largest plaintext."""
    with c.client() as nexus:
        for plaintext in (b"", PASSWORD.encode(), os.urandom(MAX_PLAINTEXT)):
            sealed = nexus.call(CIPHER_ENCRYPT_PATH, CipherEncryptRequest(plaintext=plaintext), CipherEncryptResponse)
            request = CipherDecryptRequest(version=sealed.version, nonce=sealed.nonce, ciphertext=sealed.ciphertext)
            opened = nexus.call(CIPHER_DECRYPT_PATH, request, CipherDecryptResponse)
            assert opened.plaintext == plaintext
        # The same ciphertext in the stream form.
        blob = bytes([sealed.version]) + sealed.nonce + sealed.ciphertext
        assert nexus.call_bytes(CIPHER_DECRYPT_PATH, blob) == plaintext
        too_big = base64.b64encode(os.urandom(MAX_PLAINTEXT + 1)).decode()
        status, _ = nexus._nexus.post(CIPHER_ENCRYPT_PATH, json.dumps({"plaintext": too_big}).encode())
        assert status == 400


# ---------------------------------------------------------------------- SPIKE's habits (issue 17 section 4)


def test_spikes_names_and_short_flags(c: Cluster) -> None:
    """A leading slash, a key with a space, -v for versions (0: the current one), -f for the format."""
    assert ok(c.run("secret", "put", "/habits/app", "db password=one", "-f", "j")).json() == {
        "path": "/habits/app",
        "version": 1,
    }
    ok(c.run("secret", "put", "/habits/app", "db password=two"))
    got = yaml.safe_load(ok(c.run("secret", "get", "/habits/app", "-v", "1", "-f", "yaml")).stdout)
    assert got == {"data": {"db password": "one"}, "version": 1}
    ok(c.run("secret", "delete", "/habits/app", "-v", "0"))
    assert read(c, "/habits/app", 1) == (1, {"db password": "one"})
    ok(c.run("secret", "undelete", "/habits/app", "-v", "0"))
    assert read(c, "/habits/app") == (2, {"db password": "two"})
    assert "/habits/app" in yaml.safe_load(ok(c.run("secret", "list", "/habits", "-f", "y")).stdout)["keys"]
    meta = yaml.safe_load(ok(c.run("secret", "metadata", "/habits/app", "-f", "yaml")).stdout)
    assert meta["metadata"]["currentVersion"] == 2
    usage = c.run("secret", "get", "/habits/app", "-f", "xml")  # argparse's usage error, as for any flag
    assert (usage.returncode, usage.stdout) == (2, "") and "invalid choice: 'xml'" in usage.stderr


def test_policy_list_filters_and_yaml(c: Cluster) -> None:
    pattern = "^spiffe://spike.test/workload/habits$"
    ok(c.run("policy", "create", "--name", "habits one", "--spiffeid-pattern", pattern, "--path-pattern",
             "^habits/a$", "--permissions", "read"))  # fmt: skip
    ok(c.run("policy", "create", "--name", "habits two", "--spiffeid-pattern", pattern, "--path-pattern",
             "^habits/b$", "--permissions", "read"))  # fmt: skip
    listed = yaml.safe_load(ok(c.run("policy", "list", "--path-pattern", "^habits/b$", "-f", "yaml")).stdout)
    assert [p["name"] for p in listed["policies"]] == ["habits two"]
    both = ok(c.run("policy", "list", "--spiffeid-pattern", pattern, "-f", "json")).json()
    assert sorted(p["name"] for p in both["policies"]) == ["habits one", "habits two"]
    shown = yaml.safe_load(ok(c.run("policy", "get", "habits one", "-f", "yaml")).stdout)
    assert (shown["spiffeidPattern"], shown["pathPattern"]) == (pattern, "^habits/a$")
    usage = c.run("policy", "list", "--path-pattern", "a", "--spiffeid-pattern", "b")
    assert (usage.returncode, usage.stdout) == (2, "") and "not allowed with" in usage.stderr
    ok(c.run("policy", "delete", "habits one"))
    ok(c.run("policy", "delete", "habits two"))


def test_cipher_short_flags_and_json_mode(c: Cluster, tmp_path: Path) -> None:
    """SPIKE's -f/-o, and its JSON mode: --plaintext, then --version/--nonce/--ciphertext."""
    (tmp_path / "in").write_bytes(PASSWORD.encode())
    ok(c.run("cipher", "encrypt", "-f", str(tmp_path / "in"), "-o", str(tmp_path / "sealed")))
    ok(c.run("cipher", "decrypt", "-f", str(tmp_path / "sealed"), "-o", str(tmp_path / "opened")))
    assert (tmp_path / "opened").read_bytes() == PASSWORD.encode()
    sealed = ok(c.run("cipher", "encrypt", "--plaintext", base64.b64encode(PASSWORD.encode()).decode())).json()
    assert set(sealed) == {"version", "nonce", "ciphertext"}
    args = ["--version", str(sealed["version"]), "--nonce", sealed["nonce"], "--ciphertext", sealed["ciphertext"]]
    ok(c.run("cipher", "decrypt", *args, "-o", str(tmp_path / "json-opened")))
    assert (tmp_path / "json-opened").read_bytes() == PASSWORD.encode()
    fails(c.run("cipher", "encrypt", "--plaintext", "not base64!"), 2, "--plaintext must be base64")
    fails(c.run("cipher", "decrypt", "--nonce", sealed["nonce"]), 2, "JSON mode takes --version, --nonce and")
    fails(c.run("cipher", "decrypt", *args[:-1], "!!"), 2, "--ciphertext must be base64")


# ---------------------------------------------------------------------- tampering with the file


def test_a_tampered_database_is_refused_and_reported(c: Cluster) -> None:
    """Nexus down, a byte of one sealed value flipped and another value copied to a third path."""
    put(c, "tamper/flipped", {"password": PASSWORD})
    put(c, "tamper/source", {"password": PASSWORD + "-source"})
    put(c, "tamper/target", {"password": "target"})
    put(c, "tamper/intact", {"password": "intact"})
    c.kill("nexus")
    with sqlite3.connect(c.data_dir / DB_NAME) as db:
        (blob,) = db.execute("SELECT sealed FROM secret_version WHERE path = 'tamper/flipped'").fetchone()
        flipped = bytearray(blob)
        flipped[len(flipped) // 2] ^= 0x04
        db.execute("UPDATE secret_version SET sealed = ? WHERE path = 'tamper/flipped'", (bytes(flipped),))
        db.execute(
            "UPDATE secret_version SET sealed = (SELECT sealed FROM secret_version WHERE path = 'tamper/source') "
            "WHERE path = 'tamper/target'"
        )
    nexus = c.start_nexus()
    c.wait_ready()
    for path in ("tamper/flipped", "tamper/target"):
        result = fails(c.run("secret", "get", path, "password"), 1, "Nexus failed to carry out the request")
        assert PASSWORD not in result.stderr
        (line,) = c.wait_log(nexus, rf"REFUSED TAMPERED DATA: {path} version 1")
        assert "ERROR" in line
    assert ok(c.run("secret", "get", "tamper/intact", "password")).stdout == "intact\n"
    for proc in c.history:
        assert PASSWORD not in proc.text(), proc.log
