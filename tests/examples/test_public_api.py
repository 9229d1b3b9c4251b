"""The public API of `spike.protocol` is what docs/api-policy.md says it is, and stays so.

These tests pin what embedders depend on: the exported names, the fields of
the values that cross the machine's boundary, the enums' values, and the
bytes on the wire and on disk (golden vectors).  When one fails because you
changed the API on purpose, update the pinned value here, add an entry to
CHANGELOG.md (under "Breaking" if docs/api-policy.md calls it breaking), and
bump the version accordingly.
"""

from __future__ import annotations

import ast
import dataclasses
import enum
import inspect
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec

import spike
import spike.protocol as protocol
from spike.protocol import (
    RootKey,
    ShardContribution,
    derive_key,
    encode,
    key_check_value,
    peer_spiffe_id,
    seal_key,
)

ROOT = Path(__file__).resolve().parent.parent.parent
POLICY = "see docs/api-policy.md: update this pin, CHANGELOG.md and the version"

PUBLIC_NAMES = {
    # Nexus custody
    "NexusCustody", "PollSchedule", "RandomSource", "KeeperView", "RestoreProgress",
    "AlreadyInitialised", "ShareRejected", "DuplicateShare", "UnrecordedKeyRefused",
    # key rotation
    "PendingRotation", "RotationView", "RotationRefused", "RotationStage", "PersistRotation", "CommitRotation",
    "AbandonRotation", "StoreEffect", "RotationProgress", "ShardRetired", "KeeperLeft",
    # effects and events
    "Effect", "SendRequest", "RequestKind", "Report", "KeeperStateChanged", "KeeperState",
    "KeeperReseeded", "KeeperMisbehaved", "PhaseChanged", "Phase", "KeyRecovered", "KeyRejected", "KeySource",
    "NewerKeySeen", "Answer", "ResponseReceived", "RequestFailed", "FailureKind",
    # keeper
    "Keeper", "KeeperOutcome", "KeeperChange", "ApiRequest", "ApiResponse", "MAX_KEEPER_BODY",
    # material and Shamir
    "RootKey", "Share", "KeyRecord", "seal_key", "ORDER", "deal", "share_for", "combine", "split_with",
    "key_check_value", "shard_commitment", "derive_key", "ShardDerivation",
    # wire
    "KEEPER_CONTRIBUTE_PATH", "KEEPER_SHARD_PATH", "ShardContribution", "ShardAnswer", "ErrorCode",
    "encode", "decode", "KEEPER_FORGET_PATH", "ShardRequest", "ForgetRequest",
    # identity
    "SpiffeId", "InvalidSpiffeId", "TrustDomains", "Role", "peer_spiffe_id", "KeeperIdentity", "NexusIdentity",
    # trust per domain
    "TrustBundles", "TrustBundleError", "chain_refusal",
    # errors
    "SpikeError", "LocalProtocolError", "RemoteProtocolError", "ShamirError",
}  # fmt: skip

FIELDS = {
    "SendRequest": ("keeper_id", "request_id", "kind", "path", "deadline", "body", "scheduled_at"),
    "KeeperStateChanged": ("keeper_id", "previous", "state", "at", "detail"),
    "KeeperReseeded": ("keeper_id", "at", "was"),
    "KeeperMisbehaved": ("keeper_id", "at", "problem"),
    "PhaseChanged": ("previous", "phase", "at"),
    "KeyRecovered": ("epoch", "at", "keeper_ids", "source", "started_at"),
    "KeyRejected": ("epoch", "at", "keeper_ids"),
    "NewerKeySeen": ("keeper_id", "epoch", "at"),
    "ResponseReceived": ("request_id", "status", "body"),
    "RequestFailed": ("request_id", "reason", "kind"),
    "KeeperView": (
        "keeper_id", "state", "since", "detail", "polls", "empty_answers", "failures", "reseeds",
        "last_poll_at", "last_answer_at", "latency", "next_poll_at", "outcomes", "slots",
    ),
    "RotationView": (
        "stage", "from_epoch", "to_epoch", "threshold", "keeper_ids", "dealt", "needed", "started_at",
    ),
    "PersistRotation": ("pending", "at"),
    "CommitRotation": ("pending", "at"),
    "AbandonRotation": ("pending", "at"),
    "RotationProgress": ("stage", "from_epoch", "to_epoch", "dealt", "needed", "at", "detail"),
    "ShardRetired": ("keeper_id", "epoch", "at"),
    "KeeperLeft": ("keeper_id", "at", "detail"),
    "PendingRotation": ("record", "from_epoch", "from_check", "new_key", "old_key"),
    "RestoreProgress": ("accepted", "needed", "ready"),
    "PollSchedule": ("interval", "jitter", "request_timeout"),
    "KeeperOutcome": ("response", "change", "refused"),
    "ApiRequest": ("method", "path", "peer", "body", "query", "content_type", "headers"),
    "ApiResponse": ("status", "body", "content_type"),
    "SpiffeId": ("trust_domain", "path"),
    "TrustDomains": ("nexus", "keeper", "bootstrap", "pilot", "keeper_identity", "nexus_identity"),
    "ShardContribution": ("shard", "id", "epoch", "keep", "keep_commitment"),
    "ShardAnswer": ("shard", "id", "epoch", "other_epoch", "slots"),
    "ShardRequest": ("epoch",),
    "ForgetRequest": ("epoch", "all"),
    "KeyRecord": ("epoch", "threshold", "keeper_ids", "check", "commitments", "history", "derivation"),
}  # fmt: skip

ENUMS = {
    "Phase": ("uninitialised", "recovering", "ready"),
    "KeeperState": (
        "unknown", "holding", "empty", "wrong_shard", "unverified", "unreachable", "bad_answer", "newer_epoch",
        "removed",
    ),
    "RotationStage": (
        "persisting", "dealing", "committing", "abandoning", "following", "committed", "abandoned", "not_started",
    ),
    "FailureKind": (
        "refused", "unreachable", "timeout", "tls", "peer_identity", "closed", "bad_http", "other",
    ),
    "RequestKind": ("poll", "push", "confirm", "check", "deal", "forget", "clear"),
    "KeeperChange": ("none", "stored", "replaced", "forgotten"),
    "Role": ("nexus", "keeper", "bootstrap", "pilot-superuser", "pilot-recover", "pilot-restore"),
    "ShardDerivation": ("hmac", "spike"),
    "KeeperIdentity": ("per-id", "spike"),
    "NexusIdentity": ("exact", "spike"),
    "ErrorCode": (
        "api_bad_request", "api_not_found", "access_unauthorized", "state_not_ready", "api_conflict",
        "api_internal_error",
    ),
}  # fmt: skip


# ---------------------------------------------------------------------- names


def test_exported_names_are_pinned() -> None:
    exported = set(protocol.__all__)
    assert len(protocol.__all__) == len(exported), "a name appears twice in __all__"
    assert not PUBLIC_NAMES - exported, f"removed from the public API (breaking): {PUBLIC_NAMES - exported}; {POLICY}"
    assert not exported - PUBLIC_NAMES, f"added to the public API: {exported - PUBLIC_NAMES}; {POLICY}"


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, Any] = {}
    exec("from spike.protocol import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(protocol.__all__)
    assert not [name for name in protocol.__all__ if name.startswith("_")]


def test_fields_of_boundary_values_are_pinned() -> None:
    for name, expected in FIELDS.items():
        kind = getattr(protocol, name)
        if dataclasses.is_dataclass(kind):
            fields = tuple(field.name for field in dataclasses.fields(kind))
        else:
            assert issubclass(kind, msgspec.Struct)
            fields = kind.__struct_fields__
        assert fields == expected, f"fields of {name} changed; {POLICY}"


def test_enum_values_are_pinned() -> None:
    for name, expected in ENUMS.items():
        kind = getattr(protocol, name)
        assert issubclass(kind, enum.Enum)
        assert tuple(member.value for member in kind) == expected, f"members of {name} changed; {POLICY}"


def test_effect_and_answer_aliases_cover_exactly_their_types() -> None:
    reports = {
        "KeeperStateChanged",
        "KeeperReseeded",
        "KeeperMisbehaved",
        "PhaseChanged",
        "KeyRecovered",
        "KeyRejected",
        "NewerKeySeen",
        "RotationProgress",
        "ShardRetired",
        "KeeperLeft",
    }
    stores = {"PersistRotation", "CommitRotation", "AbandonRotation"}
    assert {t.__name__ for t in protocol.Report.__args__} == reports
    assert {t.__name__ for t in protocol.StoreEffect.__args__} == stores
    assert {t.__name__ for t in protocol.Effect.__args__} == reports | stores | {"SendRequest"}
    assert {t.__name__ for t in protocol.Answer.__args__} == {"ResponseReceived", "RequestFailed"}


def test_error_classes_say_whose_fault_it_is() -> None:
    local = ["ShamirError", "InvalidSpiffeId", "AlreadyInitialised", "ShareRejected", "DuplicateShare"]
    for name in local:
        assert issubclass(getattr(protocol, name), protocol.LocalProtocolError), name
    assert issubclass(protocol.DuplicateShare, protocol.ShareRejected)
    assert issubclass(protocol.RotationRefused, protocol.LocalProtocolError)
    for base in (protocol.LocalProtocolError, protocol.RemoteProtocolError):
        assert issubclass(base, protocol.SpikeError)
    assert not issubclass(protocol.RemoteProtocolError, protocol.LocalProtocolError)


# ---------------------------------------------------------------------- documentation


def _own_doc(obj: object, name: str) -> str:
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    # A dataclass without a docstring gets its signature as one: that is not documentation.
    return "" if not doc or doc.startswith(f"{name}(") else doc


def test_every_exported_class_function_and_public_method_has_a_docstring() -> None:
    missing = []
    for name in protocol.__all__:
        obj = getattr(protocol, name)
        if inspect.isclass(obj):
            if not _own_doc(obj, name):
                missing.append(name)
            if issubclass(obj, enum.Enum):
                continue
            for attr, value in vars(obj).items():
                if attr.startswith("_"):
                    continue
                func = value.__func__ if isinstance(value, classmethod | staticmethod) else value
                func = func.fget if isinstance(func, property) else func
                if inspect.isfunction(func) and not func.__doc__:
                    missing.append(f"{name}.{attr}")
        elif inspect.isfunction(obj) and not obj.__doc__:
            missing.append(name)
    assert missing == []


def test_every_exported_name_is_in_the_embedding_guide() -> None:
    guide = (ROOT / "docs" / "embedding.md").read_text()
    assert [name for name in protocol.__all__ if f"`{name}`" not in guide] == []


def _python_blocks(markdown: str) -> list[str]:
    """The ```python blocks of a document, except those marked <!-- not run --> just before."""
    blocks = re.findall(r"(<!-- not run -->\n)?```python\n(.*?)```", markdown, flags=re.S)
    return [code for skip, code in blocks if not skip]


def test_the_worked_example_in_the_guide_runs() -> None:
    blocks = _python_blocks((ROOT / "docs" / "embedding.md").read_text())
    assert blocks, "the guide has no runnable example"
    for code in blocks:
        exec(compile(code, "docs/embedding.md", "exec"), {"__name__": "embedding_example"})


def test_package_ships_py_typed_and_the_changelog_covers_this_version() -> None:
    assert (ROOT / "spike" / "protocol" / "py.typed").is_file()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "py.typed" in pyproject["tool"]["setuptools"]["package-data"]["spike.protocol"]
    assert f"\n## {spike.__version__}\n" in (ROOT / "CHANGELOG.md").read_text()


def test_examples_use_only_the_public_api() -> None:
    """The examples are documentation: they import `spike.protocol` and the standard library only."""
    for path in sorted((ROOT / "examples").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("spike"):
                assert node.module == "spike.protocol", f"{path.name} imports {node.module}"
                assert all(alias.name in protocol.__all__ for alias in node.names), path.name
            elif isinstance(node, ast.Import):
                assert not [a.name for a in node.names if a.name.startswith("spike")], path.name


# ---------------------------------------------------------------------- bytes on the wire and on disk

KEY = RootKey(bytes(range(1, 33)))
SHARDS = {
    1: "1ddcd25eb4463350c3d1a9ee3c6e265a36eee83fc669accf8553bf5e233684d6",
    2: "3ab7a1b963865f997e9948d06bce3da45ccbbd6b77bd4286f18d63a0294eea8c",
    3: "5792711412c68be23960e7b29b2e54ee82a892972910d83e5dc707e22f675042",
}
RECORD_JSON = (
    '{"epoch":1,"threshold":2,"keeper_ids":[1,2,3],"check":"SZkYjT0Hj+BZzO7dipQ84BvB1lApA52jxUKyMzs6Q9Y=",'
    '"commitments":{"1":"RnErXaciqBqsIFyqzSKniiw5rsKMxUcYiCNZ1+XiS8M=","2":"Wh9/s1mFMqhzOYO0BkFMtfLXHd+ZyT1Wj+s37/GmhG4=",'
    '"3":"OMSew9R96klgs24rBICyCUl3hX9p0F/H2zVDb5ikAZI="}}'
)


def test_golden_vectors_for_shards_record_and_bodies() -> None:
    """Keepers, stored records and other Nexus instances depend on these exact bytes."""
    record, shares = seal_key(KEY, epoch=1, threshold=2, keeper_ids=[1, 2, 3])
    assert {i: share.secret_bytes().hex() for i, share in shares.items()} == SHARDS
    assert key_check_value(KEY, 1).hex() == "4999188d3d078fe059cceedd8a943ce01bc1d65029039da3c542b2333b3a43d6"
    assert encode(record).decode() == RECORD_JSON
    assert protocol.decode(RECORD_JSON.encode(), protocol.KeyRecord).validate() == record
    shard_list = ",".join(str(b) for b in bytes.fromhex(SHARDS[1]))
    assert encode(ShardContribution.of(shares[1])).decode() == f'{{"shard":[{shard_list}],"id":1,"epoch":1}}'
    assert derive_key(KEY, b"example").hex() == "4ec816bec9e8922737ae50a50fd505fb5a63a9c77c5a416b03b88f8499786844"


def test_peer_spiffe_id_reads_getpeercert_output_and_never_raises() -> None:
    def cert(*sans: tuple[str, str]) -> dict[str, Any]:
        return {"subject": ((("commonName", "x"),),), "subjectAltName": sans}

    keeper = protocol.SpiffeId("spike.test", "/spike/keeper/1")
    assert peer_spiffe_id(cert(("URI", "spiffe://spike.test/spike/keeper/1"))) == keeper
    assert peer_spiffe_id(cert(("DNS", "k1"), ("URI", "spiffe://spike.test/spike/keeper/1"))) == keeper
    for bad in (
        None,
        {},
        cert(),
        cert(("DNS", "spiffe://spike.test/x")),
        cert(("URI", "spiffe://spike.test/a"), ("URI", "spiffe://spike.test/b")),  # two URI SANs
        cert(("URI", "https://spike.test/a")),
        cert(("URI", "spiffe://Spike.Test/a")),
        cert(("URI", "spiffe://spike.test/a/../b")),
        {"subjectAltName": "garbage"},
        {"subjectAltName": (("URI",),)},
    ):
        assert peer_spiffe_id(bad) is None, bad
