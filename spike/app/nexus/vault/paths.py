"""Which requests are the Vault face's: all the router needs of it before a Vault request comes.

The face itself (face.py and its engines) is imported at its first request, not at
Nexus's start (issue 20): most Nexus never serve Vault's API.
"""

from __future__ import annotations

PREFIX = "/v1/"
# Under these, Nexus answers as SPIKE does (docs/design.md section 7); everything else under /v1/ is Vault's.
SPIKE_PREFIXES = ("/v1/store", "/v1/acl", "/v1/cipher", "/v1/operator", "/v1/bootstrap")


def is_spike_path(path: str) -> bool:
    """Whether `path` is under one of SPIKE's route prefixes (where even an unknown path is answered as SPIKE does)."""
    return any(path == prefix or path.startswith(prefix + "/") for prefix in SPIKE_PREFIXES)


def is_vault_path(path: str) -> bool:
    """Whether Nexus answers `path` as Vault does: under /v1/, and under none of SPIKE's prefixes."""
    if not path.startswith(PREFIX):
        return False
    return not is_spike_path(path)
