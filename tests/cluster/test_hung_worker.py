"""A worker that hangs (SIGSTOP: its process alive, answering neither gRPC nor Ray) under `splitserve up`'s control
plane on real local Ray: the controller kills it once it has been silent for HUNG_AFTER_S and restarts it, as it
does a dead one, where it used to leave it unhealthy for good (with one decode worker, every request a 503); and a
drain of a hung worker ends with the worker killed, where it used to stay draining, holding its resources."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import httpx
import pytest

from cluster.config import PoolSpec
from cluster.controller import HUNG_AFTER_S
from router.config import RouterConfig
from tests.cluster.harness import RunningCluster, local_cluster
from tests.procfs import alive

NO_PREFILL = PoolSpec(replicas=0, min_replicas=0, max_replicas=0, kv_cache_mb=16)  # aggregated: decode prefills
DECODE = PoolSpec(replicas=1, min_replicas=1, max_replicas=2, threads=1, kv_cache_mb=32)
# Silence noticed (two health checks), HUNG_AFTER_S of it, the kill, and a restart that loads the demo model.
RESTART_BOUND_S = HUNG_AFTER_S + 60


@pytest.fixture(scope="module")
def cluster():
    config = dict(prefill=NO_PREFILL, decode=DECODE, namespace="splitserve-hung-test")
    with local_cluster(4, router=RouterConfig(port=0, grpc_port=0), **config) as running:
        yield running


@contextlib.contextmanager
def stopped(pid: int):
    """The worker actor's process stopped for the block, as a wedged one is: alive, answering nothing; resumed
    after it unless killed meanwhile. (tests/workers/harness.py's frozen() signals a process the test started;
    this one is Ray's.)"""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        if alive(pid):
            os.kill(pid, signal.SIGCONT)


def _worker(cluster: RunningCluster, worker_id: str) -> dict | None:
    return next((w for w in cluster.status()["workers"] if w["worker_id"] == worker_id), None)


def _serves(cluster: RunningCluster) -> None:
    reply = httpx.post(
        f"{cluster.url}/v1/chat/completions",
        json={"model": "demo", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 4},
        timeout=60,
    )
    assert reply.status_code == 200, reply.text


def test_a_hung_worker_is_killed_and_restarted_and_the_cluster_serves_again(cluster):
    (hung,) = cluster.workers("decode")
    began = time.monotonic()
    with stopped(hung["pid"]):
        cluster.wait_for(
            lambda: (_worker(cluster, hung["worker_id"]) or {}).get("registrations", 0) >= 2,
            timeout_s=RESTART_BOUND_S,
            what="the hung decode worker's restart",
        )
        restarted_after = time.monotonic() - began
        cluster.wait_for(lambda: not alive(hung["pid"]), timeout_s=10, what="the hung worker's process killed")
    worker = _worker(cluster, hung["worker_id"])
    assert worker["state"] == "ready" and worker["pid"] != hung["pid"], worker
    assert worker["restarts"] == 1, worker  # counted as a dead one's restart is
    assert worker["last_error"].startswith("hung: answered no health check for"), worker
    assert restarted_after >= HUNG_AFTER_S, f"killed after {restarted_after:.1f} s, before HUNG_AFTER_S"
    _serves(cluster)


def test_draining_a_hung_worker_kills_it_and_retires_it(cluster):
    reply = httpx.post(
        f"{cluster.url}/admin/scale", json={"role": "decode", "replicas": 2}, headers=cluster.admin_headers, timeout=30
    )
    assert reply.status_code == 200, reply.text
    cluster.wait_for(lambda: len(cluster.workers("decode")) == 2, timeout_s=120, what="two decode workers")
    victim, survivor = cluster.workers("decode")
    with stopped(victim["pid"]):
        reply = httpx.post(
            f"{cluster.url}/admin/drain",
            json={"worker_id": victim["worker_id"]},
            headers=cluster.admin_headers,
            timeout=30,
        )
        assert reply.status_code == 200 and reply.json()["state"] == "draining", reply.text
        cluster.wait_for(
            lambda: _worker(cluster, victim["worker_id"]) is None,  # retired: dead workers leave the status
            timeout_s=HUNG_AFTER_S + 30,
            what="the hung worker's drain to end",
        )
        cluster.wait_for(lambda: not alive(victim["pid"]), timeout_s=10, what="the hung worker's process killed")
    assert [w["worker_id"] for w in cluster.workers("decode")] == [survivor["worker_id"]]
    assert cluster.status()["pools"]["decode"]["desired"] == 1
    _serves(cluster)
