"""SPIKE's environment variables that spike cannot honour: each is refused at start, by name.

SPIKE (spiffe/spike, spiffe/spike-sdk-go `config/env`) reads some fifty
`SPIKE_*` variables.  spike honours most of them with SPIKE's meaning
(spike.app.config reads those); this module holds the others, so that a
SPIKE deployment moved here never runs with a setting silently dropped.  A
variable whose value is exactly what spike does anyway (SPIKE's default, when
that is spike's behaviour) is accepted; any other value stops the start with
one line naming the variable and why (docs/spike-environment.md has the table).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from enum import Enum

import msgspec


class Component(Enum):
    """Which spike process reads the environment: a variable is checked only where SPIKE reads it."""

    NEXUS = "nexus"
    KEEPER = "keeper"
    BOOTSTRAP = "bootstrap"
    PILOT = "pilot"  # every client command (secret, policy, cipher, operator, status)


ALL = frozenset(Component)
CLIENTS = frozenset({Component.NEXUS, Component.BOOTSTRAP, Component.PILOT})  # whoever makes HTTP requests
SERVERS = frozenset({Component.NEXUS, Component.KEEPER})
NEXUS = frozenset({Component.NEXUS})
BOOTSTRAP = frozenset({Component.BOOTSTRAP})
PILOT = frozenset({Component.PILOT})


def _go_false(value: str) -> bool:
    """Go's strconv.ParseBool false forms (SPIKE parses its database booleans with it)."""
    return value in ("0", "f", "F", "false", "FALSE", "False")


def _lower_false(value: str) -> bool:
    """SPIKE's out.go flags: anything but "true" (after trim and lower-casing) means off."""
    return value.strip().lower() != "true"


class Refused(msgspec.Struct, frozen=True):
    """A SPIKE variable spike has no setting for: refused unless its value is what spike does anyway."""

    name: str
    components: frozenset[Component]
    reason: str
    accepted: Callable[[str], bool] | None = None  # the values that are exactly spike's behaviour


_HTTP_CLIENT = "tunes Go's net/http client transport; spike's HTTP client has no such setting"
_DB_POOL = "tunes Go's database/sql connection pool; spike's storage has no such setting"
_DB_TIMEOUT = "spike's storage has no such timeout: a database call either answers or fails the request"
_BOOTSTRAP_RETRY = "spike bootstrap retries each keeper until its one deadline (SPIKE_BOOTSTRAP_TIMEOUT)"

REFUSED: tuple[Refused, ...] = (
    Refused("SPIKE_BANNER_ENABLED", ALL, "spike prints no start-up banner (only false is accepted)", _lower_false),
    Refused(
        "SPIKE_STACK_TRACES_ON_LOG_FATAL",
        ALL,
        "spike never prints a stack trace on a fatal error, only one line (only false is accepted)",
        _lower_false,
    ),
    Refused(
        "SPIKE_PILOT_SHOW_MEMORY_WARNING",
        PILOT,
        "the spike CLI does not lock its memory, so has no warning to show (only false is accepted)",
        _lower_false,
    ),
    Refused(
        "SPIKE_SHOW_MEMORY_WARNING",
        PILOT,
        "SPIKE's old name of SPIKE_PILOT_SHOW_MEMORY_WARNING: the spike CLI has no memory warning "
        "(only false is accepted)",
        _lower_false,
    ),
    Refused("SPIKE_HTTP_CLIENT_DIALER_KEEP_ALIVE", CLIENTS, _HTTP_CLIENT),
    Refused("SPIKE_HTTP_CLIENT_DIALER_TIMEOUT", CLIENTS, _HTTP_CLIENT),
    Refused("SPIKE_HTTP_CLIENT_EXPECT_CONTINUE_TIMEOUT", CLIENTS, _HTTP_CLIENT),
    Refused("SPIKE_HTTP_CLIENT_IDLE_CONN_TIMEOUT", CLIENTS, _HTTP_CLIENT),
    Refused("SPIKE_HTTP_CLIENT_MAX_CONNS_PER_HOST", CLIENTS, _HTTP_CLIENT),
    Refused("SPIKE_HTTP_CLIENT_MAX_IDLE_CONNS", CLIENTS, _HTTP_CLIENT),
    Refused("SPIKE_HTTP_CLIENT_MAX_IDLE_CONNS_PER_HOST", CLIENTS, _HTTP_CLIENT),
    Refused("SPIKE_HTTP_CLIENT_RESPONSE_HEADER_TIMEOUT", CLIENTS, _HTTP_CLIENT),
    Refused(
        "SPIKE_HTTP_CLIENT_TIMEOUT",
        CLIENTS,
        f"{_HTTP_CLIENT} (Nexus's requests to keepers: SPIKE_NEXUS_KEEPER_TIMEOUT)",
    ),
    Refused("SPIKE_HTTP_CLIENT_TLS_HANDSHAKE_TIMEOUT", CLIENTS, _HTTP_CLIENT),
    Refused(
        "SPIKE_HTTP_SERVER_READ_HEADER_TIMEOUT",
        SERVERS,
        "spike's HTTP server has its own fixed limits on slow clients; it has no such setting",
    ),
    Refused(
        "SPIKE_NEXUS_DB_JOURNAL_MODE",
        NEXUS,
        "spike's SQLite database always runs in WAL mode (only WAL is accepted)",
        lambda value: value.strip().upper() == "WAL",
    ),
    Refused(
        "SPIKE_NEXUS_DB_BUSY_TIMEOUT_MS",
        NEXUS,
        "spike's SQLite busy timeout is fixed at 5000 ms (only 5000 is accepted)",
        lambda value: value.strip() == "5000",
    ),
    Refused(
        "SPIKE_NEXUS_DB_SKIP_SCHEMA_CREATION",
        NEXUS,
        "spike always creates and migrates its own schema (only false is accepted)",
        _go_false,
    ),
    Refused(
        "SPIKE_DATABASE_SKIP_SCHEMA_CREATION",
        NEXUS,
        "SPIKE's old name of SPIKE_NEXUS_DB_SKIP_SCHEMA_CREATION: spike always creates its own schema "
        "(only false is accepted)",
        _go_false,
    ),
    Refused("SPIKE_NEXUS_DB_MAX_OPEN_CONNS", NEXUS, _DB_POOL),
    Refused("SPIKE_NEXUS_DB_MAX_IDLE_CONNS", NEXUS, _DB_POOL),
    Refused("SPIKE_NEXUS_DB_CONN_MAX_LIFETIME", NEXUS, _DB_POOL),
    Refused("SPIKE_NEXUS_DB_OPERATION_TIMEOUT", NEXUS, _DB_TIMEOUT),
    Refused("SPIKE_NEXUS_DB_INITIALIZATION_TIMEOUT", NEXUS, _DB_TIMEOUT),
    Refused(
        "SPIKE_NEXUS_KEEPER_UPDATE_INTERVAL",
        NEXUS,
        "spike does not push shards on a timer: it polls every keeper each SPIKE_NEXUS_KEEPER_POLL_INTERVAL "
        "(5s) and re-seeds an empty one at once; set that instead",
    ),
    Refused(
        "SPIKE_NEXUS_RECOVERY_MAX_INTERVAL",
        NEXUS,
        "spike does not back off while it rebuilds the root key: it asks the keepers every "
        "SPIKE_NEXUS_KEEPER_POLL_INTERVAL; set that instead",
    ),
    Refused(
        "SPIKE_NEXUS_PBKDF2_ITERATION_COUNT",
        NEXUS,
        "SPIKE documents it but no SPIKE code reads it, and spike derives no key from a password",
    ),
    Refused(
        "SPIKE_BOOTSTRAP_CONFIGMAP_NAME",
        BOOTSTRAP,
        "spike bootstrap keeps no Kubernetes ConfigMap: Nexus's key record says whether it was bootstrapped",
    ),
    Refused(
        "SPIKE_BOOTSTRAP_INIT_VERIFICATION_TIMEOUT",
        BOOTSTRAP,
        "spike bootstrap has one deadline for the whole run: set SPIKE_BOOTSTRAP_TIMEOUT",
    ),
    Refused("SPIKE_BOOTSTRAP_KEEPER_MAX_RETRIES", BOOTSTRAP, _BOOTSTRAP_RETRY),
    Refused("SPIKE_BOOTSTRAP_KEEPER_RETRY_INITIAL_INTERVAL", BOOTSTRAP, _BOOTSTRAP_RETRY),
    Refused("SPIKE_BOOTSTRAP_KEEPER_RETRY_MAX_INTERVAL", BOOTSTRAP, _BOOTSTRAP_RETRY),
    Refused("SPIKE_BOOTSTRAP_KEEPER_TIMEOUT", BOOTSTRAP, _BOOTSTRAP_RETRY),
    Refused(
        "SPIKE_INTEGRATION_TEST",
        ALL,
        "a switch of SPIKE's own Go test suite, read by no SPIKE component and none of spike's",
    ),
    Refused(
        "SPIKE_INTEGRATION_DESTRUCTIVE",
        ALL,
        "a switch of SPIKE's own Go test suite, read by no SPIKE component and none of spike's",
    ),
)

#: SPIKE's variables spike.app.config reads with SPIKE's meaning (docs/spike-environment.md says how).
HONOURED: tuple[str, ...] = (
    "SPIKE_TRUST_ROOT",
    "SPIKE_TRUST_ROOT_NEXUS",
    "SPIKE_TRUST_ROOT_KEEPER",
    "SPIKE_TRUST_ROOT_BOOTSTRAP",
    "SPIKE_TRUST_ROOT_PILOT",
    "SPIKE_TRUST_ROOT_LITE_WORKLOAD",
    "SPIKE_SYSTEM_LOG_LEVEL",
    "SPIKE_SPIFFE_SOURCE_TIMEOUT",
    "SPIKE_KEEPER_TLS_PORT",
    "SPIKE_NEXUS_TLS_PORT",
    "SPIKE_NEXUS_API_URL",
    "SPIKE_NEXUS_DATA_DIR",
    "SPIKE_NEXUS_KEEPER_PEERS",
    "SPIKE_NEXUS_SHAMIR_SHARES",
    "SPIKE_NEXUS_SHAMIR_THRESHOLD",
    "SPIKE_NEXUS_SHAMIR_MAX_SHARE_COUNT",
    "SPIKE_NEXUS_MAX_SECRET_VERSIONS",
    "SPIKE_NEXUS_CRYPTO_MAX_CIPHERTEXT_SIZE",
    "SPIKE_NEXUS_BACKEND_STORE",
    "SPIKE_BOOTSTRAP_FORCE",
    "SPIKE_BOOTSTRAP_TIMEOUT",
    "SPIKE_PILOT_RECOVERY_DIR",
)


def refusal(env: Mapping[str, str], component: Component) -> str | None:
    """The one line that stops `component` from starting, or None: the first refused SPIKE variable set."""
    for entry in REFUSED:
        value = env.get(entry.name, "")
        if not value or component not in entry.components:
            continue
        if entry.accepted is not None and entry.accepted(value):
            continue
        return f"{entry.name}={value!r} is not supported: {entry.reason}"
    return None


#: Every SPIKE variable accounted for, honoured or refused (the tests compare it with SPIKE's own list).
KNOWN = frozenset(HONOURED) | {entry.name for entry in REFUSED}
