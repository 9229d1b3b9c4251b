"""`spike secret ...` and `spike cipher ...`: the operator's commands for data.

Values can come from arguments (``key=value``), a JSON file, or standard
input, so that they need not appear in shell history.  `get PATH KEY` prints
just the value, for scripts.  Every failure is one sentence on stderr and a
non-zero exit code.
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import msgspec

from spike.app import config as cfg
from spike.app.api.messages import (
    CIPHER_DECRYPT_PATH,
    CIPHER_ENCRYPT_PATH,
    SECRETS_METADATA_PATH,
    SECRETS_PATH,
    CipherDecryptRequest,
    CipherDecryptResponse,
    CipherEncryptRequest,
    CipherEncryptResponse,
    SecretGetRequest,
    SecretGetResponse,
    SecretListRequest,
    SecretListResponse,
    SecretMetadataResponse,
    SecretMetadataUpdate,
    SecretPathRequest,
    SecretPutRequest,
    SecretPutResponse,
    SecretVersionsRequest,
)
from spike.app.api.messages import CIPHER_MAX_OVERHEAD as MAX_OVERHEAD
from spike.app.api.messages import CIPHER_MAX_PLAINTEXT as MAX_PLAINTEXT
from spike.app.commands.client import Empty, NexusClient, NexusError
from spike.app.commands.formats import add_format_flag, machine, render
from spike.app.errors import CommandError
from spike.app.model import kv

Say = Callable[[str], None]
T = TypeVar("T")


def add_parsers(sub: Any, client_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    secret = sub.add_parser("secret", help="read and write secrets")
    actions = secret.add_subparsers(dest="secret_command", metavar="ACTION", required=True)

    def parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        add_format_flag(p)
        client_flags(p)  # --nexus and the identity
        return p

    put = parser("put", "write a new version of a secret")
    put.add_argument("path")
    put.add_argument("pairs", nargs="*", metavar="KEY=VALUE", help="values (visible in shell history)")
    put.add_argument("--file", metavar="FILE", help="JSON object of values; '-' reads standard input")
    put.add_argument("--stdin", metavar="KEY", help="read the value of KEY from standard input")
    put.add_argument("--cas", type=int, metavar="N", help="write only if the current version is N (0: absent)")

    get = parser("get", "read a secret (or one key of it)")
    get.add_argument("path")
    get.add_argument("key", nargs="?", help="print only this key's value")
    get.add_argument("-v", "--version", type=int, default=0, help="version to read (default: current)")

    lst = parser("list", "list secret paths")
    lst.add_argument("prefix", nargs="?", default="")
    lst.add_argument("--limit", type=int, default=1000)
    lst.add_argument("--after", default="", help="continue after this path")

    for name, help_text in (
        ("delete", "soft-delete versions (default: the current one)"),
        ("undelete", "restore soft-deleted versions"),
        ("destroy", "remove versions for good"),
    ):
        p = parser(name, help_text)
        p.add_argument("path")
        p.add_argument(
            "-v", "--versions", default="", metavar="N,M", help="comma-separated version numbers (0: the current one)"
        )

    meta = parser("metadata", "show a secret's versions and metadata")
    meta.add_argument("path")
    meta.add_argument("-v", "--version", type=int, default=0)

    tune = parser("tune", "set a secret's max versions, check-and-set requirement, custom metadata")
    tune.add_argument("path")
    tune.add_argument("--max-versions", type=int)
    tune.add_argument("--cas-required", choices=["true", "false"])
    tune.add_argument("--custom", nargs="*", metavar="KEY=VALUE", help="replaces all custom metadata")

    purge = parser("purge", "delete a secret with all its versions and metadata")
    purge.add_argument("path")

    cipher = sub.add_parser("cipher", help="encrypt and decrypt with Nexus's key (never exported)")
    cactions = cipher.add_subparsers(dest="cipher_command", metavar="ACTION", required=True)
    for name in ("encrypt", "decrypt"):
        p = cactions.add_parser(name, help=f"{name} bytes (standard input to standard output by default)")
        p.add_argument(
            "-f", "--in", "--file", dest="infile", metavar="FILE", help="input file (default: standard input)"
        )
        p.add_argument("-o", "--out", dest="outfile", metavar="FILE", help="output file (default: standard output)")
        # SPIKE's JSON mode: the fields of Nexus's JSON cipher API, base64, on the command line.
        p.add_argument("--algorithm", default="", help="algorithm hint (JSON mode)")
        if name == "encrypt":
            p.add_argument(
                "-a",
                "--armor",
                action="store_true",
                help="write the ciphertext as text (base64 between BEGIN/END lines) rather than binary",
            )
            p.add_argument(
                "--plaintext",
                metavar="BASE64",
                help="JSON mode: encrypt these bytes and print Nexus's answer (version, nonce, ciphertext) as JSON",
            )
        else:
            p.add_argument("--version", dest="cipher_version", metavar="N", help="JSON mode: the version byte (0-255)")
            p.add_argument("--nonce", metavar="BASE64", help="JSON mode: the nonce")
            p.add_argument("--ciphertext", metavar="BASE64", help="JSON mode: the ciphertext")
        client_flags(p)


def _pairs(pairs: list[str], what: str) -> dict[str, str]:
    values: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise CommandError(f"{what}: expected KEY=VALUE, got {pair.split('=')[0]!r}...", exit_code=2)
        values[key] = value
    return values


def _read_values(args: argparse.Namespace, stdin: BinaryIO) -> dict[str, str]:
    values = _pairs(args.pairs, "values")
    if args.file:
        raw = stdin.read() if args.file == "-" else _read_file(args.file)
        try:
            loaded = msgspec.json.decode(raw, type=dict[str, str])
        except msgspec.DecodeError as exc:
            raise CommandError(f"--file must hold a JSON object of strings: {exc}", exit_code=2) from None
        values.update(loaded)
    if args.stdin:
        data = stdin.read()
        try:
            values[args.stdin] = data.decode().removesuffix("\n")
        except UnicodeDecodeError:
            raise CommandError("standard input is not UTF-8 text", exit_code=2) from None
    return values


def _read_file(name: str) -> bytes:
    try:
        return Path(name).read_bytes()
    except OSError as exc:
        raise CommandError(f"cannot read {name}: {exc.strerror}", exit_code=2) from None


def _versions(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise CommandError(f"--versions must be comma-separated numbers, not {text!r}", exit_code=2) from None


def _check(check: Callable[[Any], Any], value: Any) -> None:
    """Validate locally first: a clear sentence beats a bare 400 from the server."""
    try:
        check(value)
    except kv.KvError as exc:
        raise CommandError(str(exc), exit_code=2) from None


def run_secret(args: argparse.Namespace, say: Say = print, stdin: BinaryIO | None = None) -> int:
    config = cfg.client(args, cfg.environ(args))
    stdin = stdin if stdin is not None else sys.stdin.buffer
    command = args.secret_command
    path: str = getattr(args, "path", "")
    if path:
        _check(kv.check_spike_path, path)
    absent = f"there is no secret at {path}"
    with NexusClient(config.nexus_url, config.common.svid, config.common.trust) as nexus:
        if command == "put":
            values = _read_values(args, stdin)
            _check(kv.check_values, values)
            put = nexus.call(
                SECRETS_PATH,
                SecretPutRequest(path=path, values=values, cas=args.cas),
                SecretPutResponse,
                conflict=f"check-and-set failed: {path} is not at version {args.cas}",
                write=True,
            )
            _out(config.output, say, {"path": path, "version": put.version}, f"wrote {path} version {put.version}")
        elif command == "get":
            missing = f"no readable version of {path} (no such secret, or deleted or destroyed)"
            if args.version:
                missing = f"version {args.version} of {path} does not exist, or is deleted or destroyed"
            got = _unsealed(
                path,
                lambda: nexus.call(
                    SECRETS_PATH,
                    SecretGetRequest(path=path, version=args.version),
                    SecretGetResponse,
                    action="get",
                    not_found=missing,
                ),
            )
            if args.key is not None:
                if args.key not in got.data:
                    raise CommandError(f"{path} (version {got.version}) has no key {args.key!r}")
                value = got.data[args.key]
                picked = {"key": args.key, "value": value, "version": got.version}
                say(render(config.output, picked) if machine(config.output) else value)
            elif machine(config.output):
                say(render(config.output, {"data": got.data, "version": got.version}))
            else:
                for key in sorted(got.data):
                    say(f"{key}: {got.data[key]}")
        elif command == "list":
            if args.prefix:
                _check(kv.check_spike_prefix, args.prefix)
            listed = nexus.call(
                SECRETS_PATH,
                SecretListRequest(prefix=args.prefix, limit=args.limit, after=args.after),
                SecretListResponse,
                action="list",
            )
            if machine(config.output):
                say(render(config.output, msgspec.to_builtins(listed)))
            else:
                for key in listed.keys:
                    say(key)
                if listed.next_after:
                    say(f"(more: --after {listed.next_after})")
        elif command in ("delete", "undelete", "destroy"):
            versions = _versions(args.versions)
            _check(lambda v: kv.check_versions(v, zero_is_current=True), versions)
            nexus.call(
                SECRETS_PATH,
                SecretVersionsRequest(path=path, versions=versions),
                Empty,
                action=command,
                not_found=absent,
                write=True,
            )
            which = _which_versions(versions)
            done = {"delete": "deleted", "undelete": "undeleted", "destroy": "destroyed"}[command]
            _out(config.output, say, {"path": path, "action": command}, f"{done} {which} of {path}")
        elif command == "metadata":
            meta = nexus.call(
                SECRETS_METADATA_PATH,
                SecretGetRequest(path=path, version=args.version),
                SecretMetadataResponse,
                action="get",
                not_found=f"{path} has no version {args.version}" if args.version else absent,
            )
            _print_metadata(meta, path, config.output, say)
        elif command == "tune":
            custom = None if args.custom is None else _pairs(args.custom, "--custom")
            cas_required = None if args.cas_required is None else args.cas_required == "true"
            update = SecretMetadataUpdate(
                path=path, max_versions=args.max_versions, cas_required=cas_required, custom_metadata=custom
            )
            nexus.call(SECRETS_METADATA_PATH, update, Empty, action="put", write=True)
            _out(config.output, say, {"path": path}, f"updated the metadata of {path}")
        elif command == "purge":
            nexus.call(
                SECRETS_METADATA_PATH,
                SecretPathRequest(path=path),
                Empty,
                action="delete",
                not_found=absent,
                write=True,
            )
            _out(config.output, say, {"path": path}, f"deleted {path} with all its versions and metadata")
    return 0


ARMOR_BEGIN = b"-----BEGIN SPIKE CIPHERTEXT-----"
ARMOR_END = b"-----END SPIKE CIPHERTEXT-----"
ARMOR_LINE = 64


def enarmor(blob: bytes) -> bytes:
    """A binary ciphertext as text: base64 lines between BEGIN and END lines (what `--armor` writes)."""
    text = base64.b64encode(blob)
    lines = [text[i : i + ARMOR_LINE] for i in range(0, len(text), ARMOR_LINE)]
    return b"\n".join([ARMOR_BEGIN, *lines, ARMOR_END]) + b"\n"


def armored(data: bytes) -> bool:
    """Whether `data` is `--armor` text (a binary ciphertext starts with its version byte, never with '-')."""
    return data.lstrip().startswith(ARMOR_BEGIN)


def dearmor(data: bytes) -> bytes:
    """The binary ciphertext inside `--armor` text; a CommandError (exit 2) if the text is damaged."""
    body = data.strip()
    if not body.endswith(ARMOR_END):
        raise CommandError("the armored ciphertext has no END line: it is cut short", exit_code=2)
    inner = b"".join(body[len(ARMOR_BEGIN) : -len(ARMOR_END)].split())
    try:
        return base64.b64decode(inner, validate=True)
    except binascii.Error:
        raise CommandError("the armored ciphertext is damaged: its body is not base64", exit_code=2) from None


def _which_versions(versions: list[int]) -> str:
    """ "version 3", "versions 1, 2 and 4", or "the current version" (none given)."""
    if not versions:
        return "the current version"
    numbers = [str(v) for v in versions]
    if len(numbers) == 1:
        return f"version {numbers[0]}"
    return f"versions {', '.join(numbers[:-1])} and {numbers[-1]}"


def _unsealed(path: str, read: Callable[[], T]) -> T:
    """A read whose refusal for a value sealed under a key that no longer exists says so, about `path`."""
    try:
        return read()
    except NexusError as exc:
        if exc.code == "api_conflict" and exc.reason:
            raise CommandError(f"cannot read {path}: {exc.reason}") from None
        raise


def _out(output: str, say: Say, data: dict[str, Any], human: str) -> None:
    say(render(output, data) if machine(output) else human)


def _print_metadata(meta: SecretMetadataResponse, path: str, output: str, say: Say) -> None:
    if machine(output):
        say(render(output, msgspec.to_builtins(meta)))
        return
    m = meta.metadata
    say(f"{path}: current version {m.currentVersion}, oldest {m.oldestVersion}, keeps {m.maxVersions}")
    say(f"created {m.createdTime}, updated {m.updatedTime}, check-and-set required: {'yes' if m.casRequired else 'no'}")
    for key, value in sorted(m.customMetadata.items()):
        say(f"custom {key}: {value}")
    if m.customMetadataUnreadable:
        say("custom metadata: unreadable (sealed under a data key that no longer exists)")
    for number in sorted(meta.versions):
        v = meta.versions[number]
        state = "destroyed" if v.destroyed else (f"deleted {v.deletedTime}" if v.deletedTime else "live")
        if v.unreadable:
            state = f"unreadable: sealed under a data key that no longer exists ({state})"
        say(f"  version {number}: created {v.createdTime}, {state}")


def _base64_flag(text: str, flag: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise CommandError(f"{flag} must be base64", exit_code=2) from None


def _cipher_json_request(args: argparse.Namespace) -> tuple[str, object, type[Any]] | None:
    """SPIKE's JSON mode (`--plaintext`, or `--version`/`--nonce`/`--ciphertext`): the request, or None."""
    if args.cipher_command == "encrypt":
        if args.plaintext is None:
            return None
        if args.infile or args.armor:
            raise CommandError("--plaintext does not go with --in/--file or --armor", exit_code=2)
        plaintext = _base64_flag(args.plaintext, "--plaintext")
        if len(plaintext) > MAX_PLAINTEXT:
            raise CommandError(
                f"{len(plaintext)} bytes is more than Nexus encrypts at once ({MAX_PLAINTEXT})", exit_code=2
            )
        request = CipherEncryptRequest(plaintext=plaintext, algorithm=args.algorithm)
        return CIPHER_ENCRYPT_PATH, request, CipherEncryptResponse
    given = [args.cipher_version, args.nonce, args.ciphertext]
    if all(v is None for v in given):
        return None
    if any(v is None for v in given) or args.infile:
        raise CommandError("JSON mode takes --version, --nonce and --ciphertext together (and no --in)", exit_code=2)
    try:
        version = int(args.cipher_version)
    except ValueError:
        version = -1
    if not 0 <= version <= 255:
        raise CommandError("--version must be 0-255", exit_code=2)
    opening = CipherDecryptRequest(
        version=version,
        nonce=_base64_flag(args.nonce, "--nonce"),
        ciphertext=_base64_flag(args.ciphertext, "--ciphertext"),
        algorithm=args.algorithm,
    )
    return CIPHER_DECRYPT_PATH, opening, CipherDecryptResponse


def _write_result(args: argparse.Namespace, out: BinaryIO, result: bytes) -> None:
    if args.outfile:
        try:
            Path(args.outfile).write_bytes(result)
        except OSError as exc:
            raise CommandError(f"cannot write {args.outfile}: {exc.strerror}") from None
    else:
        out.write(result)
        out.flush()


def run_cipher(args: argparse.Namespace, stdin: BinaryIO | None = None, stdout: BinaryIO | None = None) -> int:
    config = cfg.client(args, cfg.environ(args))
    out = stdout or sys.stdout.buffer
    json_mode = _cipher_json_request(args)
    if json_mode is not None:
        path, request, answer = json_mode
        with NexusClient(config.nexus_url, config.common.svid, config.common.trust) as nexus:
            reply = nexus.call(path, request, answer)
        if isinstance(reply, CipherDecryptResponse):
            _write_result(args, out, reply.plaintext)
        else:
            _write_result(args, out, msgspec.json.encode(reply) + b"\n")
        return 0
    armor = getattr(args, "armor", False)
    encrypting = args.cipher_command == "encrypt"
    if encrypting and not armor and not args.outfile and out.isatty():
        # As gpg and age do: binary on a terminal is garbage at best, and can drive the terminal at worst.
        raise CommandError(
            "refusing to write a binary ciphertext to a terminal: use --armor, --out FILE, or redirect the output",
            exit_code=2,
        )
    data = _read_file(args.infile) if args.infile else (stdin or sys.stdin.buffer).read()
    if not encrypting and armored(data):
        data = dearmor(data)
    path = CIPHER_ENCRYPT_PATH if encrypting else CIPHER_DECRYPT_PATH
    limit = MAX_PLAINTEXT if args.cipher_command == "encrypt" else MAX_PLAINTEXT + MAX_OVERHEAD
    if len(data) > limit:
        raise CommandError(
            f"{len(data)} bytes is more than Nexus {args.cipher_command}s at once ({limit})", exit_code=2
        )
    with NexusClient(config.nexus_url, config.common.svid, config.common.trust) as nexus:
        result = nexus.call_bytes(path, data)
    if armor:
        result = enarmor(result)
    _write_result(args, out, result)
    return 0
