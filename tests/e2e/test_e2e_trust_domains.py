"""Trust per domain with real processes (issue 14, H1): the audit's reproduction, and the refusals around it.

The audit deployed spike by hand with the pilots in another trust domain
(``SPIKE_TRUST_ROOT_PILOT=other.test``, a documented option), so every
process trusted both domains' CAs.  A certificate signed by other.test's CA
that claimed ``spiffe://spike.test/spike/nexus`` then read a keeper's shard
(200).  Here the same deployment runs as real `spike keeper`, `spike nexus`,
`spike bootstrap` and `spike secret` processes, its bundles configured both
ways: one file whose CAs name their domain (what the audit had), and a bundle
file per domain (``SPIKE_TRUST_BUNDLES``).  Each CA mints the other domain's
IDs, and each is refused with a log line naming the claimed ID, its domain
and why; the genuine callers of both domains work throughout.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from spike.app.commands.devca import CA_CERT, DevIdentity
from spike.transports.tls import SvidFiles
from tests.e2e.harness import Cluster
from tests.transport.transport_rig import mint_files, raw_client_context, raw_request, refused

pytestmark = pytest.mark.e2e

OURS = "spike.test"
THEIRS = "other.test"


def refusal_pattern(claimed: str, signer: str) -> str:
    domain = claimed.split("/")[2]
    return (
        rf"refused a client at 127\.0\.0\.1:\d+ presenting {claimed} \(trust domain {domain}\): "
        rf"its certificate chain ends at 'CN=spike dev CA for {signer}', a CA of {signer}, "
        rf"which is not in the trust bundle of {domain}"
    )


@pytest.mark.parametrize("layout", ["one labelled bundle file", "a bundle file per domain"])
def test_an_id_minted_by_the_other_domains_ca_cannot_read_a_shard_or_reach_nexus(
    layout: str,
    make_cluster: Callable[..., Cluster],
    dev_identity: DevIdentity,
    foreign_identity: DevIdentity,
    tmp_path: Path,
) -> None:
    ours, theirs = dev_identity.directory / CA_CERT, foreign_identity.directory / CA_CERT
    both = tmp_path / "both.pem"
    both.write_bytes(ours.read_bytes() + theirs.read_bytes())
    if layout == "one labelled bundle file":
        cluster = make_cluster(pilot_identity=foreign_identity, bundle=both)
    else:
        cluster = make_cluster(pilot_identity=foreign_identity, trust_bundles=((OURS, ours), (THEIRS, theirs)))
    cluster.start_ready()  # bootstrap (spike.test) seeds, the other.test superuser sees Nexus ready

    def forged(by: DevIdentity, spiffe_id: str) -> SvidFiles:
        name = spiffe_id.replace("spiffe://", "").replace("/", "-")
        return mint_files(by, tmp_path, name, spiffe_id)

    # The audit's reproduction: other.test's CA claims to be spike.test's Nexus and asks a keeper for its shard.
    forged_nexus = raw_client_context(forged(foreign_identity, f"spiffe://{OURS}/spike/nexus"), both)
    forged_bootstrap = raw_client_context(forged(foreign_identity, f"spiffe://{OURS}/spike/bootstrap"), both)
    keeper_port = cluster.keeper_ports[1]
    refused(keeper_port, forged_nexus)  # no HTTP answer (it was 200 with the shard)
    refused(keeper_port, forged_bootstrap, "/v1/store/contribute", b'{"shard": [' + b"9," * 31 + b"9]}")
    keeper_log = cluster.keeper(1)
    cluster.wait_log(keeper_log, refusal_pattern(f"spiffe://{OURS}/spike/nexus", THEIRS))
    cluster.wait_log(keeper_log, refusal_pattern(f"spiffe://{OURS}/spike/bootstrap", THEIRS))

    # Nexus, both ways: other.test's CA as spike.test's bootstrap, spike.test's CA as other.test's superuser.
    nexus_port = cluster.nexus_port
    refused(nexus_port, forged_bootstrap, "/v1/bootstrap/init")
    forged_superuser = raw_client_context(forged(dev_identity, f"spiffe://{THEIRS}/spike/pilot/role/superuser"), both)
    refused(nexus_port, forged_superuser, "/v1/store/secrets?action=list", b'{"path": ""}')
    cluster.wait_log(cluster.nexus(), refusal_pattern(f"spiffe://{OURS}/spike/bootstrap", THEIRS))
    cluster.wait_log(cluster.nexus(), refusal_pattern(f"spiffe://{THEIRS}/spike/pilot/role/superuser", OURS))

    # Controls: the genuine Nexus holds and reads every keeper's unchanged shard, and the genuine
    # other.test superuser works through the real CLI.
    shards = cluster.read_shards()
    assert sorted(shards) == [1, 2, 3]
    assert len({share.epoch for share in shards.values()}) == 1
    put = cluster.run("secret", "put", "apps/db", "password=kept")
    assert put.returncode == 0, put
    got = cluster.run("secret", "get", "apps/db", "password")
    assert (got.returncode, got.stdout) == (0, "kept\n"), got
    # And a genuine other.test pilot at a keeper is authenticated, then not authorised (401).
    pilot = raw_client_context(cluster.files("pilot-superuser"), both)
    answer = raw_request(keeper_port, pilot)
    assert answer is not None and answer.status == 401

    # Nexus's side: keeper 3 restarts as an impostor whose keeper-3 SVID other.test's CA minted.
    # Nexus polls it and refuses it before sending anything (so it never pushes keeper 3's shard
    # there), and says why in `spike status` (and its log, at the next change or summary).
    cluster.kill_keeper(3)
    impostor = forged(foreign_identity, f"spiffe://{OURS}/spike/keeper/3")
    proc = cluster.start_keeper(3, SvidFiles(impostor.cert, impostor.key, *_bundles(cluster)))
    refusal = (
        f"peer presented spiffe://{OURS}/spike/keeper/3 (trust domain {OURS}), refused: its certificate chain "
        f"ends at 'CN=spike dev CA for {THEIRS}', a CA of {THEIRS}, which is not in the trust bundle of {OURS}"
    )

    def keeper_3_refused(status: dict[str, Any]) -> bool:
        keeper = next(k for k in status["keepers"] if k["id"] == 3)
        return bool(keeper["state"] == "unreachable" and keeper["detail"] == refusal and keeper["failures"] >= 3)

    cluster.wait_status(keeper_3_refused, "Nexus to refuse the impostor keeper 3")
    assert "shard stored" not in proc.text(), proc.text()


def _bundles(cluster: Cluster) -> tuple[Path, tuple[tuple[str, Path], ...]]:
    files = cluster.files("nexus")
    return files.bundle, files.trust_bundles
