"""The Prometheus view of the ``WorkerStats`` contract, shared by every worker's own /metrics and the
router's aggregated /metrics, so the names cannot drift apart. docs/metrics.md lists every family.

Labels ``worker``, ``role``, ``model`` (the served model name of the worker's card); transfer series also
``transport``. The KV pool partitions into used and free blocks; prefix-cached blocks are a view across both:

    |<------------------- splitserve_worker_kv_pool_blocks ------------------->|
    | state="used": held by a request (ref > 0)  | state="free": ref == 0      |
    |                 |<--- splitserve_worker_kv_cached_blocks --->|           |
                       published: held (inside used) or evictable (inside free)

The ``vllm:`` families are the same facts under the names of the Gateway API Inference Extension's model server
protocol (vLLM's names, which its endpoint picker reads by default) and of vLLM, computed from the same Stats.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from protos import common_pb2

_LABELS = ["worker", "role", "model"]
_TRANSFER_LABELS = [*_LABELS, "transport"]
_VLLM_LABELS = ["model_name", "worker", "role"]
_COUNTERS = (
    ("prompt_tokens", "Prompt tokens looked up in the prefix cache (received for prefill)"),
    ("prefix_hit_tokens", "Prompt tokens found in the prefix cache"),
    ("generated_tokens", "Tokens generated"),
    ("requests_finished", "Requests finished"),
    ("preemptions", "Running requests preempted for want of KV blocks (recomputed when readmitted)"),
)


def worker_metrics(stats: Iterable[common_pb2.WorkerStats]) -> Iterator[Metric]:
    stats = list(stats)
    yield from _pool_metrics(stats)
    yield from _engine_metrics(stats)
    yield from _transfer_metrics(stats)
    yield from _vllm_metrics(stats)


def _labels(s: common_pb2.WorkerStats) -> list[str]:
    return [s.worker_id, s.role, s.model_card.served_model_name]


def _pool_metrics(stats: list[common_pb2.WorkerStats]) -> Iterator[Metric]:
    blocks = GaugeMetricFamily(
        "splitserve_worker_kv_blocks",
        "KV blocks of each worker's pool by state; used + free = splitserve_worker_kv_pool_blocks",
        labels=[*_LABELS, "state"],
    )
    pool = GaugeMetricFamily("splitserve_worker_kv_pool_blocks", "KV blocks in each worker's pool", labels=_LABELS)
    cached = GaugeMetricFamily(
        "splitserve_worker_kv_cached_blocks",
        "KV blocks published in the prefix cache: counted inside used while held, inside free while evictable",
        labels=_LABELS,
    )
    capacity = GaugeMetricFamily(
        "splitserve_worker_token_capacity",
        "The most tokens (prompt and output) one request may hold on each worker: the context, or the pool if smaller",
        labels=_LABELS,
    )
    for s in stats:
        blocks.add_metric([*_labels(s), "used"], s.kv_blocks_used)
        blocks.add_metric([*_labels(s), "free"], s.kv_blocks_free)
        pool.add_metric(_labels(s), s.kv_blocks_total)
        cached.add_metric(_labels(s), s.kv_blocks_cached)
        capacity.add_metric(_labels(s), s.token_capacity)
    yield from (blocks, pool, cached, capacity)


def _engine_metrics(stats: list[common_pb2.WorkerStats]) -> Iterator[Metric]:
    sequences = GaugeMetricFamily(
        "splitserve_worker_sequences", "Sequences in each worker's engine, by state", labels=[*_LABELS, "state"]
    )
    counters = {
        name: CounterMetricFamily(f"splitserve_worker_{name}", text, labels=_LABELS) for name, text in _COUNTERS
    }
    for s in stats:
        for state, value in (("running", s.running), ("waiting", s.waiting), ("waiting_for_kv", s.waiting_for_kv)):
            sequences.add_metric([*_labels(s), state], value)
        for name, family in counters.items():
            family.add_metric(_labels(s), getattr(s, name))
    yield from (sequences, *counters.values())


def _transfer_metrics(stats: list[common_pb2.WorkerStats]) -> Iterator[Metric]:
    transfer_bytes = CounterMetricFamily(
        "splitserve_kv_transfer_bytes", "KV bytes sent (prefill) or received (decode)", labels=_TRANSFER_LABELS
    )
    transfer_seconds = CounterMetricFamily(
        "splitserve_kv_transfer_seconds",
        "Summed KV transfer time: exposed transfer (prefill), reserve to commit (decode)",
        labels=_TRANSFER_LABELS,
    )
    transfers = CounterMetricFamily(
        "splitserve_kv_transfers", "KV transfers by outcome", labels=[*_TRANSFER_LABELS, "outcome"]
    )
    leases = CounterMetricFamily(
        "splitserve_kv_lease_expirations",
        "Reservations whose KV did not land before their lease ended (counted by the decode worker holding them)",
        labels=_TRANSFER_LABELS,
    )
    in_flight = GaugeMetricFamily(
        "splitserve_kv_transfers_in_flight", "KV transfers under way", labels=_TRANSFER_LABELS
    )
    for s in stats:
        transfer = [*_labels(s), s.transport or "grpc"]
        transfer_bytes.add_metric(transfer, s.kv_transfer_bytes)
        transfer_seconds.add_metric(transfer, s.kv_transfer_seconds)
        transfers.add_metric([*transfer, "completed"], s.kv_transfers_completed)
        transfers.add_metric([*transfer, "failed"], s.kv_transfers_failed)
        transfers.add_metric([*transfer, "cancelled"], s.kv_transfers_cancelled)
        in_flight.add_metric(transfer, s.transfers_in_flight)
        if s.role == "decode":
            leases.add_metric(transfer, s.leases_expired)
    yield from (transfer_bytes, transfer_seconds, transfers, leases, in_flight)


def _vllm_metrics(stats: list[common_pb2.WorkerStats]) -> Iterator[Metric]:
    """The model server protocol's metrics (TotalQueuedRequests, TotalRunningRequests, KVCacheUtilization, cache
    info) and vLLM's prefix-cache counters, with vLLM's semantics."""
    waiting = GaugeMetricFamily(
        "vllm:num_requests_waiting",
        "Requests queued in the engine, including those waiting for their KV to arrive",
        labels=_VLLM_LABELS,
    )
    running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the engine's batch", labels=_VLLM_LABELS)
    usage = GaugeMetricFamily(
        "vllm:kv_cache_usage_perc", "Fraction of KV blocks in use (0 to 1): used / pool", labels=_VLLM_LABELS
    )
    info = GaugeMetricFamily(
        "vllm:cache_config_info",
        "KV cache configuration (value 1): block size in tokens and blocks in the pool",
        labels=[*_VLLM_LABELS, "block_size", "num_gpu_blocks"],
    )
    queries = CounterMetricFamily(
        "vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache", labels=_VLLM_LABELS
    )
    hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache", labels=_VLLM_LABELS)
    preemptions = CounterMetricFamily(
        "vllm:num_preemptions", "Running requests preempted for want of KV blocks", labels=_VLLM_LABELS
    )
    for s in stats:
        labels = [s.model_card.served_model_name, s.worker_id, s.role]
        waiting.add_metric(labels, s.waiting + s.waiting_for_kv)
        running.add_metric(labels, s.running)
        usage.add_metric(labels, s.kv_blocks_used / s.kv_blocks_total if s.kv_blocks_total else 0.0)
        info.add_metric([*labels, str(s.block_size), str(s.kv_blocks_total)], 1)
        queries.add_metric(labels, s.prompt_tokens)
        hits.add_metric(labels, s.prefix_hit_tokens)
        preemptions.add_metric(labels, s.preemptions)
    yield from (waiting, running, usage, info, queries, hits, preemptions)
