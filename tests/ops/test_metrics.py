"""The metrics listener's handler in-process: /metrics parsed with prometheus_client's own parser.

The node's custody machine is walked through a restart: all keepers polled,
keeper 1 holding, keeper 2 empty (404), keeper 3 unreachable; then the key is
restored, keeper 2 is re-seeded, and API calls are made.  Every scrape must
parse, agree with the machine's own view, keep label values bounded (an
unknown path is "other"), and hold no key, shard or secret value.
"""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

from spike.app.api.messages import RESTORE_PATH
from spike.app.nexus.metrics import PROMETHEUS_TEXT
from spike.protocol import Answer, FailureKind, RequestFailed, ResponseReceived
from spike.protocol.api import ApiRequest
from tests.ops.ops_helpers import ROOT_KEY, SHARES, Node, leaks, secrets_of, shard_answer

SECRET_VALUE = "correct-horse-battery-staple-5f2a9c"
SECRETS = {**secrets_of(SHARES.values(), ROOT_KEY), "secret value": SECRET_VALUE.encode()}

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def get(node: Node, path: str, method: str = "GET") -> tuple[int, str, str]:
    response = node.metrics.handler(ApiRequest(method, path, None))
    return response.status, response.content_type, response.body.decode()


def scrape(node: Node) -> Samples:
    status, content_type, text = get(node, "/metrics")
    assert (status, content_type) == (200, PROMETHEUS_TEXT)
    assert not leaks(text, SECRETS)
    samples: Samples = {}
    names = []
    for family in text_string_to_metric_families(text):
        names.append(family.name)
        for sample in family.samples:
            key = (sample.name, tuple(sorted(sample.labels.items())))
            assert key not in samples, key
            samples[key] = sample.value
    assert len(names) == len(set(names)), names
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    wanted = tuple(sorted(labels.items()))
    found = [v for (n, ls), v in samples.items() if n == name and set(wanted) <= set(ls)]
    assert len(found) == 1, (name, labels, found)
    return found[0]


def keeper(samples: Samples, name: str, keeper_id: int, **labels: str) -> float:
    return value(samples, name, keeper=str(keeper_id), url=f"https://127.0.0.1:{20000 + keeper_id}", **labels)


def test_keeper_metrics_follow_an_outage_a_restore_and_a_reseed(node: Node) -> None:
    samples = scrape(node)
    assert value(samples, "spike_nexus_phase", phase="recovering") == 1
    assert value(samples, "spike_nexus_phase", phase="ready") == 0
    assert value(samples, "spike_key_epoch") == 1
    assert value(samples, "spike_shamir_threshold") == 2
    assert value(samples, "spike_shards_needed") == 2
    assert value(samples, "spike_shard_redundancy") == -2
    assert keeper(samples, "spike_keeper_state", 1, state="unknown") == 1

    node.driver.tick(0.0)
    node.driver.answer(1, 200, shard_answer(SHARES[1]))
    node.driver.answer(2, 404)
    node.driver.answer(3, None)
    samples = scrape(node)
    assert keeper(samples, "spike_keeper_state", 1, state="holding") == 1
    assert keeper(samples, "spike_keeper_state", 2, state="empty") == 1
    assert keeper(samples, "spike_keeper_state", 3, state="unreachable") == 1
    assert sum(keeper(samples, "spike_keeper_state", 2, state=s) for s in ("holding", "empty", "unknown")) == 1
    for keeper_id in (1, 2, 3):
        assert keeper(samples, "spike_keeper_polls_total", keeper_id) == 1
    assert keeper(samples, "spike_keeper_empty_answers_total", 2) == 1
    assert keeper(samples, "spike_keeper_empty_answers_total", 1) == 0
    assert keeper(samples, "spike_keeper_failures_total", 3) == 1
    assert keeper(samples, "spike_keeper_answers_total", 2, outcome="empty") == 1
    assert value(samples, "spike_shards_needed") == 1
    assert value(samples, "spike_shard_redundancy") == -1
    assert keeper(samples, "spike_keeper_state_age_seconds", 2) >= 0

    # Break-glass: the operator hands in keeper 3's shard; Nexus is ready and re-seeds 2 and 3.
    node.driver.clock += 1.5
    assert node.call(RESTORE_PATH, {"id": 3, "shard": list(SHARES[3].secret_bytes())}, as_="restore").status == 200
    for keeper_id in (2, 3):
        node.driver.answer(keeper_id, 200)  # the push
        node.driver.answer(keeper_id, 200, shard_answer(SHARES[keeper_id]))  # the read back
    samples = scrape(node)
    assert value(samples, "spike_nexus_phase", phase="ready") == 1
    assert value(samples, "spike_shard_redundancy") == 1
    assert value(samples, "spike_shards_needed") == 0
    assert keeper(samples, "spike_keeper_reseeds_total", 2) == 1
    assert keeper(samples, "spike_keeper_reseeds_total", 3) == 1
    assert keeper(samples, "spike_keeper_reseeds_total", 1) == 0
    assert value(samples, "spike_key_recoveries_total", source="operator") == 1
    assert value(samples, "spike_key_recovery_duration_seconds") == pytest.approx(1.53, abs=0.05)
    assert value(samples, "spike_api_requests_total", route=RESTORE_PATH, status="200") == 1


def test_api_requests_are_counted_by_route_and_status_with_bounded_labels(node: Node) -> None:
    node.driver.submit_shard(SHARES[1])
    node.driver.submit_shard(SHARES[2])
    body = {"path": "app/db", "values": {"password": SECRET_VALUE}}
    assert node.call("/v1/store/secrets", body).status == 200
    for _ in range(2):
        assert node.call("/v1/store/secrets", {"path": "app/db"}, action="get").status == 200
    assert node.call("/v1/store/secrets", {"path": "app/db"}, action="get", as_="/web").status == 401
    for path in ("/v1/attacker/chosen/1", "/v1/attacker/chosen/2", "/metrics"):
        assert node.call(path).status == 404
    assert node.call("/v1/store/secrets", {"path": "app/db"}, action="made-up").status == 400

    samples = scrape(node)
    assert value(samples, "spike_api_requests_total", route="/v1/store/secrets", status="200") == 1
    assert value(samples, "spike_api_requests_total", route="/v1/store/secrets?action=get", status="200") == 2
    assert value(samples, "spike_api_requests_total", route="/v1/store/secrets?action=get", status="401") == 1
    assert value(samples, "spike_api_requests_total", route="other", status="404") == 3
    assert value(samples, "spike_api_requests_total", route="other", status="400") == 1
    routes = {dict(labels)["route"] for (name, labels) in samples if name == "spike_api_requests_total"}
    assert not [r for r in routes if "attacker" in r or "made-up" in r], routes
    count = value(samples, "spike_api_request_duration_seconds_count", route="/v1/store/secrets?action=get")
    assert count == 3
    assert value(samples, "spike_api_request_duration_seconds_bucket", route="/v1/store/secrets", le="+Inf") == 1


def test_keeper_request_latency_is_a_histogram_by_keeper_kind_and_result(node: Node) -> None:
    node.driver.tick(0.0)
    for keeper_id, status in ((1, 200), (2, 404), (3, None)):
        request = node.driver.answer(keeper_id, status, shard_answer(SHARES[1]) if status == 200 else b"{}")
        answer: Answer = (
            RequestFailed(request.request_id, "down")
            if status is None
            else ResponseReceived(request.request_id, status, b"")
        )
        node.metrics.keeper_request(request, answer, 0.003)
    samples = scrape(node)
    bucket = "spike_keeper_request_duration_seconds_bucket"
    assert value(samples, bucket, keeper="1", kind="poll", result="200", le="0.0025") == 0
    assert value(samples, bucket, keeper="1", kind="poll", result="200", le="0.005") == 1
    assert value(samples, bucket, keeper="2", kind="poll", result="404", le="+Inf") == 1
    assert value(samples, bucket, keeper="3", kind="poll", result="failed", le="+Inf") == 1


def test_requests_without_an_answer_are_counted_by_why(node: Node) -> None:
    node.driver.tick(0.0)
    for keeper_id, kind in ((1, FailureKind.REFUSED), (2, FailureKind.PEER_IDENTITY), (3, FailureKind.TIMEOUT)):
        request = node.driver.answer(keeper_id, None, b"")
        node.metrics.keeper_request(request, RequestFailed(request.request_id, "no", kind), 0.001)
    samples = scrape(node)
    for keeper_id, kind in (("1", "refused"), ("2", "peer_identity"), ("3", "timeout")):
        assert value(samples, "spike_keeper_request_failures_total", keeper=keeper_id, kind=kind) == 1


def test_healthz_readyz_and_nothing_else(node: Node) -> None:
    assert get(node, "/healthz")[0] == 200
    assert get(node, "/readyz")[:1] == (503,)
    assert "not ready" in get(node, "/readyz")[2]
    node.driver.submit_shard(SHARES[1])
    assert get(node, "/readyz")[0] == 503
    node.driver.submit_shard(SHARES[2])
    assert get(node, "/readyz")[0] == 200
    assert get(node, "/healthz")[0] == 200
    for path in ("/", "/metrics/", "/v1/store/secrets", "/debug"):
        assert get(node, path)[0] == 404, path
    for method in ("POST", "PUT", "DELETE"):
        assert get(node, "/metrics", method)[0] == 405
    node.custody.forget(node.driver.clock)
    assert get(node, "/readyz")[0] == 503
