"""Prometheus metrics of one router (own registry, so several routers can live in one process)."""

from __future__ import annotations

import time
from collections import deque

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

from protos.worker_metrics import worker_metrics
from router.workers import INCOMPATIBLE_FIELDS

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


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "splitserve_requests",
            "Requests finished, by endpoint and HTTP-like status",
            ["endpoint", "status"],
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
        self.routing_decisions = Counter(
            "splitserve_routing_decisions", "Routing decisions by type", ["decision"], registry=r
        )
        self.prefill_retries = Counter(
            "splitserve_prefill_retries", "Prefill attempts retried on another worker", registry=r
        )
        self.migrations = Counter(
            "splitserve_migrations", "Requests moved to another decode worker mid-stream", registry=r
        )
        self.lease_expirations = Counter(
            "splitserve_lease_expirations", "Reservations whose KV did not land in time", registry=r
        )
        self.queue_depth = Gauge("splitserve_queue_depth", "Requests waiting for admission", registry=r)
        self.running = Gauge("splitserve_running_requests", "Requests admitted and in flight", registry=r)
        self.kv_transfer_seconds = Histogram(
            "splitserve_kv_transfer_exposed_seconds",
            "Transfer time not hidden behind prefill (last layer computed to KV committed), by transport",
            ["transport"],
            buckets=TOKEN_LATENCY_BUCKETS,
            registry=r,
        )
        self.kv_transfer_bytes = Counter(
            "splitserve_kv_transfer_request_bytes",
            "KV bytes moved for routed requests, by transport",
            ["transport"],
            registry=r,
        )
        self.planner_decisions = Counter(
            "splitserve_planner_decisions",
            "Planner decisions applied, by pool and direction",
            ["role", "direction"],
            registry=r,
        )
        self.window = LatencyWindow()

    def watch_pool(self, pool) -> None:
        """Adds the cluster's view: every worker's last Stats, and workers up/down by pool."""
        self.registry.register(_PoolCollector(pool))


class _PoolCollector:
    def __init__(self, pool) -> None:
        self.pool = pool

    def collect(self):
        workers = list(self.pool.workers.values())
        up = GaugeMetricFamily(
            "splitserve_workers", "Workers known to the router, by pool and state", labels=["role", "state"]
        )
        for role in ("prefill", "decode"):
            members = [w for w in workers if w.role == role]
            up.add_metric([role, "up"], sum(1 for w in members if w.healthy))
            up.add_metric([role, "down"], sum(1 for w in members if not w.healthy))
        yield up
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
        yield from worker_metrics(w.stats for w in workers if w.stats.worker_id)


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
            "ttft_p90_s": _quantile(ttft, 0.9),
            "tpot_p90_s": _quantile(tpot, 0.9),
            "ttft_samples": len(ttft),
            "tpot_samples": len(tpot),
            "queue_depth": queue_depth,
            "requests_in_window": sum(1 for t in self._requests if t >= since),
        }


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]
