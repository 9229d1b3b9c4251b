"""`spike migrate from-spike`: move a SPIKE Go deployment's secrets and policies into this Nexus.

Steps, each of which must succeed before the next (docs/migrating-from-spike.md):

1. the recovery shards SPIKE's `spike operator recover` wrote (``spike:<id>:<hex>``) rebuild SPIKE's
   root key (Shamir over P-256's order, as main's restore does); with `--threshold` and more shards
   than it, every shard must lie on one polynomial;
2. SPIKE's SQLite database is opened read-only and every secret version and policy is opened with that
   key (spike/app/spike_db.py): the first sealed column that fails its GCM tag ends the run;
3. everything is checked as Nexus will check it (spike/app/model/imports.py);
4. `--dry-run` stops here and prints the report; otherwise the whole batch goes to Nexus in one request
   (`POST /v1/operator/import`, superuser), which writes it in one transaction or not at all.

Nothing is written anywhere before step 4, and step 4 is all or nothing.  The report names paths and
policy names, never a value; no shard or key is printed or logged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from spike.app.api.messages import (
    IMPORT_PATH,
    MAX_IMPORT_BYTES,
    ImportPolicy,
    ImportRequest,
    ImportResponse,
    ImportSecret,
    ImportVersion,
)
from spike.app.commands.formats import machine, render
from spike.app.errors import CommandError
from spike.app.model import kv
from spike.app.model.imports import checked_policies, checked_secrets
from spike.app.spike_db import SpikeData, SpikeDbError, read_database
from spike.protocol.errors import ShamirError
from spike.protocol.material import RootKey, Share
from spike.protocol.shamir import combine, on_one_polynomial

if TYPE_CHECKING:
    from spike.app.commands.client import NexusClient

Say = Callable[[str], None]
RECOVERY_FILES = "spike.recovery.*.txt"  # what SPIKE's `spike operator recover` writes


def read_shards(files: list[Path], directory: Path | None) -> list[Share]:
    """The shards in these files and in `directory`'s recovery files; `CommandError` naming the file, never a value."""
    from spike.app.commands.operator import parse_shard

    paths = list(files)
    if directory is not None:
        if not directory.is_dir():
            raise CommandError(f"{directory} is not a directory", exit_code=2)
        paths += sorted(directory.glob(RECOVERY_FILES))
    if not paths:
        raise CommandError("give SPIKE's recovery shards: --shard FILE (repeated) or --recovery-dir DIR", exit_code=2)
    shares: dict[int, Share] = {}
    for path in paths:
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise CommandError(f"cannot read {path}: {getattr(exc, 'strerror', None) or exc}", exit_code=2) from None
        try:
            share = parse_shard(text)
        except CommandError as exc:
            raise CommandError(f"{path}: {exc}", exit_code=2) from None
        if share.id in shares and shares[share.id] != share:
            raise CommandError(f"{path}: two different shards with id {share.id}", exit_code=2)
        shares[share.id] = share
    return [shares[i] for i in sorted(shares)]


def fitted_threshold(shares: list[Share]) -> int:
    """The lowest threshold whose polynomial goes through every shard: SPIKE's own when more are given.

    k shards of one polynomial of degree t-1 (t <= k) fit no lower degree, except with negligible
    probability: the lowest t they fit is SPIKE's threshold.  k shards always fit degree k-1, so with
    exactly SPIKE's threshold of them (or with a shard of something else among them) this is k.
    """
    points = {s.id: s.as_int() for s in shares}
    return next(t for t in range(1, len(points) + 1) if on_one_polynomial(points, t))


def rebuild_key(shares: list[Share], threshold: int | None) -> RootKey:
    """SPIKE's root key from its shards.

    Without a threshold, the lowest one every shard fits is used (`fitted_threshold`): any t or more
    shards of one polynomial rebuild the same key, and fewer than t, or a shard of something else,
    rebuild a key that opens nothing (the first row says so).  With a threshold, fewer shards are
    refused at once and more must all lie on one polynomial of that threshold.
    """
    if threshold is not None:
        if threshold < 1:
            raise CommandError("--threshold must be at least 1", exit_code=2)
        if len(shares) < threshold:
            raise CommandError(f"{threshold} shards are needed (--threshold), {len(shares)} given", exit_code=2)
        if not on_one_polynomial({s.id: s.as_int() for s in shares}, threshold):
            raise CommandError(
                f"the {len(shares)} shards given do not lie on one polynomial of threshold {threshold}: "
                "they are not all shards of one key (or the threshold is wrong)"
            )
    try:
        return combine(shares, threshold or fitted_threshold(shares))
    except ShamirError as exc:
        raise CommandError(f"the shards do not rebuild a key: {exc}") from None


def import_request(data: SpikeData, *, merge: bool) -> ImportRequest:
    return ImportRequest(
        secrets=[
            ImportSecret(
                path=s.path,
                versions=[
                    ImportVersion(version=v.version, values=v.values, created_at=v.created_at, deleted_at=v.deleted_at)
                    for v in s.versions
                ],
                created_at=s.created_at,
                updated_at=s.updated_at,
                max_versions=s.max_versions,
            )
            for s in data.secrets
        ],
        policies=[
            ImportPolicy(
                name=p.name,
                spiffeidPattern=p.spiffe_id_pattern,
                pathPattern=p.path_pattern,
                permissions=list(p.permissions),
                created_at=p.created_at,
                updated_at=p.updated_at,
            )
            for p in data.policies
        ],
        merge=merge,
    )


@dataclass(frozen=True, slots=True)
class Plan:
    """What would move: the request and the report (no value in the report)."""

    request: ImportRequest
    body: bytes
    report: dict[str, Any]


def plan(database: Path, key: RootKey, *, merge: bool) -> Plan:
    """Read, open and check everything; `CommandError` (one line) if anything cannot be moved."""
    try:
        data = read_database(database, key)
    except SpikeDbError as exc:
        raise CommandError(str(exc)) from None
    request = import_request(data, merge=merge)
    try:
        secrets = checked_secrets(data.secrets)
        checked_policies((p.name, p.spiffe_id_pattern, p.path_pattern, list(p.permissions)) for p in data.policies)
    except kv.InvalidRequest as exc:
        raise CommandError(f"cannot be moved as it is: {exc}") from None
    body = msgspec.json.encode(request)
    report: dict[str, Any] = {
        "database": str(database),
        "secrets": len(secrets),
        "versions": sum(len(s.versions) for s in secrets),
        "deleted_versions": sum(1 for s in secrets for v in s.versions if v.deleted_at is not None),
        "deleted_secrets": sum(1 for s in secrets if all(v.deleted_at is not None for v in s.versions)),
        "policies": len(request.policies),
        "paths": [
            {
                "path": s.path,
                "versions": [v.version for v in s.versions],
                "deleted": [v.version for v in s.versions if v.deleted_at is not None],
            }
            for s in secrets
        ],
        "policy_names": [p.name for p in request.policies],
        "ignored_orphan_versions": data.orphans,
        "bytes": len(body),
    }
    if len(body) > MAX_IMPORT_BYTES:
        raise CommandError(
            f"the import is {len(body)} bytes, over the {MAX_IMPORT_BYTES} bytes Nexus reads in one import: "
            "this spike moves a deployment in one atomic request, so it cannot move this one"
        )
    return Plan(request, body, report)


def _human(report: dict[str, Any], *, done: bool, merge: bool) -> list[str]:
    head = "moved" if done else "would move (dry run: nothing written)"
    lines = [
        f"{head}: {report['secrets']} secret(s) with {report['versions']} version(s) "
        f"({report['deleted_versions']} soft-deleted; {report['deleted_secrets']} secret(s) deleted whole) "
        f"and {report['policies']} policy(ies){' (merged)' if merge and done else ''}"
    ]
    for entry in report["paths"]:
        deleted = f", deleted {', '.join(map(str, entry['deleted']))}" if entry["deleted"] else ""
        lines.append(f"  secret {entry['path']}: versions {', '.join(map(str, entry['versions']))}{deleted}")
    lines += [f"  policy {name}" for name in report["policy_names"]]
    if report["ignored_orphan_versions"]:
        lines.append(
            f"  ignored {report['ignored_orphan_versions']} version row(s) with no metadata row "
            "(SPIKE itself never serves them)"
        )
    return lines


def run(
    database: Path,
    shares: list[Share],
    *,
    threshold: int | None,
    dry_run: bool,
    merge: bool,
    output: str,
    say: Say,
    client: Callable[[], NexusClient],
) -> int:
    key = rebuild_key(shares, threshold)
    try:
        moving = plan(database, key, merge=merge)
    finally:
        key.wipe()
    report = moving.report
    if not dry_run:
        with client() as nexus:
            answer = nexus.call(IMPORT_PATH, moving.body, ImportResponse, write=True)
        report = report | {
            "secrets": answer.secrets,
            "versions": answer.versions,
            "deleted_versions": answer.deleted_versions,
            "policies": answer.policies,
        }
    if machine(output):
        say(render(output, {"dry_run": dry_run, "merge": merge, **report}))
        return 0
    for line in _human(report, done=not dry_run, merge=merge):
        say(line)
    if dry_run:
        say("run again without --dry-run to write it into Nexus (one transaction: all of it or nothing)")
    return 0
