"""Mutual TLS with X.509 SVIDs: contexts, and the peer's SPIFFE ID.

SVIDs carry their identity in a URI SAN, not in a host name, so host name
checking is off and every connection is instead checked against the SPIFFE
ID the caller expects (client side) or authorised by route (server side).
Certificates are always required and verified against the trust bundle.
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from spike.protocol.identity import InvalidSpiffeId, Role, SpiffeId, TrustDomains


class IdentityError(Exception):
    """The SVID files cannot be loaded or do not form a usable identity."""


@dataclass(frozen=True, slots=True)
class SvidFiles:
    """An X.509 SVID as spiffe-helper writes it: chain, key and trust bundle in PEM."""

    cert: Path
    key: Path
    bundle: Path


def _base_context(purpose: int, files: SvidFiles) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(str(files.cert), str(files.key))
        ctx.load_verify_locations(cafile=str(files.bundle))
    except FileNotFoundError as exc:
        raise IdentityError(f"cannot read {exc.filename}: no such file") from None
    except PermissionError as exc:
        raise IdentityError(f"cannot read {exc.filename}: permission denied") from None
    except ssl.SSLError as exc:
        raise IdentityError(f"invalid certificate, key or bundle ({exc.reason or exc})") from None
    return ctx


def server_context(files: SvidFiles) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_SERVER, files)
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def client_context(files: SvidFiles) -> ssl.SSLContext:
    ctx = _base_context(ssl.PROTOCOL_TLS_CLIENT, files)
    ctx.check_hostname = False  # identity is the SPIFFE ID, checked after the handshake
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def spiffe_id_of(peer_certificate: dict[str, Any] | None) -> SpiffeId | None:
    """The SPIFFE ID in a verified peer certificate (as `getpeercert()` gives it).

    An X.509 SVID has exactly one URI SAN; a certificate with none, several,
    or an invalid one has no SPIFFE identity.
    """
    if not peer_certificate:
        return None
    uris = [value for kind, value in peer_certificate.get("subjectAltName", ()) if kind == "URI"]
    if len(uris) != 1:
        return None
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId:
        return None


PeerCheck = Callable[[SpiffeId | None], bool]


def role_check(trust: TrustDomains, role: Role) -> PeerCheck:
    """Accept a server whose SPIFFE ID grants `role`."""

    def check(peer: SpiffeId | None) -> bool:
        return trust.role_of(peer) is role

    return check


def keeper_check(trust: TrustDomains, keeper_id: int) -> PeerCheck:
    """Accept only the keeper with this id: a keeper at the wrong address is refused."""

    def check(peer: SpiffeId | None) -> bool:
        return trust.is_keeper(peer, keeper_id)

    return check
