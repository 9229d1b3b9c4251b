"""Configuration: the only place that reads flags and environment variables.

Precedence, highest first: command-line flag, environment variable (SPIKE's
names where SPIKE has one), the optional TOML file (`--config` or
SPIKE_CONFIG), built-in default.  Every value is checked here,
at start, so that a bad configuration stops the process with one clear
sentence instead of failing later at run time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from collections.abc import Mapping
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING

import msgspec

from spike.app.identity import IdentitySpec, WorkloadApiSpec, workload_api_address
from spike.app.spike_env import Component, refusal
from spike.protocol.errors import LocalProtocolError
from spike.protocol.identity import InvalidSpiffeId, KeeperIdentity, NexusIdentity, TrustDomains, check_trust_domain
from spike.protocol.material import MAX_KEEPER_ID, MIN_KEEPER_ID
from spike.protocol.shamir import ShardDerivation
from spike.transports.client import parse_origin
from spike.transports.tls import SvidFiles

if TYPE_CHECKING:
    # Imported where a Nexus configuration is built: spike.protocol.nexus is the whole custody machine,
    # which a client command, reading its configuration here too, never uses.
    from spike.protocol.nexus import PollSchedule


class ConfigError(Exception):
    """A configuration value is missing or invalid; the message is for the operator."""


Env = Mapping[str, str]

DEFAULT_TRUST_DOMAIN = "spike.ist"
DEFAULT_KEEPER_PORT = 8443
DEFAULT_NEXUS_PORT = 8553
DEFAULT_NEXUS_URL = f"https://localhost:{DEFAULT_NEXUS_PORT}"
READ_CACHE_STALENESS = 0.02  # seconds (PostgreSQL's read cache, docs/postgresql.md)
MAX_READ_CACHE_STALENESS = 10.0
# How often Nexus says again, in its log, what stays wrong (see `Summaries` in nexus.py).
WAITING_SUMMARY_EVERY = 30.0  # while it waits for shards
KEEPER_SUMMARY_EVERY = 300.0  # while a keeper stays without its shard


class Common(msgspec.Struct, frozen=True):
    trust: TrustDomains
    svid: IdentitySpec  # SVID files, or the SPIFFE Workload API to fetch the SVID from
    log_level: str
    log_format: str


class KeeperConfig(msgspec.Struct, frozen=True):
    common: Common
    bind: tuple[str, int]
    require_memory_lock: bool = False  # fail the start if memory cannot be locked (spike.app.memory)


class NexusConfig(msgspec.Struct, frozen=True):
    common: Common
    bind: tuple[str, int]
    keepers: dict[int, str]
    threshold: int
    schedule: PollSchedule
    data_dir: Path
    metrics_bind: tuple[str, int] | None = None  # plain-HTTP /metrics, /healthz, /readyz; off when None
    audit_log: Path | None = None  # JSON lines of every API call; None: <data_dir>/audit.log
    shutdown_grace: float = 5.0
    waiting_summary_every: float = WAITING_SUMMARY_EVERY
    keeper_summary_every: float = KEEPER_SUMMARY_EVERY
    database_url: str | None = None  # postgresql://...: several instances share it; None: SQLite in data_dir
    require_memory_lock: bool = False  # fail the start if memory cannot be locked (spike.app.memory)
    # Key lifecycle (docs/key-lifecycle.md): keepers custody is moving away from (a rekey), by id.
    retiring_keepers: dict[int, str] = msgspec.field(default_factory=dict)
    rotate_every: float | None = None  # a scheduled root key rotation this often; None: never by itself
    crash_at: str | None = None  # a test build's SIGKILL point (SPIKE_TEST_CRASH_AT); never in the executable
    config_file: Path | None = None  # the --config file a SIGHUP reads again
    vault_kv_mount: str = "secret"  # where the Vault face serves KV v2 (/v1/<mount>/data/...)
    vault_token_ttl: float = 3600.0  # lifetime of a token from the Vault face's auth/cert/login
    backend: str = "sqlite"  # SPIKE_NEXUS_BACKEND_STORE: sqlite (or postgresql with database_url), lite, memory
    max_secret_versions: int = 10  # SPIKE_NEXUS_MAX_SECRET_VERSIONS: versions kept of a secret that sets none
    cipher_max_ciphertext: int | None = None  # SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE; None: spike's 1 MiB + 16
    # SPIKE_TRUST_ROOT_LITE_WORKLOAD: trust domains whose spiffe://<td>/spike/workload/role/lite may use the
    # cipher without a policy (SPIKE's lite workload role); unset, the trust domain of SPIKE_TRUST_ROOT.
    lite_workload_domains: tuple[str, ...] = ()
    # How new root keys are split (docs/spike-keepers.md): spike's HMAC derivation, or SPIKE's Go one.
    shard_derivation: ShardDerivation = ShardDerivation.HMAC
    # PostgreSQL only (docs/postgresql.md): how old a GET's answer may be, for writes through other instances;
    # 0: no read cache, every GET asks the database.
    read_cache_staleness: float = READ_CACHE_STALENESS

    def __repr__(self) -> str:  # a database URL may hold a password: masked, as in logs
        shown = (
            f"{name}={(mask_url(value) if name == 'database_url' and value else value)!r}"
            for name, value in zip(self.__struct_fields__, msgspec.structs.astuple(self), strict=True)
        )
        return f"NexusConfig({', '.join(shown)})"

    @property
    def keeper_urls(self) -> dict[int, str]:
        """Every keeper Nexus may have to talk to: the configured ones, and those custody moves away from."""
        return {**self.retiring_keepers, **self.keepers}


class BootstrapConfig(msgspec.Struct, frozen=True):
    common: Common
    nexus_url: str
    keepers: dict[int, str] | None  # None: take them from Nexus
    force: bool
    timeout: float
    allow_threshold_one: bool = False  # seed keepers of a 1-of-n Nexus (each shard is then the root key)


THRESHOLD_ONE = (
    "threshold 1 makes every shard the root key itself: any one keeper's memory, or any one recovery "
    "file, gives away every secret. Use a threshold of at least 2, or accept that explicitly with "
    "--allow-threshold-one (SPIKE_ALLOW_THRESHOLD_ONE=true)"
)


class ClientConfig(msgspec.Struct, frozen=True):
    common: Common
    nexus_url: str
    output: str
    recovery_dir: Path | None = None  # SPIKE_PILOT_RECOVERY_DIR: `operator recover` without --dir writes here


def _pick(args: argparse.Namespace, flag: str, env: Env, *names: str, default: str | None = None) -> str | None:
    value = getattr(args, flag, None)
    if value is not None:
        return str(value)
    for name in names:
        if env.get(name):
            return env[name]
    return default


_UNITS = {"ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 0.001, "s": 1, "m": 60, "h": 3600}
_GO_DURATION = re.compile(r"((?:\d+(?:\.\d*)?|\.\d+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+")
_GO_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def duration_seconds(text: str, what: str) -> float:
    """A duration in seconds, zero allowed: '1.5' (seconds), or Go's time.ParseDuration form ('1m30s', '500ms').

    SPIKE's variables hold Go durations, so every duration here takes Go's
    syntax (units ns, us, ms, s, m, h, several in a row); a bare number is seconds.
    """
    stripped = text.strip()
    if re.fullmatch(r"\d+(?:\.\d+)?", stripped):
        return float(stripped)
    if not _GO_DURATION.fullmatch(stripped):
        raise ConfigError(f"{what}: {text!r} is not a duration (examples: 500ms, 5s, 1m30s)")
    return sum(float(number) * _UNITS[unit] for number, unit in _GO_PART.findall(stripped))


def parse_duration(text: str, what: str) -> float:
    """'500ms', '2s', '1m', '1m30s', '1.5' (seconds) -> seconds, more than zero."""
    value = duration_seconds(text, what)
    if value <= 0:
        raise ConfigError(f"{what} must be greater than zero")
    return value


def parse_bind(text: str, what: str) -> tuple[str, int]:
    """':8443', '8443', '127.0.0.1:8443' or '[::1]:8443' -> (host, port)."""
    text = text.strip()
    host, sep, port_text = text.rpartition(":")
    if not sep:
        host, port_text = "", text
    host = host.strip("[]") or "0.0.0.0"  # noqa: S104 - SPIKE's ':port' form means every interface
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ConfigError(f"{what}: {text!r} is not a listen address (examples: :8443, 127.0.0.1:8443)")
    return host, int(port_text)


def parse_keeper_peers(text: str) -> dict[int, str]:
    """'1=https://k1:8443,2=https://k2:8443' or the positional 'https://k1:8443,https://k2:8443'."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise ConfigError("no keepers configured (SPIKE_NEXUS_KEEPER_PEERS)")
    with_ids = [e for e in entries if "=" in e.split("://", 1)[0]]
    if with_ids and len(with_ids) != len(entries):
        raise ConfigError("keeper peers: use either 'id=url' for every keeper or for none")
    keepers: dict[int, str] = {}
    for position, entry in enumerate(entries, start=1):
        if with_ids:
            id_text, _, url = entry.partition("=")
            if not id_text.strip().isdigit():
                raise ConfigError(f"keeper peers: {id_text!r} is not a keeper id (1-255)")
            keeper_id = int(id_text)
        else:
            keeper_id, url = position, entry
        url = url.strip().rstrip("/")
        if not MIN_KEEPER_ID <= keeper_id <= MAX_KEEPER_ID:
            raise ConfigError(f"keeper peers: id {keeper_id} is outside 1-255")
        if keeper_id in keepers:
            raise ConfigError(f"keeper peers: id {keeper_id} appears twice")
        try:
            parse_origin(url)
        except ValueError as exc:
            raise ConfigError(f"keeper peers: keeper {keeper_id}: {exc}") from None
        if url in keepers.values():
            raise ConfigError(f"keeper peers: {url} is listed twice")
        keepers[keeper_id] = url
    return keepers


def _bool(args: argparse.Namespace, flag: str, env: Env, name: str) -> bool:
    """A yes/no setting: the flag (store_true) if given, else the environment variable, else no."""
    if getattr(args, flag, False):
        return True
    text = env.get(name, "").strip().lower()
    if text in ("", "0", "false", "no", "off"):
        return False
    if text in ("1", "true", "yes", "on"):
        return True
    raise ConfigError(f"{name} must be true or false, not {text!r}")


def _int(text: str | None, what: str) -> int:
    if text is None or not text.strip().isdigit():
        raise ConfigError(f"{what} must be a whole number, not {text!r}")
    return int(text)


def trust_root(text: str, name: str) -> str:
    """One role's trust domain from SPIKE's SPIKE_TRUST_ROOT* form: a comma-separated list of one domain.

    SPIKE accepts a role's peers from any domain of the list; spike keeps one
    trust domain per role (other domains come in through SPIKE_TRUST_BUNDLES
    federation), so a list naming two different domains is refused.
    """
    domains = list(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    if len(domains) > 1:
        raise ConfigError(
            f"{name}={text!r}: spike takes one trust domain per role, not {len(domains)} "
            "(federate other domains with SPIKE_TRUST_BUNDLES)"
        )
    if not domains:
        raise ConfigError(f"{name}={text!r} names no trust domain")
    return domains[0]


#: SPIKE_SYSTEM_LOG_LEVEL's values (SPIKE's log.Level) and spike's level for each.
_SPIKE_LOG_LEVELS = {"DEBUG": "debug", "INFO": "info", "WARN": "warning", "ERROR": "error"}


def log_level(args: argparse.Namespace, env: Env) -> str:
    """--log-level, SPIKE_LOG_LEVEL, then SPIKE's SPIKE_SYSTEM_LOG_LEVEL (DEBUG, INFO, WARN, ERROR), then info."""
    level = _pick(args, "log_level", env, "SPIKE_LOG_LEVEL")
    if level is None and env.get("SPIKE_SYSTEM_LOG_LEVEL"):
        system = env["SPIKE_SYSTEM_LOG_LEVEL"]
        mapped = _SPIKE_LOG_LEVELS.get(system.strip().upper())
        if mapped is None:
            raise ConfigError(f"SPIKE_SYSTEM_LOG_LEVEL must be DEBUG, INFO, WARN or ERROR, not {system!r}")
        return mapped
    level = (level or "info").lower()
    if level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"log level must be debug, info, warning or error, not {level!r}")
    return level


def common(args: argparse.Namespace, env: Env, component: Component = Component.PILOT) -> Common:
    refused = refusal(env, component)
    if refused is not None:
        raise ConfigError(refused)
    flag = getattr(args, "trust_domain", None)
    base = env.get("SPIKE_TRUST_ROOT")
    default_domain = str(flag) if flag else trust_root(base, "SPIKE_TRUST_ROOT") if base else DEFAULT_TRUST_DOMAIN

    def role(name: str) -> str:
        text = env.get(name)
        return trust_root(text, name) if text else default_domain

    try:
        trust = TrustDomains(
            nexus=role("SPIKE_TRUST_ROOT_NEXUS"),
            keeper=role("SPIKE_TRUST_ROOT_KEEPER"),
            bootstrap=role("SPIKE_TRUST_ROOT_BOOTSTRAP"),
            pilot=role("SPIKE_TRUST_ROOT_PILOT"),
            keeper_identity=keeper_identity(args, env),
        )
    except InvalidSpiffeId as exc:
        raise ConfigError(f"trust domain: {exc}") from None
    svid = identity(args, env)
    level = log_level(args, env)
    fmt = (_pick(args, "log_format", env, "SPIKE_LOG_FORMAT", default="text") or "text").lower()
    if fmt not in ("text", "json"):
        raise ConfigError(f"log format must be text or json, not {fmt!r}")
    return Common(trust, svid, level, fmt)


_SVID_FILES = (
    ("svid_cert", "SPIKE_SVID_CERT", "SVID certificate"),
    ("svid_key", "SPIKE_SVID_KEY", "SVID private key"),
    ("svid_bundle", "SPIKE_SVID_BUNDLE", "trust bundle"),
)


def identity(args: argparse.Namespace, env: Env) -> IdentitySpec:
    """Where this workload's X.509 SVID comes from: `--identity` (SPIKE_IDENTITY) workload-api or files.

    Unset, it is the SPIFFE Workload API when SPIFFE_ENDPOINT_SOCKET is set and
    no SVID file is configured, and SVID files otherwise.
    """
    choice = _pick(args, "identity", env, "SPIKE_IDENTITY")
    socket = env.get("SPIFFE_ENDPOINT_SOCKET", "").strip()
    if choice is None:
        files_given = any(_pick(args, flag, env, env_name) for flag, env_name, _ in _SVID_FILES)
        choice = "workload-api" if socket and not files_given else "files"
    choice = choice.strip().lower()
    if choice == "files":
        return svid_files(args, env)
    if choice != "workload-api":
        raise ConfigError(f"identity source must be workload-api or files, not {choice!r} (--identity, SPIKE_IDENTITY)")
    if not socket:
        raise ConfigError(
            "the Workload API identity source needs SPIFFE_ENDPOINT_SOCKET (e.g. unix:///run/spire/agent.sock)"
        )
    if _pick(args, "trust_bundles", env, "SPIKE_TRUST_BUNDLES"):
        raise ConfigError(
            "SPIKE_TRUST_BUNDLES (--trust-bundles) is for SVID files: with the Workload API the agent sends "
            "the bundles of federated trust domains itself"
        )
    try:
        address = workload_api_address(socket)
    except ValueError as exc:
        raise ConfigError(f"SPIFFE_ENDPOINT_SOCKET: {exc}") from None
    # SPIKE_SPIFFE_SOURCE_TIMEOUT is SPIKE's name of the same wait (Go duration; SPIKE's default 30s).
    timeout = _pick(
        args, "workload_api_timeout", env, "SPIKE_WORKLOAD_API_TIMEOUT", "SPIKE_SPIFFE_SOURCE_TIMEOUT", default="10s"
    )
    return WorkloadApiSpec(address, parse_duration(timeout or "10s", "Workload API timeout"))


def svid_files(args: argparse.Namespace, env: Env) -> SvidFiles:
    """The three PEM files of an X.509 SVID (--svid-cert/--svid-key/--svid-bundle or SPIKE_SVID_*)."""
    files = []
    for flag, env_name, what in _SVID_FILES:
        value = _pick(args, flag, env, env_name)
        if not value:
            raise ConfigError(
                f"no X.509 SVID configured: set --{flag.replace('_', '-')} or {env_name}, or SPIFFE_ENDPOINT_SOCKET "
                "for the SPIFFE Workload API (`spike dev-identity` mints a development set)"
            )
        path = Path(value).expanduser()
        try:
            is_file = path.is_file()  # checked here: the TLS layer cannot say which file is missing
            problem = "" if is_file else "no such file" if not path.exists() else "not a regular file"
        except OSError as exc:  # a directory on the way we may not search, a name too long, ...
            problem = exc.strerror or str(exc)
        if problem:
            raise ConfigError(f"{what} {str(path)!r}: {problem} (--{flag.replace('_', '-')} or {env_name})")
        files.append(path)
    extra = _pick(args, "trust_bundles", env, "SPIKE_TRUST_BUNDLES")
    cert, key, bundle = files
    return SvidFiles(cert, key, bundle, parse_trust_bundles(extra) if extra else ())


def parse_trust_bundles(text: str) -> tuple[tuple[str, Path], ...]:
    """'other.org=/etc/spike/other.pem,partner.test=/etc/spike/partner.pem': each trust domain's bundle file.

    Every CA in such a file serves that trust domain and no other: a peer whose
    SPIFFE ID is in that domain must chain to one of them.
    """
    bundles: dict[str, Path] = {}
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        domain, sep, path_text = entry.partition("=")
        domain, path_text = domain.strip(), path_text.strip()
        if not sep or not domain or not path_text:
            raise ConfigError(
                f"trust bundles: {entry!r} is not trust-domain=file (example: other.org=/etc/spike/other.pem)"
            )
        try:
            check_trust_domain(domain)
        except InvalidSpiffeId as exc:
            raise ConfigError(f"trust bundles: {exc}") from None
        if domain in bundles:
            raise ConfigError(f"trust bundles: {domain} appears twice")
        path = Path(path_text).expanduser()
        if not path.is_file():
            problem = "no such file" if not path.exists() else "not a regular file"
            raise ConfigError(
                f"trust bundle of {domain} {str(path)!r}: {problem} (--trust-bundles or SPIKE_TRUST_BUNDLES)"
            )
        bundles[domain] = path
    if not bundles:
        raise ConfigError("trust bundles: no trust-domain=file given (--trust-bundles or SPIKE_TRUST_BUNDLES)")
    return tuple(bundles.items())


def keeper(args: argparse.Namespace, env: Env) -> KeeperConfig:
    listen = _pick(args, "listen", env, "SPIKE_KEEPER_TLS_PORT", default=f":{DEFAULT_KEEPER_PORT}")
    assert listen is not None
    base = common(args, env, Component.KEEPER)
    trust = dataclasses.replace(base.trust, nexus_identity=nexus_identity(args, env))
    return KeeperConfig(
        msgspec.structs.replace(base, trust=trust),
        parse_bind(listen, "keeper listen address"),
        _bool(args, "require_memory_lock", env, "SPIKE_REQUIRE_MEMORY_LOCK"),
    )


def nexus_identity(args: argparse.Namespace, env: Env) -> NexusIdentity:
    """A keeper's `--nexus-identity` (SPIKE_KEEPER_NEXUS_IDENTITY): exact (spike's) or spike (SPIKE's IsNexus)."""
    text = _pick(args, "nexus_identity", env, "SPIKE_KEEPER_NEXUS_IDENTITY", default="exact") or "exact"
    try:
        return NexusIdentity(text.strip().lower())
    except ValueError:
        raise ConfigError(
            f"Nexus identity must be exact (only spiffe://<td>/spike/nexus may read the shard) or spike "
            f"(also any ID below it, as SPIKE's Go keeper), not {text!r}"
        ) from None


# Mount names the Vault face cannot take: SPIKE's route prefixes and its own sys/, auth/ and transit/.
_TAKEN_MOUNTS = frozenset({"store", "acl", "cipher", "operator", "bootstrap", "sys", "auth", "transit"})


def vault_kv_mount(text: str) -> str:
    """The KV v2 mount of the Vault face: one path segment (`secret`, `kv`, `apps`), with or without a slash."""
    mount = text.strip().strip("/")
    if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", mount) or mount in (".", ".."):
        raise ConfigError(f"vault KV mount must be one path segment of letters, digits and ._-, not {text!r}")
    if mount in _TAKEN_MOUNTS:
        raise ConfigError(f"vault KV mount {mount!r} is taken by spike's own routes: choose another name")
    return mount


def vault_token_ttl(text: str) -> float:
    ttl = parse_duration(text, "vault token TTL")
    if not 10 <= ttl <= 24 * 3600:
        raise ConfigError(f"vault token TTL must be between 10s and 24h, not {text!r}")
    return ttl


def nexus(args: argparse.Namespace, env: Env) -> NexusConfig:
    base = common(args, env, Component.NEXUS)
    listen = _pick(args, "listen", env, "SPIKE_NEXUS_TLS_PORT", default=f":{DEFAULT_NEXUS_PORT}")
    assert listen is not None
    store_text = _pick(args, "backend_store", env, "SPIKE_NEXUS_BACKEND_STORE", default="") or ""
    if store_text.strip().lower() == "memory":
        return memory_nexus(args, env, base, parse_bind(listen, "Nexus listen address"))
    peers = _pick(args, "keepers", env, "SPIKE_NEXUS_KEEPER_PEERS")
    if not peers:
        raise ConfigError("no keepers configured: set --keepers or SPIKE_NEXUS_KEEPER_PEERS")
    keepers = parse_keeper_peers(peers)
    shares = _int(_pick(args, "shares", env, "SPIKE_NEXUS_SHAMIR_SHARES", default="3"), "shares")
    threshold = _int(_pick(args, "threshold", env, "SPIKE_NEXUS_SHAMIR_THRESHOLD", default="2"), "threshold")
    if threshold < 1:
        raise ConfigError("threshold must be at least 1")
    if threshold > shares:
        raise ConfigError(f"threshold ({threshold}) cannot be larger than shares ({shares})")
    if env.get("SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT"):
        most = _positive(env["SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT"], "SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT")
        if shares > most:
            raise ConfigError(f"shares ({shares}) is more than SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT ({most})")
    if threshold == 1 and not _bool(args, "allow_threshold_one", env, "SPIKE_ALLOW_THRESHOLD_ONE"):
        raise ConfigError(THRESHOLD_ONE)
    if len(keepers) != shares:
        raise ConfigError(f"{len(keepers)} keepers are configured but shares is {shares}: they must be equal")
    interval_text = _pick(args, "poll_interval", env, "SPIKE_NEXUS_KEEPER_POLL_INTERVAL", default="5s")
    interval = parse_duration(interval_text or "5s", "poll interval")
    timeout_text = _pick(args, "keeper_timeout", env, "SPIKE_NEXUS_KEEPER_TIMEOUT")
    timeout = parse_duration(timeout_text, "keeper timeout") if timeout_text else min(2.0, interval / 2)
    from spike.protocol.nexus import PollSchedule  # see the TYPE_CHECKING import above

    try:
        schedule = PollSchedule(interval=interval, request_timeout=timeout)
    except LocalProtocolError as exc:
        raise ConfigError(str(exc)) from None
    data_dir = _pick(args, "data_dir", env, "SPIKE_NEXUS_DATA_DIR", default="~/.spike/data")
    assert data_dir is not None
    metrics = _pick(args, "metrics_listen", env, "SPIKE_NEXUS_METRICS_LISTEN")
    audit = _pick(args, "audit_log", env, "SPIKE_NEXUS_AUDIT_LOG")
    grace = _pick(args, "shutdown_grace", env, "SPIKE_NEXUS_SHUTDOWN_GRACE", default="5s")
    retiring_text = _pick(args, "retiring_keepers", env, "SPIKE_NEXUS_RETIRING_KEEPER_PEERS")
    retiring = retiring_keepers(retiring_text, keepers) if retiring_text else {}
    every_text = _pick(args, "rotate_every", env, "SPIKE_NEXUS_ROTATE_EVERY")
    rotate_every = rotation_period(every_text) if every_text else None
    waiting = _pick(args, "waiting_summary_interval", env, "SPIKE_NEXUS_WAITING_SUMMARY_INTERVAL")
    lasting = _pick(args, "keeper_summary_interval", env, "SPIKE_NEXUS_KEEPER_SUMMARY_INTERVAL")
    database = _pick(args, "database_url", env, "SPIKE_NEXUS_DATABASE_URL")
    mount = _pick(args, "vault_kv_mount", env, "SPIKE_NEXUS_VAULT_KV_MOUNT", default="secret") or "secret"
    token_ttl = _pick(args, "vault_token_ttl", env, "SPIKE_NEXUS_VAULT_TOKEN_TTL", default="1h") or "1h"
    data = Path(data_dir).expanduser()
    database_text = database_url(database) if database else None
    staleness_text = _pick(args, "read_cache_staleness", env, "SPIKE_NEXUS_READ_CACHE_STALENESS")
    staleness = read_cache_staleness(staleness_text, database_text)
    return NexusConfig(
        base,
        parse_bind(listen, "Nexus listen address"),
        keepers,
        threshold,
        schedule,
        data,
        parse_bind(metrics, "metrics listen address") if metrics else None,
        Path(audit).expanduser() if audit else data / "audit.log",
        parse_duration(grace or "5s", "shutdown grace"),
        parse_duration(waiting, "waiting summary interval") if waiting else WAITING_SUMMARY_EVERY,
        parse_duration(lasting, "keeper summary interval") if lasting else KEEPER_SUMMARY_EVERY,
        database_text,
        _bool(args, "require_memory_lock", env, "SPIKE_REQUIRE_MEMORY_LOCK"),
        retiring,
        rotate_every,
        test_crash_point(env),
        config_file(args),
        vault_kv_mount(mount),
        vault_token_ttl(token_ttl),
        backend_store(store_text, database_text),
        max_secret_versions(env.get("SPIKE_NEXUS_MAX_SECRET_VERSIONS", "")),
        cipher_max_ciphertext(env.get("SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE", "")),
        lite_workload_domains(env.get("SPIKE_TRUST_ROOT_LITE_WORKLOAD", ""), args, env),
        shard_derivation(args, env),
        staleness,
    )


def read_cache_staleness(text: str | None, database: str | None) -> float:
    """--read-cache-staleness (SPIKE_NEXUS_READ_CACHE_STALENESS): a duration from 0 (no cache) to 10s, only
    with a PostgreSQL database (SQLite reads need no cache: they are local)."""
    if text is None:
        return READ_CACHE_STALENESS
    if database is None:
        raise ConfigError(
            "--read-cache-staleness (SPIKE_NEXUS_READ_CACHE_STALENESS) applies to PostgreSQL only "
            "(--database-url): leave it out on SQLite"
        )
    value = duration_seconds(text, "read cache staleness")
    if value > MAX_READ_CACHE_STALENESS:
        raise ConfigError(
            f"read cache staleness must be at most {MAX_READ_CACHE_STALENESS:g}s (0 turns the cache off), not {text!r}"
        )
    return value


#: The data dir of a Nexus on the memory backend, which never touches it: what `--check-config` shows.
NO_DATA_DIR = Path(":memory:")

#: What has no meaning on the memory backend, each (attribute of the flag, flag, variable, why).  Refused at
#: start in one line: a Nexus that ignored `--keepers` would let the operator believe the secrets are kept.
MEMORY_REFUSES = (
    ("keepers", "--keepers", "SPIKE_NEXUS_KEEPER_PEERS", "it has no keepers"),
    ("retiring_keepers", "--retiring-keepers", "SPIKE_NEXUS_RETIRING_KEEPER_PEERS", "it has no keepers"),
    ("shares", "--shares", "SPIKE_NEXUS_SHAMIR_SHARES", "its key is not split"),
    ("threshold", "--threshold", "SPIKE_NEXUS_SHAMIR_THRESHOLD", "its key is not split"),
    ("", "", "SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT", "its key is not split"),
    ("shard_derivation", "--shard-derivation", "SPIKE_NEXUS_SHARD_DERIVATION", "its key is not split"),
    ("keeper_identity", "--keeper-identity", "SPIKE_NEXUS_KEEPER_IDENTITY", "it has no keepers"),
    ("poll_interval", "--poll-interval", "SPIKE_NEXUS_KEEPER_POLL_INTERVAL", "it has no keepers to poll"),
    ("keeper_timeout", "--keeper-timeout", "SPIKE_NEXUS_KEEPER_TIMEOUT", "it has no keepers"),
    ("", "", "SPIKE_NEXUS_WAITING_SUMMARY_INTERVAL", "it never waits for shards"),
    ("", "", "SPIKE_NEXUS_KEEPER_SUMMARY_INTERVAL", "it has no keepers"),
    ("rotate_every", "--rotate-every", "SPIKE_NEXUS_ROTATE_EVERY", "its key lives as long as the process"),
    ("data_dir", "--data-dir", "SPIKE_NEXUS_DATA_DIR", "it writes nothing to disk"),
    ("database_url", "--database-url", "SPIKE_NEXUS_DATABASE_URL", "it keeps its data in memory"),
    ("read_cache_staleness", "--read-cache-staleness", "SPIKE_NEXUS_READ_CACHE_STALENESS", "it has no database"),
    ("metrics_listen", "--metrics-listen", "SPIKE_NEXUS_METRICS_LISTEN", "its metrics describe custody; it has none"),
)


def memory_nexus(args: argparse.Namespace, env: Env, base: Common, bind: tuple[str, int]) -> NexusConfig:
    """The memory backend (SPIKE's development store): nothing kept, and no setting that would say otherwise."""
    for flag, option, name, why in MEMORY_REFUSES:
        if (flag and getattr(args, flag, None) not in (None, False)) or env.get(name):
            given = f"{option} ({name})" if option else name
            raise ConfigError(
                f"{given} cannot be used with the memory backend (SPIKE_NEXUS_BACKEND_STORE=memory): {why}; "
                "nothing is kept, so leave it out (or choose another backend)"
            )
    audit = _pick(args, "audit_log", env, "SPIKE_NEXUS_AUDIT_LOG")
    grace = _pick(args, "shutdown_grace", env, "SPIKE_NEXUS_SHUTDOWN_GRACE", default="5s")
    from spike.protocol.nexus import PollSchedule  # see the TYPE_CHECKING import above

    return NexusConfig(
        base,
        bind,
        {},
        0,
        PollSchedule(),
        NO_DATA_DIR,
        audit_log=Path(audit).expanduser() if audit else None,
        shutdown_grace=parse_duration(grace or "5s", "shutdown grace"),
        require_memory_lock=_bool(args, "require_memory_lock", env, "SPIKE_REQUIRE_MEMORY_LOCK"),
        config_file=config_file(args),
        backend="memory",
        max_secret_versions=max_secret_versions(env.get("SPIKE_NEXUS_MAX_SECRET_VERSIONS", "")),
        cipher_max_ciphertext=cipher_max_ciphertext(env.get("SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE", "")),
        lite_workload_domains=lite_workload_domains(env.get("SPIKE_TRUST_ROOT_LITE_WORKLOAD", ""), args, env),
    )


def lite_workload_domains(text: str, args: argparse.Namespace, env: Env) -> tuple[str, ...]:
    """SPIKE_TRUST_ROOT_LITE_WORKLOAD: a comma-separated list of trust domains, as SPIKE reads it.

    Only a SPIFFE ID is compared here (no peer is trusted for it), so unlike the
    other roles' trust roots a list of several domains is honoured.
    """
    if not text.strip():
        flag = getattr(args, "trust_domain", None)
        base = env.get("SPIKE_TRUST_ROOT")
        return (str(flag) if flag else trust_root(base, "SPIKE_TRUST_ROOT") if base else DEFAULT_TRUST_DOMAIN,)
    domains = tuple(dict.fromkeys(part.strip() for part in text.split(",") if part.strip()))
    try:
        for domain in domains:
            check_trust_domain(domain)
    except InvalidSpiffeId as exc:
        raise ConfigError(f"SPIKE_TRUST_ROOT_LITE_WORKLOAD: {exc}") from None
    if not domains:
        raise ConfigError(f"SPIKE_TRUST_ROOT_LITE_WORKLOAD={text!r} names no trust domain")
    return domains


def _positive(text: str, name: str) -> int:
    """A whole number above zero, SPIKE's rule for its counts (SPIKE falls back to its default; spike refuses)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise ConfigError(f"{name} must be a whole number above zero, not {text!r}")
    return int(text)


def backend_store(text: str, database: str | None) -> str:
    """SPIKE_NEXUS_BACKEND_STORE: sqlite (the default), or postgres/postgresql with SPIKE_NEXUS_DATABASE_URL."""
    store = text.strip().lower() or ("postgresql" if database else "sqlite")
    if store == "postgres":
        store = "postgresql"
    if store == "sqlite" and database:
        raise ConfigError("SPIKE_NEXUS_BACKEND_STORE=sqlite and a database URL (SPIKE_NEXUS_DATABASE_URL): choose one")
    if store == "postgresql" and not database:
        raise ConfigError(
            f"SPIKE_NEXUS_BACKEND_STORE={text.strip()} needs the database's URL in SPIKE_NEXUS_DATABASE_URL "
            "(postgresql://user@host:5432/dbname)"
        )
    if store == "lite" and database:
        raise ConfigError(
            "SPIKE_NEXUS_BACKEND_STORE=lite keeps no secrets, only its key record (SQLite in the data dir): "
            "not with SPIKE_NEXUS_DATABASE_URL"
        )
    if store not in ("sqlite", "postgresql", "lite"):
        raise ConfigError(
            f"the backend store (--backend-store, SPIKE_NEXUS_BACKEND_STORE) must be sqlite, lite, memory, postgres "
            f"or postgresql, not {text.strip()!r}"
        )
    return store


def max_secret_versions(text: str) -> int:
    """SPIKE_NEXUS_MAX_SECRET_VERSIONS: versions kept of a secret whose metadata sets no max (SPIKE's 10)."""
    from spike.app.model.kv import DEFAULT_MAX_VERSIONS, MAX_MAX_VERSIONS

    if not text:
        return DEFAULT_MAX_VERSIONS
    value = _positive(text, "SPIKE_NEXUS_MAX_SECRET_VERSIONS")
    if value > MAX_MAX_VERSIONS:
        raise ConfigError(f"SPIKE_NEXUS_MAX_SECRET_VERSIONS must be at most {MAX_MAX_VERSIONS}, not {value}")
    return value


def cipher_max_ciphertext(text: str) -> int | None:
    """SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE: bytes of AES-GCM ciphertext (tag included) the cipher takes.

    As in SPIKE, the longest plaintext is 16 bytes (the tag) less.  Unset,
    spike keeps its own limit (1 MiB of plaintext; SPIKE's default is 64 KiB).
    """
    from spike.app.api.messages import CIPHER_MAX_PLAINTEXT

    if not text:
        return None
    value = _positive(text, "SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE")
    if not 17 <= value <= CIPHER_MAX_PLAINTEXT + 16:
        raise ConfigError(
            f"SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE must be between 17 and {CIPHER_MAX_PLAINTEXT + 16}, not {value}"
        )
    return value


# SPIKE compatibility of the keepers (docs/spike-keepers.md): how a keeper's SPIFFE ID is read, and
# how the root key is split.  Nexus reads both; bootstrap reads the keeper identity (it dials keepers
# too) and takes the derivation from Nexus's status.


def keeper_identity(args: argparse.Namespace, env: Env) -> KeeperIdentity:
    """`--keeper-identity` (SPIKE_NEXUS_KEEPER_IDENTITY): per-id (spike's) or spike (one ID for every keeper)."""
    text = _pick(args, "keeper_identity", env, "SPIKE_NEXUS_KEEPER_IDENTITY", default="per-id") or "per-id"
    try:
        return KeeperIdentity(text.strip().lower())
    except ValueError:
        raise ConfigError(
            f"keeper identity must be per-id (spiffe://<td>/spike/keeper/<id>) or spike "
            f"(spiffe://<td>/spike/keeper for every keeper), not {text!r}"
        ) from None


def shard_derivation(args: argparse.Namespace, env: Env) -> ShardDerivation:
    """`--shard-derivation` (SPIKE_NEXUS_SHARD_DERIVATION): hmac (spike's) or spike (SPIKE's Go Nexus)."""
    text = _pick(args, "shard_derivation", env, "SPIKE_NEXUS_SHARD_DERIVATION", default="hmac") or "hmac"
    try:
        return ShardDerivation(text.strip().lower())
    except ValueError:
        raise ConfigError(
            f"shard derivation must be hmac (spike's) or spike (SPIKE's Go Nexus), not {text!r}"
        ) from None


def retiring_keepers(text: str, keepers: Mapping[int, str]) -> dict[int, str]:
    """Keepers a rekey moves custody away from ('4=https://k4:8443,...'): ids only, none of the configured set."""
    if all("=" in entry.split("://", 1)[0] for entry in text.split(",") if entry.strip()):
        retiring = parse_keeper_peers(text)
    else:
        raise ConfigError(
            "retiring keepers: give each as id=url (e.g. 4=https://k4:8443): ids are what the record knows"
        )
    both = sorted(set(retiring) & set(keepers))
    if both:
        raise ConfigError(f"retiring keepers: {', '.join(map(str, both))} also in --keepers (a keeper stays or leaves)")
    shared = sorted(set(retiring.values()) & set(keepers.values()))
    if shared:
        raise ConfigError(f"retiring keepers: {shared[0]} is also a configured keeper's URL")
    return retiring


#: Where a test build may stop Nexus with SIGKILL (SPIKE_TEST_CRASH_AT; spike.app.nexus.lifecycle
#: carries it out).  Each names the moment between two steps of a key rotation
#: (docs/key-lifecycle.md section 5 says what a restart does in each).
CRASH_POINTS = (
    "rotation-store-before",  # PersistRotation given to the driver, nothing written
    "rotation-stored",  # the pending rotation is durable, the machine not yet told: nothing dealt
    "rotation-dealing",  # a first keeper showed its new shard
    "rotation-commit-before",  # enough keepers showed theirs: CommitRotation given, nothing written
    "rotation-committed",  # the commit is durable, the machine not yet told
    "rotation-retiring",  # the machine took the new key; no keeper told to forget the old epoch yet
    "rotation-abandon-before",  # AbandonRotation given, nothing written
    "rotation-abandoned",  # the pending rotation is deleted, the machine not yet told
)

#: The shortest --rotate-every accepted: a rotation takes a few poll intervals, and one must end
#: before the next is due.
MIN_ROTATE_EVERY = 60.0


def rotation_period(text: str) -> float:
    """--rotate-every: '24h', '7d', '90m' ... (at least a minute)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*d\s*", text)
    seconds = float(match.group(1)) * 86400 if match else parse_duration(text, "rotate every")
    if seconds < MIN_ROTATE_EVERY:
        raise ConfigError(f"rotate every: {text!r} is shorter than a minute (examples: 24h, 7d)")
    return seconds


def test_crash_point(env: Env) -> str | None:
    """SPIKE_TEST_CRASH_AT: a test build's point to stop Nexus with SIGKILL (spike.app.nexus.lifecycle).

    Read only when spike runs from its sources: the one-file executable (sys.frozen) ignores it.
    """
    import sys

    point = env.get("SPIKE_TEST_CRASH_AT", "").strip()
    if not point or getattr(sys, "frozen", False):
        return None
    if point not in CRASH_POINTS:
        raise ConfigError(f"SPIKE_TEST_CRASH_AT: {point!r} is none of {', '.join(CRASH_POINTS)}")
    return point


def config_file(args: argparse.Namespace | None) -> Path | None:
    file = getattr(args, "config", None) or os.environ.get("SPIKE_CONFIG")
    return Path(file).expanduser() if file else None


def mask_url(url: str) -> str:
    """A URL fit for logs and --check-config: its password (in the user info or a query) replaced by ***."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    cut = min((i for i in (rest.find("/"), rest.find("?"), rest.find("#")) if i >= 0), default=len(rest))
    netloc, tail = rest[:cut], rest[cut:]
    userinfo, at, hosts = netloc.rpartition("@")
    if at and ":" in userinfo:
        netloc = f"{userinfo.partition(':')[0]}:***@{hosts}"
    tail = re.sub(r"(?i)([?&]password=)[^&#]*", r"\1***", tail)
    return f"{scheme}://{netloc}{tail}"


def database_url(text: str) -> str:
    """A PostgreSQL connection URL (postgresql://user:password@host:port/db?options)."""
    from urllib.parse import urlsplit

    text = text.strip()
    try:
        parts = urlsplit(text)
        parts.port  # noqa: B018 - parsing the port is the check
    except ValueError as exc:
        raise ConfigError(f"database URL {mask_url(text)!r}: {exc}") from None
    if parts.scheme not in ("postgresql", "postgres"):
        raise ConfigError(
            f"database URL {mask_url(text)!r} is not a PostgreSQL URL (postgresql://user@host:5432/dbname)"
        )
    return text


def nexus_url(args: argparse.Namespace, env: Env) -> str:
    url = _pick(args, "nexus", env, "SPIKE_NEXUS_API_URL", default=DEFAULT_NEXUS_URL)
    assert url is not None
    url = url.rstrip("/")
    try:
        parse_origin(url)
    except ValueError as exc:
        raise ConfigError(f"Nexus URL: {exc}") from None
    return url


def bootstrap(args: argparse.Namespace, env: Env) -> BootstrapConfig:
    import math

    base = common(args, env, Component.BOOTSTRAP)
    peers = _pick(args, "keepers", env, "SPIKE_NEXUS_KEEPER_PEERS")
    timeout_text = _pick(args, "timeout", env, "SPIKE_BOOTSTRAP_TIMEOUT", default="60s") or "60s"
    # SPIKE's SPIKE_BOOTSTRAP_TIMEOUT=0 means no deadline at all.
    timeout = duration_seconds(timeout_text, "bootstrap timeout") or math.inf
    # SPIKE's bootstrap forces only on exactly "true" (its Kubernetes-style flag); anything else is no.
    force = bool(getattr(args, "force", False)) or env.get("SPIKE_BOOTSTRAP_FORCE", "") == "true"
    return BootstrapConfig(
        base,
        nexus_url(args, env),
        parse_keeper_peers(peers) if peers else None,
        force,
        timeout,
        _bool(args, "allow_threshold_one", env, "SPIKE_ALLOW_THRESHOLD_ONE"),
    )


def client(args: argparse.Namespace, env: Env) -> ClientConfig:
    output = (getattr(args, "format", None) or "human").lower()
    recovery = env.get("SPIKE_PILOT_RECOVERY_DIR")
    return ClientConfig(
        common(args, env), nexus_url(args, env), output, Path(recovery).expanduser() if recovery else None
    )


def trust_domain_arg(text: str) -> str:
    try:
        return check_trust_domain(text)
    except InvalidSpiffeId as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


# The optional TOML file (--config or SPIKE_CONFIG): each key stands for the
# environment variable it maps to, so the precedence is one rule everywhere:
# flag > environment > file > default.
TOML_KEYS: dict[str, dict[str, str]] = {
    "": {
        "trust_domain": "SPIKE_TRUST_ROOT",
        "svid_cert": "SPIKE_SVID_CERT",
        "svid_key": "SPIKE_SVID_KEY",
        "svid_bundle": "SPIKE_SVID_BUNDLE",
        "identity": "SPIKE_IDENTITY",
        "spiffe_endpoint_socket": "SPIFFE_ENDPOINT_SOCKET",
        "workload_api_timeout": "SPIKE_WORKLOAD_API_TIMEOUT",
        "log_level": "SPIKE_LOG_LEVEL",
        "log_format": "SPIKE_LOG_FORMAT",
        "nexus_url": "SPIKE_NEXUS_API_URL",
        "require_memory_lock": "SPIKE_REQUIRE_MEMORY_LOCK",
        "allow_threshold_one": "SPIKE_ALLOW_THRESHOLD_ONE",
    },
    "trust": {
        "bundles": "SPIKE_TRUST_BUNDLES",
        "nexus": "SPIKE_TRUST_ROOT_NEXUS",
        "keeper": "SPIKE_TRUST_ROOT_KEEPER",
        "bootstrap": "SPIKE_TRUST_ROOT_BOOTSTRAP",
        "pilot": "SPIKE_TRUST_ROOT_PILOT",
    },
    "keeper": {"listen": "SPIKE_KEEPER_TLS_PORT", "nexus_identity": "SPIKE_KEEPER_NEXUS_IDENTITY"},
    "nexus": {
        "listen": "SPIKE_NEXUS_TLS_PORT",
        "keepers": "SPIKE_NEXUS_KEEPER_PEERS",
        "shares": "SPIKE_NEXUS_SHAMIR_SHARES",
        "threshold": "SPIKE_NEXUS_SHAMIR_THRESHOLD",
        "poll_interval": "SPIKE_NEXUS_KEEPER_POLL_INTERVAL",
        "keeper_timeout": "SPIKE_NEXUS_KEEPER_TIMEOUT",
        "data_dir": "SPIKE_NEXUS_DATA_DIR",
        "metrics_listen": "SPIKE_NEXUS_METRICS_LISTEN",
        "audit_log": "SPIKE_NEXUS_AUDIT_LOG",
        "shutdown_grace": "SPIKE_NEXUS_SHUTDOWN_GRACE",
        "waiting_summary_interval": "SPIKE_NEXUS_WAITING_SUMMARY_INTERVAL",
        "keeper_summary_interval": "SPIKE_NEXUS_KEEPER_SUMMARY_INTERVAL",
        "database_url": "SPIKE_NEXUS_DATABASE_URL",
        "retiring_keepers": "SPIKE_NEXUS_RETIRING_KEEPER_PEERS",
        "rotate_every": "SPIKE_NEXUS_ROTATE_EVERY",
        "vault_kv_mount": "SPIKE_NEXUS_VAULT_KV_MOUNT",
        "vault_token_ttl": "SPIKE_NEXUS_VAULT_TOKEN_TTL",
        "backend_store": "SPIKE_NEXUS_BACKEND_STORE",
        "max_secret_versions": "SPIKE_NEXUS_MAX_SECRET_VERSIONS",
        "crypto_max_ciphertext_size": "SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE",
        "keeper_identity": "SPIKE_NEXUS_KEEPER_IDENTITY",
        "shard_derivation": "SPIKE_NEXUS_SHARD_DERIVATION",
        "read_cache_staleness": "SPIKE_NEXUS_READ_CACHE_STALENESS",
    },
    "bootstrap": {"timeout": "SPIKE_BOOTSTRAP_TIMEOUT"},
}


def _toml_value(path: Path, section: str, key: str, value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float | str):
        return str(value)
    if section == "nexus" and key in ("keepers", "retiring_keepers") and isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())  # [nexus.keepers] 1 = "https://..."
    if section == "trust" and key == "bundles" and isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())  # [trust.bundles] "other.org" = "/etc/..."
    if section == "nexus" and key == "keepers" and isinstance(value, list):
        return ",".join(str(v) for v in value)
    raise ConfigError(f"config file {path}: {section + '.' if section else ''}{key} has an unsupported value type")


def load_config_file(path: Path) -> dict[str, str]:
    """The file's settings, keyed by the environment variable each one stands for."""
    import tomllib

    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read the config file {path}: {exc.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the config file {path} is not valid TOML: {exc}") from None
    out: dict[str, str] = {}
    for key, value in data.items():
        if key in TOML_KEYS and key != "":
            if not isinstance(value, dict):
                raise ConfigError(f"config file {path}: {key} must be a table ([{key}]) of settings")
            for inner, inner_value in value.items():
                name = TOML_KEYS[key].get(inner)
                if name is None:
                    raise ConfigError(f"config file {path}: unknown setting {key}.{inner}")
                out[name] = _toml_value(path, key, inner, inner_value)
        else:
            name = TOML_KEYS[""].get(key)
            if name is None:
                raise ConfigError(f"config file {path}: unknown setting {key}")
            out[name] = _toml_value(path, "", key, value)
    return out


def environ(args: argparse.Namespace | None = None) -> Env:
    """The environment, over the config file's settings (if one is given)."""
    from collections import ChainMap

    file = getattr(args, "config", None) or os.environ.get("SPIKE_CONFIG")
    if not file:
        return os.environ
    # An empty variable counts as unset (as everywhere else): it must not hide the file's value.
    return ChainMap({k: v for k, v in os.environ.items() if v}, load_config_file(Path(file).expanduser()))


def describe(config: object) -> dict[str, object]:
    """A printable view of a configuration (paths and names; a database URL without its password)."""

    def plain(value: object) -> object:
        if isinstance(value, msgspec.Struct):  # spike.app's records
            return {name: plain(getattr(value, name)) for name in value.__struct_fields__}
        if dataclasses.is_dataclass(value) and not isinstance(value, type):  # spike.protocol's
            return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, tuple | list):
            return [plain(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        if isinstance(value, Enum):
            return value.value
        if isinstance(value, str) and "://" in value:
            return mask_url(value)
        return value

    result = plain(config)
    assert isinstance(result, dict)
    return result
