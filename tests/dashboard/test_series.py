"""The dashboard's bookkeeping: latency windows over Prometheus histograms, rates, the activity log."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram

from protos import common_pb2
from router.dashboard import (
    ActivityLog,
    Dashboard,
    HistogramWindow,
    RateMeter,
    _counter_total,
    _error_message,
    _failed_generate_request,
    _generate_request,
    cluster_topology,
)
from router.metrics import RouterMetrics
from router.workers import WorkerPool

BUCKETS = (0.1, 0.2, 0.5, 1.0)


def histogram() -> Histogram:
    return Histogram("latency_seconds", "test", buckets=BUCKETS, registry=CollectorRegistry())


def test_quantiles_interpolate_within_a_bucket_like_promql():
    h = histogram()
    window = HistogramWindow(h, window_s=10)
    window.sample(0.0)
    for value in [0.05] * 50 + [0.15] * 40 + [0.4] * 10:
        h.observe(value)
    window.sample(1.0)
    assert window.count == 100
    assert window.quantile(0.5) == pytest.approx(0.1)  # the 50th of 100 is the last of the first bucket
    assert window.quantile(0.7) == pytest.approx(0.1 + 0.1 * 20 / 40)
    assert window.quantile(0.99) == pytest.approx(0.2 + 0.3 * 9 / 10)
    assert window.share_within(0.2) == pytest.approx(0.9)
    assert window.share_within(0.35) == pytest.approx(0.95)  # half of the (0.2, 0.5] bucket


def test_window_forgets_what_is_older_than_the_window():
    h = histogram()
    window = HistogramWindow(h, window_s=10)
    window.sample(0.0)
    h.observe(0.9)  # between t=0 and t=1
    for second in range(1, 11):
        window.sample(float(second))
    assert window.count == 1  # at t=10 the window starts from the sample at t=0
    window.sample(11.0)
    assert window.count == 0
    assert window.quantile(0.5) is None and window.share_within(1.0) is None


def test_observations_beyond_the_last_bound_report_that_bound():
    h = histogram()
    window = HistogramWindow(h)
    window.sample(0.0)
    h.observe(5.0)
    window.sample(1.0)
    assert window.quantile(0.99) == 1.0
    assert window.share_within(1.0) == 0.0


def test_rates_survive_a_counter_reset():
    meter = RateMeter()
    assert meter.rate("x", 100, 0.0) == 0.0
    assert meter.rate("x", 150, 1.0) == 50.0
    assert meter.rate("x", 20, 2.0) == 20.0  # the worker restarted: counts from zero


def test_counter_totals_filter_by_label():
    requests = Counter("requests", "test", ["endpoint", "status"], registry=CollectorRegistry())
    requests.labels("/v1/completions", "200").inc(3)
    requests.labels("/v1/chat/completions", "503").inc(2)
    requests.labels("/v1/responses", "400").inc(4)
    requests.labels("/v1/models", "200").inc(7)
    assert _counter_total(requests) == 16
    assert _counter_total(requests, _generate_request) == 9
    assert _counter_total(requests, _failed_generate_request) == 6


def test_activity_log_keeps_the_newest_first():
    log = ActivityLog(capacity=3)
    for index in range(5):
        log.record_error("/v1/completions", 400 + index, f"problem {index}")
    assert [e["status"] for e in log.recent()["errors"]] == [404, 403, 402]


def test_error_messages_come_from_the_openai_error_body():
    assert _error_message(json.dumps({"error": {"message": "too long"}}).encode()) == "too long"
    assert _error_message(b"plain failure") == "plain failure"


def _Stats(kv_transfer_bytes: int) -> common_pb2.WorkerStats:
    return common_pb2.WorkerStats(kv_transfer_bytes=kv_transfer_bytes)


class _OlderStats:
    """WorkerStats of a worker built before kv_transfer_bytes existed."""

    DESCRIPTOR = SimpleNamespace(fields_by_name={"running": None})


def _dashboard(workers: list) -> Dashboard:
    frontend = SimpleNamespace(metrics=RouterMetrics(), pool=SimpleNamespace(workers={w.address: w for w in workers}))
    return Dashboard(frontend, None, None, Path("."))


def test_kv_transfer_rate_counts_each_byte_once_and_survives_restarts():
    prefill = SimpleNamespace(address="p:1", role="prefill", last_seen=1.0, stats=_Stats(0))
    decode = SimpleNamespace(address="d:1", role="decode", last_seen=1.0, stats=_Stats(0))
    dashboard = _dashboard([prefill, decode])
    assert dashboard._kv_transfer_gbps(0.0) == 0.0
    prefill.stats, decode.stats = _Stats(2_000_000_000), _Stats(2_000_000_000)  # sent and received: the same bytes
    assert dashboard._kv_transfer_gbps(1.0) == pytest.approx(2.0)
    prefill.stats, decode.stats = _Stats(500_000_000), _Stats(2_500_000_000)  # the prefill worker restarted
    assert dashboard._kv_transfer_gbps(2.0) == pytest.approx(0.5)


def test_kv_transfer_rate_is_unknown_when_no_worker_reports_it():
    older = SimpleNamespace(address="d:1", role="decode", last_seen=1.0, stats=_OlderStats())
    never_seen = SimpleNamespace(address="p:1", role="prefill", last_seen=0.0, stats=_Stats(0))
    assert _dashboard([older, never_seen])._kv_transfer_gbps(0.0) is None


def test_a_failed_worker_is_shown_with_its_reason_and_not_counted_in_its_pool():
    """The controller keeps a worker that died too often as ``failed``, with ``last_error`` (cluster/controller.py)."""
    record = {"role": "decode", "restarts": 3, "node_id": "", "stats": {}}
    cluster = {
        "pools": {"decode": {"desired": 1, "min": 1, "max": 2}},
        "workers": [
            {**record, "worker_id": "decode-1", "state": "failed", "address": "", "last_error": "ModelLoadError: no"},
            {**record, "worker_id": "decode-2", "state": "starting", "address": "", "last_error": ""},
        ],
    }
    topology = cluster_topology(cluster, WorkerPool())
    assert topology["pools"]["decode"]["total"] == 1
    failed, starting = topology["workers"]
    assert failed["state"] == "failed" and failed["down_reason"] == "ModelLoadError: no"
    assert starting["down_reason"] is None
