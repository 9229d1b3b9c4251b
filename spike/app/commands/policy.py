"""`spike policy create|apply|get|list|delete`.

`apply` reads a YAML or JSON file holding one policy or a list of them, in
SPIKE's spelling (``spiffeidPattern``, ``pathPattern``) or ours
(``spiffe_id_pattern``, ``path_pattern``), and creates or replaces each by
name.  Patterns are RE2 regular expressions that match anywhere in the SPIFFE
ID or path, as SPIKE's do: both commands warn (on stderr, and go on) about a
pattern that is not anchored with ``^`` and ``$``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

from spike.app import config as cfg
from spike.app.api.messages import (
    POLICY_PATH,
    PolicyBody,
    PolicyIdRequest,
    PolicyListRequest,
    PolicyListResponse,
    PolicyPutRequest,
    PolicyPutResponse,
)
from spike.app.commands.client import Empty, NexusClient
from spike.app.commands.formats import add_format_flag, machine, render
from spike.app.errors import CommandError
from spike.app.model import kv
from spike.app.model.policy import check_policy_fields, unanchored_warnings

Say = Callable[[str], None]


def add_parser(sub: Any, client_flags: Callable[[argparse.ArgumentParser], None]) -> None:
    policy = sub.add_parser("policy", help="who may read, write, list or execute what")
    actions = policy.add_subparsers(dest="policy_command", metavar="ACTION", required=True)

    def parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        add_format_flag(p)
        client_flags(p)  # --nexus and the identity
        return p

    create = parser("create", "create a policy (fails if the name exists)")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--spiffeid-pattern", required=True, help="RE2 regex searched in the SPIFFE ID (anchor it: ^...$)"
    )
    create.add_argument(
        "--path-pattern", required=True, help="RE2 regex searched in the secret path (anchor it: ^...$)"
    )
    create.add_argument("--permissions", required=True, help="comma-separated: read,write,list,execute,super")

    apply = parser("apply", "create or replace policies from a YAML or JSON file")
    apply.add_argument("--file", required=True, type=Path)

    for name, help_text in (("get", "show one policy"), ("delete", "delete a policy")):
        p = parser(name, help_text)
        p.add_argument("policy", metavar="NAME_OR_ID")

    lst = parser("list", "list policies (all, or those with exactly this pattern)")
    only = lst.add_mutually_exclusive_group()
    only.add_argument("--spiffeid-pattern", default="", help="only policies with exactly this SPIFFE ID pattern")
    only.add_argument("--path-pattern", default="", help="only policies with exactly this path pattern")


def _load_specs(path: Path) -> list[dict[str, Any]]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise CommandError(f"cannot read {path}: {exc}", exit_code=2) from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CommandError(f"{path} is not valid JSON: {exc}", exit_code=2) from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise CommandError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}", exit_code=2) from None
    specs = data if isinstance(data, list) else [data]
    if not specs or not all(isinstance(s, dict) for s in specs):
        raise CommandError(f"{path} must hold a policy mapping or a list of them", exit_code=2)
    return specs


def _field(spec: dict[str, Any], *names: str) -> Any:
    for name in names:
        if name in spec:
            return spec[name]
    raise CommandError(f"policy {spec.get('name', '?')!r} has no {names[0]}", exit_code=2)


def _warn(text: str) -> None:
    print(f"spike policy: warning: {text}", file=sys.stderr)


def _request(name: str, ids: str, paths: str, permissions: Any, *, create_only: bool) -> PolicyPutRequest:
    if isinstance(permissions, str):
        permissions = [p.strip() for p in permissions.split(",") if p.strip()]
    if not isinstance(permissions, list) or not all(isinstance(p, str) for p in permissions):
        raise CommandError("permissions must be a list of names", exit_code=2)
    if not all(isinstance(v, str) for v in (name, ids, paths)):
        raise CommandError("name and patterns must be strings", exit_code=2)
    try:
        check_policy_fields(name, ids, paths, permissions)
    except kv.KvError as exc:
        raise CommandError(f"policy {name!r}: {exc}", exit_code=2) from None
    return PolicyPutRequest(
        name=name, spiffeidPattern=ids, pathPattern=paths, permissions=permissions, createOnly=create_only
    )


def run(args: argparse.Namespace, say: Say = print) -> int:
    config = cfg.client(args, cfg.environ(args))
    command = args.policy_command
    requests: list[PolicyPutRequest] = []
    if command == "create":
        requests.append(
            _request(args.name, args.spiffeid_pattern, args.path_pattern, args.permissions, create_only=True)
        )
    elif command == "apply":
        for spec in _load_specs(args.file):
            requests.append(
                _request(
                    _field(spec, "name"),
                    _field(spec, "spiffeidPattern", "spiffe_id_pattern", "spiffeIdPattern"),
                    _field(spec, "pathPattern", "path_pattern"),
                    _field(spec, "permissions"),
                    create_only=False,
                )
            )
    for request in requests:  # once every policy given is valid: an error stays the one line printed
        for warning in unanchored_warnings(request.spiffeidPattern, request.pathPattern):
            _warn(f"policy {request.name!r}: {warning}")
    with NexusClient(config.nexus_url, config.common.svid, config.common.trust) as nexus:
        for request in requests:
            put = nexus.call(
                POLICY_PATH,
                request,
                PolicyPutResponse,
                conflict=f"a policy named {request.name} already exists",
                write=True,
            )
            verb = "created" if put.created else "replaced"
            say(render(config.output, {"name": request.name, "id": put.id, "created": put.created})
                if machine(config.output) else f"{verb} policy {request.name} ({put.id})")  # fmt: skip
        if command == "get":
            policy = nexus.call(
                POLICY_PATH,
                PolicyIdRequest(id=args.policy),
                PolicyBody,
                action="get",
                not_found=f"no such policy: {args.policy}",
            )
            if machine(config.output):
                shown = msgspec.to_builtins(policy)
                shown.pop("spiffiedPattern", None)  # the same pattern, for SPIKE's Go SDK only
                say(render(config.output, shown))
            else:
                say(f"{policy.name} ({policy.id})")
                say(f"  SPIFFE IDs: {policy.spiffeidPattern}")
                say(f"  paths:      {policy.pathPattern}")
                say(f"  grants:     {', '.join(policy.permissions)}")
                say(f"  created {policy.createdAt}, updated {policy.updatedAt}")
        elif command == "list":
            wanted = PolicyListRequest(spiffeidPattern=args.spiffeid_pattern, pathPattern=args.path_pattern)
            listed = nexus.call(POLICY_PATH, wanted, PolicyListResponse, action="list")
            if machine(config.output):
                say(render(config.output, msgspec.to_builtins(listed)))
            else:
                width = max((len(item.name) for item in listed.policies), default=0)
                for item in listed.policies:
                    say(f"{item.name.ljust(width)}  {item.id}")
        elif command == "delete":
            nexus.call(
                POLICY_PATH,
                PolicyIdRequest(id=args.policy),
                Empty,
                action="delete",
                not_found=f"no such policy: {args.policy}",
                write=True,
            )
            if machine(config.output):
                say(render(config.output, {"deleted": args.policy}))
            else:
                say(f"deleted policy {args.policy}")
    return 0
