"""A Vault request as the handlers see it: the operation, the path under /v1/, its parameters, its token."""

from __future__ import annotations

from enum import Enum
from typing import Any
from urllib.parse import parse_qsl

import msgspec

from spike.app.nexus.vault.paths import PREFIX
from spike.protocol.api import ApiRequest
from spike.protocol.identity import SpiffeId

MERGE_PATCH = "application/merge-patch+json"


class Operation(Enum):
    """Vault's logical operations, as its HTTP layer derives them from the method."""

    READ = "read"
    LIST = "list"
    UPDATE = "update"  # POST and PUT: Vault's create and update, which differ only in its ACL
    PATCH = "patch"
    DELETE = "delete"


_METHODS = {
    "GET": Operation.READ,
    "HEAD": Operation.READ,
    "LIST": Operation.LIST,
    "POST": Operation.UPDATE,
    "PUT": Operation.UPDATE,
    "PATCH": Operation.PATCH,
    "DELETE": Operation.DELETE,
}
_TRUE = frozenset({"1", "t", "T", "TRUE", "true", "True"})  # Go's strconv.ParseBool


class BadRequest(Exception):
    """The request cannot be read: a 400 with this text (never a secret value in it)."""


class VaultRequest(msgspec.Struct, frozen=True):
    operation: Operation | None  # None: a method Vault does not know
    path: str  # under /v1/, e.g. "secret/data/app/db"
    peer: SpiffeId | None
    query: dict[str, str]
    token: str
    raw: ApiRequest

    def __repr__(self) -> str:  # the token is a credential: left out (`raw` hides its own body and headers)
        return f"VaultRequest(operation={self.operation!r}, path={self.path!r}, peer={self.peer!r}, raw={self.raw!r})"

    @classmethod
    def of(cls, request: ApiRequest) -> VaultRequest:
        query = dict(parse_qsl(request.query, keep_blank_values=True))
        operation = _METHODS.get(request.method)
        if operation is Operation.READ and query.get("list", "") in _TRUE:
            operation = Operation.LIST  # what clients that cannot send LIST do
        return cls(operation, request.path[len(PREFIX) :], request.peer, query, token_of(request), request)

    def body(self) -> dict[str, Any]:
        """The JSON object sent (``{}`` for none); on a read or list, the query parameters, as Vault takes them."""
        raw = self.raw.body
        if not raw.strip():
            if self.operation in (Operation.READ, Operation.LIST):
                return dict(self.query)
            return {}
        try:
            value = msgspec.json.decode(raw)
        except (msgspec.DecodeError, UnicodeDecodeError):
            raise BadRequest("failed to decode JSON input: the body is not valid JSON") from None
        if not isinstance(value, dict):
            raise BadRequest("failed to decode JSON input: the body is not a JSON object")
        return value


def token_of(request: ApiRequest) -> str:
    """The Vault token sent, if any: ``X-Vault-Token``, else ``Authorization: Bearer``."""
    headers = request.headers
    token = headers.get(b"x-vault-token")
    if token is None:
        scheme, _, value = headers.get(b"authorization", b"").partition(b" ")
        token = value.strip() if scheme.lower() == b"bearer" else b""
    return token.decode("latin-1").strip()


def parse_int(value: Any, field: str) -> int:
    """An integer parameter as Vault reads one (a number or its decimal text); `BadRequest` otherwise."""
    if isinstance(value, bool):
        raise BadRequest(f'error converting input for field "{field}": expected a number')
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    raise BadRequest(f"error converting input for field \"{field}\": cannot parse value as 'int'")


def parse_bool(value: Any, field: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value in _TRUE | {"0", "f", "F", "FALSE", "false", "False"}:
        return value in _TRUE
    raise BadRequest(f"error converting input for field \"{field}\": cannot parse value as 'bool'")


def parse_duration(value: Any, field: str) -> int:
    """Seconds, from a number or a Go duration such as "30m", "1h30m", "90s" (Vault's TypeDurationSecond)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str):
        text = value.strip()
        if text.lstrip("-").isdigit():
            return int(text)
        units = {"h": 3600, "m": 60, "s": 1}
        total, number = 0.0, ""
        for char in text:
            if char.isdigit() or char == ".":
                number += char
            elif char in units and number:
                total += float(number) * units[char]
                number = ""
            else:
                break
        else:
            if not number and text:
                return int(total)
    raise BadRequest(f'error converting input for field "{field}": cannot parse value as a duration')
