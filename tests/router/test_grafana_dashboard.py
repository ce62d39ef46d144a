"""The Grafana dashboard in deploy/ only queries metrics the router really exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from router.metrics import RouterMetrics

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "splitserve.json"
WORKER_VIEW = {
    "splitserve_worker_kv_blocks",
    "splitserve_worker_sequences",
    "splitserve_worker_prefix_cache_hit_rate",
    "splitserve_kv_transfer_bytes_total",
    "splitserve_kv_transfers_total",
    "splitserve_kv_lease_expirations_total",
    "splitserve_workers",
}


def _exported() -> set[str]:
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count")}
    names = set()
    for metric in RouterMetrics().registry.collect():  # labelled series have no samples yet: use the families
        names.add(metric.name)
        names.update(metric.name + suffix for suffix in suffixes.get(metric.type, ()))
    return names | WORKER_VIEW


def test_every_queried_metric_exists():
    dashboard = json.loads(DASHBOARD.read_text())
    expressions = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    queried = {name for expr in expressions for name in re.findall(r"\b(splitserve_[a-z0-9_]+)", expr)}
    assert queried, "the dashboard queries nothing"
    missing = sorted(queried - _exported())
    assert not missing, f"dashboard queries metrics nobody exports: {missing}"


def test_worker_view_names_are_what_the_worker_collector_emits():
    from protos import common_pb2
    from protos.worker_metrics import worker_metrics

    emitted = {
        s.name for m in worker_metrics([common_pb2.WorkerStats(worker_id="w", role="decode")]) for s in m.samples
    }
    assert WORKER_VIEW - {"splitserve_workers"} <= emitted
