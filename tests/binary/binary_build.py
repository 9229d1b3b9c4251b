"""Building the spike binary for the tests, and reading what is in it (no PyInstaller needed).

`run_build()` runs build/build.sh with this environment minus the test venv (the build makes its own
clean one).  A machine that cannot build (exit 3: not Linux x86-64/aarch64, no shared libpython, no
package index) makes a test SKIP with the build's reason, except under `CI=true`, where it FAILS.

`Contents` reads a one-file executable the way its bootloader and build/lazy_unpack.py do, written here
again from the format (the archive cookie and table of contents at the end of the file, the PYZ's
marshalled table, the lazy blob's text index), so that the SBOM test does not trust build/sbom.py's
reader to check build/sbom.py.
"""

from __future__ import annotations

import marshal
import os
import platform
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BUILD_TIMEOUT = 1200.0
MACHINES = ("x86_64", "aarch64")


def build_env() -> dict[str, str]:
    """This environment without the test venv, so that the build makes its own clean one."""
    venv_bin = str(Path(sys.executable).parent)
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p and p != venv_bin)
    base = Path(sys.base_prefix) / "bin" / f"python{sys.version_info[0]}.{sys.version_info[1]}"
    if base.exists():
        env.setdefault("PYTHON", str(base))  # the interpreter running these tests, outside its venv
    return env


def cannot_build(reason: str) -> None:
    """Skip on a developer's machine that cannot build the binary; fail in CI, which must test it."""
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI=true and the spike binary cannot be built here: {reason}")
    pytest.skip(reason)


def run_build(log: Path, *args: str) -> None:
    """build/build.sh `args`, its output in `log`; skips (fails in CI) when the machine cannot build."""
    if sys.platform != "linux" or platform.machine() not in MACHINES:
        cannot_build(
            f"the spike binary is built for Linux x86-64 and aarch64, this is {sys.platform} {platform.machine()}"
        )
    try:
        with log.open("wb") as out:
            done = subprocess.run(
                ["bash", str(ROOT / "build" / "build.sh"), *args],
                env=build_env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                timeout=BUILD_TIMEOUT,
                check=False,
            )
    except subprocess.TimeoutExpired:
        pytest.fail(f"build/build.sh took more than {BUILD_TIMEOUT:g}s; its log: {log}")
    text = log.read_text(errors="replace")
    if done.returncode == 3:
        reason = [line for line in text.splitlines() if "cannot build here" in line]
        cannot_build(f"spike binary not built: {reason[-1] if reason else text[-300:]}")
    assert done.returncode == 0, f"build/build.sh {' '.join(args)} failed (exit {done.returncode}):\n{text[-4000:]}"


@dataclass(frozen=True)
class Built:
    """The binary under test (a copy) and its SBOM."""

    binary: Path
    sbom: Path
    given: bool  # SPIKE_BINARY: not necessarily built from this checkout on this machine


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


@dataclass
class Contents:
    """Module names in the PYZ, files the bootloader unpacks, files unpacked on first import, other entries."""

    modules: set[str]
    files: set[str]
    lazy: set[str]
    other: set[str]

    @classmethod
    def of(cls, binary: Path) -> Contents:
        data = binary.read_bytes()
        cookie = data.rindex(b"MEI\x0c\x0b\x0a\x0b\x0e")  # '!8sIIII64s': magic, length, toc offset, toc length
        start = cookie + 88 - _u32(data, cookie + 8)
        toc_start = start + _u32(data, cookie + 12)
        toc = data[toc_start : toc_start + _u32(data, cookie + 16)]
        entries: dict[str, tuple[int, int, str]] = {}
        at = 0
        while at < len(toc):  # '!IIIIBc' + name: entry length, offset, length, length unpacked, compressed, type
            length = _u32(toc, at)
            name = toc[at + 18 : at + length].rstrip(b"\0").decode()
            entries[name] = (start + _u32(toc, at + 4), _u32(toc, at + 8), chr(toc[at + 17]))
            at += length
        files = {name for name, (_offset, _length, kind) in entries.items() if kind in "bxZn"}
        other = {name for name, (_offset, _length, kind) in entries.items() if kind not in "bxZn"}
        offset, length, _kind = entries["PYZ.pyz"]
        pyz = data[offset : offset + length]  # 'PYZ\0', Python's magic, table offset, ...: a marshalled table
        modules = {name for name, _entry in marshal.loads(pyz[_u32(pyz, 8) :])}
        lazy: set[str] = set()
        if "spike-lazy.bin" in entries:
            offset, length, _kind = entries["spike-lazy.bin"]
            _magic, size, rest = data[offset : offset + length].split(b"\n", 2)
            for line in rest[: int(size)].decode().splitlines():
                kind, *fields = line.split(" ")
                if kind in "FS":
                    lazy.add(fields[3] if kind == "F" else fields[0])
        return cls(modules, files, lazy, other)
