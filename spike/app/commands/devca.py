"""A throw-away development trust domain: a CA and one X.509 SVID per role.

For local deployments and tests only; production identities come from SPIRE
(or any SPIFFE issuer).  Keys are written with mode 0600 in a 0700 directory.
Re-running on the same directory keeps the CA and re-mints only the SVIDs
that are missing or about to expire.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import ipaddress
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from spike.protocol.identity import KeeperIdentity, Role, TrustDomains
from spike.transports.tls import SvidFiles

CA_CERT = "bundle.pem"
CA_KEY = "ca-key.pem"
# The names a client dialling Nexus on this machine checks its certificate against (hvac, `bao`, Go's
# TLS): a Vault client verifies the host name or IP it dials, which a SPIFFE ID alone does not satisfy.
NEXUS_SERVER_NAMES = ("localhost", "127.0.0.1")
# SPIKE registers every keeper with one SPIFFE ID: its SVID's files are keeper.pem and keeper-key.pem.
SPIKE_KEEPER = "keeper"
ROLES = {
    "nexus": Role.NEXUS,
    "bootstrap": Role.BOOTSTRAP,
    "pilot-superuser": Role.PILOT_SUPERUSER,
    "pilot-recover": Role.PILOT_RECOVER,
    "pilot-restore": Role.PILOT_RESTORE,
}


@dataclass(frozen=True, slots=True)
class DevIdentity:
    directory: Path
    trust_domain: str

    def files(self, name: str) -> SvidFiles:
        return SvidFiles(
            self.directory / f"{name}.pem",
            self.directory / f"{name}-key.pem",
            self.directory / CA_CERT,
        )

    def keeper(self, keeper_id: int) -> SvidFiles:
        return self.files(f"keeper-{keeper_id}")

    def spike_keeper(self) -> SvidFiles:
        """The SVID of SPIKE's one keeper ID, `spiffe://<td>/spike/keeper`, which every keeper may present."""
        return self.files(SPIKE_KEEPER)


def _write(path: Path, data: bytes, mode: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _load_or_make_ca(
    directory: Path, trust_domain: str, now: dt.datetime
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    cert_path, key_path = directory / CA_CERT, directory / CA_KEY
    if cert_path.exists() and key_path.exists():
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        ca_domain = uris.get_values_for_type(x509.UniformResourceIdentifier)
        if ca_domain == [f"spiffe://{trust_domain}"] and isinstance(key, ec.EllipticCurvePrivateKey):
            return cert, key
        raise ValueError(f"{directory} holds a CA for another trust domain ({ca_domain})")
    cert, key = new_ca(
        trust_domain, "spike dev CA", not_before=now - dt.timedelta(minutes=5), not_after=now + dt.timedelta(days=3650)
    )
    _write(key_path, _key_pem(key), 0o600)
    _write(cert_path, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return cert, key


def new_ca(
    trust_domain: str,
    label: str,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    names_trust_domain: bool = True,
) -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    """A self-signed CA for `trust_domain`, and its key.

    Its URI SAN is the trust domain's SPIFFE ID (``spiffe://<trust domain>``, as
    SPIRE's CAs): that says which domain it serves when a bundle holds several.
    `names_trust_domain=False` leaves the SAN out (tests of bundles that do not say).
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{label} for {trust_domain}")])
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if names_trust_domain:
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"spiffe://{trust_domain}")])
        builder = builder.add_extension(san, critical=False)
    return builder.sign(key, hashes.SHA256()), key


def mint_svid(
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
    spiffe_id: str,
    *,
    not_before: dt.datetime,
    not_after: dt.datetime,
    server_names: Iterable[str] = (),
    common_name: str | None = None,
) -> tuple[bytes, bytes]:
    """(certificate PEM, key PEM) of an X.509 SVID for `spiffe_id`, signed by the CA.

    `server_names` (host names or IP addresses) go beside the SPIFFE ID as DNS and IP SANs, as
    SPIRE's `-dns` does: spike's peers read only the URI SAN, clients that verify a host name
    (Vault clients) read these.  `common_name` is for peers that want one (OpenBao's cert auth
    names its identity alias after it); spike never reads it.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(spiffe_id)]
    sans.extend(_server_name(name) for name in server_names)
    subject = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "spike dev")]
    if common_name is not None:
        subject.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def check_server_names(names: Iterable[str]) -> list[str]:
    """The names, each once; `ValueError` naming the first that is neither an IP address nor a DNS name."""
    unique = list(dict.fromkeys(names))
    for name in unique:
        _server_name(name)
    return unique


def _server_name(name: str) -> x509.GeneralName:
    """An IP SAN for an address, a DNS SAN for anything else (`ValueError` for an unusable name)."""
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        pass
    labels = name.rstrip(".").split(".")
    if not name or len(name) > 253 or not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ValueError(f"{name!r} is neither an IP address nor a DNS name")
    return x509.DNSName(name)


_DNS_LABEL = re.compile(r"(\*|[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)")


def _names_of(cert: x509.Certificate) -> set[str]:
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    ips = {str(ip) for ip in sans.get_values_for_type(x509.IPAddress)}
    return ips | set(sans.get_values_for_type(x509.DNSName))


def _still_valid(path: Path, now: dt.datetime, server_names: Iterable[str] = ()) -> bool:
    if not path.exists():
        return False
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    if not {str(ipaddress.ip_address(n)) if _is_ip(n) else n for n in server_names} <= _names_of(cert):
        return False  # minted before these names were asked for: mint it again with them
    return cert.not_valid_after_utc - now > dt.timedelta(days=7)


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def mint_dev_identity(
    directory: Path,
    trust_domain: str,
    keeper_ids: Iterable[int],
    *,
    validity_days: int = 90,
    nexus_names: Iterable[str] = (),
    spike_keeper: bool = False,
) -> DevIdentity:
    """Create (or top up) a development CA and SVIDs for every role and keeper.

    With `spike_keeper`, also the SVID of SPIKE's one keeper ID (`spiffe://<td>/spike/keeper`,
    `DevIdentity.spike_keeper`), for keepers run as SPIKE registers them, under a Nexus and
    bootstrap with `--keeper-identity spike` (docs/spike-keepers.md).

    Nexus's SVID also names `NEXUS_SERVER_NAMES` and `nexus_names` (DNS or IP SANs), so that
    clients which check the name they dial (Vault clients) accept it without turning
    verification off.  `ValueError` for a name that is neither.
    """
    names = check_server_names([*NEXUS_SERVER_NAMES, *nexus_names])  # before anything is written
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    now = dt.datetime.now(dt.UTC)
    ca_cert, ca_key = _load_or_make_ca(directory, trust_domain, now)
    trust = TrustDomains.single(trust_domain)
    identity = DevIdentity(directory, trust_domain)
    wanted = {name: str(trust.id_of(role)) for name, role in ROLES.items()}
    for keeper_id in keeper_ids:
        wanted[f"keeper-{keeper_id}"] = str(trust.id_of(Role.KEEPER, keeper_id))
    if spike_keeper:
        spike_trust = dataclasses.replace(trust, keeper_identity=KeeperIdentity.SPIKE)
        wanted[SPIKE_KEEPER] = str(spike_trust.id_of(Role.KEEPER))
    for name, spiffe_id in wanted.items():
        files = identity.files(name)
        server_names = names if name == "nexus" else []
        if _still_valid(files.cert, now, server_names) and files.key.exists():
            continue
        cert_pem, key_pem = mint_svid(
            ca_cert,
            ca_key,
            spiffe_id,
            not_before=now - dt.timedelta(minutes=5),
            not_after=now + dt.timedelta(days=validity_days),
            server_names=server_names,
        )
        _write(files.key, key_pem, 0o600)
        _write(files.cert, cert_pem + ca_cert.public_bytes(serialization.Encoding.PEM), 0o644)
    return identity
