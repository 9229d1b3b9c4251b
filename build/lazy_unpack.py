"""PyInstaller runtime hook: the shared libraries that not every subcommand needs, unpacked on first import.

The one-file bootloader copies every file of the bundle into a fresh private directory (sys._MEIPASS, mode
0700) at every start.  build/lazy_pack.py takes the largest extension modules that only some subcommands
import (gRPC and protobuf for the Workload API, psycopg for PostgreSQL, cryptography, uvloop, SQLite, ...),
with the shared libraries only they need, out of that list and stores them (zlib-compressed, except a few
that every Nexus start imports) in one archive entry of a kind the bootloader does not unpack.  This hook
runs before spike's code: it finds that entry in the running executable and puts an import finder first on
sys.meta_path.  The first import of one of those modules writes it and its libraries into sys._MEIPASS (a
temporary name, then a rename: processes of `spike dev` share the directory) and returns None, so that
Python's own finders then load it from there.

Standard library modules that are already loaded only (os, sys, zlib, _thread, importlib): this runs at
every start, `spike --version` included.
"""

import _thread
import importlib
import os
import sys
import zlib

_COOKIE_MAGIC = b"MEI\x0c\x0b\x0a\x0b\x0e"  # PyInstaller's archive cookie ('!8sIIII64s', 88 bytes)
_COOKIE_LENGTH = 88
_TOC_ENTRY_HEADER = 18  # '!IIIIBc': entry length, offset, length, uncompressed length, compressed flag, typecode
_ENTRY_NAME = "spike-lazy.bin"
_BLOB_MAGIC = b"SPIKE-LAZY-1\n"


class _Damaged(Exception):
    pass


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def _read(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) != length:
        raise _Damaged(f"short read at {offset}")
    return data


def _find_blob(fd: int) -> int:
    """Offset of the lazy blob in the executable, from the archive's cookie and table of contents."""
    size = os.fstat(fd).st_size
    tail_length = min(size, 1 << 16)  # the cookie follows the table of contents, near the end of the file
    tail = _read(fd, tail_length, size - tail_length)
    at = tail.rfind(_COOKIE_MAGIC)
    if at < 0:
        raise _Damaged("no archive cookie")
    cookie = tail[at : at + _COOKIE_LENGTH]
    package_start = size - tail_length + at + _COOKIE_LENGTH - _u32(cookie, 8)
    toc = _read(fd, _u32(cookie, 16), package_start + _u32(cookie, 12))
    position = 0
    while position + _TOC_ENTRY_HEADER <= len(toc):
        length = _u32(toc, position)
        if length < _TOC_ENTRY_HEADER:
            raise _Damaged("bad table of contents")
        name = toc[position + _TOC_ENTRY_HEADER : position + length].rstrip(b"\0")
        if name == _ENTRY_NAME.encode():
            if toc[position + 16] != 0:
                raise _Damaged(f"{_ENTRY_NAME} is compressed")
            return package_start + _u32(toc, position + 4)
        position += length
    raise _Damaged(f"no {_ENTRY_NAME} entry")


class LazyBinaries:
    """The import finder: unpacks a module's files on its first import, then lets the normal finders load it."""

    def __init__(self, fd: int, home: str) -> None:
        self._fd = fd  # kept open: the executable may be replaced on disk while this process runs
        self._home = home
        self._lock = _thread.allocate_lock()
        start = _find_blob(fd)
        head = _read(fd, len(_BLOB_MAGIC) + 10, start)
        if not head.startswith(_BLOB_MAGIC):
            raise _Damaged(f"{_ENTRY_NAME} has no header")
        index_length = int(head[len(_BLOB_MAGIC) :].split(b"\n", 1)[0])
        index_start = start + len(_BLOB_MAGIC) + len(str(index_length)) + 1
        self._data_start = index_start + index_length
        self._files: dict[str, tuple[int, int, int]] = {}
        self._links: dict[str, str] = {}
        self.modules: dict[str, tuple[str, ...]] = {}
        for line in _read(fd, index_length, index_start).decode().splitlines():
            kind, *fields = line.split(" ")
            if kind == "F":  # F <offset> <stored length> <length> <file>
                self._files[fields[3]] = (int(fields[0]), int(fields[1]), int(fields[2]))
            elif kind == "S":  # S <link> <target>
                self._links[fields[0]] = fields[1]
            elif kind == "M":  # M <module> <file or link> ...: what its import needs
                self.modules[fields[0]] = tuple(fields[1:])
        self._unpacked: set[str] = set()

    def find_spec(self, fullname: str, path: object = None, target: object = None) -> None:
        files = self.modules.get(fullname)
        if files:
            self.unpack(files)
        # None: the normal path-based finders find it, now that its files are there.

    def invalidate_caches(self) -> None:
        pass

    def unpack(self, files: tuple[str, ...]) -> None:
        with self._lock:
            wrote = False
            for name in files:
                if name in self._unpacked:
                    continue
                target = os.path.join(self._home, name)
                if not os.path.lexists(target):  # another process of `spike dev` may have written it
                    if name in self._links:
                        self._link(name, target)
                    else:
                        self._write(name, target)
                    wrote = True
                self._unpacked.add(name)
            if wrote:
                importlib.invalidate_caches()  # the path finders cache directory listings

    def _link(self, name: str, target: str) -> None:
        try:
            os.symlink(self._links[name], target)
        except FileExistsError:  # made by another process meanwhile
            return
        except OSError as error:
            raise ImportError(f"spike: cannot unpack {name} into {self._home}: {error}") from None

    def _write(self, name: str, target: str) -> None:
        offset, stored, length = self._files[name]
        try:
            data = _read(self._fd, stored, self._data_start + offset)
            if stored != length:  # zlib; a file stored as it is has its own length (build/lazy_pack.py)
                data = zlib.decompress(data)
        except (OSError, zlib.error, _Damaged) as error:
            raise ImportError(f"spike: {name} in this executable is damaged ({error}); download it again") from None
        if len(data) != length:
            raise ImportError(f"spike: {name} in this executable is damaged; download it again")
        partial = f"{target}.{os.getpid()}.{_thread.get_ident()}.partial"
        try:
            os.makedirs(os.path.dirname(target), mode=0o700, exist_ok=True)
            out = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o700)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(out, view) :]
            finally:
                os.close(out)
            os.replace(partial, target)
        except OSError as error:  # $TMPDIR full, say: one clear line at the end of the import error
            if os.path.lexists(partial):
                os.unlink(partial)
            raise ImportError(f"spike: cannot unpack {name} into {self._home}: {error}") from None


# A Nexus start imports cryptography before it listens, and inflating its 12 MB Rust library is ~40 ms of
# CPU.  A thread starts on it at once, while the main thread imports everything else: zlib and os.write let
# go of the GIL, so on a machine with a free core that time leaves the start's critical path.  If it fails,
# the main thread's import unpacks again and reports the error.
_PREFETCH = {"nexus": ("cryptography.hazmat.bindings._rust",)}


def _prefetch(finder: LazyBinaries, modules: tuple[str, ...]) -> None:
    for module in modules:
        try:
            finder.unpack(finder.modules.get(module, ()))
        except ImportError:
            return


def _install() -> None:
    home = getattr(sys, "_MEIPASS", None)
    if home is None:
        return
    try:
        try:
            fd = os.open("/proc/self/exe", os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            fd = os.open(sys.executable, os.O_RDONLY | os.O_CLOEXEC)
        finder = LazyBinaries(fd, home)
    except (OSError, ValueError, IndexError, _Damaged) as error:
        sys.stderr.write(f"spike: this executable is damaged or incomplete ({error}); download it again\n")
        raise SystemExit(70) from None
    sys.meta_path.insert(0, finder)
    if len(sys.argv) > 1 and sys.argv[1] in _PREFETCH:
        _thread.start_new_thread(_prefetch, (finder, _PREFETCH[sys.argv[1]]))


_install()
