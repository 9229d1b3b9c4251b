"""Request and response bodies of the Nexus API (msgspec structs).

Shared by the server (spike/app/nexus) and every client command (spike/app/commands), so it
lives in neither: a field can only be renamed in one place, and neither side imports the other.
"""

from __future__ import annotations

import msgspec

from spike.protocol.record import KeyRecord
from spike.protocol.wire import ShardBytes

STATUS_PATH = "/v1/operator/status"
RECOVER_PATH = "/v1/operator/recover"
RESTORE_PATH = "/v1/operator/restore"
ROTATE_PATH = "/v1/operator/rotate"
IMPORT_PATH = "/v1/operator/import"
BOOTSTRAP_INIT_PATH = "/v1/bootstrap/init"
BOOTSTRAP_VERIFY_PATH = "/v1/bootstrap/verify"

VERIFY_INFO = b"spike/v1/bootstrap-verify"

# Sent by spike's own clients (CLI, bootstrap) on every request to Nexus: "I read spike's answers".
# Where SPIKE's Go Nexus and spike answer the same request differently (docs/spike-compatibility.md),
# a request without it (SPIKE's Go Pilot and SDK) gets SPIKE's answer.
EXTENSIONS_HEADER = b"x-spike-extensions"


class KeeperStatus(msgspec.Struct, kw_only=True):
    id: int
    url: str
    state: str
    since: float  # unix time
    detail: str
    polls: int
    empty_answers: int
    failures: int
    reseeds: int
    last_poll: float | None
    latency_ms: float | None


class RotationStatus(msgspec.Struct, kw_only=True):
    """A key rotation under way (docs/key-lifecycle.md): where it stands and who holds the new shard."""

    stage: str  # persisting, dealing, committing, abandoning, following
    from_epoch: int
    to_epoch: int
    threshold: int  # of the new record
    keepers: list[int]  # of the new record
    dealt: list[int]  # keepers of the new set that showed their verified new shard
    needed: int  # more keepers that must show it before the commit
    started: float  # unix time


class ScheduleStatus(msgspec.Struct, kw_only=True):
    """`--rotate-every`: the period, and when the next scheduled rotation is due (unix time)."""

    every: float
    next: float | None


class RecoveryStatus(msgspec.Struct, kw_only=True):
    """The newest break-glass export (`spike operator recover`) recorded, against the key epoch in force."""

    epoch: int  # the key epoch its shards belong to
    time: float  # unix time of the export
    epochs_behind: int  # key epochs in force since then (0: its shards are the current key's)


class KeyringStatusBody(msgspec.Struct, kw_only=True):
    """The data keys (no key in it): the term new values are sealed under, and a re-wrap's progress."""

    term: int  # new values are sealed under it
    terms: list[tuple[int, float]]  # every term held, and when it was made (unix time), oldest first
    values_by_term: dict[int, int]  # stored values per term (secret versions, custom metadata, policies)
    rewrap_target: int | None  # a re-wrap of older values to this term is under way
    rewrap_remaining: int  # values still below it


class StatusBody(msgspec.Struct, kw_only=True):
    phase: str
    epoch: int | None
    threshold: int
    shares: int
    shards_needed: int
    redundancy: int | None
    poll_interval: float
    keepers: list[KeeperStatus]
    time: float
    # Key lifecycle (absent from older Nexus versions' answers).
    highest_epoch: int | None = None
    rotation: RotationStatus | None = None
    schedule: ScheduleStatus | None = None
    recovery: RecoveryStatus | None = None
    keyring: KeyringStatusBody | None = None
    # How Nexus splits a new root key (hmac, or spike: SPIKE's Go derivation); bootstrap deals with it.
    shard_derivation: str | None = None
    # "memory": SPIKE's memory backend, nothing kept (no keepers, no key record; data lost when Nexus stops).
    # Absent for every other backend.
    backend: str | None = None


class RotateRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /v1/operator/rotate`: rotate the root key (default), give a rotation under way up (`abort`),
    add a data-key term for new values (`data_key`), re-wrap stored values to the newest term (`rewrap`,
    alone or with `data_key`)."""

    abort: bool = False
    data_key: bool = False
    rewrap: bool = False


class RotateResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The rotation as it stands once the request was carried out (None: none under way any more)."""

    rotation: RotationStatus | None
    epoch: int  # the key epoch in force
    data_term: int | None = None  # a data-key request: the term new values are sealed under now
    rewrap_target: int | None = None  # a re-wrap to this term is under way


class InitRequest(msgspec.Struct, kw_only=True):
    record: KeyRecord
    replace: bool = False
    # Sent again with the same record once bootstrap has dealt the shards: Nexus reads its keepers at
    # once instead of at their next polls (an older Nexus ignores the field and finds them then).
    dealt: bool = False


class InitResponse(msgspec.Struct, kw_only=True):
    changed: bool
    epoch: int


class VerifyRequest(msgspec.Struct, kw_only=True):
    nonce: bytes
    ciphertext: bytes


class VerifyResponse(msgspec.Struct, kw_only=True):
    hash: str


# ---------------------------------------------------------------- secrets (SPIKE shapes, Vault KV v2 extras)

SECRETS_PATH = "/v1/store/secrets"
SECRETS_METADATA_PATH = "/v1/store/secrets/metadata"


class SecretPutRequest(msgspec.Struct, kw_only=True):
    path: str
    values: dict[str, str]
    cas: int | None = None  # 0: only if absent; n: only if the current version is n


class SecretPutResponse(msgspec.Struct, kw_only=True):
    version: int


class SecretGetRequest(msgspec.Struct, kw_only=True):
    path: str
    version: int = 0  # 0: the current version


class SecretGetResponse(msgspec.Struct, kw_only=True):
    data: dict[str, str]
    version: int


class SecretVersionsRequest(msgspec.Struct, kw_only=True):
    """delete, undelete and destroy: no versions means the current one."""

    path: str
    versions: list[int] = msgspec.field(default_factory=list)


class SecretListRequest(msgspec.Struct, kw_only=True):
    """No `limit` and no `after` (SPIKE's Go SDK sends ``{}``): every key the caller may list, as SPIKE answers."""

    prefix: str = ""
    limit: int | None = None  # None: not paging (spike's CLI always pages, 1000 by default)
    after: str = ""


class SecretListResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    keys: list[str]
    next_after: str | None = None  # set when more keys follow: pass it as `after`


class SecretPathRequest(msgspec.Struct, kw_only=True):
    path: str


class SecretMetadataUpdate(msgspec.Struct, kw_only=True):
    path: str
    max_versions: int | None = None
    cas_required: bool | None = None
    custom_metadata: dict[str, str] | None = None


class VersionMetadata(msgspec.Struct, kw_only=True, omit_defaults=True):
    createdTime: str
    version: int
    deletedTime: str | None
    destroyed: bool
    # Stored, but sealed under a data key that no longer exists (bootstrap --force): nobody can read it.
    # Left out of the answer when false, so the shape is SPIKE's and Vault's.
    unreadable: bool = False


class MetadataContent(msgspec.Struct, kw_only=True, omit_defaults=True):
    currentVersion: int
    oldestVersion: int
    createdTime: str
    updatedTime: str
    maxVersions: int
    casRequired: bool
    customMetadata: dict[str, str]
    customMetadataUnreadable: bool = False  # left out when false, as `unreadable` above


class SecretMetadataResponse(msgspec.Struct, kw_only=True):
    versions: dict[int, VersionMetadata]
    metadata: MetadataContent


# ---------------------------------------------------------------- encryption as a service

CIPHER_ENCRYPT_PATH = "/v1/cipher/encrypt"
CIPHER_MAX_PLAINTEXT = 1024 * 1024
CIPHER_NONCE_SIZE = 12
# A stream ciphertext's extra bytes: version byte, nonce and tag.
CIPHER_MAX_OVERHEAD = 1 + CIPHER_NONCE_SIZE + 16
CIPHER_DECRYPT_PATH = "/v1/cipher/decrypt"


class CipherEncryptRequest(msgspec.Struct, kw_only=True):
    plaintext: bytes
    algorithm: str = ""


class CipherEncryptResponse(msgspec.Struct, kw_only=True):
    version: int
    nonce: bytes
    ciphertext: bytes


class CipherDecryptRequest(msgspec.Struct, kw_only=True):
    version: int
    nonce: bytes
    ciphertext: bytes
    algorithm: str = ""


class CipherDecryptResponse(msgspec.Struct, kw_only=True):
    plaintext: bytes


# ---------------------------------------------------------------- policies (SPIKE's /v1/acl/policy)

POLICY_PATH = "/v1/acl/policy"


class PolicyPutRequest(msgspec.Struct, kw_only=True):
    name: str
    spiffeidPattern: str
    pathPattern: str
    permissions: list[str]
    createOnly: bool = False  # create, or fail if the name exists (default: create or replace)


class PolicyPutResponse(msgspec.Struct, kw_only=True):
    id: str
    created: bool


class PolicyIdRequest(msgspec.Struct, kw_only=True):
    id: str  # the id or the name


class PolicyBody(msgspec.Struct, kw_only=True):
    id: str
    name: str
    spiffeidPattern: str
    pathPattern: str
    permissions: list[str]
    createdAt: str
    updatedAt: str
    # The same pattern under the name SPIKE's Go SDK reads (its `data.Policy` says `spiffiedPattern`, sic):
    # without it the Go Pilot shows an empty pattern.  Absent from older Nexus versions' answers.
    spiffiedPattern: str = ""


class PolicyListRequest(msgspec.Struct, kw_only=True):
    spiffeidPattern: str = ""
    pathPattern: str = ""


class PolicyListItem(msgspec.Struct, kw_only=True):
    id: str
    name: str


class PolicyListResponse(msgspec.Struct, kw_only=True):
    policies: list[PolicyListItem]


# ------------------------------------------------------------------ break-glass


class RecoverResponse(msgspec.Struct, kw_only=True, omit_defaults=True):
    shards: dict[int, ShardBytes]
    epoch: int | None = None  # the key epoch the shards belong to (spike; SPIKE's Nexus does not say)

    def __repr__(self) -> str:
        return f"RecoverResponse(shards=<{len(self.shards)} redacted>)"


class RestoreRequest(msgspec.Struct, kw_only=True):
    id: int
    shard: ShardBytes

    def __repr__(self) -> str:
        return f"RestoreRequest(id={self.id}, shard=<redacted>)"


class RestorationStatus(msgspec.Struct, kw_only=True):
    """SPIKE's shape: shards collected, shards still needed, whether the key is back."""

    collected: int
    remaining: int
    restored: bool


# ---------------------------------------------------------------- import (`spike migrate from-spike`)


class ImportVersion(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One version of an imported secret, with its number and times as the source kept them."""

    version: int
    values: dict[str, str]
    created_at: float  # Unix seconds
    deleted_at: float | None = None  # soft-deleted at (None: live)


class ImportSecret(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    path: str
    versions: list[ImportVersion]
    created_at: float
    updated_at: float
    max_versions: int = 0  # 0: the deployment's default


class ImportPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    spiffeidPattern: str
    pathPattern: str
    permissions: list[str]
    created_at: float
    updated_at: float


# The largest request body Nexus reads (a 1 MiB cipher plaintext, base64 in JSON) ...
MAX_BODY_BYTES = CIPHER_MAX_PLAINTEXT * 4 // 3 + 4096
# ... but on the import route (superuser only: anyone else is refused by the request's head, before its
# body is held), which moves a whole deployment in one atomic request.  Under the server's 64 MiB budget
# of bytes held across connections.
MAX_IMPORT_BYTES = 16 * 1024 * 1024


class ImportRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """`POST /v1/operator/import` (superuser): secrets and policies written in one transaction, or none.

    Without `merge`, refused (409) unless Nexus holds no secret and no policy; with it, refused (409) if a
    path or a policy name is already there (nothing is overwritten or renumbered).
    """

    secrets: list[ImportSecret]
    policies: list[ImportPolicy]
    merge: bool = False


class ImportResponse(msgspec.Struct, kw_only=True):
    secrets: int
    versions: int
    deleted_versions: int
    policies: int
