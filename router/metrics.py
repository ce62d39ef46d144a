"""Prometheus metrics of one router (own registry, so several routers can live in one process)."""

from __future__ import annotations

import functools
import time
from collections import deque
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.samples import Sample

from protos.worker_metrics import worker_metrics
from router.workers import INCOMPATIBLE_FIELDS

# The quantile an SLO target holds (--ttft-slo, --tpot-slo): the planner scales on it, and the alerting rules
# (deploy/prometheus/rules.yaml) page on it.
SLO_QUANTILE = 0.9

LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    1.5,
    2.0,
    3.0,
    5.0,
    7.5,
    10.0,
    20.0,
    30.0,
    60.0,
)
TOKEN_LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.02,
    0.03,
    0.05,
    0.075,
    0.1,
    0.15,
    0.2,
    0.3,
    0.5,
    0.75,
    1.0,
    2.0,
    5.0,
)
# Signed: a prefill worker's prompts computed sooner (+) or later (-) than the router's clock forecast.
FORECAST_ERROR_BUCKETS = (-2.0, -1.0, -0.5, -0.2, -0.1, -0.05, 0.0, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0)


class RouterMetrics:
    """The router's own families, and (``watch_pool``) the cluster's view; docs/metrics.md lists them all.

    One router serves one model: the families about its requests carry ``model``, the served model's name, added at
    scrape time from ``model_name`` (left out while no model is served). The same observations are exported under
    vLLM's names too (``vllm:``, with vLLM's ``model_name`` label), for tools that only know those."""

    def __init__(self, model_name: Callable[[], str | None] = lambda: None) -> None:
        self.registry = CollectorRegistry()
        r = self._per_model = CollectorRegistry()  # the served model's families: exported through _ModelLabelled
        self.requests = Counter(
            "splitserve_requests",
            "HTTP requests finished, by route template (other: no route matched) and status",
            ["endpoint", "status"],
            registry=r,
        )
        self.grpc_requests = Counter(
            "splitserve_grpc_requests",
            "Public gRPC API calls finished, by method and status code",
            ["method", "code"],
            registry=r,
        )
        self.ttft = Histogram(
            "splitserve_time_to_first_token_seconds", "Time to first token", buckets=LATENCY_BUCKETS, registry=r
        )
        self.tpot = Histogram(
            "splitserve_time_per_output_token_seconds",
            "Mean time per output token after the first, per request",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "splitserve_inter_token_latency_seconds",
            "Gap between streamed tokens",
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "splitserve_e2e_request_latency_seconds", "End-to-end request latency", buckets=LATENCY_BUCKETS, registry=r
        )
        self.prompt_tokens = Counter("splitserve_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("splitserve_generation_tokens", "Generated tokens", registry=r)
        self.cached_tokens = Counter(
            "splitserve_cached_prompt_tokens", "Prompt tokens served from a prefix cache", registry=r
        )
        self.finished = Counter(
            "splitserve_finished_requests", "Generations finished, by finish reason", ["finish_reason"], registry=r
        )
        self.queue_depth = Gauge("splitserve_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("splitserve_running_requests", "Requests admitted and in flight", registry=r)
        self.stored_responses = Gauge("splitserve_stored_responses", "Responses API responses stored", registry=r)
        self.stored_responses_bytes = Gauge(
            "splitserve_stored_responses_bytes", "Bytes (as JSON) the stored responses take", registry=r
        )
        self._routing_families(self.registry)
        self.registry.register(_ModelLabelled(self._per_model, model_name))
        self._slo = _SLOCollector()
        self.registry.register(self._slo)
        self._desired = _DesiredCollector()
        self.registry.register(self._desired)
        self.window = LatencyWindow()

    def _routing_families(self, r: CollectorRegistry) -> None:
        """How requests were routed and what that cost: the router's mechanics, whatever the model."""
        self.routing_decisions = Counter(
            "splitserve_routing_decisions", "Routing decisions by type", ["decision"], registry=r
        )
        # The labelled families counted on every request, each child remembered by its label values (small fixed
        # sets): a dict lookup, where labels() takes a lock and checks its arguments every time.
        self.requests_by = functools.cache(self.requests.labels)
        self.grpc_requests_by = functools.cache(self.grpc_requests.labels)
        self.finished_by = functools.cache(self.finished.labels)
        self.decisions_by = functools.cache(self.routing_decisions.labels)
        self.prefill_retries = Counter(
            "splitserve_prefill_retries", "Prefill attempts retried on another worker", registry=r
        )
        self.migrations = Counter(
            "splitserve_migrations", "Requests moved to another decode worker mid-stream", registry=r
        )
        self.kv_link_failures = Counter(
            "splitserve_router_kv_link_failures",
            "Prefills failed because the prefill worker could not reach the decode worker's KV receiver (the pair "
            "is then not routed together for a while; neither worker is taken out)",
            ["prefill", "decode"],
            registry=r,
        )
        # The reservations themselves are counted by the decode worker that holds them (kv_lease_expirations).
        self.lease_expirations = Counter(
            "splitserve_lease_expired_requests",
            "Requests whose decode worker reported their KV lease expired (then failed or recomputed per lease_policy)",
            registry=r,
        )
        self.kv_transfer_seconds = Histogram(
            "splitserve_kv_transfer_exposed_seconds",
            "Transfer time not hidden behind prefill (last layer computed to KV committed), per routed request, "
            "by transport",
            ["transport"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill_forecast_error = Histogram(
            "splitserve_router_prefill_forecast_error_seconds",
            "Per prompt a prefill worker computed: the time until it was computed as this router forecast it when it "
            "sent the prompt (its wait plus its own tokens, at the worker's measured speed), less the time the "
            "worker's answer reported; negative: it took longer than the overflow rule assumed",
            ["worker"],
            buckets=FORECAST_ERROR_BUCKETS,
            registry=r,
        )
        self.planner_decisions = Counter(
            "splitserve_planner_decisions",
            "Planner decisions applied, by pool and direction",
            ["role", "direction"],
            registry=r,
        )

    def first_token(self, ttft_s: float) -> None:
        self.ttft.observe(ttft_s)
        self.window.record_ttft(ttft_s)

    def next_token(self, itl_s: float) -> None:
        self.itl.observe(itl_s)

    def finished_request(self, e2e_s: float, finish_reason: str, usage, tpot_s: float | None) -> None:
        """A generation's end: its latencies (``tpot_s`` None for one token), finish reason and token counts
        (``usage``: a common_pb2.Usage)."""
        self.e2e.observe(e2e_s)
        self.finished_by(finish_reason).inc()
        if tpot_s is not None:
            self.tpot.observe(tpot_s)
            self.window.record_tpot(tpot_s)
        self.prompt_tokens.inc(usage.prompt_tokens)
        self.generation_tokens.inc(usage.completion_tokens)
        self.cached_tokens.inc(usage.cached_tokens)

    def watch_pool(self, pool) -> None:
        """Adds the cluster's view: every worker's last Stats, and workers by pool and state."""
        self.registry.register(_PoolCollector(pool))

    def watch_slo(self, targets: Callable[[], dict[str, float] | None]) -> None:
        """Exports the SLO ``targets`` returns at scrape time ({"ttft": s, "tpot": s}; None: no SLO is set)."""
        self._slo.targets = targets

    def watch_desired(self, desired: Callable[[], dict[str, int] | None]) -> None:
        """Exports the pools' sizes the control plane aims at, as ``desired`` returns them at scrape time
        ({"prefill": n, "decode": n}; None: no control plane, the router's workers are whatever it was given)."""
        self._desired.desired = desired


# The router's families exported again under vLLM's names (same semantics; vLLM's time_per_output_token_seconds
# is its older name of the inter-token latency).
VLLM_NAMES = {
    "splitserve_time_to_first_token_seconds": ("vllm:time_to_first_token_seconds",),
    "splitserve_time_per_output_token_seconds": ("vllm:request_time_per_output_token_seconds",),
    "splitserve_inter_token_latency_seconds": (
        "vllm:inter_token_latency_seconds",
        "vllm:time_per_output_token_seconds",
    ),
    "splitserve_e2e_request_latency_seconds": ("vllm:e2e_request_latency_seconds",),
    "splitserve_prompt_tokens": ("vllm:prompt_tokens",),
    "splitserve_generation_tokens": ("vllm:generation_tokens",),
    "splitserve_finished_requests": ("vllm:request_success",),
}
_VLLM_LABEL_NAMES = {"model": "model_name", "finish_reason": "finished_reason"}


class _ModelLabelled:
    """Every family of ``registry`` with ``model`` added, and those in VLLM_NAMES again under vLLM's names."""

    def __init__(self, registry: CollectorRegistry, model_name: Callable[[], str | None]) -> None:
        self.registry = registry
        self.model_name = model_name

    def collect(self):
        model = self.model_name()
        added = {"model": model} if model else {}
        for family in self.registry.collect():
            yield _relabelled(family, family.name, added)
            for name in VLLM_NAMES.get(family.name, ()):
                yield _relabelled(family, name, added, _VLLM_LABEL_NAMES)


def _relabelled(family: Metric, name: str, added: dict[str, str], renamed: dict[str, str] | None = None) -> Metric:
    """``family`` as ``name``, its samples with ``added`` labels and label names mapped through ``renamed``."""
    renamed = renamed or {}
    copy = Metric(name, family.documentation, family.type, family.unit)
    copy.samples = [
        Sample(
            name + s.name[len(family.name) :],
            {renamed.get(k, k): v for k, v in {**s.labels, **added}.items()},
            s.value,
            s.timestamp,
            s.exemplar,
        )
        for s in family.samples
    ]
    return copy


class _DesiredCollector:
    """``splitserve_pool_desired_workers{role}``: how many workers each pool should have (the controller's, through
    the dashboard's last snapshot). Beside splitserve_workers{state="ready"}: a pool short of it has workers starting,
    dead or never placed, which the router, knowing only the workers that serve, cannot count."""

    def __init__(self) -> None:
        self.desired: Callable[[], dict[str, int] | None] = lambda: None

    def collect(self):
        family = GaugeMetricFamily(
            "splitserve_pool_desired_workers",
            "Workers each pool should have, as the control plane aims (absent without one)",
            labels=["role"],
        )
        for role, count in sorted((self.desired() or {}).items()):
            family.add_metric([role], count)
        yield family


class _SLOCollector:
    """``splitserve_slo_target_seconds{slo}``: the targets the alerting rules compare the latencies with. The
    cluster config's planner spec owns them; this only repeats what the router learnt (router.dashboard)."""

    def __init__(self) -> None:
        self.targets: Callable[[], dict[str, float] | None] = lambda: None

    def collect(self):
        family = GaugeMetricFamily(
            "splitserve_slo_target_seconds",
            "The cluster's latency targets, by SLO (ttft: time to first token, tpot: time per output token); "
            "absent while no SLO is set",
            labels=["slo"],
        )
        for slo, seconds in sorted((self.targets() or {}).items()):
            family.add_metric([slo], seconds)
        yield family


class _PoolCollector:
    def __init__(self, pool) -> None:
        self.pool = pool

    def collect(self):
        workers = list(self.pool.workers.values())
        states = GaugeMetricFamily(
            "splitserve_workers",
            "Workers known to the router, by pool and state: ready (routed to), draining, incompatible (model card "
            "differs), down (unhealthy); the states partition the pool",
            labels=["role", "state"],
        )
        for role in ("prefill", "decode"):
            members = [w for w in workers if w.role == role]
            for state in ("ready", "draining", "incompatible", "down"):
                states.add_metric([role, state], sum(1 for w in members if _state(w) == state))
        yield states
        incompatible = GaugeMetricFamily(
            "splitserve_incompatible_workers",
            "Healthy workers not routed to because their model card disagrees with the router's, by pool and "
            "by the card field that differs (a worker may count under several)",
            labels=["role", "field"],
        )
        for role in ("prefill", "decode"):
            for name in INCOMPATIBLE_FIELDS:
                count = sum(1 for w in workers if w.role == role and w.incompatible and name in w.incompatible.fields)
                incompatible.add_metric([role, name], count)
        yield incompatible
        backlog = GaugeMetricFamily(
            "splitserve_router_prefill_backlog_tokens",
            "Uncached prompt tokens this router has sent each worker to prefill and not had done: a decode worker's "
            "until their first token, a prefill worker's until it reported them computed",
            labels=["worker", "role"],
        )
        speed = GaugeMetricFamily(
            "splitserve_router_prefill_seconds_per_token",
            "Each prefill worker's compute time per uncached token, as its answers reported it (prefill_ms) for "
            "prompts sent while it had nothing else unreported (an exponential average; absent until one came back)",
            labels=["worker", "role"],
        )
        wait = GaugeMetricFamily(
            "splitserve_router_prefill_wait_seconds",
            "Each prefill worker's expected wait for a prompt sent now: the prompts it has not reported computed, at "
            "its measured speed (the wait max_prefill_wait_ms weighs; absent until a speed was measured)",
            labels=["worker", "role"],
        )
        for w in workers:
            labels = [w.label, w.role]
            backlog.add_metric(labels, w.queued_prefill_tokens)
            if w.prefill_s_per_token is not None:
                speed.add_metric(labels, w.prefill_s_per_token)
                wait.add_metric(labels, w.prefill_wait_s())
        yield backlog
        yield speed
        yield wait
        yield from worker_metrics(w.stats for w in workers if w.stats.worker_id)


def _state(worker) -> str:
    if not worker.healthy:
        return "down"
    if worker.incompatible:
        return "incompatible"
    return "draining" if worker.draining else "ready"


class LatencyWindow:
    """Recent TTFT and TPOT samples, for SLO decisions over a sliding window."""

    def __init__(self, capacity: int = 20000) -> None:
        self._ttft: deque[tuple[float, float]] = deque(maxlen=capacity)
        self._tpot: deque[tuple[float, float]] = deque(maxlen=capacity)
        self._requests: deque[float] = deque(maxlen=capacity)

    def record_ttft(self, seconds: float) -> None:
        self._ttft.append((time.monotonic(), seconds))
        self._requests.append(time.monotonic())

    def record_tpot(self, seconds: float) -> None:
        self._tpot.append((time.monotonic(), seconds))

    def summary(self, window_s: float, queue_depth: int) -> dict:
        since = time.monotonic() - window_s
        ttft = sorted(v for t, v in self._ttft if t >= since)
        tpot = sorted(v for t, v in self._tpot if t >= since)
        return {
            "ttft_p90_s": _quantile(ttft, SLO_QUANTILE),
            "tpot_p90_s": _quantile(tpot, SLO_QUANTILE),
            "ttft_samples": len(ttft),
            "tpot_samples": len(tpot),
            "queue_depth": queue_depth,
            "requests_in_window": sum(1 for t in self._requests if t >= since),
        }


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
