"""The `spike` command: one executable, one subcommand per role.

Every failure a user can cause ends in one line on stderr and a non-zero
exit code (2 for configuration, 1 for everything else); tracebacks are for
bugs only.

Start-up time counts (`spike --version`; a keeper restarted by its supervisor;
the one-file executable unpacks itself first): this module imports only what
parsing needs, and each subcommand imports its own modules when it runs.
Each command's parser is built only when that command runs, or for the full
help (the client commands' parsers import the client stack).
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import spike
from spike.app import startup
from spike.app.errors import CommandError

if TYPE_CHECKING:
    from spike.app.config import Common

EXIT_CONFIG = 2
_SERVERS = frozenset({"nexus", "keeper"})  # they call startup.listening() once they listen


def _checkout_commit() -> str | None:
    """The commit of the git checkout these sources run from (an editable install), `-dirty` if changed."""
    root = Path(spike.__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None
    import subprocess

    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=5, check=True)
        return done.stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        changed = git("status", "--porcelain", "--", "spike", "pyproject.toml")
    except (OSError, subprocess.SubprocessError):
        return None
    # The same stamp build/build.sh writes into the binary, so both name a build the same way.
    return f"{commit}-dirty" if changed else commit


def build_commit() -> str:
    """The commit this spike was built from: stamped into the binary by build/build.sh, else read from git."""
    try:
        return str(importlib.import_module("spike._build_info").COMMIT)
    except (ImportError, AttributeError):
        return _checkout_commit() or "unknown"


def version_line() -> str:
    """`spike 0.1.0 (commit abc1234)`."""
    return f"spike {spike.__version__} (commit {build_commit()})"


def _terminal_columns() -> int:
    """The width `shutil.get_terminal_size()` gives: $COLUMNS, else the terminal's, else 80."""
    try:
        columns = int(os.environ["COLUMNS"])
    except (KeyError, ValueError):
        columns = 0
    if columns > 0:
        return columns
    try:
        return os.get_terminal_size(sys.__stdout__.fileno()).columns or 80  # type: ignore[union-attr]
    except (AttributeError, ValueError, OSError):  # no stdout, or not a terminal
        return 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's help formatter, given the terminal's width.

    Not given one, it imports shutil to ask (with bz2 and lzma: 2.7 ms), and argparse
    makes a formatter for every argument it adds: every spike command paid that (issue 20).
    """

    def __init__(
        self, prog: str, indent_increment: int = 2, max_help_position: int = 24, width: int | None = None
    ) -> None:
        super().__init__(prog, indent_increment, max_help_position, _terminal_columns() - 2 if width is None else width)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser with the formatter above; subcommands' parsers are of the same class."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", _HelpFormatter)
        super().__init__(*args, **kwargs)


class _VersionAction(argparse.Action):
    """`--version` among other options: the line is made only when asked (in a git checkout it runs git twice)."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: Any) -> None:
        super().__init__(
            option_strings, dest, nargs=0, default=argparse.SUPPRESS, help="show program's version number and exit"
        )

    def __call__(self, parser: argparse.ArgumentParser, *args: Any) -> None:
        print(version_line())
        parser.exit()


def _trust_domain_arg(text: str) -> str:
    from spike.app import config as cfg

    return cfg.trust_domain_arg(text)


def _identity_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group(
        "identity (the SPIFFE Workload API at SPIFFE_ENDPOINT_SOCKET, or X.509 SVID files: SPIKE_SVID_CERT/KEY/BUNDLE)"
    )
    group.add_argument(
        "--identity",
        choices=["workload-api", "files"],
        help="where the SVID comes from (env SPIKE_IDENTITY; default: workload-api when SPIFFE_ENDPOINT_SOCKET "
        "is set and no SVID file is given, else files)",
    )
    group.add_argument("--svid-cert", metavar="PEM", help="certificate chain of this workload's SVID")
    group.add_argument("--svid-key", metavar="PEM", help="private key of the SVID")
    group.add_argument(
        "--svid-bundle", metavar="PEM", help="trust bundle of the SVID's own trust domain (CA certificates)"
    )
    group.add_argument(
        "--trust-bundles",
        metavar="TD=PEM,...",
        help="bundles of other trust domains, one file each: other.org=/etc/spike/other.pem,... "
        "(env SPIKE_TRUST_BUNDLES)",
    )
    group.add_argument(
        "--trust-domain", type=_trust_domain_arg, help="trust domain of every role (env SPIKE_TRUST_ROOT)"
    )
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="env SPIKE_LOG_LEVEL")
    parser.add_argument("--log-format", choices=["text", "json"], help="env SPIKE_LOG_FORMAT")
    parser.add_argument("--config", metavar="TOML", help="settings file (env SPIKE_CONFIG); flags and env win")


def _memory_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--require-memory-lock",
        action="store_true",
        default=None,
        help="fail to start if memory cannot be locked against swapping (env SPIKE_REQUIRE_MEMORY_LOCK); "
        "by default it is locked where the system allows it, and the log says so",
    )


def _threshold_one_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--allow-threshold-one",
        action="store_true",
        default=None,
        help="accept threshold 1, where every shard is the root key itself (env SPIKE_ALLOW_THRESHOLD_ONE)",
    )


def _client_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of every command that talks to Nexus: where it is, and who we are."""
    parser.add_argument("--nexus", metavar="URL", help="env SPIKE_NEXUS_API_URL, default https://localhost:8553")
    _identity_flags(parser)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole parser; given a command word, the top level and that command's parser only.

    Every command's parser is ~8 ms to build (the client commands' import the client
    stack), paid at each start; a command needs its own.  A word no entry of _PARSERS
    parses, or none, gets them all, for the list of commands in the help and the error.
    """
    parser = _Parser(prog="spike", description="SPIFFE-native secrets manager")
    parser.add_argument("--version", action=_VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    known = any(command in names for names, _ in _PARSERS)
    for names, add in _PARSERS:
        if not known or command in names:
            add(sub)
    return parser


def _add_client_commands(sub: Any) -> None:
    from spike.app.commands.secret import add_parsers

    add_parsers(sub, _client_flags)


def _add_policy(sub: Any) -> None:
    from spike.app.commands.policy import add_parser

    add_parser(sub, _client_flags)


def _add_version(sub: Any) -> None:
    version = sub.add_parser("version", help="print the version")
    version.add_argument("--format", choices=["human", "json"], default="human")


def _add_completion(sub: Any) -> None:
    completion = sub.add_parser(
        "completion",
        help="print a shell completion script: `source <(spike completion bash)`",
        description="Print a completion script for spike's commands, subcommands and flags. bash: "
        "`source <(spike completion bash)` (or save it in ~/.local/share/bash-completion/completions/spike); "
        "zsh: `source <(spike completion zsh)` after compinit (or save it as _spike on $fpath); "
        "fish: `spike completion fish > ~/.config/fish/completions/spike.fish`.",
    )
    completion.add_argument("shell", choices=["bash", "zsh", "fish"])


def _add_keeper(sub: Any) -> None:
    keeper = sub.add_parser("keeper", help="hold one shard of the root key in memory")
    keeper.add_argument(
        "--nexus-identity",
        choices=["exact", "spike"],
        help="who may read the shard: exact (only spiffe://<td>/spike/nexus, default) or spike (also any ID "
        "below it, spiffe://<td>/spike/nexus/..., as SPIKE's Go keeper: more readers of the shard) "
        "(env SPIKE_KEEPER_NEXUS_IDENTITY)",
    )
    keeper.add_argument("--listen", metavar="ADDR", help="e.g. :8443 or 127.0.0.1:8443 (env SPIKE_KEEPER_TLS_PORT)")
    _memory_flag(keeper)
    _identity_flags(keeper)


def _add_nexus(sub: Any) -> None:
    nexus = sub.add_parser("nexus", help="the secrets store; keeps the keepers seeded")
    nexus.add_argument("--listen", metavar="ADDR", help="e.g. :8553 (env SPIKE_NEXUS_TLS_PORT)")
    nexus.add_argument(
        "--keepers",
        metavar="PEERS",
        help="'1=https://k1:8443,2=https://k2:8443,...' (env SPIKE_NEXUS_KEEPER_PEERS)",
    )
    nexus.add_argument(
        "--retiring-keepers",
        metavar="PEERS",
        help="'4=https://k4:8443,...': keepers of the stored key record that --keepers no longer lists, so that "
        "custody can move away from them (env SPIKE_NEXUS_RETIRING_KEEPER_PEERS)",
    )
    nexus.add_argument("--shares", metavar="N", help="number of shards (env SPIKE_NEXUS_SHAMIR_SHARES, default 3)")
    nexus.add_argument(
        "--threshold",
        metavar="T",
        help="shards needed to rebuild (env SPIKE_NEXUS_SHAMIR_THRESHOLD, default 2)",
    )
    nexus.add_argument(
        "--poll-interval",
        metavar="DUR",
        help="keeper poll interval (env SPIKE_NEXUS_KEEPER_POLL_INTERVAL, default 5s)",
    )
    nexus.add_argument(
        "--keeper-timeout", metavar="DUR", help="per-request keeper timeout (env SPIKE_NEXUS_KEEPER_TIMEOUT)"
    )
    nexus.add_argument(
        "--rotate-every",
        metavar="DUR",
        help="rotate the root key by itself this often, e.g. 24h or 7d (env SPIKE_NEXUS_ROTATE_EVERY; default: never)",
    )
    nexus.add_argument(
        "--backend-store",
        choices=["sqlite", "lite", "memory", "postgres", "postgresql"],
        help="where secrets live: sqlite (default), postgresql (with --database-url), lite (cipher only) or memory "
        "(development: no keepers, NOTHING KEPT when Nexus stops) (env SPIKE_NEXUS_BACKEND_STORE)",
    )
    nexus.add_argument("--data-dir", metavar="DIR", help="env SPIKE_NEXUS_DATA_DIR, default ~/.spike/data")
    nexus.add_argument(
        "--database-url",
        metavar="URL",
        help="postgresql://user@host/db: share one PostgreSQL with other Nexus instances "
        "(env SPIKE_NEXUS_DATABASE_URL; default SQLite in the data dir)",
    )
    nexus.add_argument(
        "--read-cache-staleness",
        metavar="DUR",
        help="PostgreSQL: how old a GET may be for writes through other instances, 0 for no read cache "
        "(env SPIKE_NEXUS_READ_CACHE_STALENESS; default 20ms)",
    )
    nexus.add_argument(
        "--metrics-listen", metavar="ADDR", help="plain-HTTP /metrics /healthz /readyz (SPIKE_NEXUS_METRICS_LISTEN)"
    )
    nexus.add_argument("--audit-log", metavar="FILE", help="env SPIKE_NEXUS_AUDIT_LOG, default <data-dir>/audit.log")
    nexus.add_argument("--shutdown-grace", metavar="DUR", help="time to finish requests on SIGTERM (default 5s)")
    nexus.add_argument(
        "--vault-kv-mount",
        metavar="NAME",
        help="Vault API: where KV v2 is served (default secret; SPIKE_NEXUS_VAULT_KV_MOUNT)",
    )
    nexus.add_argument(
        "--vault-token-ttl", metavar="DUR", help="Vault API: lifetime of a cert-login token (default 1h)"
    )
    _keeper_identity_flag(nexus)
    nexus.add_argument(
        "--shard-derivation",
        choices=["hmac", "spike"],
        help="how a new root key is split: hmac (spike's, default) or spike (SPIKE's Go Nexus, which can then "
        "take turns over the same keepers and recovery files) (env SPIKE_NEXUS_SHARD_DERIVATION)",
    )
    nexus.add_argument("--check-config", action="store_true", help="print the effective configuration and exit")
    _threshold_one_flag(nexus)
    _memory_flag(nexus)
    _identity_flags(nexus)


def _keeper_identity_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--keeper-identity",
        choices=["per-id", "spike"],
        help="keepers' SPIFFE IDs: per-id (spiffe://<td>/spike/keeper/<id>, default) or spike (SPIKE's one "
        "spiffe://<td>/spike/keeper for every keeper: the URL says which keeper it is) "
        "(env SPIKE_NEXUS_KEEPER_IDENTITY)",
    )


def _add_bootstrap(sub: Any) -> None:
    boot = sub.add_parser("bootstrap", help="make a root key, seed the keepers, verify Nexus holds it")
    boot.add_argument("--keepers", metavar="PEERS", help="keeper URLs as seen from here (default: Nexus's list)")
    boot.add_argument("--force", action="store_true", help="replace an existing root key (old secrets are lost)")
    boot.add_argument("--timeout", metavar="DUR", help="give up after this long (default 60s)")
    boot.add_argument("--format", choices=["human", "json"], default="human")
    _keeper_identity_flag(boot)
    _threshold_one_flag(boot)
    _client_flags(boot)


def _add_status(sub: Any) -> None:
    status = sub.add_parser("status", help="Nexus phase, redundancy and every keeper's state")
    status.add_argument("--format", choices=["human", "json"], default="human")
    _client_flags(status)


def _add_dev(sub: Any) -> None:
    dev = sub.add_parser("dev", help="run a local deployment: 3 keepers, a Nexus, bootstrapped")
    dev.add_argument("--data-dir", type=Path, help="keep state here (default: a temporary dir)")
    dev.add_argument("--keepers", type=int, default=3)
    dev.add_argument("--threshold", type=int, default=2)
    _threshold_one_flag(dev)
    dev.add_argument("--trust-domain", type=_trust_domain_arg, help="default spike.ist")
    dev.add_argument("--poll-interval", default="2s")
    dev.add_argument(
        "--keeper-identity",
        choices=["per-id", "spike"],
        default="per-id",
        help="spike: every keeper presents SPIKE's one keeper ID spiffe://<td>/spike/keeper, and Nexus and "
        "bootstrap accept it (docs/spike-keepers.md)",
    )
    dev.add_argument("--log-level", choices=["debug", "info", "warning", "error"], default="info")


def _add_dev_identity(sub: Any) -> None:
    ident = sub.add_parser("dev-identity", help="mint a development CA and SVIDs for every role")
    ident.add_argument("--dir", type=Path, required=True, help="where to write the PEM files")
    ident.add_argument("--trust-domain", type=_trust_domain_arg, help="default spike.ist")
    ident.add_argument(
        "--keepers",
        help="keeper ids to mint spiffe://<td>/spike/keeper/<id> SVIDs for (default 1,2,3; none with "
        "--keeper-identity spike unless given)",
    )
    ident.add_argument(
        "--keeper-identity",
        choices=["per-id", "spike"],
        default="per-id",
        help="spike: also mint keeper.pem for SPIKE's one keeper ID spiffe://<td>/spike/keeper, which every "
        "keeper presents (for a Nexus and bootstrap with --keeper-identity spike)",
    )
    ident.add_argument(
        "--nexus-name",
        action="append",
        default=[],
        metavar="NAME",
        help="one more DNS name or IP address for Nexus's SVID (it always has localhost and 127.0.0.1); repeatable",
    )


def _add_operator(sub: Any) -> None:
    operator = sub.add_parser(
        "operator", help="rotate the root key; break-glass: export recovery shards, restore from them"
    )
    op = operator.add_subparsers(dest="operator_command", metavar="ACTION", required=True)
    rec = op.add_parser("recover", help="write all shards to files (recover role only)")
    rec.add_argument(
        "--dir", type=Path, help="directory for the shard files (created 0700); default SPIKE_PILOT_RECOVERY_DIR"
    )
    res = op.add_parser("restore", help="give Nexus one shard (restore role only); run once per shard")
    res.add_argument("--file", type=Path, help="read the shard from this file (default: hidden prompt or stdin)")
    rot = op.add_parser("rotate", help="rotate the root key: new epoch, new shards, old ones retired (superuser)")
    rot.add_argument("--abort", action="store_true", help="give up the rotation being dealt instead")
    rot.add_argument(
        "--data-key", action="store_true", help="rotate the data key instead: a new term for new values (one write)"
    )
    rot.add_argument(
        "--rewrap",
        action="store_true",
        help="re-seal stored values under the newest data-key term, in the background (with --data-key: the new one)",
    )
    rot.add_argument(
        "--no-wait", action="store_true", help="return once the rotation is stored, without waiting for the commit"
    )
    rot.add_argument(
        "--wait",
        action="store_true",
        help="with --rewrap: wait until every stored value is re-wrapped, showing how many are left",
    )
    rot.add_argument(
        "--timeout", metavar="DUR", default="5m", help="how long to wait for the commit or re-wrap (default 5m)"
    )
    for p in (rec, res):
        p.add_argument("--format", choices=["human", "json"], default="human")
    for p in (rec, res, rot):
        _client_flags(p)


def _add_migrate(sub: Any) -> None:
    from spike.app.commands.formats import add_format_flag

    migrate = sub.add_parser("migrate", help="move another deployment's secrets and policies into this Nexus")
    mig = migrate.add_subparsers(dest="migrate_command", metavar="SOURCE", required=True)
    spike_go = mig.add_parser(
        "from-spike",
        help="from a SPIKE Go Nexus's SQLite database, opened with its recovery shards (superuser)",
        description="Rebuild SPIKE's root key from the shards its `spike operator recover` wrote, open every "
        "secret version and policy of its database (read-only), check them, and write them into this Nexus in "
        "one transaction. --dry-run stops before writing. See docs/migrating-from-spike.md.",
    )
    spike_go.add_argument("database", type=Path, metavar="DB", help="SPIKE's SQLite database (its spike.db)")
    spike_go.add_argument(
        "--shard", type=Path, action="append", default=[], metavar="FILE", help="a recovery shard file (repeat)"
    )
    spike_go.add_argument(
        "--recovery-dir", type=Path, metavar="DIR", help="read every spike.recovery.*.txt file in this directory"
    )
    spike_go.add_argument(
        "--threshold",
        type=int,
        metavar="T",
        help="SPIKE's Shamir threshold: fewer shards are refused, more must lie on one polynomial",
    )
    spike_go.add_argument("--dry-run", action="store_true", help="read, open and check everything; write nothing")
    spike_go.add_argument(
        "--merge",
        action="store_true",
        help="import into a Nexus that holds secrets or policies already (a path or policy name on both sides "
        "refuses the whole import)",
    )
    add_format_flag(spike_go)
    _client_flags(spike_go)


def _setup_logs(common: Common) -> None:
    from spike.app.logs import setup

    setup(common.log_level, common.log_format)


# Each command's parser (in the order of the help), by the command words it parses.
_PARSERS: list[tuple[frozenset[str], Callable[[Any], None]]] = [
    (frozenset({"keeper"}), _add_keeper),
    (frozenset({"nexus"}), _add_nexus),
    (frozenset({"bootstrap"}), _add_bootstrap),
    (frozenset({"status"}), _add_status),
    (frozenset({"dev"}), _add_dev),
    (frozenset({"dev-identity"}), _add_dev_identity),
    (frozenset({"secret", "cipher"}), _add_client_commands),
    (frozenset({"policy"}), _add_policy),
    (frozenset({"operator"}), _add_operator),
    (frozenset({"migrate"}), _add_migrate),
    (frozenset({"version"}), _add_version),
    (frozenset({"completion"}), _add_completion),
]


def _keeper(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app import keeper

    config = cfg.keeper(args, cfg.environ(args))
    _setup_logs(config.common)
    keeper.run(config)
    return 0


def _nexus(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app.nexus import server as nexus

    config = cfg.nexus(args, cfg.environ(args))
    if args.check_config:
        import json

        print(json.dumps(cfg.describe(config), indent=2, default=str))
        return 0
    _setup_logs(config.common)
    # SIGHUP reads the configuration again (flags as given, the environment as started, the
    # --config file as it is now): keepers, threshold and the rotation schedule take effect.
    nexus.run(config, reload=lambda: cfg.nexus(args, cfg.environ(args)))
    return 0


def _bootstrap(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app.commands import bootstrap

    config = cfg.bootstrap(args, cfg.environ(args))
    _setup_logs(config.common)
    bootstrap.run(config, output=args.format)
    return 0


def _status(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app.commands import status

    config = cfg.client(args, cfg.environ(args))
    _setup_logs(config.common)
    return status.run(config)


def _dev(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app.commands import dev
    from spike.protocol.identity import KeeperIdentity

    return dev.run(
        dev.DevOptions(
            data_dir=args.data_dir,
            keepers=args.keepers,
            threshold=args.threshold,
            trust_domain=args.trust_domain or cfg.DEFAULT_TRUST_DOMAIN,
            poll_interval=args.poll_interval,
            log_level=args.log_level,
            allow_threshold_one=bool(args.allow_threshold_one),
            keeper_identity=KeeperIdentity(args.keeper_identity),
        )
    )


def _dev_identity(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app.commands.devca import check_server_names, mint_dev_identity

    trust_domain = args.trust_domain or cfg.DEFAULT_TRUST_DOMAIN
    spike_keeper = args.keeper_identity == "spike"
    keepers = args.keepers if args.keepers is not None else ("" if spike_keeper else "1,2,3")
    try:
        ids = [int(x) for x in keepers.split(",") if x.strip()]
    except ValueError:
        raise cfg.ConfigError(f"--keepers must be a comma-separated list of ids, not {keepers!r}") from None
    try:
        check_server_names(args.nexus_name)
    except ValueError as exc:
        raise cfg.ConfigError(f"--nexus-name: {exc}") from None
    identity = mint_dev_identity(args.dir, trust_domain, ids, nexus_names=args.nexus_name, spike_keeper=spike_keeper)
    print(f"development SVIDs for spiffe://{trust_domain} written to {identity.directory}")
    if spike_keeper:
        print(
            f"every keeper: {identity.spike_keeper().cert.name} (spiffe://{trust_domain}/spike/keeper); "
            "run Nexus and bootstrap with --keeper-identity spike"
        )
    return 0


def _secret(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app.commands.secret import run_secret

    _setup_logs(cfg.common(args, cfg.environ(args)))
    return run_secret(args)


def _cipher(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app.commands.secret import run_cipher

    _setup_logs(cfg.common(args, cfg.environ(args)))
    return run_cipher(args)


def _policy(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app.commands import policy as policy_cli

    _setup_logs(cfg.common(args, cfg.environ(args)))
    return policy_cli.run(args)


def _operator(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app.commands import operator
    from spike.app.commands.client import NexusClient

    config = cfg.client(args, cfg.environ(args))
    recovery_dir = getattr(args, "dir", None) or config.recovery_dir
    if args.operator_command == "recover" and recovery_dir is None:
        raise CommandError("give the directory for the shard files: --dir or SPIKE_PILOT_RECOVERY_DIR", exit_code=2)
    _setup_logs(config.common)
    with NexusClient(config.nexus_url, config.common.svid, config.common.trust) as client:
        if args.operator_command == "recover":
            assert recovery_dir is not None  # checked above, before any connection
            return operator.recover(client, recovery_dir, print, config.output)
        if args.operator_command == "rotate":
            from spike.app.commands import rotate
            from spike.app.commands.progress import Progress

            wait = None if args.no_wait else cfg.parse_duration(args.timeout, "--timeout")
            if args.abort and (args.data_key or args.rewrap):
                raise CommandError("--abort gives up a root key rotation: not with --data-key or --rewrap", exit_code=2)
            if args.wait and not args.rewrap:
                raise CommandError("--wait follows a re-wrap: only with --rewrap", exit_code=2)
            if args.wait and args.no_wait:
                raise CommandError("--wait and --no-wait: choose one", exit_code=2)
            bar = Progress("spike operator rotate")

            def say(line: str) -> None:
                bar.done()
                print(line, flush=True)

            try:
                if args.data_key or args.rewrap:
                    follow = wait if args.wait else None
                    return rotate.data_key(
                        client, rotate_term=args.data_key, rewrap=args.rewrap, say=say, wait=follow, progress=bar
                    )
                return rotate.run(client, abort=args.abort, wait=wait, say=say, progress=bar)
            finally:
                bar.done()
        if args.file is not None:
            try:
                text = args.file.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise CommandError(f"cannot read {args.file}: {exc}", exit_code=2) from None
        else:
            text = operator.read_shard_text(sys.stdin)
        return operator.restore(client, text, print, config.output)


def _migrate(args: argparse.Namespace) -> int:
    from spike.app import config as cfg
    from spike.app.commands import migrate
    from spike.app.commands.client import NexusClient

    # A dry run reads files only: it needs no identity and no Nexus.
    config = None if args.dry_run else cfg.client(args, cfg.environ(args))
    shares = migrate.read_shards(args.shard, args.recovery_dir)
    if config is not None:
        _setup_logs(config.common)

    def connect() -> NexusClient:
        assert config is not None
        return NexusClient(config.nexus_url, config.common.svid, config.common.trust, timeout=60.0)

    return migrate.run(
        args.database,
        shares,
        threshold=args.threshold,
        dry_run=args.dry_run,
        merge=args.merge,
        output=args.format,
        say=print,
        client=connect,
    )


def _version(args: argparse.Namespace) -> int:
    if args.format == "json":
        import json

        print(json.dumps({"version": spike.__version__, "commit": build_commit()}))
        return 0
    print(version_line())
    return 0


def _completion(args: argparse.Namespace) -> int:
    from spike.app.commands import completion

    sys.stdout.write(completion.script(build_parser(), args.shell))
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "keeper": _keeper,
    "nexus": _nexus,
    "bootstrap": _bootstrap,
    "status": _status,
    "dev": _dev,
    "dev-identity": _dev_identity,
    "secret": _secret,
    "cipher": _cipher,
    "operator": _operator,
    "migrate": _migrate,
    "policy": _policy,
    "version": _version,
    "completion": _completion,
}


def _raised_by(exc: BaseException, module: str, name: str) -> bool:
    """Whether `exc` is `module.name`; a module never imported cannot have raised it (nor is imported for the check)."""
    found = sys.modules.get(module)
    return found is not None and isinstance(exc, getattr(found, name))


# Errors a user can cause at start (a bad SVID, a taken port, an unusable data dir): one line, exit 2.
_STARTUP_ERRORS = (
    ("spike.transports.tls", "IdentityError"),
    ("spike.transports.runner", "BindError"),
    ("spike.app.store.errors", "StorageError"),
)


def _command_word(words: list[str]) -> str | None:
    """The command a command line runs; None when the top level's help comes first (`spike -h nexus`)."""
    for word in words:
        if word in ("-h", "--help"):
            return None
        if not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    words = list(sys.argv[1:] if argv is None else argv)
    if words[:1] == ["--version"]:  # the quickest path: no parser, no imports
        print(version_line())
        return 0
    command = _command_word(words)
    with startup.collector_paused(command in _SERVERS):  # until the server listens: spike/app/startup.py
        return _main(command, words)


def _main(command: str | None, words: list[str]) -> int:
    from spike.app.logs import route_dependency_warnings

    route_dependency_warnings()
    parser = build_parser(command)
    args, extra = parser.parse_known_args(words)
    # `spike secret put PATH --cas 1 key=value`: argparse cannot take positionals
    # after an option, so KEY=VALUE words left over are the values.
    if extra and hasattr(args, "pairs") and all("=" in word and not word.startswith("-") for word in extra):
        args.pairs = [*args.pairs, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    name = f"spike {args.command}"
    try:
        return COMMANDS[args.command](args)
    except CommandError as exc:
        print(f"{name}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        import logging

        logging.getLogger("spike").info("interrupted")
        return 130
    except Exception as exc:
        if _raised_by(exc, "spike.app.config", "ConfigError"):
            print(f"{name}: configuration error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        if any(_raised_by(exc, module, cls) for module, cls in _STARTUP_ERRORS):
            print(f"{name}: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        raise
