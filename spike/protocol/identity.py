"""SPIFFE IDs and the roles of a spike deployment.

Pure string logic: parsing follows the SPIFFE ID specification (lower-case
trust domain, no empty, ``.`` or ``..`` segments, no query, fragment, port or
user info), and roles are decided by exact IDs, never by prefixes that a
look-alike name could satisfy.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any

from .errors import LocalProtocolError

_TRUST_DOMAIN = re.compile(r"[a-z0-9._-]{1,255}")
_SEGMENT = re.compile(r"[A-Za-z0-9._-]+")
_SCHEME = "spiffe://"
MAX_ID_LENGTH = 2048


class InvalidSpiffeId(LocalProtocolError, ValueError):
    """A string is not a valid SPIFFE ID or trust domain name."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    """A parsed SPIFFE ID: ``spiffe://<trust_domain><path>``; ``str()`` gives the URI back."""

    trust_domain: str
    path: str  # "" or "/seg/seg"

    @classmethod
    def parse(cls, text: str) -> SpiffeId:
        """Parse a ``spiffe://`` URI; raises `InvalidSpiffeId` for anything the specification forbids."""
        if len(text) > MAX_ID_LENGTH:
            raise InvalidSpiffeId("SPIFFE ID is too long")
        if not text.startswith(_SCHEME):
            raise InvalidSpiffeId(f"not a spiffe:// URI: {text[:80]!r}")
        rest = text[len(_SCHEME) :]
        domain, slash, path = rest.partition("/")
        check_trust_domain(domain)
        if not slash:
            return cls(domain, "")
        for segment in path.split("/"):
            if segment in ("", ".", "..") or not _SEGMENT.fullmatch(segment):
                raise InvalidSpiffeId(f"invalid path segment in SPIFFE ID {text[:80]!r}")
        return cls(domain, "/" + path)

    def __str__(self) -> str:
        return f"{_SCHEME}{self.trust_domain}{self.path}"


def peer_spiffe_id(peer_certificate: Mapping[str, Any] | None) -> SpiffeId | None:
    """The SPIFFE ID of a verified peer certificate, in the form ``ssl.SSLSocket.getpeercert()`` gives.

    An X.509 SVID has exactly one URI SAN; a certificate with none, several,
    or an invalid one has no SPIFFE identity, and the answer is None (never an
    exception: the certificate is the peer's input).  Only pass certificates
    that TLS has verified against the trust bundle (``ssl.CERT_REQUIRED``):
    this function reads a name, it does not check signatures.
    """
    if not peer_certificate:
        return None
    sans = peer_certificate.get("subjectAltName", ())
    if not isinstance(sans, tuple | list):
        return None
    uris = [
        entry[1]
        for entry in sans
        if isinstance(entry, tuple | list) and len(entry) == 2 and entry[0] == "URI" and isinstance(entry[1], str)
    ]
    if len(uris) != 1:
        return None
    try:
        return SpiffeId.parse(uris[0])
    except InvalidSpiffeId:
        return None


def check_trust_domain(name: str) -> str:
    """Return `name` if it is a valid trust domain name, else raise `InvalidSpiffeId`."""
    if not _TRUST_DOMAIN.fullmatch(name):
        raise InvalidSpiffeId(f"invalid trust domain name {name[:80]!r}")
    return name


class Role(Enum):
    """What a SPIFFE ID may do in a deployment; `TrustDomains.role_of` maps an ID to its role."""

    NEXUS = "nexus"
    KEEPER = "keeper"
    BOOTSTRAP = "bootstrap"
    PILOT_SUPERUSER = "pilot-superuser"
    PILOT_RECOVER = "pilot-recover"
    PILOT_RESTORE = "pilot-restore"


_ROLE_PATHS = {
    Role.NEXUS: "/spike/nexus",
    Role.BOOTSTRAP: "/spike/bootstrap",
    Role.PILOT_SUPERUSER: "/spike/pilot/role/superuser",
    Role.PILOT_RECOVER: "/spike/pilot/role/recover",
    Role.PILOT_RESTORE: "/spike/pilot/role/restore",
}
_KEEPER_PREFIX = "/spike/keeper/"
_SPIKE_KEEPER_PATH = "/spike/keeper"


class KeeperIdentity(Enum):
    """How Nexus and bootstrap know a keeper by its SPIFFE ID.

    ``PER_ID`` (spike's): keeper ``k`` is ``spiffe://<td>/spike/keeper/<k>``, so a
    keeper's SVID answers for its own id only.  ``SPIKE`` (SPIKE's Go
    deployments): every keeper is ``spiffe://<td>/spike/keeper``, and which
    keeper answers is decided by the URL dialled: any keeper SVID can answer for
    any id, so one compromised keeper (or its SVID) can pose as another.  In
    that mode ``/spike/keeper/<k>`` is still accepted at keeper ``k``'s URL, so
    Go keepers and spike keepers with their own ids can be mixed.
    """

    PER_ID = "per-id"
    SPIKE = "spike"


class NexusIdentity(Enum):
    """Which SPIFFE IDs a keeper takes for Nexus (the only caller that may read its shard).

    ``EXACT`` (spike's): only ``spiffe://<td>/spike/nexus``.  ``SPIKE`` (SPIKE's Go
    keeper, spike-sdk-go ``spiffeid.IsNexus``): also every ID below it,
    ``spiffe://<td>/spike/nexus/<anything>``, so every workload registered under that
    path may read the shard and replace it: a wider set of shard readers, opt-in.
    """

    EXACT = "exact"
    SPIKE = "spike"


@dataclass(frozen=True, slots=True)
class TrustDomains:
    """Which trust domain each role's SVIDs come from.

    SPIKE configures these separately (``SPIKE_TRUST_ROOT_NEXUS`` and friends)
    so that, for instance, pilots can live in another domain than servers.
    """

    nexus: str = "spike.ist"
    keeper: str = "spike.ist"
    bootstrap: str = "spike.ist"
    pilot: str = "spike.ist"
    keeper_identity: KeeperIdentity = KeeperIdentity.PER_ID
    nexus_identity: NexusIdentity = NexusIdentity.EXACT  # a keeper's reading of Nexus's ID

    @classmethod
    def single(cls, domain: str) -> TrustDomains:
        """Every role in one trust domain (the usual deployment)."""
        check_trust_domain(domain)
        return cls(domain, domain, domain, domain)

    def __post_init__(self) -> None:
        for name in (self.nexus, self.keeper, self.bootstrap, self.pilot):
            check_trust_domain(name)

    def _domain(self, role: Role) -> str:
        if role is Role.NEXUS:
            return self.nexus
        if role is Role.KEEPER:
            return self.keeper
        if role is Role.BOOTSTRAP:
            return self.bootstrap
        return self.pilot

    def id_of(self, role: Role, keeper_id: int | None = None) -> SpiffeId:
        """The SPIFFE ID that holds `role` (a keeper's needs its `keeper_id`: ``/spike/keeper/<id>``).

        With SPIKE's keeper identity, every keeper's is ``/spike/keeper``.
        """
        if role is Role.KEEPER:
            if self.keeper_identity is KeeperIdentity.SPIKE:
                return SpiffeId(self.keeper, _SPIKE_KEEPER_PATH)
            if keeper_id is None:
                raise LocalProtocolError("a keeper's SPIFFE ID needs its keeper id")
            return SpiffeId(self.keeper, f"{_KEEPER_PREFIX}{keeper_id}")
        return SpiffeId(self._domain(role), _ROLE_PATHS[role])

    def role_of(self, peer: SpiffeId | None) -> Role | None:
        """The role a peer's ID grants, or None for any other ID."""
        if peer is None:
            return None
        for role, path in _ROLE_PATHS.items():
            if peer.path == path and peer.trust_domain == self._domain(role):
                return role
        if (
            self.nexus_identity is NexusIdentity.SPIKE
            and peer.trust_domain == self.nexus
            and peer.path.startswith(_ROLE_PATHS[Role.NEXUS] + "/")  # a SPIFFE ID's path never ends in "/"
        ):
            return Role.NEXUS
        if peer.trust_domain == self.keeper and peer.path.startswith(_KEEPER_PREFIX):
            suffix = peer.path[len(_KEEPER_PREFIX) :]
            if suffix.isdigit() and not suffix.startswith("0"):
                return Role.KEEPER
        if (
            self.keeper_identity is KeeperIdentity.SPIKE
            and peer.trust_domain == self.keeper
            and peer.path == _SPIKE_KEEPER_PATH
        ):
            return Role.KEEPER
        return None

    def is_keeper(self, peer: SpiffeId | None, keeper_id: int) -> bool:
        """True only for an ID that may be keeper `keeper_id`: check it before sending that keeper anything.

        Keeper `keeper_id`'s own ID; with SPIKE's keeper identity also the one
        ID every SPIKE keeper has (the URL then decides which keeper it is).
        """
        if peer is None:
            return False
        if self.keeper_identity is KeeperIdentity.SPIKE and peer == SpiffeId(self.keeper, _SPIKE_KEEPER_PATH):
            return True
        return peer == SpiffeId(self.keeper, f"{_KEEPER_PREFIX}{keeper_id}")
