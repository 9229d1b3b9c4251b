"""What one policy check costs on the event loop: `Authorizer.allows` with the engine in this tree.

    .venv/bin/python bench/policy_check.py                 # this tree's engine (RE2, SPIKE's rules)
    .venv/bin/python bench/policy_check.py --git 6ca4c54   # the engine of a commit before RE2 (Python re)

Cases: a caller with 1 and with 20 applicable policies (the match is the last one), a caller no
policy applies to, and the audit's ReDoS pattern (issue 14, M2) against `app/b/` + N x `a` (the old
engine is run with a smaller N, or it does not finish: each extra character doubles its time).
Median of 5 runs of timeit, microseconds per check.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from pathlib import Path
from types import ModuleType
from typing import Any

from spike.protocol.identity import SpiffeId, TrustDomains

TRUST = TrustDomains.single("spike.test")


def engine_from_git(rev: str) -> ModuleType:
    """The old one-module engine (spike/app/policies.py) of `rev`, importable on its own."""
    source = subprocess.run(["git", "show", f"{rev}:spike/app/policies.py"], check=True, capture_output=True, text=True)
    text = source.stdout.replace("from .kv import InvalidRequest", "from spike.app.model.kv import InvalidRequest")
    path = Path(tempfile.mkdtemp()) / "old_policies.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("old_policies", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["old_policies"] = module
    spec.loader.exec_module(module)
    return module


def median_us(call: Any, number: int) -> float:
    runs = timeit.repeat(call, number=number, repeat=5)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--git", help="measure the engine of this commit (before RE2) instead")
    args = parser.parse_args()
    if args.git:
        old = engine_from_git(args.git)
        Authorizer, Permission, Policy = old.Authorizer, old.Permission, old.Policy
        anchor = ("", "")  # the old dialect matched whole strings
        redos_n = 22
    else:
        from spike.app.model.policy import Permission, Policy
        from spike.app.nexus.authorizer import Authorizer

        anchor = ("^", "$")
        redos_n = 27

    def policy(i: int, ids: str, paths: str) -> Any:
        return Policy(str(i), f"p{i}", f"{anchor[0]}{ids}{anchor[1]}", paths, frozenset({Permission.READ}), 0.0, 0.0)

    caller = SpiffeId("spike.test", "/workload/web")
    stranger = SpiffeId("spike.test", "/workload/nobody")
    web = r"spiffe://spike\.test/workload/web"
    results = {}
    for count in (1, 20):
        authorizer = Authorizer(TRUST)
        authorizer.load([policy(i, web, f"^team-{i}/.*") for i in range(count)])
        path = f"team-{count - 1}/db/password"
        assert authorizer.allows(caller, Permission.READ, path)
        check = lambda a=authorizer, p=path: a.allows(caller, Permission.READ, p)  # noqa: E731
        results[f"allowed, {count} applicable"] = median_us(check, 20000)
    authorizer = Authorizer(TRUST)
    authorizer.load([policy(i, web, f"^team-{i}/.*") for i in range(20)])
    assert not authorizer.allows(stranger, Permission.READ, "team-1/x")
    results["no policy applies"] = median_us(lambda: authorizer.allows(stranger, Permission.READ, "team-1/x"), 20000)
    bomb = Authorizer(TRUST)
    bomb.load([policy(0, web, "app/b/([a-z0-9]+-?)*/config")])
    target = "app/b/" + "a" * redos_n
    started = time.perf_counter()
    assert not bomb.allows(caller, Permission.READ, target)
    results[f"ReDoS pattern, app/b/ + {redos_n} x a (one check)"] = (time.perf_counter() - started) * 1e6
    for name, value in results.items():
        print(f"{name:48} {value:12.2f} us")


if __name__ == "__main__":
    main()
