"""Handing an SVID to OpenSSL: PEM and key loading, the leaf's SPIFFE ID, the two TLS contexts.

Key material never goes to a regular file: OpenSSL reads certificates and
keys only from paths, so the PEM goes into an anonymous in-memory file
(`memfd_create`) read through /proc/self/fd.  Where that is unavailable the
key is written encrypted under a one-time password, 0600 in a private 0700
directory, deleted as soon as it is loaded; the directory goes on `close()`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import os
import ssl
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from spike.protocol.identity import InvalidSpiffeId, SpiffeId
from spike.protocol.trust import TrustBundles

from .identity import LoadedIdentity
from .peer_trust import PeerVerifier, attach
from .tls import IdentityError, new_context

if TYPE_CHECKING:
    from cryptography import x509


def _memfd_usable() -> bool:
    return hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


class PemLoader:
    """Gives OpenSSL the paths it wants without putting key material in a regular file."""

    use_memfd = _memfd_usable()

    def __init__(self) -> None:
        self._directory: Path | None = None

    @contextlib.contextmanager
    def paths(self, chain: bytes, key: bytes) -> Iterator[tuple[str, str, bytes | None]]:
        """(chain path, key path, key password) for as long as the block runs."""
        if self.use_memfd:
            fds = [_memfd(data) for data in (chain, key)]
            try:
                yield f"/proc/self/fd/{fds[0]}", f"/proc/self/fd/{fds[1]}", None
            finally:
                for fd in fds:
                    os.close(fd)
            return
        from cryptography.exceptions import UnsupportedAlgorithm
        from cryptography.hazmat.primitives import serialization

        password = os.urandom(24).hex().encode()
        try:
            private = serialization.load_pem_private_key(key, password=None)
            sealed = private.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.BestAvailableEncryption(password),
            )
        except (ValueError, TypeError, UnsupportedAlgorithm):
            sealed = key  # not a key OpenSSL could use either: let it say why
        directory = self._private_directory()
        written = [_private_file(directory, data) for data in (chain, sealed)]
        try:
            yield str(written[0]), str(written[1]), password
        finally:
            for path in written:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _private_directory(self) -> Path:
        if self._directory is None:
            import tempfile  # only where memfd is missing: a keeper stays small

            self._directory = Path(tempfile.mkdtemp(prefix="spike-svid-"))  # mode 0700
        return self._directory

    def close(self) -> None:
        if self._directory is not None:
            import shutil

            shutil.rmtree(self._directory, ignore_errors=True)
            self._directory = None


def _memfd(data: bytes) -> int:
    fd = os.memfd_create("spike-svid", os.MFD_CLOEXEC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    except BaseException:
        os.close(fd)
        raise
    return fd


def _private_file(directory: Path, data: bytes) -> Path:
    path = directory / os.urandom(8).hex()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)
    return path


class Leaf(msgspec.Struct, frozen=True):
    spiffe_id: SpiffeId
    serial: int
    not_after: dt.datetime


def _decode_leaf(chain_path: str) -> dict[str, Any] | None:
    """The leaf certificate as `getpeercert()` shows a peer's, read by the ssl module itself.

    CPython's `ssl._ssl._test_decode_cert` decodes the first certificate of a
    PEM file; reading our own leaf this way spares every keeper the ~9 MiB of
    cryptography's X.509 code.  Where it is missing, cryptography does it.
    """
    decode = getattr(getattr(ssl, "_ssl", None), "_test_decode_cert", None)
    if decode is None:
        return None
    try:
        decoded = decode(chain_path)
    except (ssl.SSLError, OSError, ValueError):
        raise IdentityError("invalid certificate, key or bundle (the certificate chain cannot be parsed)") from None
    return decoded if isinstance(decoded, dict) else None


_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def cert_time(text: str) -> dt.datetime:
    """A certificate time as the ssl module shows it (``Jun  1 12:00:00 2027 GMT``), in UTC.

    What `ssl.cert_time_to_seconds` reads, without its `time.strptime`: the first
    call of that builds locale tables, ~3 ms of the start of every process that
    loads an SVID (issue 20).  Text of another form goes to it, as before.
    """
    parts = text.split()
    if len(parts) == 5 and parts[0] in _MONTHS and parts[4] == "GMT":
        month, day, clock, year, _ = parts
        with contextlib.suppress(ValueError):
            hour, minute, second = (int(part) for part in clock.split(":"))
            return dt.datetime(int(year), _MONTHS.index(month) + 1, int(day), hour, minute, second, tzinfo=dt.UTC)
    return dt.datetime.fromtimestamp(ssl.cert_time_to_seconds(text), dt.UTC)


def leaf_identity(chain: bytes, chain_path: str, *, use_ssl_decoder: bool = True) -> Leaf:
    """The SPIFFE ID, serial and expiry of the first certificate of `chain` (also at `chain_path`).

    Read by the ssl module's decoder where it exists (see `_decode_leaf`), else by
    cryptography; `use_ssl_decoder=False` forces the latter (tests compare the two).
    """
    decoded = _decode_leaf(chain_path) if use_ssl_decoder else None
    if decoded is not None:
        uris = [value for kind, value in decoded.get("subjectAltName", ()) if kind == "URI"]
        serial = int(decoded.get("serialNumber", "0"), 16)
        not_after = cert_time(decoded["notAfter"])
    else:
        from cryptography import x509

        try:
            leaf = x509.load_pem_x509_certificates(chain)[0]
        except ValueError:
            raise IdentityError("invalid certificate, key or bundle (the certificate chain cannot be parsed)") from None
        try:
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        except x509.ExtensionNotFound:
            uris = []
        serial, not_after = leaf.serial_number, leaf.not_valid_after_utc
    if len(uris) != 1:
        raise IdentityError("the SVID certificate does not carry exactly one SPIFFE ID (URI SAN)")
    try:
        spiffe_id = SpiffeId.parse(uris[0])
    except InvalidSpiffeId as exc:
        raise IdentityError(f"the SVID certificate's URI SAN is not a SPIFFE ID: {exc}") from None
    if not spiffe_id.path:
        raise IdentityError(f"the SVID certificate's SPIFFE ID {spiffe_id} has no path: it names a trust domain")
    return Leaf(spiffe_id, serial, not_after)


# The trust bundles of an identity: given per domain (the Workload API), or read
# from files once this workload's own trust domain is known (its SVID's).
TrustSource = TrustBundles | Callable[[str], TrustBundles]


def build_identity(chain: bytes, key: bytes, trust: TrustSource, loader: PemLoader) -> LoadedIdentity:
    """Both TLS contexts for one SVID (PEM chain, PEM key) and its trust bundles; `IdentityError` if they do not load.

    OpenSSL is given every domain's CAs at once (a first filter); the
    contexts carry a `PeerVerifier` that then holds each peer to the bundle
    of its own trust domain (spike/transports/peer_trust.py).
    """
    contexts = []
    with loader.paths(chain, key) as (chain_path, key_path, password):
        leaf = leaf_identity(chain, chain_path)
        bundles = trust if isinstance(trust, TrustBundles) else trust(leaf.spiffe_id.trust_domain)
        store = bundles.all_authorities()
        verifier = PeerVerifier(bundles)
        for server_side in (True, False):
            ctx = new_context(server_side=server_side)
            try:
                ctx.load_cert_chain(chain_path, key_path, password)
                ctx.load_verify_locations(cadata=b"".join(store))
            except ssl.SSLError as exc:
                raise IdentityError(f"invalid certificate, key or bundle ({exc.reason or exc})") from None
            attach(ctx, verifier)
            contexts.append(ctx)
    digest = hashlib.sha256(chain)
    for domain in bundles.domains:
        digest.update(b"\0" + domain.encode() + b"\0" + b"".join(sorted(bundles.authorities(domain))))
    return LoadedIdentity(
        spiffe_id=leaf.spiffe_id,
        server=contexts[0],
        client=contexts[1],
        serial=leaf.serial,
        not_after=leaf.not_after,
        authorities=len(store),
        digest=digest.hexdigest(),
        bundles=bundles,
    )


def der(cert: x509.Certificate) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


def pem_chain(certs: Sequence[x509.Certificate]) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return b"".join(cert.public_bytes(serialization.Encoding.PEM) for cert in certs)
