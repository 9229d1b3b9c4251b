"""Who gets the root key once it is verified (the store, the cipher, the policies), and gives it back."""

from __future__ import annotations

from collections.abc import Callable

from spike.app.nexus.authorizer import Authorizer
from spike.app.nexus.cipher_api import CipherApi
from spike.app.store.backend import Backend, SecretBackend
from spike.protocol.effects import (
    KeyRecovered,
    NewerKeySeen,
    Phase,
    PhaseChanged,
    Report,
    RotationProgress,
    RotationStage,
)
from spike.protocol.material import RootKey
from spike.protocol.nexus import NexusCustody
from spike.transports.custody_driver import CustodyDriver


class KeyUsers:
    """Passes reports on, and hands the verified key to what needs it (and takes it back)."""

    def __init__(
        self,
        custody: NexusCustody,
        secrets: SecretBackend,
        cipher: CipherApi,
        authorizer: Authorizer,
        then: list[Callable[[Report], None]],
    ) -> None:
        self._custody = custody
        self._secrets = secrets
        self._cipher = cipher
        self._authorizer = authorizer
        self._then = then

    def __call__(self, report: Report) -> None:
        if isinstance(report, KeyRecovered):
            record = self._custody.record
            assert record is not None  # a key is recovered for a record
            # The record's key and epoch, whichever epoch in play was rebuilt (a rotation's opens the other).
            secrets = self._secrets
            secrets.unlock(self._custody.root_key, record.epoch)
            self._cipher.unlock(lambda: secrets.keyring().cipher_key)
            self._authorizer.invalidate()  # policies are sealed: readable only now
        elif (
            isinstance(report, RotationProgress)
            and report.stage is RotationStage.COMMITTED
            and self._custody.phase is Phase.READY
        ):
            # The new key is in force (this instance's commit, or one it followed): the keyring is now
            # the one wrapped under it.  The data keys are the same: nothing is re-encrypted.
            self._secrets.unlock(self._custody.root_key, report.to_epoch)
        elif isinstance(report, PhaseChanged) and report.previous is Phase.READY:
            self._secrets.lock()
            self._cipher.lock()
            self._authorizer.clear()
        for sink in self._then:
            sink(report)


class OwnRecord:
    """One Nexus on its own store (SQLite): its key record is the deployment's newest.

    Nobody else writes the record, so a keeper showing a shard of a newer
    epoch holds garbage (the bootstrap identity may contribute any label):
    the custody machine is told at once, and reports and re-seeds it.
    """

    def __init__(self, driver: CustodyDriver) -> None:
        self._driver = driver

    def __call__(self, report: Report) -> None:
        if isinstance(report, NewerKeySeen):
            self._driver.confirm_record(report.at)


def wrap_keyring(secrets: Backend) -> Callable[[RootKey, int], bytes]:
    """The keyring in force, wrapped under a rotation's new root key (stored with the pending rotation)."""

    def wrap(key: RootKey, epoch: int) -> bytes:
        return secrets.keyring().wrap(key, epoch)

    return wrap
