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
* freed memory given back (glibc): the mmap threshold is fixed at 128 KiB,
  so large buffers (request bodies) get pages of their own that return to
  the system when freed.  Left to itself, glibc raises the threshold after
  the first large free, and a flood of large requests then leaves hundreds
  of MiB of heap behind.

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
from dataclasses import dataclass
from pathlib import Path

from .errors import CommandError

log = logging.getLogger("spike.memory")

_PR_SET_DUMPABLE = 4
_PR_GET_DUMPABLE = 3
_MCL_CURRENT, _MCL_FUTURE, _MCL_ONFAULT = 1, 2, 4  # Linux's generic values (see _mlockall_flags)
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 128 * 1024
_CAP_IPC_LOCK = 14


class MemoryLockError(CommandError):
    """Locking memory was required (--require-memory-lock) and the system does not allow it."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=2)


@dataclass(frozen=True, slots=True)
class Protection:
    """What `protect` did: each flag, and why memory is not locked when it is not."""

    not_dumpable: bool
    core_limit_zero: bool
    locked: bool
    not_locked_because: str
    returns_freed_memory: bool

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
        if self.returns_freed_memory:
            done.append("freed memory returned to the system")
        said = "; ".join(done) or "nothing could be done"
        return f"{who} memory: {said}" + (f"; {'; '.join(undone)}" if undone else "")

    def say(self, who: str) -> None:
        """The one log line: at warning level when something could not be done."""
        complete = self.locked and self.not_dumpable and self.core_limit_zero
        log.log(logging.INFO if complete else logging.WARNING, self.line(who), extra={"event": "memory_protection"})


def protect(*, require_lock: bool = False) -> Protection:
    """Harden this process's memory (see the module docstring); what was done, to `say` later."""
    if not sys.platform.startswith("linux"):
        protection = Protection(False, _core_limit_zero(), False, f"not supported on {sys.platform}", False)
    else:
        libc = ctypes.CDLL(None, use_errno=True)
        not_dumpable = _not_dumpable(libc)
        core_limit_zero = _core_limit_zero()
        locked, because = _lock(libc)
        protection = Protection(not_dumpable, core_limit_zero, locked, because, _return_freed_memory(libc))
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
    if libc.mlockall(flags | _MCL_ONFAULT) == 0:
        return True, ""
    if ctypes.get_errno() == errno.EINVAL and libc.mlockall(flags) == 0:  # a kernel without MCL_ONFAULT
        return True, ""
    return False, f"mlockall failed: {os.strerror(ctypes.get_errno())}"


def _return_freed_memory(libc: ctypes.CDLL) -> bool:
    if platform.libc_ver()[0] != "glibc":
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD))
