"""Exceptions of the protocol core, split by whose fault they are.

Like h11, we separate mistakes made by the code that drives the core
(`LocalProtocolError`) from bad input received from a peer
(`RemoteProtocolError`).  The Nexus custody machine never lets a
`RemoteProtocolError` escape: a peer's bad answer becomes a report.
"""

from __future__ import annotations


class SpikeError(Exception):
    """Base class of every error raised by `spike.protocol`."""


class LocalProtocolError(SpikeError):
    """The caller used the core wrongly (bad arguments, wrong phase)."""


class RemoteProtocolError(SpikeError):
    """A peer sent something that breaks the wire contract."""


class ShamirError(LocalProtocolError, ValueError):
    """Invalid Shamir parameters or shares (t < 1, t > n, duplicate ids, ...)."""
