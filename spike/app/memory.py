"""Process memory: no core dumps, locked pages, freed memory given back.

Nexus holds the root key and every secret it decrypts in memory, a keeper
its shard; none of it may reach a disk.  `protect()` runs first thing when
either starts, and `Protection.say()` (once the server listens, so that a
start that fails still ends in one line) tells in one log line what it did
and what it could not:

* core dumps off: ``prctl(PR_SET_DUMPABLE, 0)`` (which also keeps other
  processes of the same user from reading this one's memory through /proc
  or attaching a debugger) and RLIMIT_CORE 0, soft and hard, so that
  nothing later can raise it again;
* memory locked, present and future: ``mlockall(MCL_CURRENT | MCL_FUTURE)``,
  as SPIKE does, so that no page is ever written to swap, plus MCL_ONFAULT
  (Linux 4.4+; without it where the kernel refuses it): a page is locked
  when it is first touched rather than the moment it is mapped, so that a
  thread's 8 MiB stack or a reserved arena does not become resident whole
  (it would double Nexus's memory, for no secret).  Only where the system
  lets every future page be locked: RLIMIT_MEMLOCK unlimited (a soft limit
  is raised to an unlimited hard one), or CAP_IPC_LOCK.  Under a finite
  limit, MCL_FUTURE would make allocations fail once the limit is reached (a
  new thread's stack, a large request body), so then memory is left
  unlocked and the line says why; `require_lock` makes that a failed start
  instead;

and `give_back()` returns freed heap memory to the system (glibc's
``malloc_trim``): Nexus calls it (`AfterFloods`) once a flood of large
request bodies is over.  Left to itself, glibc keeps what such a flood
freed, and 600 connections' worth of bodies left hundreds of MiB behind.
glibc cannot release locked pages inside its heap, so a locked process
unlocks for the milliseconds the trim takes and locks again: the one moment
its memory is not locked, once per flood.  The alternatives were worse:
fixing glibc's mmap threshold makes every large allocation pay for fresh
pages (+60% CPU for a 1 MiB cipher request), and never giving back keeps a
flood's high-water mark resident for good.

These are process-wide calls, made by the `spike nexus` and `spike keeper`
runners only: nothing in spike.protocol or spike.transports depends on them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import platform
import resource
import sys
from pathlib import Path
from typing import Protocol

import msgspec

from spike.app.errors import CommandError

log = logging.getLogger("spike.memory")

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3
_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4  # Linux's generic values (see _mlockall_flags)
_CAP_IPC_LOCK = 14


class MemoryLockError(CommandError):
    """Locking memory was required (--require-memory-lock) and the system does not allow it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


class Protection(msgspec.Struct, frozen=True):
    """What `protect` did: each flag, and why memory is not locked when it is not."""

    not_dumpable: bool
    core_limit_zero: bool
    locked: bool
    not_locked_because: str

    def line(self, who: str) -> str:
        done, undone = [], []
        if self.not_dumpable and self.core_limit_zero:
            done.append("core dumps off (not dumpable, core size limit 0)")
        else:
            undone.append(
                "core dumps not fully off ("
                + ", ".join(
                    what
                    for what, ok in (("still dumpable", self.not_dumpable), ("core limit not 0", self.core_limit_zero))
                    if not ok
                )
                + ")"
            )
        if self.locked:
            done.append("memory locked (mlockall)")
        else:
            undone.append(f"memory NOT locked: {self.not_locked_because}")
        said = "; ".join(done) or "nothing could be done"
        return f"{who} memory: {said}" + (f"; {'; '.join(undone)}" if undone else "")

    def say(self, who: str) -> None:
        """The one log line: at warning level when something could not be done."""
        complete = self.locked and self.not_dumpable and self.core_limit_zero
        log.log(logging.INFO if complete else logging.WARNING, self.line(who), extra={"event": "memory_protection"})


def protect(*, require_lock: bool = False) -> Protection:
    """Harden this process's memory (see the module docstring); what was done, to `say` later."""
    if not sys.platform.startswith("linux"):
        protection = Protection(False, _core_limit_zero(), False, f"not supported on {sys.platform}")
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        not_dumpable = _not_dumpable(libc)
        core_limit_zero = _core_limit_zero()
        locked, because = _lock(libc)
        protection = Protection(not_dumpable, core_limit_zero, locked, because)
    if not protection.locked and require_lock:
        raise MemoryLockError(f"memory could not be locked ({protection.not_locked_because}), and it is required")
    return protection


def _not_dumpable(libc: ctypes.CDLL) -> bool:
    libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0)
    return int(libc.prctl(_PR_GET_DUMPABLE, 0, 0, 0, 0)) == 0


def _core_limit_zero() -> bool:
    with contextlib.suppress(ValueError, OSError):  # lowering a hard limit needs no privilege
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return resource.getrlimit(resource.RLIMIT_CORE) == (0, 0)


def _mlockall_flags() -> int | None:
    machine = platform.machine().lower()
    if machine.startswith(("alpha", "ppc", "powerpc", "sparc")):
        return None  # other flag values there; not worth guessing
    return _MCL_CURRENT | _MCL_FUTURE


def _has_cap_ipc_lock() -> bool:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return False
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> _CAP_IPC_LOCK & 1)
    return False


def _memlock_limit() -> str:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return "unlimited" if soft == resource.RLIM_INFINITY else f"{soft // 1024} KiB"


def _lock(libc: ctypes.CDLL) -> tuple[bool, str]:
    flags = _mlockall_flags()
    if flags is None:
        return False, f"not supported on {platform.machine()}"
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft != resource.RLIM_INFINITY and hard == resource.RLIM_INFINITY:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_MEMLOCK, (hard, hard))
            soft = hard
    if soft != resource.RLIM_INFINITY and not _has_cap_ipc_lock():
        return False, (
            f"RLIMIT_MEMLOCK is {_memlock_limit()}, and locking every future page needs it unlimited "
            "(ulimit -l unlimited, LimitMEMLOCK=infinity) or CAP_IPC_LOCK"
        )
    problem = _mlockall(libc, flags)
    if problem:
        return False, problem
    _LOCKED.flags = flags
    return True, ""


class _Locked:
    """The mlockall flags in force (without MCL_ONFAULT); None when memory is not locked."""

    flags: int | None = None


_LOCKED = _Locked()


def _mlockall(libc: ctypes.CDLL, flags: int) -> str:
    """Lock with MCL_ONFAULT, or without it on a kernel that lacks it: "" or why it failed."""
    if libc.mlockall(flags | _MCL_ONFAULT) == 0:
        return ""
    if ctypes.get_errno() == errno.EINVAL and libc.mlockall(flags) == 0:
        return ""
    return f"mlockall failed: {os.strerror(ctypes.get_errno())}"


def give_back() -> bool:
    """Return freed heap memory to the system (glibc's malloc_trim): whether it could be asked.

    glibc cannot release locked pages inside its heap (madvise refuses them), so a locked process
    unlocks for the moment the trim takes (milliseconds, once per flood) and locks again.
    """
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _LOCKED.flags
    if flags is not None:
        libc.munlockall()
    libc.malloc_trim(0)
    if flags is not None:
        problem = _mlockall(libc, flags)
        if problem:
            _LOCKED.flags = None
            log.warning("memory is no longer locked: %s", problem, extra={"event": "memory_protection"})
    return True


class HeldBytes(Protocol):
    """What a server says of the request bytes it holds (spike.transports.server.HttpsServer)."""

    buffered: int
    buffered_peak: int  # the most held since it was last reset


class AfterFloods:
    """Called every second: gives freed memory back once the request bytes a server held, after
    rising to `high`, have stayed down at `low` for `settle` calls (a flood of large bodies is over,
    and the connections it made are gone with what they held)."""

    def __init__(
        self, server: HeldBytes, *, high: int = 16 * 1024 * 1024, low: int = 1024 * 1024, settle: int = 3
    ) -> None:
        self._server = server
        self._high = high
        self._low = low
        self._settle = settle
        self._quiet = 0

    def __call__(self) -> None:
        server = self._server
        if server.buffered_peak < self._high:
            return
        self._quiet = self._quiet + 1 if server.buffered <= self._low else 0
        if self._quiet >= self._settle:
            self._quiet = 0
            peak, server.buffered_peak = server.buffered_peak, server.buffered
            before = _resident_mib()
            if give_back():
                log.info(
                    "a flood of request bodies is over (%d MiB held at its peak): freed memory given back, "
                    "resident %d -> %d MiB",
                    peak // 2**20,
                    before,
                    _resident_mib(),
                )


def _resident_mib() -> int:
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return 0
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
    return 0
