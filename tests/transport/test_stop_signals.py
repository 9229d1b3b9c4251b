"""How `serve` takes SIGTERM and Ctrl-C, in a process of its own (signal handlers are per process).

Once a stop signal has arrived, the default action of SIGTERM and SIGINT must never be in
force again: a signal in that instant would kill the process (or raise KeyboardInterrupt) in
the middle of its cleanup.  Every change of disposition is recorded by wrapping
`signal.signal`, which the event loops use too, so the test sees an instant that no timing
could hit reliably.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, os, signal, sys

    def dispositions():
        return {n: getattr(signal.getsignal(getattr(signal, n)), "name", "handler") for n in ("SIGTERM", "SIGINT")}

    before = dispositions()  # SIGINT is ignored already when started in the background
    changes = []
    real_signal = signal.signal

    def recording(signum, handler):
        if signum in (signal.SIGTERM, signal.SIGINT):
            changes.append((signal.Signals(signum).name, getattr(handler, "name", type(handler).__name__)))
        return real_signal(signum, handler)

    signal.signal = recording

    import anyio
    from spike.protocol.api import ApiResponse
    from spike.transports.runner import run_event_loop, serve
    from spike.transports.server import HttpsServer

    loop, signals = sys.argv[1], sys.argv[2:]
    first = None

    async def send_signals() -> None:
        global first
        await anyio.sleep(0.2)
        first = len(changes)
        for name in signals:
            os.kill(os.getpid(), getattr(signal, name))
            await anyio.sleep(0.1)

    async def main() -> None:
        server = HttpsServer(None, lambda request: ApiResponse(200, b"{}"))
        with anyio.move_on_after(0.2 if not signals else 30):  # no signal: stopped from inside
            await serve(("127.0.0.1", 0), server, background=[send_signals], grace=5.0)

    run_event_loop(main, fast=loop == "uvloop")
    if signals:  # the caller's cleanup runs now: more signals must change nothing
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
    print(json.dumps({"changes": changes, "first": first, "before": before, "after": dispositions()}))
    """
)


def run(loop: str, *signals: str) -> dict[str, object]:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, loop, *signals],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        env={"PYTHONPATH": ":".join(sys.path)},
    )
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    result: dict[str, object] = json.loads(done.stdout)
    return result


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
@pytest.mark.parametrize("signals", [("SIGTERM",), ("SIGINT", "SIGTERM"), ("SIGINT", "SIGTERM", "SIGTERM", "SIGINT")])
def test_after_a_stop_signal_the_default_action_is_never_in_force_again(loop: str, signals: tuple[str, ...]) -> None:
    result = run(loop, *signals)
    changes, first = result["changes"], result["first"]
    assert isinstance(changes, list) and isinstance(first, int)
    after_first = changes[first:]
    assert after_first == [["SIGTERM", "SIG_IGN"], ["SIGINT", "SIG_IGN"]], changes
    assert result["after"] == {"SIGTERM": "SIG_IGN", "SIGINT": "SIG_IGN"}


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_a_server_stopped_without_a_signal_gives_the_handlers_back(loop: str) -> None:
    result = run(loop)
    assert result["after"] == result["before"], result
