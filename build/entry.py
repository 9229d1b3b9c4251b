"""Entry point frozen into the single `spike` executable.

A one-file PyInstaller executable runs as two processes: the bootloader unpacks the
bundle to a temporary directory and starts a second copy of itself that runs Python,
then waits for it.  SIGINT and SIGTERM sent to the bootloader are forwarded, but a
SIGKILL (a crash, an OOM kill, `kill -9 <pid of spike>`) cannot be: the Python process
would go on running, holding its port and, for a keeper, its shard.  So the Python
process asks the kernel to SIGKILL it as soon as its parent dies, when that parent is
this same executable (the bootloader, or `spike dev` starting its children).
"""

import os
import sys


def _die_with_launcher() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        parent = os.getppid()
        if os.readlink(f"/proc/{parent}/exe") != os.readlink("/proc/self/exe"):
            return
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the launcher died before the request took effect
        os._exit(137)


if getattr(sys, "frozen", False):
    _die_with_launcher()

from spike.app.cli import main  # noqa: E402

raise SystemExit(main())
