"""The Prometheus view of the ``WorkerStats`` contract, shared by every worker's own /metrics and the
router's aggregated /metrics, so the names cannot drift apart.

Names (labels ``worker``, ``role``; transfer series also ``transport``):
    splitserve_worker_kv_blocks{state=used|free|cached|total}        gauge
    splitserve_worker_sequences{state=running|waiting|waiting_for_kv} gauge
    splitserve_worker_prefix_cache_hit_rate                           gauge (hit / prompt tokens)
    splitserve_worker_prompt_tokens_total, _prefix_hit_tokens_total, _generated_tokens_total,
    splitserve_worker_requests_finished_total                         counters
    splitserve_kv_transfer_bytes_total, splitserve_kv_transfer_seconds_total,
    splitserve_kv_transfers_total{outcome=completed|failed}, splitserve_kv_lease_expirations_total,
    splitserve_kv_transfers_in_flight
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from protos import common_pb2

_LABELS = ["worker", "role"]
_TRANSFER_LABELS = ["worker", "role", "transport"]


def worker_metrics(stats: Iterable[common_pb2.WorkerStats]) -> Iterator[Metric]:
    stats = list(stats)
    blocks = GaugeMetricFamily(
        "splitserve_worker_kv_blocks", "KV blocks of each worker's pool, by state", labels=[*_LABELS, "state"]
    )
    sequences = GaugeMetricFamily(
        "splitserve_worker_sequences", "Sequences in each worker's engine, by state", labels=[*_LABELS, "state"]
    )
    hit_rate = GaugeMetricFamily(
        "splitserve_worker_prefix_cache_hit_rate",
        "Prompt tokens served from the prefix cache / prompt tokens",
        labels=_LABELS,
    )
    counters = {
        name: CounterMetricFamily(f"splitserve_worker_{name}", text, labels=_LABELS)
        for name, text in (
            ("prompt_tokens", "Prompt tokens received"),
            ("prefix_hit_tokens", "Prompt tokens found in the prefix cache"),
            ("generated_tokens", "Tokens generated"),
            ("requests_finished", "Requests finished"),
        )
    }
    transfer_bytes = CounterMetricFamily(
        "splitserve_kv_transfer_bytes", "KV bytes sent (prefill) or received (decode)", labels=_TRANSFER_LABELS
    )
    transfer_seconds = CounterMetricFamily(
        "splitserve_kv_transfer_seconds", "Summed KV transfer time", labels=_TRANSFER_LABELS
    )
    transfers = CounterMetricFamily(
        "splitserve_kv_transfers", "KV transfers by outcome", labels=[*_TRANSFER_LABELS, "outcome"]
    )
    leases = CounterMetricFamily(
        "splitserve_kv_lease_expirations", "Reservations whose KV did not land in time", labels=_TRANSFER_LABELS
    )
    in_flight = GaugeMetricFamily(
        "splitserve_kv_transfers_in_flight", "KV transfers under way", labels=_TRANSFER_LABELS
    )
    for s in stats:
        worker = [s.worker_id, s.role]
        transfer = [*worker, s.transport or "grpc"]
        for state, value in (
            ("used", s.kv_blocks_used),
            ("free", s.kv_blocks_free),
            ("cached", s.kv_blocks_cached),
            ("total", s.kv_blocks_total),
        ):
            blocks.add_metric([*worker, state], value)
        for state, value in (("running", s.running), ("waiting", s.waiting), ("waiting_for_kv", s.waiting_for_kv)):
            sequences.add_metric([*worker, state], value)
        hit_rate.add_metric(worker, s.prefix_hit_tokens / s.prompt_tokens if s.prompt_tokens else 0.0)
        for name, family in counters.items():
            family.add_metric(worker, getattr(s, name))
        transfer_bytes.add_metric(transfer, s.kv_transfer_bytes)
        transfer_seconds.add_metric(transfer, s.kv_transfer_seconds)
        transfers.add_metric([*transfer, "completed"], s.kv_transfers_completed)
        transfers.add_metric([*transfer, "failed"], s.kv_transfers_failed)
        leases.add_metric(transfer, s.leases_expired)
        in_flight.add_metric(transfer, s.transfers_in_flight)
    yield from (
        blocks,
        sequences,
        hit_rate,
        *counters.values(),
        transfer_bytes,
        transfer_seconds,
        transfers,
        leases,
        in_flight,
    )
