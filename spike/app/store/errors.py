"""What a storage backend raises, whatever the database: one home for every storage error.

The API maps them once: `DatabaseUnavailable` answers 503 (try again, nothing was written),
`OutcomeUnknown` answers 503 too but says the write may have happened, `EpochUsed` (a bootstrap
with an epoch already used) and `RotationUnderWay` (a data-key rotation while a root key
rotation is stored) are a 409, and any other
`StorageError` is a 500 whose message goes to the log.
"""

from __future__ import annotations


class StorageError(Exception):
    """The database cannot be opened, read or written; the message says why."""


class DatabaseUnavailable(StorageError):
    """The database cannot be reached or did not answer in time: try again later (HTTP 503)."""


class OutcomeUnknown(StorageError):
    """The connection broke while a commit was under way and whether it happened could not be learnt."""


class EpochUsed(StorageError):
    """A key record whose epoch is not above every epoch the deployment used: refused, nothing changed (409)."""


class RotationUnderWay(StorageError):
    """The data key cannot change while a root key rotation is stored (its keyring is wrapped already): 409."""
