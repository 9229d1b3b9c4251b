"""Which identity source configuration chose, and the settings that name it.

The transports know how to load an SVID from files or from the SPIFFE
Workload API (spike/transports/svid_files.py, workload_api.py); choosing one,
and reading the addresses and paths that name it, is configuration's job, so
it lives here, beside config.py.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import msgspec

from spike.protocol.identity import TrustDomains
from spike.transports.identity import IdentitySource
from spike.transports.svid_files import DEFAULT_CHECK_INTERVAL, SvidFileSource
from spike.transports.tls import SvidFiles
from spike.transports.workload_api import DEFAULT_WORKLOAD_API_TIMEOUT, WorkloadApiSource


class WorkloadApiSpec(msgspec.Struct, frozen=True):
    """Fetch the SVID from the SPIFFE Workload API at `address` (a ``unix://`` URI)."""

    address: str
    timeout: float = DEFAULT_WORKLOAD_API_TIMEOUT  # for the first SVID, at start


# What configuration hands to `identity_source`: SVID files, or the Workload API.
IdentitySpec = SvidFiles | WorkloadApiSpec


def workload_api_address(text: str) -> str:
    """SPIFFE_ENDPOINT_SOCKET as a ``unix://`` URI; a bare absolute path is accepted too.

    Raises ValueError for anything the `spiffe` package cannot dial (it speaks
    to unix domain sockets only).
    """
    text = text.strip()
    if text.startswith("/"):
        return f"unix://{text}"
    parts = urlsplit(text)
    if parts.scheme != "unix":
        raise ValueError(f"{text!r} is not a unix domain socket address (example: unix:///run/spire/agent.sock)")
    if parts.netloc or parts.query or parts.fragment or not parts.path.startswith("/"):
        raise ValueError(f"{text!r} is not a unix:///absolute/path address")
    return text


def identity_source(
    spec: IdentitySpec, trust: TrustDomains | None = None, *, check_interval: float = DEFAULT_CHECK_INTERVAL
) -> IdentitySource:
    """The (not yet started) source that configuration chose."""
    domains = {trust.nexus, trust.keeper, trust.bootstrap, trust.pilot} if trust is not None else set()
    if isinstance(spec, WorkloadApiSpec):
        # gRPC's fork handlers can abort a child forked while a stream is open
        # (grpc/grpc#43055); spike forks only to exec, so it needs none of them.
        # Set before the spiffe package (and gRPC) is imported, when the source starts.
        os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "false")
        return WorkloadApiSource(workload_api_address(spec.address), timeout=spec.timeout, trust_domains=domains)
    return SvidFileSource(spec, check_interval=check_interval, trust_domains=domains)
