"""Prometheus metrics, `/healthz` and `/readyz`, on a separate plain-HTTP listener.

Off by default (`--metrics-listen`).  Keeper gauges and counters are read
from the custody machine at scrape time, so they cannot drift from what
`spike status` shows; API and keeper-request latencies are histograms fed as
requests finish.  Nothing here ever sees a key, a shard or a secret value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from spike.app.api.messages import KeyringStatusBody
from spike.app.store.read_cache import ReadCache
from spike.protocol.api import ApiRequest, ApiResponse
from spike.protocol.effects import (
    KeeperLeft,
    KeeperMisbehaved,
    KeeperState,
    KeyRecovered,
    Phase,
    Report,
    RotationProgress,
    RotationStage,
    SendRequest,
    ShardRetired,
)
from spike.protocol.events import Answer, RequestFailed, ResponseReceived
from spike.protocol.nexus import NexusCustody

PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
# The stages a rotation can be under way in (the others only end one).
_UNDER_WAY = (
    RotationStage.PERSISTING,
    RotationStage.DEALING,
    RotationStage.COMMITTING,
    RotationStage.ABANDONING,
    RotationStage.FOLLOWING,
)
_ENDINGS = {RotationStage.COMMITTED: "committed", RotationStage.ABANDONED: "abandoned",
            RotationStage.NOT_STARTED: "not_started"}  # fmt: skip
_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _CustodyCollector(Collector):
    def __init__(
        self,
        custody: Callable[[], NexusCustody],
        urls: Mapping[int, str],
        now: Callable[[], float],
        keyring: Callable[[], KeyringStatusBody | None],
    ) -> None:
        self._custody = custody
        self._urls = urls
        self._now = now
        self._keyring = keyring

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        custody = self._custody()
        phase = GaugeMetricFamily("spike_nexus_phase", "1 for the phase Nexus is in", labels=["phase"])
        for p in Phase:
            phase.add_metric([p.value], float(custody.phase is p))
        yield phase
        record = custody.record
        yield GaugeMetricFamily("spike_key_epoch", "epoch of the root key record", value=record.epoch if record else 0)
        yield GaugeMetricFamily("spike_shamir_threshold", "shards needed to rebuild the key", value=custody.threshold)
        yield GaugeMetricFamily(
            "spike_shard_redundancy",
            "keepers holding their verified current shard, minus the threshold",
            value=custody.redundancy,
        )
        yield GaugeMetricFamily("spike_shards_needed", "verified shards missing to rebuild the key",
                                value=custody.shards_needed)  # fmt: skip
        yield GaugeMetricFamily(
            "spike_key_highest_epoch", "highest key epoch the deployment used (abandoned rotations included)",
            value=custody.highest_epoch,
        )  # fmt: skip
        rotation = custody.rotation
        stage = GaugeMetricFamily(
            "spike_key_rotation_stage", "1 for the stage of the key rotation under way (all 0: none)", labels=["stage"]
        )
        for under_way in _UNDER_WAY:
            stage.add_metric([under_way.value], float(rotation is not None and rotation.stage is under_way))
        yield stage
        keyring = self._keyring()
        if keyring is not None:
            yield GaugeMetricFamily("spike_data_key_term", "data-key term new values are sealed under",
                                    value=keyring.term)  # fmt: skip
            values = GaugeMetricFamily("spike_values", "stored values by data-key term", labels=["term"])
            for term, count in sorted(keyring.values_by_term.items()):
                values.add_metric([str(term)], count)
            yield values
            yield GaugeMetricFamily("spike_rewrap_remaining", "values still to re-wrap to the newest term",
                                    value=keyring.rewrap_remaining)  # fmt: skip
        yield GaugeMetricFamily("spike_key_rotation_to_epoch", "epoch the rotation under way goes to (0: none)",
                                value=rotation.to_epoch if rotation else 0)  # fmt: skip
        yield GaugeMetricFamily(
            "spike_key_rotation_keepers_dealt", "keepers of the new set showing their new shard (rotation under way)",
            value=len(rotation.dealt) if rotation else 0,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "spike_key_rotation_keepers_needed", "more keepers that must show their new shard before the commit",
            value=rotation.needed if rotation else 0,
        )  # fmt: skip
        labels = ["keeper", "url"]
        state = GaugeMetricFamily("spike_keeper_state", "1 for the state each keeper is in", labels=[*labels, "state"])
        since = GaugeMetricFamily("spike_keeper_state_age_seconds", "time since the keeper entered its state",
                                  labels=labels)  # fmt: skip
        polls = CounterMetricFamily("spike_keeper_polls", "scheduled polls sent", labels=labels)
        answers = CounterMetricFamily(
            "spike_keeper_answers", "keeper answers (and failures) by outcome", labels=[*labels, "outcome"]
        )
        empties = CounterMetricFamily("spike_keeper_empty_answers", "404 (empty) answers", labels=labels)
        failures = CounterMetricFamily("spike_keeper_failures", "requests without an answer", labels=labels)
        reseeds = CounterMetricFamily("spike_keeper_reseeds", "confirmed re-seeds", labels=labels)
        now = self._now()
        for view in custody.keepers():
            key = [str(view.keeper_id), self._urls.get(view.keeper_id, "")]
            for s in KeeperState:
                state.add_metric([*key, s.value], float(view.state is s))
            since.add_metric(key, max(0.0, now - view.since))
            polls.add_metric(key, view.polls)
            for outcome, count in view.outcomes.items():
                answers.add_metric([*key, outcome], count)
            empties.add_metric(key, view.empty_answers)
            failures.add_metric(key, view.failures)
            reseeds.add_metric(key, view.reseeds)
        yield from (state, since, polls, answers, empties, failures, reseeds)


class _ReadCacheCollector(Collector):
    """PostgreSQL's read cache (docs/postgresql.md): how many GETs it answered, and whether it may now."""

    def __init__(self, cache: ReadCache) -> None:
        self._cache = cache

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        cache = self._cache
        yield CounterMetricFamily("spike_read_cache_hits", "GETs answered from the read cache", value=cache.hits)
        yield CounterMetricFamily(
            "spike_read_cache_misses", "GETs the read cache could not answer (asked the database)", value=cache.misses
        )
        yield GaugeMetricFamily("spike_read_cache_bytes", "bytes the read cache holds", value=cache.size)
        yield GaugeMetricFamily(
            "spike_read_cache_fresh", "1 while a recent barrier lets the read cache answer", value=float(cache.fresh())
        )


class NexusMetrics:
    def __init__(
        self,
        custody: Callable[[], NexusCustody],
        urls: Mapping[int, str],
        now: Callable[[], float],
        keyring: Callable[[], KeyringStatusBody | None] = lambda: None,
        read_cache: ReadCache | None = None,
    ) -> None:
        """`keyring`: the data keys as last counted (`KeyLifecycle.refresh_keyring`), read at each scrape."""
        self.registry = CollectorRegistry()
        self.registry.register(_CustodyCollector(custody, urls, now, keyring))
        if read_cache is not None:
            self.registry.register(_ReadCacheCollector(read_cache))
        self._custody = custody
        self.api_requests = Counter(
            "spike_api_requests", "API requests by route and status", ["route", "status"], registry=self.registry
        )
        self.api_latency = Histogram(
            "spike_api_request_duration_seconds",
            "API request duration, until the answer is ready (writes: until durable)",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.keeper_latency = Histogram(
            "spike_keeper_request_duration_seconds",
            "duration of requests to keepers",
            ["keeper", "kind", "result"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.request_failures = Counter(
            "spike_keeper_request_failures",
            "requests to keepers without an answer, by why (refused, timeout, tls, peer_identity, closed, ...)",
            ["keeper", "kind"],
            registry=self.registry,
        )
        self.misbehaved = Counter(
            "spike_keeper_misbehaved", "wrong shards, garbage and refusals from keepers", ["keeper"],
            registry=self.registry,
        )  # fmt: skip
        self.recoveries = Counter(
            "spike_key_recoveries", "root key rebuilt and verified", ["source"], registry=self.registry
        )
        self._counters: dict[tuple[str, int], Counter] = {}
        self._histograms: dict[str, Histogram] = {}
        self.recovery_seconds = Gauge(
            "spike_key_recovery_duration_seconds", "how long the last key recovery took", registry=self.registry
        )
        self.rotations = Counter(
            "spike_key_rotations", "key rotations ended, by outcome (committed, abandoned, not_started)", ["outcome"],
            registry=self.registry,
        )  # fmt: skip
        for outcome in _ENDINGS.values():
            self.rotations.labels(outcome)  # present at 0 from the start
        self.rotation_seconds = Gauge(
            "spike_key_rotation_duration_seconds", "how long the last committed key rotation took, start to commit",
            registry=self.registry,
        )  # fmt: skip
        self.shards_retired = Counter(
            "spike_keeper_shards_retired", "shards keepers confirmed they forgot (old epochs, removed keepers)",
            ["keeper"], registry=self.registry,
        )  # fmt: skip
        self.keepers_left = Counter(
            "spike_keepers_left", "keepers a rekey removed that hold nothing any more and are no longer polled",
            registry=self.registry,
        )  # fmt: skip
        self._rotation_started: dict[int, float] = {}  # to epoch -> when this instance saw it start

    def report(self, report: Report) -> None:
        if isinstance(report, KeeperMisbehaved):
            self.misbehaved.labels(str(report.keeper_id)).inc()
        elif isinstance(report, KeyRecovered):
            self.recoveries.labels(report.source).inc()
            self.recovery_seconds.set(report.at - report.started_at)
        elif isinstance(report, RotationProgress):
            if report.stage in _UNDER_WAY:
                self._rotation_started.setdefault(report.to_epoch, report.at)
                return
            started = self._rotation_started.pop(report.to_epoch, None)
            self.rotations.labels(_ENDINGS[report.stage]).inc()
            if report.stage is RotationStage.COMMITTED and started is not None:
                self.rotation_seconds.set(report.at - started)
        elif isinstance(report, ShardRetired):
            self.shards_retired.labels(str(report.keeper_id)).inc()
        elif isinstance(report, KeeperLeft):
            self.keepers_left.inc()

    def keeper_request(self, request: SendRequest, answer: Answer, seconds: float) -> None:
        result = str(answer.status) if isinstance(answer, ResponseReceived) else "failed"
        self.keeper_latency.labels(str(request.keeper_id), request.kind.value, result).observe(seconds)
        if isinstance(answer, RequestFailed):
            self.request_failures.labels(str(request.keeper_id), answer.kind.value).inc()

    def api_request(self, route: str, status: int, seconds: float) -> None:
        # Looking a labelled child up costs more than updating it: keep them (routes
        # and statuses are few, so the caches stay small).
        counter = self._counters.get((route, status))
        if counter is None:
            counter = self._counters[(route, status)] = self.api_requests.labels(route, str(status))
        counter.inc()
        histogram = self._histograms.get(route)
        if histogram is None:
            histogram = self._histograms[route] = self.api_latency.labels(route)
        histogram.observe(seconds)

    def handler(self, request: ApiRequest) -> ApiResponse:
        """The metrics listener: GET /metrics, /healthz, /readyz."""
        if request.method != "GET":
            return ApiResponse(405, b"method not allowed\n", "text/plain")
        if request.path == "/metrics":
            return ApiResponse(200, generate_latest(self.registry), PROMETHEUS_TEXT)
        if request.path == "/healthz":
            return ApiResponse(200, b"ok\n", "text/plain")
        if request.path == "/readyz":
            ready = self._custody().phase is Phase.READY
            return ApiResponse(200 if ready else 503, b"ready\n" if ready else b"not ready\n", "text/plain")
        return ApiResponse(404, b"not found\n", "text/plain")
