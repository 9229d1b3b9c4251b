"""Encryption as a service: JSON (base64) and application/octet-stream modes, limits, refusals."""

from __future__ import annotations

import base64
import logging

import pytest

from spike.app.api.messages import CIPHER_DECRYPT_PATH, CIPHER_ENCRYPT_PATH
from spike.app.nexus.cipher_api import MAX_PLAINTEXT, NONCE_SIZE, OCTET_STREAM, VERSION
from tests.api.api_helpers import Node

ENC, DEC = CIPHER_ENCRYPT_PATH, CIPHER_DECRYPT_PATH
BAD = (400, "api_bad_request")
MESSAGE = b"attack at dawn \x00\xff"


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def stream(node: Node, path: str, data: bytes) -> tuple[int, bytes]:
    answer = node.call(path, data, content_type=OCTET_STREAM)
    return answer.status, answer.body


def encrypt_json(node: Node, plaintext: bytes, **extra: object) -> dict[str, object]:
    answer = node.call(ENC, {"plaintext": b64(plaintext), **extra})
    assert answer.status == 200, answer
    body: dict[str, object] = answer.json()
    return body


@pytest.mark.parametrize("plaintext", [b"", b"x", MESSAGE, bytes(range(256)) * 4])
def test_json_round_trip(node: Node, plaintext: bytes) -> None:
    sealed = encrypt_json(node, plaintext)
    assert sealed["version"] == VERSION
    assert len(base64.b64decode(str(sealed["nonce"]))) == NONCE_SIZE
    assert len(base64.b64decode(str(sealed["ciphertext"]))) == len(plaintext) + 16
    answer = node.call(DEC, sealed)
    assert (answer.status, answer.json()) == (200, {"plaintext": b64(plaintext)})


@pytest.mark.parametrize("plaintext", [b"", MESSAGE, bytes(range(256)) * 4])
def test_stream_round_trip(node: Node, plaintext: bytes) -> None:
    status, blob = stream(node, ENC, plaintext)
    assert status == 200
    assert blob[0] == VERSION and len(blob) == 1 + NONCE_SIZE + len(plaintext) + 16
    assert plaintext not in blob or not plaintext
    answer = node.call(DEC, blob, content_type=OCTET_STREAM)
    assert (answer.status, answer.body, answer.content_type) == (200, plaintext, OCTET_STREAM)


def test_the_two_modes_are_the_same_ciphertext(node: Node) -> None:
    """A stream blob is version || nonce || ciphertext: its parts decrypt in JSON mode, and back."""
    _, blob = stream(node, ENC, MESSAGE)
    parts = {"version": blob[0], "nonce": b64(blob[1 : 1 + NONCE_SIZE]), "ciphertext": b64(blob[1 + NONCE_SIZE :])}
    assert node.call(DEC, parts).json() == {"plaintext": b64(MESSAGE)}
    sealed = encrypt_json(node, MESSAGE)
    blob = bytes([VERSION]) + base64.b64decode(str(sealed["nonce"])) + base64.b64decode(str(sealed["ciphertext"]))
    assert stream(node, DEC, blob) == (200, MESSAGE)


def test_a_fresh_nonce_every_time(node: Node) -> None:
    blobs = {stream(node, ENC, MESSAGE)[1] for _ in range(20)}
    assert len(blobs) == 20
    assert len({b[1 : 1 + NONCE_SIZE] for b in blobs}) == 20


def test_the_size_limit(node: Node) -> None:
    limit = b"z" * MAX_PLAINTEXT
    status, blob = stream(node, ENC, limit)
    assert status == 200
    assert stream(node, DEC, blob) == (200, limit)
    assert encrypt_json(node, limit)["version"] == VERSION
    over = limit + b"z"
    answer = node.call(ENC, over, content_type=OCTET_STREAM)
    assert (answer.status, answer.error()) == BAD
    answer = node.call(ENC, {"plaintext": b64(over)})
    assert (answer.status, answer.error()) == BAD


def test_the_ciphertext_survives_a_restart_of_the_key(node: Node) -> None:
    """Sealed under a key derived from the root key: the same key after a lock/unlock still opens it."""
    _, blob = stream(node, ENC, MESSAGE)
    node.lock()
    assert node.call(DEC, blob, content_type=OCTET_STREAM).status == 503
    node.unlock()
    assert stream(node, DEC, blob) == (200, MESSAGE)


def flipped(blob: bytes, offset: int) -> bytes:
    out = bytearray(blob)
    out[offset] ^= 1
    return bytes(out)


def test_json_refusals(node: Node, caplog: pytest.LogCaptureFixture) -> None:
    sealed = encrypt_json(node, MESSAGE)
    nonce, ciphertext = base64.b64decode(str(sealed["nonce"])), base64.b64decode(str(sealed["ciphertext"]))
    refused = {
        "tampered ciphertext": {**sealed, "ciphertext": b64(flipped(ciphertext, 0))},
        "tampered tag": {**sealed, "ciphertext": b64(flipped(ciphertext, -1))},
        "tampered nonce": {**sealed, "nonce": b64(flipped(nonce, 0))},
        "unknown version": {**sealed, "version": 2},
        "short nonce": {**sealed, "nonce": b64(nonce[:-1])},
        "long nonce": {**sealed, "nonce": b64(nonce + b"\x00")},
        "ciphertext shorter than a tag": {**sealed, "ciphertext": b64(ciphertext[:15])},
        "not base64": {**sealed, "ciphertext": "***"},
        "missing nonce": {"version": 1, "ciphertext": sealed["ciphertext"]},
        "not json": b"{",
    }
    with caplog.at_level(logging.INFO, logger="spike"):
        for name, body in refused.items():
            answer = node.call(DEC, body)
            assert (answer.status, answer.error()) == BAD, name
        for name, body in {
            "unknown algorithm": {"plaintext": b64(MESSAGE), "algorithm": "ROT13"},
            "plaintext not base64": {"plaintext": "%%%"},
            "no plaintext": {},
        }.items():
            answer = node.call(ENC, body)
            assert (answer.status, answer.error()) == BAD, name
    assert MESSAGE.decode(errors="replace") not in caplog.text
    assert "failed authentication" in caplog.text


@pytest.mark.parametrize(
    "blob",
    [b"", b"\x01", b"\x01" + b"\x00" * NONCE_SIZE, b"\x02" + b"\x00" * 40, b"\x01" + b"\x00" * 40],
    ids=["empty", "version only", "no tag", "unknown version", "garbage"],
)
def test_stream_refusals(node: Node, blob: bytes) -> None:
    answer = node.call(DEC, blob, content_type=OCTET_STREAM)
    assert (answer.status, answer.error()) == BAD


def test_a_tampered_stream_blob_is_refused_everywhere(node: Node) -> None:
    _, blob = stream(node, ENC, MESSAGE)
    for offset in (0, 1, NONCE_SIZE, 1 + NONCE_SIZE, len(blob) - 1):
        answer = node.call(DEC, flipped(blob, offset), content_type=OCTET_STREAM)
        assert (answer.status, answer.error()) == BAD, offset
