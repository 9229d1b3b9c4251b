"""Build side of build/lazy_unpack.py: which shared libraries the bootloader need not unpack at every start.

Used by build/spike.spec after PyInstaller's analysis.  A module is lazy when its name is one of LAZY_MODULES
or under one of them; its files are its extension module, every shared library of the bundle it needs
(DT_NEEDED, transitively) that no eager file needs, the data files in its package's directory and the links
PyInstaller made to its libraries.  Everything else stays in PyInstaller's list and is
unpacked at every start as before.  The lazy files are stripped like the others (PyInstaller's own
process_collected_binary), compressed with zlib (except those of STORED_MODULES, and any file compression
would not shrink: stored as they are) and written, in sorted order, to one blob:

    SPIKE-LAZY-1\\n<index length>\\n<index><data>

The index is text, one line per file `F <offset> <stored length> <length> <file>` (offsets from the end
of the index), one per symbolic link `S <link> <target>` and one per module `M <module> <file or link> ...`.
Deterministic: same inputs, same bytes.
"""

from __future__ import annotations

import importlib.machinery
import posixpath
import re
import subprocess
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

BLOB_MAGIC = b"SPIKE-LAZY-1\n"
ENTRY_NAME = "spike-lazy.bin"  # the archive entry build/lazy_unpack.py looks for

# Imported by some subcommands only (measured: `python -c` with sys.modules dumped at exit, per subcommand).
# `spike --version` imports none of them, a keeper none; the client commands and Nexus import cryptography
# (and uvloop); gRPC/protobuf only with a Workload API, psycopg only with PostgreSQL, SQLite only in a Nexus
# without PostgreSQL, the CJK codecs and expat never in spike's own code paths.
LAZY_MODULES = (
    "grpc",  # gRPC core (C++, 17 MB): the Workload API client
    "google._upb",  # protobuf: the Workload API client
    "psycopg_binary",  # libpq with its own OpenSSL, Kerberos and LDAP libraries: PostgreSQL
    "cryptography",  # Rust + a static OpenSSL: Nexus, bootstrap, the client commands, dev-identity
    "_cffi_backend",
    "uvloop",
    "re2",  # RE2 with the C++ runtime it needs (libstdc++): the policy engine, Nexus only
    "yaml",
    "_sqlite3",
    "_multibytecodec",
    "_codecs_cn",
    "_codecs_hk",
    "_codecs_iso2022",
    "_codecs_jp",
    "_codecs_kr",
    "_codecs_tw",
    "pyexpat",
)

# Stored as they are, not compressed: every Nexus start imports them before it listens, and inflating them
# cost ~14 ms of CPU at each (SQLite 7, uvloop 5.5, _cffi_backend 1) for 2 MB of binary (issue 20).
# cryptography's Rust library is left compressed: storing it would save ~40 ms a start but add 7.8 MB
# (docs/benchmarks.md, 2026-12-06 restart section).
STORED_MODULES = ("_cffi_backend", "uvloop", "_sqlite3")

# glibc loads libgcc_s itself (dlopen, for unwinding and pthread_cancel), not only through DT_NEEDED.
ALWAYS_EAGER = ("libgcc_s.so.1",)

Entry = tuple[str, str, str]  # PyInstaller's TOC entry: (name in the bundle, source path, typecode)


def module_name(dest: str) -> str | None:
    """`grpc/_cython/cygrpc.cpython-311-x86_64-linux-gnu.so` -> `grpc._cython.cygrpc`."""
    path = re.sub(r"^python3\.\d+/lib-dynload/", "", dest)
    for suffix in sorted(importlib.machinery.EXTENSION_SUFFIXES, key=len, reverse=True):
        if path.endswith(suffix):
            return path[: -len(suffix)].replace("/", ".")
    return None


def _under(module: str, names: Iterable[str]) -> bool:
    return any(module == name or module.startswith(name + ".") for name in names)


def is_lazy(module: str) -> bool:
    return _under(module, LAZY_MODULES)


def needed(path: str) -> list[str]:
    """The DT_NEEDED entries of a shared object (readelf: binutils, which `strip` needs anyway)."""
    out = subprocess.run(["readelf", "-d", "-W", path], capture_output=True, text=True, check=True).stdout
    return re.findall(r"\(NEEDED\)\s+Shared library: \[([^\]]+)\]", out)


def split(
    binaries: Iterable[Entry], datas: Iterable[Entry], workdir: Path, strip: Callable[[str, str], str]
) -> tuple[list[Entry], list[Entry], Path, dict[str, list[str]]]:
    """PyInstaller's binaries and datas without the lazy files, the blob holding them, and module -> files."""
    binaries, datas = list(binaries), list(datas)
    entries = [entry for entry in binaries if entry[2] in ("BINARY", "EXTENSION")]
    by_basename: dict[str, list[str]] = {}
    for dest, _src, _kind in entries:
        by_basename.setdefault(Path(dest).name, []).append(dest)
    source = {dest: src for dest, src, _kind in entries}
    deps = {dest: sorted({d for name in needed(src) for d in by_basename.get(name, [])}) for dest, src, _ in entries}

    def closure(roots: Iterable[str]) -> set[str]:
        seen: set[str] = set()
        todo = list(roots)
        while todo:
            dest = todo.pop()
            if dest not in seen:
                seen.add(dest)
                todo.extend(deps[dest])
        return seen

    lazy_modules = {}
    for dest, _src, kind in entries:
        name = module_name(dest) if kind == "EXTENSION" else None
        if name is not None and is_lazy(name):
            lazy_modules[name] = dest
    # Eager: every other extension module, and every library no lazy module leads to (libpython), with all
    # they need.  A library both kinds need is eager.
    reached_from_lazy = closure(lazy_modules.values())
    eager_roots = [
        dest
        for dest, _src, kind in entries
        if dest not in lazy_modules.values() and (kind == "EXTENSION" or dest not in reached_from_lazy)
    ]
    eager = closure(eager_roots) | {d for name in ALWAYS_EAGER for d in by_basename.get(name, [])}
    modules = {name: sorted(closure([dest]) - eager) for name, dest in sorted(lazy_modules.items())}
    lazy_binaries = {dest for files in modules.values() for dest in files}

    # With them: the data files in the lazy module's package directory (gRPC's root certificates), and the
    # links PyInstaller makes to a lazy library from the top directory (psycopg's libraries).
    links: dict[str, str] = {}
    lazy_data: set[str] = set()
    for dest, src, kind in datas:
        if kind == "SYMLINK" and posixpath.normpath(posixpath.join(posixpath.dirname(dest), src)) in lazy_binaries:
            links[dest] = src
            target = posixpath.normpath(posixpath.join(posixpath.dirname(dest), src))
            for files in modules.values():
                if target in files:
                    files.append(dest)
        elif kind == "DATA":
            for name, files in modules.items():
                package = name.rpartition(".")[0]
                if package and dest.startswith(package.replace(".", "/") + "/"):
                    files.append(dest)
                    lazy_data.add(dest)
                    source[dest] = src
    for name, files in modules.items():
        files.sort()
        for dest in files:
            assert " " not in dest and "\n" not in dest, f"{name}: {dest!r} cannot be named in the index"
            assert " " not in links.get(dest, ""), f"{dest}: link target {links[dest]!r} cannot be in the index"

    index: list[str] = []
    data = bytearray()
    stored = {dest for name, files in modules.items() if _under(name, STORED_MODULES) for dest in files}
    for dest in sorted(lazy_binaries | lazy_data):
        raw = Path(strip(source[dest], dest) if dest in lazy_binaries else source[dest]).read_bytes()
        packed = raw if dest in stored else zlib.compress(raw, 9)
        if len(packed) >= len(raw):  # lazy_unpack takes equal stored and unpacked lengths for "not compressed"
            packed = raw
        index.append(f"F {len(data)} {len(packed)} {len(raw)} {dest}")
        data += packed
    index.extend(f"S {dest} {target}" for dest, target in sorted(links.items()))
    index.extend(f"M {name} {' '.join(files)}" for name, files in modules.items())
    text = ("\n".join(index) + "\n").encode()
    blob = workdir / ENTRY_NAME
    blob.write_bytes(BLOB_MAGIC + f"{len(text)}\n".encode() + text + bytes(data))
    gone = lazy_binaries | lazy_data | set(links)
    return (
        [entry for entry in binaries if entry[0] not in gone],
        [entry for entry in datas if entry[0] not in gone],
        blob,
        modules,
    )
