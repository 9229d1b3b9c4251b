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

from spike.protocol.identity import Role, SpiffeId, TrustDomains, peer_spiffe_id


class IdentityError(Exception):
    """No usable X.509 SVID: the files or the Workload API do not give one; the message says why."""


@dataclass(frozen=True, slots=True)
class SvidFiles:
    """An X.509 SVID as spiffe-helper writes it: chain, key and trust bundle in PEM."""

    cert: Path
    key: Path
    bundle: Path


def new_context(*, server_side: bool) -> ssl.SSLContext:
    """An mTLS context with no identity loaded yet: TLS 1.2+, peer certificates required, HTTP/1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    if not server_side:
        ctx.check_hostname = False  # identity is the SPIFFE ID, checked after the handshake
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _base_context(server_side: bool, files: SvidFiles) -> ssl.SSLContext:
    ctx = new_context(server_side=server_side)
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
    return _base_context(True, files)


def client_context(files: SvidFiles) -> ssl.SSLContext:
    return _base_context(False, files)


def spiffe_id_of(peer_certificate: dict[str, Any] | None) -> SpiffeId | None:
    """The SPIFFE ID in a verified peer certificate (as `getpeercert()` gives it).

    An X.509 SVID has exactly one URI SAN; a certificate with none, several,
    or an invalid one has no SPIFFE identity.  The rule lives in the core
    (`spike.protocol.peer_spiffe_id`) so that embedders apply the same one.
    """
    return peer_spiffe_id(peer_certificate)


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
