"""SPIKE Go's database where spike's Nexus would look: found, named, never opened for writing, never changed.

SPIKE's Go Nexus keeps its SQLite database at `<SPIKE_NEXUS_DATA_DIR>/data/spike.db`, or
`~/.spike/data/spike.db` by default (spike-sdk-go config/fs: it appends `data` to the variable's
directory).  spike's keeps its own at `<data dir>/spike.db`, `~/.spike/data/spike.db` by default:
so the same variable puts SPIKE's file one level down, and the two defaults are the same file.

spike's Nexus does not open SPIKE's database (its schema and encryption are SPIKE's): its data
moves with `spike migrate from-spike`.  Left alone, spike would create its own tables inside
SPIKE's file (default case) or start empty beside it (`SPIKE_NEXUS_DATA_DIR` case), and the
operator might bootstrap a new key over a deployment that has data.  So Nexus stops at start
with one line, unless its own database is already there (after a migration, SPIKE's file may
stay beside it): then it says so and goes on.
"""

from __future__ import annotations

import logging
import sqlite3
from pathlib import Path
from urllib.parse import quote

from spike.app.store.errors import StorageError
from spike.app.store.sqlite_schema import DB_NAME

log = logging.getLogger("spike.nexus.store")

#: SPIKE Go's tables (spike/app/nexus/internal/state/backend/sqlite/ddl/statement.go); spike's are others.
SPIKE_GO_TABLES = frozenset({"secrets", "secret_metadata", "policies"})
#: Where SPIKE Go keeps its database, under the directory SPIKE_NEXUS_DATA_DIR names.
SPIKE_GO_DB = Path("data") / DB_NAME
MIGRATE = "spike migrate from-spike"


def _tables(path: Path) -> set[str]:
    """The tables of the SQLite file `path`, read as an immutable file: no lock, no -wal or -shm made, nothing
    written.  (A SPIKE schema only in a -wal file, never checkpointed, is not seen: SPIKE writes it at its
    first start.)  Empty for a file that is not an SQLite database."""
    try:
        db = sqlite3.connect(f"file:{quote(str(path.resolve()))}?mode=ro&immutable=1", uri=True)
        try:
            return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        finally:
            db.close()
    except sqlite3.Error:
        return set()


def is_spike_go_database(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0 and bool(_tables(path) & SPIKE_GO_TABLES)


def check_data_dir(data_dir: Path) -> None:
    """Stop (`StorageError`, one line) where the data dir holds SPIKE Go's database and not spike's own."""
    own = data_dir / DB_NAME
    if is_spike_go_database(own):
        raise StorageError(
            f"{own} is a SPIKE Go database, which spike's Nexus does not open (nothing was changed): move its "
            f"secrets and policies with `{MIGRATE}` into a spike Nexus on another data dir"
        )
    nested = data_dir / SPIKE_GO_DB
    if not is_spike_go_database(nested):  # also spike's own one level down (a data dir given as its parent)
        return
    if own.is_file() and own.stat().st_size > 0:
        log.warning(
            "%s is a SPIKE Go database (SPIKE's data dir layout), which spike's Nexus does not open; "
            "it uses its own %s beside it (`%s` moves SPIKE's data)",
            nested,
            own,
            MIGRATE,
        )
        return
    raise StorageError(
        f"{data_dir} has SPIKE Go's layout: {nested} is a SPIKE Go database, which spike's Nexus does not open "
        f"(nothing was changed); move its secrets and policies with `{MIGRATE}`, or give spike's Nexus another "
        "data dir"
    )
