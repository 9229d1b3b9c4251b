"""Mutual TLS with X.509 SVIDs: contexts, and the peer's SPIFFE ID.

SVIDs carry their identity in a URI SAN, not in a host name, so host name
checking is off and every connection is instead checked against the SPIFFE
ID the caller expects (client side) or authorised by route (server side).
Certificates are always required and verified against the trust bundles,
each peer against its own trust domain's (peer_trust.py).
"""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from spike.protocol.identity import Role, SpiffeId, TrustDomains, peer_spiffe_id

if TYPE_CHECKING:
    from .identity import LoadedIdentity


class IdentityError(Exception):
    """No usable X.509 SVID: the files or the Workload API do not give one; the message says why."""


class SvidFiles(msgspec.Struct, frozen=True):
    """An X.509 SVID as spiffe-helper writes it: chain, key and trust bundle in PEM.

    `bundle` is the bundle of the SVID's own trust domain (it may also hold
    other domains' CAs when each names its domain in a ``spiffe://`` URI SAN);
    `trust_bundles` gives other trust domains' bundles, one file each.
    """

    cert: Path
    key: Path
    bundle: Path
    trust_bundles: tuple[tuple[str, Path], ...] = ()  # (trust domain, PEM file)


def new_context(*, server_side: bool) -> ssl.SSLContext:
    """An mTLS context with no identity loaded yet: TLS 1.2+, peer certificates required, HTTP/1.1."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if server_side else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    if server_side:
        # No TLS 1.3 session tickets: no spike client resumes a session, and making, sending and
        # taking in the two OpenSSL sends after every handshake cost both ends: a keeper's CPU per
        # connection 15% more, a restarted Nexus ~1.2 ms for its three first polls (issue 20).
        ctx.num_tickets = 0
    else:
        ctx.check_hostname = False  # identity is the SPIFFE ID, checked after the handshake
    ctx.set_alpn_protocols(["http/1.1"])
    return ctx


def _loaded(files: SvidFiles) -> LoadedIdentity:
    from .svid_files import StaticSource

    source = StaticSource(files).start()
    source.stop()  # the contexts are built: nothing of the loading is needed any more
    return source.current


def server_context(files: SvidFiles) -> ssl.SSLContext:
    """A server context for the SVID in `files`, loaded once (an identity source follows rotations)."""
    return _loaded(files).server


def client_context(files: SvidFiles) -> ssl.SSLContext:
    """A client context for the SVID in `files`, loaded once (an identity source follows rotations)."""
    return _loaded(files).client


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
