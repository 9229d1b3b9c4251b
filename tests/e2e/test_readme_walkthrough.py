"""The README's "Running a deployment by hand", run as written (on free ports instead of 8441-8443, 8553).

A newcomer follows it in one shell: the blocks run in `bash` from a fresh
directory, with the quick start's `.venv` there (a link to this test run's
environment), so `. .venv/bin/activate` and bare `spike` work as the README
says.  Between the blocks the test does what the prose says: it kills keepers
1 and 2 and Nexus with SIGKILL and starts the three again with their own lines
of the first block.  Then Nexus must wait for shards (exit code 4), the
README's restore command must bring the key back, and the secret written
before must read back: the walk-through never loses the user's key (issue 18).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.harness import pick_port, wait_until

pytestmark = pytest.mark.e2e

README = Path(__file__).resolve().parents[2] / "README.md"
PORTS = ("8441", "8442", "8443", "8553")


def walkthrough_blocks() -> list[str]:
    text = README.read_text()
    section = text.split("\n## Running a deployment by hand\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]
    return re.findall(r"```sh\n(.*?)\n```", section, flags=re.S)


class Shell:
    """Runs README blocks in bash sessions of their own, in one directory; kills only what they started."""

    def __init__(self, root: Path, ports: dict[str, str]) -> None:
        self.root = root
        self.ports = ports
        self.sessions: list[int] = []
        self.runs = 0

    def text(self, block: str) -> str:
        for old, new in self.ports.items():
            block = block.replace(old, new)
        return block

    def run(self, block: str, timeout: float = 90.0) -> tuple[int, str]:
        """Run `block` (ports replaced); its exit code and output. Background processes keep running."""
        self.runs += 1
        out = self.root / f"shell.{self.runs}.out"
        with out.open("wb") as sink:  # a file, not a pipe: the background servers keep it open
            process = subprocess.Popen(
                ["bash", "--norc", "--noprofile", "-c", self.text(block)],
                cwd=self.root,
                stdin=subprocess.DEVNULL,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={"PATH": os.environ["PATH"], "HOME": str(self.root), "LANG": "C.UTF-8"},
            )
            self.sessions.append(process.pid)
            code = process.wait(timeout=timeout)
        return code, out.read_text()

    def pid_of(self, *words: str) -> int:
        """The process of these sessions whose command line holds `words` (ports replaced)."""
        wanted = self.text(" ".join(words))
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                session = os.getsid(int(entry.name))
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except (OSError, ProcessLookupError):
                continue
            if session in self.sessions and wanted in cmdline and "bash" not in cmdline:
                return int(entry.name)
        raise AssertionError(f"no process with {wanted!r}")

    def close(self) -> None:
        for session in self.sessions:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(session, signal.SIGKILL)


@pytest.fixture
def shell(tmp_path: Path) -> Iterator[Shell]:
    (tmp_path / ".venv").symlink_to(Path(sys.prefix))
    s = Shell(tmp_path, {port: str(pick_port()) for port in PORTS})
    try:
        yield s
    finally:
        s.close()


def test_the_by_hand_walkthrough_exports_shards_loses_keepers_and_nexus_and_restores(shell: Shell) -> None:
    setup, secret, recover, restore = walkthrough_blocks()
    assert setup.startswith(". .venv/bin/activate\n")
    assert "spike operator recover" in recover and "spike operator restore" in restore

    code, out = shell.run(setup)
    assert code == 0, out
    assert "bootstrap complete: Nexus rebuilt and verified root key epoch 1" in out
    assert "ready: root key epoch 1, 2-of-3" in out
    code, out = shell.run(_preamble(setup) + secret)
    assert code == 0 and out.splitlines()[-1] == "s3cret", out
    code, out = shell.run(_preamble(setup) + recover)
    assert code == 0 and "wrote 3 recovery shards of key epoch 1" in out, out
    assert sorted(p.name for p in (shell.root / "recovery").iterdir()) == [f"spike.recovery.{i}.txt" for i in (1, 2, 3)]

    # "kill -9 keepers 1 and 2 and Nexus, and start the three again with their commands above"
    doomed = [shell.pid_of("keeper --listen 127.0.0.1:8441"), shell.pid_of("keeper --listen 127.0.0.1:8442")]
    doomed.append(shell.pid_of("nexus --listen 127.0.0.1:8553"))
    for pid in doomed:
        os.kill(pid, signal.SIGKILL)
    for pid in doomed:
        wait_until(lambda pid=pid: not Path(f"/proc/{pid}").exists() or _zombie(pid), f"pid {pid} to go")
    again = [line for line in setup.splitlines() if re.search(r"keeper-[12];|svid nexus;", line)]
    assert len(again) == 3, again
    code, out = shell.run(_preamble(setup) + "\n".join(again))
    assert code == 0, out

    def waiting() -> bool:
        code, out = shell.run(_preamble(setup) + "(svid pilot-superuser; spike status)")
        return code == 4 and "waiting for shards" in out

    wait_until(waiting, "Nexus to wait for shards (spike status exit code 4)", timeout=30)

    code, out = shell.run(_preamble(setup) + restore)
    assert code == 0, out
    assert "the root key is restored and verified" in out or "more shard(s) needed" in out, out
    if "more shard(s) needed" in out:  # keeper 3's shard was not in yet: the next file completes it
        code, out = shell.run(_preamble(setup) + restore.replace("recovery.1.txt", "recovery.2.txt"))
        assert code == 0 and "the root key is restored and verified" in out, out

    def read_back() -> bool:
        code, out = shell.run(_preamble(setup) + "(svid pilot-superuser; spike secret get app/db password)")
        return code == 0 and out.strip() == "s3cret"

    wait_until(read_back, "the secret to read back after the restore", timeout=30)


def _preamble(setup: str) -> str:
    """What later blocks rely on from the first, in the same shell: the venv, `svid`, the exports."""
    keep = [line for line in setup.splitlines() if line.startswith((". ", "svid()", "export "))]
    return "\n".join(keep) + "\n"


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z")
    except OSError:
        return True
