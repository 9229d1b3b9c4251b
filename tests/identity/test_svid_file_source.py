"""`SvidFileSource`: SVID files rewritten under a running workload (as spiffe-helper does).

Atomic rewrites (write aside, rename over) and in-place ones (truncate and
write, one file after the other) are both picked up once the three files load
together; every state in between, and any broken write, keeps the previous
identity and is logged once.  Checks are cheap and rate-limited; a server
given the source's factory presents the new SVID to new connections while a
kept-alive connection carries on.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import stat
from pathlib import Path

import anyio
import pytest
from anyio.abc import SocketAttribute
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from spike.app.commands.devca import DevIdentity
from spike.app.keeper import KeeperHandler
from spike.protocol.identity import SpiffeId, TrustDomains
from spike.protocol.keeper import Keeper
from spike.protocol.wire import KEEPER_SHARD_PATH
from spike.transports import pem as pem_module
from spike.transports.client import HttpsConnection
from spike.transports.server import HttpsServer
from spike.transports.svid_files import StaticSource, SvidFileSource
from spike.transports.tls import IdentityError, SvidFiles, client_context, keeper_check
from tests.e2e.harness import presented_serial
from tests.identity.tls_probe import handshake
from tests.identity.workload_api import TestCa, serial_of

TD = "spike.test"
KEEPER = f"spiffe://{TD}/spike/keeper/1"
TRUST = TrustDomains.single(TD)


@pytest.fixture
def ca(dev_identity: DevIdentity) -> TestCa:
    return TestCa.of(dev_identity)


@pytest.fixture
def files(tmp_path: Path, ca: TestCa) -> SvidFiles:
    """Keeper 1's SVID files in a directory of their own, as spiffe-helper keeps them."""
    svid = SvidFiles(tmp_path / "svid.pem", tmp_path / "svid_key.pem", tmp_path / "svid_bundle.pem")
    cert, key = ca.mint(KEEPER)
    write_atomically(svid.cert, cert)
    write_atomically(svid.key, key)
    write_atomically(svid.bundle, ca.pem)
    return svid


@pytest.fixture
def warnings(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.WARNING, "spike.transports.identity")
    return caplog


def write_atomically(path: Path, data: bytes) -> None:
    aside = path.with_name(path.name + ".tmp")
    aside.write_bytes(data)
    os.replace(aside, path)


def write_in_place(path: Path, data: bytes) -> None:
    with path.open("r+b") as f:
        f.truncate(0)
        f.write(data)


def warned(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "do not load" in r.getMessage()]


def test_an_atomic_rewrite_is_picked_up(files: SvidFiles, ca: TestCa, dev_identity: DevIdentity) -> None:
    with SvidFileSource(files, check_interval=3600) as source:
        first = source.current.serial
        assert source.spiffe_id == SpiffeId.parse(KEEPER)
        cert, key = ca.mint(KEEPER)
        write_atomically(files.key, key)
        write_atomically(files.cert, cert)
        assert source.refresh() is True
        assert source.current.serial == serial_of(cert) != first
        assert source.generation == 2
        nexus = client_context(dev_identity.files("nexus"))
        assert handshake(source.server_context(), nexus).client_saw == serial_of(cert)
        assert source.refresh() is False  # nothing changed since


def test_a_pair_half_replaced_keeps_the_old_identity_until_the_key_follows(
    files: SvidFiles, ca: TestCa, warnings: pytest.LogCaptureFixture
) -> None:
    with SvidFileSource(files, check_interval=3600) as source:
        first = source.current.serial
        cert, key = ca.mint(KEEPER)
        write_atomically(files.cert, cert)  # the new certificate, the old key: they do not match
        assert source.refresh() is False
        assert source.refresh() is False
        assert source.current.serial == first
        write_atomically(files.key, key)
        assert source.refresh() is True
        assert source.current.serial == serial_of(cert)
    assert len(warned(warnings)) == 1
    assert "KEY_VALUES_MISMATCH" in warned(warnings)[0]


def test_an_in_place_rewrite_seen_half_written_is_picked_up_when_complete(
    files: SvidFiles, ca: TestCa, warnings: pytest.LogCaptureFixture
) -> None:
    with SvidFileSource(files, check_interval=3600) as source:
        first = source.current.serial
        cert, key = ca.mint(KEEPER)
        write_in_place(files.cert, cert[: len(cert) // 2])  # caught in the middle of the write
        assert source.refresh() is False
        write_in_place(files.cert, cert)
        assert source.refresh() is False  # whole now, but the key is still the old one
        write_in_place(files.key, key[:40])
        assert source.refresh() is False
        assert source.current.serial == first
        write_in_place(files.key, key)
        assert source.refresh() is True
        assert source.current.serial == serial_of(cert)
        assert source.failures == 3  # three broken states seen ...
    assert len(warned(warnings)) == 1  # ... one warning


def test_a_broken_write_is_ignored_and_logged_once_then_a_good_one_loads(
    files: SvidFiles, ca: TestCa, warnings: pytest.LogCaptureFixture, dev_identity: DevIdentity
) -> None:
    nexus = client_context(dev_identity.files("nexus"))
    with SvidFileSource(files, check_interval=0) as source:
        first = source.current.serial
        write_atomically(files.cert, b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n")
        for _ in range(5):
            assert handshake(source.server_context(), nexus).client_saw == first
        write_atomically(files.bundle, b"")  # and a bundle that lost its certificates
        assert handshake(source.server_context(), nexus).client_saw == first
        assert len(warned(warnings)) == 1
        assert source.generation == 1

        cert, key = ca.mint(KEEPER)
        write_atomically(files.key, key)
        write_atomically(files.cert, cert)
        write_atomically(files.bundle, ca.pem)
        assert handshake(source.server_context(), nexus).client_saw == serial_of(cert)
        assert source.generation == 2


def test_a_file_missing_for_a_while_keeps_the_identity(files: SvidFiles, warnings: pytest.LogCaptureFixture) -> None:
    with SvidFileSource(files, check_interval=0) as source:
        first = source.current.serial
        kept = files.key.read_bytes()
        files.key.unlink()
        assert source.refresh() is False
        assert source.refresh() is False
        assert source.server_context() is source.current.server
        assert source.current.serial == first
        files.key.write_bytes(kept)
        assert source.refresh() is False  # the same SVID again: nothing to rotate
        assert source.generation == 1
    assert len(warned(warnings)) == 1
    assert "cannot stat" in warned(warnings)[0]


def test_checks_are_rate_limited_and_cheap(files: SvidFiles, ca: TestCa) -> None:
    with SvidFileSource(files, check_interval=3600) as source:
        cert, key = ca.mint(KEEPER)
        write_atomically(files.key, key)
        write_atomically(files.cert, cert)
        for _ in range(100):  # connections within the interval do not look at the files
            source.server_context()
            source.client_context()
        assert source.checks == 0
        assert source.current.serial != serial_of(cert)
        source.check_interval = 0
        source.server_context()  # the next connection after the interval does
        assert source.checks == 1
        assert source.current.serial == serial_of(cert)


def test_a_rewrite_with_the_same_content_is_not_a_rotation(files: SvidFiles) -> None:
    with SvidFileSource(files, check_interval=0) as source:
        for path in (files.cert, files.key, files.bundle):
            write_atomically(path, path.read_bytes())
        assert source.refresh() is False
        assert source.generation == 1


def test_start_errors_are_one_sentence(files: SvidFiles, tmp_path: Path, ca: TestCa) -> None:
    missing = SvidFiles(files.cert, tmp_path / "nope.pem", files.bundle)
    with pytest.raises(IdentityError, match=r"^cannot read \S+nope\.pem: no such file$"):
        SvidFileSource(missing).start()
    garbage = tmp_path / "garbage.pem"
    garbage.write_bytes(b"garbage")
    with pytest.raises(IdentityError, match="invalid certificate"):
        SvidFileSource(SvidFiles(garbage, files.key, files.bundle)).start()
    # A certificate without a SPIFFE ID, or with a trust domain's ID, is no workload's SVID.
    key = ec.generate_private_key(ec.SECP256R1())
    key_file, cert_file = tmp_path / "odd-key.pem", tmp_path / "odd.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    for sans, problem in (([], "exactly one SPIFFE ID"), ([f"spiffe://{TD}"], "no path")):
        cert_file.write_bytes(_self_signed(key, sans))
        with pytest.raises(IdentityError, match=problem):
            SvidFileSource(SvidFiles(cert_file, key_file, files.bundle)).start()


def _self_signed(key: ec.EllipticCurvePrivateKey, uris: list[str]) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "odd")])
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(hours=1))
    )
    if uris:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(u) for u in uris]), critical=False
        )
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_the_static_source_never_reloads(files: SvidFiles, ca: TestCa) -> None:
    with StaticSource(files) as source:
        first = source.current.serial
        cert, key = ca.mint(KEEPER)
        write_atomically(files.key, key)
        write_atomically(files.cert, cert)
        assert source.refresh() is False
        source.server_context()
        assert source.current.serial == first


def test_without_memfd_keys_go_encrypted_to_a_private_directory_and_leave_at_once(
    files: SvidFiles, ca: TestCa, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(pem_module.PemLoader, "use_memfd", False)
    written: list[tuple[Path, bytes, int]] = []
    real = pem_module._private_file

    def spy(directory: Path, data: bytes) -> Path:
        path = real(directory, data)
        written.append((path, data, stat.S_IMODE(path.stat().st_mode)))
        return path

    monkeypatch.setattr(pem_module, "_private_file", spy)
    source = SvidFileSource(files, check_interval=0).start()
    directory = written[0][0].parent
    assert stat.S_IMODE(directory.stat().st_mode) == 0o700
    assert {mode for _, _, mode in written} == {0o600}
    keys = [data for _, data, _ in written if b"PRIVATE KEY" in data]
    assert keys
    assert all(b"ENCRYPTED PRIVATE KEY" in data for data in keys)
    assert list(directory.iterdir()) == []  # each file went as soon as OpenSSL had read it
    cert, key = ca.mint(KEEPER)
    write_atomically(files.key, key)
    write_atomically(files.cert, cert)
    assert source.refresh() is True  # and a rotation loads the same way
    assert list(directory.iterdir()) == []
    source.stop()
    assert not directory.exists()


@pytest.mark.anyio
async def test_a_server_with_the_factory_shows_new_connections_the_new_svid(
    files: SvidFiles, ca: TestCa, dev_identity: DevIdentity
) -> None:
    nexus = client_context(dev_identity.files("nexus"))
    with SvidFileSource(files, check_interval=0) as source:
        keeper = Keeper(TRUST)
        server = HttpsServer(source.server_context, KeeperHandler(keeper))
        listener = await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=0)
        port = int(listener.listeners[0].extra(SocketAttribute.local_port))
        url = f"https://127.0.0.1:{port}"
        kept_alive = HttpsConnection(url, nexus, keeper_check(TRUST, 1))
        async with anyio.create_task_group() as tg:
            tg.start_soon(server.serve, listener)
            assert (await kept_alive.request("POST", KEEPER_SHARD_PATH, b"{}"))[0] == 404
            first = source.current.serial

            cert, key = ca.mint(KEEPER)
            write_atomically(files.key, key)
            write_atomically(files.cert, cert)
            shown = await anyio.to_thread.run_sync(presented_serial, port, nexus)
            assert shown == serial_of(cert) != first
            # The connection opened before the rotation goes on as it was.
            for _ in range(3):
                assert (await kept_alive.request("POST", KEEPER_SHARD_PATH, b"{}"))[0] == 404
            assert kept_alive.connections_opened == 1
            await kept_alive.aclose()
            tg.cancel_scope.cancel()
        keeper.forget()
