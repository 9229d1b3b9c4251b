"""Wire formats (msgspec structs), byte-compatible with SPIKE's keeper JSON.

A shard travels as ``{"shard": [32 ints 0-255]}``, which is how Go encodes a
``[32]byte``.  Our extension fields (``id``, ``epoch``, ``keep`` in a
contribution; ``epoch`` in a read; ``other_epoch`` and ``slots`` in its
answer; the ``forget`` request) are optional and omitted when unset, and
unknown fields are ignored, so SPIKE's Go Nexus can talk to our keeper and our
Nexus to a Go keeper (docs/key-lifecycle.md section 2).
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, TypeVar

import msgspec

from .errors import RemoteProtocolError
from .material import MAX_EPOCH, MAX_KEEPER_ID, MIN_KEEPER_ID, SHARD_SIZE, Share

#: A keeper's path for receiving its shard (``POST``, body `ShardContribution`).
KEEPER_CONTRIBUTE_PATH = "/v1/store/contribute"
#: A keeper's path for handing its shard to Nexus (``POST``, body ``{}``, answer `ShardAnswer` or 404).
KEEPER_SHARD_PATH = "/v1/store/shard"
#: A keeper's path for dropping shards (``POST``, body `ForgetRequest`, answer ``{}``): Nexus only.
KEEPER_FORGET_PATH = "/v1/store/forget"
#: What a keeper that keeps its previous shard beside the latest says in `ShardAnswer.slots`.
TWO_SLOTS = 2

Byte = Annotated[int, msgspec.Meta(ge=0, le=255)]
ShardBytes = Annotated[list[Byte], msgspec.Meta(min_length=SHARD_SIZE, max_length=SHARD_SIZE)]
KeeperId = Annotated[int, msgspec.Meta(ge=MIN_KEEPER_ID, le=MAX_KEEPER_ID)]
Epoch = Annotated[int, msgspec.Meta(ge=0, le=MAX_EPOCH)]
Commitment = Annotated[bytes, msgspec.Meta(min_length=32, max_length=32)]  # base64 in JSON


class ErrorCode(StrEnum):
    """The only thing an error body carries: details go to the log, never to the peer."""

    BAD_REQUEST = "api_bad_request"
    NOT_FOUND = "api_not_found"
    UNAUTHORIZED = "access_unauthorized"
    NOT_READY = "state_not_ready"
    CONFLICT = "api_conflict"
    INTERNAL = "api_internal_error"


class ErrorBody(msgspec.Struct, omit_defaults=True):
    err: str
    reason: str = ""  # a sentence for people, where the cause is the request itself (SPIKE's clients ignore it)


class ShardContribution(msgspec.Struct, omit_defaults=True):
    """Body of ``POST /v1/store/contribute``.

    `keep` (an extension, only with `epoch`) asks the keeper to keep its shard
    of that epoch beside the new one; without it the new shard is the only one
    the keeper holds, as with SPIKE's keeper.  `keep_commitment` (with `keep`
    and `id`) is the key record's commitment to the shard to keep: the keeper
    keeps only a shard that matches it, so a shard that changed since Nexus
    verified it (garbage put there in between) is refused, not kept.
    """

    shard: ShardBytes
    id: KeeperId | None = None
    epoch: Epoch | None = None
    keep: Epoch | None = None
    keep_commitment: Commitment | None = None

    def __repr__(self) -> str:
        return f"ShardContribution(shard=<redacted>, id={self.id}, epoch={self.epoch}, keep={self.keep})"

    @classmethod
    def of(cls, share: Share, *, keep: int | None = None, keep_commitment: bytes | None = None) -> ShardContribution:
        """The contribution that gives keeper `share.id` its shard (with the id and epoch extensions).

        With `keep`, the keeper also keeps its shard of epoch `keep` (dealing a new epoch), the one
        `keep_commitment` commits to when given.
        """
        return cls(
            shard=list(share.secret_bytes()), id=share.id, epoch=share.epoch, keep=keep, keep_commitment=keep_commitment
        )

    def shard_bytes(self) -> bytes:
        """The 32 shard bytes.  Secret: never log them."""
        return bytes(self.shard)


class ShardAnswer(msgspec.Struct, omit_defaults=True):
    """A keeper's ``200`` answer to ``POST /v1/store/shard``: the shard, with the labels it was given.

    To a read that names an epoch (`ShardRequest`), our keeper adds `slots`
    (2: it keeps a previous shard beside the latest) and `other_epoch` (the
    epoch of the second shard it holds, if any).  SPIKE's keeper never sends
    them.
    """

    shard: ShardBytes
    id: KeeperId | None = None
    epoch: Epoch | None = None
    other_epoch: Epoch | None = None
    slots: Annotated[int, msgspec.Meta(ge=1, le=255)] | None = None

    def __repr__(self) -> str:
        return (
            f"ShardAnswer(shard=<redacted>, id={self.id}, epoch={self.epoch}, "
            f"other_epoch={self.other_epoch}, slots={self.slots})"
        )

    @classmethod
    def of(cls, share: Share) -> ShardAnswer:
        """The answer of a keeper holding `share` (with the id and epoch extensions)."""
        return cls(shard=list(share.secret_bytes()), id=share.id, epoch=share.epoch)

    def shard_bytes(self) -> bytes:
        """The 32 shard bytes.  Secret: never log them."""
        return bytes(self.shard)


class ShardRequest(msgspec.Struct, omit_defaults=True):
    """Body of ``POST /v1/store/shard``: ``{}``, or ``{"epoch": E}`` to ask for that epoch's shard."""

    epoch: Epoch | None = None


class ForgetRequest(msgspec.Struct, omit_defaults=True, forbid_unknown_fields=True):
    """Body of ``POST /v1/store/forget``: drop the shard of `epoch`, or (`all`) every shard.

    Exactly one of the two must be given (`validate`).
    """

    epoch: Epoch | None = None
    all: bool = False

    def validate(self) -> ForgetRequest:
        """Raise `RemoteProtocolError` unless exactly one of `epoch` and `all` is given."""
        if (self.epoch is None) == (not self.all):
            raise RemoteProtocolError("a forget request names one epoch, or all")
        return self


_encoder = msgspec.json.Encoder()
T = TypeVar("T")


def encode(value: Any) -> bytes:
    """JSON-encode a wire struct (or any msgspec-encodable value)."""
    return _encoder.encode(value)


_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}


def decode(data: bytes, kind: type[T]) -> T:
    """Decode JSON into `kind`, turning every failure into `RemoteProtocolError`."""
    decoder = _decoders.get(kind)
    if decoder is None:
        decoder = _decoders[kind] = msgspec.json.Decoder(kind)
    try:
        result: T = decoder.decode(data)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        # msgspec's message names the field and the rule, never the value.
        raise RemoteProtocolError(f"malformed body: {exc}") from None
    except UnicodeDecodeError:
        # msgspec raises this, not a DecodeError, for bytes that are not UTF-8 inside a string it
        # decodes (a str field, a dict key, an unknown field name of a strict struct).
        raise RemoteProtocolError("malformed body: a string is not UTF-8") from None
    return result


def error_body(code: ErrorCode, reason: str = "") -> bytes:
    return encode(ErrorBody(err=code.value, reason=reason))
