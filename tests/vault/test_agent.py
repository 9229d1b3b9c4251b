"""The agent (`bao agent`, OpenBao's vault-agent) logs in with its certificate and renders a template.

The configuration is docs/vault-clients.md's, with this run's files: cert
auto-auth, the client certificate on every connection, a KV v2 template.
`exit_after_auth` makes it render once and exit.
"""

from __future__ import annotations

import subprocess

from tests.vault.clients import hvac_client
from tests.vault.deployments import MOUNT, Target, bao_binary


def test_agent_renders_a_template(target: Target, unique: str) -> None:
    hvac_client(target, "web").secrets.kv.v2.create_or_update_secret(
        unique, secret={"password": "rendered-by-the-agent"}, mount_point=MOUNT
    )
    ident = target.workloads["web"]
    out = target.root / f"agent-{unique.replace('/', '-')}"
    out.mkdir(exist_ok=True)
    config = out / "agent.hcl"
    config.write_text(
        f"""
vault {{
  address     = "{target.url}"
  ca_cert     = "{target.ca}"
  client_cert = "{ident.cert}"
  client_key  = "{ident.key}"
}}
auto_auth {{
  method "cert" {{
    config = {{
      client_cert = "{ident.cert}"
      client_key  = "{ident.key}"
    }}
  }}
  sink "file" {{
    config = {{ path = "{out / "token"}" }}
  }}
}}
template {{
  contents    = "{{{{ with secret \\"{MOUNT}/data/{unique}\\" }}}}{{{{ .Data.data.password }}}}{{{{ end }}}}"
  destination = "{out / "password"}"
}}
exit_after_auth = true
"""
    )
    done = subprocess.run(
        [bao_binary(), "agent", f"-config={config}"],
        env=target.cli_env("web"),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert (out / "password").read_text() == "rendered-by-the-agent"
    assert (out / "token").read_text().startswith("s.")
